//! A task's standard streams: the FIFOs (or files) containerd names, joined to the ferry
//! shim's streaming session for the process.
//!
//! containerd's client opens its ends of the FIFOs asynchronously, around the time it asks for
//! the task, so the shim opens its ends blocking (on a blocking thread, bounded) and then hands
//! them to the runtime.

use crate::client::Session;
use crate::control::{self, tag};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::unix::pipe;
use tokio::sync::Mutex;

/// The paths containerd gave for one process (empty: none).
#[derive(Debug, Clone, Default)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    pub fn of(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> StdioPaths {
        StdioPaths {
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal,
        }
    }

    /// What the process needs from these: a terminal, and a stdin pipe when there is input.
    pub fn apply_to(&self, spec: &mut crate::control::ProcessSpec) {
        spec.tty = self.terminal;
        spec.stdin = !self.stdin.is_empty();
    }
}

/// An output destination.
pub enum Output {
    Pipe(pipe::Sender),
    File(tokio::fs::File),
    /// No path given, or the reader went away: output is dropped (the shim's log keeps it).
    Discard,
}

impl Output {
    /// Opens `uri`: a FIFO path, a plain file path or `file://PATH` (appended to).
    pub async fn open(uri: &str) -> Result<Output, String> {
        if uri.is_empty() {
            return Ok(Output::Discard);
        }
        let path = match uri.split_once("://") {
            None => PathBuf::from(uri),
            Some(("file", p)) => PathBuf::from(p),
            Some((scheme, _)) => {
                return Err(format!(
                    "stdio {uri:?}: the ferry runtime takes FIFOs and file:// paths, not {scheme}://"
                ));
            }
        };
        let shown = path.display().to_string();
        if is_fifo(&path) {
            return open_fifo_writer(path).await;
        }
        let file = tokio::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .await
            .map_err(|e| format!("opening {shown}: {e}"))?;
        Ok(Output::File(file))
    }

    async fn write(&mut self, data: &[u8]) {
        let result = match self {
            Output::Pipe(p) => p.write_all(data).await,
            Output::File(f) => f.write_all(data).await,
            Output::Discard => return,
        };
        if let Err(e) = result {
            // The reader is gone (the client detached): keep relaying so the exit is seen.
            tracing::debug!(error = %e, "task output reader gone; dropping output from now on");
            *self = Output::Discard;
        }
    }
}

/// How long a task's output FIFO may wait for containerd's client to open its read end
/// (which it does asynchronously, around the time it asks for the start).
const READER_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens a FIFO for writing once its reader is there; with no reader within
/// [`READER_PATIENCE`], output is dropped (the shim's log keeps it).
async fn open_fifo_writer(path: PathBuf) -> Result<Output, String> {
    let shown = path.display().to_string();
    let blocking = path.clone();
    let open = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new().write(true).open(&blocking)
    });
    match tokio::time::timeout(READER_PATIENCE, open).await {
        Ok(Ok(Ok(file))) => pipe::Sender::from_file(file)
            .map(Output::Pipe)
            .map_err(|e| format!("opening {shown}: {e}")),
        Ok(Ok(Err(e))) => Err(format!("opening {shown}: {e}")),
        Ok(Err(e)) => Err(format!("opening {shown}: {e}")),
        Err(_) => {
            // Be the reader ourselves for a moment, so the blocked open returns (and its
            // thread with it).
            let _ = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&path);
            tracing::warn!(fifo = %shown, "no reader on the task's output FIFO; output goes to ferry's log only");
            Ok(Output::Discard)
        }
    }
}

