//! Save and restore: the shim's state written to a snapshot, and a new shim taking over the
//! running UVM from one, in the order the design requires: register every container and adopt
//! every outstanding wait before negotiating; raise the id and port floors; listen again on
//! every saved stdio port (the agent re-dials and each stream resumes at the byte the logs
//! hold); probe each process once in case it exited while nobody was connected.

use super::Shim;
use super::backend::{self, Backend};
use super::output::{self, OutputLog};
use super::state::{ContainerRec, Logs, ProcRec};
use crate::cli::ShimArgs;
use crate::paths::UvmPaths;
use crate::snapshot::{self, ContainerState, ProcessState, Snapshot, UvmState};
use bridge::Rpc;
use bridge::message::Response;
use host::{Container, GuestConnection, HostError, Process};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::oneshot;
use transport::Transport;
use uvm::{LocalConfig, LocalUvm, QemuUvm};

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a snapshot records of the UVM itself.
pub struct UvmFacts {
    pid: u32,
    backend: &'static str,
    qemu: Option<snapshot::QemuState>,
}

impl UvmFacts {
    pub fn of(uvm: &Backend) -> Result<UvmFacts, String> {
        Ok(UvmFacts {
            pid: uvm.pid().ok_or("the UVM is not running; nothing to save")?,
            backend: uvm.name(),
            qemu: uvm.qemu_state(),
        })
    }
}

/// The shim's state as a snapshot.
pub async fn snapshot(shim: &Shim) -> Result<Snapshot, String> {
    let facts = UvmFacts::of(&*shim.uvm.lock().await)?;
    Ok(snapshot_with(shim, facts))
}

/// The shim's state as a snapshot, for a caller that holds the UVM's lock.
pub fn snapshot_with(shim: &Shim, facts: UvmFacts) -> Snapshot {
    let UvmFacts {
        pid: agent_pid,
        backend,
        qemu,
    } = facts;
    let containers = shim.containers.lock().unwrap_or_else(|p| p.into_inner());
    let containers = containers
        .values()
        .map(|c| ContainerState {
            id: c.id.clone(),
            rootfs: c.rootfs.clone(),
            created: secs(c.created),
            processes: c
                .procs
                .values()
                .map(|p| ProcessState {
                    pid: p.pid,
                    args: p.args.clone(),
                    tty: p.tty,
                    init: p.is_init,
                    migration: p.process.migration_state(),
                    stdout_offset: p.stdout.as_ref().map(|l| l.progress().written),
                    stderr_offset: p.stderr.as_ref().map(|l| l.progress().written),
                    stdin: p.stdin_state.as_ref().map(|s| s.state()),
                    exit_code: p.exit_state().and_then(|e| e.ok()),
                })
                .collect(),
        })
        .collect();
    Snapshot {
        uvm: UvmState {
            name: shim.name.clone(),
            backend: backend.into(),
            state_dir: shim.paths.dir.clone(),
            agent_pid,
            qemu,
            log_limit: shim.log_limit,
        },
        connection: shim.conn.state(),
        containers,
        saved_at: secs(SystemTime::now()),
        saved_by_pid: std::process::id(),
    }
}

/// Refreshes `<uvm dir>/snapshot`, so that a shim killed at any moment can be replaced from
/// it. Called whenever the set of processes changes, before the change is acknowledged.
pub async fn persist(shim: &Shim) {
    let _one_writer = shim.persist_lock.lock().await;
    let result = async {
        let snap = snapshot(shim).await?;
        crate::snapshot::write(&shim.paths.dir.join("snapshot"), &snap).map_err(|e| e.to_string())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot refresh the snapshot; a crash now would lose track of recent changes");
    }
}

/// A container's restored processes by pid.
type Procs = BTreeMap<u32, Arc<ProcRec>>;

/// A live process's reopened pipes: stdin still to adopt, and the logs already capturing its
/// stdout and stderr.
type Reopened = (
    host::process::ProcessIo,
    Option<Arc<OutputLog>>,
    Option<Arc<OutputLog>>,
);

type Adopted = HashMap<(String, u32), oneshot::Receiver<host::Result<Response>>>;

