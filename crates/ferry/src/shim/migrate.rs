//! Live migration of a QEMU UVM from this shim to another ferry host, with the host state
//! moving along.
//!
//! Two shims talk over the destination's control socket (Unix, or TCP between machines):
//!
//! ```text
//! source shim                                   destination shim (`ferry uvm receive`)
//!   Incoming{name, shape, image, options} ──▶  checks; QEMU -incoming; listens for memory
//!                                         ◀──  Reply{memory: unix:… | tcp:…}
//!   QEMU ══ memory, device state (QEMU to QEMU, many passes) ══▶ QEMU (paused when done)
//!   State{snapshot, logs} + log bytes     ──▶  writes logs and snapshot; `cont`; reconnects
//!                                              to the guest and restores (as a host upgrade)
//!                                         ◀──  Reply{restored}
//!   quits its QEMU, exits
//! ```
//!
//! Exactly one side runs the guest: the destination resumes only after its QEMU has the
//! whole state, which the source sends only once its own VM has stopped for good; the source
//! resumes only when the destination says it failed before resuming. If the destination
//! cannot be heard after the state was sent, the source stays paused and says so.

use super::Shim;
use super::backend::{Backend, BackendKind};
use super::failpoint;
use super::output;
use super::restore;
use super::state::ContainerRec;
use super::stream::StreamPlan;
use crate::cli::ShimArgs;
use crate::control::{self, MAX_LINE, Reply, Request};
use crate::paths::UvmPaths;
use crate::snapshot::{self, Snapshot};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use uvm::{MemoryAddress, MigrationEvent, QemuMigrationPlan, QemuUvm, UtilityVm};

/// How long the destination may take from receiving the state to running the guest again.
const RESUME_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a destination may take to boot its QEMU in incoming mode and answer.
const PREPARE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the source asks of the destination.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingSpec {
    pub name: String,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The boot image's cache key (the directory `ferry image build` put it in): both sides
    /// must boot the same bytes.
    pub image: String,
    /// Protobuf-encoded `InitializeOptions`.
    pub options: Vec<u8>,
    /// Where the source's image is: used when this host has no image under that key but
    /// can read the same files (both hosts on one machine).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Check compatibility only.
    pub dry_run: bool,
    pub log_limit: u64,
}

/// The host state that follows the memory: the snapshot, then each log's bytes in order.
#[derive(Debug, Serialize, Deserialize)]
struct StateHeader {
    snapshot: Snapshot,
    logs: Vec<LogBlob>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LogBlob {
    container: String,
    pid: u32,
    stream: String,
    len: u64,
}

type Stream = Pin<Box<dyn AsyncReadWrite>>;
/// A control connection's halves, whether it came over Unix or TCP.
type ReadHalf = Pin<Box<dyn AsyncRead + Send>>;
type WriteHalf = Pin<Box<dyn AsyncWrite + Send>>;
trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}

/// A destination endpoint: `unix:/path/control.sock` or `tcp:HOST:PORT`.
async fn dial(endpoint: &str) -> Result<Stream, String> {
    let connect = async {
        if let Some(path) = endpoint.strip_prefix("unix:") {
            let s: Stream = Box::pin(tokio::net::UnixStream::connect(path).await?);
            Ok(s)
        } else if let Some(addr) = endpoint.strip_prefix("tcp:") {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let s: Stream = Box::pin(tcp);
            Ok(s)
        } else {
            Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "expected unix:/PATH or tcp:HOST:PORT",
            ))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| format!("destination {endpoint}: no answer within 10 s"))?
        .map_err(|e| format!("destination {endpoint}: {e} (is `ferry uvm receive` running there?)"))
}

