//! The yamux multiplexer over in-process byte streams.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use transport::{BoxStream, Listener, MuxRole, MuxSession, Transport, TransportError};

/// Upper bound for anything that should finish promptly; only a safety net.
const SAFETY: Duration = Duration::from_secs(60);
const DIAL: Duration = Duration::from_secs(10);
const MIB: usize = 1024 * 1024;

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(SAFETY, f)
        .await
        .expect("operation did not finish in time")
}

/// A host (client) and guest (server) session over a Unix socket pair.
fn pair() -> (MuxSession, MuxSession) {
    let (a, b) = UnixStream::pair().unwrap();
    (
        MuxSession::new(a, MuxRole::Client),
        MuxSession::new(b, MuxRole::Server),
    )
}

/// Dials `port` on `from` while accepting on `listener`.
async fn connect(from: &Transport, listener: &mut Listener) -> (BoxStream, BoxStream) {
    let port = listener.port();
    let (dialed, accepted) =
        bounded(async { tokio::join!(from.dial(port, DIAL), listener.accept()) }).await;
    (dialed.unwrap(), accepted.unwrap())
}

/// Deterministic pseudo-random bytes (xorshift64*), so both ends can produce
/// and check the same data without storing it.
struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    fn new(seed: u64) -> Pattern {
        Pattern {
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for byte in buf {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.used = 0;
            }
            *byte = self.word[self.used];
            self.used += 1;
        }
    }
}

/// Writes `len` pattern bytes, then half-closes.
async fn send_pattern<W: AsyncWrite + Unpin>(w: &mut W, seed: u64, len: usize) {
    let mut pattern = Pattern::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        pattern.fill(&mut buf[..n]);
        w.write_all(&buf[..n]).await.unwrap();
        left -= n;
    }
    w.shutdown().await.unwrap();
}

/// Reads exactly `len` pattern bytes followed by EOF, comparing every byte.
async fn expect_pattern<R: AsyncRead + Unpin>(r: &mut R, seed: u64, len: usize) {
    let mut pattern = Pattern::new(seed);
    let mut got = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut offset = 0;
    while offset < len {
        let n = r
            .read(&mut got[..(len - offset).min(64 * 1024)])
            .await
            .unwrap();
        assert!(n > 0, "EOF after {offset} of {len} bytes");
        pattern.fill(&mut want[..n]);
        assert!(got[..n] == want[..n], "data differs near offset {offset}");
        offset += n;
    }
    assert_eq!(r.read(&mut got).await.unwrap(), 0, "data after the end");
}

#[tokio::test]
async fn dial_and_accept_in_both_directions() {
    let (host, guest) = pair();
    let (host, guest) = (Transport::mux(host), Transport::mux(guest));
    assert_eq!(host.describe(), "mux(client)");
    assert_eq!(guest.describe(), "mux(server)");

    let mut on_host = host.listen(0x4000_0000).await.unwrap();
    let mut on_guest = guest.listen(0x4000_0000).await.unwrap();
    assert_eq!(on_host.port(), 0x4000_0000);

    let (mut g, mut h) = connect(&guest, &mut on_host).await;
    g.write_all(b"guest to host").await.unwrap();
    let mut buf = [0u8; 13];
    h.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"guest to host");
    h.write_all(b"reply").await.unwrap();
    let mut buf = [0u8; 5];
    g.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"reply");

    let (mut h2, mut g2) = connect(&host, &mut on_guest).await;
    h2.write_all(b"host to guest").await.unwrap();
    let mut buf = [0u8; 13];
    g2.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"host to guest");
}

