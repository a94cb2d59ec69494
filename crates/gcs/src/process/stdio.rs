//! A process's stdio: the streams the agent dials to the host's ports, the pipes or
//! pseudo-terminal the process sees, and the pumps between them.

use crate::error::{GcsError, Result};
use bridge::message::StdioPorts;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;
use transport::{BoxStream, Transport};

/// Read size for output relays (a pipe holds 64 KiB by default).
const RELAY_BUFFER: usize = 128 * 1024;

/// The child's ends, ready for spawning.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub controlling_tty: bool,
}

/// The agent's ends, pumped once the process has started.
pub struct Relays {
    stdin: Option<(BoxStream, OwnedFd, u32)>,
    outputs: Vec<(OwnedFd, BoxStream, &'static str, u32)>,
    pub pty: Option<Arc<OwnedFd>>,
}

/// How resumable streams reconnect after a break: the agent dials the same port again until
/// the host is back, or until the process's streams are abandoned (its container deleted, the
/// UVM shut down).
#[derive(Clone)]
pub struct Redial {
    pub transport: Transport,
    pub interval: Duration,
    pub timeout: Duration,
    pub window: usize,
    pub abandon: tokio::sync::watch::Receiver<bool>,
    /// Changes when a host negotiates a new bridge connection: time to try again.
    pub host_back: tokio::sync::watch::Receiver<u64>,
}

impl Redial {
    async fn dial(mut self, port: u32) -> std::io::Result<BoxStream> {
        // Only a host that comes back from now on is news.
        self.host_back.borrow_and_update();
        loop {
            if *self.abandon.borrow() {
                return Err(std::io::Error::other("stream abandoned"));
            }
            match self.transport.dial(port, self.timeout).await {
                Ok(s) => {
                    tracing::debug!(port, "stdio stream re-dialled");
                    return Ok(s);
                }
                Err(e) => tracing::trace!(port, error = %e, "stdio re-dial failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = self.abandon.changed() => {}
                _ = self.host_back.changed() => {}
            }
        }
    }

    /// A connect function for a resumable stream: the stream dialled at start first, then
    /// re-dials.
    fn connector(
        self,
        port: u32,
        first: BoxStream,
    ) -> impl FnMut() -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<BoxStream>> + Send>,
    > {
        let mut first = Some(first);
        move || {
            let first = first.take();
            let redial = self.clone();
            Box::pin(async move {
                match first {
                    Some(s) => Ok(s),
                    None => redial.dial(port).await,
                }
            })
        }
    }
}

/// Running pumps.
pub struct Pumps {
    /// Finish when the process's output has been relayed up to end-of-file.
    pub outputs: Vec<JoinHandle<()>>,
    /// Copies host input to the process; aborted when the process exits.
    pub stdin: Option<JoinHandle<()>>,
}

fn set_nonblocking(fd: &OwnedFd) -> Result<()> {
    let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL)
        .map_err(|e| GcsError::Failed(format!("fcntl(F_GETFL): {e}")))?;
    fcntl(
        fd.as_fd(),
        FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK),
    )
    .map_err(|e| GcsError::Failed(format!("fcntl(F_SETFL): {e}")))?;
    Ok(())
}

fn pipe_pair() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| GcsError::Failed(format!("pipe: {e}")))
}

fn dup(fd: &OwnedFd) -> Result<OwnedFd> {
    fd.try_clone()
        .map_err(|e| GcsError::Failed(format!("dup: {e}")))
}

async fn dial(
    transport: &Transport,
    port: u32,
    what: &str,
    timeout: Duration,
) -> Result<Option<BoxStream>> {
    if port == 0 {
        return Ok(None);
    }
    if !bridge::is_valid_stdio_port(port) {
        return Err(GcsError::InvalidArgument(format!(
            "{what} port {port:#x} is outside the stdio port range {:#x}..{:#x}",
            bridge::FIRST_STDIO_PORT,
            u32::MAX
        )));
    }
    transport.dial(port, timeout).await.map(Some).map_err(|e| {
        GcsError::Failed(format!(
            "could not connect {what} to host port {port:#x}: {e}"
        ))
    })
}

