//! The QEMU backend: a real VM booting a ferry image (an uncompressed kernel and an initramfs
//! whose /init is ferry-gcs; see the `image` crate), controlled over QMP.
//!
//! The host↔guest channel is one virtio-serial port (`ferry.0`) whose host end is a Unix
//! socket QEMU serves; both sides run a yamux multiplexer over it (host: client role) and
//! the bridge and stdio streams are ports on that multiplexer, exactly as over hybrid vsock.
//! AF_VSOCK is not used: it needs vhost-vsock, which many hosts (these among them) lack, and
//! the vhost-user alternative cannot migrate (notes/qemu-lab.md).
//!
//! ```text
//! <state>/agent.sock    the virtio-serial port's host end
//!         qmp.sock      QMP
//!         console.log   the guest's serial console (kernel messages, the agent's log)
//!         qemu.log      QEMU's own stdout/stderr
//! ```
//!
//! QEMU runs in its own process group and is not killed when the host process exits: like
//! the local backend's agent, the VM outlives the host process that started it.

use crate::qmp::Qmp;
use crate::{Result, UtilityVm, UvmError, UvmProperties};
use host::{ConnectionOptions, GuestConnection};
use std::ffi::OsString;
use std::os::fd::{AsFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::Interest;
use tokio::net::UnixStream;
use tokio::sync::watch;
use transport::session_hello::{self, Hello};
use transport::{Listener, MuxRole, MuxSession, Transport};

/// The live-migration lifecycle (a child module: it uses this type's private state).
mod migration;

/// Longest Unix socket path (sun_path holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// How long QEMU may take to create its sockets after it starts.
const SOCKETS_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts to connect to a socket QEMU has not created yet.
const SOCKET_RETRY: Duration = Duration::from_millis(20);
/// Pause between cutting a connection that brought no session hello and connecting again.
const CUT_PAUSE: Duration = Duration::from_millis(5);
/// The longest pause after a cut the guest missed (the pause doubles after each).
const MAX_CUT_PAUSE: Duration = Duration::from_millis(80);
/// The virtio-serial port's device id (QEMU reports the guest opening and closing it).
const PORT_DEVICE_ID: &str = "agentport";
/// How long a host reconnecting to a running guest waits for the guest's session hello
/// before it cuts the connection again, so that a guest still running the session of the
/// previous host (it learns of its host leaving only from the port's end-of-file) sees it end.
pub const RECONNECT_PATIENCE: Duration = Duration::from_millis(250);

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
    /// KVM when it can boot a stock kernel (see [`kvm_unusable_reason`]), else TCG.
    Auto,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Accel, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            "auto" => Ok(Accel::Auto),
            _ => Err(format!("unknown accelerator {s:?} (kvm, tcg or auto)")),
        }
    }
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto => "auto",
        }
    }

    /// `Auto` made concrete.
    pub fn resolve(self) -> Accel {
        match self {
            Accel::Auto => match kvm_unusable_reason() {
                None => Accel::Kvm,
                Some(why) => {
                    tracing::info!(reason = %why, "using TCG (software emulation)");
                    Accel::Tcg
                }
            },
            a => a,
        }
    }
}

/// Why KVM cannot be used here, or `None` when it can. The rule: `/dev/kvm` must open
/// read-write, and the host must not be a PVM guest (`/sys/module/kvm_pvm` present): PVM's
/// KVM creates VMs but runs only kernels built for PVM, so a stock Debian kernel hangs in its
/// decompressor (notes/qemu-lab.md).
pub fn kvm_unusable_reason() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Some(format!("/dev/kvm: {e}"));
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "KVM here is PVM (kvm_pvm), which cannot boot a stock guest kernel".to_owned(),
        );
    }
    None
}