/// The image key of a kernel path `<cache>/<key>/vmlinux`.
fn image_key(kernel: &Path) -> String {
    kernel
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

// -- source ----------------------------------------------------------------------------------

/// Serves a `Migrate` request: drives the migration and streams events to the client as JSON
/// lines (`{"event": …}`), then one final [`Reply`].
pub async fn source<R, W>(
    shim: Arc<Shim>,
    to: String,
    options: Vec<u8>,
    dry_run: bool,
    mut client_r: R,
    mut client_w: W,
) where
    R: AsyncBufRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<MigrationEvent>();
    set_outgoing(
        &shim,
        Some(Outgoing {
            to: to.clone(),
            started_unix_ms: uvm::migration::unix_ms_now(),
            uvm: None,
            last_event: None,
        }),
    );
    let (cancel_tx, cancel_rx) = watch::channel(false);
    // The client going away (Ctrl-C) or sending "cancel" cancels before the switch-over.
    let watcher = tokio::spawn(async move {
        let _ = client_r.read(&mut [0u8; 64]).await;
        cancel_tx.send_replace(true);
    });
    // Events go out as they come; the sender is only lent to the migration, so the stream
    // ends when it is dropped below, and the writer hands the connection back for the reply.
    let events_shim = shim.clone();
    let writer = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if let Some(o) = lock_outgoing(&events_shim).as_mut() {
                o.last_event = Some(ev.clone());
            }
            // A client gone is no reason to stop: the migration goes on without a listener.
            let _ = control::write_line(&mut client_w, &json!({"event": ev})).await;
        }
        client_w
    });
    let result = migrate_out(&shim, &to, &options, dry_run, &tx, cancel_rx).await;
    let reply = match result {
        Ok(data) => Reply::ok(data),
        Err(e) => {
            tracing::warn!(error = %e, "migration failed");
            Reply::error(e)
        }
    };
    let finished = reply.ok && !dry_run;
    drop(tx);
    set_outgoing(&shim, None);
    if let Ok(mut client_w) = writer.await {
        let _ = control::write_line(&mut client_w, &reply).await;
    }
    watcher.abort();
    if finished {
        shim.stop.send_replace(true);
    }
}

pub(super) fn lock_outgoing(shim: &Shim) -> std::sync::MutexGuard<'_, Option<Outgoing>> {
    shim.outgoing.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_outgoing(shim: &Shim, o: Option<Outgoing>) {
    *lock_outgoing(shim) = o;
}

