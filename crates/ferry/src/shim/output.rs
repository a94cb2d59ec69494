//! Captured output. Each stdout/stderr of a process is copied into a log file as it arrives;
//! attached clients, `ferry logs` and `ferry logs --follow` all read the file from an offset and
//! wait for more. The file is the buffer: an absent client never blocks the process, and
//! output produced while nobody was attached is still there.
//!
//! The file is a ring of bounded size (the UVM's log limit) after a one-page header holding
//! the limit and how many bytes the stream has produced in all. Bounded, because a chatty
//! process must not fill the host's disk; a ring, because rewriting warm page-cache pages costs
//! a fraction of growing a file (measured: appending 512 MiB took 1.2 s here, overwriting
//! 0.2 s), which is most of the relay's cost. Older output is dropped once the ring wraps, and
//! readers are told how much. A client attached to the process (`run`, `attach`) pins its
//! position instead: the capture then waits for it rather than overwrite what it has not sent,
//! so an attached client always receives everything (the process sees back-pressure).
//!
//! The ring is mapped into memory: the capture receives the stream straight into it and an
//! attached client is sent its frames straight from it, so each byte is copied once in and once
//! out, as by `cat` (a write and a read of the file cost two more copies per byte).

use crate::control::{self, MAX_PAYLOAD};
use host::OutputPipe;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::IoSlice;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use tokio::io::AsyncWrite;
use tokio::sync::watch;
use transport::resumable::SpaceSink;

/// Default bound on each captured stream's log.
pub const DEFAULT_LOG_LIMIT: u64 = 64 << 20;
/// Smallest log limit accepted (one relay frame must fit).
pub const MIN_LOG_LIMIT: u64 = MAX_PAYLOAD as u64;

const MAGIC: &[u8; 8] = b"FERRYLOG";
const VERSION: u32 = 1;
/// The header takes the first page; the ring follows.
const HEADER_SIZE: u64 = 4096;
/// Most bytes an attached client is sent in one system call (several frames).
const SEND_BATCH: usize = 16 * MAX_PAYLOAD;
/// Readers hear of new bytes at least this often while a stream is busy (and whenever it
/// pauses): waking them for every frame costs more than they send.
const ANNOUNCE_EVERY: u64 = 4 * MAX_PAYLOAD as u64;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes the stream has produced so far (the ring holds the last `limit` of them).
    pub written: u64,
    /// The stream has ended: no more bytes will come.
    pub done: bool,
}

/// Where a log's bytes live in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// Where the ring starts.
    start: u64,
    /// The ring's size (`u64::MAX` for a plain append-only file written by an earlier ferry).
    capacity: u64,
}

impl Layout {
    fn position(&self, offset: u64) -> u64 {
        self.start + offset % self.capacity
    }

    /// Bytes from `offset` until the ring wraps.
    fn until_wrap(&self, offset: u64) -> u64 {
        self.capacity - offset % self.capacity
    }

    /// The oldest offset still held once `written` bytes were produced.
    fn oldest(&self, written: u64) -> u64 {
        written.saturating_sub(self.capacity)
    }
}

fn header(capacity: u64, written: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&capacity.to_le_bytes());
    h[24..32].copy_from_slice(&written.to_le_bytes());
    h
}

/// Reads a log file's layout and how many bytes it has recorded. A file without our header is
/// a plain log from an earlier ferry: all of it is output.
fn read_header(file: &File) -> std::io::Result<(Layout, u64)> {
    let len = file.metadata()?.len();
    let mut h = [0u8; 32];
    let plain = Ok((
        Layout {
            start: 0,
            capacity: u64::MAX,
        },
        len,
    ));
    if len < HEADER_SIZE || file.read_exact_at(&mut h, 0).is_err() || &h[..8] != MAGIC {
        return plain;
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[r]);
        u64::from_le_bytes(b)
    };
    let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let (capacity, written) = (word(16..24), word(24..32));
    if version != VERSION || capacity < MIN_LOG_LIMIT {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "log header: version {version}, ring of {capacity} bytes: not a log this ferry writes"
            ),
        ));
    }
    Ok((
        Layout {
            start: HEADER_SIZE,
            capacity,
        },
        written,
    ))
}