#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub name: String,
    /// The VM's own directory (sockets, logs).
    pub state_dir: PathBuf,
    /// The image: an uncompressed ELF kernel with a PVH note, and its initramfs.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub qemu: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The virtio-serial port's name (the agent looks for it).
    pub port_name: String,
    /// The kernel's own parameters; the agent's arguments are appended after `--`.
    pub kernel_cmdline: String,
    pub gcs_log_level: String,
    /// How long the guest may take from QEMU's start to dialing the bridge (TCG boots in
    /// ~5-10 s).
    pub connect_timeout: Duration,
    pub connection: ConnectionOptions,
}

impl QemuConfig {
    pub fn new(name: &str, state_dir: PathBuf, kernel: PathBuf, initrd: PathBuf) -> QemuConfig {
        QemuConfig {
            name: name.to_owned(),
            state_dir,
            kernel,
            initrd,
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            memory_mib: 256,
            cpus: 1,
            port_name: "ferry.0".into(),
            kernel_cmdline: "console=ttyS0 quiet panic=-1".into(),
            gcs_log_level: "info".into(),
            connect_timeout: Duration::from_secs(60),
            connection: ConnectionOptions::default(),
        }
    }
}

pub struct QemuUvm {
    config: QemuConfig,
    accel: Option<Accel>,
    pid: Option<u32>,
    /// The exit status text once QEMU has exited (set by the task that waits for it).
    exit: Option<watch::Receiver<Option<String>>>,
    qmp: Option<Qmp>,
    /// A duplicate of the host's end of the agent socket, to cut the channel even while
    /// callers still hold streams on it (a reconnect must free QEMU's single client slot).
    channel: Option<std::os::unix::net::UnixStream>,
    bridge: Option<Listener>,
    conn: Option<GuestConnection>,
    /// The version of the guest's last session hello (0: none seen yet); from
    /// [`session_hello::RESET_VERSION`] on, a host can end the guest's old session with a reset.
    session_hello: u8,
    paused: bool,
    started_at: Option<SystemTime>,
    /// Live-migration state (incoming mode, a completed transfer).
    migration: migration::MigrationState,
}

/// QEMU's option syntax splits on commas; paths with one are refused rather than escaped
/// (not every option unescapes them).
fn plain(p: &Path) -> Result<String> {
    let s = p
        .to_str()
        .ok_or_else(|| UvmError::Start(format!("path {} is not valid UTF-8", p.display())))?;
    if s.contains(',') {
        return Err(UvmError::Start(format!(
            "QEMU cannot take a path with a comma: {s}"
        )));
    }
    Ok(s.to_owned())
}

/// The last `n` lines of a log file, indented, for error messages.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    // Only the end matters; a long boot log must not become a huge error.
    let start = text.len().saturating_sub(16 * 1024);
    let text = String::from_utf8_lossy(&text[start..]);
    let lines: Vec<&str> = text.lines().rev().take(n).collect();
    lines
        .into_iter()
        .rev()
        .map(|l| format!("\n    {l}"))
        .collect()
}

impl QemuUvm {
    pub fn new(config: QemuConfig) -> QemuUvm {
        QemuUvm {
            config,
            accel: None,
            pid: None,
            exit: None,
            qmp: None,
            channel: None,
            session_hello: 0,
            bridge: None,
            conn: None,
            paused: false,
            started_at: None,
            migration: Default::default(),
        }
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.config.state_dir.join("agent.sock")
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.config.state_dir.join("qmp.sock")
    }

    pub fn console_log(&self) -> PathBuf {
        self.config.state_dir.join("console.log")
    }

    pub fn qemu_log(&self) -> PathBuf {
        self.config.state_dir.join("qemu.log")
    }

    pub fn config(&self) -> &QemuConfig {
        &self.config
    }

    /// The version of the guest's last session hello (0: none seen): a snapshot records it,
    /// so that the next host knows whether it may reset the guest's session
    /// ([`reopen_channel`](Self::reopen_channel)).
    pub fn session_hello(&self) -> u8 {
        self.session_hello
    }