async fn migrate_out(
    shim: &Arc<Shim>,
    to: &str,
    options: &[u8],
    dry_run: bool,
    events: &mpsc::UnboundedSender<MigrationEvent>,
    cancel: watch::Receiver<bool>,
) -> Result<serde_json::Value, String> {
    if shim.kind != BackendKind::Qemu {
        return Err(format!(
            "UVM {:?} runs on the {} backend, which cannot migrate (start it with --backend qemu)",
            shim.name,
            shim.uvm.lock().await.name()
        ));
    }
    let plan = QemuMigrationPlan::from_bytes(options).map_err(|e| e.to_string())?;
    let started = Instant::now();
    let spec = {
        let uvm = shim.uvm.lock().await;
        if let Some(o) = lock_outgoing(shim).as_mut() {
            o.uvm = Some(uvm.properties());
        }
        let Backend::Qemu(q) = &*uvm else {
            unreachable!("checked above")
        };
        let c = q.config();
        IncomingSpec {
            name: shim.name.clone(),
            memory_mib: c.memory_mib,
            cpus: c.cpus,
            image: image_key(&c.kernel),
            kernel: c.kernel.clone(),
            initrd: c.initrd.clone(),
            options: options.to_vec(),
            dry_run,
            log_limit: shim.log_limit,
        }
    };
    let dest = dial(to).await?;
    let (dr, mut dw) = tokio::io::split(dest);
    let mut dr = BufReader::new(dr);
    control::write_line(&mut dw, &Request::Incoming(spec))
        .await
        .map_err(|e| format!("destination {to}: {e}"))?;
    let reply: Reply = tokio::time::timeout(PREPARE_TIMEOUT, control::read_line(&mut dr))
        .await
        .map_err(|_| format!("destination {to} did not get ready within {PREPARE_TIMEOUT:?}"))?
        .map_err(|e| format!("destination {to}: {e}"))?;
    if !reply.ok {
        return Err(format!(
            "destination {to} refused: {}",
            reply.error.unwrap_or_default()
        ));
    }
    if dry_run {
        return Ok(json!({"dry_run": true, "compatible": true, "destination": reply.data}));
    }
    let address: MemoryAddress = reply.data["memory"]
        .as_str()
        .unwrap_or_default()
        .parse()
        .map_err(|e| format!("destination {to} gave a bad memory address: {e}"))?;

    let prepared = started.elapsed();
    // The transfer. Requests keep being served meanwhile (the guest runs), except those that
    // need the VM itself, which wait.
    let mut uvm = shim.uvm.lock().await;
    let facts = restore::UvmFacts::of(&uvm)?;
    let Backend::Qemu(q) = &mut *uvm else {
        unreachable!("checked above")
    };
    let (moved, dest_lost) = transfer_watching(q, &plan, &address, events, cancel, &mut dr).await;
    if dest_lost {
        // Its host process went away before the state was sent: no one there can run the
        // guest (only that process resumes its QEMU, and it never got the snapshot).
        let why = "the destination's host process went away during the transfer";
        if moved.is_ok() {
            q.finalize_source(true)
                .await
                .map_err(|e| format!("{why}, and the source could not resume the UVM: {e}"))?;
        }
        return Err(match moved {
            Ok(()) => format!("{why}; the UVM runs here again"),
            Err(e) => format!("{why} ({e}); the UVM runs here again"),
        });
    }
    moved.map_err(|e| e.to_string())?;
    // The VM is stopped here for good unless the destination fails before resuming.
    shim.stopping.store(true, Ordering::SeqCst);
    let transfer = started.elapsed();
    let sent = send_state(shim, facts, &mut dw).await;
    let answer = match sent {
        Ok(()) => tokio::time::timeout(RESUME_TIMEOUT, control::read_line::<_, Reply>(&mut dr))
            .await
            .map_err(|_| format!("no answer within {RESUME_TIMEOUT:?}"))
            .and_then(|r| r.map_err(|e| e.to_string())),
        Err(e) => Err(e),
    };
    // The guest runs on the destination from here: the end of the migration's total, as in
    // raw QEMU's; quitting this side's QEMU below is not part of it.
    let running = started.elapsed();
    match answer {
        Ok(r) if r.ok => {
            failpoint::hold(&shim.paths.dir, failpoint::SOURCE_AFTER_SWITCHOVER).await;
            shim.conn.close("the UVM migrated to another host");
            if let Err(e) = q.finalize_source(false).await {
                tracing::warn!(error = %e, "quitting the source QEMU");
            }
            retire(&shim.paths, to);
            tracing::info!(to, ?transfer, "migrated");
            Ok(json!({
                "migrated": shim.name,
                "to": to,
                "total_ms": running.as_millis() as u64,
                // Asking the destination to get ready (QEMU started there, listening)...
                "prepare_ms": prepared.as_millis() as u64,
                // ...and from the first byte of memory to the guest running there.
                "transfer_ms": (running - prepared).as_millis() as u64,
                "destination": r.data,
            }))
        }
        Ok(r) => {
            // The destination failed before running the guest: it runs here again.
            let why = r.error.unwrap_or_default();
            shim.stopping.store(false, Ordering::SeqCst);
            q.finalize_source(true).await.map_err(|e| {
                format!("the destination failed ({why}) and the source could not resume: {e}")
            })?;
            Err(format!(
                "the destination failed before resuming the UVM ({why}); it runs here again"
            ))
        }
        Err(e) => Err(format!(
            "lost the destination after sending it the UVM's state ({e}): whether it resumed \
             the UVM is unknown, so the source stays paused. Check the destination \
             (`ferry uvm inspect {}` there); if it does not run the UVM, resume here with \
             `ferry uvm resume {}`",
            shim.name, shim.name
        )),
    }
}

