//! Port-addressed streams multiplexed over one byte stream with yamux.
//!
//! A driver task owns the yamux connection and polls it continuously, so
//! inbound frames are processed even while nobody dials or accepts. Dialers
//! ask the driver for a new outbound stream over a channel.
//!
//! Port addressing on top of yamux: the dialer opens a stream and writes the
//! port as 4 bytes little-endian; the acceptor answers one status byte,
//! [`ACCEPTED`] (the stream then belongs to the listener on that port) or
//! [`NO_LISTENER`] (the acceptor then closes it).

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::registry::{PortRegistry, Registration};
use crate::{Anchored, BoxStream, TransportError};

/// Status byte: a listener took the stream.
const ACCEPTED: u8 = 0;
/// Status byte: nobody listens on the requested port.
const NO_LISTENER: u8 = 1;

/// How long an inbound stream may take to name its port (and to be queued
/// for its listener) before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on the graceful goodbye when every handle to a session is dropped;
/// the peer may have stopped reading.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Dial requests waiting for the driver; more dialers wait in `send()`.
const OPEN_QUEUE: usize = 64;

/// Which yamux end this is. The two ends of one byte stream must differ:
/// by convention the host is [`MuxRole::Client`] and the guest
/// [`MuxRole::Server`]. Both roles can dial and listen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MuxRole {
    Client,
    Server,
}

/// One multiplexed byte stream. Cheap to clone. The session is shut down
/// (gracefully, towards the peer) once every clone, every [`Transport`](crate::Transport)
/// and [`Listener`](crate::Listener) built on it, and every stream it produced is dropped.
#[derive(Clone)]
pub struct MuxSession {
    shared: Arc<Shared>,
}

struct Shared {
    role: MuxRole,
    open_tx: mpsc::Sender<OpenRequest>,
    registry: Arc<PortRegistry<YamuxStream>>,
    closed: watch::Receiver<bool>,
}

type YamuxStream = Compat<yamux::Stream>;
type OpenRequest = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

impl MuxSession {
    /// Starts a session over `io`, spawning its driver task on the current
    /// tokio runtime (so this must be called from within one).
    pub fn new<S>(io: S, role: MuxRole) -> MuxSession
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (closed_tx, closed_rx) = watch::channel(false);
        let io = WatchedIo {
            io,
            closed: closed_tx.clone(),
        };
        let mode = match role {
            MuxRole::Client => yamux::Mode::Client,
            MuxRole::Server => yamux::Mode::Server,
        };
        let conn = yamux::Connection::new(TokioAsyncReadCompatExt::compat(io), config(), mode);
        let (open_tx, open_rx) = mpsc::channel(OPEN_QUEUE);
        let registry = PortRegistry::new();
        tokio::spawn(drive(conn, open_rx, Arc::clone(&registry), closed_tx, role));
        MuxSession {
            shared: Arc::new(Shared {
                role,
                open_tx,
                registry,
                closed: closed_rx,
            }),
        }
    }

    /// Resolves when the underlying byte stream has ended or failed, so the
    /// owner can reconnect and build a new session.
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.clone();
        // An error means the driver is gone, which is just as closed.
        let _ = rx.wait_for(|closed| *closed).await;
    }

    /// Whether the underlying byte stream has ended or failed.
    pub fn is_closed(&self) -> bool {
        self.shared.is_closed()
    }

    pub(crate) fn describe(&self) -> String {
        match self.shared.role {
            MuxRole::Client => "mux(client)".to_owned(),
            MuxRole::Server => "mux(server)".to_owned(),
        }
    }

    pub(crate) async fn dial(
        &self,
        port: u32,
        timeout: Duration,
    ) -> Result<BoxStream, TransportError> {
        match tokio::time::timeout(timeout, self.try_dial(port)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::ConnectTimeout { port, timeout }),
        }
    }

    async fn try_dial(&self, port: u32) -> Result<BoxStream, TransportError> {
        let shared = &self.shared;
        if shared.is_closed() {
            return Err(TransportError::SessionClosed);
        }
        let (reply_tx, reply_rx) = oneshot::channel();
        shared
            .open_tx
            .send(reply_tx)
            .await
            .map_err(|_| TransportError::SessionClosed)?;
        let stream = match reply_rx.await {
            Ok(Ok(stream)) => stream,
            Ok(Err(yamux::ConnectionError::TooManyStreams)) => {
                return Err(TransportError::io(
                    format!("mux dial port {port}"),
                    io::Error::other("too many open streams on the session"),
                ));
            }
            // Any other yamux error means the connection is gone; a dropped
            // reply means the driver has stopped.
            Ok(Err(_)) | Err(_) => return Err(TransportError::SessionClosed),
        };
        let mut stream = FuturesAsyncReadCompatExt::compat(stream);
        // A failure mid-handshake is the session dying unless it is still up.
        let failed = |what: &str, e: io::Error| {
            if shared.is_closed() {
                TransportError::SessionClosed
            } else {
                TransportError::io(format!("mux dial port {port}: {what}"), e)
            }
        };
        stream
            .write_all(&port.to_le_bytes())
            .await
            .map_err(|e| failed("sending the port", e))?;
        stream
            .flush()
            .await
            .map_err(|e| failed("sending the port", e))?;
        let mut status = [0u8; 1];
        match stream.read(&mut status).await {
            Ok(0) if shared.is_closed() => Err(TransportError::SessionClosed),
            Ok(0) => Err(TransportError::Refused {
                port,
                reason: "the peer closed the mux stream without answering".to_owned(),
            }),
            Ok(_) => match status[0] {
                ACCEPTED => Ok(Box::new(Anchored {
                    stream,
                    _anchor: Arc::clone(shared),
                })),
                NO_LISTENER => Err(TransportError::Refused {
                    port,
                    reason: "no listener on the peer's side of the mux".to_owned(),
                }),
                other => Err(TransportError::Protocol(format!(
                    "mux dial port {port}: unknown status byte {other}"
                ))),
            },
            Err(e) => Err(failed("reading the status byte", e)),
        }
    }

    pub(crate) fn listen(&self, port: u32) -> Result<MuxListener, TransportError> {
        if self.shared.is_closed() {
            return Err(TransportError::SessionClosed);
        }
        Ok(MuxListener {
            registration: self.shared.registry.register(port)?,
            session: Arc::clone(&self.shared),
        })
    }
}

