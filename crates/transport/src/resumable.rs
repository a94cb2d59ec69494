//! Resumable byte streams: one logical stream carried over any number of successive
//! connections, with no byte lost and none repeated.
//!
//! The sender keeps every byte until the receiver has acknowledged it (bounded by a window:
//! when the window is full, the producer waits — back-pressure, never loss). Each new
//! connection starts with both sides saying how much they have received; the sender resumes
//! from exactly there. The end of the stream is an explicit frame, so a connection that merely
//! breaks is never mistaken for the end.
//!
//! Wire format, per connection:
//! * hello, each way: `"FRS1"`, flags `u8` (bit 0: end of stream received), ack hint `u24` LE
//!   (a sender: "acknowledge at least every this many KiB", half its window; 0: acknowledge
//!   whenever I pause), received `u64` LE (16 bytes);
//! * then frames `[kind u8][len u32 LE][payload]`: data (1..=[`MAX_CHUNK`] bytes), end of
//!   stream (empty), ack (`received u64 LE`, `eof u8`).
//!
//! ferry uses these for process stdio, so that a host restart or a live migration loses
//! nothing a process wrote or was sent.

use crate::BoxStream;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

/// Largest data frame.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Default bound on unacknowledged bytes a sender keeps.
pub const DEFAULT_WINDOW: usize = 4 << 20;
/// A receiver acknowledges at least this often (and more often if the sender's hint asks).
const ACK_EVERY: u64 = 256 * 1024;
/// A sender puts up to this much into one write (several frames), so a fast stream costs few
/// system calls and wakeups on both sides.
const SEND_BATCH: usize = 4 * MAX_CHUNK;
/// How long the peer may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

const MAGIC: &[u8; 4] = b"FRS1";
const DATA: u8 = 1;
const END: u8 = 2;
const ACK: u8 = 3;

fn protocol(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// What one side tells the other when a connection starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Hello {
    received: u64,
    eof: bool,
    /// From a sender: acknowledge at least every this many KiB (0: whenever it pauses).
    ack_hint_kib: u32,
}

async fn exchange_hello(s: &mut BoxStream, mine: Hello) -> io::Result<Hello> {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(MAGIC);
    out[4] = mine.eof as u8;
    out[5..8].copy_from_slice(&mine.ack_hint_kib.min(0xff_ffff).to_le_bytes()[..3]);
    out[8..].copy_from_slice(&mine.received.to_le_bytes());
    s.write_all(&out).await?;
    s.flush().await?;
    let mut peer = [0u8; 16];
    tokio::time::timeout(HELLO_TIMEOUT, s.read_exact(&mut peer))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "no resumable-stream hello from the peer",
            )
        })??;
    if &peer[..4] != MAGIC {
        return Err(protocol(format!(
            "not a resumable stream (hello starts {:02x?})",
            &peer[..4]
        )));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&peer[8..]);
    Ok(Hello {
        received: u64::from_le_bytes(n),
        eof: peer[4] & 1 != 0,
        ack_hint_kib: u32::from_le_bytes([peer[5], peer[6], peer[7], 0]),
    })
}

enum Frame {
    /// A data frame's header: its payload (this many bytes) follows on the stream.
    Data(usize),
    End,
    Ack {
        received: u64,
        eof: bool,
    },
}

