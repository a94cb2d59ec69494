//! Byte streams addressed by port.
//!
//! The host and the guest agent talk over *ports*: the guest dials the host on
//! the bridge port (`0x4000_0000`) and on per-process stdio ports, and the
//! host listens on them. A [`Transport`] offers the same two operations —
//! [`Transport::listen`] and [`Transport::dial`] — over three carriers:
//!
//! * **AF_VSOCK** ([`Transport::vsock`]): the kernel's virtio socket family.
//!   Used inside a VM (guest dials CID 2) and on a host with `vhost-vsock`
//!   (host dials the VM's CID).
//! * **Hybrid vsock** ([`Transport::hybrid_vsock`]): the Firecracker / Cloud
//!   Hypervisor convention where the VMM exposes the guest's vsock to the host
//!   as Unix sockets. The host reaches guest port `P` by connecting to the
//!   base socket `B` and sending `CONNECT P\n` (answered by `OK <n>\n`); guest
//!   connections to host port `P` arrive on the Unix socket `B_P`. The
//!   [`Side::Guest`] flavour emulates the VMM plus guest end on the host itself,
//!   so the agent can run without a VM.
//! * **Multiplexer** ([`Transport::mux`]): many streams over one byte stream
//!   (for example a virtio-serial port) using yamux. Each new stream starts
//!   with a 4-byte little-endian port number and is answered with one status
//!   byte. [`Transport::mux_reconnecting`] follows a carrier that comes and goes
//!   (a virtio-serial port whose host end reconnects): each dial uses whichever
//!   session is current.
//!
//! Every dial is bounded by a caller-supplied timeout; [`DEFAULT_CONNECT_TIMEOUT`]
//! is a sensible default.

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod hybrid_vsock;
mod mux;
mod registry;
pub mod resumable;
pub mod session_hello;
mod vsock;

pub use mux::{MuxRole, MuxSession};

/// Reads once (waiting for data), then keeps taking whatever is already available, without
/// waiting, until `buf` is full. A relay that forwards one large chunk instead of many small
/// ones (a writer doing 4 KiB writes into a pipe) makes a fraction of the system calls and
/// wakeups downstream. Returns 0 only at end of stream.
pub async fn read_available<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
) -> io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut n = r.read(buf).await?;
    if n == 0 {
        return Ok(0);
    }
    while n < buf.len() {
        let more = std::future::poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf[n..]);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => Poll::Ready(Ok(Some(rb.filled().len()))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Ready(Ok(None)),
            }
        })
        .await;
        match more {
            Ok(Some(m)) if m > 0 => n += m,
            // Nothing more right now, or end of stream / an error that the next call reports.
            _ => break,
        }
    }
    Ok(n)
}

/// How long a connect may take unless the caller says otherwise.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Any bidirectional byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

// Lets `Result<BoxStream, _>` be unwrapped and logged like any other result.
impl fmt::Debug for dyn Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Stream")
    }
}

/// A type-erased [`Stream`], as returned by [`Transport::dial`] and [`Listener::accept`].
pub type BoxStream = Box<dyn Stream>;

/// Why a transport operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer did not complete the connection within the timeout.
    #[error("connecting to port {port} timed out after {timeout:?}")]
    ConnectTimeout { port: u32, timeout: Duration },
    /// Nobody is listening on the port (or the peer turned the connection down).
    #[error("connection to port {port} refused: {reason}")]
    Refused { port: u32, reason: String },
    /// Somebody already listens on this port.
    #[error("port {port} is already being listened on")]
    AddrInUse { port: u32 },
    /// An operating-system call failed. `context` names the operation and path or port.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The peer sent something that does not follow the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The multiplexer session has ended; build a new one.
    #[error("multiplexer session closed")]
    SessionClosed,
    /// The operation is not possible on this system or transport.
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl TransportError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        TransportError::Io {
            context: context.into(),
            source,
        }
    }

    /// Classifies a failed connect: "nobody there" becomes [`TransportError::Refused`]
    /// so callers can treat it as retryable, anything else stays an I/O error.
    pub(crate) fn connect(port: u32, what: String, source: io::Error) -> Self {
        match source.kind() {
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::NotFound => TransportError::Refused {
                port,
                reason: format!("{what}: {source}"),
            },
            _ => TransportError::io(what, source),
        }
    }
}

/// Which end of a hybrid-vsock connection this process plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The VMM's host end: dial via `CONNECT`, listen on `B_<port>`.
    Host,
    /// The guest end, emulated on the host (no VM): dial `B_<port>`, serve `B`.
    Guest,
}

/// Opens and accepts port-addressed streams. Cheap to clone; clones share state
/// (the hybrid-vsock guest-side server, the mux session).
#[derive(Clone)]
pub struct Transport {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Vsock { peer_cid: u32 },
    Hybrid(Arc<hybrid_vsock::Hybrid>),
    Mux(MuxSession),
    MuxReconnecting(tokio::sync::watch::Receiver<Option<MuxSession>>),
}

impl Transport {
    /// AF_VSOCK. `peer_cid` is the CID that [`dial`](Self::dial) connects to
    /// (guest side: 2 = host; host side: the VM's CID). [`listen`](Self::listen)
    /// binds `VMADDR_CID_ANY`.
    pub fn vsock(peer_cid: u32) -> Transport {
        Transport {
            kind: Kind::Vsock { peer_cid },
        }
    }

