//! A streaming control session: a process's captured output sent to the client as frames,
//! the client's input, resizes and signals sent to the process, and the exit code last.

use super::state::ProcRec;
use crate::control::{self, tag};
use host::InputPipe;
use std::sync::Arc;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

pub struct StreamPlan {
    pub rec: Arc<ProcRec>,
    /// Where in the output to start.
    pub from: StartAt,
    /// Keep streaming until the process's output ends; otherwise stop at what exists now.
    pub follow: bool,
    /// Feed the client's input to the process's stdin.
    pub stdin: bool,
    /// The client is attached to the process (`run`, `attach`): the log waits for it rather
    /// than drop output it has not received.
    pub attached: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum StartAt {
    /// From the beginning (logs, a new process).
    Beginning,
    /// From these offsets (an attach: what comes next, or where a client whose shim was
    /// replaced had got to).
    Offsets(control::LogOffsets),
}

pub async fn run(plan: StreamPlan, r: BufReader<OwnedReadHalf>, w: OwnedWriteHalf) {
    let rec = plan.rec;
    let out = tokio::sync::Mutex::new(w);
    let stdin = if plan.stdin {
        rec.stdin.lock().await.take()
    } else {
        None
    };
    let mut input = tokio::spawn(input_loop(r, stdin, rec.clone()));

    let send = |log: Option<Arc<super::output::OutputLog>>, t: u8| {
        let out = &out;
        async move {
            let Some(log) = log else { return Ok(0) };
            let from = match plan.from {
                StartAt::Beginning => 0,
                StartAt::Offsets(o) if t == tag::STDOUT => o.stdout,
                StartAt::Offsets(o) => o.stderr,
            };
            // A client attached to the process (not one reading logs) gets every byte.
            log.send_from(from, plan.follow, plan.attached, t, out)
                .await
        }
    };
    let sent = tokio::join!(
        send(rec.stdout.clone(), tag::STDOUT),
        send(rec.stderr.clone(), tag::STDERR)
    );
    let client_gone = sent.0.is_err() || sent.1.is_err();

    // What the input loop handed back, once it has ended (a JoinHandle must not be polled
    // again after it completed).
    let mut returned = None;
    if plan.follow && !client_gone {
        let exit = tokio::select! {
            e = rec.wait() => Some(e),
            // The client went away before the exit: nothing more to tell it.
            r = &mut input => {
                returned = Some(r);
                None
            }
        };
        let mut w = out.lock().await;
        let _ = match exit {
            Some(Ok(code)) => control::write_frame(&mut *w, tag::EXIT, &code.to_le_bytes()).await,
            Some(Err(e)) => control::write_frame(&mut *w, tag::ERROR, e.as_bytes()).await,
            None => Ok(()),
        };
        let _ = w.shutdown().await;
    } else {
        let _ = out.lock().await.shutdown().await;
    }

    // Give an unfinished stdin back for the next attach: the client detached, it did not close
    // the process's input.
    let returned = match returned {
        Some(r) => r,
        None => {
            if !input.is_finished() {
                input.abort();
            }
            input.await
        }
    };
    if let Ok(Some(stream)) = returned
        && rec.exit_state().is_none()
    {
        *rec.stdin.lock().await = Some(stream);
    }
}

/// Lets the capture go on without waiting for this client once the session ends (it pins its
/// own place while it streams).
pub struct ReleaseHolds(pub Arc<ProcRec>);

impl Drop for ReleaseHolds {
    fn drop(&mut self) {
        for log in [&self.0.stdout, &self.0.stderr].into_iter().flatten() {
            log.release_hold();
        }
    }
}

/// Applies the client's frames; returns the stdin pipe if the client left without closing it.
async fn input_loop(
    mut r: BufReader<OwnedReadHalf>,
    mut stdin: Option<InputPipe>,
    rec: Arc<ProcRec>,
) -> Option<InputPipe> {
    loop {
        let (t, payload) = match control::read_frame(&mut r).await {
            Ok(Some(f)) => f,
            Ok(None) | Err(_) => return stdin,
        };
        match t {
            tag::STDIN => {
                if let Some(s) = stdin.as_mut()
                    && let Err(e) = s.write_all(&payload).await
                {
                    tracing::debug!(pid = rec.pid, error = %e, "stdin write failed");
                    stdin = None;
                }
            }
            tag::STDIN_EOF => {
                if let Some(s) = stdin.take() {
                    let _ = s.close().await;
                }
            }
            tag::RESIZE if payload.len() == 4 => {
                let rows = u16::from_le_bytes([payload[0], payload[1]]);
                let cols = u16::from_le_bytes([payload[2], payload[3]]);
                if let Err(e) = rec.process.resize(rows, cols).await {
                    tracing::debug!(pid = rec.pid, error = %e, "resize failed");
                }
            }
            tag::SIGNAL if payload.len() == 4 => {
                let sig = i32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if let Err(e) = rec.process.signal(sig).await {
                    tracing::debug!(pid = rec.pid, error = %e, "signal failed");
                }
            }
            other => tracing::warn!(tag = other, "unexpected control frame; ignored"),
        }
    }
}
