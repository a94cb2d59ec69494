//! The host ends of a process's stdio pipes.
//!
//! With a guest that offers ferry's resumable stdio, each pipe is a resumable stream: the
//! port stays listened on, the guest dials again after any break, and both sides resume at the
//! exact byte. With a plain hcsshim guest, each pipe is one raw connection.

use std::io;
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Mutex;
use transport::resumable::{self, Receiver};
use transport::{BoxStream, Listener};

type Connect = Box<
    dyn FnMut()
            -> std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<BoxStream>> + Send>>
        + Send,
>;

/// Connections for one port: the first one already accepted, then whatever the guest dials.
fn connector(listener: Listener, first: Option<BoxStream>) -> Connect {
    let listener = Arc::new(Mutex::new(listener));
    let mut first = first;
    Box::new(move || {
        let first = first.take();
        let listener = listener.clone();
        Box::pin(async move {
            match first {
                Some(s) => Ok(s),
                None => listener
                    .lock()
                    .await
                    .accept()
                    .await
                    .map_err(|e| io::Error::new(io::ErrorKind::NotConnected, e.to_string())),
            }
        })
    })
}

/// A process's stdout or stderr.
pub enum OutputPipe {
    Raw(BoxStream),
    Resumable {
        listener: Listener,
        first: Option<BoxStream>,
        /// Bytes the host already has (0 for a new process; a log's length after a restore).
        received: u64,
    },
}

impl OutputPipe {
    /// Copies the process's output into `sink` until its end — across any number of guest
    /// reconnections for a resumable pipe. Returns the total offset reached.
    pub async fn copy_to<W: AsyncWrite + Unpin>(self, sink: &mut W) -> io::Result<u64> {
        match self {
            OutputPipe::Raw(mut s) => {
                let n = tokio::io::copy(&mut s, sink).await?;
                sink.flush().await?;
                Ok(n)
            }
            OutputPipe::Resumable {
                listener,
                first,
                received,
            } => {
                let mut receiver = Receiver::new(received);
                receiver.run(connector(listener, first), sink).await?;
                Ok(receiver.received())
            }
        }
    }
}

impl OutputPipe {
    /// Like [`OutputPipe::copy_to`], reading straight into a sink's space (no copy between).
    pub async fn copy_into<S: resumable::SpaceSink + ?Sized>(
        self,
        sink: &mut S,
    ) -> io::Result<u64> {
        match self {
            OutputPipe::Raw(mut s) => {
                let mut total = 0;
                loop {
                    match resumable::read_into(&mut s, sink, usize::MAX).await? {
                        0 => break,
                        n => total += n as u64,
                    }
                }
                sink.flush()?;
                Ok(total)
            }
            OutputPipe::Resumable {
                listener,
                first,
                received,
            } => {
                let mut receiver = Receiver::new(received);
                receiver.run_into(connector(listener, first), sink).await?;
                Ok(receiver.received())
            }
        }
    }
}

/// A process's stdin.
pub enum InputPipe {
    Raw(BoxStream),
    Resumable {
        sender: resumable::Sender,
        delivery: tokio::task::JoinHandle<io::Result<()>>,
    },
}

/// Where a resumable stdin stood when saved: what the guest acknowledged, the bytes sent
/// after that (the guest may not have them), and whether the input was closed.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StdinState {
    pub acked: u64,
    #[serde(with = "hex_bytes", default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<u8>,
    #[serde(default)]
    pub closed: bool,
}

/// Bytes as a hex string: a quarter of the size of a JSON array of numbers.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        if text.len() % 2 != 0 {
            return Err(D::Error::custom("hex string of odd length"));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| {
                // from_str_radix alone would take a sign ("+f" as 0x0f).
                text.get(i..i + 2)
                    .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| D::Error::custom("not a hex string"))
            })
            .collect()
    }
}

