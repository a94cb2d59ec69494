//! The CLI side of the control protocol.

use crate::control::{self, LogOffsets, Reply, Request, tag};
use crate::paths::{self, UvmPaths};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

pub type Session = (BufReader<OwnedReadHalf>, OwnedWriteHalf);

/// Sends one request to a UVM's shim; returns the reply data and, for streaming requests, the
/// connection to stream on.
pub async fn request(
    root: &Path,
    uvm: &str,
    req: &Request,
) -> Result<(serde_json::Value, Option<Session>), String> {
    try_request(root, uvm, req).await.map_err(|e| e.message)
}

/// Why a request got no answer.
struct RequestError {
    message: String,
    /// No host process serves the UVM right now, or the one there is handing it over: one may
    /// serve it later.
    between_hosts: bool,
}

async fn try_request(
    root: &Path,
    uvm: &str,
    req: &Request,
) -> Result<(serde_json::Value, Option<Session>), RequestError> {
    let fail = |message: String, between_hosts: bool| RequestError {
        message,
        between_hosts,
    };
    paths::validate_uvm_name(uvm).map_err(|e| fail(e, false))?;
    let control = UvmPaths::new(root, uvm).control();
    let stream = UnixStream::connect(&control).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => fail(
            format!("UVM {uvm:?} is not running (start it with `ferry uvm start {uvm}`; state in {})", root.display()),
            true,
        ),
        std::io::ErrorKind::PermissionDenied => fail(
            format!("permission denied on {}: the UVM belongs to another user", control.display()),
            false,
        ),
        // A host process closing its socket as it hands the UVM over resets the connection.
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => fail(
            format!("cannot reach UVM {uvm:?} at {}: {e}", control.display()),
            true,
        ),
        _ => fail(format!("cannot reach UVM {uvm:?} at {}: {e}", control.display()), false),
    })?;
    let (r, mut w) = stream.into_split();
    // Large: a streaming session reads output frames of up to 64 KiB.
    let mut r = BufReader::with_capacity(4 * control::MAX_PAYLOAD, r);
    control::write_line(&mut w, req)
        .await
        .map_err(|e| fail(format!("sending the request to UVM {uvm:?}: {e}"), true))?;
    let reply: Reply = control::read_line(&mut r)
        .await
        .map_err(|e| fail(format!("UVM {uvm:?} did not answer: {e}"), true))?;
    if !reply.ok {
        let message = reply.error.unwrap_or_else(|| "unknown error".into());
        let between_hosts = message.contains(control::HANDING_OVER);
        return Err(fail(message, between_hosts));
    }
    let session = req.streams().then_some((r, w));
    Ok((reply.data, session))
}

/// Which run of a UVM a client talks to: its process (the agent on the local backend, QEMU),
/// with the time the kernel started it (so a reused pid is not taken for it), stays the same
/// across host processes and differs for a UVM of the same name started anew.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UvmIdentity {
    pid: Option<u64>,
    start_ticks: Option<u64>,
}

impl UvmIdentity {
    fn of(info: &serde_json::Value) -> UvmIdentity {
        let pid = info["uvm"]["pid"].as_u64();
        UvmIdentity {
            pid,
            start_ticks: pid.and_then(start_ticks),
        }
    }

    /// Whether the UVM's process is gone for good (nothing can take it over then).
    fn is_gone(&self) -> bool {
        let Some(pid) = self.pid.and_then(|p| i32::try_from(p).ok()) else {
            return false;
        };
        matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Err(nix::errno::Errno::ESRCH)
        )
    }
}

