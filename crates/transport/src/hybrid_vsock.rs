//! Hybrid vsock: a VM's vsock exposed to the host as Unix sockets, the
//! Firecracker / Cloud Hypervisor way.
//!
//! With base path `B`:
//! * host → guest port `P`: connect to `B`, send `CONNECT P\n`, receive
//!   `OK <local port>\n`, then the socket is the stream;
//! * guest → host port `P`: the VMM connects to `B_P`, where the host listens.
//!
//! [`Side::Guest`] plays the VMM and guest end on the host itself: it dials
//! `B_P` directly and serves `B`, answering `CONNECT` lines for the ports that
//! have a [`Listener`](crate::Listener).

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;

use crate::registry::{PortRegistry, Registration};
use crate::{BoxStream, Side, TransportError};

/// Longest `OK <n>\n` / `CONNECT <n>\n` line accepted, newline included.
const MAX_LINE: usize = 64;

/// How long the guest-side server waits for a client to complete its
/// `CONNECT` handshake before dropping it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Handshakes in progress at once on the guest-side server; further clients
/// wait in the kernel's accept queue.
const MAX_HANDSHAKES: usize = 64;

/// Pause after a failed accept (e.g. out of descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The first local port reported in `OK <n>`, like Firecracker's ephemeral ports.
const FIRST_LOCAL_PORT: u32 = 1024;

pub(crate) struct Hybrid {
    base: PathBuf,
    side: Side,
    /// Guest side only: the server on `base`, started by the first listen().
    guest_server: Mutex<Option<Arc<GuestServer>>>,
}

impl Hybrid {
    pub(crate) fn new(base: PathBuf, side: Side) -> Self {
        Hybrid {
            base,
            side,
            guest_server: Mutex::new(None),
        }
    }

    pub(crate) fn describe(&self) -> String {
        let side = match self.side {
            Side::Host => "host",
            Side::Guest => "guest",
        };
        format!("hybrid-vsock({side}) {}", self.base.display())
    }

    pub(crate) async fn dial(
        &self,
        port: u32,
        timeout: Duration,
    ) -> Result<BoxStream, TransportError> {
        let attempt = async {
            match self.side {
                Side::Host => self.host_connect(port).await,
                Side::Guest => {
                    let path = port_path(&self.base, port);
                    match UnixStream::connect(&path).await {
                        Ok(s) => Ok(Box::new(s) as BoxStream),
                        Err(e) => Err(TransportError::connect(
                            port,
                            format!("connect to {}", path.display()),
                            e,
                        )),
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::ConnectTimeout { port, timeout }),
        }
    }

    /// Host → guest: the `CONNECT` handshake on the base socket.
    async fn host_connect(&self, port: u32) -> Result<BoxStream, TransportError> {
        let base = self.base.display();
        let mut s = UnixStream::connect(&self.base)
            .await
            .map_err(|e| TransportError::connect(port, format!("connect to {base}"), e))?;
        s.write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(|e| {
                TransportError::connect(port, format!("send CONNECT {port} to {base}"), e)
            })?;
        match read_line(&mut s, MAX_LINE).await {
            Ok(line) => match parse_decimal_after(b"OK ", &line) {
                Some(_local_port) => Ok(Box::new(s)),
                None => Err(TransportError::Protocol(format!(
                    "{base}: unexpected reply to CONNECT {port}: \"{}\"",
                    printable(&line)
                ))),
            },
            Err(LineError::Eof { partial }) if partial.is_empty() => Err(TransportError::Refused {
                port,
                reason: format!(
                    "{base} closed the connection without OK (nothing listening on that guest port?)"
                ),
            }),
            Err(LineError::Eof { partial }) => Err(TransportError::Protocol(format!(
                "{base}: reply to CONNECT {port} ended before its newline: \"{}\"",
                printable(&partial)
            ))),
            Err(LineError::TooLong) => Err(TransportError::Protocol(format!(
                "{base}: reply to CONNECT {port} is longer than {MAX_LINE} bytes"
            ))),
            Err(LineError::Io(e)) => Err(TransportError::connect(
                port,
                format!("read reply to CONNECT {port} from {base}"),
                e,
            )),
        }
    }

    pub(crate) fn listen(&self, port: u32) -> Result<HybridListener, TransportError> {
        match self.side {
            Side::Host => {
                let path = port_path(&self.base, port);
                let (listener, bound) = bind_socket(&path, || TransportError::AddrInUse { port })?;
                Ok(HybridListener::Host {
                    port,
                    listener,
                    _bound: bound,
                })
            }
            Side::Guest => {
                let server = self.guest_server()?;
                let registration = server.registry.register(port)?;
                Ok(HybridListener::Guest {
                    registration,
                    _server: server,
                })
            }
        }
    }

    /// Starts the guest-side server on the base socket, once per transport.
    fn guest_server(&self) -> Result<Arc<GuestServer>, TransportError> {
        let mut slot = self
            .guest_server
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(server) = &*slot {
            return Ok(Arc::clone(server));
        }
        let base = self.base.clone();
        let (listener, bound) = bind_socket(&base, || {
            TransportError::io(
                format!(
                    "serve hybrid vsock on {}: already served by another transport in this process",
                    base.display()
                ),
                io::ErrorKind::AddrInUse.into(),
            )
        })?;
        let registry = PortRegistry::new();
        let task = tokio::spawn(serve(listener, Arc::clone(&registry), base)).abort_handle();
        let server = Arc::new(GuestServer {
            registry,
            task,
            _bound: bound,
        });
        *slot = Some(Arc::clone(&server));
        Ok(server)
    }
}

/// `B_P`: where guest-initiated connections to host port `P` arrive.
fn port_path(base: &Path, port: u32) -> PathBuf {
    let mut p = OsString::from(base.as_os_str());
    p.push(format!("_{port}"));
    PathBuf::from(p)
}

pub(crate) enum HybridListener {
    Host {
        port: u32,
        // Declared before `_bound` so the socket closes before its file is removed.
        listener: UnixListener,
        _bound: BoundSocket,
    },
    Guest {
        registration: Registration<UnixStream>,
        _server: Arc<GuestServer>,
    },
}

impl HybridListener {
    pub(crate) async fn accept(&mut self) -> Result<BoxStream, TransportError> {
        match self {
            HybridListener::Host {
                port,
                listener,
                _bound,
            } => match listener.accept().await {
                Ok((s, _)) => Ok(Box::new(s)),
                Err(e) => Err(TransportError::io(
                    format!("accept for port {port} on {}", _bound.path.display()),
                    e,
                )),
            },
            HybridListener::Guest { registration, .. } => match registration.rx.recv().await {
                Some(s) => Ok(Box::new(s)),
                // The registry holds our sender for as long as we are registered,
                // so this only happens if the server was torn down underneath us.
                None => Err(TransportError::SessionClosed),
            },
        }
    }
}

/// The guest-side server on the base socket; stops when the last transport
/// clone and listener using it are gone.
pub(crate) struct GuestServer {
    registry: Arc<PortRegistry<UnixStream>>,
    task: AbortHandle,
    _bound: BoundSocket,
}

impl Drop for GuestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: UnixListener, registry: Arc<PortRegistry<UnixStream>>, base: PathBuf) {
    let next_local_port = Arc::new(AtomicU32::new(FIRST_LOCAL_PORT));
    let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return; // never closed; nothing sensible to do if it were
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handshake(
                    stream,
                    Arc::clone(&registry),
                    Arc::clone(&next_local_port),
                    slot,
                ));
            }
            Err(e) => {
                tracing::warn!(path = %base.display(), error = %e, "hybrid vsock accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
            }
        }
    }
}

