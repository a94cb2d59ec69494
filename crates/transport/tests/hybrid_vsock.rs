//! Hybrid vsock over Unix sockets: both sides in one process, plus raw peers
//! that misbehave on purpose.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use transport::{Side, Transport, TransportError};

/// Upper bound for anything that should finish promptly; only a safety net.
const SAFETY: Duration = Duration::from_secs(10);
const PORT: u32 = 0x4000_0000;

/// A fresh, short directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ftr-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn base(&self) -> PathBuf {
        self.0.join("vm.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn port_path(base: &Path, port: u32) -> PathBuf {
    PathBuf::from(format!("{}_{port}", base.display()))
}

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(SAFETY, f)
        .await
        .expect("operation did not finish in time")
}

/// Sends `a` from `x` to `y` and `b` back, checking both arrive intact.
async fn exchange(x: &mut transport::BoxStream, y: &mut transport::BoxStream, a: &[u8], b: &[u8]) {
    x.write_all(a).await.unwrap();
    let mut got = vec![0u8; a.len()];
    y.read_exact(&mut got).await.unwrap();
    assert_eq!(got, a);
    y.write_all(b).await.unwrap();
    let mut got = vec![0u8; b.len()];
    x.read_exact(&mut got).await.unwrap();
    assert_eq!(got, b);
}

#[tokio::test]
async fn host_listen_guest_dial_round_trip() {
    let dir = TempDir::new();
    let host = Transport::hybrid_vsock(dir.base(), Side::Host);
    let guest = Transport::hybrid_vsock(dir.base(), Side::Guest);

    let mut listener = host.listen(PORT).await.unwrap();
    assert_eq!(listener.port(), PORT);
    assert!(
        std::fs::symlink_metadata(port_path(&dir.base(), PORT))
            .unwrap()
            .file_type()
            .is_socket()
    );

    let (dialed, accepted) = bounded(async {
        tokio::join!(guest.dial(PORT, Duration::from_secs(2)), listener.accept())
    })
    .await;
    let (mut g, mut h) = (dialed.unwrap(), accepted.unwrap());
    bounded(exchange(&mut g, &mut h, b"hello host", b"hello guest")).await;

    // Half-close is passed through: the host sees EOF and can still answer.
    g.shutdown().await.unwrap();
    let mut rest = Vec::new();
    bounded(h.read_to_end(&mut rest)).await.unwrap();
    assert!(rest.is_empty());
    h.write_all(b"bye").await.unwrap();
    drop(h);
    let mut rest = Vec::new();
    bounded(g.read_to_end(&mut rest)).await.unwrap();
    assert_eq!(rest, b"bye");
}

#[tokio::test]
async fn guest_listen_host_dial_round_trip() {
    let dir = TempDir::new();
    let host = Transport::hybrid_vsock(dir.base(), Side::Host);
    let guest = Transport::hybrid_vsock(dir.base(), Side::Guest);

    let mut listener = guest.listen(PORT).await.unwrap();
    // A second port on the same guest server, to check the routing.
    let mut other = guest.listen(PORT + 1).await.unwrap();

    for round in 0..3u8 {
        let (dialed, accepted) = bounded(async {
            tokio::join!(host.dial(PORT, Duration::from_secs(2)), listener.accept())
        })
        .await;
        let (mut h, mut g) = (dialed.unwrap(), accepted.unwrap());
        bounded(exchange(&mut h, &mut g, &[round; 3000], b"from guest")).await;
    }

    let (dialed, accepted) = bounded(async {
        tokio::join!(host.dial(PORT + 1, Duration::from_secs(2)), other.accept())
    })
    .await;
    let (mut h, mut g) = (dialed.unwrap(), accepted.unwrap());
    bounded(exchange(&mut h, &mut g, b"other port", b"ack")).await;
}