/// QEMU's transfer, watching the destination's control connection meanwhile: the client
/// cancelling, or that connection ending (the destination's host process died), cancels it.
/// Returns the transfer's result and whether the destination went away.
async fn transfer_watching<R: AsyncBufRead + Unpin>(
    q: &mut QemuUvm,
    plan: &QemuMigrationPlan,
    address: &MemoryAddress,
    events: &mpsc::UnboundedSender<MigrationEvent>,
    mut cancel: watch::Receiver<bool>,
    dest: &mut R,
) -> (uvm::Result<()>, bool) {
    let (stop_tx, stop) = watch::channel(*cancel.borrow());
    let moved = q.migrate_out(plan, address, events, stop);
    tokio::pin!(moved);
    let (mut client_open, mut dest_open, mut dest_lost) = (true, true, false);
    loop {
        tokio::select! {
            r = &mut moved => return (r, dest_lost),
            c = cancel.changed(), if client_open => match c {
                Ok(()) => {
                    if *cancel.borrow() {
                        let _ = stop_tx.send(true);
                    }
                }
                Err(_) => client_open = false,
            },
            // Not consumed: an early answer (the destination failing) is read afterwards.
            b = dest.fill_buf(), if dest_open => {
                dest_open = false;
                if b.map(|b| b.is_empty()).unwrap_or(true) {
                    tracing::warn!("the destination's host process went away; cancelling the transfer");
                    dest_lost = true;
                    let _ = stop_tx.send(true);
                }
            }
        }
    }
}

/// `ferry uvm resume NAME`: after a migration whose destination was lost once the state had
/// been sent, runs the guest here again (the operator has made sure the destination does not).
pub async fn resume_source(shim: &Shim) -> Result<(serde_json::Value, Option<StreamPlan>), String> {
    let mut uvm = shim.uvm.lock().await;
    let Backend::Qemu(q) = &mut *uvm else {
        return Err("only a QEMU UVM can be left paused by a migration".into());
    };
    q.finalize_source(true).await.map_err(|e| e.to_string())?;
    shim.stopping.store(false, Ordering::SeqCst);
    tracing::warn!(uvm = %shim.name, "resumed on the source after a migration whose destination was lost");
    Ok((json!({"resumed": shim.name}), None))
}

/// Marks a source directory whose UVM left: the snapshot no longer describes anything that
/// runs here (a restore from it must not be attempted).
fn retire(paths: &UvmPaths, to: &str) {
    let snap = paths.dir.join("snapshot");
    let _ = std::fs::rename(&snap, paths.dir.join("snapshot.migrated"));
    let _ = std::fs::write(paths.migrated(), format!("{to}\n"));
}

/// Sends the snapshot and every log. The guest is stopped, so the logs no longer grow
/// (output still in flight lands past each log's recorded header, which is what counts).
async fn send_state<W: AsyncWrite + Unpin>(
    shim: &Shim,
    facts: restore::UvmFacts,
    w: &mut W,
) -> Result<(), String> {
    let snap = restore::snapshot_with(shim, facts);
    let logs_dir = shim.paths.logs();
    let mut blobs = Vec::new();
    let mut files = Vec::new();
    for c in &snap.containers {
        for p in &c.processes {
            for stream in ["stdout", "stderr"] {
                let path = output::log_path(&logs_dir.join(&c.id), p.pid, stream);
                // Header first: what it records is all in the file already.
                let Ok(bytes) = output::contents(&path) else {
                    continue;
                };
                blobs.push(LogBlob {
                    container: c.id.clone(),
                    pid: p.pid,
                    stream: stream.into(),
                    len: bytes.len() as u64,
                });
                files.push(bytes);
            }
        }
    }
    let header = StateHeader {
        snapshot: snap,
        logs: blobs,
    };
    let io = |e: std::io::Error| format!("sending the UVM's state: {e}");
    control::write_line(w, &header).await.map_err(io)?;
    for f in files {
        w.write_all(&f).await.map_err(io)?;
    }
    w.flush().await.map_err(io)?;
    Ok(())
}

