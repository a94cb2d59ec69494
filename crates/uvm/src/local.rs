//! The local backend, ferry's embedded default: no hypervisor. The guest agent runs on the
//! host as PID 1 of its own mount/pid/uts/ipc namespaces (`ferry-gcs --isolate`), in its own
//! cgroup when cgroup v2 is writable (which is what pause/resume freeze), and talks to the host
//! over hybrid vsock on Unix sockets in the UVM's state directory.
//!
//! The agent runs in its own session, so it outlives the host process that started it: a new
//! host process can take it over (save/restore).

use crate::{Result, UtilityVm, UvmError, UvmProperties};
use host::{ConnectionOptions, GuestConnection};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};
use tokio::process::Child;
use transport::{Listener, Side, Transport};

/// Longest Unix socket path (sun_path) minus room for the `_<port>` suffix.
const MAX_SOCKET_BASE: usize = 107 - 11;
/// Where cgroup v2 is mounted.
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

#[derive(Debug, Clone)]
pub struct LocalConfig {
    pub name: String,
    /// The UVM's own directory (sockets, logs, the agent's state).
    pub state_dir: PathBuf,
    /// The agent's program, and arguments that come before its own (e.g. `ferry gcs`).
    pub gcs_program: PathBuf,
    pub gcs_prefix_args: Vec<String>,
    /// New namespaces for the agent (needs root). Without, it runs in the host's namespaces.
    pub isolate: bool,
    /// How long the agent may take to dial the bridge after it starts.
    pub connect_timeout: Duration,
    pub gcs_log_level: String,
    pub connection: ConnectionOptions,
}

impl LocalConfig {
    /// The base path of the UVM's hybrid-vsock sockets.
    pub fn socket_base(&self) -> PathBuf {
        self.state_dir.join("vm.sock")
    }

    /// The host's end of the UVM's streams (usable before any connection exists: a restore
    /// listens on its processes' ports before the agent is back).
    pub fn host_transport(&self) -> Transport {
        Transport::hybrid_vsock(self.socket_base(), Side::Host)
    }

