//! The bridge client: one connection to a guest agent.
//!
//! * Negotiation comes first; nothing else is sent until the guest has answered it (the
//!   connection object does not exist before).
//! * Request ids are allocated when a request is queued for sending, from a counter that only
//!   rises ([`GuestConnection::seed_next_id`]); responses are matched by id, in any order, and
//!   must carry the response type of the request they answer.
//! * Notifications are dispatched to the container that registered for them.
//! * Anything unexpected from the guest — a response nobody waits for, a notification for an
//!   unknown container, a request — is logged and dropped: it never kills the connection.
//!   A frame that breaks the protocol (oversized, undecodable) closes the connection with an
//!   error naming it; every outstanding call then fails with that reason.
//! * Nothing the guest sends makes the host keep more than a bounded amount: a frame is at
//!   most `max_frame_size` (a bigger header closes the connection before its body is read),
//!   notifications wait unread up to `notification_queue` per container and
//!   `notification_bytes` for the whole connection (more are dropped), and dropped frames are
//!   logged at a falling rate, so a flood does not flood the log.

use crate::error::{HostError, Result};
use bridge::io::{ReadError, read_frame_strict};
use bridge::message::{
    ContainerNotification, Message, NegotiateProtocolRequest, Request, RequestBase, Response,
};
use bridge::negotiate::{GuestCapabilities, PROTOCOL_VERSION};
use bridge::{FIRST_STDIO_PORT, Frame, Identifier, Rpc};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use transport::{BoxStream, Transport};

/// Tunables of a connection.
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    /// Limit on frames in both directions.
    pub max_frame_size: u32,
    /// How long the guest may take to answer the negotiation.
    pub negotiate_timeout: Duration,
    /// How long a [`GuestConnection::call`] waits for its answer: a hung or hostile guest
    /// must not hold a host operation for ever. (Waits for a process's exit are sent with
    /// [`GuestConnection::send`] and not bounded by this.)
    pub call_timeout: Duration,
    /// Frames queued for sending before callers wait.
    pub send_queue: usize,
    /// Notifications kept per container until its owner reads them; more are dropped. The
    /// guest sends one or two per container in normal use, so this only bounds a flood.
    pub notification_queue: usize,
    /// Bytes (as received) of the notifications kept unread across all containers; more are
    /// dropped. With `notification_queue`, what a guest can make the host hold however many
    /// containers it has.
    pub notification_bytes: usize,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        ConnectionOptions {
            max_frame_size: bridge::DEFAULT_MAX_FRAME_SIZE,
            negotiate_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(60),
            send_queue: 256,
            notification_queue: 16,
            notification_bytes: 1 << 20,
        }
    }
}

/// The saved part of a connection (see [`GuestConnection::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConnectionState {
    pub next_id: u64,
    pub next_port: u32,
}

type Reply = oneshot::Sender<Result<Response>>;

struct Pending {
    rpc: Rpc,
    reply: Reply,
}

struct Inner {
    transport: Transport,
    options: ConnectionOptions,
    /// The id counter and the send queue under one lock: ids go on the wire in order.
    sender: Mutex<(u64, Option<mpsc::Sender<Vec<u8>>>)>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_port: AtomicU32,
    containers: Mutex<HashMap<String, mpsc::Sender<(usize, ContainerNotification)>>>,
    /// Bytes of notifications queued unread (see [`ConnectionOptions::notification_bytes`]).
    queued_bytes: Arc<AtomicUsize>,
    /// `Some(reason)` once the connection is gone.
    closed: watch::Sender<Option<String>>,
    capabilities: Mutex<GuestCapabilities>,
    protocol_version: AtomicU32,
    dropped: AtomicU64,
}