/// Takes over the UVM a snapshot describes.
/// Stdio ports and request ids the previous host may have used after its last snapshot (a
/// `run` in flight when it was killed, a few ports each): skipped, so that nothing new
/// collides with them. The port space (0x40000001 up) allows some 780 000 restores.
const PORT_GAP: u32 = 4096;
const ID_GAP: u64 = 1 << 16;

fn floors_after(saved: host::ConnectionState) -> host::ConnectionState {
    host::ConnectionState {
        next_id: saved.next_id.saturating_add(ID_GAP),
        next_port: saved.next_port.saturating_add(PORT_GAP),
    }
}

/// The UVM a snapshot describes, found again but not yet connected: the local backend's
/// transport needs no connection; a QEMU UVM's is a new multiplexer session on its channel.
pub enum Found {
    Local(LocalConfig, Transport),
    Qemu(Box<QemuUvm>, Transport),
}

/// A UVM taken over: its backend, the guest connection, the restored containers and the
/// per-stream log limit.
pub type Reattached = (
    Backend,
    GuestConnection,
    BTreeMap<String, ContainerRec>,
    u64,
);

pub async fn reattach(
    args: &ShimArgs,
    paths: &UvmPaths,
    path: &Path,
) -> Result<Reattached, String> {
    let snap = snapshot::read(path).map_err(|e| e.to_string())?;
    if snap.uvm.name != args.name {
        return Err(format!(
            "{} describes UVM {:?}, not {:?}",
            path.display(),
            snap.uvm.name,
            args.name
        ));
    }
    tracing::info!(from = %path.display(), containers = snap.containers.len(), "restoring");
    let found = match (snap.uvm.backend.as_str(), &snap.uvm.qemu) {
        ("local", _) => {
            let mut config = super::local_config(args, paths)?;
            config.state_dir = snap.uvm.state_dir.clone();
            config.connect_timeout = Duration::from_secs(15);
            let transport = config.host_transport();
            Found::Local(config, transport)
        }
        ("qemu", Some(q)) => {
            let mut config = backend::qemu_config(&snap.uvm.name, snap.uvm.state_dir.clone(), q);
            config.connect_timeout = Duration::from_secs(15);
            let mut uvm = QemuUvm::adopt(config, snap.uvm.agent_pid)
                .await
                .map_err(|e| e.to_string())?;
            uvm.set_session_hello(q.session_hello);
            let transport = uvm.reopen_channel().await.map_err(|e| e.to_string())?;
            Found::Qemu(Box::new(uvm), transport)
        }
        (other, _) => {
            return Err(format!(
                "{}: backend {other:?} cannot be restored here",
                path.display()
            ));
        }
    };
    reattach_snapshot(snap, found).await
}

