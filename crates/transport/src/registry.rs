//! Port → listener table shared by the transports that route connections
//! themselves (the hybrid-vsock guest-side server and the mux).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc;

use crate::TransportError;

/// How many handed-over connections may wait for `accept()` on one port,
/// like a socket's listen backlog.
pub(crate) const BACKLOG: usize = 128;

pub(crate) struct PortRegistry<T> {
    inner: Mutex<Inner<T>>,
}

struct Inner<T> {
    /// Set once the carrier is gone; no further registrations are accepted.
    closed: bool,
    /// Distinguishes successive registrations of one port so a late drop of an
    /// old listener cannot unregister its successor.
    next_id: u64,
    ports: HashMap<u32, (u64, mpsc::Sender<T>)>,
}

impl<T> PortRegistry<T> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(PortRegistry {
            inner: Mutex::new(Inner {
                closed: false,
                next_id: 0,
                ports: HashMap::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // The table stays consistent even if a holder panicked, so keep going.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn register(self: &Arc<Self>, port: u32) -> Result<Registration<T>, TransportError> {
        let mut inner = self.lock();
        if inner.closed {
            return Err(TransportError::SessionClosed);
        }
        if inner.ports.contains_key(&port) {
            return Err(TransportError::AddrInUse { port });
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let (tx, rx) = mpsc::channel(BACKLOG);
        inner.ports.insert(port, (id, tx));
        Ok(Registration {
            registry: Arc::clone(self),
            port,
            id,
            rx,
        })
    }

    /// The queue of the listener on `port`, if any.
    pub(crate) fn lookup(&self, port: u32) -> Option<mpsc::Sender<T>> {
        self.lock().ports.get(&port).map(|(_, tx)| tx.clone())
    }

    /// Refuses future registrations and ends every listener's queue.
    pub(crate) fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.ports.clear();
    }
}

/// A registered port; unregisters itself on drop.
pub(crate) struct Registration<T> {
    registry: Arc<PortRegistry<T>>,
    port: u32,
    id: u64,
    pub(crate) rx: mpsc::Receiver<T>,
}

impl<T> Drop for Registration<T> {
    fn drop(&mut self) {
        let mut inner = self.registry.lock();
        if inner
            .ports
            .get(&self.port)
            .is_some_and(|(id, _)| *id == self.id)
        {
            inner.ports.remove(&self.port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_twice_is_addr_in_use_until_dropped() {
        let reg = PortRegistry::<u8>::new();
        let first = reg.register(7).unwrap();
        assert!(matches!(
            reg.register(7),
            Err(TransportError::AddrInUse { port: 7 })
        ));
        drop(first);
        assert!(reg.lookup(7).is_none());
        let _second = reg.register(7).unwrap();
        assert!(reg.lookup(7).is_some());
    }

    #[test]
    fn close_ends_queues_and_refuses_registration() {
        let reg = PortRegistry::<u8>::new();
        let mut r = reg.register(1).unwrap();
        reg.close();
        assert!(reg.lookup(1).is_none());
        assert!(matches!(
            r.rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert!(matches!(
            reg.register(2),
            Err(TransportError::SessionClosed)
        ));
    }
}