/// A negotiated connection to a guest agent. Cheap to clone.
#[derive(Clone)]
pub struct GuestConnection {
    inner: Arc<Inner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl GuestConnection {
    /// Takes a freshly accepted bridge stream, negotiates protocol v4 and starts serving it.
    /// `transport` is where stdio ports are listened on.
    pub async fn connect(
        transport: Transport,
        stream: BoxStream,
        options: ConnectionOptions,
    ) -> Result<GuestConnection> {
        Self::connect_prepared(transport, stream, options, |_| {}).await
    }

    /// Like [`connect`](Self::connect), but runs `prepare` on the connection before the
    /// negotiation is sent: the restore path registers its containers and adopts its saved
    /// wait ids there, so that answers and notifications the guest queued while no host was
    /// connected — sent right after negotiation — find them.
    pub async fn connect_prepared(
        transport: Transport,
        stream: BoxStream,
        options: ConnectionOptions,
        prepare: impl FnOnce(&GuestConnection),
    ) -> Result<GuestConnection> {
        let (reader, writer) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(options.send_queue.max(1));
        let conn = GuestConnection {
            inner: Arc::new(Inner {
                transport,
                sender: Mutex::new((0, Some(tx))),
                pending: Mutex::new(HashMap::new()),
                next_port: AtomicU32::new(FIRST_STDIO_PORT),
                containers: Mutex::new(HashMap::new()),
                queued_bytes: Arc::new(AtomicUsize::new(0)),
                closed: watch::channel(None).0,
                capabilities: Mutex::new(GuestCapabilities::default()),
                protocol_version: AtomicU32::new(0),
                dropped: AtomicU64::new(0),
                options,
            }),
        };
        tokio::spawn(write_loop(conn.inner.clone(), writer, rx));
        tokio::spawn(read_loop(conn.inner.clone(), reader));
        prepare(&conn);

        let negotiate = Request::NegotiateProtocol(NegotiateProtocolRequest {
            base: RequestBase::default(),
            minimum_version: PROTOCOL_VERSION,
            maximum_version: PROTOCOL_VERSION,
        });
        let timeout = conn.inner.options.negotiate_timeout;
        let answer = match tokio::time::timeout(timeout, conn.call(negotiate)).await {
            Ok(r) => r,
            Err(_) => {
                let reason =
                    format!("the guest did not answer the protocol negotiation within {timeout:?}");
                conn.close(&reason);
                return Err(HostError::Timeout(reason));
            }
        };
        let n = match answer {
            Ok(Response::NegotiateProtocol(n)) => n,
            Ok(_) => unreachable!("responses are matched to their request type"),
            Err(e) => {
                // Refused, or an answer that does not decode: nothing more to say to it.
                conn.close(&format!("the protocol negotiation failed: {e}"));
                return Err(e);
            }
        };
        if n.version != PROTOCOL_VERSION {
            let reason = format!(
                "the guest chose protocol version {}, only {PROTOCOL_VERSION} is supported",
                n.version
            );
            conn.close(&reason);
            return Err(HostError::UnsupportedVersion(reason));
        }
        conn.inner
            .protocol_version
            .store(n.version, Ordering::Relaxed);
        *lock(&conn.inner.capabilities) =
            GuestCapabilities::from_value(&n.capabilities.guest_defined_capabilities);
        tracing::info!(
            version = n.version,
            os = %n.capabilities.runtime_os_type,
            "guest connection negotiated"
        );
        Ok(conn)
    }

    pub fn transport(&self) -> &Transport {
        &self.inner.transport
    }

    pub fn options(&self) -> &ConnectionOptions {
        &self.inner.options
    }

    /// ferry extensions and hcsshim capabilities the guest announced.
    pub fn capabilities(&self) -> GuestCapabilities {
        lock(&self.inner.capabilities).clone()
    }

    /// Why the connection closed, once it has.
    pub fn closed_reason(&self) -> Option<String> {
        self.inner.closed.borrow().clone()
    }

    /// Resolves when the connection is gone; returns the reason.
    pub async fn closed(&self) -> String {
        let mut rx = self.inner.closed.subscribe();
        match rx.wait_for(|r| r.is_some()).await {
            Ok(r) => r.clone().unwrap_or_default(),
            Err(_) => "connection dropped".into(),
        }
    }

    /// Frames from the guest that were dropped (unknown ids or containers, stray requests).
    pub fn dropped_frames(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Closes the connection; outstanding calls fail with `reason`.
    pub fn close(&self, reason: &str) {
        close(&self.inner, reason);
    }

    // -- ids and ports ---------------------------------------------------------------------

    /// What a restored host needs from this connection: the id and port floors.
    pub fn state(&self) -> ConnectionState {
        ConnectionState {
            next_id: self.next_id(),
            next_port: self.next_port(),
        }
    }

    /// Raises the id and port floors to a saved state's (never lowers them), so nothing new
    /// collides with what is adopted from it.
    pub fn restore_floors(&self, saved: &ConnectionState) {
        self.seed_next_id(saved.next_id);
        self.set_next_port(saved.next_port);
    }

    /// The id the next request will get.
    pub fn next_id(&self) -> u64 {
        lock(&self.inner.sender).0
    }

    /// Raises the id counter to at least `id` (never lowers it), so new requests cannot
    /// collide with ids adopted from a saved state.
    pub fn seed_next_id(&self, id: u64) {
        let mut s = lock(&self.inner.sender);
        s.0 = s.0.max(id);
    }

    /// The next stdio port the allocator will hand out.
    pub fn next_port(&self) -> u32 {
        self.inner.next_port.load(Ordering::Relaxed)
    }

    /// Raises the port floor to at least `port` (never lowers it).
    pub fn set_next_port(&self, port: u32) {
        self.inner.next_port.fetch_max(port, Ordering::Relaxed);
    }

    /// A port never handed out before on this connection.
    pub fn allocate_port(&self) -> Result<u32> {
        let port = self
            .inner
            .next_port
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                bridge::is_valid_stdio_port(p).then(|| p + 1)
            })
            .map_err(|_| {
                HostError::InvalidArgument("stdio port space exhausted on this connection".into())
            })?;
        Ok(port)
    }