    pub fn new(
        name: &str,
        state_dir: PathBuf,
        gcs_program: PathBuf,
        gcs_prefix_args: Vec<String>,
    ) -> LocalConfig {
        LocalConfig {
            name: name.to_string(),
            state_dir,
            gcs_program,
            gcs_prefix_args,
            isolate: is_root(),
            connect_timeout: Duration::from_secs(10),
            gcs_log_level: "info".into(),
            connection: ConnectionOptions::default(),
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub struct LocalUvm {
    config: LocalConfig,
    child: Option<Child>,
    /// The agent, when this host process did not start it (a restored host).
    adopted: Option<u32>,
    pid: Option<u32>,
    bridge: Option<Listener>,
    conn: Option<GuestConnection>,
    cgroup: Option<PathBuf>,
    paused: bool,
    started_at: Option<SystemTime>,
}

impl LocalUvm {
    pub fn new(config: LocalConfig) -> LocalUvm {
        LocalUvm {
            config,
            child: None,
            adopted: None,
            pid: None,
            bridge: None,
            conn: None,
            cgroup: None,
            paused: false,
            started_at: None,
        }
    }

    pub fn socket_base(&self) -> PathBuf {
        self.config.socket_base()
    }

    pub fn log_path(&self) -> PathBuf {
        self.config.state_dir.join("gcs.log")
    }

    fn transport(&self) -> Transport {
        self.config.host_transport()
    }

    /// True while the agent process exists.
    pub fn is_running(&mut self) -> bool {
        match (&mut self.child, self.adopted) {
            (Some(c), _) => matches!(c.try_wait(), Ok(None)),
            (None, Some(pid)) => pid_alive(pid),
            _ => false,
        }
    }

    /// The agent's pid (what a restored host reattaches to).
    pub fn agent_pid(&self) -> Option<u32> {
        self.pid
    }

    /// Takes over a running agent another host process started: listens on the bridge socket
    /// again and accepts the agent's next dial (it re-dials every 100 ms once its old host is
    /// gone). `prepare` runs on the connection before negotiation (see
    /// [`GuestConnection::connect_prepared`]).
    pub async fn reattach(
        config: LocalConfig,
        agent_pid: u32,
        prepare: impl FnOnce(&GuestConnection),
    ) -> Result<(LocalUvm, GuestConnection)> {
        if !pid_alive(agent_pid) {
            return Err(UvmError::Start(format!(
                "the UVM's agent (pid {agent_pid}) is gone: the UVM no longer exists"
            )));
        }
        let cmdline = std::fs::read(format!("/proc/{agent_pid}/cmdline")).unwrap_or_default();
        let is_agent = cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == b"gcs" || arg.ends_with(b"ferry-gcs"));
        if !is_agent {
            return Err(UvmError::Start(format!(
                "pid {agent_pid} is not a ferry guest agent any more (the UVM is gone and its pid was reused)"
            )));
        }
        // The agent of *this* UVM: it was started on this UVM's sockets.
        let base = LocalUvm::new(config.clone()).socket_base();
        let ours = cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == base.as_os_str().as_encoded_bytes());
        if !ours {
            return Err(UvmError::Start(format!(
                "pid {agent_pid} is the agent of another UVM (it does not serve {}): wrong snapshot for this UVM",
                base.display()
            )));
        }
        let mut uvm = LocalUvm::new(config);
        let transport = uvm.transport();
        let mut bridge = transport
            .listen(bridge::BRIDGE_PORT)
            .await
            .map_err(|e| UvmError::Start(format!("listen on the bridge socket: {e}")))?;
        let timeout = uvm.config.connect_timeout;
        let stream = tokio::time::timeout(timeout, bridge.accept())
            .await
            .map_err(|_| {
                UvmError::Start(format!(
                    "the agent (pid {agent_pid}) did not reconnect within {timeout:?}; is another host process serving it?"
                ))
            })?
            .map_err(|e| UvmError::Start(format!("accept the agent's bridge connection: {e}")))?;
        let conn = GuestConnection::connect_prepared(
            transport,
            stream,
            uvm.config.connection.clone(),
            prepare,
        )
        .await?;
        let cg = uvm.cgroup_dir();
        uvm.cgroup = cg.exists().then_some(cg);
        uvm.adopted = Some(agent_pid);
        uvm.pid = Some(agent_pid);
        uvm.bridge = Some(bridge);
        uvm.conn = Some(conn.clone());
        uvm.started_at = Some(SystemTime::now());
        tracing::info!(name = %uvm.config.name, pid = agent_pid, "reattached to a running local UVM");
        Ok((uvm, conn))
    }

    /// Resolves when the agent process exits; returns its exit status text.
    pub async fn exited(&mut self) -> String {
        match &mut self.child {
            Some(c) => match c.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            },
            None => std::future::pending().await,
        }
    }

    /// The last lines of the agent's log, to explain a failed start.
    fn log_tail(&self) -> String {
        let mut out = String::new();
        for f in [self.config.state_dir.join("gcs.stderr"), self.log_path()] {
            if let Ok(text) = std::fs::read_to_string(&f) {
                let lines: Vec<&str> = text.lines().rev().take(5).collect();
                for l in lines.into_iter().rev() {
                    out.push_str("\n    ");
                    out.push_str(l);
                }
            }
        }
        out
    }

    /// This UVM's cgroup. Named after the UVM and its state directory: two state directories
    /// may both hold a UVM called "u", and pausing one must not freeze the other.
    fn cgroup_dir(&self) -> PathBuf {
        // FNV-1a: stable across builds, unlike std's hasher.
        let mut h: u32 = 0x811c_9dc5;
        for b in self.config.state_dir.as_os_str().as_encoded_bytes() {
            h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
        }
        Path::new(CGROUP_ROOT)
            .join("ferry")
            .join(format!("{}-{h:08x}", self.config.name))
    }