fn frame_header(kind: u8, len: usize) -> [u8; 5] {
    let mut h = [kind, 0, 0, 0, 0];
    h[1..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, kind: u8, payload: &[u8]) -> io::Result<()> {
    // One write per frame: header and payload together.
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.extend_from_slice(&frame_header(kind, payload.len()));
    frame.extend_from_slice(payload);
    w.write_all(&frame).await?;
    w.flush().await
}

async fn write_ack<W: AsyncWrite + Unpin>(w: &mut W, received: u64, eof: bool) -> io::Result<()> {
    let mut p = [0u8; 9];
    p[..8].copy_from_slice(&received.to_le_bytes());
    p[8] = eof as u8;
    write_frame(w, ACK, &p).await
}

/// Reads one frame (a data frame's header only: the caller takes its payload); `None` when the
/// connection ended.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    match (head[0], len) {
        (DATA, 1..=MAX_CHUNK) => Ok(Some(Frame::Data(len))),
        (END, 0) => Ok(Some(Frame::End)),
        (ACK, 9) => {
            let mut p = [0u8; 9];
            r.read_exact(&mut p).await?;
            let mut n = [0u8; 8];
            n.copy_from_slice(&p[..8]);
            Ok(Some(Frame::Ack {
                received: u64::from_le_bytes(n),
                eof: p[8] != 0,
            }))
        }
        (kind, len) => Err(protocol(format!(
            "bad resumable-stream frame: kind {kind}, length {len}"
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Sending

#[derive(Default)]
struct SendState {
    /// Unacknowledged bytes; `buf[0]` is stream offset `acked`.
    buf: VecDeque<u8>,
    acked: u64,
    /// The producer has finished.
    finished: bool,
    /// The peer has acknowledged the end of the stream.
    done: bool,
    /// The stream was abandoned; producers get this error.
    aborted: Option<String>,
}

impl SendState {
    fn written(&self) -> u64 {
        self.acked + self.buf.len() as u64
    }

    /// Drops bytes the peer has; refuses an acknowledgement outside what was sent.
    fn ack(&mut self, received: u64) -> io::Result<()> {
        if received < self.acked || received > self.written() {
            return Err(protocol(format!(
                "peer acknowledged {received} bytes; {} were acknowledged before and {} written",
                self.acked,
                self.written()
            )));
        }
        self.buf.drain(..(received - self.acked) as usize);
        self.acked = received;
        Ok(())
    }
}

struct SendShared {
    state: Mutex<SendState>,
    /// Producer → connection: data or the end is available.
    more: Notify,
    /// Connection → producer: room in the window, or the stream ended.
    room: Notify,
    window: usize,
}

impl SendShared {
    fn lock(&self) -> MutexGuard<'_, SendState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The producing end of a resumable stream. Writes wait while the window is full.
#[derive(Clone)]
pub struct Sender {
    shared: Arc<SendShared>,
}

/// The connection-handling end of a resumable stream: give it connections with
/// [`SenderDriver::run`].
pub struct SenderDriver {
    shared: Arc<SendShared>,
}

/// A new resumable sender keeping at most `window` unacknowledged bytes.
pub fn sender(window: usize) -> (Sender, SenderDriver) {
    sender_resuming(window, 0, Vec::new(), false)
}

/// A sender continuing a stream saved elsewhere (see [`Sender::pending`]): `acked` bytes
/// were acknowledged, `pending` follow them unacknowledged, and with `finished` nothing more
/// will be written.
pub fn sender_resuming(
    window: usize,
    acked: u64,
    pending: Vec<u8>,
    finished: bool,
) -> (Sender, SenderDriver) {
    let state = SendState {
        buf: pending.into(),
        acked,
        finished,
        ..SendState::default()
    };
    let shared = Arc::new(SendShared {
        state: Mutex::new(state),
        more: Notify::new(),
        room: Notify::new(),
        window: window.max(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        SenderDriver { shared },
    )
}

impl Sender {
    /// Queues all of `data`, waiting for room in the window as needed.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let mut st = self.shared.lock();
                if let Some(why) = &st.aborted {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, why.clone()));
                }
                if st.finished {
                    return Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "stream already finished",
                    ));
                }
                let free = self.shared.window.saturating_sub(st.buf.len());
                if free > 0 {
                    let n = free.min(data.len());
                    st.buf.extend(&data[..n]);
                    data = &data[n..];
                    drop(st);
                    self.shared.more.notify_one();
                    continue;
                }
            }
            room.await;
        }
        Ok(())
    }

    /// Marks the end of the stream (after everything written so far).
    pub fn finish(&self) {
        self.shared.lock().finished = true;
        self.shared.more.notify_one();
    }

    /// (acknowledged, written) byte counts.
    pub fn progress(&self) -> (u64, u64) {
        let st = self.shared.lock();
        (st.acked, st.written())
    }

    /// Unacknowledged bytes, oldest first, and the offset of the first (for saving a stream's
    /// state elsewhere).
    pub fn pending(&self) -> (u64, Vec<u8>) {
        let st = self.shared.lock();
        (st.acked, st.buf.iter().copied().collect())
    }

    /// Whether the end of the stream has been marked.
    pub fn is_finished(&self) -> bool {
        self.shared.lock().finished
    }
}