fn is_fifo(path: &std::path::Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// Opens the process's input FIFO once containerd's client has its end open.
async fn open_input(path: String) -> Result<pipe::Receiver, String> {
    let shown = path.clone();
    let file =
        tokio::task::spawn_blocking(move || std::fs::OpenOptions::new().read(true).open(&path))
            .await
            .map_err(|e| format!("opening {shown}: {e}"))?
            .map_err(|e| format!("opening {shown}: {e}"))?;
    pipe::Receiver::from_file(file).map_err(|e| format!("opening {shown}: {e}"))
}

/// Sends control frames (input, end of input, resizes) to the process through its session.
#[derive(Clone)]
pub struct Control {
    w: Arc<Mutex<OwnedWriteHalf>>,
    /// Set by [`Control::close_stdin`]: the input relay sends what the FIFO holds, then ends.
    close: Arc<tokio::sync::Notify>,
}

impl Control {
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), String> {
        let mut p = rows.to_le_bytes().to_vec();
        p.extend_from_slice(&cols.to_le_bytes());
        control::write_frame(&mut *self.w.lock().await, tag::RESIZE, &p)
            .await
            .map_err(|e| format!("resize: lost the ferry shim: {e}"))
    }

    /// Ends the process's input (containerd's CloseIO). containerd's client asks once it has
    /// written all its input, which may still sit in the FIFO: that is delivered first.
    pub fn close_stdin(&self) {
        self.close.notify_one();
    }
}

/// Relays the input FIFO at `path` to the process until its end, or until `close` (then
/// what the FIFO already holds is sent, and no more).
async fn relay_input(path: String, w: Arc<Mutex<OwnedWriteHalf>>, close: Arc<tokio::sync::Notify>) {
    let mut input = match open_input(path).await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "task input unavailable");
            let _ = control::write_frame(&mut *w.lock().await, tag::STDIN_EOF, &[]).await;
            return;
        }
    };
    let mut buf = vec![0u8; 32 * 1024];
    let mut closing = false;
    loop {
        let n = if closing {
            // Nothing more buffered (WouldBlock) ends the input, as an error does.
            input.try_read(&mut buf).unwrap_or(0)
        } else {
            tokio::select! {
                r = input.read(&mut buf) => r.unwrap_or(0),
                _ = close.notified() => {
                    closing = true;
                    continue;
                }
            }
        };
        if n == 0 {
            break;
        }
        if control::write_frame(&mut *w.lock().await, tag::STDIN, &buf[..n])
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = control::write_frame(&mut *w.lock().await, tag::STDIN_EOF, &[]).await;
}

/// How a relayed process ended.
pub enum Ended {
    Exit(i32),
    /// The session ended without an exit code (the reason).
    Lost(String),
}

/// Starts relaying `session` to and from the paths; returns the control handle and the relay,
/// which resolves when the process has exited and its output has been written.
pub fn relay(
    session: Session,
    outputs: (Output, Output),
    stdin: Option<String>,
) -> (Control, tokio::task::JoinHandle<Ended>) {
    let (mut r, w) = session;
    let w = Arc::new(Mutex::new(w));
    let close = Arc::new(tokio::sync::Notify::new());
    let stdin_task = stdin.map(|path| tokio::spawn(relay_input(path, w.clone(), close.clone())));
    let control = Control { w, close };
    let relay = tokio::spawn(async move {
        let (mut out, mut err) = outputs;
        let mut data = Vec::with_capacity(control::MAX_PAYLOAD);
        let ended = loop {
            let t = match control::read_frame_into(&mut r, &mut data).await {
                Ok(Some(t)) => t,
                Ok(None) => break Ended::Lost("lost the ferry shim: end of stream".into()),
                Err(e) => break Ended::Lost(format!("lost the ferry shim: {e}")),
            };
            match t {
                tag::STDOUT => out.write(&data).await,
                tag::STDERR => err.write(&data).await,
                tag::DROPPED => {
                    tracing::warn!("output beyond the UVM's log limit was dropped");
                }
                tag::EXIT if data.len() == 4 => {
                    break Ended::Exit(i32::from_le_bytes([data[0], data[1], data[2], data[3]]));
                }
                tag::ERROR => break Ended::Lost(String::from_utf8_lossy(&data).into_owned()),
                t => break Ended::Lost(format!("unexpected frame {t} from the ferry shim")),
            }
        };
        if let Some(t) = stdin_task {
            t.abort();
        }
        ended
    });
    (control, relay)
}
