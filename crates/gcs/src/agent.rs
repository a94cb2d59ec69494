//! The agent's state, which outlives any one bridge connection: containers, processes, exit
//! records, and the outbox of things still to tell the host.

use crate::container::{Container, ContainerState, ProcessPlan};
use crate::error::{GcsError, Result};
use crate::outbox::{Item, Outbox, Scope};
use crate::process::reaper::Reaper;
use crate::process::spawn::{Namespaces, Spawner};
use crate::process::{ProcessEntry, stdio};
use bridge::message::{
    ContainerConfig, ContainerNotification, ProcessDetails, ProcessParameters, RequestBase,
    Response, ResponseBase, StdioPorts, active_operation, notification_type,
};
use bridge::{Frame, Identifier, Rpc, UVM_CONTAINER_ID};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;
use transport::Transport;

/// How many delivered exit records are remembered, so that a repeated WaitForProcess (a host
/// re-probing after a reconnect) still gets the real code rather than "not found".
const DELIVERED_RECORDS: usize = 4096;

#[derive(Clone)]
pub struct Config {
    pub transport: Transport,
    pub state_dir: PathBuf,
    pub max_frame_size: u32,
    /// Pause between attempts to dial the bridge.
    pub reconnect_interval: Duration,
    /// Bound on each dial (bridge and stdio ports).
    pub dial_timeout: Duration,
    /// How long after a process exits its output may still be flowing before the exit is
    /// reported anyway (a background child can hold the pipe open forever).
    pub output_drain_grace: Duration,
    /// Per resumable output stream: bytes kept until the host acknowledges them. When full,
    /// the process's writes block (back-pressure) rather than anything being dropped.
    pub stdio_buffer: usize,
}

#[derive(Default)]
struct State {
    containers: HashMap<String, Container>,
    processes: HashMap<u32, ProcessEntry>,
    delivered: VecDeque<(u32, i32)>,
}

pub struct Agent {
    pub config: Config,
    pub outbox: Arc<Outbox>,
    pub reaper: Arc<Reaper>,
    spawner: Spawner,
    state: Mutex<State>,
    /// Turns true when the host asked the whole UVM to shut down.
    pub shutdown: watch::Sender<bool>,
    /// Bumped whenever a host has negotiated a new bridge connection: stdio streams waiting
    /// to re-dial try at once instead of at their next interval (a restored host listens on
    /// their ports before it accepts the bridge).
    pub host_back: watch::Sender<u64>,
}

/// The exit of a process, as a future.
pub enum WaitTarget {
    /// Already exited and delivered once before.
    Known(i32),
    Pending(watch::Receiver<Option<i32>>),
}

impl Agent {
    pub fn new(config: Config) -> std::io::Result<Arc<Agent>> {
        std::fs::create_dir_all(&config.state_dir)?;
        Ok(Arc::new(Agent {
            config,
            outbox: Arc::new(Outbox::default()),
            reaper: Arc::new(Reaper::default()),
            spawner: Spawner::start()?,
            state: Mutex::new(State::default()),
            shutdown: watch::channel(false).0,
            host_back: watch::channel(0).0,
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the whole agent down with a poisoned lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // -- sending ---------------------------------------------------------------------------

    /// Queues the answer to request `id`.
    pub fn respond(
        &self,
        scope: Scope,
        id: u64,
        rpc: Rpc,
        activity_id: &str,
        result: Result<Response>,
        on_delivered: Option<Box<dyn FnOnce() + Send>>,
    ) {
        let activity = (!activity_id.is_empty()).then(|| activity_id.to_string());
        let frame = match result {
            Ok(mut resp) => {
                resp.base_mut().activity_id = activity;
                resp.to_frame(id)
            }
            Err(e) => {
                // A timed-out wait is an answer, not a failure (a restored host probes every
                // process that way): keep it out of the info log.
                if matches!(e, crate::error::GcsError::Timeout(_)) {
                    tracing::debug!(rpc = rpc.name(), id, error = %e, "request timed out");
                } else {
                    tracing::info!(rpc = rpc.name(), id, error = %e, "request failed");
                }
                let mut base = ResponseBase::error(e.hresult(), e.to_string());
                base.activity_id = activity;
                Ok(Response::base_frame(rpc, id, &base))
            }
        };
        let bytes = match frame.and_then(|f| f.encode(self.config.max_frame_size)) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(rpc = rpc.name(), id, error = %e, "response cannot be sent; answering with an error");
                match Response::error_frame(rpc, id, bridge::hresult::E_FAIL, e.to_string())
                    .encode(self.config.max_frame_size)
                {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, "even the error response is too large; dropped");
                        return;
                    }
                }
            }
        };
        self.outbox.push(Item {
            bytes,
            what: format!("{} response to id {id}", rpc.name()),
            scope,
            on_delivered,
        });
    }

