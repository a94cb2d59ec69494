//! Running a process with the caller's streams: [`Command`] starts one, [`attach`] binds the
//! same relays to a process that already exists (the restore side's twin of starting).
//!
//! Relays copy caller stdin → process stdin (half-closing it when the caller's input ends) and
//! process stdout/stderr → caller writers, flushing everything written before the exit.

use crate::container::{Container, Pipes};
use crate::error::{HostError, Result};
use crate::process::Process;
use bridge::message::ProcessParameters;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;

pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// How long output may keep arriving after the exit before the relays are abandoned.
pub const OUTPUT_GRACE: Duration = Duration::from_secs(10);

/// The caller's ends.
#[derive(Default)]
pub struct Streams {
    pub stdin: Option<Reader>,
    pub stdout: Option<Writer>,
    pub stderr: Option<Writer>,
}

/// A process to start: parameters plus the caller's streams.
pub struct Command {
    params: ProcessParameters,
    streams: Streams,
}

impl Command {
    pub fn new(params: ProcessParameters) -> Command {
        Command {
            params,
            streams: Streams::default(),
        }
    }

    pub fn stdin(mut self, r: impl AsyncRead + Send + Unpin + 'static) -> Self {
        self.streams.stdin = Some(Box::new(r));
        self
    }

    pub fn stdout(mut self, w: impl AsyncWrite + Send + Unpin + 'static) -> Self {
        self.streams.stdout = Some(Box::new(w));
        self
    }

    pub fn stderr(mut self, w: impl AsyncWrite + Send + Unpin + 'static) -> Self {
        self.streams.stderr = Some(Box::new(w));
        self
    }

    /// Starts the process with a pipe for each stream given, and the relays.
    pub async fn start(self, container: &Container) -> Result<Running> {
        let pipes = Pipes {
            stdin: self.streams.stdin.is_some(),
            stdout: self.streams.stdout.is_some(),
            stderr: self.streams.stderr.is_some(),
        };
        let process = Arc::new(container.create_process(self.params, pipes).await?);
        Ok(attach(process, self.streams))
    }

    /// Starts, waits, and returns the exit code; if `cancel` resolves first, kills the process
    /// and returns its (killed) exit code.
    pub async fn run(
        self,
        container: &Container,
        cancel: impl std::future::Future<Output = ()>,
    ) -> Result<i32> {
        let running = self.start(container).await?;
        running.wait_or_kill(cancel).await
    }
}

/// A process with relays running.
pub struct Running {
    process: Arc<Process>,
    outputs: Vec<JoinHandle<std::io::Result<u64>>>,
    stdin: Option<JoinHandle<std::io::Result<u64>>>,
}

/// Binds relays between the caller's streams and an existing process's pipes. A stream the
/// process has no pipe for is ignored (and a writer gets no output).
pub fn attach(process: Arc<Process>, streams: Streams) -> Running {
    let mut outputs = Vec::new();
    for (pipe, sink) in [
        (process.take_stdout(), streams.stdout),
        (process.take_stderr(), streams.stderr),
    ] {
        if let (Some(pipe), Some(mut to)) = (pipe, sink) {
            outputs.push(tokio::spawn(async move { pipe.copy_to(&mut to).await }));
        }
    }
    let stdin = match (process.take_stdin(), streams.stdin) {
        (Some(mut to), Some(mut from)) => Some(tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 64 * 1024];
            let mut n = 0u64;
            loop {
                let got = from.read(&mut buf).await?;
                if got == 0 {
                    break;
                }
                to.write_all(&buf[..got]).await?;
                n += got as u64;
            }
            // End of input: the process sees end-of-file, its output can still come back.
            to.close().await?;
            Ok(n)
        })),
        _ => None,
    };
    Running {
        process,
        outputs,
        stdin,
    }
}

impl Running {
    pub fn process(&self) -> &Arc<Process> {
        &self.process
    }

    /// Waits for the exit, then for the output relays to deliver everything written before
    /// it. Returns the exit code.
    pub async fn wait(mut self) -> Result<i32> {
        let code = self.process.wait().await;
        self.finish().await?;
        code
    }

    /// Like [`Running::wait`], but kills the process if `cancel` resolves first.
    pub async fn wait_or_kill(self, cancel: impl std::future::Future<Output = ()>) -> Result<i32> {
        tokio::select! {
            biased;
            _ = self.process.wait() => {}
            _ = cancel => {
                tracing::info!(pid = self.process.pid(), "cancelled: killing the process");
                if let Err(e) = self.process.kill().await
                    && !e.is_not_found()
                {
                    return Err(e);
                }
            }
        }
        self.wait().await
    }

    async fn finish(&mut self) -> Result<()> {
        if let Some(stdin) = self.stdin.take() {
            stdin.abort();
        }
        let outputs = std::mem::take(&mut self.outputs);
        let drained = async {
            for h in outputs {
                match h.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(HostError::Io(format!("output relay: {e}"))),
                    Err(e) => return Err(HostError::Io(format!("output relay task: {e}"))),
                }
            }
            Ok(())
        };
        match tokio::time::timeout(OUTPUT_GRACE, drained).await {
            Ok(r) => r,
            Err(_) => Err(HostError::Timeout(format!(
                "output of process {} still open {OUTPUT_GRACE:?} after it exited",
                self.process.pid()
            ))),
        }
    }
}