impl Shared {
    fn is_closed(&self) -> bool {
        // has_changed() fails once the driver (the sender) is gone.
        *self.closed.borrow() || self.closed.has_changed().is_err()
    }
}

impl fmt::Debug for MuxSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MuxSession")
            .field("role", &self.shared.role)
            .field("closed", &self.is_closed())
            .finish()
    }
}

pub(crate) struct MuxListener {
    registration: Registration<YamuxStream>,
    session: Arc<Shared>,
}

impl MuxListener {
    pub(crate) async fn accept(&mut self) -> Result<BoxStream, TransportError> {
        let mut closed = self.session.closed.clone();
        tokio::select! {
            // Once the session is gone, queued streams are dead too.
            biased;
            _ = closed.wait_for(|closed| *closed) => Err(TransportError::SessionClosed),
            stream = self.registration.rx.recv() => match stream {
                Some(stream) => Ok(Box::new(Anchored {
                    stream,
                    _anchor: Arc::clone(&self.session),
                })),
                None => Err(TransportError::SessionClosed),
            },
        }
    }
}

enum Event {
    Inbound(yamux::Stream),
    /// The connection ended: cleanly (`None`) or with an error.
    Ended(Option<yamux::ConnectionError>),
    /// Every session handle is gone; nobody can use the connection any more.
    HandlesGone,
}

async fn drive<T>(
    mut conn: yamux::Connection<T>,
    mut open_rx: mpsc::Receiver<OpenRequest>,
    registry: Arc<PortRegistry<YamuxStream>>,
    closed: watch::Sender<bool>,
    role: MuxRole,
) where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    let mut pending = None;
    loop {
        match poll_fn(|cx| poll_driver(&mut conn, &mut open_rx, &mut pending, cx)).await {
            Event::Inbound(stream) => {
                // One task per stream so a peer that is slow to name its port
                // cannot hold up the others.
                tokio::spawn(answer_inbound(stream, Arc::clone(&registry)));
            }
            Event::Ended(None) => {
                tracing::debug!(?role, "mux session ended");
                break;
            }
            Event::Ended(Some(e)) => {
                tracing::debug!(?role, error = %e, "mux session failed");
                break;
            }
            Event::HandlesGone => {
                match tokio::time::timeout(CLOSE_TIMEOUT, poll_fn(|cx| conn.poll_close(cx))).await {
                    Ok(Ok(())) => tracing::debug!(?role, "mux session closed"),
                    Ok(Err(e)) => tracing::debug!(?role, error = %e, "mux session close failed"),
                    Err(_) => tracing::debug!(?role, "mux session close timed out"),
                }
                break;
            }
        }
    }
    closed.send_replace(true);
    registry.close();
}