/// When the kernel started process `pid` (field 22 of /proc/PID/stat, in clock ticks since
/// boot).
fn start_ticks(pid: u64) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The identity of the UVM `uvm` serves now (default when it cannot be asked: then a
/// successor is not checked).
pub async fn uvm_identity(root: &Path, uvm: &str) -> UvmIdentity {
    match request(root, uvm, &Request::Info).await {
        Ok((info, _)) => UvmIdentity::of(&info),
        Err(_) => UvmIdentity::default(),
    }
}

/// Sends `req` to the host process that takes over a UVM whose host process went away while
/// streaming (`ferry uvm upgrade`, `ferry uvm restore`), waiting up to `wait` for one to
/// answer. Not waited for: a UVM that migrated to another machine, one whose own process is
/// gone (stopped), and a new UVM of the same name (`identity` differs).
pub async fn request_successor(
    root: &Path,
    uvm: &str,
    req: &Request,
    identity: &UvmIdentity,
    wait: std::time::Duration,
) -> Result<(serde_json::Value, Option<Session>), String> {
    let started = std::time::Instant::now();
    let mut told = false;
    loop {
        let e = match try_request(root, uvm, &Request::Info).await {
            Ok((info, _))
                if *identity != UvmIdentity::default() && UvmIdentity::of(&info) != *identity =>
            {
                return Err(format!(
                    "UVM {uvm:?} was stopped and another of that name started; the process followed is gone"
                ));
            }
            Ok(_) => match try_request(root, uvm, req).await {
                Ok(answer) => return Ok(answer),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if !e.between_hosts {
            return Err(e.message);
        }
        if let Ok(to) = std::fs::read_to_string(UvmPaths::new(root, uvm).migrated()) {
            return Err(format!(
                "UVM {uvm:?} migrated to {}; its output goes on there",
                to.trim()
            ));
        }
        if identity.is_gone() {
            return Err(format!("UVM {uvm:?} was stopped"));
        }
        if started.elapsed() >= wait {
            return Err(format!(
                "{} (no new host process took it over within {} s)",
                e.message,
                wait.as_secs()
            ));
        }
        if !told && started.elapsed() >= std::time::Duration::from_secs(2) {
            eprintln!(
                "ferry: UVM {uvm:?} has no host process; waiting up to {} s for one to take it over",
                wait.as_secs()
            );
            told = true;
        }
        // Polled: the successor's socket appears at the same path, nothing announces it.
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            // Our SIGINT handler (installed for the stream) outlives it: Ctrl-C ends the wait.
            _ = tokio::signal::ctrl_c() => return Err("interrupted".into()),
        }
    }
}

/// Puts the local terminal in raw mode for a `--tty` session; restores it on drop.
pub struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    pub fn enter() -> RawMode {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawMode { saved: None };
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// The local terminal's size (rows, columns), if stdout or stdin is a terminal.
pub fn terminal_size() -> Option<(u16, u16)> {
    for fd in [std::io::stdout().as_raw_fd(), std::io::stdin().as_raw_fd()] {
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes a winsize into the pointer.
        if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0 && ws.ws_row > 0 {
            return Some((ws.ws_row, ws.ws_col));
        }
    }
    None
}

pub fn is_terminal() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

/// Runs a streaming session: output to our stdout/stderr, our stdin to the process (when
/// `stdin`), resizes (with `tty`), and SIGINT/SIGTERM forwarded as signals (without `tty`, where
/// the terminal delivers them as keystrokes instead). Returns the exit code, or None when the
/// stream ended without one (logs without --follow).
pub async fn stream(session: Session, stdin: bool, tty: bool) -> Result<Option<i32>, String> {
    match stream_at(session, stdin, tty, &mut LogOffsets::default()).await? {
        StreamEnd::Exit(code) => Ok(Some(code)),
        StreamEnd::Ended => Ok(None),
        StreamEnd::Lost(e) => Err(e),
    }
}

/// How a streaming session ended, when not by an error of its own.
pub enum StreamEnd {
    /// The process exited with this code.
    Exit(i32),
    /// The shim ended the stream without an exit code.
    Ended,
    /// The connection to the shim broke.
    Lost(String),
}

/// [`stream`], counting in `at` where each output stream has got to (bytes written out and
/// bytes the shim reported dropped), so that a follower can resume after a new shim took
/// over.
pub async fn stream_at(
    session: Session,
    stdin: bool,
    tty: bool,
    at: &mut LogOffsets,
) -> Result<StreamEnd, String> {
    let (mut r, w) = session;
    let w = std::sync::Arc::new(tokio::sync::Mutex::new(w));
    let _raw = (tty && is_terminal()).then(RawMode::enter);

    let mut tasks = Vec::new();
    if stdin {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            let mut input = Input::get().lock().await;
            loop {
                // Cancel-safe: a chunk read stays in the channel until taken here.
                let Some(chunk) = input.recv().await else {
                    break;
                };
                if control::write_frame(&mut *w.lock().await, tag::STDIN, &chunk)
                    .await
                    .is_err()
                {
                    // The shim went away and read none of it: for the next session.
                    input.carry = Some(chunk);
                    return;
                }
            }
            let _ = control::write_frame(&mut *w.lock().await, tag::STDIN_EOF, &[]).await;
        }));
    }
    // The handlers are installed here, before any output is relayed: a resize or a Ctrl-C
    // that comes as soon as the first output appears must not find the default disposition.
    use tokio::signal::unix::{SignalKind, signal};
    if let (Ok(mut winch), Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::window_change()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let (t, payload) = tokio::select! {
                    _ = winch.recv() => match terminal_size() {
                        Some((rows, cols)) if tty => {
                            let mut p = rows.to_le_bytes().to_vec();
                            p.extend_from_slice(&cols.to_le_bytes());
                            (tag::RESIZE, p)
                        }
                        _ => continue,
                    },
                    _ = int.recv() => (tag::SIGNAL, libc::SIGINT.to_le_bytes().to_vec()),
                    _ = term.recv() => (tag::SIGNAL, libc::SIGTERM.to_le_bytes().to_vec()),
                };
                if control::write_frame(&mut *w.lock().await, t, &payload)
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }));
    }

    // Our stdout and stderr, written directly: tokio's stdout hands every write to a blocking
    // thread, and Rust's std stdout is line-buffered; both cost throughput here.
    let mut stdout = raw_fd(1);
    let mut stderr = raw_fd(2);
    let mut splice = stdout_is_blocking_pipe();
    let mut data = Vec::with_capacity(control::MAX_PAYLOAD);
    let result = loop {
        let mut head = [0u8; 5];
        // With splicing, headers are read past the buffer (which then stays empty), so that
        // the payloads can go from the socket to stdout without passing through here.
        let got = if splice {
            read_unbuffered(&mut r, &mut head).await
        } else {
            r.read_exact(&mut head).await.map(|_| ())
        };
        match got {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Ok(StreamEnd::Ended),
            Err(e) => {
                break Ok(StreamEnd::Lost(format!(
                    "lost the connection to the shim: {e}"
                )));
            }
        }
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if len > control::MAX_PAYLOAD {
            break Ok(StreamEnd::Lost(format!(
                "lost the connection to the shim: control frame of {len} bytes exceeds {}",
                control::MAX_PAYLOAD
            )));
        }
        if head[0] == tag::STDOUT {
            match stdout_payload(&mut r, len, &mut stdout, &mut splice).await {
                Ok(()) => {
                    at.stdout += len as u64;
                    continue;
                }
                Err(Fail::Stdout) => break Err("stdout closed".to_string()),
                Err(Fail::Shim(e)) => {
                    break Ok(StreamEnd::Lost(format!(
                        "lost the connection to the shim: {e}"
                    )));
                }
            }
        }
        data.resize(len, 0);
        let got = if splice {
            read_unbuffered(&mut r, &mut data).await
        } else {
            r.read_exact(&mut data).await.map(|_| ())
        };
        if let Err(e) = got {
            break Ok(StreamEnd::Lost(format!(
                "lost the connection to the shim: {e}"
            )));
        }
        match head[0] {
            tag::STDERR => {
                let _ = stderr.write_all(&data);
                at.stderr += data.len() as u64;
            }
            tag::DROPPED if data.len() == 8 || data.len() == 9 => {
                let mut n = [0u8; 8];
                n.copy_from_slice(&data[..8]);
                let n = u64::from_le_bytes(n);
                match data.get(8) {
                    Some(&tag::STDOUT) => at.stdout += n,
                    Some(&tag::STDERR) => at.stderr += n,
                    _ => {}
                }
                eprintln!(
                    "ferry: {n} bytes of earlier output were dropped (beyond the UVM's log limit, `ferry uvm start --log-limit`)"
                );
            }
            tag::EXIT if data.len() == 4 => {
                break Ok(StreamEnd::Exit(i32::from_le_bytes([
                    data[0], data[1], data[2], data[3],
                ])));
            }
            tag::ERROR => break Err(String::from_utf8_lossy(&data).into_owned()),
            t => break Err(format!("unexpected frame {t} from the shim")),
        }
    };
    for t in tasks {
        t.abort();
    }
    result
}