#[tokio::test]
async fn works_over_an_in_memory_duplex() {
    let (a, b) = tokio::io::duplex(4096);
    let host = Transport::mux(MuxSession::new(a, MuxRole::Client));
    let guest = Transport::mux(MuxSession::new(b, MuxRole::Server));
    let mut listener = guest.listen(3).await.unwrap();
    let (mut h, mut g) = connect(&host, &mut listener).await;
    bounded(async { tokio::join!(send_pattern(&mut h, 1, MIB), expect_pattern(&mut g, 1, MIB)) })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_transfer_on_concurrent_streams() {
    const STREAMS: u64 = 4;
    const LEN: usize = 8 * MIB;
    let (host, guest) = pair();
    let (host, guest) = (Transport::mux(host), Transport::mux(guest));
    let mut listener = guest.listen(100).await.unwrap();

    let acceptor = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let stream = listener.accept().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(stream);
                let mut id = [0u8; 8];
                r.read_exact(&mut id).await.unwrap();
                let id = u64::from_le_bytes(id);
                tokio::join!(
                    expect_pattern(&mut r, 2 * id, LEN),
                    send_pattern(&mut w, 2 * id + 1, LEN)
                );
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });

    let mut dialers = Vec::new();
    for id in 0..STREAMS {
        let host = host.clone();
        dialers.push(tokio::spawn(async move {
            let stream = host.dial(100, DIAL).await.unwrap();
            let (mut r, mut w) = tokio::io::split(stream);
            w.write_all(&id.to_le_bytes()).await.unwrap();
            tokio::join!(
                send_pattern(&mut w, 2 * id, LEN),
                expect_pattern(&mut r, 2 * id + 1, LEN)
            );
        }));
    }
    bounded(async {
        for d in dialers {
            d.await.unwrap();
        }
        acceptor.await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn half_close_lets_the_peer_answer() {
    let (host, guest) = pair();
    let (host, guest) = (Transport::mux(host), Transport::mux(guest));
    let mut listener = guest.listen(5).await.unwrap();
    let (mut h, mut g) = connect(&host, &mut listener).await;

    h.write_all(b"question").await.unwrap();
    h.shutdown().await.unwrap();

    let mut got = Vec::new();
    bounded(g.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"question");
    g.write_all(b"answer after EOF").await.unwrap();
    g.shutdown().await.unwrap();

    let mut got = Vec::new();
    bounded(h.read_to_end(&mut got)).await.unwrap();
    assert_eq!(got, b"answer after EOF");
}

#[tokio::test]
async fn dial_to_unregistered_port_is_refused() {
    let (host, guest) = pair();
    let (host, guest) = (Transport::mux(host), Transport::mux(guest));

    let err = bounded(host.dial(42, DIAL)).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Refused { port: 42, .. }),
        "{err}"
    );
    let err = bounded(guest.dial(42, DIAL)).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Refused { port: 42, .. }),
        "{err}"
    );

    // Registered, then dropped: refused again.
    let listener = guest.listen(42).await.unwrap();
    drop(listener);
    let err = bounded(host.dial(42, DIAL)).await.unwrap_err();
    assert!(
        matches!(err, TransportError::Refused { port: 42, .. }),
        "{err}"
    );

    // And the session is still fine afterwards.
    let mut listener = guest.listen(43).await.unwrap();
    let (mut h, mut g) = connect(&host, &mut listener).await;
    h.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    g.read_exact(&mut b).await.unwrap();
}

