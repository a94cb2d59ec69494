//! Captured output. Each stdout/stderr of a process is copied into a log file as it arrives;
//! attached clients, `ferry logs` and `ferry logs --follow` all read the file from an offset and
//! wait for more. The file is the buffer: a slow or absent client never blocks the process,
//! and output produced while nobody was attached is still there.

use crate::control::{self, MAX_PAYLOAD};
use host::OutputPipe;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::AsyncWrite;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes in the file so far.
    pub written: u64,
    /// The stream has ended: no more bytes will come.
    pub done: bool,
}

/// Appends to the log file and tells followers. Page-cache writes: fast enough to do inline.
struct LogSink {
    file: File,
    log: Arc<OutputLog>,
}

impl AsyncWrite for LogSink {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let n = match self.file.write(buf) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(path = %self.log.path.display(), error = %e, "cannot write captured output");
                return std::task::Poll::Ready(Err(e));
            }
        };
        self.log.progress.send_modify(|p| p.written += n as u64);
        std::task::Poll::Ready(Ok(n))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

pub struct OutputLog {
    path: PathBuf,
    progress: watch::Sender<Progress>,
}

impl OutputLog {
    /// Starts copying the process's output into the file at `path`: a new file, or with
    /// `append` the existing one (a restored shim continues the log its predecessor wrote).
    pub fn capture(path: &Path, pipe: OutputPipe, append: bool) -> std::io::Result<Arc<OutputLog>> {
        let file = if append {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?
        } else {
            File::create(path)?
        };
        let written = file.metadata()?.len();
        let log = Arc::new(OutputLog {
            path: path.to_path_buf(),
            progress: watch::channel(Progress {
                written,
                done: false,
            })
            .0,
        });
        let l = log.clone();
        tokio::spawn(async move {
            let mut sink = LogSink {
                file,
                log: l.clone(),
            };
            if let Err(e) = pipe.copy_to(&mut sink).await {
                tracing::warn!(path = %l.path.display(), error = %e, "output stream failed");
            }
            l.progress.send_modify(|p| p.done = true);
        });
        Ok(log)
    }

    /// A finished log (a process that exited before a restore).
    pub fn existing(path: &Path) -> Arc<OutputLog> {
        let written = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Arc::new(OutputLog {
            path: path.to_path_buf(),
            progress: watch::channel(Progress {
                written,
                done: true,
            })
            .0,
        })
    }

    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// Resolves once the stream has ended and everything is in the file.
    pub async fn finished(&self) {
        let _ = self.progress.subscribe().wait_for(|p| p.done).await;
    }

    /// Sends the file's bytes from `offset` as frames tagged `tag`; with `follow`, keeps going
    /// until the stream has ended, otherwise stops at what was written when called. Returns the
    /// offset reached.
    pub async fn send_from<W: AsyncWrite + Unpin>(
        &self,
        mut offset: u64,
        follow: bool,
        tag: u8,
        out: &tokio::sync::Mutex<W>,
    ) -> std::io::Result<u64> {
        let file = File::open(&self.path)?;
        let mut rx = self.progress.subscribe();
        let stop_at = self.progress().written;
        let mut buf = vec![0u8; MAX_PAYLOAD];
        loop {
            let p = *rx.borrow_and_update();
            let limit = if follow { p.written } else { stop_at };
            while offset < limit {
                let want = ((limit - offset) as usize).min(buf.len());
                let n = file.read_at(&mut buf[..want], offset)?;
                if n == 0 {
                    break;
                }
                control::write_frame(&mut *out.lock().await, tag, &buf[..n]).await?;
                offset += n as u64;
            }
            if !follow || (p.done && offset >= p.written) {
                return Ok(offset);
            }
            if rx.changed().await.is_err() {
                return Ok(offset);
            }
        }
    }
}
