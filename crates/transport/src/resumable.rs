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
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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
/// Data frames in one batch.
const BATCH_FRAMES: usize = SEND_BATCH / MAX_CHUNK;
/// A sender's window starts this small and grows (up to its bound) only when it fills.
const FIRST_WINDOW: usize = 64 * 1024;
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

/// Unacknowledged bytes, in a ring: the producer reads into it and the connection writes
/// frames from it, with no copy in between. It grows (up to the window) only when full, so a
/// quiet stream keeps a small buffer.
struct Window {
    /// The ring; its length is its capacity.
    buf: Vec<u8>,
    /// Where the oldest byte is.
    head: usize,
    len: usize,
    max: usize,
}

impl Window {
    fn new(max: usize, pending: Vec<u8>) -> Window {
        let len = pending.len();
        let mut buf = pending;
        buf.resize(FIRST_WINDOW.min(max).max(len).max(1), 0);
        Window {
            buf,
            head: 0,
            len,
            max,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Doubles the ring (up to the window), oldest byte first.
    fn grow(&mut self) {
        let cap = (self.buf.len() * 2).min(self.max.max(self.len));
        let mut bigger = Vec::with_capacity(cap);
        let (a, b) = self.slices(0, self.len);
        bigger.extend_from_slice(a);
        bigger.extend_from_slice(b);
        bigger.resize(cap, 0);
        self.buf = bigger;
        self.head = 0;
    }

    /// Contiguous room for the next bytes (empty when the window is full).
    fn space(&mut self) -> &mut [u8] {
        if self.len == self.buf.len() && self.buf.len() < self.max {
            self.grow();
        }
        let cap = self.buf.len();
        if self.len == cap {
            return &mut [];
        }
        let tail = (self.head + self.len) % cap;
        if tail >= self.head {
            &mut self.buf[tail..]
        } else {
            &mut self.buf[tail..self.head]
        }
    }

    /// The first `n` bytes of the last [`Window::space`] hold new data.
    fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// Copies as much of `data` as fits; returns how much.
    fn extend(&mut self, data: &[u8]) -> usize {
        let mut done = 0;
        while done < data.len() {
            let space = self.space();
            let n = space.len().min(data.len() - done);
            if n == 0 {
                break;
            }
            space[..n].copy_from_slice(&data[done..done + n]);
            self.commit(n);
            done += n;
        }
        done
    }

    /// Drops the oldest `n` bytes.
    fn consume(&mut self, n: usize) {
        self.len -= n;
        self.head = if self.len == 0 {
            // Empty: start over at the beginning, so the next read gets the whole ring.
            0
        } else {
            (self.head + n) % self.buf.len()
        };
    }

    /// Bytes `from..from + n` (counted from the oldest), in at most two pieces.
    fn slices(&self, from: usize, n: usize) -> (&[u8], &[u8]) {
        debug_assert!(from + n <= self.len);
        let cap = self.buf.len();
        let start = (self.head + from) % cap;
        if start + n <= cap {
            (&self.buf[start..start + n], &[])
        } else {
            (&self.buf[start..], &self.buf[..n - (cap - start)])
        }
    }

    fn to_vec(&self) -> Vec<u8> {
        let (a, b) = self.slices(0, self.len);
        [a, b].concat()
    }
}

struct SendState {
    /// Unacknowledged bytes; the oldest is stream offset `acked`.
    buf: Window,
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
        self.buf.consume((received - self.acked) as usize);
        self.acked = received;
        Ok(())
    }

    /// The error a producer gets once it may not write any more.
    fn closed(&self) -> Option<io::Error> {
        if let Some(why) = &self.aborted {
            return Some(io::Error::new(io::ErrorKind::BrokenPipe, why.clone()));
        }
        self.finished
            .then(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream already finished"))
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
    let window = window.max(1);
    let state = SendState {
        buf: Window::new(window, pending),
        acked,
        finished,
        done: false,
        aborted: None,
    };
    let shared = Arc::new(SendShared {
        state: Mutex::new(state),
        more: Notify::new(),
        room: Notify::new(),
        window,
    });
    (
        Sender {
            shared: shared.clone(),
        },
        SenderDriver { shared },
    )
}

impl Sender {
    /// Waits until the window has room (or the stream cannot take more).
    async fn room(&self) -> io::Result<()> {
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            {
                let st = self.shared.lock();
                if let Some(e) = st.closed() {
                    return Err(e);
                }
                if st.buf.len() < self.shared.window {
                    return Ok(());
                }
            }
            room.await;
        }
    }

    /// Queues all of `data`, waiting for room in the window as needed.
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            self.room().await?;
            let n = {
                let mut st = self.shared.lock();
                if let Some(e) = st.closed() {
                    return Err(e);
                }
                st.buf.extend(data)
            };
            data = &data[n..];
            if n > 0 {
                self.shared.more.notify_one();
            }
        }
        Ok(())
    }