/// Reads from `s` until EOF or an error (a peer closing with unread data
/// makes Linux report ECONNRESET), returning whatever arrived.
async fn read_until_closed(s: &mut UnixStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// The guest-side server speaks the Firecracker protocol on the wire: `OK`
/// with a local port counting from 1024, data may follow the OK at once, and
/// bad requests get the connection closed without a reply.
#[tokio::test]
async fn guest_server_speaks_connect_protocol() {
    let dir = TempDir::new();
    let guest = Transport::hybrid_vsock(dir.base(), Side::Guest);
    let mut listener = guest.listen(5).await.unwrap();

    for expected in [&b"OK 1024\n!"[..], &b"OK 1025\n!"[..]] {
        let mut raw = UnixStream::connect(dir.base()).await.unwrap();
        raw.write_all(b"CONNECT 5\n").await.unwrap();
        let mut accepted = bounded(listener.accept()).await.unwrap();
        accepted.write_all(b"!").await.unwrap();
        let mut reply = vec![0u8; expected.len()];
        bounded(raw.read_exact(&mut reply)).await.unwrap();
        assert_eq!(reply, expected);
    }

    let overlong = [b'9'; 200];
    for request in [
        &b"CONNECT 6\n"[..],
        b"HELLO\n",
        b"CONNECT +5\n",
        b"CONNECT 5 \n",
        &overlong,
    ] {
        let mut raw = UnixStream::connect(dir.base()).await.unwrap();
        raw.write_all(request).await.unwrap();
        let reply = bounded(read_until_closed(&mut raw)).await;
        assert!(
            reply.is_empty(),
            "request {:?} got reply {:?}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(&reply)
        );
    }
}

/// A stand-in VMM on `base` for one connection: reads the request line,
/// writes `reply`, then closes at once (`close`) or holds the connection
/// until the client goes away. Yields the request line it received.
fn fake_vmm(base: &Path, reply: &[u8], close: bool) -> tokio::task::JoinHandle<Vec<u8>> {
    let listener = UnixListener::bind(base).unwrap();
    let reply = reply.to_vec();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut byte = [0u8; 1];
        while s.read(&mut byte).await.unwrap() == 1 {
            request.push(byte[0]);
            if byte[0] == b'\n' {
                break;
            }
        }
        s.write_all(&reply).await.unwrap();
        if !close {
            read_until_closed(&mut s).await;
        }
        request
    })
}

#[tokio::test]
async fn host_dial_without_guest_listener_is_refused() {
    let dir = TempDir::new();
    let host = Transport::hybrid_vsock(dir.base(), Side::Host);

    // No VMM at all.
    let err = host.dial(PORT, Duration::from_secs(2)).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Refused { port: PORT, .. }),
        "{err}"
    );

    // A VMM, but nobody on that guest port.
    let guest = Transport::hybrid_vsock(dir.base(), Side::Guest);
    let _listener = guest.listen(PORT).await.unwrap();
    let err = host
        .dial(PORT + 7, Duration::from_secs(2))
        .await
        .unwrap_err();
    match &err {
        TransportError::Refused { port, reason } => {
            assert_eq!(*port, PORT + 7);
            assert!(reason.contains("vm.sock"), "{reason}");
        }
        other => panic!("expected Refused, got {other}"),
    }
    assert!(err.to_string().contains(&(PORT + 7).to_string()), "{err}");
}