#[tokio::test]
async fn listen_twice_is_addr_in_use() {
    let (host, _guest) = pair();
    let host = Transport::mux(host);
    let first = host.listen(8).await.unwrap();
    let err = host.clone().listen(8).await.unwrap_err();
    assert!(
        matches!(err, TransportError::AddrInUse { port: 8 }),
        "{err}"
    );
    drop(first);
    host.listen(8).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_streams_opened_and_closed() {
    const WORKERS: u32 = 10;
    const PER_WORKER: u32 = 100;
    let (host, guest) = pair();
    let (host, guest) = (Transport::mux(host), Transport::mux(guest));
    let mut listener = guest.listen(9).await.unwrap();

    let echo = tokio::spawn(async move {
        for _ in 0..WORKERS * PER_WORKER {
            let stream = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(stream);
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
        listener
    });

    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let host = host.clone();
        workers.push(tokio::spawn(async move {
            for i in 0..PER_WORKER {
                let mut s = host.dial(9, DIAL).await.unwrap();
                let msg = (worker * PER_WORKER + i).to_le_bytes();
                s.write_all(&msg).await.unwrap();
                s.shutdown().await.unwrap();
                let mut back = Vec::new();
                s.read_to_end(&mut back).await.unwrap();
                assert_eq!(back, msg);
            }
        }));
    }
    let mut listener = bounded(async {
        for w in workers {
            w.await.unwrap();
        }
        echo.await.unwrap()
    })
    .await;

    // The session is still usable.
    let (mut h, mut g) = connect(&host, &mut listener).await;
    h.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    g.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_reads_does_not_stall_other_streams() {
    let (host, guest) = pair();
    let (host, guest) = (Transport::mux(host), Transport::mux(guest));
    let mut listener = guest.listen(10).await.unwrap();

    // Stream A: the host pushes far more than any window; the guest doesn't read yet.
    let (mut a_host, mut a_guest) = connect(&host, &mut listener).await;
    let stuck_writer = tokio::spawn(async move {
        send_pattern(&mut a_host, 77, 4 * MIB).await;
    });

    // Stream B moves 8 MiB each way meanwhile.
    let (b_host, b_guest) = connect(&host, &mut listener).await;
    let (mut bhr, mut bhw) = tokio::io::split(b_host);
    let (mut bgr, mut bgw) = tokio::io::split(b_guest);
    bounded(async {
        tokio::join!(
            send_pattern(&mut bhw, 1, 8 * MIB),
            expect_pattern(&mut bgr, 1, 8 * MIB),
            send_pattern(&mut bgw, 2, 8 * MIB),
            expect_pattern(&mut bhr, 2, 8 * MIB),
        )
    })
    .await;

    // A's writer is held back by flow control, not lost: it completes once read.
    assert!(
        !stuck_writer.is_finished(),
        "4 MiB went through without a reader"
    );
    bounded(expect_pattern(&mut a_guest, 77, 4 * MIB)).await;
    bounded(stuck_writer).await.unwrap();
}

#[tokio::test]
async fn dial_times_out_when_the_peer_never_answers() {
    // The far end is a raw socket: it receives the stream open but never replies.
    let (a, _b) = UnixStream::pair().unwrap();
    let host = Transport::mux(MuxSession::new(a, MuxRole::Client));
    let timeout = Duration::from_millis(200);
    let err = bounded(host.dial(1, timeout)).await.unwrap_err();
    assert!(
        matches!(err, TransportError::ConnectTimeout { port: 1, timeout: t } if t == timeout),
        "{err}"
    );
}

#[tokio::test]
async fn dropping_the_underlying_stream_closes_the_session() {
    let (a, b) = UnixStream::pair().unwrap();
    let session = MuxSession::new(a, MuxRole::Client);
    let host = Transport::mux(session.clone());
    assert!(!session.is_closed());

    // An accept and a dial that are both waiting when the link goes away.
    let mut listener = host.listen(1).await.unwrap();
    let pending_accept = tokio::spawn(async move { listener.accept().await.map(drop) });
    let dialer = host.clone();
    let pending_dial = tokio::spawn(async move { dialer.dial(2, SAFETY).await.map(drop) });

    // Wait until the dial's port request has reached the peer before cutting the link.
    let mut b = b;
    assert_eq!(bounded(next_data_on(&mut b, 1)).await, 2u32.to_le_bytes());
    drop(b);

    bounded(session.closed()).await;
    assert!(session.is_closed());
    let err = bounded(pending_accept).await.unwrap().unwrap_err();
    assert!(matches!(err, TransportError::SessionClosed), "{err}");
    let err = bounded(pending_dial).await.unwrap().unwrap_err();
    assert!(matches!(err, TransportError::SessionClosed), "{err}");

    let err = host.dial(3, DIAL).await.unwrap_err();
    assert!(matches!(err, TransportError::SessionClosed), "{err}");
    let err = host.listen(4).await.unwrap_err();
    assert!(matches!(err, TransportError::SessionClosed), "{err}");
}

#[tokio::test]
async fn cutting_the_link_ends_open_streams_on_both_sides() {
    let (a1, a2) = UnixStream::pair().unwrap();
    let (b1, b2) = UnixStream::pair().unwrap();
    let host_session = MuxSession::new(a1, MuxRole::Client);
    let guest_session = MuxSession::new(b2, MuxRole::Server);
    // A relay in the middle stands in for the virtio-serial link.
    let link = tokio::spawn(async move {
        let (mut a2, mut b1) = (a2, b1);
        let _ = tokio::io::copy_bidirectional(&mut a2, &mut b1).await;
    });

    let host = Transport::mux(host_session.clone());
    let guest = Transport::mux(guest_session.clone());
    let mut listener = guest.listen(6).await.unwrap();
    let (mut h, mut g) = connect(&host, &mut listener).await;
    h.write_all(b"ok").await.unwrap();
    let mut buf = [0u8; 2];
    g.read_exact(&mut buf).await.unwrap();

    link.abort();
    let _ = link.await;
    bounded(async { tokio::join!(host_session.closed(), guest_session.closed()) }).await;

    // Reads end (EOF or error) rather than hanging, and writes fail.
    let read = bounded(h.read(&mut buf)).await;
    assert!(!matches!(read, Ok(n) if n > 0), "{read:?}");
    let read = bounded(g.read(&mut buf)).await;
    assert!(!matches!(read, Ok(n) if n > 0), "{read:?}");
    let write = bounded(async {
        g.write_all(b"more").await?;
        g.flush().await
    })
    .await;
    assert!(write.is_err(), "write on a dead session succeeded");
    let err = bounded(listener.accept()).await.unwrap_err();
    assert!(matches!(err, TransportError::SessionClosed), "{err}");
}

#[tokio::test]
async fn dropping_every_handle_closes_the_peer_session() {
    let (host, guest) = pair();
    let guest_transport = Transport::mux(guest.clone());
    let mut listener = guest_transport.listen(1).await.unwrap();
    let host_transport = Transport::mux(host.clone());
    let (mut h, mut g) = connect(&host_transport, &mut listener).await;

    // The stream alone keeps the host session alive.
    drop(host_transport);
    drop(host);
    h.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    bounded(g.read_exact(&mut buf)).await.unwrap();
    g.write_all(b"pong").await.unwrap();
    bounded(h.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"pong");
    assert!(!guest.is_closed());
    drop(h);
    bounded(guest.closed()).await;
    let err = bounded(listener.accept()).await.unwrap_err();
    assert!(matches!(err, TransportError::SessionClosed), "{err}");
}

#[tokio::test]
async fn garbage_from_the_peer_closes_the_session_cleanly() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let session = MuxSession::new(a, MuxRole::Server);
    let guest = Transport::mux(session.clone());
    let mut listener = guest.listen(1).await.unwrap();
    b.write_all(&[0xff; 64]).await.unwrap();
    bounded(session.closed()).await;
    let err = bounded(listener.accept()).await.unwrap_err();
    assert!(matches!(err, TransportError::SessionClosed), "{err}");
}

/// Encodes one raw yamux frame header (+ body for data frames).
fn yamux_frame(kind: u8, flags: u16, stream: u32, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0, kind];
    f.extend_from_slice(&flags.to_be_bytes());
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(&(body.len() as u32).to_be_bytes());
    f.extend_from_slice(body);
    f
}