impl SenderDriver {
    /// Delivers the stream over connections from `connect` until the peer has acknowledged its
    /// end. `connect` is called again whenever a connection breaks; it does its own waiting and
    /// retrying, and returning an error abandons the stream.
    pub async fn run<F, Fut>(self, mut connect: F) -> io::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = io::Result<BoxStream>>,
    {
        loop {
            let stream = match connect().await {
                Ok(s) => s,
                Err(e) => {
                    self.abort(&format!("no connection: {e}"));
                    return Err(e);
                }
            };
            match self.serve(stream).await {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    self.abort(&e.to_string());
                    return Err(e);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "resumable stream connection broke; reconnecting")
                }
            }
        }
    }

    fn abort(&self, why: &str) {
        self.shared.lock().aborted = Some(why.to_string());
        self.shared.room.notify_waiters();
    }

    /// One connection; Ok once the end of the stream is acknowledged.
    async fn serve(&self, mut s: BoxStream) -> io::Result<()> {
        // Asking for acknowledgements every half window keeps the producer from ever waiting
        // on an acknowledgement the receiver has no reason to send; a window too small to
        // express in KiB falls back to "whenever I pause".
        let half_window_kib = (self.shared.window / 2 / 1024) as u32;
        let mine = Hello {
            ack_hint_kib: half_window_kib,
            ..Hello::default()
        };
        let peer = exchange_hello(&mut s, mine).await?;
        let mut cursor = {
            let mut st = self.shared.lock();
            st.ack(peer.received)?;
            if peer.eof {
                if !st.finished || !st.buf.is_empty() {
                    return Err(protocol(
                        "peer claims the end of a stream that has not ended".into(),
                    ));
                }
                st.done = true;
            }
            st.acked
        };
        self.shared.room.notify_waiters();
        if self.shared.lock().done {
            return Ok(());
        }
        let (mut r, mut w) = tokio::io::split(s);
        let shared = self.shared.clone();
        // Acknowledgements arrive on their own; the writer below never waits for them.
        let acks = async move {
            loop {
                match read_frame(&mut r).await? {
                    Some(Frame::Ack { received, eof }) => {
                        let done = {
                            let mut st = shared.lock();
                            st.ack(received)?;
                            if eof && st.finished && st.buf.is_empty() {
                                st.done = true;
                            }
                            st.done
                        };
                        shared.room.notify_waiters();
                        if done {
                            return Ok::<(), io::Error>(());
                        }
                    }
                    Some(_) => return Err(protocol("data or end sent to a sender".into())),
                    None => {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed",
                        ));
                    }
                }
            }
        };
        let shared = self.shared.clone();
        let sends = async move {
            let mut end_sent = false;
            // Reused for every write: up to SEND_BATCH bytes of frames.
            let mut out = Vec::with_capacity(SEND_BATCH + 5 * (SEND_BATCH / MAX_CHUNK + 1));
            loop {
                let more = shared.more.notified();
                tokio::pin!(more);
                more.as_mut().enable();
                let send_end = {
                    let st = shared.lock();
                    // Acks may have moved past the cursor (never beyond what was sent).
                    cursor = cursor.max(st.acked);
                    let start = (cursor - st.acked) as usize;
                    out.clear();
                    let n = (st.buf.len() - start).min(SEND_BATCH);
                    let (a, b) = st.buf.as_slices();
                    let mut pos = start;
                    while pos < start + n {
                        let len = (start + n - pos).min(MAX_CHUNK);
                        out.extend_from_slice(&frame_header(DATA, len));
                        // The frame's bytes may straddle the deque's two slices.
                        let (from, to) = (pos, pos + len);
                        if from < a.len() {
                            out.extend_from_slice(&a[from..to.min(a.len())]);
                        }
                        if to > a.len() {
                            out.extend_from_slice(&b[from.max(a.len()) - a.len()..to - a.len()]);
                        }
                        pos = to;
                    }
                    cursor += n as u64;
                    n == 0 && st.finished && !end_sent
                };
                if !out.is_empty() {
                    w.write_all(&out).await?;
                    w.flush().await?;
                } else if send_end {
                    write_frame(&mut w, END, &[]).await?;
                    end_sent = true;
                } else {
                    more.await;
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), io::Error>(())
        };
        tokio::select! {
            r = acks => r,
            r = sends => r,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// The receiving end of a resumable stream: counts what it has received, so that each new
/// connection resumes at the right byte.
#[derive(Debug, Clone, Copy, Default)]
pub struct Receiver {
    received: u64,
    eof: bool,
}

impl Receiver {
    /// A receiver that already holds `received` bytes (0 for a new stream; a log file's length
    /// for one restored from saved state).
    pub fn new(received: u64) -> Receiver {
        Receiver {
            received,
            eof: false,
        }
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn finished(&self) -> bool {
        self.eof
    }

    /// Receives over connections from `connect` into `sink` until the end of the stream.
    pub async fn run<F, Fut, W>(&mut self, mut connect: F, sink: &mut W) -> io::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = io::Result<BoxStream>>,
        W: AsyncWrite + Unpin,
    {
        while !self.eof {
            let stream = connect().await?;
            match self.serve(stream, sink).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "resumable stream connection broke; reconnecting")
                }
            }
        }
        sink.flush().await
    }

    /// One connection: bytes go to `sink` and are acknowledged once written there and the
    /// sink flushed (a sink that records its progress durably does so on flush).
    pub async fn serve<W: AsyncWrite + Unpin>(
        &mut self,
        mut s: BoxStream,
        sink: &mut W,
    ) -> io::Result<()> {
        let hello = Hello {
            received: self.received,
            eof: self.eof,
            ack_hint_kib: 0,
        };
        let peer = exchange_hello(&mut s, hello).await?;
        // A sender that gave a hint gets acknowledgements that often (it never waits for more
        // than half its window); one that did not, whenever it pauses as well.
        let (ack_every, ack_on_pause) = match peer.ack_hint_kib {
            0 => (ACK_EVERY, true),
            kib => (ACK_EVERY.min(u64::from(kib) * 1024), false),
        };
        let (r, mut w) = tokio::io::split(s);
        let mut r = tokio::io::BufReader::with_capacity(2 * MAX_CHUNK, r);
        let mut acked = self.received;
        while !self.eof {
            match read_frame(&mut r).await? {
                Some(Frame::Data(mut left)) => {
                    // Straight from the read buffer to the sink. Count exactly what the sink
                    // took, even if it fails part-way: those bytes must not come again.
                    use tokio::io::AsyncBufReadExt;
                    while left > 0 {
                        let buf = r.fill_buf().await?;
                        if buf.is_empty() {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "connection closed inside a data frame",
                            ));
                        }
                        let take = buf.len().min(left);
                        let n = sink.write(&buf[..take]).await?;
                        if n == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::WriteZero,
                                "sink accepts no more",
                            ));
                        }
                        r.consume(n);
                        left -= n;
                        self.received += n as u64;
                    }
                }
                Some(Frame::End) => self.eof = true,
                Some(Frame::Ack { .. }) => return Err(protocol("ack sent to a receiver".into())),
                None => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed",
                    ));
                }
            }
            // Acknowledge in batches, and (for a sender without a hint) whenever it has paused:
            // a sender blocked on a full window is always released.
            if self.eof
                || self.received - acked >= ack_every
                || (ack_on_pause && !more_waiting(&mut r).await)
            {
                // What is acknowledged must be safe in the sink first: the sender drops it.
                sink.flush().await?;
                write_ack(&mut w, self.received, self.eof).await?;
                acked = self.received;
            }
        }
        Ok(())
    }
}