/// One step of the driver: hands out requested outbound streams, then drives
/// the connection until an inbound stream arrives or it ends.
fn poll_driver<T>(
    conn: &mut yamux::Connection<T>,
    open_rx: &mut mpsc::Receiver<OpenRequest>,
    pending: &mut Option<OpenRequest>,
    cx: &mut Context<'_>,
) -> Poll<Event>
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin,
{
    loop {
        let request = match pending.take() {
            Some(request) => request,
            None => match open_rx.poll_recv(cx) {
                Poll::Ready(Some(request)) => request,
                Poll::Ready(None) => return Poll::Ready(Event::HandlesGone),
                Poll::Pending => break,
            },
        };
        if request.is_closed() {
            continue; // the dialer gave up (timeout); don't open a stream for nobody
        }
        match conn.poll_new_outbound(cx) {
            Poll::Ready(result) => {
                // If the dialer vanished meanwhile the stream is dropped and reset.
                let _ = request.send(result);
            }
            Poll::Pending => {
                // Too many streams await the peer's ACK; retried when one arrives.
                *pending = Some(request);
                break;
            }
        }
    }
    match conn.poll_next_inbound(cx) {
        Poll::Ready(Some(Ok(stream))) => Poll::Ready(Event::Inbound(stream)),
        Poll::Ready(Some(Err(e))) => Poll::Ready(Event::Ended(Some(e))),
        Poll::Ready(None) => Poll::Ready(Event::Ended(None)),
        Poll::Pending => Poll::Pending,
    }
}

/// Reads the port an inbound stream asks for and answers it.
async fn answer_inbound(stream: yamux::Stream, registry: Arc<PortRegistry<YamuxStream>>) {
    let mut stream = FuturesAsyncReadCompatExt::compat(stream);
    let attempt = async {
        let mut port = [0u8; 4];
        stream.read_exact(&mut port).await?;
        let port = u32::from_le_bytes(port);
        let permit = match registry.lookup(port) {
            Some(queue) => queue.reserve_owned().await.ok(),
            None => None,
        };
        match permit {
            Some(permit) => {
                stream.write_all(&[ACCEPTED]).await?;
                stream.flush().await?;
                Ok::<_, io::Error>(Some(permit))
            }
            None => {
                tracing::debug!(port, "mux stream for a port nobody listens on");
                stream.write_all(&[NO_LISTENER]).await?;
                stream.shutdown().await?;
                Ok(None)
            }
        }
    };
    // Bound to a variable so `attempt`'s borrow of `stream` ends here.
    let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await;
    match outcome {
        Ok(Ok(Some(permit))) => {
            permit.send(stream);
        }
        Ok(Ok(None)) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "inbound mux stream dropped"),
        Err(_) => tracing::debug!("inbound mux stream dropped: port handshake timed out"),
    }
}

/// The session's byte stream, reporting its end the moment it is observed —
/// before yamux wakes the streams — so that anyone who sees a stream fail
/// because of it also sees the session as closed.
struct WatchedIo<S> {
    io: S,
    closed: watch::Sender<bool>,
}

impl<S> WatchedIo<S> {
    fn observe<T>(&self, result: &Poll<io::Result<T>>) {
        if let Poll::Ready(Err(_)) = result {
            self.closed.send_replace(true);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let wanted = buf.remaining() > 0;
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        self.observe(&result);
        if matches!(result, Poll::Ready(Ok(()))) && wanted && buf.filled().len() == before {
            self.closed.send_replace(true); // end of stream
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.observe(&result);
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_flush(cx);
        self.observe(&result);
        result
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_shutdown(cx);
        self.observe(&result);
        result
    }
}

/// Streams per session: yamux's default (a process has up to three: stdin, stdout, stderr).
const MAX_STREAMS: usize = 512;

/// yamux with what a peer can make this side buffer bounded: each stream's window is yamux's
/// 256 KiB, and the whole session's is the least yamux allows for that many streams (128 MiB,
/// where its default would let a hostile guest fill 1 GiB of the host).
fn config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(MAX_STREAMS)
        .set_max_connection_receive_window(Some(MAX_STREAMS * yamux::DEFAULT_CREDIT as usize));
    c
}