// -- destination -----------------------------------------------------------------------------

/// What a receiving shim ends up with: the migrated UVM, connected and restored.
pub type Received = (restore::Reattached, MigrationReport);

/// What the last incoming migration measured (shown by `ferry uvm inspect`).
pub type MigrationReport = Arc<std::sync::Mutex<serde_json::Value>>;

/// A migration out of this host, as `ferry uvm inspect` shows it meanwhile. The transfer holds
/// the UVM, so the UVM's properties are taken when it starts.
#[derive(Debug, Clone, Serialize)]
pub struct Outgoing {
    pub to: String,
    /// ms since the epoch.
    pub started_unix_ms: u64,
    /// The UVM as it was when the migration started.
    #[serde(skip)]
    pub uvm: Option<uvm::UvmProperties>,
    /// The last event reported (phase, bytes sent, pass...).
    pub last_event: Option<MigrationEvent>,
}

/// Waits on `listener` (and on TCP with `--listen`) for a source to send a UVM, answering
/// Info and (on the Unix socket only) Stop meanwhile; an attempt that fails leaves nothing
/// running and the wait goes on. `None`: stopped.
pub async fn receive(
    args: &ShimArgs,
    paths: &UvmPaths,
    root: &Path,
    listener: &UnixListener,
) -> Result<Option<Received>, String> {
    let tcp = match &args.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("listen on {addr}: {e}"))?,
        ),
        None => None,
    };
    super::report_ready("ok");
    tracing::info!(uvm = %args.name, tcp = ?args.listen, "waiting for an incoming migration");
    loop {
        let accept_tcp = async {
            match &tcp {
                Some(l) => l.accept().await.map(|(s, peer)| (s, Some(peer))),
                None => std::future::pending().await,
            }
        };
        // One stream type for both: a boxed reader and writer.
        let (r, mut w, peer): (ReadHalf, WriteHalf, Option<std::net::SocketAddr>) = tokio::select! {
            a = listener.accept() => {
                let (s, _) = a.map_err(|e| format!("control accept: {e}"))?;
                let (r, w) = s.into_split();
                (Box::pin(r), Box::pin(w), None)
            }
            a = accept_tcp => match a {
                Ok((s, peer)) => {
                    let _ = s.set_nodelay(true);
                    let (r, w) = s.into_split();
                    (Box::pin(r), Box::pin(w), peer)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TCP accept failed");
                    continue;
                }
            },
        };
        let mut r = BufReader::new(r);
        let request: Request = match control::read_line(&mut r).await {
            Ok(req) => req,
            Err(e) => {
                let _ =
                    control::write_line(&mut w, &Reply::error(format!("bad request: {e}"))).await;
                continue;
            }
        };
        match request {
            Request::Info => {
                let info = json!({
                    "uvm": {"name": args.name, "backend": "qemu", "running": false,
                            "state": "waiting for an incoming migration",
                            "state_dir": paths.dir},
                    "shim_pid": std::process::id(),
                    "containers": [],
                });
                let _ = control::write_line(&mut w, &Reply::ok(info)).await;
            }
            // Only a local user (the Unix socket's owner) may stop the receiver.
            Request::Stop if peer.is_none() => {
                let _ =
                    control::write_line(&mut w, &Reply::ok(json!({"stopped": args.name}))).await;
                return Ok(None);
            }
            Request::Incoming(spec) => match incoming(args, paths, root, spec, r, w, peer).await {
                Ok(Some(received)) => return Ok(Some(received)),
                Ok(None) => {}
                Err(Failure::Retry(e)) => {
                    tracing::warn!(error = %e, "incoming migration failed; waiting again")
                }
                Err(Failure::Fatal(e)) => return Err(e),
            },
            _ => {
                let _ = control::write_line(
                    &mut w,
                    &Reply::error(format!(
                        "UVM {:?} is waiting for an incoming migration; it runs nothing yet",
                        args.name
                    )),
                )
                .await;
            }
        }
    }
}