/// Our stdin, read by one task for the whole life of the command: a session that ends (its
/// host process was replaced) must not take bytes already read from stdin with it, as a
/// reader per session would.
struct Input {
    chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
    /// A chunk a session failed to send.
    carry: Option<Vec<u8>>,
}

impl Input {
    fn get() -> &'static tokio::sync::Mutex<Input> {
        static INPUT: std::sync::OnceLock<tokio::sync::Mutex<Input>> = std::sync::OnceLock::new();
        INPUT.get_or_init(|| {
            // One chunk in hand at most: stdin is read as fast as a session sends it on.
            let (tx, chunks) = tokio::sync::mpsc::channel(1);
            tokio::spawn(async move {
                let mut stdin = tokio::io::stdin();
                let mut buf = vec![0u8; 32 * 1024];
                while let Ok(n @ 1..) = stdin.read(&mut buf).await {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            });
            tokio::sync::Mutex::new(Input {
                chunks,
                carry: None,
            })
        })
    }

    /// The next chunk of input; None at its end.
    async fn recv(&mut self) -> Option<Vec<u8>> {
        match self.carry.take() {
            Some(chunk) => Some(chunk),
            None => self.chunks.recv().await,
        }
    }
}

enum Fail {
    Stdout,
    Shim(std::io::Error),
}