    /// Reads once from `from` straight into the window, waiting for room first; returns how
    /// many bytes it queued, 0 at `from`'s end. Saves the copy [`Sender::write_all`] makes.
    pub async fn read_from<R: AsyncRead + Unpin + ?Sized>(
        &self,
        from: &mut R,
    ) -> io::Result<usize> {
        loop {
            self.room().await?;
            let n = std::future::poll_fn(|cx| {
                // The lock is held only for one non-blocking read.
                let mut st = self.shared.lock();
                if let Some(e) = st.closed() {
                    return Poll::Ready(Err(e));
                }
                let space = st.buf.space();
                if space.is_empty() {
                    // Another producer filled the window: wait for room again.
                    return Poll::Ready(Ok(None));
                }
                let mut rb = ReadBuf::new(space);
                match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        st.buf.commit(n);
                        Poll::Ready(Ok(Some(n)))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await?;
            if let Some(n) = n {
                if n > 0 {
                    self.shared.more.notify_one();
                }
                return Ok(n);
            }
        }
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
        (st.acked, st.buf.to_vec())
    }

    /// Whether the end of the stream has been marked.
    pub fn is_finished(&self) -> bool {
        self.shared.lock().finished
    }
}

/// Where a connection stands in the frames it sends: `cursor` bytes of the stream are on the
/// wire, and the frame in progress still owes some header and payload bytes (a socket may take
/// part of a write).
#[derive(Default)]
struct Outgoing {
    cursor: u64,
    head: [u8; 5],
    head_left: usize,
    frame_left: usize,
    /// For a writer without vectored writes: the batch copied into one buffer, kept until it
    /// is all written (a write that is refused must not cost a new copy).
    flat: Vec<u8>,
    flat_off: usize,
    /// Frames of the copied batch not yet started.
    flat_lens: Vec<usize>,
}

impl Outgoing {
    /// Lengths of the new data frames the next write starts, given `unsent` bytes after the
    /// frame in progress.
    fn plan(&self, unsent: usize) -> Vec<usize> {
        let mut lens = Vec::with_capacity(BATCH_FRAMES);
        let mut budget = SEND_BATCH.saturating_sub(self.frame_left).min(unsent);
        while budget > 0 {
            let len = budget.min(MAX_CHUNK);
            lens.push(len);
            budget -= len;
        }
        lens
    }

    /// Accounts for `n` bytes of the planned write having gone out; returns how many of the
    /// new frames it started.
    fn advance(&mut self, mut n: usize, lens: &[usize]) -> usize {
        let h = n.min(self.head_left);
        self.head_left -= h;
        n -= h;
        let p = n.min(self.frame_left);
        self.frame_left -= p;
        self.cursor += p as u64;
        n -= p;
        let mut started = 0;
        for &len in lens {
            if n == 0 {
                break;
            }
            started += 1;
            self.head = frame_header(DATA, len);
            let h = n.min(5);
            self.head_left = 5 - h;
            self.frame_left = len;
            n -= h;
            let p = n.min(len);
            self.frame_left -= p;
            self.cursor += p as u64;
            n -= p;
        }
        started
    }
}

/// Writes the next batch of data frames straight from the window (one `writev`); `None` when
/// there is nothing to send.
fn poll_send_batch<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    shared: &SendShared,
    out: &mut Outgoing,
    w: &mut W,
) -> Poll<io::Result<Option<()>>> {
    if out.flat_off < out.flat.len() {
        // Finish the copied batch first.
        let n = std::task::ready!(Pin::new(&mut *w).poll_write(cx, &out.flat[out.flat_off..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        out.flat_off += n;
        let lens = std::mem::take(&mut out.flat_lens);
        let started = out.advance(n, &lens);
        out.flat_lens = lens[started..].to_vec();
        return Poll::Ready(Ok(Some(())));
    }
    let st = shared.lock();
    // Acks never pass what this connection sent; the cursor starts at the peer's count.
    out.cursor = out.cursor.max(st.acked);
    let start = (out.cursor - st.acked) as usize;
    let lens = out.plan(st.buf.len() - start - out.frame_left);
    if out.head_left == 0 && out.frame_left == 0 && lens.is_empty() {
        return Poll::Ready(Ok(None));
    }
    let heads: Vec<[u8; 5]> = lens.iter().map(|&len| frame_header(DATA, len)).collect();
    let head = out.head;
    let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(3 + 3 * lens.len());
    if out.head_left > 0 {
        iov.push(IoSlice::new(&head[5 - out.head_left..]));
    }
    let mut pieces = Vec::with_capacity(1 + lens.len());
    pieces.push(st.buf.slices(start, out.frame_left));
    let mut pos = start + out.frame_left;
    for &len in &lens {
        pieces.push(st.buf.slices(pos, len));
        pos += len;
    }
    for (i, (a, b)) in pieces.iter().enumerate() {
        if i > 0 {
            iov.push(IoSlice::new(&heads[i - 1]));
        }
        for piece in [a, b] {
            if !piece.is_empty() {
                iov.push(IoSlice::new(piece));
            }
        }
    }
    if !w.is_write_vectored() {
        // One copy into one write, as a writer that takes one buffer at a time would
        // otherwise send each header on its own.
        out.flat.clear();
        for piece in &iov {
            out.flat.extend_from_slice(piece);
        }
        out.flat_off = 0;
        drop(iov);
        drop(pieces);
        drop(st);
        let started = out.advance(0, &lens);
        out.flat_lens = lens[started..].to_vec();
        return poll_send_batch(cx, shared, out, w);
    }
    let n = std::task::ready!(Pin::new(&mut *w).poll_write_vectored(cx, &iov))?;
    if n == 0 {
        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
    }
    drop(iov);
    drop(pieces);
    drop(st);
    out.advance(n, &lens);
    Poll::Ready(Ok(Some(())))
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
        let cursor = {
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
            let mut out = Outgoing {
                cursor,
                ..Outgoing::default()
            };
            loop {
                let more = shared.more.notified();
                tokio::pin!(more);
                more.as_mut().enable();
                let sent =
                    std::future::poll_fn(|cx| poll_send_batch(cx, &shared, &mut out, &mut w))
                        .await?;
                if sent.is_some() {
                    w.flush().await?;
                    continue;
                }
                let send_end = {
                    let st = shared.lock();
                    st.finished && !end_sent && out.cursor == st.written()
                };
                if send_end {
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

    /// Exchanges hellos on a new connection; returns how often to acknowledge, and whether
    /// also whenever the sender pauses.
    async fn hello(&self, s: &mut BoxStream) -> io::Result<(u64, bool)> {
        let hello = Hello {
            received: self.received,
            eof: self.eof,
            ack_hint_kib: 0,
        };
        let peer = exchange_hello(s, hello).await?;
        // A sender that gave a hint gets acknowledgements that often (it never waits for more
        // than half its window); one that did not, whenever it pauses as well.
        Ok(match peer.ack_hint_kib {
            0 => (ACK_EVERY, true),
            kib => (ACK_EVERY.min(u64::from(kib) * 1024), false),
        })
    }

    /// One connection: bytes go to `sink` and are acknowledged once written there and the
    /// sink flushed (a sink that records its progress durably does so on flush).
    pub async fn serve<W: AsyncWrite + Unpin>(
        &mut self,
        mut s: BoxStream,
        sink: &mut W,
    ) -> io::Result<()> {
        let (ack_every, ack_on_pause) = self.hello(&mut s).await?;
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

/// A sink that a receiver fills in place: [`Receiver::run_into`] reads the stream's bytes
/// straight into the space it offers, with no buffer in between (a memory-mapped log, say).
pub trait SpaceSink {
    /// Room for the next bytes (not empty when ready); pending until there is some.
    fn poll_space(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut [u8]>>;
    /// The first `n` bytes of the space last offered hold the stream's next bytes.
    fn commit(&mut self, n: usize) -> io::Result<()>;
    /// Makes everything committed safe enough to be acknowledged (the sender drops it).
    fn flush(&mut self) -> io::Result<()>;
    /// Nothing more is coming right now (a sink that tells others about new bytes in batches
    /// does so now).
    fn idle(&mut self) {}
}

/// Reads once from `from` into `sink`'s space, at most `limit` bytes; returns how many (0 at
/// the end of `from`). What is read is committed before returning.
pub async fn read_into<R: AsyncRead + Unpin + ?Sized, S: SpaceSink + ?Sized>(
    from: &mut R,
    sink: &mut S,
    limit: usize,
) -> io::Result<usize> {
    let n = std::future::poll_fn(|cx| {
        let space = std::task::ready!(sink.poll_space(cx))?;
        let want = space.len().min(limit);
        let mut rb = ReadBuf::new(&mut space[..want]);
        match Pin::new(&mut *from).poll_read(cx, &mut rb) {
            Poll::Ready(r) => Poll::Ready(r.map(|()| rb.filled().len())),
            Poll::Pending => {
                sink.idle();
                Poll::Pending
            }
        }
    })
    .await?;
    if n > 0 {
        sink.commit(n)?;
    }
    Ok(n)
}

impl Receiver {
    /// Like [`Receiver::run`], reading straight into a [`SpaceSink`].
    pub async fn run_into<F, Fut, S>(&mut self, mut connect: F, sink: &mut S) -> io::Result<()>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = io::Result<BoxStream>>,
        S: SpaceSink + ?Sized,
    {
        while !self.eof {
            let stream = connect().await?;
            match self.serve_into(stream, sink).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData => return Err(e),
                Err(e) => {
                    tracing::debug!(error = %e, "resumable stream connection broke; reconnecting")
                }
            }
        }
        sink.flush()
    }

    /// Like [`Receiver::serve`], reading straight into a [`SpaceSink`]: each frame's header,
    /// then its payload into the sink's space (no read buffer, so one copy fewer).
    pub async fn serve_into<S: SpaceSink + ?Sized>(
        &mut self,
        mut s: BoxStream,
        sink: &mut S,
    ) -> io::Result<()> {
        let (ack_every, ack_on_pause) = self.hello(&mut s).await?;
        let (mut r, mut w) = tokio::io::split(s);
        let mut acked = self.received;
        while !self.eof {
            // Waiting for the next frame is a pause too: the sink hears of it.
            let head = read_frame(&mut IdleOnPending {
                r: &mut r,
                sink: &mut *sink,
            })
            .await?;
            match head {
                Some(Frame::Data(mut left)) => {
                    while left > 0 {
                        // Counted as committed: bytes the sink took must not come again.
                        let n = read_into(&mut r, sink, left).await?;
                        if n == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "connection closed inside a data frame",
                            ));
                        }
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
            // Without a read buffer there is no peeking at whether the sender paused: a sender
            // without a hint gets an acknowledgement per frame (only tiny windows give none).
            if self.eof || ack_on_pause || self.received - acked >= ack_every {
                // What is acknowledged must be safe in the sink first: the sender drops it.
                sink.flush()?;
                write_ack(&mut w, self.received, self.eof).await?;
                acked = self.received;
            }
        }
        Ok(())
    }
}

/// A reader that tells a sink when it has to wait ([`SpaceSink::idle`]).
struct IdleOnPending<'a, R, S: ?Sized> {
    r: &'a mut R,
    sink: &'a mut S,
}

impl<R: AsyncRead + Unpin, S: SpaceSink + ?Sized> AsyncRead for IdleOnPending<'_, R, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut *this.r).poll_read(cx, buf);
        if r.is_pending() {
            this.sink.idle();
        }
        r
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
        /// Takes several buffers per write (as a socket does), possibly only part of them.
        vectored: bool,
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
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            // Up to 3000 bytes across the buffers: writes end mid-header and mid-payload.
            let mut flat = Vec::new();
            for b in bufs {
                flat.extend_from_slice(&b[..b.len().min(3000 - flat.len())]);
            }
            self.poll_write(cx, &flat)
        }
        fn is_write_vectored(&self) -> bool {
            self.vectored
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

    /// How a transfer's ends work.
    #[derive(Clone, Copy, Default)]
    struct Mode {
        /// The sender writes vectored (frames straight from the window).
        vectored: bool,
        /// The producer reads into the window ([`Sender::read_from`]).
        read_from: bool,
        /// The receiver reads into a [`SpaceSink`].
        direct: bool,
    }

    /// A sink that offers space of changing, small sizes.
    #[derive(Default)]
    struct Chunky {
        got: Vec<u8>,
        space: Vec<u8>,
        flushed: usize,
    }

    impl SpaceSink for Chunky {
        fn poll_space(&mut self, _: &mut Context<'_>) -> Poll<io::Result<&mut [u8]>> {
            let n = 1 + self.got.len() % 2999;
            self.space.resize(n, 0);
            Poll::Ready(Ok(&mut self.space))
        }
        fn commit(&mut self, n: usize) -> io::Result<()> {
            self.got.extend_from_slice(&self.space[..n]);
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            self.flushed = self.got.len();
            Ok(())
        }
    }

    /// Runs a sender and a receiver over connections that are cut after `cut` bytes each
    /// (sender side), `cuts` times; returns what the receiver got.
    async fn transfer(data: Vec<u8>, window: usize, cut: usize, cuts: usize) -> Vec<u8> {
        transfer_with(data, window, cut, cuts, Mode::default()).await
    }

    async fn transfer_with(
        data: Vec<u8>,
        window: usize,
        cut: usize,
        cuts: usize,
        mode: Mode,
    ) -> Vec<u8> {
        let (tx, rx) = mpsc::unbounded_channel::<BoxStream>();
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let (sender, driver) = sender(window);
        let mut made = 0;
        let drive = tokio::spawn(driver.run(move || {
            let (a, b) = tokio::io::duplex(8192);
            made += 1;
            let budget = if made <= cuts { cut } else { usize::MAX };
            let _ = tx.send(Box::new(b));
            let s: BoxStream = Box::new(Flaky {
                inner: a,
                budget,
                vectored: mode.vectored,
            });
            async move { Ok(s) }
        }));
        let produce = tokio::spawn(async move {
            if mode.read_from {
                let mut from = &data[..];
                while sender.read_from(&mut from).await.unwrap() > 0 {}
            } else {
                for chunk in data.chunks(10_000) {
                    sender.write_all(chunk).await.unwrap();
                }
            }
            sender.finish();
        });
        let mut receiver = Receiver::new(0);
        let connect = || {
            let rx = rx.clone();
            async move {
                rx.lock()
                    .await
                    .recv()
                    .await
                    .ok_or_else(|| io::Error::other("sender gone"))
            }
        };
        let got = if mode.direct {
            let mut sink = Chunky::default();
            receiver.run_into(connect, &mut sink).await.unwrap();
            assert_eq!(sink.flushed, sink.got.len(), "the end is flushed");
            sink.got
        } else {
            let mut got = Vec::new();
            receiver.run(connect, &mut got).await.unwrap();
            got
        };
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
    async fn frames_straight_from_the_window_survive_partial_writes_and_breaks() {
        let data = pattern(700_000);
        for (vectored, read_from, direct) in [
            (true, false, false),
            (true, true, false),
            (true, true, true),
            (false, true, true),
        ] {
            let mode = Mode {
                vectored,
                read_from,
                direct,
            };
            for (window, cut, cuts) in [(256 * 1024, 50_017, 20), (4096, 7_001, 5), (1000, 0, 0)] {
                let got = transfer_with(data.clone(), window, cut, cuts, mode).await;
                assert!(
                    got == data,
                    "vectored {vectored}, read_from {read_from}, direct {direct}, window {window}: bytes lost, repeated or reordered"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_direct_sink_hears_when_the_stream_pauses() {
        // A sink that wakes its readers in batches must hear of a pause, or a few bytes
        // followed by silence would never reach them.
        struct Announce {
            inner: Chunky,
            tx: mpsc::UnboundedSender<usize>,
        }
        impl SpaceSink for Announce {
            fn poll_space(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut [u8]>> {
                self.inner.poll_space(cx)
            }
            fn commit(&mut self, n: usize) -> io::Result<()> {
                self.inner.commit(n)
            }
            fn flush(&mut self) -> io::Result<()> {
                self.inner.flush()
            }
            fn idle(&mut self) {
                let _ = self.tx.send(self.inner.got.len());
            }
        }
        let (sender, driver) = sender(1 << 20);
        sender.write_all(b"hello").await.unwrap();
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut a = Some(Box::new(a) as BoxStream);
        let drive = tokio::spawn(driver.run(move || {
            let s = a.take();
            async move { s.ok_or_else(|| io::Error::other("once")) }
        }));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let receive = tokio::spawn(async move {
            let mut sink = Announce {
                inner: Chunky::default(),
                tx,
            };
            Receiver::new(0)
                .serve_into(Box::new(b), &mut sink)
                .await
                .map(|()| sink.inner.got)
        });
        loop {
            let seen = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("the sink was never told of the pause")
                .unwrap();
            if seen == 5 {
                break;
            }
        }
        sender.finish();
        assert_eq!(receive.await.unwrap().unwrap(), b"hello");
        drive.await.unwrap().unwrap();
    }

    #[test]
    fn the_window_wraps_grows_and_keeps_order() {
        let mut w = Window::new(10, Vec::new());
        assert_eq!(w.extend(&[1, 2, 3, 4, 5, 6]), 6);
        w.consume(4);
        // Wraps: 5 6 | 7 8 9 10 11 12 13 14 (the ring is at most the window).
        assert_eq!(w.extend(&[7, 8, 9, 10, 11, 12, 13, 14, 15]), 8);
        assert_eq!(w.to_vec(), vec![5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        let (a, b) = w.slices(1, 8);
        assert_eq!([a, b].concat(), vec![6, 7, 8, 9, 10, 11, 12, 13]);
        assert!(w.space().is_empty(), "a full window offers no room");
        w.consume(10);
        assert!(w.is_empty());
        assert_eq!(w.space().len(), 10, "an empty ring starts over");
        // A resumed window holds its pending bytes, even beyond the first ring size.
        let big = pattern(FIRST_WINDOW + 5);
        let w = Window::new(1 << 20, big.clone());
        assert_eq!(w.to_vec(), big);
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
