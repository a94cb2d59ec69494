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

/// The child's ends, ready for spawning.
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub controlling_tty: bool,
}

/// The agent's ends, pumped once the process has started.
pub struct Relays {
    stdin: Option<(BoxStream, OwnedFd)>,
    outputs: Vec<(OwnedFd, BoxStream, &'static str)>,
    pub pty: Option<Arc<OwnedFd>>,
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
            outputs.push((dup(&pty.master)?, s, "stdout"));
        }
        let stdin = match stdin_s {
            Some(s) => Some((s, dup(&pty.master)?)),
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
            (r, Some((s, w)))
        }
        None => (null()?, None),
    };
    let mut output = |stream: Option<BoxStream>, name: &'static str| -> Result<OwnedFd> {
        match stream {
            Some(s) => {
                let (r, w) = pipe_pair()?;
                set_nonblocking(&r)?;
                outputs.push((r, s, name));
                Ok(w)
            }
            None => null(),
        }
    };
    let child_stdout = output(stdout_s, "stdout")?;
    let child_stderr = output(stderr_s, "stderr")?;
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

async fn pump_out<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut from: R,
    mut to: W,
) -> std::io::Result<u64> {
    let n = tokio::io::copy(&mut from, &mut to).await;
    // A terminal reports EIO once the last slave closes: that is its end-of-file.
    let n = match n {
        Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
        other => other,
    };
    to.shutdown().await?;
    n
}

impl Relays {
    /// Starts copying. Call after the process has been spawned (the child's ends are closed
    /// in the agent by then, so end-of-file arrives when the process and its children close
    /// theirs).
    pub fn start(self, pid: u32) -> Result<Pumps> {
        let mut outputs = Vec::new();
        for (fd, stream, name) in self.outputs {
            let rx = pipe::Receiver::from_owned_fd_unchecked(fd)
                .map_err(|e| GcsError::Failed(format!("register {name} pipe: {e}")))?;
            outputs.push(tokio::spawn(async move {
                match pump_out(rx, stream).await {
                    Ok(_) => tracing::trace!(pid, name, "output relayed to end of file"),
                    Err(e) => tracing::warn!(pid, name, error = %e, "output relay ended early"),
                }
            }));
        }
        let stdin = match self.stdin {
            Some((mut stream, fd)) => {
                let mut tx = pipe::Sender::from_owned_fd_unchecked(fd)
                    .map_err(|e| GcsError::Failed(format!("register stdin pipe: {e}")))?;
                Some(tokio::spawn(async move {
                    match tokio::io::copy(&mut stream, &mut tx).await {
                        Ok(_) => tracing::trace!(pid, "stdin reached end of file"),
                        Err(e) => tracing::debug!(pid, error = %e, "stdin relay ended"),
                    }
                    // Dropping the write end gives the process end-of-file.
                }))
            }
            None => None,
        };
        Ok(Pumps { outputs, stdin })
    }
}