    // -- calls -----------------------------------------------------------------------------

    /// Registers a call under a known `id` without sending anything: the restore path adopts
    /// a WaitForProcess that the previous host sent. The answer arrives like any other.
    pub fn register_pending(
        &self,
        id: u64,
        rpc: Rpc,
    ) -> Result<oneshot::Receiver<Result<Response>>> {
        if let Some(reason) = self.closed_reason() {
            return Err(HostError::ConnectionClosed(reason));
        }
        let (tx, rx) = oneshot::channel();
        let mut pending = lock(&self.inner.pending);
        if pending.contains_key(&id) {
            return Err(HostError::InvalidArgument(format!(
                "request id {id} is already outstanding"
            )));
        }
        pending.insert(id, Pending { rpc, reply: tx });
        Ok(rx)
    }

    /// Sends a request and returns its id and a receiver for the answer (an asynchronous
    /// call). A failed answer arrives as a typed error.
    pub async fn send(
        &self,
        request: &Request,
    ) -> Result<(u64, oneshot::Receiver<Result<Response>>)> {
        let rpc = request.rpc();
        let max = self.inner.options.max_frame_size;
        // Reserve queue space first so the id can be allocated and queued in one step.
        let tx = lock(&self.inner.sender)
            .1
            .clone()
            .ok_or_else(|| HostError::ConnectionClosed(self.closed_reason().unwrap_or_default()))?;
        let permit = tx
            .reserve_owned()
            .await
            .map_err(|_| HostError::ConnectionClosed(self.closed_reason().unwrap_or_default()))?;
        let (reply, rx) = oneshot::channel();
        let mut sender = lock(&self.inner.sender);
        let id = sender.0;
        let bytes = request
            .to_frame(id)
            .and_then(|f| f.encode(max))
            .map_err(|e| HostError::InvalidArgument(e.to_string()))?;
        sender.0 += 1;
        lock(&self.inner.pending).insert(id, Pending { rpc, reply });
        permit.send(bytes);
        drop(sender);
        tracing::trace!(rpc = rpc.name(), id, "request sent");
        Ok((id, rx))
    }