    fn make_cgroup(&self) -> Option<PathBuf> {
        if !self.config.isolate || !Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
            return None;
        }
        let dir = self.cgroup_dir();
        match std::fs::create_dir_all(&dir) {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "no cgroup for the UVM: pause/resume unavailable");
                None
            }
        }
    }

    fn freeze(&mut self, frozen: bool) -> Result<()> {
        let Some(cg) = &self.cgroup else {
            return Err(UvmError::NotSupported(
                "pause needs a writable cgroup v2 hierarchy (and root); this UVM has none".into(),
            ));
        };
        std::fs::write(cg.join("cgroup.freeze"), if frozen { "1" } else { "0" })
            .map_err(|e| UvmError::io(format!("write {}/cgroup.freeze", cg.display()), e))?;
        self.paused = frozen;
        Ok(())
    }

    async fn spawn_agent(&mut self) -> Result<Child> {
        let c = &self.config;
        let mut cmd = tokio::process::Command::new(&c.gcs_program);
        cmd.args(&c.gcs_prefix_args)
            .arg("--transport=hybrid-vsock")
            .arg("--base")
            .arg(self.socket_base())
            .arg("--state-dir")
            .arg(c.state_dir.join("guest"))
            .arg("--log-file")
            .arg(self.log_path())
            .arg(format!("--log-level={}", c.gcs_log_level));
        if c.isolate {
            cmd.arg("--isolate").arg(format!("--hostname={}", c.name));
        }
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(c.state_dir.join("gcs.stderr"))
            .map_err(|e| UvmError::io("open gcs.stderr", e))?;
        // Its own process group: signals aimed at the host process's terminal do not reach
        // the UVM, and it survives the host process.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .process_group(0)
            .kill_on_drop(false);
        cmd.spawn().map_err(|e| {
            UvmError::Start(format!(
                "cannot run the guest agent {}: {e}",
                c.gcs_program.display()
            ))
        })
    }
}

