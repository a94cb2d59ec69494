//! A scripted host for driving a real `ferry-gcs` process over the hybrid-vsock transport.
//!
//! It is deliberately small and literal (it builds frames itself and can send raw bytes), so
//! tests can misbehave on purpose; ferry's real host side lives in its own crate.

#![allow(dead_code)]

use bridge::message::*;
use bridge::{BRIDGE_PORT, FIRST_STDIO_PORT, UVM_CONTAINER_ID};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use transport::{BoxStream, Listener, Side, Transport};

/// Safety bound on anything a test waits for; a hang fails the test instead of blocking CI.
pub const PATIENCE: Duration = Duration::from_secs(30);

pub async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {PATIENCE:?} waiting for {what}"))
}

/// Polls `cond` until it holds, for state that has no signal to wait on (another process's
/// log, /proc); panics after [`PATIENCE`].
pub async fn poll_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {PATIENCE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Prints the loud skip line and returns true when the test cannot run here.
pub fn skip_unless_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("skipped: {test} needs root (namespaces, mounts)");
    true
}

pub fn busybox() -> Option<PathBuf> {
    ["/usr/bin/busybox", "/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

pub fn skip_unless_busybox(test: &str) -> bool {
    if busybox().is_some() {
        return false;
    }
    eprintln!("skipped: {test} needs busybox (apt-get install busybox-static)");
    true
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A directory removed on drop; short paths (Unix socket names are limited to 108 bytes).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let p = PathBuf::from(format!("/tmp/fg-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Container rootfs dirs may still hold a bind mount if a test failed mid-way.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds a busybox root filesystem under `dir/rootfs`.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let bb = busybox().expect("busybox");
    std::fs::copy(&bb, root.join("bin/busybox")).unwrap();
    let list = Command::new(&bb).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
    }
    root
}

/// An OCI spec running `args` in a busybox rootfs with pid/mount/uts/ipc namespaces.
pub fn container_spec(rootfs: &Path, args: &[&str], terminal: bool) -> serde_json::Value {
    serde_json::json!({
        "ociVersion": "1.1.0",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/"
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": "ferrybox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "uts"}, {"type": "ipc"}]
        }
    })
}

pub fn base(container: &str) -> RequestBase {
    RequestBase::for_container(container)
}

/// A process's stdio streams, as the host accepted them.
#[derive(Default)]
pub struct ProcStdio {
    pub stdin: Option<BoxStream>,
    pub stdout: Option<BoxStream>,
    pub stderr: Option<BoxStream>,
}

pub async fn read_all(s: &mut BoxStream) -> Vec<u8> {
    let mut v = Vec::new();
    within("end of output", s.read_to_end(&mut v))
        .await
        .unwrap();
    v
}

type RawAnswer = (u32, Vec<u8>);

/// A response as the agent sent it: decoding is checked when it is awaited.
pub struct ResponseRx(oneshot::Receiver<RawAnswer>);

impl std::future::Future for ResponseRx {
    type Output = Result<Response, oneshot::error::RecvError>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.0)
            .poll(cx)
            .map(|r| r.map(|(t, body)| decode_response(t, &body)))
    }
}

fn decode_response(raw_type: u32, body: &[u8]) -> Response {
    let ident = bridge::Identifier::from_u32(raw_type)
        .unwrap_or_else(|_| panic!("unexpected frame type {raw_type:#x}"));
    let frame = bridge::Frame {
        ident,
        id: 0,
        body: body.to_vec(),
    };
    match Message::from_frame(&frame) {
        Ok(Message::Response(r)) => r,
        other => panic!("not a response: {other:?}"),
    }
}