    /// Tells a host that takes over a running guest (a restore, a migration's destination)
    /// the version of the guest's session hello as the previous host saw it.
    pub fn set_session_hello(&mut self, version: u8) {
        self.session_hello = version;
    }

    /// The accelerator in use (the configured one until QEMU has started).
    pub fn accel(&self) -> Accel {
        self.accel.unwrap_or(self.config.accel)
    }

    /// The QMP connection (for callers that need commands this type does not wrap).
    pub fn qmp(&mut self) -> Option<&mut Qmp> {
        self.qmp.as_mut()
    }

    /// True while the QEMU process exists.
    pub fn is_running(&self) -> bool {
        self.exit.as_ref().is_some_and(|rx| rx.borrow().is_none())
    }

    /// Resolves when QEMU exits; returns its exit status text.
    pub async fn exited(&self) -> String {
        match &self.exit {
            Some(rx) => wait_exit(rx.clone()).await,
            None => std::future::pending().await,
        }
    }

    /// QEMU's arguments for the given (resolved) accelerator.
    pub fn command_line(&self, accel: Accel) -> Result<Vec<OsString>> {
        let c = &self.config;
        let d = |name: &str| plain(&c.state_dir.join(name));
        let mut args: Vec<String> = vec!["-name".into(), c.name.replace(',', "_")];
        match accel {
            // The host's CPU model: KVM cannot emulate a different one cheaply.
            Accel::Kvm => args.extend(["-accel", "kvm", "-cpu", "host"].map(String::from)),
            _ => args.extend(["-accel", "tcg"].map(String::from)),
        }
        let agent = format!(
            "{} -- --init --port-name={} --log-level={}",
            c.kernel_cmdline, c.port_name, c.gcs_log_level
        );
        args.extend([
            "-m".into(),
            c.memory_mib.to_string(),
            "-smp".into(),
            c.cpus.to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            // The guest powering off or rebooting ends QEMU (a VM reboot is not meaningful
            // for a UVM; the host notices the exit).
            "-no-reboot".into(),
            "-kernel".into(),
            plain(&c.kernel)?,
            "-initrd".into(),
            plain(&c.initrd)?,
            "-append".into(),
            agent,
            "-serial".into(),
            format!("file:{}", d("console.log")?),
            "-nic".into(),
            "none".into(),
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                d("agent.sock")?
            ),
            "-device".into(),
            format!(
                "virtserialport,bus=vser0.0,chardev=agent,name={},id={PORT_DEVICE_ID}",
                c.port_name
            ),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", d("qmp.sock")?),
        ]);
        if self.migration.incoming {
            // Wait for a migration stream (its address is given over QMP), and stay paused
            // once it has loaded: the caller decides when this side runs.
            args.extend(["-incoming", "defer", "-S"].map(String::from));
        }
        Ok(args.into_iter().map(OsString::from).collect())
    }

    fn check_inputs(&self) -> Result<()> {
        let c = &self.config;
        if c.port_name.is_empty()
            || !c
                .port_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(UvmError::Start(format!(
                "bad virtio-serial port name {:?} (letters, digits, '.', '_', '-')",
                c.port_name
            )));
        }
        for (what, p) in [("kernel", &c.kernel), ("initramfs", &c.initrd)] {
            if !p.is_file() {
                return Err(UvmError::Start(format!(
                    "the {what} {} does not exist (build the image with `ferry image build`)",
                    p.display()
                )));
            }
        }
        for sock in [self.agent_socket(), self.qmp_socket()] {
            if sock.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(UvmError::Start(format!(
                    "state directory path too long for Unix sockets: {} (use a shorter FERRY_STATE_DIR)",
                    sock.display()
                )));
            }
        }
        Ok(())
    }

    /// What to say when the VM fails to come up: QEMU's own messages and the console's end.
    fn failure_context(&self) -> String {
        format!(
            "\n  qemu.log:{}\n  console.log:{}",
            tail(&self.qemu_log(), 5),
            tail(&self.console_log(), 10)
        )
    }

    /// Connects to a socket QEMU creates shortly after it starts.
    async fn connect_socket(&self, path: &Path, deadline: Instant) -> Result<UnixStream> {
        loop {
            match UnixStream::connect(path).await {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if let Some(status) = self.exit_status() {
                        return Err(UvmError::Start(format!(
                            "QEMU exited at once ({status}){}",
                            self.failure_context()
                        )));
                    }
                    if Instant::now() >= deadline {
                        return Err(UvmError::Start(format!(
                            "QEMU did not create {} within {SOCKETS_TIMEOUT:?}: {e}{}",
                            path.display(),
                            self.failure_context()
                        )));
                    }
                }
            }
            // Bounded by the deadline above; QEMU gives no other signal that it is ready.
            tokio::time::sleep(SOCKET_RETRY).await;
        }
    }

    fn exit_status(&self) -> Option<String> {
        self.exit.as_ref().and_then(|rx| rx.borrow().clone())
    }

    fn spawn_qemu(&mut self, accel: Accel) -> Result<()> {
        let c = &self.config;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.qemu_log())
            .map_err(|e| UvmError::io("open qemu.log", e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| UvmError::io("open qemu.log", e))?;
        let mut cmd = tokio::process::Command::new(&c.qemu);
        cmd.args(self.command_line(accel)?)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a terminal's Ctrl-C aimed at the host process does not
            // power the VM off, and the VM survives the host process.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                UvmError::Start(format!(
                    "{} not found (apt-get install qemu-system-x86)",
                    c.qemu.display()
                ))
            } else {
                UvmError::Start(format!("cannot run {}: {e}", c.qemu.display()))
            }
        })?;
        self.pid = child.id();
        let (tx, rx) = watch::channel(None);
        let name = c.name.clone();
        // Crash detection: whoever holds the receiver learns of the exit at once.
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => format!("unknown ({e})"),
            };
            tracing::info!(name = %name, %status, "QEMU exited");
            tx.send_replace(Some(status));
        });
        self.exit = Some(rx);
        Ok(())
    }

    fn kill(&self) {
        if let Some(pid) = self.pid
            && self.is_running()
        {
            // SAFETY: kill with a pid and a signal number. The pid is still ours: the task
            // waiting for it has not reaped it (is_running).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }

    async fn wait_exited(&self, timeout: Duration) -> bool {
        match &self.exit {
            Some(rx) => tokio::time::timeout(timeout, wait_exit(rx.clone()))
                .await
                .is_ok(),
            None => true,
        }
    }

    async fn boot(&mut self) -> Result<GuestConnection> {
        let accel = self.config.accel.resolve();
        self.accel = Some(accel);
        for sock in [self.agent_socket(), self.qmp_socket()] {
            let _ = std::fs::remove_file(sock);
        }
        let started = Instant::now();
        self.spawn_qemu(accel)?;
        let deadline = started + SOCKETS_TIMEOUT;
        let qmp_stream = self.connect_socket(&self.qmp_socket(), deadline).await?;
        self.qmp = Some(Qmp::handshake(qmp_stream).await?);
        // Connected before the guest opens its end: the guest's first look finds a host; its
        // session hello comes once it has booted.
        let conn = self.attach_channel(self.config.connect_timeout).await?;
        tracing::info!(
            name = %self.config.name,
            pid = self.pid,
            accel = accel.name(),
            boot = ?started.elapsed(),
            "QEMU UVM started"
        );
        self.started_at = Some(SystemTime::now());
        Ok(conn)
    }

    /// Connects the host's end of the virtio-serial port, starts the multiplexer (client
    /// role), and accepts and negotiates the agent's bridge connection.
    pub(crate) async fn attach_channel(&mut self, patience: Duration) -> Result<GuestConnection> {
        let timeout = self.config.connect_timeout;
        let transport = self
            .open_channel(Instant::now() + timeout, patience)
            .await?;
        self.accept_guest(transport, timeout, |_| {}).await
    }

    /// Connects the host's end of the virtio-serial port and starts a new multiplexer session
    /// on it (client role). The guest sees a new session: callers may listen on ports of the
    /// returned transport (a restore's stdio ports) before [`accept_guest`](Self::accept_guest).
    ///
    /// The session starts at the guest's session hello ([`transport::session_hello`]). A
    /// connection that brings none within `patience` is cut and made again, until `until`:
    /// the guest may still run the session of the host before (after a migration or a host
    /// restart) and only a cut shows it that session's end.
    ///
    /// When the guest's last hello (seen here, or by the previous host:
    /// [`set_session_hello`](Self::set_session_hello)) was of a version that understands it,
    /// the first connection starts with a session reset, which ends an old session the guest may
    /// still run without waiting for that session to speak first (20-40 ms less blackout for
    /// an idle guest after a migration under TCG, BENCHMARKS.md); the cuts remain the fallback.
    ///
    /// A guest can miss a cut (the port's end and the next connection both reach it before
    /// its agent looks, as a guest just resumed under TCG does), so each cut after the first
    /// waits longer for the guest to notice. (Cutting the first connection after a migration
    /// at once, before the old session's first bytes, did not help: the guest missed that
    /// cut every time.)
    pub async fn open_channel(&mut self, until: Instant, patience: Duration) -> Result<Transport> {
        let mut cut_pause = CUT_PAUSE;
        let mut reset = self.session_hello >= session_hello::RESET_VERSION;
        loop {
            let mut agent = self.connect_socket(&self.agent_socket(), until).await?;
            let mut stale_grace = session_hello::STALE_GRACE;
            if std::mem::take(&mut reset) {
                // Failing here is the connection failing: the hello read below tells.
                if let Err(e) = session_hello::send_reset(&mut agent).await {
                    tracing::debug!(error = %e, "could not write the session reset");
                }
                stale_grace = patience;
            }
            let dup = agent
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| UvmError::io("duplicate the agent socket", e))?;
            let dup = std::os::unix::net::UnixStream::from(dup);
            let mut agent = tokio::io::BufReader::new(agent);
            let left = until.saturating_duration_since(Instant::now());
            let hello =
                session_hello::read_hello(&mut agent, patience.min(left), stale_grace).await;
            match hello {
                Ok(Hello::Found { discarded, version }) => {
                    if discarded > 0 {
                        tracing::debug!(discarded, "dropped bytes of the guest's previous session");
                    }
                    self.session_hello = version;
                    self.channel = Some(dup);
                    return Ok(Transport::mux(MuxSession::new(agent, MuxRole::Client)));
                }
                other => {
                    let _ = dup.shutdown(std::net::Shutdown::Both);
                    if let Some(status) = self.exit_status() {
                        return Err(UvmError::Start(format!(
                            "QEMU exited ({status}){}",
                            self.failure_context()
                        )));
                    }
                    if Instant::now() >= until {
                        return Err(UvmError::Start(format!(
                            "the guest agent did not start a session on its channel in time ({other:?}){}",
                            self.failure_context()
                        )));
                    }
                    tracing::debug!(
                        ?other,
                        ?cut_pause,
                        "no session hello from the guest; connecting again"
                    );
                    // Bounded by `until`; gives the guest's port a moment to see the cut.
                    tokio::time::sleep(cut_pause).await;
                    cut_pause = (cut_pause * 2).min(MAX_CUT_PAUSE);
                }
            }
        }
    }

    /// Accepts the agent's bridge connection on `transport` and negotiates; `prepare` runs on
    /// the connection before negotiation (see [`GuestConnection::connect_prepared`]).
    pub async fn accept_guest(
        &mut self,
        transport: Transport,
        timeout: Duration,
        prepare: impl FnOnce(&GuestConnection),
    ) -> Result<GuestConnection> {
        let mut bridge = transport
            .listen(bridge::BRIDGE_PORT)
            .await
            .map_err(|e| UvmError::Start(format!("listen on the bridge port: {e}")))?;
        let exit = self.exit.clone().ok_or(UvmError::NotRunning)?;
        let stream = tokio::select! {
            s = tokio::time::timeout(timeout, bridge.accept()) => match s {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(UvmError::Start(format!(
                    "accept the agent's bridge connection: {e}{}", self.failure_context()
                ))),
                Err(_) => return Err(UvmError::Start(format!(
                    "the guest agent did not connect within {timeout:?}{}", self.failure_context()
                ))),
            },
            status = wait_exit(exit) => return Err(UvmError::Start(format!(
                "QEMU exited ({status}){}", self.failure_context()
            ))),
        };
        let conn = GuestConnection::connect_prepared(
            transport,
            stream,
            self.config.connection.clone(),
            prepare,
        )
        .await?;
        // A crash ends the connection with the reason, so every waiter hears of it.
        if let Some(exit) = self.exit.clone() {
            let watched = conn.clone();
            tokio::spawn(async move {
                let status = wait_exit(exit).await;
                watched.close(&format!("QEMU exited ({status})"));
            });
        }
        self.bridge = Some(bridge);
        self.conn = Some(conn.clone());
        Ok(conn)
    }

    /// Takes over a QEMU another host process started (a restore, an upgrade): checks that
    /// `pid` is the QEMU of this UVM, connects to its QMP socket and watches for its exit.
    /// The guest connection comes next, with [`open_channel`](Self::open_channel) and
    /// [`accept_guest`](Self::accept_guest).
    pub async fn adopt(config: QemuConfig, pid: u32) -> Result<QemuUvm> {
        let mut uvm = QemuUvm::new(config);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline.is_empty() {
            return Err(UvmError::Start(format!(
                "the UVM's QEMU (pid {pid}) is gone: the UVM no longer exists"
            )));
        }
        let qmp = format!("unix:{},server=on,wait=off", plain(&uvm.qmp_socket())?);
        if !cmdline.split(|&b| b == 0).any(|a| a == qmp.as_bytes()) {
            return Err(UvmError::Start(format!(
                "pid {pid} is not the QEMU of this UVM (it does not serve {}): wrong snapshot, or the pid was reused",
                uvm.qmp_socket().display()
            )));
        }
        uvm.exit = Some(watch_pid(pid)?);
        uvm.pid = Some(pid);
        let deadline = Instant::now() + SOCKETS_TIMEOUT;
        let stream = uvm.connect_socket(&uvm.qmp_socket(), deadline).await?;
        let mut qmp = Qmp::handshake(stream).await?;
        let status = qmp.execute("query-status", None).await?;
        uvm.paused = status["running"] == false;
        uvm.qmp = Some(qmp);
        uvm.accel = Some(uvm.config.accel);
        uvm.started_at = Some(SystemTime::now());
        Ok(uvm)
    }

    /// Cuts the host's end of the channel and connects again, as a host does after a
    /// migration: the guest takes the end of its port as the end of the session, waits for
    /// the next host, starts a new multiplexer session and dials the bridge again; everything
    /// running in the guest stays. The old connection is closed; returns the new one.
    pub async fn reconnect(&mut self) -> Result<GuestConnection> {
        if !self.is_running() {
            return Err(UvmError::NotRunning);
        }
        self.disconnect("the host is reconnecting");
        let t = Instant::now();
        let conn = self.attach_channel(RECONNECT_PATIENCE).await?;
        tracing::info!(name = %self.config.name, elapsed = ?t.elapsed(), "reconnected to the guest agent");
        Ok(conn)
    }

    /// Lets go of the guest for another host process (a save, an upgrade): cuts the channel.
    /// The VM keeps running; the next host finds the guest's new session by its hello.
    pub fn release_channel(&mut self) {
        self.disconnect("the UVM is handed to another host process");
    }

    /// Ends the host's side of the channel, even while streams on it are still held.
    fn disconnect(&mut self, reason: &str) {
        if let Some(conn) = self.conn.take() {
            conn.close(reason);
        }
        self.bridge = None;
        if let Some(ch) = self.channel.take() {
            let _ = ch.shutdown(std::net::Shutdown::Both);
        }
    }

    fn forget(&mut self) {
        self.disconnect("the utility VM stopped");
        self.qmp = None;
        self.paused = false;
        self.migration = Default::default();
        for sock in [self.agent_socket(), self.qmp_socket()] {
            let _ = std::fs::remove_file(sock);
        }
    }
}