impl UtilityVm for LocalUvm {
    fn backend_name(&self) -> &'static str {
        "local"
    }

    async fn start(&mut self) -> Result<GuestConnection> {
        if self.is_running() {
            return Err(UvmError::AlreadyRunning);
        }
        std::fs::create_dir_all(&self.config.state_dir)
            .map_err(|e| UvmError::io(format!("create {}", self.config.state_dir.display()), e))?;
        let base = self.socket_base();
        if base.as_os_str().len() > MAX_SOCKET_BASE {
            return Err(UvmError::Start(format!(
                "state directory path too long for Unix sockets: {} (use a shorter FERRY_STATE_DIR)",
                base.display()
            )));
        }
        let transport = self.transport();
        let mut bridge = transport
            .listen(bridge::BRIDGE_PORT)
            .await
            .map_err(|e| UvmError::Start(format!("listen on the bridge socket: {e}")))?;
        self.cgroup = self.make_cgroup();
        let mut child = self.spawn_agent().await?;
        let pid = child.id();
        if let (Some(cg), Some(pid)) = (&self.cgroup, pid)
            && let Err(e) = std::fs::write(cg.join("cgroup.procs"), pid.to_string())
        {
            tracing::warn!(error = %e, "cannot move the agent into its cgroup: pause/resume unavailable");
            self.cgroup = None;
        }
        let timeout = self.config.connect_timeout;
        let stream = tokio::select! {
            s = tokio::time::timeout(timeout, bridge.accept()) => match s {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(UvmError::Start(format!("accept the agent's bridge connection: {e}"))),
                Err(_) => {
                    let _ = child.start_kill();
                    return Err(UvmError::Start(format!(
                        "the guest agent did not connect within {timeout:?}; its log:{}",
                        self.log_tail()
                    )));
                }
            },
            status = child.wait() => {
                return Err(UvmError::Start(format!(
                    "the guest agent exited at once ({}); its log:{}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    self.log_tail()
                )));
            }
        };
        let conn = match GuestConnection::connect(transport, stream, self.config.connection.clone())
            .await
        {
            Ok(conn) => conn,
            Err(e) => {
                // An agent that cannot be talked to (it lied in the negotiation, or never
                // answered it) must not outlive the failed start: it would re-dial forever.
                let _ = child.kill().await;
                if let Some(cg) = self.cgroup.take() {
                    let _ = std::fs::remove_dir(&cg);
                }
                return Err(e.into());
            }
        };
        tracing::info!(name = %self.config.name, pid, isolate = self.config.isolate, "local UVM started");
        self.child = Some(child);
        self.pid = pid;
        self.bridge = Some(bridge);
        self.conn = Some(conn.clone());
        self.started_at = Some(SystemTime::now());
        Ok(conn)
    }

    async fn stop(&mut self, grace: Duration) -> Result<()> {
        let child = self.child.take();
        let adopted = self.adopted.take();
        if child.is_none() && adopted.is_none() {
            return Err(UvmError::NotRunning);
        }
        if self.paused {
            let _ = self.freeze(false);
        }
        // One grace period for the whole stop: an agent that does not answer the shutdown
        // request (or stopped reading) is killed when it ends, as one that does not exit is.
        let deadline = tokio::time::Instant::now() + grace;
        if let Some(conn) = self.conn.take() {
            let uvm = host::Container::uvm(&conn);
            match tokio::time::timeout_at(deadline, uvm.shutdown(true)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "shutdown request failed"),
                Err(_) => {
                    tracing::warn!(name = %self.config.name, "the agent did not answer the shutdown request within {grace:?}")
                }
            }
        }
        match (child, adopted) {
            (Some(mut child), _) => {
                if tokio::time::timeout_at(deadline, child.wait())
                    .await
                    .is_err()
                {
                    tracing::warn!(name = %self.config.name, "the agent did not stop within {grace:?}; killing it");
                    let _ = child.kill().await;
                }
            }
            (None, Some(pid)) => {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if !wait_pid_exit(pid, left).await {
                    tracing::warn!(name = %self.config.name, "the agent did not stop within {grace:?}; killing it");
                    // SAFETY: kill with a pid and a signal number.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    wait_pid_exit(pid, grace).await;
                }
            }
            (None, None) => unreachable!("checked above"),
        }
        // The agent was PID 1 of its namespace: everything in it is gone too.
        self.bridge = None;
        if let Some(cg) = self.cgroup.take() {
            let _ = std::fs::remove_dir(&cg);
        }
        self.pid = None;
        tracing::info!(name = %self.config.name, "local UVM stopped");
        Ok(())
    }

    async fn pause(&mut self) -> Result<()> {
        if self.child.is_none() && self.adopted.is_none() {
            return Err(UvmError::NotRunning);
        }
        self.freeze(true)
    }

    async fn resume(&mut self) -> Result<()> {
        if self.child.is_none() && self.adopted.is_none() {
            return Err(UvmError::NotRunning);
        }
        self.freeze(false)
    }

    fn properties(&self) -> UvmProperties {
        UvmProperties {
            name: self.config.name.clone(),
            backend: "local",
            running: self.child.is_some() || self.adopted.is_some(),
            paused: self.paused,
            pid: self.pid,
            state_dir: self.config.state_dir.clone(),
            transport: self.transport().describe(),
            started_at: self
                .started_at
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        }
    }
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Waits for a process that is not our child to exit, via a pidfd (no polling).
pub async fn wait_pid_exit(pid: u32, timeout: Duration) -> bool {
    // SAFETY: pidfd_open takes a pid and flags, returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return !pid_alive(pid);
    }
    // SAFETY: a fresh descriptor we own.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // SAFETY: the AsyncFd owns the descriptor for its whole life.
    let Ok(afd) = (unsafe { tokio::io::unix::AsyncFd::register(owned) }) else {
        return false;
    };
    tokio::time::timeout(timeout, afd.readable()).await.is_ok()
}
