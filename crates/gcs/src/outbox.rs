//! Everything the agent sends to the host goes through the outbox, which outlives connections.
//!
//! An item is either bound to the connection its request came on (a plain response: meaningless
//! to any other host connection, dropped with a log line if that connection is gone), or
//! *sticky*: container notifications and WaitForProcess answers, which are delivered on whatever
//! connection is live and negotiated — the host that reconnects after a migration adopts the
//! outstanding wait ids, so their answers must reach it. A sticky item whose write fails goes
//! back to the head of the queue for the next connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, watch};

/// Upper bound on queued items; beyond it the oldest are dropped with an error in the log.
pub const MAX_QUEUED: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Only for the connection with this generation.
    Connection(u64),
    /// For any negotiated connection, now or later.
    Sticky,
}

type Delivered = Box<dyn FnOnce() + Send>;

pub struct Item {
    /// The encoded frame.
    pub bytes: Vec<u8>,
    /// What it is, for logs.
    pub what: String,
    pub scope: Scope,
    /// Called once the frame has been written to a live connection.
    pub on_delivered: Option<Delivered>,
}

#[derive(Default)]
struct Inner {
    queue: VecDeque<Item>,
    /// The generation of the connection that has negotiated, if any.
    negotiated: Option<u64>,
}

#[derive(Default)]
pub struct Outbox {
    inner: Mutex<Inner>,
    changed: Notify,
    /// Woken after every write.
    idle: Notify,
}

impl Outbox {
    pub fn push(&self, item: Item) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.queue.len() >= MAX_QUEUED
            && let Some(old) = inner.queue.pop_front()
        {
            tracing::error!(what = %old.what, "outbox full ({MAX_QUEUED} items): dropping the oldest");
        }
        inner.queue.push_back(item);
        drop(inner);
        self.changed.notify_one();
    }

    /// Marks connection `generation` as negotiated: sticky items may now flow to it.
    pub fn set_negotiated(&self, generation: u64) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .negotiated = Some(generation);
        self.changed.notify_one();
    }

    /// Number of sticky items waiting (for tests and diagnostics).
    pub fn pending_sticky(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .queue
            .iter()
            .filter(|i| i.scope == Scope::Sticky)
            .count()
    }

    /// Takes the first item connection `generation` may send now, dropping items addressed to
    /// connections that are gone.
    fn next_for(&self, generation: u64) -> Option<Item> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let negotiated = inner.negotiated == Some(generation);
        let mut i = 0;
        while i < inner.queue.len() {
            match inner.queue[i].scope {
                Scope::Connection(g) if g == generation => return inner.queue.remove(i),
                Scope::Connection(g) if g < generation => {
                    if let Some(stale) = inner.queue.remove(i) {
                        tracing::info!(what = %stale.what, connection = g, "dropping a response for a closed connection");
                    }
                }
                Scope::Sticky if negotiated => return inner.queue.remove(i),
                _ => i += 1,
            }
        }
        None
    }

    /// True when nothing queued could still go to connection `generation`.
    fn nothing_for(&self, generation: u64) -> bool {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let negotiated = inner.negotiated == Some(generation);
        !inner.queue.iter().any(|i| match i.scope {
            Scope::Connection(g) => g == generation,
            Scope::Sticky => negotiated,
        })
    }

    /// Resolves once everything connection `generation` may send has been written.
    pub async fn drained_for(&self, generation: u64) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.nothing_for(generation) {
                return;
            }
            idle.await;
        }
    }

    fn requeue_front(&self, item: Item) {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue
            .push_front(item);
    }

    /// Writes items for connection `generation` until the stream fails or `stop` turns true.
    pub async fn run_writer<W: AsyncWrite + Unpin>(
        self: Arc<Self>,
        generation: u64,
        mut w: W,
        mut stop: watch::Receiver<bool>,
    ) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if *stop.borrow() {
                return;
            }
            let Some(item) = self.next_for(generation) else {
                tokio::select! {
                    _ = &mut changed => {}
                    _ = stop.changed() => {}
                }
                continue;
            };
            let written = tokio::select! {
                r = async { w.write_all(&item.bytes).await?; w.flush().await } => r,
                _ = stop.changed() => Err(std::io::Error::other("connection closing")),
            };
            match written {
                Ok(()) => {
                    tracing::trace!(what = %item.what, "sent");
                    if let Some(done) = item.on_delivered {
                        done();
                    }
                    self.idle.notify_waiters();
                }
                Err(e) => {
                    tracing::debug!(what = %item.what, error = %e, "write failed");
                    if item.scope == Scope::Sticky {
                        self.requeue_front(item);
                    }
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn item(tag: &str, scope: Scope) -> Item {
        Item {
            bytes: tag.as_bytes().to_vec(),
            what: tag.to_string(),
            scope,
            on_delivered: None,
        }
    }

    /// Runs a writer for `generation` until it has written `want` bytes; returns them.
    async fn written_by(outbox: &Arc<Outbox>, generation: u64, want: usize) -> Vec<u8> {
        let (w, mut r) = tokio::io::duplex(1024);
        let (stop_tx, stop_rx) = watch::channel(false);
        let writer = tokio::spawn(outbox.clone().run_writer(generation, w, stop_rx));
        let mut got = vec![0u8; want];
        r.read_exact(&mut got).await.unwrap();
        stop_tx.send(true).unwrap();
        writer.await.unwrap();
        got
    }

    #[tokio::test]
    async fn responses_for_closed_connections_are_dropped_and_sticky_items_wait_for_negotiation() {
        let outbox = Arc::new(Outbox::default());
        outbox.push(item("old-response;", Scope::Connection(1)));
        outbox.push(item("wait-answer;", Scope::Sticky));
        outbox.push(item("negotiate-answer;", Scope::Connection(2)));
        // Connection 2 is not negotiated yet: only its own response may go.
        assert_eq!(written_by(&outbox, 2, 17).await, b"negotiate-answer;");
        assert_eq!(outbox.pending_sticky(), 1);
        outbox.set_negotiated(2);
        assert_eq!(written_by(&outbox, 2, 12).await, b"wait-answer;");
        // The stale response never went anywhere.
        assert!(outbox.nothing_for(2) && outbox.nothing_for(3));
        assert_eq!(outbox.inner.lock().unwrap().queue.len(), 0);
    }

    #[tokio::test]
    async fn a_sticky_item_whose_write_fails_is_kept_for_the_next_connection() {
        let outbox = Arc::new(Outbox::default());
        outbox.set_negotiated(1);
        let delivered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = delivered.clone();
        outbox.push(Item {
            on_delivered: Some(Box::new(move || {
                d2.store(true, std::sync::atomic::Ordering::SeqCst)
            })),
            ..item("exit-code;", Scope::Sticky)
        });
        // A connection whose peer is gone: the write fails.
        let (w, r) = tokio::io::duplex(4);
        drop(r);
        let (_stop_tx, stop_rx) = watch::channel(false);
        outbox.clone().run_writer(1, w, stop_rx).await;
        assert!(!delivered.load(std::sync::atomic::Ordering::SeqCst));
        assert_eq!(outbox.pending_sticky(), 1);
        outbox.set_negotiated(2);
        assert_eq!(written_by(&outbox, 2, 10).await, b"exit-code;");
        assert!(delivered.load(std::sync::atomic::Ordering::SeqCst));
    }
}