    /// Sends a request and waits for its answer, at most [`ConnectionOptions::call_timeout`].
    pub async fn call(&self, request: Request) -> Result<Response> {
        let (id, rx) = self.send(&request).await?;
        let limit = self.inner.options.call_timeout;
        match tokio::time::timeout(limit, self.await_reply(rx)).await {
            Ok(answer) => answer,
            Err(_) => {
                // An answer that comes later is dropped as one nobody waits for.
                lock(&self.inner.pending).remove(&id);
                let rpc = request.rpc().name();
                tracing::warn!(rpc, id, ?limit, "the guest did not answer");
                Err(HostError::NoAnswer(format!(
                    "the guest did not answer {rpc} (request {id}) within {} s",
                    limit.as_secs_f64()
                )))
            }
        }
    }

    /// Waits for the answer to a call sent or registered earlier.
    pub async fn await_reply(&self, rx: oneshot::Receiver<Result<Response>>) -> Result<Response> {
        match rx.await {
            Ok(r) => r,
            Err(_) => Err(HostError::ConnectionClosed(
                self.closed_reason().unwrap_or_default(),
            )),
        }
    }

    // -- notifications ---------------------------------------------------------------------

    /// Receives notifications for `container_id` from now on (replacing an earlier receiver).
    /// Unread ones are bounded (see [`ConnectionOptions::notification_queue`] and
    /// [`ConnectionOptions::notification_bytes`]): the guest's further notifications are
    /// dropped until the receiver catches up.
    pub fn subscribe(&self, container_id: &str) -> Notifications {
        let (tx, rx) = mpsc::channel(self.inner.options.notification_queue.max(1));
        lock(&self.inner.containers).insert(container_id.to_string(), tx);
        Notifications {
            rx,
            queued_bytes: self.inner.queued_bytes.clone(),
        }
    }

    pub fn unsubscribe(&self, container_id: &str) {
        lock(&self.inner.containers).remove(container_id);
    }
}

/// The notifications for one container (see [`GuestConnection::subscribe`]).
pub struct Notifications {
    rx: mpsc::Receiver<(usize, ContainerNotification)>,
    queued_bytes: Arc<AtomicUsize>,
}

impl Notifications {
    /// The next notification; None once the connection no longer delivers any to this
    /// receiver (it was replaced, unsubscribed, or the connection is gone).
    pub async fn recv(&mut self) -> Option<ContainerNotification> {
        let (size, n) = self.rx.recv().await?;
        self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
        Some(n)
    }

    /// The next notification if one is waiting.
    pub fn try_recv(&mut self) -> Option<ContainerNotification> {
        let (size, n) = self.rx.try_recv().ok()?;
        self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
        Some(n)
    }
}

impl Drop for Notifications {
    fn drop(&mut self) {
        // Closed first: nothing is queued after the drain below, so every byte is given back.
        self.rx.close();
        while let Ok((size, _)) = self.rx.try_recv() {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
        }
    }
}

fn close(inner: &Inner, reason: &str) {
    let first = inner.closed.send_if_modified(|r| {
        if r.is_none() {
            *r = Some(reason.to_string());
            true
        } else {
            false
        }
    });
    if !first {
        return;
    }
    tracing::warn!(%reason, "guest connection closed");
    lock(&inner.sender).1 = None;
    let pending: Vec<Pending> = lock(&inner.pending).drain().map(|(_, p)| p).collect();
    for p in pending {
        let _ = p
            .reply
            .send(Err(HostError::ConnectionClosed(reason.to_string())));
    }
}

async fn write_loop(
    inner: Arc<Inner>,
    mut w: WriteHalf<BoxStream>,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    let mut closed = inner.closed.subscribe();
    loop {
        let bytes = tokio::select! {
            b = rx.recv() => match b { Some(b) => b, None => break },
            _ = closed.wait_for(|r| r.is_some()) => break,
        };
        if let Err(e) = async {
            w.write_all(&bytes).await?;
            w.flush().await
        }
        .await
        {
            close(&inner, &format!("writing to the guest failed: {e}"));
            break;
        }
    }
    let _ = w.shutdown().await;
}