/// Reads `CONNECT P\n` and hands the stream to the listener on `P` after
/// answering `OK <n>\n`. Any failure just closes the connection, which the
/// dialer sees as a refusal.
async fn handshake(
    mut stream: UnixStream,
    registry: Arc<PortRegistry<UnixStream>>,
    next_local_port: Arc<AtomicU32>,
    _slot: OwnedSemaphorePermit,
) {
    let attempt = async {
        let line = match read_line(&mut stream, MAX_LINE).await {
            Ok(line) => line,
            Err(e) => return Err(format!("reading CONNECT line: {e:?}")),
        };
        let Some(port) = parse_decimal_after(b"CONNECT ", &line) else {
            return Err(format!("not a CONNECT line: \"{}\"", printable(&line)));
        };
        let Some(queue) = registry.lookup(port) else {
            return Err(format!("no listener on port {port}"));
        };
        // Reserve the queue slot before answering so an OK is never followed by a drop.
        let Ok(permit) = queue.reserve_owned().await else {
            return Err(format!("listener on port {port} went away"));
        };
        let local_port = next_local_port.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = stream
            .write_all(format!("OK {local_port}\n").as_bytes())
            .await
        {
            return Err(format!("writing OK for port {port}: {e}"));
        }
        Ok(permit)
    };
    // Bound to a variable so `attempt`'s borrow of `stream` ends here.
    let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await;
    match outcome {
        Ok(Ok(permit)) => {
            permit.send(stream);
        }
        Ok(Err(why)) => tracing::debug!("hybrid vsock connection dropped: {why}"),
        Err(_) => tracing::debug!("hybrid vsock connection dropped: handshake timed out"),
    }
}

#[derive(Debug)]
enum LineError {
    /// The peer closed before a newline; holds what it did send.
    Eof {
        partial: Vec<u8>,
    },
    TooLong,
    Io(io::Error),
}