/// One bridge connection from the agent.
pub struct Conn {
    writer: tokio::sync::Mutex<WriteHalf<BoxStream>>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<RawAnswer>>>>,
    /// Responses for ids nobody registered (e.g. sticky answers to an earlier connection's
    /// requests).
    pub strays: Arc<Mutex<Vec<(u64, Response)>>>,
    pub notifications: tokio::sync::Mutex<mpsc::UnboundedReceiver<ContainerNotification>>,
    /// Resolves when the agent closed the connection; carries the reason.
    pub closed: tokio::sync::Mutex<oneshot::Receiver<String>>,
    next_id: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Conn {
    fn new(stream: BoxStream, first_id: u64) -> Conn {
        let (mut r, w) = tokio::io::split(stream);
        let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<RawAnswer>>>> = Default::default();
        let strays: Arc<Mutex<Vec<(u64, Response)>>> = Default::default();
        let (ntx, nrx) = mpsc::unbounded_channel();
        let (ctx, crx) = oneshot::channel();
        let (p2, s2) = (pending.clone(), strays.clone());
        let reader = tokio::spawn(async move {
            // Read at the header level: answers to deliberately unknown types must reach
            // the test too.
            let reason = loop {
                let mut head = [0u8; 16];
                if let Err(e) = r.read_exact(&mut head).await {
                    break e.to_string();
                }
                let h = bridge::Header::decode(&head);
                assert!(
                    h.body_len() <= 16 * 1024 * 1024,
                    "agent sent a {} byte frame",
                    h.size
                );
                let mut body = vec![0u8; h.body_len()];
                if let Err(e) = r.read_exact(&mut body).await {
                    break e.to_string();
                }
                if h.raw_type == bridge::Identifier::CONTAINER_NOTIFICATION.to_u32() {
                    let n = serde_json::from_slice(&body).expect("notification decodes");
                    let _ = ntx.send(n);
                    continue;
                }
                let waiter = p2.lock().unwrap().remove(&h.id);
                match waiter {
                    Some(tx) => {
                        let _ = tx.send((h.raw_type, body));
                    }
                    None => s2
                        .lock()
                        .unwrap()
                        .push((h.id, decode_response(h.raw_type, &body))),
                }
            };
            let _ = ctx.send(reason);
        });
        Conn {
            writer: tokio::sync::Mutex::new(w),
            pending,
            strays,
            notifications: tokio::sync::Mutex::new(nrx),
            closed: tokio::sync::Mutex::new(crx),
            next_id: AtomicU64::new(first_id),
            reader,
        }
    }

    /// Closes the connection, returning once its socket is closed. Dropping a `Conn` closes
    /// it only when the runtime next runs its reader task: until then an answer the agent
    /// writes lands in a buffer nobody reads, and counts as delivered.
    pub async fn close(mut self) {
        self.reader.abort();
        let _ = (&mut self.reader).await;
    }

    pub fn alloc_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub async fn send_bytes(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut w = self.writer.lock().await;
        w.write_all(bytes).await?;
        w.flush().await
    }

    /// Registers interest in the response to `id` without sending anything (as a restored
    /// host adopts an outstanding wait).
    pub fn expect(&self, id: u64) -> ResponseRx {
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        ResponseRx(rx)
    }

    /// Sends a request under a fresh id; returns a receiver for its response.
    pub async fn send(&self, req: &Request) -> (u64, ResponseRx) {
        let id = self.alloc_id();
        let rx = self.expect(id);
        let bytes = req.to_frame(id).unwrap().encode(u32::MAX).unwrap();
        self.send_bytes(&bytes).await.expect("send request");
        (id, rx)
    }

    pub async fn call(&self, req: Request) -> Response {
        let what = format!("response to {}", req.rpc().name());
        let (_, rx) = self.send(&req).await;
        within(&what, rx)
            .await
            .expect("connection closed before the response")
    }

    /// Sends a raw frame with a fresh id and waits for its response (its raw type and common
    /// fields).
    pub async fn call_raw(&self, raw_type: u32, body: &[u8]) -> (u32, ResponseBase) {
        let id = self.alloc_id();
        let rx = self.expect(id);
        let mut v = bridge::Header {
            raw_type,
            size: (16 + body.len()) as u32,
            id,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(body);
        self.send_bytes(&v).await.unwrap();
        let (t, body) = within("response to a raw frame", rx.0)
            .await
            .expect("response");
        (t, serde_json::from_slice(&body).expect("response body"))
    }

    pub async fn negotiate(&self) -> NegotiateProtocolResponse {
        match self
            .call(Request::NegotiateProtocol(NegotiateProtocolRequest {
                base: RequestBase::default(),
                minimum_version: 4,
                maximum_version: 4,
            }))
            .await
        {
            Response::NegotiateProtocol(r) => {
                assert_eq!(r.base.result, 0, "negotiation failed: {}", r.base.message());
                r
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    pub async fn next_notification(&self) -> ContainerNotification {
        within(
            "a container notification",
            self.notifications.lock().await.recv(),
        )
        .await
        .expect("connection closed")
    }

    pub async fn wait_closed(&self) -> String {
        within(
            "the agent to close the bridge",
            &mut *self.closed.lock().await,
        )
        .await
        .unwrap_or_default()
    }
}

pub fn ok(r: &Response) {
    assert_eq!(
        r.base().result,
        0,
        "{:?} failed: {} ({})",
        r.rpc(),
        r.base().message(),
        bridge::hresult::describe(r.base().result)
    );
}

/// The agent binary: `$FERRY_GCS_BIN`, else the one cargo built for this test or bench, else
/// the `ferry-gcs` next to the running executable's directory (for examples).
pub fn gcs_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_GCS_BIN") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_ferry-gcs") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current executable");
    // target/<profile>/examples/<name> -> target/<profile>/ferry-gcs
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("ferry-gcs"))
        .expect("a directory above the executable")
}

/// A running `ferry-gcs` and the host end of its transport.
pub struct Gcs {
    pub dir: TempDir,
    pub transport: Transport,
    /// The host's bridge listener; `None` while the test has the bridge down.
    bridge: Option<Listener>,
    pub child: Child,
    next_port: AtomicU32,
    next_first_id: AtomicU64,
}

impl Drop for Gcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking()
            && let Ok(log) = std::fs::read_to_string(self.dir.0.join("gcs.log"))
        {
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- ferry-gcs log (last lines) ---");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

impl Gcs {
    pub async fn start(tag: &str) -> Gcs {
        Self::start_with(tag, &[]).await
    }

    pub async fn start_with(tag: &str, extra: &[&str]) -> Gcs {
        let dir = TempDir::new(tag);
        let base = dir.0.join("vm.sock");
        let transport = Transport::hybrid_vsock(&base, Side::Host);
        let bridge = transport
            .listen(BRIDGE_PORT)
            .await
            .expect("listen on bridge port");
        // A test that reads the log asks for its level itself; otherwise debug, for failures.
        let level = if extra.iter().any(|a| a.starts_with("--log-level")) {
            None
        } else {
            Some(format!(
                "--log-level={}",
                std::env::var("FERRY_TEST_LOG").unwrap_or_else(|_| "debug".into())
            ))
        };
        let child = Command::new(gcs_binary())
            .arg("--transport=hybrid-vsock")
            .arg("--base")
            .arg(&base)
            .arg("--state-dir")
            .arg(dir.0.join("state"))
            .arg("--log-file")
            .arg(dir.0.join("gcs.log"))
            .args(level)
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("start ferry-gcs");
        Gcs {
            dir,
            transport,
            bridge: Some(bridge),
            child,
            next_port: AtomicU32::new(FIRST_STDIO_PORT),
            next_first_id: AtomicU64::new(0),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Takes the bridge down: the listener goes and with it its socket file, so the agent's
    /// dials fail (as when the host process is gone) instead of queueing unanswered.
    pub fn close_bridge(&mut self) {
        assert!(self.bridge.take().is_some(), "the bridge is already closed");
    }

    /// Listens on the bridge port again after [`Gcs::close_bridge`].
    pub async fn reopen_bridge(&mut self) {
        assert!(self.bridge.is_none(), "the bridge is already open");
        self.bridge = Some(
            self.transport
                .listen(BRIDGE_PORT)
                .await
                .expect("listen on bridge port again"),
        );
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.0.join("gcs.log")).unwrap_or_default()
    }

    /// How many lines of the agent's log contain `needle`.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until the agent has logged more than `seen` lines containing `needle`.
    pub async fn log_grows(&self, needle: &str, seen: usize) {
        poll_until(&format!("the agent to log {needle:?}"), || {
            self.log_count(needle) > seen
        })
        .await
    }

    /// Waits until the agent has published the exit of `pid` (its "process exited" line).
    pub async fn exit_recorded(&self, pid: u32) {
        let field = format!("pid={pid} ");
        poll_until(&format!("the agent to record the exit of {pid}"), || {
            self.log()
                .lines()
                .any(|l| l.contains("process exited") && l.contains(&field))
        })
        .await
    }

    /// Accepts the agent's next bridge connection (not yet negotiated).
    pub async fn accept(&mut self) -> Conn {
        let bridge = self
            .bridge
            .as_mut()
            .expect("the bridge is closed: reopen_bridge() first");
        let s = within("the agent to dial the bridge", bridge.accept())
            .await
            .expect("accept bridge");
        // Ids keep rising across connections, as a restored host seeds them.
        let first = self.next_first_id.fetch_add(1_000_000, Ordering::Relaxed);
        Conn::new(s, first)
    }

    /// Accepts and negotiates.
    pub async fn connect(&mut self) -> Conn {
        let c = self.accept().await;
        c.negotiate().await;
        c
    }

    pub fn alloc_port(&self) -> u32 {
        self.next_port.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends ExecuteProcess with pipes on fresh ports, accepting the agent's stdio dials.
    pub async fn exec_raw(
        &self,
        conn: &Conn,
        container: &str,
        params: ProcessParameters,
        pipes: (bool, bool, bool),
    ) -> (Response, ProcStdio) {
        let mut ports = StdioPorts::default();
        let mut listeners: Vec<(usize, Listener)> = Vec::new();
        for (i, want) in [pipes.0, pipes.1, pipes.2].into_iter().enumerate() {
            if want {
                let port = self.alloc_port();
                match i {
                    0 => ports.std_in = port,
                    1 => ports.std_out = port,
                    _ => ports.std_err = port,
                }
                listeners.push((i, self.transport.listen(port).await.unwrap()));
            }
        }
        let (_, rx) = conn.send(&exec_req(container, params, ports)).await;
        let resp = within("ExecuteProcess response", rx)
            .await
            .expect("response");
        let mut stdio = ProcStdio::default();
        if resp.base().result == 0 {
            // The agent dials before it spawns, so the connections are already queued.
            for (i, mut l) in listeners {
                let s = within("a stdio dial", l.accept()).await.unwrap();
                match i {
                    0 => stdio.stdin = Some(s),
                    1 => stdio.stdout = Some(s),
                    _ => stdio.stderr = Some(s),
                }
            }
        }
        (resp, stdio)
    }

    /// Runs a command in the UVM; panics if it cannot start.
    pub async fn exec_uvm(
        &self,
        conn: &Conn,
        args: &[&str],
        pipes: (bool, bool, bool),
    ) -> (u32, ProcStdio) {
        let params = ProcessParameters {
            command_args: args.iter().map(|s| s.to_string()).collect(),
            create_std_in_pipe: pipes.0,
            create_std_out_pipe: pipes.1,
            create_std_err_pipe: pipes.2,
            ..Default::default()
        };
        let (resp, stdio) = self.exec_raw(conn, UVM_CONTAINER_ID, params, pipes).await;
        ok(&resp);
        let Response::ExecuteProcess(e) = resp else {
            panic!()
        };
        (e.process_id, stdio)
    }

    pub async fn create_container(
        &self,
        conn: &Conn,
        id: &str,
        spec: serde_json::Value,
    ) -> Response {
        let spec = serde_json::from_value(spec).expect("valid OCI spec");
        conn.call(Request::Create(ContainerCreateRequest {
            base: base(id),
            container_config: bridge::JsonString(ContainerConfig {
                schema_version: SchemaVersion { major: 2, minor: 1 },
                oci_specification: Some(Box::new(spec)),
                ..Default::default()
            }),
            supported_versions: None,
        }))
        .await
    }
}

/// An ExecuteProcess request with the given stdio ports.
pub fn exec_req(container: &str, params: ProcessParameters, ports: StdioPorts) -> Request {
    Request::ExecuteProcess(ExecuteProcessRequest {
        base: base(container),
        settings: ExecuteProcessSettings {
            process_parameters: bridge::JsonString(params),
            vsock_stdio_relay_settings: ports,
        },
    })
}

/// The OCI process of an exec into a container (root, PATH=/bin).
pub fn oci_process(args: &[&str], cwd: &str) -> Option<Box<oci_spec::runtime::Process>> {
    let p = serde_json::json!({
        "user": {"uid": 0, "gid": 0},
        "args": args,
        "env": ["PATH=/bin"],
        "cwd": cwd
    });
    Some(Box::new(
        serde_json::from_value(p).expect("valid OCI process"),
    ))
}

pub fn wait_req(container: &str, pid: u32, timeout_in_ms: u32) -> Request {
    Request::WaitForProcess(WaitForProcessRequest {
        base: base(container),
        process_id: pid,
        timeout_in_ms,
    })
}

pub async fn wait_exit(conn: &Conn, container: &str, pid: u32) -> u32 {
    match conn
        .call(wait_req(container, pid, bridge::INFINITE_WAIT))
        .await
    {
        Response::WaitForProcess(w) => {
            assert_eq!(w.base.result, 0, "wait failed: {}", w.base.message());
            w.exit_code
        }
        other => panic!("unexpected {other:?}"),
    }
}

pub fn signal_req(container: &str, pid: u32, signal: i32) -> Request {
    Request::SignalProcess(SignalProcessRequest {
        base: base(container),
        process_id: pid,
        options: Some(SignalProcessOptions { signal }),
    })
}

pub fn process_list_req(container: &str) -> Request {
    Request::GetProperties(GetPropertiesRequest {
        base: base(container),
        query: bridge::JsonString(PropertyQuery {
            property_types: vec!["ProcessList".into()],
        }),
    })
}

/// The processes the agent lists for `container` (the call must succeed).
pub async fn process_list(conn: &Conn, container: &str) -> Vec<ProcessDetails> {
    let r = conn.call(process_list_req(container)).await;
    ok(&r);
    let Response::GetProperties(p) = r else {
        panic!("unexpected {r:?}")
    };
    p.properties.0.process_list
}

/// Count of open fds and threads of a process.
pub fn fds_and_threads(pid: u32) -> (usize, usize) {
    let count = |d: String| std::fs::read_dir(d).map(|r| r.count()).unwrap_or(0);
    (
        count(format!("/proc/{pid}/fd")),
        count(format!("/proc/{pid}/task")),
    )
}