/// Takes over the UVM `snap` describes, found again (a restore, or a migration's destination).
pub async fn reattach_snapshot(snap: Snapshot, found: Found) -> Result<Reattached, String> {
    let path = snap.uvm.state_dir.join("snapshot");
    let path = path.as_path();
    let transport = match &found {
        Found::Local(_, t) | Found::Qemu(_, t) => t.clone(),
    };
    // Before the agent is back: listen on every live process's stdio ports, so that its
    // streams resume the moment it re-dials them (it does so as soon as its new session
    // starts, before the bridge negotiates), and capture their output at once: after a
    // migration, output flows again while the bridge is still being negotiated.
    let logs = snap.uvm.state_dir.join("logs");
    let log_limit = snap.uvm.log_limit;
    let mut listening = tokio::task::JoinSet::new();
    for c in &snap.containers {
        // One task per container: the binds and log-header reads of thousands of streams
        // spread over the runtime's workers.
        let live: Vec<ProcessState> = c
            .processes
            .iter()
            .filter(|p| p.exit_code.is_none())
            .cloned()
            .collect();
        let (transport, dir, id) = (transport.clone(), logs.join(&c.id), c.id.clone());
        listening.spawn(async move {
            if !live.is_empty() {
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("create {}: {e}", dir.display()))?;
            }
            let mut ios = Vec::with_capacity(live.len());
            for p in live {
                let path = |name: &str| output::log_path(&dir, p.pid, name);
                let mut io = host::stdio::reopen(
                    &transport,
                    &p.migration,
                    output::recorded(&path("stdout")),
                    output::recorded(&path("stderr")),
                    p.stdin.clone(),
                )
                .await
                .map_err(|e| format!("listening again for process {} of {id}: {e}", p.pid))?;
                let logs = Logs::existing(&dir, log_limit);
                let capture = |name: &str, pipe| {
                    logs.open(p.pid, name, pipe)
                        .map_err(|e| format!("capturing {name} of process {} of {id}: {e}", p.pid))
                };
                let stdout = capture("stdout", io.stdout.take())?;
                let stderr = capture("stderr", io.stderr.take())?;
                ios.push(((id.clone(), p.pid), (io, stdout, stderr)));
            }
            Ok::<_, String>(ios)
        });
    }
    let mut reopened: HashMap<(String, u32), Reopened> = HashMap::new();
    while let Some(done) = listening.join_next().await {
        reopened.extend(done.map_err(|e| format!("listen task: {e}"))??);
    }
    tracing::info!(
        streams = reopened.len(),
        "listening again on the stdio ports of the live processes"
    );
    // Step 1, before the guest can say anything: containers registered, waits adopted.
    let mut opened: Vec<Container> = Vec::new();
    let mut adopted: Adopted = HashMap::new();
    let mut problems: Vec<String> = Vec::new();
    let prepare = |conn: &GuestConnection| {
        for c in &snap.containers {
            opened.push(Container::open(conn, &c.id));
            for p in c.processes.iter().filter(|p| p.exit_code.is_none()) {
                match conn.register_pending(p.migration.wait_call_id, Rpc::WaitForProcess) {
                    Ok(rx) => {
                        adopted.insert((c.id.clone(), p.pid), rx);
                    }
                    Err(e) => problems.push(format!("process {} in {}: {e}", p.pid, c.id)),
                }
            }
        }
    };
    let (uvm, conn) = match found {
        Found::Local(config, _) => {
            let (uvm, conn) = LocalUvm::reattach(config, snap.uvm.agent_pid, prepare)
                .await
                .map_err(|e| e.to_string())?;
            (Backend::Local(Box::new(uvm)), conn)
        }
        Found::Qemu(mut uvm, transport) => {
            let conn = uvm
                .accept_guest(transport, Duration::from_secs(15), prepare)
                .await
                .map_err(|e| e.to_string())?;
            (Backend::Qemu(uvm), conn)
        }
    };
    for p in problems {
        tracing::warn!("adopting a wait failed: {p}");
    }
    // Step 2 happened inside reattach (negotiation); step 3: floors.
    conn.restore_floors(&floors_after(snap.connection));
    // Steps 4 and 5: per process, pipes and exits — all processes at once, so that a UVM with
    // thousands of them is back as fast as one with a few.
    // Which processes still run, one request per container: only the others need a probe for
    // an exit whose answer may have been lost (a list that fails means probing them all).
    let mut running: HashMap<String, std::collections::HashSet<u32>> = HashMap::new();
    for container in &opened {
        if let Ok(list) = container.processes().await {
            running.insert(
                container.id().to_string(),
                list.iter().map(|d| d.process_id).collect(),
            );
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (ci, c) in snap.containers.iter().enumerate() {
        for p in &c.processes {
            let rx = adopted.remove(&(c.id.clone(), p.pid));
            let (io, stdout, stderr) = match reopened.remove(&(c.id.clone(), p.pid)) {
                Some((io, stdout, stderr)) => (Some(io), stdout, stderr),
                None => (None, None, None),
            };
            let probe = !running.get(&c.id).is_some_and(|r| r.contains(&p.pid));
            let (conn, id, p, log_dir) = (conn.clone(), c.id.clone(), p.clone(), logs.join(&c.id));
            tasks.spawn(async move {
                let logs = Logs::existing(&log_dir, log_limit).captured(stdout, stderr);
                let rec = restore_process(&conn, &id, &p, rx, io, probe, logs)
                    .await
                    .map_err(|e| format!("restoring process {} of container {id}: {e}", p.pid));
                (ci, p.pid, p.init, rec)
            });
        }
    }
    let mut restored: Vec<(Procs, Option<Arc<ProcRec>>)> = snap
        .containers
        .iter()
        .map(|_| (BTreeMap::new(), None))
        .collect();
    while let Some(done) = tasks.join_next().await {
        let (ci, pid, init, rec) = done.map_err(|e| format!("restore task: {e}"))?;
        let rec = rec?;
        if init {
            restored[ci].1 = Some(rec.clone());
        }
        restored[ci].0.insert(pid, rec);
    }
    let mut containers = BTreeMap::new();
    for ((c, container), (procs, init)) in snap.containers.iter().zip(opened).zip(restored) {
        let Some(init) = init else {
            tracing::warn!(container = %c.id, "snapshot has no init process for this container; skipped");
            continue;
        };
        containers.insert(
            c.id.clone(),
            ContainerRec {
                id: c.id.clone(),
                container: Arc::new(container),
                init,
                procs,
                rootfs: c.rootfs.clone(),
                created: UNIX_EPOCH + Duration::from_secs(c.created),
            },
        );
    }
    // Processes the guest runs that the snapshot does not know: the previous host was killed
    // after starting them and before recording them. Take them over rather than leave them
    // running unseen.
    for (id, rec) in containers.iter_mut() {
        let listed = match rec.container.processes().await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(container = %id, error = %e, "cannot list the guest's processes; unrecorded ones stay unknown");
                continue;
            }
        };
        let unrecorded: Vec<_> = listed
            .into_iter()
            .filter(|d| !rec.procs.contains_key(&d.process_id))
            .collect();
        for d in &unrecorded {
            match claim_unrecorded(&conn, id, d, &logs.join(id), log_limit).await {
                Ok(p) => {
                    tracing::warn!(container = %id, pid = d.process_id, command = ?d.ferry_args,
                        "took over a process the last snapshot did not record (its host stopped while starting it)");
                    rec.procs.insert(d.process_id, p);
                }
                Err(e) => {
                    tracing::error!(container = %id, pid = d.process_id, error = %e, "cannot take over an unrecorded process")
                }
            }
        }
    }
    tracing::info!(
        uvm = %snap.uvm.name,
        containers = containers.len(),
        from = %path.display(),
        "restored"
    );
    Ok((uvm, conn, containers, snap.uvm.log_limit))
}