/// Reads one `\n`-terminated line of at most `max` bytes (newline included)
/// and returns it without the newline. Reads byte by byte so that nothing past
/// the newline is consumed: whatever follows belongs to the stream's user.
async fn read_line<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Vec<u8>, LineError> {
    let mut line = Vec::with_capacity(max);
    while line.len() < max {
        let mut byte = [0u8; 1];
        match r.read(&mut byte).await {
            Ok(0) => return Err(LineError::Eof { partial: line }),
            Ok(_) if byte[0] == b'\n' => return Ok(line),
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(LineError::Io(e)),
        }
    }
    Err(LineError::TooLong)
}

/// Parses `<prefix><decimal u32>` strictly: digits only, no sign, no spaces.
fn parse_decimal_after(prefix: &[u8], line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(prefix)?;
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A peer's bytes made safe for an error message.
fn printable(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

/// Socket paths bound by this process, so that a second listen on the same
/// path is refused instead of silently replacing the first one's socket.
static BOUND_PATHS: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

fn bound_paths() -> MutexGuard<'static, Option<HashSet<PathBuf>>> {
    BOUND_PATHS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A Unix socket file this process created; removed on drop if it is still ours.
pub(crate) struct BoundSocket {
    path: PathBuf,
    /// (device, inode) of the file we created, to avoid deleting a successor's.
    identity: Option<(u64, u64)>,
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        if let (Some(ours), Ok(meta)) = (self.identity, std::fs::symlink_metadata(&self.path))
            && (meta.dev(), meta.ino()) == ours
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::debug!(path = %self.path.display(), error = %e, "removing socket file failed");
        }
        if let Some(set) = bound_paths().as_mut() {
            set.remove(&self.path);
        }
    }
}

/// Binds a Unix listener at `path`, first removing a stale socket file left
/// by an earlier run. Refuses (with `in_use()`) if this process already
/// listens there, and refuses to delete anything that is not a socket.
fn bind_socket(
    path: &Path,
    in_use: impl FnOnce() -> TransportError,
) -> Result<(UnixListener, BoundSocket), TransportError> {
    if !bound_paths()
        .get_or_insert_with(HashSet::new)
        .insert(path.to_path_buf())
    {
        return Err(in_use());
    }
    // From here on the guard owns the set entry, so early returns release it.
    let mut bound = BoundSocket {
        path: path.to_path_buf(),
        identity: None,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if let Err(e) = std::fs::remove_file(path)
                && e.kind() != io::ErrorKind::NotFound
            {
                return Err(TransportError::io(
                    format!("remove stale socket {}", path.display()),
                    e,
                ));
            }
        }
        Ok(_) => {
            return Err(TransportError::io(
                format!(
                    "listen on {}: the path exists and is not a socket",
                    path.display()
                ),
                io::ErrorKind::AlreadyExists.into(),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(TransportError::io(format!("inspect {}", path.display()), e)),
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| TransportError::io(format!("bind {}", path.display()), e))?;
    bound.identity = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()));
    Ok((listener, bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies_strictly() {
        assert_eq!(parse_decimal_after(b"OK ", b"OK 1024"), Some(1024));
        assert_eq!(
            parse_decimal_after(b"OK ", b"OK 4294967295"),
            Some(u32::MAX)
        );
        assert_eq!(parse_decimal_after(b"OK ", b"OK 4294967296"), None);
        assert_eq!(parse_decimal_after(b"OK ", b"OK +5"), None);
        assert_eq!(parse_decimal_after(b"OK ", b"OK "), None);
        assert_eq!(parse_decimal_after(b"OK ", b"OK 5 "), None);
        assert_eq!(parse_decimal_after(b"OK ", b"ok 5"), None);
        assert_eq!(parse_decimal_after(b"OK ", b"OK 5\r"), None);
        assert_eq!(
            parse_decimal_after(b"CONNECT ", b"CONNECT 1073741824"),
            Some(0x4000_0000)
        );
    }

    #[test]
    fn port_path_appends_decimal_port() {
        assert_eq!(
            port_path(Path::new("/tmp/vm.sock"), 0x4000_0000),
            PathBuf::from("/tmp/vm.sock_1073741824")
        );
    }

    #[tokio::test]
    async fn read_line_stops_at_newline_and_bounds_length() {
        let mut input: &[u8] = b"OK 7\nrest";
        assert_eq!(read_line(&mut input, MAX_LINE).await.unwrap(), b"OK 7");
        assert_eq!(input, b"rest");

        let long = vec![b'A'; 100];
        let mut input: &[u8] = &long;
        assert!(matches!(
            read_line(&mut input, MAX_LINE).await,
            Err(LineError::TooLong)
        ));
        // Exactly 64 bytes including the newline is still fine.
        let mut exact = vec![b'1'; MAX_LINE - 1];
        exact.push(b'\n');
        let mut input: &[u8] = &exact;
        assert_eq!(
            read_line(&mut input, MAX_LINE).await.unwrap().len(),
            MAX_LINE - 1
        );

        let mut input: &[u8] = b"OK";
        assert!(matches!(
            read_line(&mut input, MAX_LINE).await,
            Err(LineError::Eof { partial }) if partial == b"OK"
        ));
    }
}
