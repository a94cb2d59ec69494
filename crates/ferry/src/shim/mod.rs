//! The per-UVM host process ("the shim"): owns the UVM, the guest connection and the relays,
//! and serves the control socket the CLI talks to.

pub mod backend;
pub mod failpoint;
pub mod migrate;
mod ops;
pub mod output;
mod restore;
pub mod rootfs;
pub mod state;
mod stream;

use crate::cli::ShimArgs;
use crate::control::{self, Reply, Request};
use crate::paths::UvmPaths;
use backend::{Backend, BackendKind};
use host::GuestConnection;
use state::ContainerRec;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::io::BufReader;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use uvm::{LocalConfig, LocalUvm, QemuUvm, UtilityVm};

/// The file descriptor on which `ferry uvm start` waits for "ok" or an error.
pub const READY_FD: i32 = 3;

pub struct Shim {
    pub name: String,
    pub root: PathBuf,
    pub paths: UvmPaths,
    pub conn: GuestConnection,
    pub uvm: tokio::sync::Mutex<Backend>,
    /// Which backend `uvm` is (fixed for the shim's life; readable without the lock).
    pub kind: BackendKind,
    /// What the migration that brought the UVM here measured.
    pub last_migration: Option<migrate::MigrationReport>,
    /// The migration out of this host under way, if any: what `ferry uvm inspect` shows while
    /// the transfer holds `uvm`.
    pub outgoing: Mutex<Option<migrate::Outgoing>>,
    pub containers: Mutex<BTreeMap<String, ContainerRec>>,
    /// Container ids being created right now (so two runs cannot race for one id).
    pub creating: Mutex<HashSet<String>>,
    /// Set when a Stop or Save request begins: losing the guest is then expected, and no new
    /// request is served.
    pub stopping: std::sync::atomic::AtomicBool,
    /// Set when the Stop request has been answered: the shim may exit.
    pub stop: watch::Sender<bool>,
    /// One snapshot write at a time.
    pub persist_lock: tokio::sync::Mutex<()>,
    /// Bytes of each captured stream kept on disk (see [`output`]).
    pub log_limit: u64,
}

/// Tells `ferry uvm start` how the start went, once: the pipe is closed after the first
/// report, and its descriptor number may then belong to something else.
pub(crate) fn report_ready(message: &str) {
    static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if REPORTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    // SAFETY: fd 3 was set up by `ferry uvm start`; when absent the write fails harmlessly.
    let mut f = unsafe { std::fs::File::from_raw_fd(READY_FD) };
    let _ = writeln!(f, "{message}");
}