const DATA: u8 = 0;
const SYN: u16 = 1;

/// Reads raw yamux frames until a data frame on `stream`; returns its body.
async fn next_data_on(r: &mut UnixStream, stream: u32) -> Vec<u8> {
    loop {
        let mut header = [0u8; 12];
        r.read_exact(&mut header).await.unwrap();
        let id = u32::from_be_bytes(header[4..8].try_into().unwrap());
        let len = u32::from_be_bytes(header[8..12].try_into().unwrap()) as usize;
        if header[1] != DATA {
            continue; // window updates and pings carry no body
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await.unwrap();
        if id == stream && !body.is_empty() {
            return body;
        }
    }
}

#[tokio::test]
async fn a_stream_that_never_names_its_port_does_not_block_others() {
    // The host end is hand-written yamux so it can misbehave.
    let (a, mut raw) = UnixStream::pair().unwrap();
    let guest = Transport::mux(MuxSession::new(a, MuxRole::Server));
    let mut listener = guest.listen(2).await.unwrap();

    // Stream 1 sends only half of its port number and then stalls.
    raw.write_all(&yamux_frame(DATA, SYN, 1, &[2, 0]))
        .await
        .unwrap();
    // Stream 3 asks properly for port 2.
    raw.write_all(&yamux_frame(DATA, SYN, 3, &2u32.to_le_bytes()))
        .await
        .unwrap();

    let mut accepted = bounded(listener.accept()).await.unwrap();
    assert_eq!(bounded(next_data_on(&mut raw, 3)).await, [0]);
    accepted.write_all(b"hi").await.unwrap();
    assert_eq!(bounded(next_data_on(&mut raw, 3)).await, b"hi");
}