    /// Queues raw bytes (answers to frames that could not be decoded).
    pub fn send_raw(&self, generation: u64, bytes: Vec<u8>, what: String) {
        self.outbox.push(Item {
            bytes,
            what,
            scope: Scope::Connection(generation),
            on_delivered: None,
        });
    }

    fn notify_exit(&self, container_id: &str, kind: &'static str, code: i32) {
        let n = ContainerNotification {
            base: RequestBase::for_container(container_id),
            kind: kind.to_string(),
            operation: active_operation::NONE.to_string(),
            result: code,
            result_info: None,
        };
        match Frame::new(Identifier::CONTAINER_NOTIFICATION, 0, &n)
            .and_then(|f| f.encode(self.config.max_frame_size))
        {
            Ok(bytes) => self.outbox.push(Item {
                bytes,
                what: format!("{kind} notification for container {container_id:?}"),
                scope: Scope::Sticky,
                on_delivered: None,
            }),
            Err(e) => tracing::error!(error = %e, "cannot encode a container notification"),
        }
    }

    // -- containers ------------------------------------------------------------------------

    fn check_container(state: &State, id: &str) -> Result<()> {
        if id == UVM_CONTAINER_ID || state.containers.contains_key(id) {
            Ok(())
        } else {
            Err(GcsError::container_not_found(id))
        }
    }

    pub fn create_container(&self, id: &str, config: ContainerConfig) -> Result<()> {
        bridge::validate_container_id(id)?;
        if id == UVM_CONTAINER_ID {
            return Err(GcsError::AlreadyExists(
                "the utility VM itself cannot be created as a container".into(),
            ));
        }
        if self.state().containers.contains_key(id) {
            return Err(GcsError::AlreadyExists(format!(
                "container {id:?} already exists"
            )));
        }
        let container = Container::new(id, config)?;
        let dir = self.config.state_dir.join("containers").join(id);
        std::fs::create_dir_all(&dir).map_err(|e| {
            GcsError::Failed(format!("create state directory {}: {e}", dir.display()))
        })?;
        let mut state = self.state();
        if state.containers.contains_key(id) {
            return Err(GcsError::AlreadyExists(format!(
                "container {id:?} already exists"
            )));
        }
        tracing::info!(container = id, rootfs = %container.rootfs.display(), "container created");
        state.containers.insert(id.to_string(), container);
        Ok(())
    }

    pub fn start_container(&self, id: &str) -> Result<()> {
        validate(id)?;
        // Linux containers start with their first ExecuteProcess, as in hcsshim's GCS.
        Self::check_container(&self.state(), id)
    }

    pub fn delete_container_state(&self, id: &str) -> Result<()> {
        validate(id)?;
        if id == UVM_CONTAINER_ID {
            return Err(GcsError::InvalidArgument(
                "the utility VM has no container state to delete".into(),
            ));
        }
        let mut state = self.state();
        let c = state
            .containers
            .get(id)
            .ok_or_else(|| GcsError::container_not_found(id))?;
        if matches!(
            c.state,
            ContainerState::Running { .. } | ContainerState::Starting
        ) {
            return Err(GcsError::InvalidArgument(format!(
                "container {id:?} is still running; shut it down first"
            )));
        }
        state.containers.remove(id);
        for p in state.processes.values().filter(|p| p.container_id == id) {
            p.abandon.send_replace(true);
        }
        // Exit records of its processes go too: nobody can ask for them by container any more.
        state
            .processes
            .retain(|_, p| p.container_id != id || p.exit_code().is_none());
        drop(state);
        let dir = self.config.state_dir.join("containers").join(id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(container = id, error = %e, "cannot remove state directory");
        }
        tracing::info!(container = id, "container state deleted");
        Ok(())
    }