impl InputPipe {
    /// A resumable stdin on `listener`; `first` is a connection already accepted (none when
    /// restoring: the guest dials again). With `saved`, the stream continues where a previous
    /// host left it.
    pub fn resumable(
        listener: Listener,
        first: Option<BoxStream>,
        saved: Option<StdinState>,
    ) -> InputPipe {
        let saved = saved.unwrap_or_default();
        let (sender, driver) = resumable::sender_resuming(
            resumable::DEFAULT_WINDOW,
            saved.acked,
            saved.pending,
            saved.closed,
        );
        let delivery = tokio::spawn(driver.run(connector(listener, first)));
        InputPipe::Resumable { sender, delivery }
    }

    /// Ends a resumable stdin's delivery when aborted, wherever the pipe is by then (held,
    /// in a client's hands, or closed and delivering in the background). For when the
    /// process has exited: the rest will never be read, and the delivery would otherwise wait
    /// for ever, with its port and buffer, for the guest to dial again. None for a raw pipe.
    pub fn delivery_abort_handle(&self) -> Option<tokio::task::AbortHandle> {
        match self {
            InputPipe::Raw(_) => None,
            InputPipe::Resumable { delivery, .. } => Some(delivery.abort_handle()),
        }
    }

    /// A handle on a resumable stdin's state, for saving it (None for a raw pipe).
    pub fn state_handle(&self) -> Option<StdinHandle> {
        match self {
            InputPipe::Raw(_) => None,
            InputPipe::Resumable { sender, .. } => Some(StdinHandle(sender.clone())),
        }
    }

    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            InputPipe::Raw(s) => s.write_all(data).await,
            InputPipe::Resumable { sender, .. } => sender.write_all(data).await,
        }
    }

    /// Ends the input: the process sees end-of-file once everything before has arrived.
    pub async fn close(self) -> io::Result<()> {
        match self {
            InputPipe::Raw(mut s) => s.shutdown().await,
            InputPipe::Resumable { sender, delivery } => {
                sender.finish();
                // Delivery goes on in the background (across reconnections if need be).
                drop(delivery);
                Ok(())
            }
        }
    }
}

/// Reads a resumable stdin's state while the pipe itself is in use elsewhere.
#[derive(Clone)]
pub struct StdinHandle(resumable::Sender);

impl StdinHandle {
    pub fn state(&self) -> StdinState {
        let (acked, pending) = self.0.pending();
        StdinState {
            acked,
            pending,
            closed: self.0.is_finished(),
        }
    }
}

/// Listens again on a restored process's saved stdio ports (resumable streams: the guest dials
/// them again and each resumes at the offset the host holds).
pub async fn reopen(
    transport: &transport::Transport,
    state: &crate::MigrationState,
    stdout_offset: u64,
    stderr_offset: u64,
    stdin: Option<StdinState>,
) -> crate::Result<crate::process::ProcessIo> {
    let mut io = crate::process::ProcessIo::default();
    if state.stdin_port != 0 {
        io.stdin = Some(InputPipe::resumable(
            transport.listen(state.stdin_port).await?,
            None,
            stdin,
        ));
    }
    if state.stdout_port != 0 {
        io.stdout = Some(OutputPipe::Resumable {
            listener: transport.listen(state.stdout_port).await?,
            first: None,
            received: stdout_offset,
        });
    }
    if state.stderr_port != 0 {
        io.stderr = Some(OutputPipe::Resumable {
            listener: transport.listen(state.stderr_port).await?,
            first: None,
            received: stderr_offset,
        });
    }
    Ok(io)
}

#[cfg(test)]
mod hex_tests {
    use super::StdinState;

    #[test]
    fn pending_input_is_strict_hex() {
        let ok: StdinState =
            serde_json::from_value(serde_json::json!({"acked": 2, "pending": "0aff"}))
                .expect("plain hex");
        assert_eq!(ok.pending, [0x0a, 0xff]);
        for bad in ["+f", "-1", "0g", "abc"] {
            let r: Result<StdinState, _> =
                serde_json::from_value(serde_json::json!({"acked": 2, "pending": bad}));
            assert!(r.is_err(), "{bad:?} must not decode");
        }
    }
}