/// Where this destination's QEMU listens for memory: a socket in its directory, or with TCP
/// the `--listen` host at `--memory-port`.
fn memory_address(
    args: &ShimArgs,
    paths: &UvmPaths,
    transport: uvm::migration::MemoryTransport,
    peer: Option<std::net::SocketAddr>,
) -> Result<MemoryAddress, String> {
    use uvm::migration::MemoryTransport;
    let tcp = match transport {
        MemoryTransport::Tcp => true,
        MemoryTransport::Unix => false,
        // Unspecified: what the request came over.
        _ => peer.is_some(),
    };
    if !tcp {
        return MemoryAddress::unix(paths.dir.join("memory.sock")).map_err(|e| e.to_string());
    }
    let listen = args.listen.as_deref().ok_or(
        "memory over TCP needs a destination listening on TCP (`ferry uvm receive NAME --listen HOST:PORT`)",
    )?;
    let (host, port) = listen
        .rsplit_once(':')
        .ok_or_else(|| format!("--listen {listen}: expected HOST:PORT"))?;
    let port = match args.memory_port {
        Some(p) => p,
        None => port
            .parse::<u16>()
            .ok()
            .and_then(|p| p.checked_add(1))
            .ok_or_else(|| {
                format!("--listen {listen}: no port after it for memory; pass --memory-port")
            })?,
    };
    format!("tcp:{host}:{port}")
        .parse()
        .map_err(|e: uvm::UvmError| e.to_string())
}

/// The image to boot: the one the source booted, from this host's cache.
fn find_image(
    args: &ShimArgs,
    root: &Path,
    spec: &IncomingSpec,
) -> Result<(PathBuf, PathBuf), String> {
    let key = spec.image.as_str();
    if let (Some(k), Some(i)) = (&args.qemu.kernel, &args.qemu.initrd) {
        if image_key(k) != key {
            return Err(format!(
                "the source booted image {key}, this destination was given {}",
                k.display()
            ));
        }
        return Ok((k.clone(), i.clone()));
    }
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(format!("bad image key {key:?}"));
    }
    let dir = root.join("images").join("uvm").join(key);
    let (k, i) = (dir.join("vmlinux"), dir.join("initramfs.cpio"));
    if (!k.is_file() || !i.is_file())
        && image_key(&spec.kernel) == key
        && image_key(&spec.initrd) == key
        && spec.kernel.is_file()
        && spec.initrd.is_file()
    {
        // The same cache entry (content-addressed), readable from here.
        return Ok((spec.kernel.clone(), spec.initrd.clone()));
    }
    if !k.is_file() || !i.is_file() {
        return Err(format!(
            "this host lacks the source's image {key} (in {}): build it here with the same \
             inputs (`ferry image build`)",
            dir.display()
        ));
    }
    Ok((k, i))
}

/// Why an incoming migration failed: before the guest ran here (nothing is left; wait for
/// the next attempt), or after (the guest runs here without its host state: give up loudly).
enum Failure {
    Retry(String),
    Fatal(String),
}