/// True when more bytes can be read right now without waiting.
async fn more_waiting<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> bool {
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *r).poll_fill_buf(cx) {
        std::task::Poll::Ready(Ok(buf)) => std::task::Poll::Ready(!buf.is_empty()),
        std::task::Poll::Ready(Err(_)) => std::task::Poll::Ready(false),
        std::task::Poll::Pending => std::task::Poll::Ready(false),
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::sync::mpsc;

    /// A stream that fails after `budget` bytes written, to cut connections mid-frame.
    struct Flaky {
        inner: tokio::io::DuplexStream,
        budget: usize,
    }

    impl AsyncRead for Flaky {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Flaky {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.budget == 0 {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::ConnectionReset, "cut")));
            }
            let n = buf.len().min(self.budget);
            let r = Pin::new(&mut self.inner).poll_write(cx, &buf[..n]);
            if let Poll::Ready(Ok(w)) = r {
                self.budget -= w;
            }
            r
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    /// Runs a sender and a receiver over connections that are cut after `cut` bytes each
    /// (sender side), `cuts` times; returns what the receiver got.
    async fn transfer(data: Vec<u8>, window: usize, cut: usize, cuts: usize) -> Vec<u8> {
        let (tx, rx) = mpsc::unbounded_channel::<BoxStream>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let (sender, driver) = sender(window);
        let mut made = 0;
        let drive = tokio::spawn(driver.run(move || {
            let (a, b) = tokio::io::duplex(8192);
            made += 1;
            let budget = if made <= cuts { cut } else { usize::MAX };
            let _ = tx.send(Box::new(b));
            let s: BoxStream = Box::new(Flaky { inner: a, budget });
            async move { Ok(s) }
        }));
        let produce = tokio::spawn(async move {
            for chunk in data.chunks(10_000) {
                sender.write_all(chunk).await.unwrap();
            }
            sender.finish();
        });
        let mut receiver = Receiver::new(0);
        let mut got = Vec::new();
        receiver
            .run(
                || {
                    let rx = rx.clone();
                    async move {
                        rx.lock()
                            .await
                            .recv()
                            .await
                            .ok_or_else(|| io::Error::other("sender gone"))
                    }
                },
                &mut got,
            )
            .await
            .unwrap();
        produce.await.unwrap();
        drive.await.unwrap().unwrap();
        assert!(receiver.finished());
        got
    }

    #[tokio::test]
    async fn every_byte_once_across_many_broken_connections() {
        let data = pattern(1_000_000);
        // Cut each connection after ~50 kB, 30 times: frames are torn mid-way.
        let got = transfer(data.clone(), 256 * 1024, 50_017, 30).await;
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes lost, repeated or reordered");
    }

    #[tokio::test]
    async fn a_window_smaller_than_the_data_and_no_breaks() {
        let data = pattern(300_000);
        assert_eq!(transfer(data.clone(), 4096, 0, 0).await, data);
    }

    #[tokio::test]
    async fn a_window_too_small_for_a_hint_still_flows() {
        // Under 2 KiB the sender gives no acknowledgement hint: the receiver must then
        // acknowledge whenever the sender pauses, or the producer would wait forever.
        let data = pattern(100_000);
        assert_eq!(transfer(data.clone(), 1000, 0, 0).await, data);
        assert_eq!(transfer(data.clone(), 1000, 7_001, 5).await, data);
    }

    #[tokio::test]
    async fn the_hello_carries_the_ack_hint() {
        let (a, b) = tokio::io::duplex(1024);
        let (mut a, mut b): (BoxStream, BoxStream) = (Box::new(a), Box::new(b));
        let mine = Hello {
            received: 5,
            eof: true,
            ack_hint_kib: 0x12_3456,
        };
        let (got_b, got_a) = tokio::join!(
            exchange_hello(&mut a, mine),
            exchange_hello(&mut b, Hello::default())
        );
        assert_eq!(got_b.unwrap(), Hello::default());
        assert_eq!(got_a.unwrap(), mine);
    }

    #[tokio::test]
    async fn the_producer_waits_when_the_window_is_full() {
        let (sender, _driver) = sender(1000);
        sender.write_all(&[1; 1000]).await.unwrap();
        // Nobody acknowledges: the next write cannot complete.
        let blocked = tokio::time::timeout(Duration::from_millis(50), sender.write_all(&[2])).await;
        assert!(blocked.is_err(), "write beyond the window did not wait");
        assert_eq!(sender.progress(), (0, 1000));
        assert_eq!(sender.pending(), (0, vec![1; 1000]));
    }

    #[tokio::test]
    async fn a_receiver_restored_mid_stream_resumes_there() {
        // The receiver already has 1000 bytes (say, in a log file): the sender must start
        // there, and it must still hold those bytes.
        let (sender, driver) = sender(1 << 20);
        sender.write_all(&pattern(3000)).await.unwrap();
        sender.finish();
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut a = Some(Box::new(a) as BoxStream);
        let drive = tokio::spawn(driver.run(move || {
            let s = a.take();
            async move { s.ok_or_else(|| io::Error::other("once")) }
        }));
        let mut receiver = Receiver::new(1000);
        let mut got = Vec::new();
        receiver.serve(Box::new(b), &mut got).await.unwrap();
        drive.await.unwrap().unwrap();
        assert_eq!(got, pattern(3000)[1000..]);
    }

    #[tokio::test]
    async fn a_sender_resumed_from_saved_state_continues_the_stream() {
        // A stream saved part-way (acknowledged offset + pending bytes) continues in a new
        // sender, for the same receiver: every byte once.
        let data = pattern(50_000);
        // The receiver holds the first 10 000 (acknowledged before the save); the rest of
        // what the first sender has is pending.
        let mut receiver = Receiver::new(10_000);
        let mut got = data[..10_000].to_vec();
        let (acked, pending) = (10_000u64, data[10_000..30_000].to_vec());
        let (second, driver) = sender_resuming(1 << 20, acked, pending, false);
        second.write_all(&data[30_000..]).await.unwrap();
        second.finish();
        assert!(second.is_finished());
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut a = Some(Box::new(a) as BoxStream);
        let drive = tokio::spawn(driver.run(move || {
            let s = a.take();
            async move { s.ok_or_else(|| io::Error::other("once")) }
        }));
        receiver.serve(Box::new(b), &mut got).await.unwrap();
        drive.await.unwrap().unwrap();
        assert!(got == data, "bytes lost or repeated across the saved state");
    }

    #[tokio::test]
    async fn a_peer_claiming_bytes_never_sent_is_a_protocol_error() {
        let (sender, driver) = sender(1 << 20);
        sender.write_all(b"abc").await.unwrap();
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut a = Some(Box::new(a) as BoxStream);
        let drive = tokio::spawn(driver.run(move || {
            let s = a.take();
            async move { s.ok_or_else(|| io::Error::other("once")) }
        }));
        let mut b: BoxStream = Box::new(b);
        exchange_hello(
            &mut b,
            Hello {
                received: 99,
                ..Hello::default()
            },
        )
        .await
        .unwrap();
        let e = drive.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // The producer learns the stream is dead.
        assert!(sender.write_all(b"more").await.is_err());
    }

    #[tokio::test]
    async fn garbage_instead_of_a_hello_is_refused() {
        let (a, mut b) = tokio::io::duplex(1024);
        b.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let mut r = Receiver::new(0);
        let e = r.serve(Box::new(a), &mut Vec::new()).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