    /// Graceful (SIGTERM) or forced (SIGKILL) shutdown of a container; of the whole UVM for
    /// the UVM's id.
    pub fn shutdown_container(&self, id: &str, forced: bool) -> Result<()> {
        validate(id)?;
        let signal = if forced {
            nix::sys::signal::SIGKILL
        } else {
            nix::sys::signal::SIGTERM
        };
        if id == UVM_CONTAINER_ID {
            tracing::info!(forced, "utility VM shutdown requested");
            let state = self.state();
            for p in state.processes.values() {
                if p.exit_code().is_none() {
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), signal);
                }
                p.abandon.send_replace(true);
            }
            drop(state);
            self.shutdown.send_replace(true);
            return Ok(());
        }
        let mut state = self.state();
        let c = state
            .containers
            .get_mut(id)
            .ok_or_else(|| GcsError::container_not_found(id))?;
        match c.state {
            ContainerState::Running { init_pid } => {
                c.shutdown = Some(if forced {
                    notification_type::FORCED_EXIT
                } else {
                    notification_type::GRACEFUL_EXIT
                });
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(init_pid as i32), signal)
                    .map_err(|e| GcsError::Failed(format!("signal container {id:?}: {e}")))
            }
            // Nothing running: already shut down.
            _ => Ok(()),
        }
    }

    // -- processes -------------------------------------------------------------------------

    /// Starts a process as an ExecuteProcess request describes, and returns its pid.
    pub async fn execute_process(
        self: &Arc<Self>,
        container_id: &str,
        params: ProcessParameters,
        ports: StdioPorts,
    ) -> Result<u32> {
        validate(container_id)?;
        let in_uvm = container_id == UVM_CONTAINER_ID || params.create_in_utility_vm;
        // Decide what runs where, claiming the container's init slot under the lock so two
        // concurrent requests cannot both start it.
        let (plan, kind) = if in_uvm {
            Self::check_container(&self.state(), container_id)?;
            (ProcessPlan::from_params(&params), Kind::Uvm)
        } else {
            let mut state = self.state();
            let c = state
                .containers
                .get_mut(container_id)
                .ok_or_else(|| GcsError::container_not_found(container_id))?;
            match (c.state, &params.oci_process) {
                (ContainerState::Created, None) => {
                    let mut plan = ProcessPlan::from_oci(c.init_process()?);
                    plan.terminal |= params.emulate_console;
                    let ns = c.new_namespaces()?;
                    c.state = ContainerState::Starting;
                    (plan, Kind::Init(Box::new(ns)))
                }
                (ContainerState::Created | ContainerState::Starting, Some(_))
                | (ContainerState::Starting, None) => {
                    return Err(GcsError::InvalidArgument(format!(
                        "container {container_id:?} has not been started: its first ExecuteProcess must start the init process (no OciProcess)"
                    )));
                }
                (ContainerState::Running { init_pid }, oci) => {
                    let plan = match oci {
                        Some(p) => {
                            let mut plan = ProcessPlan::from_oci(p);
                            plan.terminal |= params.emulate_console;
                            plan
                        }
                        None => ProcessPlan::from_params(&params),
                    };
                    (plan, Kind::Exec(c.join_namespaces(init_pid)?))
                }
                (ContainerState::Exited { code, .. }, _) => {
                    return Err(GcsError::InvalidArgument(format!(
                        "container {container_id:?} has exited (code {code}); delete it and create it again"
                    )));
                }
            }
        };
        let is_init = matches!(kind, Kind::Init(_));
        let result = self
            .spawn_process(
                container_id,
                plan,
                kind,
                ports,
                params.console_size,
                params.ferry_resumable_stdio,
            )
            .await;
        if is_init {
            let mut state = self.state();
            if let Some(c) = state.containers.get_mut(container_id) {
                c.state = match result {
                    Ok(pid) => ContainerState::Running { init_pid: pid },
                    Err(_) => ContainerState::Created,
                };
            }
        }
        result
    }

    async fn spawn_process(
        self: &Arc<Self>,
        container_id: &str,
        plan: ProcessPlan,
        kind: Kind,
        ports: StdioPorts,
        console_size: Option<[u16; 2]>,
        resumable: bool,
    ) -> Result<u32> {
        let image_name = plan.args.first().cloned().unwrap_or_default();
        let (args, terminal) = (plan.args.clone(), plan.terminal);
        let (child_stdio, relays) = stdio::prepare(
            &self.config.transport,
            ports,
            plan.terminal,
            console_size,
            self.config.dial_timeout,
        )
        .await?;
        let is_init = matches!(kind, Kind::Init(_));
        let namespaces = match kind {
            Kind::Uvm => Namespaces::Agent,
            Kind::Init(ns) => Namespaces::New(ns),
            Kind::Exec(j) => Namespaces::Join(j),
        };
        let spec = plan.into_spawn(child_stdio, namespaces)?;
        let agent = self.clone();
        let where_ = container_id.to_string();
        let pid = tokio::task::spawn_blocking(move || agent.spawner.spawn(spec))
            .await
            .map_err(|e| GcsError::Failed(format!("spawn task: {e}")))?
            .map_err(|e| {
                if e.is_exec_failure() {
                    GcsError::InvalidArgument(format!(
                        "cannot run {image_name:?} in {}: {e}",
                        describe_where(&where_)
                    ))
                } else {
                    GcsError::Failed(format!(
                        "cannot start {image_name:?} in {}: {e}",
                        describe_where(&where_)
                    ))
                }
            })?;
        // Register for the exit before anything can miss it (the reaper keeps early exits).
        let exited = self.reaper.register(pid);
        let pty = relays.pty.clone();
        let (abandon, abandoned) = watch::channel(false);
        let redial = resumable.then(|| stdio::Redial {
            transport: self.config.transport.clone(),
            // Thousands of streams may be waiting: they retry less often than the bridge, and
            // at once when a host negotiates (`host_back`).
            interval: self.config.reconnect_interval * 4,
            timeout: self.config.dial_timeout,
            window: self.config.stdio_buffer,
            abandon: abandoned,
            host_back: self.host_back.subscribe(),
        });
        let pumps = relays.start(pid, redial)?;
        self.state().processes.insert(
            pid,
            ProcessEntry {
                pid,
                container_id: container_id.to_string(),
                image_name: image_name.clone(),
                args,
                terminal,
                resumable_ports: resumable.then_some(ports),
                is_init,
                exit: watch::channel(None).0,
                pty,
                abandon,
            },
        );
        tracing::info!(pid, container = container_id, command = %image_name, "process started");
        let agent = self.clone();
        tokio::spawn(async move {
            let code = exited.await.unwrap_or_else(|_| {
                tracing::error!(pid, "exit status lost (reaper gone)");
                -1
            });
            if let Some(stdin) = pumps.stdin {
                stdin.abort();
            }
            let drained = async {
                for h in pumps.outputs {
                    let _ = h.await;
                }
            };
            if tokio::time::timeout(agent.config.output_drain_grace, drained)
                .await
                .is_err()
            {
                tracing::warn!(
                    pid,
                    "output still open {:?} after the process exited (a child holds it?); reporting the exit now",
                    agent.config.output_drain_grace
                );
            }
            agent.process_exited(pid, code);
        });
        Ok(pid)
    }

    /// Publishes an exit: wakes waiters, and ends the container if it was its init.
    fn process_exited(&self, pid: u32, code: i32) {
        let mut state = self.state();
        let Some(p) = state.processes.get(&pid) else {
            return;
        };
        p.exit.send_replace(Some(code));
        let (is_init, container_id) = (p.is_init, p.container_id.clone());
        tracing::info!(pid, code, container = %container_id, "process exited");
        if !is_init {
            return;
        }
        let Some(c) = state.containers.get_mut(&container_id) else {
            return;
        };
        c.state = ContainerState::Exited {
            init_pid: pid,
            code,
        };
        let kind = c.shutdown.unwrap_or(notification_type::UNEXPECTED_EXIT);
        drop(state);
        self.notify_exit(&container_id, kind, code);
    }

    /// What a WaitForProcess for `pid` in `container_id` waits on.
    pub fn wait_target(&self, container_id: &str, pid: u32) -> Result<WaitTarget> {
        validate(container_id)?;
        let state = self.state();
        // As hcsshim's GCS: an unknown container is the error, whatever the pid.
        Self::check_container(&state, container_id)?;
        if let Some(p) = state.processes.get(&pid) {
            return Ok(WaitTarget::Pending(p.exit.subscribe()));
        }
        state
            .delivered
            .iter()
            .rev()
            .find(|(p, _)| *p == pid)
            .map(|&(_, code)| WaitTarget::Known(code))
            .ok_or_else(|| GcsError::process_not_found(pid))
    }

    /// Called once an exit code has reached a live host connection: the record may go.
    pub fn exit_delivered(&self, pid: u32) {
        let mut state = self.state();
        let Some(code) = state.processes.get(&pid).and_then(|p| p.exit_code()) else {
            return;
        };
        state.processes.remove(&pid);
        if state.delivered.len() >= DELIVERED_RECORDS {
            state.delivered.pop_front();
        }
        state.delivered.push_back((pid, code));
    }

    fn live_process<T>(
        &self,
        container_id: &str,
        pid: u32,
        f: impl FnOnce(&ProcessEntry) -> Result<T>,
    ) -> Result<T> {
        validate(container_id)?;
        let state = self.state();
        Self::check_container(&state, container_id)?;
        match state.processes.get(&pid) {
            Some(p) if p.exit_code().is_none() => f(p),
            Some(_) => Err(GcsError::NotFound(format!("process {pid} has exited"))),
            None => Err(GcsError::process_not_found(pid)),
        }
    }

    pub fn signal_process(&self, container_id: &str, pid: u32, signal: i32) -> Result<()> {
        let sig = if signal == 0 {
            nix::sys::signal::SIGKILL
        } else {
            nix::sys::signal::Signal::try_from(signal).map_err(|_| {
                GcsError::InvalidArgument(format!("{signal} is not a valid signal number"))
            })?
        };
        self.live_process(container_id, pid, |p| {
            tracing::info!(pid, signal = %sig, "signalling process");
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid as i32), sig)
                .map_err(|e| GcsError::Failed(format!("kill({pid}, {sig}): {e}")))
        })
    }

    pub fn resize_console(
        &self,
        container_id: &str,
        pid: u32,
        height: u16,
        width: u16,
    ) -> Result<()> {
        self.live_process(container_id, pid, |p| {
            let pty = p.pty.as_ref().ok_or_else(|| {
                GcsError::InvalidArgument(format!("process {pid} has no console to resize"))
            })?;
            let size = libc::winsize {
                ws_row: height,
                ws_col: width,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            use std::os::fd::AsRawFd;
            // SAFETY: TIOCSWINSZ reads a winsize from the pointer, which is valid.
            if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
                return Err(GcsError::Failed(format!(
                    "resize console of process {pid}: {}",
                    std::io::Error::last_os_error()
                )));
            }
            Ok(())
        })
    }

    /// Live processes of a container (or of the UVM itself).
    pub fn process_list(&self, container_id: &str) -> Result<Vec<ProcessDetails>> {
        validate(container_id)?;
        let state = self.state();
        Self::check_container(&state, container_id)?;
        let mut list: Vec<ProcessDetails> = state
            .processes
            .values()
            .filter(|p| p.container_id == container_id && p.exit_code().is_none())
            .map(|p| ProcessDetails {
                process_id: p.pid,
                image_name: p.image_name.clone(),
                ferry_stdio: p.resumable_ports,
                ferry_args: p.args.clone(),
                ferry_terminal: p.terminal,
            })
            .collect();
        list.sort_by_key(|p| p.process_id);
        Ok(list)
    }

    /// A human-readable dump of the agent's state (the answer to DumpStacks).
    pub fn dump(&self) -> String {
        let state = self.state();
        let mut out = String::new();
        use std::fmt::Write;
        let _ = writeln!(
            out,
            "ferry-gcs {} pid {}",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        );
        for (id, c) in &state.containers {
            let _ = writeln!(
                out,
                "container {id}: {:?} rootfs {}",
                c.state,
                c.rootfs.display()
            );
        }
        let mut procs: Vec<_> = state.processes.values().collect();
        procs.sort_by_key(|p| p.pid);
        for p in procs {
            let _ = writeln!(
                out,
                "process {} in {}: {} exit {:?}",
                p.pid,
                p.container_id,
                p.image_name,
                p.exit_code()
            );
        }
        let _ = writeln!(out, "sticky items queued: {}", self.outbox.pending_sticky());
        out
    }
}

enum Kind {
    Uvm,
    Init(Box<crate::process::spawn::NewContainer>),
    Exec(crate::process::spawn::JoinContainer),
}

fn validate(id: &str) -> Result<()> {
    if id == UVM_CONTAINER_ID {
        return Ok(());
    }
    bridge::validate_container_id(id).map_err(Into::into)
}

fn describe_where(container_id: &str) -> String {
    if container_id == UVM_CONTAINER_ID {
        "the utility VM".to_string()
    } else {
        format!("container {container_id:?}")
    }
}