async fn read_loop(inner: Arc<Inner>, mut r: ReadHalf<BoxStream>) {
    let reason = read_frames(&inner, &mut r).await;
    close(&inner, &reason);
}

async fn read_frames<R: AsyncRead + Unpin>(inner: &Inner, r: &mut R) -> String {
    let max = inner.options.max_frame_size;
    let mut closed = inner.closed.subscribe();
    loop {
        let frame = tokio::select! {
            f = read_frame_strict(r, max) => f,
            _ = closed.wait_for(|r| r.is_some()) => return "closed by the host".into(),
        };
        let frame = match frame {
            Ok(f) => f,
            Err(ReadError::Closed) => return "the guest closed the bridge".into(),
            Err(ReadError::Frame(e)) => return format!("the guest sent a bad frame: {e}"),
            Err(e) => return format!("reading from the guest failed: {e}"),
        };
        if let Err(e) = dispatch(inner, &frame) {
            return format!("the guest sent an undecodable message: {e}");
        }
    }
}

fn dispatch(inner: &Inner, frame: &Frame) -> std::result::Result<(), bridge::FrameError> {
    let drop_it = |what: String| {
        let n = inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // The first few in full, then the 2^k-th: a guest flooding strays costs a few dozen
        // log lines, not one per frame.
        if n <= 8 || n.is_power_of_two() {
            tracing::warn!(dropped_so_far = n, "{what}; dropped");
        } else {
            tracing::debug!(dropped_so_far = n, "{what}; dropped");
        }
    };
    match frame.ident {
        Identifier::Response(rpc) => {
            let mut pending = lock(&inner.pending);
            match pending.get(&frame.id) {
                None => {
                    drop(pending);
                    drop_it(format!(
                        "{} response for id {} that nobody is waiting for",
                        rpc.name(),
                        frame.id
                    ));
                }
                Some(p) if p.rpc != rpc => {
                    let want = p.rpc;
                    drop(pending);
                    drop_it(format!(
                        "{} response for id {}, which is waiting for a {} response",
                        rpc.name(),
                        frame.id,
                        want.name()
                    ));
                }
                Some(_) => {
                    let p = pending.remove(&frame.id).expect("checked above");
                    drop(pending);
                    let result = Response::parse(rpc, frame)
                        .map_err(|e| HostError::Protocol(e.to_string()))
                        .and_then(|resp| {
                            let base = resp.base();
                            if base.is_success() {
                                Ok(resp)
                            } else {
                                Err(HostError::from_result(base.result, base.message()))
                            }
                        });
                    let _ = p.reply.send(result);
                }
            }
        }
        Identifier::Notification(_) => {
            let Message::Notification(n) = Message::from_frame(frame)? else {
                unreachable!("notification identifiers decode to notifications")
            };
            let tx = lock(&inner.containers).get(&n.base.container_id).cloned();
            let Some(tx) = tx else {
                drop_it(format!(
                    "{} notification for unknown container {:?}",
                    short(&n.kind),
                    short(&n.base.container_id)
                ));
                return Ok(());
            };
            let (kind, container) = (short(&n.kind), short(&n.base.container_id));
            let size = frame.body.len();
            let budget = inner.options.notification_bytes;
            let queued = inner.queued_bytes.fetch_add(size, Ordering::Relaxed);
            let refused = if queued + size > budget {
                Some(format!(
                    "{queued} bytes of notifications are unread already"
                ))
            } else {
                match tx.try_send((size, n)) {
                    Ok(()) => None,
                    Err(mpsc::error::TrySendError::Full(_)) => Some(format!(
                        "{} notifications for it are unread already",
                        tx.max_capacity()
                    )),
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        Some("nobody follows it any more".into())
                    }
                }
            };
            if let Some(why) = refused {
                inner.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                drop_it(format!(
                    "{kind} notification for container {container:?}: {why}"
                ));
            }
        }
        Identifier::Request(rpc) => drop_it(format!(
            "{} request from the guest (hosts serve none)",
            rpc.name()
        )),
    }
    Ok(())
}

/// A guest-chosen string as it goes into a log line: at most 64 characters.
fn short(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}
