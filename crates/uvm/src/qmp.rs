//! A QMP client: JSON objects, one per line, over QEMU's control socket. After the greeting
//! the client sends `qmp_capabilities`; then each command gets a `return` or an `error`, and
//! events (`{"event": ...}`) may arrive in between; they are kept for whoever asks.

use crate::{Result, UvmError};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

/// Longest line accepted from QEMU (a `query-*` answer is a few KiB).
const MAX_LINE: u64 = 1 << 20;
/// Events kept until read; older ones are dropped.
const MAX_EVENTS: usize = 256;
/// Bound on each command (QEMU answers at once; a long-running job reports by events).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    events: VecDeque<Value>,
    /// A message read in part by a wait that was given up (a timeout): kept, so that the
    /// next read goes on from there instead of losing the stream's framing.
    partial: Vec<u8>,
}

fn err(what: impl Into<String>) -> UvmError {
    UvmError::Qmp(what.into())
}

impl Qmp {
    /// Takes over a connected socket: reads the greeting, negotiates capabilities.
    pub async fn handshake(stream: UnixStream) -> Result<Qmp> {
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
            events: VecDeque::new(),
            partial: Vec::new(),
        };
        let greeting = tokio::time::timeout(COMMAND_TIMEOUT, qmp.read_message())
            .await
            .map_err(|_| err("no greeting from QEMU"))??;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("unexpected greeting: {greeting}")));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    pub async fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| UvmError::io(format!("connect to QMP at {}", path.display()), e))?;
        Qmp::handshake(stream).await
    }

    /// Reads one message. Cancel-safe: bytes read before a cancellation stay in `partial`.
    async fn read_message(&mut self) -> Result<Value> {
        let room = MAX_LINE.saturating_sub(self.partial.len() as u64);
        let n = (&mut self.reader)
            .take(room)
            .read_until(b'\n', &mut self.partial)
            .await
            .map_err(|e| UvmError::io("read from QMP", e))?;
        let line = std::mem::take(&mut self.partial);
        if n == 0 {
            return Err(err("QEMU closed the QMP connection"));
        }
        if line.last() != Some(&b'\n') {
            return Err(err(format!("QMP message longer than {MAX_LINE} bytes")));
        }
        serde_json::from_slice(&line).map_err(|e| err(format!("bad QMP message: {e}")))
    }

    /// Runs a command; returns its `return` value, or its error as [`UvmError::Qmp`].
    pub async fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": command, "id": id});
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut bytes = serde_json::to_vec(&msg).map_err(|e| err(e.to_string()))?;
        bytes.push(b'\n');
        let exchange = async {
            self.writer
                .write_all(&bytes)
                .await
                .map_err(|e| UvmError::io(format!("send {command} to QMP"), e))?;
            loop {
                let m = self.read_message().await?;
                if m.get("event").is_some() {
                    if self.events.len() == MAX_EVENTS {
                        self.events.pop_front();
                    }
                    self.events.push_back(m);
                    continue;
                }
                if m.get("id").and_then(Value::as_u64) != Some(id) {
                    tracing::debug!(message = %m, "QMP answer to another command; ignored");
                    continue;
                }
                if let Some(e) = m.get("error") {
                    let class = e.get("class").and_then(Value::as_str).unwrap_or("Error");
                    let desc = e.get("desc").and_then(Value::as_str).unwrap_or("");
                    return Err(err(format!("{command}: {class}: {desc}")));
                }
                return Ok(m.get("return").cloned().unwrap_or(Value::Null));
            }
        };
        tokio::time::timeout(COMMAND_TIMEOUT, exchange)
            .await
            .map_err(|_| err(format!("{command}: no answer within {COMMAND_TIMEOUT:?}")))?
    }

    /// Events received so far (and clears them).
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// Takes the first event received so far that `matches` accepts; other events are kept.
    pub fn take_event(&mut self, matches: impl Fn(&Value) -> bool) -> Option<Value> {
        let i = self.events.iter().position(matches)?;
        self.events.remove(i)
    }

    /// Waits at most `timeout` for an event `matches` accepts; `None` when none came (a
    /// poll that an event can cut short).
    pub async fn next_event_within(
        &mut self,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        self.wait_event(timeout, matches).await.ok()
    }

    /// Waits for an event `matches` accepts (one already received counts, and is taken);
    /// other events are kept.
    pub async fn wait_event(
        &mut self,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        if let Some(i) = self.events.iter().position(&matches) {
            return Ok(self.events.remove(i).unwrap_or_default());
        }
        let wait = async {
            loop {
                let m = self.read_message().await?;
                if m.get("event").is_none() {
                    tracing::debug!(message = %m, "QMP answer while waiting for an event; ignored");
                    continue;
                }
                if matches(&m) {
                    return Ok(m);
                }
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(m);
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| err(format!("the awaited event did not come within {timeout:?}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted QMP server on a socket pair.
    #[tokio::test]
    async fn handshake_command_event_and_error() {
        let (client, server) = UnixStream::pair().unwrap();
        let server = tokio::spawn(async move {
            let (r, mut w) = server.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .unwrap();
            let caps: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(caps["execute"], "qmp_capabilities");
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", caps["id"]).as_bytes())
                .await
                .unwrap();
            let stop: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(stop["execute"], "stop");
            w.write_all(b"{\"event\": \"STOP\", \"timestamp\": {}}\n")
                .await
                .unwrap();
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", stop["id"]).as_bytes())
                .await
                .unwrap();
            let bad: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            w.write_all(
                format!(
                    "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}, \"id\": {}}}\n",
                    bad["id"]
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        });
        let mut qmp = Qmp::handshake(client).await.unwrap();
        assert_eq!(qmp.execute("stop", None).await.unwrap(), json!({}));
        let events = qmp.take_events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["event"], "STOP");
        let e = qmp.execute("bogus", None).await.unwrap_err();
        assert!(e.to_string().contains("CommandNotFound: nope"), "{e}");
        server.await.unwrap();
    }
}