/// Takes over a process the guest runs and no snapshot recorded: its stdio ports (which the
/// guest reports) are listened on from their first byte — the guest still holds everything
/// no host acknowledged — and it is waited for like a new process.
async fn claim_unrecorded(
    conn: &GuestConnection,
    container: &str,
    d: &bridge::message::ProcessDetails,
    log_dir: &Path,
    log_limit: u64,
) -> Result<Arc<ProcRec>, String> {
    let ports = d.ferry_stdio.unwrap_or_default();
    let state = host::MigrationState {
        stdin_port: ports.std_in,
        stdout_port: ports.std_out,
        stderr_port: ports.std_err,
        wait_call_id: 0,
    };
    let io = host::stdio::reopen(conn.transport(), &state, 0, 0, None)
        .await
        .map_err(|e| e.to_string())?;
    let process = Process::started(
        conn.clone(),
        container,
        d.process_id,
        (ports.std_in, ports.std_out, ports.std_err),
        io,
    )
    .await
    .map_err(|e| e.to_string())?;
    let args = if d.ferry_args.is_empty() {
        vec![d.image_name.clone()]
    } else {
        d.ferry_args.clone()
    };
    ProcRec::start(
        process,
        container,
        args,
        d.ferry_terminal,
        false,
        Logs::new(log_dir, log_limit, false),
    )
    .map_err(|e| format!("cannot capture its output: {e}"))
}

async fn restore_process(
    conn: &GuestConnection,
    container: &str,
    p: &ProcessState,
    adopted: Option<oneshot::Receiver<host::Result<Response>>>,
    io: Option<host::process::ProcessIo>,
    probe: bool,
    logs: Logs<'_>,
) -> Result<Arc<ProcRec>, HostError> {
    let (adopted, io) = match (p.exit_code, adopted) {
        // Its pipes were listened on again before the agent came back.
        (None, Some(rx)) => (rx, io.unwrap_or_default()),
        // Exited before the save: nothing to adopt, only its logs and code remain.
        _ => (oneshot::channel().1, host::process::ProcessIo::default()),
    };
    let process = Process::adopt(
        conn.clone(),
        container,
        p.pid,
        p.migration,
        adopted,
        io,
        probe,
    );
    ProcRec::restore(
        process,
        container,
        p.args.clone(),
        p.tty,
        p.init,
        logs,
        p.exit_code,
    )
    .map_err(|e| HostError::Io(e.to_string()))
}