/// Runs the shim until the UVM stops (or is handed to another shim). With `--restore`, takes
/// over the running UVM a snapshot describes instead of starting one.
pub async fn run(args: ShimArgs, root: PathBuf) -> i32 {
    // Only the shim may hold the readiness pipe: the agent it starts must not inherit it, or
    // `ferry uvm start` would wait for the agent to exit.
    // SAFETY: F_SETFD on a descriptor number; harmless if fd 3 is not open.
    unsafe { libc::fcntl(READY_FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    let paths = UvmPaths::new(&root, &args.name);
    let result = serve(args, root, paths.clone()).await;
    let _ = std::fs::remove_file(paths.control());
    match result {
        Ok(()) => 0,
        Err(e) => {
            tracing::error!(error = %e, "shim failed");
            report_ready(&format!("error: {e}"));
            1
        }
    }
}

/// Starts the UVM the arguments describe.
async fn start(args: &ShimArgs, paths: &UvmPaths) -> Result<(Backend, GuestConnection), String> {
    match args.backend {
        BackendKind::Local => {
            let mut uvm = LocalUvm::new(local_config(args, paths)?);
            let conn = uvm.start().await.map_err(|e| e.to_string())?;
            Ok((Backend::Local(Box::new(uvm)), conn))
        }
        BackendKind::Qemu => {
            let (Some(kernel), Some(initrd)) = (&args.qemu.kernel, &args.qemu.initrd) else {
                return Err("the qemu backend needs --kernel and --initrd".into());
            };
            let config = args.qemu.config(
                &args.name,
                paths.dir.clone(),
                kernel.clone(),
                initrd.clone(),
            );
            let mut uvm = QemuUvm::new(config);
            let conn = uvm.start().await.map_err(|e| e.to_string())?;
            Ok((Backend::Qemu(Box::new(uvm)), conn))
        }
    }
}

/// Names another guest agent program for the local backend (see `ferry uvm start --help`):
/// for testing the host against an agent that misbehaves, or debugging with a standalone
/// `ferry-gcs`.
pub const GCS_PROGRAM_ENV: &str = "FERRY_GCS_PROGRAM";

pub fn local_config(args: &ShimArgs, paths: &UvmPaths) -> Result<LocalConfig, String> {
    let (program, prefix) = match std::env::var_os(GCS_PROGRAM_ENV) {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            // No search of $PATH, no path relative to wherever the shim happens to run.
            if !p.is_absolute() || !p.is_file() {
                return Err(format!(
                    "{GCS_PROGRAM_ENV}={}: not an absolute path to a program",
                    p.display()
                ));
            }
            tracing::warn!(program = %p.display(), "guest agent program set by {GCS_PROGRAM_ENV}");
            (p, vec![])
        }
        _ => (
            std::env::current_exe()
                .map_err(|e| format!("cannot find the ferry executable: {e}"))?,
            vec!["gcs".into()],
        ),
    };
    let mut config = LocalConfig::new(&args.name, paths.dir.clone(), program, prefix);
    if let Some(i) = args.isolate {
        config.isolate = i;
    }
    if let Ok(level) = std::env::var("FERRY_GCS_LOG") {
        config.gcs_log_level = level;
    }
    Ok(config)
}

async fn serve(args: ShimArgs, root: PathBuf, paths: UvmPaths) -> Result<(), String> {
    std::fs::create_dir_all(&paths.dir)
        .map_err(|e| format!("create {}: {e}", paths.dir.display()))?;
    let _ = std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o700));
    let name = args.name.as_str();
    // Bound first: a destination waiting for a migration is reached through it.
    let control = paths.control();
    let _ = std::fs::remove_file(&control);
    let listener =
        UnixListener::bind(&control).map_err(|e| format!("bind {}: {e}", control.display()))?;
    std::fs::set_permissions(&control, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod {}: {e}", control.display()))?;
    let mut last_migration = None;
    let (uvm, conn, containers, saved_limit) = match &args.restore {
        None if args.incoming => match migrate::receive(&args, &paths, &root, &listener).await? {
            Some(((uvm, conn, containers, limit), report)) => {
                last_migration = Some(report);
                (uvm, conn, containers, Some(limit))
            }
            None => return Ok(()),
        },
        None => {
            let (uvm, conn) = start(&args, &paths).await?;
            (uvm, conn, BTreeMap::new(), None)
        }
        Some(path) => {
            let (uvm, conn, containers, limit) = restore::reattach(&args, &paths, path).await?;
            (uvm, conn, containers, Some(limit))
        }
    };
    let kind = match uvm {
        Backend::Local(_) => BackendKind::Local,
        Backend::Qemu(_) => BackendKind::Qemu,
    };
    let log_limit = args.log_limit.map(|mib| mib << 20);
    let log_limit = log_limit
        .or(saved_limit)
        .unwrap_or(output::DEFAULT_LOG_LIMIT);

    let shim = Arc::new(Shim {
        name: name.to_string(),
        root,
        paths,
        conn,
        uvm: tokio::sync::Mutex::new(uvm),
        kind,
        last_migration,
        outgoing: Mutex::new(None),
        containers: Mutex::new(containers),
        creating: Mutex::new(HashSet::new()),
        stopping: std::sync::atomic::AtomicBool::new(false),
        stop: watch::channel(false).0,
        persist_lock: tokio::sync::Mutex::new(()),
        log_limit,
    });
    // A fresh snapshot from the start: recoverable even before the first change.
    restore::persist(&shim).await;
    tracing::info!(uvm = name, control = %control.display(), "shim ready");
    report_ready("ok");

    let mut stop = shim.stop.subscribe();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("signal handler: {e}"))?;
    let guest_gone = shim.conn.clone();
    let mut handlers = tokio::task::JoinSet::new();
    // Whether requests in flight get their answers before the shim exits: when it stops the
    // UVM on its own, they fail with the reason, which their clients should see.
    let mut answer_in_flight = false;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    handlers.spawn(handle(shim.clone(), stream));
                }
                Err(e) => tracing::warn!(error = %e, "control accept failed"),
            },
            Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
            _ = stop.wait_for(|s| *s) => break,
            _ = term.recv() => {
                tracing::info!("SIGTERM: stopping the UVM");
                let _ = shim.uvm.lock().await.stop(std::time::Duration::from_secs(5)).await;
                answer_in_flight = true;
                break;
            }
            reason = guest_gone.closed() => {
                if shim.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                    // A Stop request is in progress; exit once it has been answered.
                    let _ = shim.stop.subscribe().wait_for(|s| *s).await;
                    break;
                }
                tracing::error!(%reason, "lost the guest connection; the UVM is unusable, stopping");
                let _ = shim.uvm.lock().await.stop(std::time::Duration::from_secs(5)).await;
                answer_in_flight = true;
                break;
            }
        }
    }
    if answer_in_flight {
        let answered = async { while handlers.join_next().await.is_some() {} };
        if tokio::time::timeout(std::time::Duration::from_secs(2), answered)
            .await
            .is_err()
        {
            tracing::warn!(left = handlers.len(), "requests still in flight at exit");
        }
    }
    tracing::info!(uvm = name, "shim exiting");
    Ok(())
}

async fn handle(shim: Arc<Shim>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let request: Request = match control::read_line(&mut r).await {
        Ok(req) => req,
        Err(e) => {
            let _ = control::write_line(&mut w, &Reply::error(format!("bad control request: {e}")))
                .await;
            return;
        }
    };
    tracing::debug!(?request, "control request");
    ops::dispatch(shim, request, r, w).await;
}