/// Where the log of process `pid`'s `stream` ("stdout" or "stderr") lives in `dir`.
pub fn log_path(dir: &Path, pid: u32, stream: &str) -> PathBuf {
    dir.join(format!("{pid}.{stream}"))
}

/// The part of the log file at `path` that holds anything: its header and the ring up to
/// what has been written (the file itself is sparse, full-size). What a migration ships.
pub fn contents(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let (layout, written) = read_header(&file)?;
    let len = layout.start + written.min(layout.capacity);
    let len = len.min(file.metadata()?.len());
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// How many bytes of output the log file at `path` has recorded (0 if there is none): where
/// a restored stream resumes.
pub fn recorded(path: &Path) -> u64 {
    File::open(path)
        .and_then(|f| read_header(&f))
        .map(|(_, written)| written)
        .unwrap_or(0)
}

/// A log's ring mapped into memory (shared with the file, so the file holds what is written).
struct RingMap {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory that stays valid until drop; which bytes may be written
// or read when is governed by the log's progress and its readers' pins (see `LogSink` and
// `OutputLog::send_mapped`).
unsafe impl Send for RingMap {}
// SAFETY: as above.
unsafe impl Sync for RingMap {}

impl RingMap {
    /// Maps the ring of `file` (a log in `layout`), growing the file (sparse) to hold all of
    /// it: a mapped page past the end of a file faults.
    fn new(file: &File, layout: Layout) -> std::io::Result<RingMap> {
        // SAFETY: sysconf has no memory effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let unsupported =
            |why: &str| std::io::Error::new(std::io::ErrorKind::Unsupported, why.to_string());
        if page <= 0 || layout.start != HEADER_SIZE || !HEADER_SIZE.is_multiple_of(page as u64) {
            return Err(unsupported("the ring does not start on a page boundary"));
        }
        let len = usize::try_from(layout.capacity)
            .ok()
            .filter(|&l| l > 0 && l <= isize::MAX as usize)
            .ok_or_else(|| unsupported("the ring is too large to map"))?;
        let end = layout.start + layout.capacity;
        if file.metadata()?.len() < end {
            file.set_len(end)?;
        }
        // SAFETY: a new shared mapping of our own file; it aliases no Rust memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                layout.start as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr =
            std::ptr::NonNull::new(ptr.cast()).ok_or_else(|| unsupported("mmap gave null"))?;
        Ok(RingMap { ptr, len })
    }

    /// Bytes `pos..pos + n` of the ring.
    ///
    /// # Safety
    /// Nobody may write them while the slice lives.
    unsafe fn slice(&self, pos: usize, n: usize) -> &[u8] {
        assert!(pos <= self.len && n <= self.len - pos);
        // SAFETY: in bounds (checked); the caller rules out writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(pos), n) }
    }

    /// Bytes `pos..pos + n` of the ring, to write.
    ///
    /// # Safety
    /// Nobody else may read or write them while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, pos: usize, n: usize) -> &mut [u8] {
        assert!(pos <= self.len && n <= self.len - pos);
        // SAFETY: in bounds (checked); the caller rules out other users.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(pos), n) }
    }
}

impl Drop for RingMap {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; no slice of it outlives the last Arc.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Receives into the ring and tells readers.
///
/// The first time round the ring, bytes go through a small buffer and are written to the file:
/// a page the file does not have yet would cost a fault and a page of zeros through the
/// mapping, and a write also gives the page its disk block (a mapped page whose block cannot be
/// allocated, on a full disk, faults with SIGBUS instead of returning an error). From the
/// second time round, every page exists: bytes are received straight into the mapping.
struct LogSink {
    file: File,
    log: Arc<OutputLog>,
    map: Option<Arc<RingMap>>,
    buf: Vec<u8>,
    /// The space last offered was `buf` (not the mapping).
    buffered: bool,
    /// Bytes committed that readers have not been woken for.
    unannounced: u64,
}

impl LogSink {
    fn new(file: File, log: Arc<OutputLog>) -> LogSink {
        let map = match RingMap::new(&file, log.layout) {
            Ok(map) => Some(Arc::new(map)),
            Err(e) => {
                if log.layout.start > 0 {
                    tracing::debug!(path = %log.path.display(), error = %e, "log not mapped; writing the file");
                }
                None
            }
        };
        *log.lock_map() = map.clone();
        LogSink {
            file,
            log,
            map,
            buf: vec![0; MAX_PAYLOAD],
            buffered: false,
            unannounced: 0,
        }
    }

    /// Wakes readers for what was committed since they last heard.
    fn announce(&mut self) {
        if self.unannounced > 0 {
            self.unannounced = 0;
            self.log.progress.send_modify(|_| {});
        }
    }
}

impl SpaceSink for LogSink {
    fn poll_space(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<&mut [u8]>> {
        let log = &self.log;
        let written = log.progress().written;
        let layout = log.layout;
        // Never overwrite what an attached client has not sent yet.
        let room = match log.pinned_from(cx.waker()) {
            Some(pin) => (pin + layout.capacity).saturating_sub(written),
            None => u64::MAX,
        };
        if room == 0 {
            // The reader holding us back must hear of everything first.
            self.announce();
            return Poll::Pending;
        }
        let take = layout.until_wrap(written).min(room);
        self.buffered = true;
        if let Some(map) = &self.map
            && written >= layout.capacity
        {
            self.buffered = false;
            let pos = (written % layout.capacity) as usize;
            let take = take.min(map.len as u64) as usize;
            // SAFETY: these ring bytes follow everything written, up to the oldest pin's place
            // a ring later: no attached reader reads them (readers without a pin read the file,
            // not the mapping), and this sink is the only writer.
            return Poll::Ready(Ok(unsafe { map.slice_mut(pos, take) }));
        }
        let take = take.min(self.buf.len() as u64) as usize;
        Poll::Ready(Ok(&mut self.buf[..take]))
    }

    fn commit(&mut self, n: usize) -> std::io::Result<()> {
        let log = &self.log;
        if self.buffered {
            let at = log.layout.position(log.progress().written);
            if let Err(e) = self.file.write_all_at(&self.buf[..n], at) {
                tracing::error!(path = %log.path.display(), error = %e, "cannot write captured output");
                return Err(e);
            }
        }
        if n > 0 {
            log.first_new_byte.get_or_init(std::time::Instant::now);
        }
        // Readers see the new count at once (they read it when they look); they are woken
        // only every so often.
        self.unannounced += n as u64;
        let wake = self.unannounced >= ANNOUNCE_EVERY;
        log.progress.send_if_modified(|p| {
            p.written += n as u64;
            wake
        });
        if wake {
            self.unannounced = 0;
        }
        Ok(())
    }

    fn idle(&mut self) {
        self.announce();
    }

    /// Records how much the ring holds. The stream acknowledges bytes only after a flush, so
    /// the header never claims less than the sender has let go of; a crash before a flush
    /// makes a restore ask for bytes again, which land on the same place.
    fn flush(&mut self) -> std::io::Result<()> {
        self.announce();
        let layout = self.log.layout;
        if layout.start > 0 {
            let written = self.log.progress().written;
            self.file
                .write_all_at(&header(layout.capacity, written), 0)?;
        }
        Ok(())
    }
}

/// Positions of attached clients, and the capture waiting for them to move.
#[derive(Default)]
struct Pins {
    at: BTreeMap<u64, u64>,
    writer: Option<Waker>,
}

pub struct OutputLog {
    path: PathBuf,
    layout: Layout,
    progress: watch::Sender<Progress>,
    pins: Mutex<Pins>,
    next_pin: AtomicU64,
    /// A pin taken before the capture started, for a client about to attach (`run` without
    /// `-d`): not one byte may be dropped before its reader pins its own place.
    held: Mutex<Option<u64>>,
    /// The mapped ring while the capture runs, for attached readers to send from.
    map: Mutex<Option<Arc<RingMap>>>,
    /// How much the log held when this capture began, and when the capture got its first
    /// byte beyond that (how long output stopped across a migration, for its report).
    captured_from: u64,
    first_new_byte: std::sync::OnceLock<std::time::Instant>,
}

/// Removes a reader's pin when it stops, and lets the capture go on.
struct PinGuard<'a> {
    log: &'a OutputLog,
    id: u64,
}

impl PinGuard<'_> {
    /// Keeps the pin after the guard is gone (released by id later).
    fn forget(self) -> u64 {
        let id = self.id;
        std::mem::forget(self);
        id
    }

    fn advance(&self, offset: u64) {
        let waker = {
            let mut pins = self.log.lock_pins();
            pins.at.insert(self.id, offset);
            pins.writer.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for PinGuard<'_> {
    fn drop(&mut self) {
        let waker = {
            let mut pins = self.log.lock_pins();
            pins.at.remove(&self.id);
            pins.writer.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl OutputLog {
    /// Starts copying the process's output into the file at `path`: a new ring of `limit`
    /// bytes, or with `append` the existing log (a restored shim continues the log its
    /// predecessor wrote, in that log's own layout).
    pub fn capture(
        path: &Path,
        pipe: OutputPipe,
        append: bool,
        limit: u64,
        hold: bool,
    ) -> std::io::Result<Arc<OutputLog>> {
        let existing = if append {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .ok()
        } else {
            None
        };
        let (file, layout, written) = match existing {
            Some(file) => {
                let (layout, written) = read_header(&file)?;
                (file, layout, written)
            }
            None => {
                // A new file, not the old one truncated: a reader may still have the old one
                // mapped, and its pages must not vanish under it.
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)?;
                let capacity = limit.max(MIN_LOG_LIMIT);
                file.write_all_at(&header(capacity, 0), 0)?;
                file.set_len(HEADER_SIZE)?;
                let layout = Layout {
                    start: HEADER_SIZE,
                    capacity,
                };
                (file, layout, 0)
            }
        };
        let log = Arc::new(OutputLog::new(path, layout, written, false));
        if hold {
            log.hold(written);
        }
        let mut sink = LogSink::new(file, log.clone());
        let l = log.clone();
        tokio::spawn(async move {
            if let Err(e) = pipe.copy_into(&mut sink).await {
                tracing::warn!(path = %l.path.display(), error = %e, "output stream failed");
            }
            // Readers still sending keep their own reference to the mapping.
            l.lock_map().take();
            drop(sink);
            l.progress.send_modify(|p| p.done = true);
        });
        Ok(log)
    }

    /// A finished log (a process that exited before a restore).
    pub fn existing(path: &Path) -> Arc<OutputLog> {
        let (layout, written) = File::open(path).and_then(|f| read_header(&f)).unwrap_or((
            Layout {
                start: 0,
                capacity: u64::MAX,
            },
            0,
        ));
        Arc::new(OutputLog::new(path, layout, written, true))
    }

    fn new(path: &Path, layout: Layout, written: u64, done: bool) -> OutputLog {
        OutputLog {
            path: path.to_path_buf(),
            layout,
            progress: watch::channel(Progress { written, done }).0,
            pins: Mutex::new(Pins::default()),
            next_pin: AtomicU64::new(0),
            held: Mutex::new(None),
            map: Mutex::new(None),
            captured_from: written,
            first_new_byte: std::sync::OnceLock::new(),
        }
    }

    /// Pins `offset` until [`OutputLog::release_hold`].
    fn hold(&self, offset: u64) {
        let id = self.pin(offset).forget();
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }

    /// Drops the pin taken at capture for a client about to attach (once it has its own, or
    /// will not come).
    pub fn release_hold(&self) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(id) = held {
            drop(PinGuard { log: self, id });
        }
    }

    fn lock_pins(&self) -> std::sync::MutexGuard<'_, Pins> {
        self.pins.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_map(&self) -> std::sync::MutexGuard<'_, Option<Arc<RingMap>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The oldest position an attached client still needs; registers `waker` to hear when
    /// it moves.
    fn pinned_from(&self, waker: &Waker) -> Option<u64> {
        let mut pins = self.lock_pins();
        let oldest = pins.at.values().min().copied();
        if oldest.is_some() {
            pins.writer = Some(waker.clone());
        }
        oldest
    }

    fn pin(&self, offset: u64) -> PinGuard<'_> {
        let id = self.next_pin.fetch_add(1, Ordering::Relaxed);
        self.lock_pins().at.insert(id, offset);
        PinGuard { log: self, id }
    }

    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// When the first byte after those the log held at its start arrived, once one has:
    /// waits for it (or for the stream's end: `None`).
    pub async fn first_new_byte(&self) -> Option<std::time::Instant> {
        self.wait_beyond(self.captured_from).await;
        self.first_new_byte.get().copied()
    }

    /// Resolves once more than `offset` bytes are in the log (or the stream has ended).
    pub async fn wait_beyond(&self, offset: u64) {
        let _ = self
            .progress
            .subscribe()
            .wait_for(|p| p.written > offset || p.done)
            .await;
    }

    /// Resolves once the stream has ended and everything is in the file.
    pub async fn finished(&self) {
        let _ = self.progress.subscribe().wait_for(|p| p.done).await;
    }

    /// Sends the log's bytes from `offset` as frames tagged `tag`; with `follow`, keeps going
    /// until the stream has ended, otherwise stops at what was written when called. With
    /// `pin`, the capture waits for this reader rather than overwrite what it has not sent
    /// (an attached client); otherwise output that the ring dropped is skipped and reported
    /// in a [`control::tag::DROPPED`] frame. Returns the offset reached.
    pub async fn send_from<W: AsyncWrite + Unpin>(
        &self,
        mut offset: u64,
        follow: bool,
        pin: bool,
        tag: u8,
        out: &tokio::sync::Mutex<W>,
    ) -> std::io::Result<u64> {
        let file = File::open(&self.path)?;
        let mut rx = self.progress.subscribe();
        let guard = pin.then(|| self.pin(offset));
        if pin {
            self.release_hold();
        }
        let stop_at = self.progress().written;
        // An attached reader sends from the mapped ring (its pin keeps the capture off the
        // bytes it sends); others read the file, which the capture may overwrite meanwhile.
        let map = guard.as_ref().and_then(|_| self.lock_map().clone());
        let mut buf = Vec::new();
        loop {
            let p = *rx.borrow_and_update();
            let limit = if follow { p.written } else { stop_at };
            while offset < limit {
                let oldest = self.layout.oldest(self.progress().written);
                if offset < oldest {
                    let mut skipped = (oldest - offset).to_le_bytes().to_vec();
                    skipped.push(tag);
                    control::write_frame(&mut *out.lock().await, control::tag::DROPPED, &skipped)
                        .await?;
                    offset = oldest;
                    continue;
                }
                if let (Some(map), Some(g)) = (&map, &guard) {
                    offset = self.send_mapped(map, offset, limit, tag, out).await?;
                    g.advance(offset);
                    continue;
                }
                buf.resize(MAX_PAYLOAD, 0);
                let want = (limit - offset)
                    .min(self.layout.until_wrap(offset))
                    .min(buf.len() as u64) as usize;
                let n = file.read_at(&mut buf[..want], self.layout.position(offset))?;
                if n == 0 {
                    break;
                }
                // The ring may have moved on while we read: check before sending.
                if offset < self.layout.oldest(self.progress().written) {
                    continue;
                }
                control::write_frame(&mut *out.lock().await, tag, &buf[..n]).await?;
                offset += n as u64;
                if let Some(g) = &guard {
                    g.advance(offset);
                }
            }
            if !follow || (p.done && offset >= p.written) {
                return Ok(offset);
            }
            if rx.changed().await.is_err() {
                return Ok(offset);
            }
        }
    }

    /// Sends ring bytes from `offset` towards `limit` (written, not dropped, and at or past
    /// this reader's pin) as frames straight from the mapping, several per system call;
    /// returns the offset reached.
    async fn send_mapped<W: AsyncWrite + Unpin>(
        &self,
        map: &RingMap,
        offset: u64,
        limit: u64,
        tag: u8,
        out: &tokio::sync::Mutex<W>,
    ) -> std::io::Result<u64> {
        let mut frames = Vec::new();
        let (mut at, mut total) = (offset, 0);
        while at < limit && total < SEND_BATCH {
            let n = (limit - at)
                .min(self.layout.until_wrap(at))
                .min((SEND_BATCH - total).min(MAX_PAYLOAD) as u64) as usize;
            frames.push((
                control::frame_head(tag, n),
                self.layout.position(at) - self.layout.start,
                n,
            ));
            at += n as u64;
            total += n;
        }
        let mut iov = Vec::with_capacity(2 * frames.len());
        for (head, pos, n) in &frames {
            iov.push(IoSlice::new(head));
            // SAFETY: these bytes were written (below `limit`) and not dropped, and this
            // reader's pin stands at or before them: the capture writes no ring byte within a
            // ring's length after the oldest pin, so none of these until the pin moves past
            // them (after this call).
            iov.push(IoSlice::new(unsafe { map.slice(*pos as usize, *n) }));
        }
        control::write_all_vectored(&mut *out.lock().await, &mut iov).await?;
        Ok(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ferry-log-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("1.stdout")
    }

    /// A log fed by hand through its sink (no process needed).
    fn ring(path: &Path, limit: u64) -> (Arc<OutputLog>, LogSink) {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .unwrap();
        file.write_all_at(&header(limit, 0), 0).unwrap();
        let layout = Layout {
            start: HEADER_SIZE,
            capacity: limit,
        };
        let log = Arc::new(OutputLog::new(path, layout, 0, false));
        (log.clone(), LogSink::new(file, log))
    }

    /// Feeds `data` through the sink as a stream would (waiting for room as needed).
    async fn feed(sink: &mut LogSink, data: &[u8]) {
        let mut from = data;
        while transport::resumable::read_into(&mut from, sink, usize::MAX)
            .await
            .unwrap()
            > 0
        {}
    }

    /// Reads frames from the other end of `send_from`: (data, dropped).
    fn decode(mut bytes: &[u8]) -> (Vec<u8>, u64) {
        let (mut data, mut dropped) = (Vec::new(), 0);
        while !bytes.is_empty() {
            let len = u32::from_le_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
            let payload = &bytes[5..5 + len];
            match bytes[0] {
                control::tag::STDOUT => data.extend_from_slice(payload),
                control::tag::DROPPED => {
                    assert_eq!(payload[8], control::tag::STDOUT, "the stream is named");
                    dropped += u64::from_le_bytes(payload[..8].try_into().unwrap())
                }
                t => panic!("unexpected tag {t}"),
            }
            bytes = &bytes[5 + len..];
        }
        (data, dropped)
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i % 251) as u8).collect()
    }

    #[tokio::test]
    async fn the_first_new_byte_is_timed_where_it_arrived() {
        // What a migration's report reads: output may flow before anyone asks.
        let path = temp("first-new");
        let (log, mut sink) = ring(&path, MIN_LOG_LIMIT);
        let nothing_yet =
            tokio::time::timeout(std::time::Duration::ZERO, log.first_new_byte()).await;
        assert!(nothing_yet.is_err(), "no byte has come");
        let before = std::time::Instant::now();
        feed(&mut sink, b"first").await;
        let after = std::time::Instant::now();
        feed(&mut sink, b"second").await;
        let at = log.first_new_byte().await.expect("a byte came");
        assert!(
            before <= at && at <= after,
            "the first byte's arrival, not a later one"
        );
    }

    #[tokio::test]
    async fn a_reader_behind_the_ring_is_told_what_was_dropped() {
        let path = temp("dropped");
        let limit = MIN_LOG_LIMIT;
        let (log, mut sink) = ring(&path, limit);
        let data = pattern(3 * limit as usize + 123);
        feed(&mut sink, &data).await;
        assert_eq!(
            recorded(&path),
            0,
            "recorded on flush (before an acknowledgement)"
        );
        SpaceSink::flush(&mut sink).unwrap();
        assert_eq!(
            recorded(&path),
            data.len() as u64,
            "the header counts every byte"
        );
        let out = tokio::sync::Mutex::new(Vec::new());
        let end = log
            .send_from(0, false, false, control::tag::STDOUT, &out)
            .await
            .unwrap();
        assert_eq!(end, data.len() as u64);
        let (got, dropped) = decode(&out.into_inner());
        assert_eq!(dropped, data.len() as u64 - limit);
        assert_eq!(
            got,
            data[dropped as usize..],
            "the last `limit` bytes, in order"
        );
    }

    #[tokio::test]
    async fn an_attached_reader_holds_the_writer_back_and_gets_everything() {
        let path = temp("pinned");
        let limit = MIN_LOG_LIMIT;
        let (log, mut sink) = ring(&path, limit);
        // As `run` does: held from the start, until the client's reader has its own pin.
        log.hold(0);
        let data = pattern(10 * limit as usize + 7);
        // A slow client: a small pipe it drains as the log sends.
        let (w, mut r) = tokio::io::duplex(4096);
        let out = tokio::sync::Mutex::new(w);
        let reader = async {
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut r, &mut all)
                .await
                .unwrap();
            all
        };
        let log2 = log.clone();
        let send = async move {
            let end = log2
                .send_from(0, true, true, control::tag::STDOUT, &out)
                .await
                .unwrap();
            out.lock().await.shutdown().await.unwrap();
            end
        };
        let write = async {
            // Past the ring's size: this must wait for the reader, not overwrite.
            feed(&mut sink, &data).await;
            log.progress.send_modify(|p| p.done = true);
        };
        let (_, end, bytes) = tokio::join!(write, send, reader);
        assert_eq!(end, data.len() as u64);
        let (got, dropped) = decode(&bytes);
        assert_eq!(dropped, 0);
        assert!(got == data, "an attached client lost or reordered output");
    }

    #[test]
    fn plain_logs_from_before_the_ring_still_read() {
        let path = temp("plain");
        std::fs::write(&path, b"old output\n").unwrap();
        assert_eq!(recorded(&path), 11);
        let log = OutputLog::existing(&path);
        assert_eq!(log.progress().written, 11);
        assert_eq!(log.layout.position(3), 3);
    }

    #[test]
    fn a_corrupt_header_is_an_error() {
        let path = temp("corrupt");
        let mut h = header(MIN_LOG_LIMIT, 5).to_vec();
        h[8] = 9; // unknown version
        h.resize(HEADER_SIZE as usize, 0);
        std::fs::write(&path, &h).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(
            read_header(&f).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
    }
}