#[tokio::test]
async fn host_dial_to_silent_server_times_out() {
    let dir = TempDir::new();
    let vmm = fake_vmm(&dir.base(), b"", false);
    let host = Transport::hybrid_vsock(dir.base(), Side::Host);

    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let err = bounded(host.dial(PORT, timeout)).await.unwrap_err();
    let elapsed = start.elapsed();
    assert!(
        matches!(err, TransportError::ConnectTimeout { port: PORT, timeout: t } if t == timeout),
        "{err}"
    );
    assert!(elapsed >= timeout, "gave up early: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    // The dial did send its request, and closed the connection when it gave up.
    assert_eq!(
        bounded(vmm).await.unwrap(),
        format!("CONNECT {PORT}\n").as_bytes()
    );
}

#[tokio::test]
async fn host_dial_rejects_bad_replies() {
    let overlong = [b'A'; 100];
    let overlong_with_newline = [&[b'1'; 70][..], b"\n"].concat();
    let cases: [(&[u8], bool); 7] = [
        (b"HELLO\n", false),
        (b"OK abc\n", false),
        (b"OK 99999999999\n", false),
        (b"OK\n", false),
        (&overlong, false),
        (&overlong_with_newline, false),
        (b"OK 1", true), // truncated, then closed
    ];
    for (reply, close) in cases {
        let dir = TempDir::new();
        let vmm = fake_vmm(&dir.base(), reply, close);
        let host = Transport::hybrid_vsock(dir.base(), Side::Host);
        let err = bounded(host.dial(PORT, Duration::from_secs(5)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TransportError::Protocol(_)),
            "reply {:?}: {err}",
            String::from_utf8_lossy(reply)
        );
        assert!(err.to_string().contains("vm.sock"), "{err}");
        bounded(vmm).await.unwrap();
    }

    // Closing without any reply is how a VMM says "nobody listens there".
    let dir = TempDir::new();
    let vmm = fake_vmm(&dir.base(), b"", true);
    let host = Transport::hybrid_vsock(dir.base(), Side::Host);
    let err = bounded(host.dial(PORT, Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::Refused { port: PORT, .. }),
        "{err}"
    );
    bounded(vmm).await.unwrap();
}

#[tokio::test]
async fn host_dial_keeps_data_sent_right_after_ok() {
    let dir = TempDir::new();
    let vmm = fake_vmm(&dir.base(), b"OK 77\nhello", true);
    let host = Transport::hybrid_vsock(dir.base(), Side::Host);
    let mut s = bounded(host.dial(PORT, Duration::from_secs(5)))
        .await
        .unwrap();
    let mut got = Vec::new();
    bounded(s.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"hello");
    bounded(vmm).await.unwrap();
}

#[tokio::test]
async fn guest_dial_without_listener_fails() {
    let dir = TempDir::new();
    let guest = Transport::hybrid_vsock(dir.base(), Side::Guest);

    // No socket file at all.
    let err = guest.dial(PORT, Duration::from_secs(2)).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Refused { port: PORT, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("vm.sock_1073741824"), "{err}");

    // A socket file nobody listens on any more.
    drop(std::os::unix::net::UnixListener::bind(port_path(&dir.base(), PORT)).unwrap());
    let err = guest.dial(PORT, Duration::from_secs(2)).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Refused { port: PORT, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn listen_twice_is_addr_in_use() {
    let dir = TempDir::new();

    let guest = Transport::hybrid_vsock(dir.base(), Side::Guest);
    let first = guest.listen(9).await.unwrap();
    let err = guest.clone().listen(9).await.unwrap_err();
    assert!(
        matches!(err, TransportError::AddrInUse { port: 9 }),
        "{err}"
    );
    drop(first);
    let _again = guest.listen(9).await.unwrap();

    let host = Transport::hybrid_vsock(dir.base(), Side::Host);
    let first = host.listen(9).await.unwrap();
    let err = host.listen(9).await.unwrap_err();
    assert!(
        matches!(err, TransportError::AddrInUse { port: 9 }),
        "{err}"
    );
    // A separate transport value on the same path must not steal the socket either.
    let other = Transport::hybrid_vsock(dir.base(), Side::Host);
    let err = other.listen(9).await.unwrap_err();
    assert!(
        matches!(err, TransportError::AddrInUse { port: 9 }),
        "{err}"
    );
    drop(first);
    let _again = other.listen(9).await.unwrap();
}

#[tokio::test]
async fn dropping_host_listener_removes_socket_file() {
    let dir = TempDir::new();
    let host = Transport::hybrid_vsock(dir.base(), Side::Host);
    let path = port_path(&dir.base(), 11);
    let listener = host.listen(11).await.unwrap();
    assert!(path.exists());
    drop(listener);
    assert!(!path.exists(), "{} is still there", path.display());
}

#[tokio::test]
async fn dropping_guest_side_removes_base_socket_and_unregisters() {
    let dir = TempDir::new();
    let host = Transport::hybrid_vsock(dir.base(), Side::Host);
    let guest = Transport::hybrid_vsock(dir.base(), Side::Guest);
    let listener = guest.listen(12).await.unwrap();
    assert!(dir.base().exists());

    drop(listener);
    let err = host.dial(12, Duration::from_secs(2)).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Refused { port: 12, .. }),
        "{err}"
    );

    drop(guest);
    assert!(!dir.base().exists());
}

#[tokio::test]
async fn stale_socket_file_is_replaced() {
    let dir = TempDir::new();
    let path = port_path(&dir.base(), 13);
    // Left behind by an earlier run: the file exists but nobody listens.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let host = Transport::hybrid_vsock(dir.base(), Side::Host);
    let guest = Transport::hybrid_vsock(dir.base(), Side::Guest);
    let mut listener = host.listen(13).await.unwrap();
    let (dialed, accepted) =
        bounded(async { tokio::join!(guest.dial(13, Duration::from_secs(2)), listener.accept()) })
            .await;
    bounded(exchange(
        &mut dialed.unwrap(),
        &mut accepted.unwrap(),
        b"a",
        b"b",
    ))
    .await;

    // Same for the guest side's base socket.
    drop(std::os::unix::net::UnixListener::bind(dir.base()).unwrap());
    let mut glistener = guest.listen(14).await.unwrap();
    let (dialed, accepted) =
        bounded(async { tokio::join!(host.dial(14, Duration::from_secs(2)), glistener.accept()) })
            .await;
    bounded(exchange(
        &mut dialed.unwrap(),
        &mut accepted.unwrap(),
        b"c",
        b"d",
    ))
    .await;
}

#[tokio::test]
async fn a_regular_file_is_never_replaced() {
    let dir = TempDir::new();
    let path = port_path(&dir.base(), 15);
    std::fs::write(&path, b"precious").unwrap();
    let host = Transport::hybrid_vsock(dir.base(), Side::Host);
    let err = host.listen(15).await.unwrap_err();
    assert!(matches!(err, TransportError::Io { .. }), "{err}");
    assert!(err.to_string().contains("vm.sock_15"), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
}

#[test]
fn describe_names_side_and_path() {
    let t = Transport::hybrid_vsock("/run/x/vm.sock", Side::Guest);
    assert_eq!(t.describe(), "hybrid-vsock(guest) /run/x/vm.sock");
    let t = Transport::hybrid_vsock("/run/x/vm.sock", Side::Host);
    assert_eq!(t.describe(), "hybrid-vsock(host) /run/x/vm.sock");
}