async fn incoming<R, W>(
    args: &ShimArgs,
    paths: &UvmPaths,
    root: &Path,
    spec: IncomingSpec,
    mut r: R,
    mut w: W,
    peer: Option<std::net::SocketAddr>,
) -> Result<Option<Received>, Failure>
where
    R: AsyncBufRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let checked = (|| {
        if spec.name != args.name {
            return Err(format!(
                "this destination waits for UVM {:?}, not {:?}",
                args.name, spec.name
            ));
        }
        let plan = QemuMigrationPlan::from_bytes(&spec.options).map_err(|e| e.to_string())?;
        let image = find_image(args, root, &spec)?;
        let address = memory_address(args, paths, plan.transport, peer)?;
        Ok((plan, image, address))
    })();
    let (plan, (kernel, initrd), address) = match checked {
        Ok(x) => x,
        Err(e) => {
            let _ = control::write_line(&mut w, &Reply::error(e.clone())).await;
            return Err(Failure::Retry(e));
        }
    };
    if spec.dry_run {
        let _ = control::write_line(
            &mut w,
            &Reply::ok(json!({"compatible": true, "image": spec.image})),
        )
        .await;
        return Ok(None);
    }
    let mut config = args
        .qemu
        .config(&args.name, paths.dir.clone(), kernel, initrd);
    config.memory_mib = spec.memory_mib;
    config.cpus = spec.cpus;
    let mut uvm = QemuUvm::new(config);
    if let Err(e) = uvm.start_incoming(&plan, &address).await {
        let e = format!("cannot start QEMU for the incoming UVM: {e}");
        let _ = control::write_line(&mut w, &Reply::error(e.clone())).await;
        return Err(Failure::Retry(e));
    }
    let _ = control::write_line(&mut w, &Reply::ok(json!({"memory": address.to_string()}))).await;

    // The memory arrives QEMU to QEMU while the source's shim waits; then its state.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let limit = spec.log_limit;
    let wait_started = Instant::now();
    let (loaded, state) = tokio::join!(uvm.wait_incoming(&tx), read_state(&mut r, paths, limit));
    // QEMU is gone before the source hears of the failure (and resumes its copy): never two.
    let fail = async |uvm: &mut QemuUvm, w: &mut W, e: String| {
        let _ = uvm.stop(Duration::from_secs(1)).await;
        let _ = control::write_line(w, &Reply::error(e.clone())).await;
        Err(Failure::Retry(e))
    };
    tracing::debug!(elapsed = ?wait_started.elapsed(), "memory and host state received");
    let mut snap = match (loaded, state) {
        (Ok(()), Ok(snap)) => snap,
        (Err(e), _) => {
            return fail(&mut uvm, &mut w, format!("the memory transfer failed: {e}")).await;
        }
        (_, Err(e)) => return fail(&mut uvm, &mut w, e).await,
    };
    // Recorded before the guest runs: a crash from here on is restorable like an upgrade.
    snap.uvm.agent_pid = uvm.properties().pid.unwrap_or_default();
    // What the source knew of the guest's session protocol comes along with the guest.
    if let Some(q) = &snap.uvm.qemu {
        uvm.set_session_hello(q.session_hello);
    }
    snap.uvm.qemu = Some(super::backend::qemu_state(&uvm));
    // The UVM may have lived here before and left: it is back.
    let _ = std::fs::remove_file(paths.migrated());
    let _ = std::fs::remove_file(paths.dir.join("snapshot.migrated"));
    if let Err(e) = snapshot::write_with(&paths.dir.join("snapshot"), &snap, false) {
        return fail(&mut uvm, &mut w, format!("cannot write the snapshot: {e}")).await;
    }
    tracing::debug!(elapsed = ?wait_started.elapsed(), "snapshot written");
    failpoint::hold(&paths.dir, failpoint::INCOMING_BEFORE_RESUME).await;
    if let Err(e) = uvm.resume_incoming().await {
        return fail(&mut uvm, &mut w, format!("cannot resume the UVM: {e}")).await;
    }
    let resumed = Instant::now();
    // The guest runs here now, and only here: the source may let go of its copy. The rest
    // (reconnecting, restoring the host state) is the blackout ferry adds, timed below.
    let mut dest_events = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        dest_events.push(ev);
    }
    let _ = control::write_line(
        &mut w,
        &Reply::ok(json!({"resumed": true, "events": dest_events})),
    )
    .await;
    let after_resume = |e: String| {
        Failure::Fatal(format!(
            "the UVM runs here but {e}; its QEMU is left running: take it over with \
             `ferry uvm restore {}`",
            paths.dir.join("snapshot").display()
        ))
    };
    let transport = uvm
        .reopen_channel()
        .await
        .map_err(|e| after_resume(format!("its channel failed: {e}")))?;
    let reattached =
        restore::reattach_snapshot(snap, restore::Found::Qemu(Box::new(uvm), transport))
            .await
            .map_err(|e| after_resume(format!("restoring its host state failed: {e}")))?;
    let containers = &reattached.2;
    let reconnect_ms = resumed.elapsed().as_millis() as u64;
    tracing::info!(
        reconnect_ms,
        containers = containers.len(),
        "migrated UVM restored"
    );
    let report = Arc::new(std::sync::Mutex::new(json!({
        "from_resume_to_restored_ms": reconnect_ms,
    })));
    tokio::spawn(time_first_output(containers, resumed, report.clone()));
    Ok(Some((reattached, report)))
}