/// Whether our stdout is a pipe in blocking mode: then output can be spliced into it.
fn stdout_is_blocking_pipe() -> bool {
    use nix::sys::stat::{SFlag, fstat};
    let stdout = std::io::stdout();
    let is_pipe = fstat(&stdout)
        .map(|st| SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFIFO)
        .unwrap_or(false);
    let blocking = nix::fcntl::fcntl(&stdout, nix::fcntl::FcntlArg::F_GETFL)
        .map(|fl| {
            !nix::fcntl::OFlag::from_bits_truncate(fl).contains(nix::fcntl::OFlag::O_NONBLOCK)
        })
        .unwrap_or(false);
    is_pipe && blocking
}

/// Fills `buf` from what `r` has buffered, then straight from the socket, leaving the buffer
/// empty.
async fn read_unbuffered(r: &mut BufReader<OwnedReadHalf>, buf: &mut [u8]) -> std::io::Result<()> {
    let have = r.buffer().len().min(buf.len());
    buf[..have].copy_from_slice(&r.buffer()[..have]);
    r.consume(have);
    r.get_mut().read_exact(&mut buf[have..]).await?;
    Ok(())
}

/// Copies a standard-output frame's payload (`len` bytes) to our stdout: what is buffered,
/// then, with `splice`, straight from the socket into the pipe (the kernel moves the pages;
/// no copy through this process), otherwise from the read buffer.
async fn stdout_payload(
    r: &mut BufReader<OwnedReadHalf>,
    mut len: usize,
    stdout: &mut std::fs::File,
    splice: &mut bool,
) -> Result<(), Fail> {
    while len > 0 {
        if *splice && r.buffer().is_empty() {
            match splice_to_stdout(r.get_ref(), len).await {
                Ok(n) => {
                    len -= n;
                    continue;
                }
                // Not possible on this pipe after all: copy from now on.
                Err(SpliceError::Unsupported) => *splice = false,
                Err(SpliceError::Stdout) => return Err(Fail::Stdout),
                Err(SpliceError::Socket(e)) => return Err(Fail::Shim(e)),
            }
        }
        let buf = r.fill_buf().await.map_err(Fail::Shim)?;
        if buf.is_empty() {
            return Err(Fail::Shim(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let n = buf.len().min(len);
        stdout.write_all(&buf[..n]).map_err(|_| Fail::Stdout)?;
        r.consume(n);
        len -= n;
    }
    Ok(())
}

enum SpliceError {
    Unsupported,
    Stdout,
    Socket(std::io::Error),
}

/// Moves up to `len` bytes from the socket into stdout (a blocking pipe: a full pipe waits, as
/// a write would); returns how many.
async fn splice_to_stdout(sock: &OwnedReadHalf, len: usize) -> Result<usize, SpliceError> {
    let sock: &tokio::net::UnixStream = sock.as_ref();
    loop {
        let r = sock.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: splice between two descriptors we hold open; no memory is passed.
            let n = unsafe {
                libc::splice(
                    sock.as_raw_fd(),
                    std::ptr::null_mut(),
                    1,
                    std::ptr::null_mut(),
                    len,
                    libc::SPLICE_F_MOVE,
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(0) => {
                return Err(SpliceError::Socket(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                sock.readable().await.map_err(SpliceError::Socket)?;
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(SpliceError::Unsupported);
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => return Err(SpliceError::Stdout),
            Err(e) => return Err(SpliceError::Socket(e)),
        }
    }
}

/// A standard descriptor as a File that is never closed.
fn raw_fd(fd: i32) -> std::mem::ManuallyDrop<std::fs::File> {
    // SAFETY: fds 1 and 2 stay open for the life of the process; ManuallyDrop never closes them.
    std::mem::ManuallyDrop::new(unsafe {
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    })
}