    /// Hybrid vsock over Unix sockets rooted at `base` (Firecracker / Cloud
    /// Hypervisor convention). See the crate documentation for the protocol.
    pub fn hybrid_vsock(base: impl Into<PathBuf>, side: Side) -> Transport {
        Transport {
            kind: Kind::Hybrid(Arc::new(hybrid_vsock::Hybrid::new(base.into(), side))),
        }
    }

    /// Multiplexer over one byte stream.
    pub fn mux(session: MuxSession) -> Transport {
        Transport {
            kind: Kind::Mux(session),
        }
    }

    /// Multiplexer over a carrier that reconnects: the owner publishes each new
    /// session (and `None` while the carrier is down). A dial waits, within its
    /// timeout, for a live session; a listener belongs to the session current
    /// when it was made and ends with it.
    pub fn mux_reconnecting(
        sessions: tokio::sync::watch::Receiver<Option<MuxSession>>,
    ) -> Transport {
        Transport {
            kind: Kind::MuxReconnecting(sessions),
        }
    }

    /// Connects to `port` on the peer. The whole connect, including any
    /// handshake, is bounded by `timeout`; a single attempt is made.
    pub async fn dial(&self, port: u32, timeout: Duration) -> Result<BoxStream, TransportError> {
        match &self.kind {
            Kind::Vsock { peer_cid } => vsock::dial(*peer_cid, port, timeout).await,
            Kind::Hybrid(h) => h.dial(port, timeout).await,
            Kind::Mux(m) => m.dial(port, timeout).await,
            Kind::MuxReconnecting(sessions) => {
                let started = std::time::Instant::now();
                let mut sessions = sessions.clone();
                let live = |s: &Option<MuxSession>| s.as_ref().is_some_and(|s| !s.is_closed());
                let session = match tokio::time::timeout(timeout, sessions.wait_for(live)).await {
                    Ok(Ok(s)) => s.clone(),
                    // The owner is gone: no session will ever come.
                    Ok(Err(_)) => None,
                    Err(_) => return Err(TransportError::ConnectTimeout { port, timeout }),
                };
                let session = session.ok_or(TransportError::SessionClosed)?;
                session
                    .dial(port, timeout.saturating_sub(started.elapsed()))
                    .await
            }
        }
    }

    /// Starts listening on `port`. Dropping the [`Listener`] stops listening.
    pub async fn listen(&self, port: u32) -> Result<Listener, TransportError> {
        let inner = match &self.kind {
            Kind::Vsock { .. } => ListenerKind::Vsock(vsock::listen(port)?),
            Kind::Hybrid(h) => ListenerKind::Hybrid(h.listen(port)?),
            Kind::Mux(m) => ListenerKind::Mux(m.listen(port)?),
            Kind::MuxReconnecting(sessions) => {
                let current = sessions.borrow().clone();
                let session = current.ok_or(TransportError::SessionClosed)?;
                ListenerKind::Mux(session.listen(port)?)
            }
        };
        Ok(Listener { port, inner })
    }

    /// Human-readable description for logs, e.g. `hybrid-vsock(guest) /run/x/vm.sock`.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Vsock { peer_cid } => format!("vsock(peer cid {peer_cid})"),
            Kind::Hybrid(h) => h.describe(),
            Kind::Mux(m) => m.describe(),
            Kind::MuxReconnecting(sessions) => match &*sessions.borrow() {
                Some(s) => format!("{} (reconnecting)", s.describe()),
                None => "mux (reconnecting, no session)".to_owned(),
            },
        }
    }
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Transport").field(&self.describe()).finish()
    }
}

/// Accepts streams addressed to one port. Dropping it stops listening: the
/// port is unregistered, and for hybrid-vsock host side the socket file it
/// created is removed.
pub struct Listener {
    port: u32,
    inner: ListenerKind,
}

enum ListenerKind {
    Vsock(vsock::VsockPortListener),
    Hybrid(hybrid_vsock::HybridListener),
    Mux(mux::MuxListener),
}

impl Listener {
    /// The port this listener accepts connections for.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Waits for the next incoming stream. Cancel-safe: dropping the future
    /// (e.g. in `select!`) loses no connection.
    pub async fn accept(&mut self) -> Result<BoxStream, TransportError> {
        match &mut self.inner {
            ListenerKind::Vsock(l) => l.accept().await,
            ListenerKind::Hybrid(l) => l.accept().await,
            ListenerKind::Mux(l) => l.accept().await,
        }
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.inner {
            ListenerKind::Vsock(_) => "vsock",
            ListenerKind::Hybrid(_) => "hybrid-vsock",
            ListenerKind::Mux(_) => "mux",
        };
        f.debug_struct("Listener")
            .field("kind", &kind)
            .field("port", &self.port)
            .finish()
    }
}

/// A stream that keeps some shared state alive for as long as it is in use
/// (e.g. the mux session, whose driver must outlive every stream).
pub(crate) struct Anchored<S, A> {
    pub(crate) stream: S,
    pub(crate) _anchor: A,
}

impl<S: AsyncRead + Unpin, A: Unpin> AsyncRead for Anchored<S, A> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, A: Unpin> AsyncWrite for Anchored<S, A> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