/// Dials the host's ports and makes the pipes (or the terminal) for a new process.
pub async fn prepare(
    transport: &Transport,
    ports: StdioPorts,
    tty: bool,
    console_size: Option<[u16; 2]>,
    timeout: Duration,
) -> Result<(ChildStdio, Relays)> {
    let stdin_s = dial(transport, ports.std_in, "stdin", timeout).await?;
    let stdout_s = dial(transport, ports.std_out, "stdout", timeout).await?;
    let stderr_s = dial(transport, ports.std_err, "stderr", timeout).await?;
    let null =
        || super::spawn::dev_null().map_err(|e| GcsError::Failed(format!("open /dev/null: {e}")));

    if tty {
        let size = console_size.map(|[h, w]| nix::pty::Winsize {
            ws_row: h,
            ws_col: w,
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        let pty = nix::pty::openpty(size.as_ref(), None)
            .map_err(|e| GcsError::Failed(format!("openpty: {e}")))?;
        for fd in [&pty.master, &pty.slave] {
            fcntl(
                fd.as_fd(),
                FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(|e| GcsError::Failed(format!("fcntl: {e}")))?;
        }
        set_nonblocking(&pty.master)?;
        if stderr_s.is_some() {
            tracing::debug!(
                "stderr port given for a terminal process: a terminal has one output, sent to stdout"
            );
        }
        let child = ChildStdio {
            stdin: dup(&pty.slave)?,
            stdout: dup(&pty.slave)?,
            stderr: pty.slave,
            controlling_tty: true,
        };
        let mut outputs = Vec::new();
        if let Some(s) = stdout_s {
            outputs.push((dup(&pty.master)?, s, "stdout", ports.std_out));
        }
        let stdin = match stdin_s {
            Some(s) => Some((s, dup(&pty.master)?, ports.std_in)),
            None => None,
        };
        return Ok((
            child,
            Relays {
                stdin,
                outputs,
                pty: Some(Arc::new(pty.master)),
            },
        ));
    }

    let mut outputs = Vec::new();
    let (child_stdin, stdin) = match stdin_s {
        Some(s) => {
            let (r, w) = pipe_pair()?;
            set_nonblocking(&w)?;
            (r, Some((s, w, ports.std_in)))
        }
        None => (null()?, None),
    };
    let mut output =
        |stream: Option<BoxStream>, name: &'static str, port: u32| -> Result<OwnedFd> {
            match stream {
                Some(s) => {
                    let (r, w) = pipe_pair()?;
                    set_nonblocking(&r)?;
                    outputs.push((r, s, name, port));
                    Ok(w)
                }
                None => null(),
            }
        };
    let child_stdout = output(stdout_s, "stdout", ports.std_out)?;
    let child_stderr = output(stderr_s, "stderr", ports.std_err)?;
    Ok((
        ChildStdio {
            stdin: child_stdin,
            stdout: child_stdout,
            stderr: child_stderr,
            controlling_tty: false,
        },
        Relays {
            stdin,
            outputs,
            pty: None,
        },
    ))
}

/// Copies in large batches (see [`transport::read_available`]).
async fn relay<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut from: R,
    to: &mut W,
) -> std::io::Result<u64> {
    let mut buf = vec![0u8; RELAY_BUFFER];
    let mut total = 0;
    loop {
        let n = transport::read_available(&mut from, &mut buf).await?;
        if n == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}

async fn pump_out<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: R,
    mut to: W,
) -> std::io::Result<u64> {
    let n = relay(from, &mut to).await;
    // A terminal reports EIO once the last slave closes: that is its end-of-file.
    let n = match n {
        Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
        other => other,
    };
    to.shutdown().await?;
    n
}

/// Copies a process's output into a resumable stream until the pipe ends: each read lands
/// straight in the stream's window, which the connection sends from.
async fn produce<R: AsyncRead + Unpin>(
    mut from: R,
    to: transport::resumable::Sender,
) -> std::io::Result<()> {
    loop {
        match to.read_from(&mut from).await {
            Ok(0) => break,
            Ok(_) => {}
            // A terminal reports EIO once the last slave closes: its end-of-file.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) => {
                to.finish();
                return Err(e);
            }
        }
    }
    to.finish();
    Ok(())
}

impl Relays {
    /// Starts copying. Call after the process has been spawned (the child's ends are closed
    /// in the agent by then, so end-of-file arrives when the process and its children close
    /// theirs). With `resumable`, the streams survive breaks: output is kept until the host
    /// acknowledges it and each stream re-dials its port after a break.
    pub fn start(self, pid: u32, resumable: Option<Redial>) -> Result<Pumps> {
        let mut outputs = Vec::new();
        for (fd, stream, name, port) in self.outputs {
            let rx = pipe::Receiver::from_owned_fd_unchecked(fd)
                .map_err(|e| GcsError::Failed(format!("register {name} pipe: {e}")))?;
            let task = match &resumable {
                None => tokio::spawn(async move {
                    match pump_out(rx, stream).await {
                        Ok(_) => tracing::trace!(pid, name, "output relayed to end of file"),
                        Err(e) => tracing::warn!(pid, name, error = %e, "output relay ended early"),
                    }
                }),
                Some(redial) => {
                    let (sender, driver) = transport::resumable::sender(redial.window);
                    let connect = redial.clone().connector(port, stream);
                    tokio::spawn(async move {
                        let (produced, delivered) =
                            tokio::join!(produce(rx, sender), driver.run(connect));
                        if let Err(e) = produced {
                            tracing::warn!(pid, name, error = %e, "reading the process's output failed");
                        }
                        match delivered {
                            Ok(()) => tracing::trace!(pid, name, "output delivered to end of file"),
                            Err(e) => tracing::warn!(pid, name, error = %e, "output abandoned"),
                        }
                    })
                }
            };
            outputs.push(task);
        }
        let stdin = match self.stdin {
            Some((stream, fd, port)) => {
                let mut tx = pipe::Sender::from_owned_fd_unchecked(fd)
                    .map_err(|e| GcsError::Failed(format!("register stdin pipe: {e}")))?;
                Some(match &resumable {
                    None => tokio::spawn(async move {
                        let mut stream = stream;
                        match tokio::io::copy(&mut stream, &mut tx).await {
                            Ok(_) => tracing::trace!(pid, "stdin reached end of file"),
                            Err(e) => tracing::debug!(pid, error = %e, "stdin relay ended"),
                        }
                        // Dropping the write end gives the process end-of-file.
                    }),
                    Some(redial) => {
                        let connect = redial.clone().connector(port, stream);
                        tokio::spawn(async move {
                            let mut receiver = transport::resumable::Receiver::new(0);
                            if let Err(e) = receiver.run(connect, &mut tx).await {
                                tracing::debug!(pid, error = %e, "stdin relay ended");
                            }
                        })
                    }
                })
            }
            None => None,
        };
        Ok(Pumps { outputs, stdin })
    }
}