/// How long after the guest resumed here each running process's output flowed again (the
/// blackout ferry adds to QEMU's), for `ferry uvm inspect` and the benchmarks. Processes
/// that print nothing within a while are left out.
fn time_first_output(
    containers: &BTreeMap<String, ContainerRec>,
    resumed: Instant,
    report: MigrationReport,
) -> impl std::future::Future<Output = ()> + use<> {
    let logs: Vec<(String, u32, Arc<output::OutputLog>)> = containers
        .values()
        .flat_map(|c| c.procs.values())
        .filter(|p| p.exit_state().is_none())
        .filter_map(|p| Some((p.container.clone(), p.pid, p.stdout.clone()?)))
        .collect();
    async move {
        let mut firsts = Vec::new();
        for (container, pid, log) in logs {
            // Timed where the byte arrived (the capture may have begun before this runs).
            let first = tokio::time::timeout(Duration::from_secs(10), log.first_new_byte());
            if let Ok(Some(at)) = first.await {
                firsts.push(json!({
                    "container": container,
                    "pid": pid,
                    "first_output_ms": at.saturating_duration_since(resumed).as_millis() as u64,
                }));
            }
        }
        let worst = firsts
            .iter()
            .filter_map(|f| f["first_output_ms"].as_u64())
            .max();
        let mut r = report.lock().unwrap_or_else(|p| p.into_inner());
        r["first_output"] = json!(firsts);
        r["added_blackout_ms"] = json!(worst);
    }
}

/// Reads the source's state: the snapshot (made to describe this host's directory) and the
/// logs, written where this shim keeps them.
async fn read_state<R: AsyncBufRead + Unpin>(
    r: &mut R,
    paths: &UvmPaths,
    log_limit: u64,
) -> Result<Snapshot, String> {
    let header: StateHeader = control::read_line(r)
        .await
        .map_err(|e| format!("receiving the UVM's state: {e}"))?;
    let mut snap = header.snapshot;
    snap.uvm.state_dir = paths.dir.clone();
    let max = log_limit.max(output::MIN_LOG_LIMIT) + 2 * MAX_LINE as u64;
    for blob in header.logs {
        // Each names a file under this host's logs directory.
        if bridge::validate_container_id(&blob.container).is_err()
            || !["stdout", "stderr"].contains(&blob.stream.as_str())
        {
            return Err(format!("bad log entry {blob:?} in the UVM's state"));
        }
        if blob.len > max {
            return Err(format!(
                "log {}/{}.{} is {} bytes, over the {max}-byte bound",
                blob.container, blob.pid, blob.stream, blob.len
            ));
        }
        let dir = paths.logs().join(&blob.container);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let path = output::log_path(&dir, blob.pid, &blob.stream);
        // Read whole (bounded above), then written in one blocking call: tokio's file writes
        // take a trip to the blocking pool per 8 KiB, which under load made this the longest
        // part of the guest's blackout.
        let mut bytes = Vec::with_capacity(blob.len as usize);
        let copied = (&mut *r)
            .take(blob.len)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| format!("receiving {}: {e}", path.display()))?;
        if copied as u64 != blob.len {
            return Err(format!(
                "the UVM's state ended inside {} ({copied} of {} bytes)",
                path.display(),
                blob.len
            ));
        }
        // Not synced: the logs matter while this host runs the UVM, and a crash of this
        // machine ends the UVM too (the source keeps its copy).
        tokio::fs::write(&path, &bytes)
            .await
            .map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    Ok(snap)
}