/// Watches a process that is not our child (so cannot be waited for) through a pidfd, which
/// becomes readable when the process exits.
fn watch_pid(pid: u32) -> Result<watch::Receiver<Option<String>>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(UvmError::io(
            format!("watch QEMU (pid {pid})"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: the descriptor was just created and is owned by nothing else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: an OwnedFd keeps returning the same open descriptor until it is dropped with
    // the AsyncFd.
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, Interest::READABLE) }
        .map_err(|e| UvmError::io("watch QEMU", e.into()))?;
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let _ = fd.readable().await;
        tracing::info!(pid, "QEMU exited");
        tx.send_replace(Some("exited (not our child: status unknown)".to_owned()));
    });
    Ok(rx)
}

async fn wait_exit(mut rx: watch::Receiver<Option<String>>) -> String {
    match rx.wait_for(|s| s.is_some()).await {
        Ok(s) => s.clone().unwrap_or_default(),
        Err(_) => "unknown (its watcher is gone)".into(),
    }
}

impl UtilityVm for QemuUvm {
    fn backend_name(&self) -> &'static str {
        "qemu"
    }

    async fn start_with_migration_options(
        &mut self,
        options: &crate::InitializeOptions,
        address: &crate::MemoryAddress,
    ) -> Result<()> {
        let plan = crate::QemuMigrationPlan::from_options(options)?;
        self.start_incoming(&plan, address).await
    }

    async fn wait_live_migration_incoming(
        &mut self,
        events: &tokio::sync::mpsc::UnboundedSender<crate::MigrationEvent>,
    ) -> Result<()> {
        self.wait_incoming(events).await
    }

    async fn initialize_live_migration_on_source(
        &mut self,
        options: &crate::InitializeOptions,
    ) -> Result<()> {
        self.migration.plan = Some(crate::QemuMigrationPlan::from_options(options)?);
        Ok(())
    }

    async fn start_live_migration_transfer(
        &mut self,
        address: &crate::MemoryAddress,
        events: &tokio::sync::mpsc::UnboundedSender<crate::MigrationEvent>,
        cancel: watch::Receiver<bool>,
    ) -> Result<()> {
        let plan = self.migration.plan.clone().ok_or_else(|| {
            UvmError::NotSupported(
                "initialize the live migration on the source before the transfer".into(),
            )
        })?;
        self.migrate_out(&plan, address, events, cancel).await
    }

    async fn finalize_live_migration(&mut self, resume: bool) -> Result<()> {
        self.finalize(resume).await
    }

    async fn start(&mut self) -> Result<GuestConnection> {
        if self.is_running() {
            return Err(UvmError::AlreadyRunning);
        }
        std::fs::create_dir_all(&self.config.state_dir)
            .map_err(|e| UvmError::io(format!("create {}", self.config.state_dir.display()), e))?;
        self.check_inputs()?;
        match self.boot().await {
            Ok(conn) => Ok(conn),
            Err(e) => {
                // Nothing half-started stays behind.
                self.kill();
                self.wait_exited(Duration::from_secs(5)).await;
                self.forget();
                Err(e)
            }
        }
    }

    async fn stop(&mut self, grace: Duration) -> Result<()> {
        if !self.is_running() {
            self.forget();
            return Err(UvmError::NotRunning);
        }
        if self.migration.must_not_run() {
            // A shutdown request needs the guest running, and this side must not run it.
            self.quit("the utility VM stopped").await;
            return Ok(());
        }
        if self.paused
            && let Some(q) = self.qmp.as_mut()
        {
            let _ = q.execute("cont", None).await;
        }
        // The agent shuts down and powers the VM off, which ends QEMU (-no-reboot).
        if let Some(conn) = self.conn.take() {
            let uvm = host::Container::uvm(&conn);
            match tokio::time::timeout(grace, uvm.shutdown(true)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "shutdown request failed"),
                Err(_) => tracing::debug!("shutdown request unanswered"),
            }
        }
        if !self.wait_exited(grace).await {
            tracing::warn!(name = %self.config.name, "the VM did not power off within {grace:?}; quitting QEMU");
            if let Some(q) = self.qmp.as_mut() {
                let _ = q.execute("quit", None).await;
            }
            if !self.wait_exited(Duration::from_secs(2)).await {
                self.kill();
                self.wait_exited(Duration::from_secs(5)).await;
            }
        }
        self.forget();
        tracing::info!(name = %self.config.name, "QEMU UVM stopped");
        Ok(())
    }

    async fn pause(&mut self) -> Result<()> {
        if !self.is_running() {
            return Err(UvmError::NotRunning);
        }
        let q = self.qmp.as_mut().ok_or(UvmError::NotRunning)?;
        q.execute("stop", None).await?;
        self.paused = true;
        Ok(())
    }

    async fn resume(&mut self) -> Result<()> {
        if !self.is_running() {
            return Err(UvmError::NotRunning);
        }
        self.migration.check_may_run()?;
        let q = self.qmp.as_mut().ok_or(UvmError::NotRunning)?;
        q.execute("cont", None).await?;
        self.paused = false;
        Ok(())
    }

    fn properties(&self) -> UvmProperties {
        UvmProperties {
            name: self.config.name.clone(),
            backend: "qemu",
            running: self.is_running(),
            paused: self.paused,
            pid: self.pid.filter(|_| self.is_running()),
            state_dir: self.config.state_dir.clone(),
            transport: format!(
                "virtio-serial port {} (mux) via {} [{}]",
                self.config.port_name,
                self.agent_socket().display(),
                self.accel.unwrap_or(self.config.accel).name()
            ),
            started_at: self
                .started_at
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uvm(dir: &str) -> QemuUvm {
        QemuUvm::new(QemuConfig::new(
            "t",
            PathBuf::from(dir),
            PathBuf::from("/img/vmlinux"),
            PathBuf::from("/img/initramfs.cpio"),
        ))
    }

    #[test]
    fn command_line_has_the_channel_and_the_agent_arguments() {
        let args: Vec<String> = uvm("/s")
            .command_line(Accel::Tcg)
            .unwrap()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for want in [
            "-accel tcg",
            "-kernel /img/vmlinux",
            "-initrd /img/initramfs.cpio",
            "-serial file:/s/console.log",
            "socket,id=agent,path=/s/agent.sock,server=on,wait=off",
            "virtserialport,bus=vser0.0,chardev=agent,name=ferry.0",
            "-qmp unix:/s/qmp.sock,server=on,wait=off",
        ] {
            assert!(joined.contains(want), "{want} missing from {joined}");
        }
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert_eq!(
            append,
            "console=ttyS0 quiet panic=-1 -- --init --port-name=ferry.0 --log-level=info"
        );
        let kvm = uvm("/s").command_line(Accel::Kvm).unwrap();
        assert!(kvm.iter().any(|a| a == "host"));
    }

    #[test]
    fn commas_in_paths_are_refused() {
        assert!(uvm("/s,x").command_line(Accel::Tcg).is_err());
    }

    #[test]
    fn accel_parses() {
        assert_eq!("auto".parse::<Accel>().unwrap(), Accel::Auto);
        assert!("xen".parse::<Accel>().is_err());
        assert_ne!(Accel::Auto.resolve(), Accel::Auto);
    }
}
