//! Arbitrary bytes as what a guest (which the host does not trust) sends over the
//! virtio-serial port: the host's side as `uvm::qemu` runs it, a session hello scan and then
//! the multiplexer in the client role, listening on the bridge port and a stdio port, serving
//! the streams the guest opens and dialling one of its own. Must never panic, must end once
//! the bytes do (every task finishes, the session reports itself closed), and must use memory
//! bounded by a constant plus a multiple of the input. The hello scan must stop at the first
//! hello and count what came before it.
//!
//! Deterministic: the peer's bytes come in a fixed pattern of read sizes, and after the hello
//! each read first waits, for one turn of the scheduler or until the host is idle (so streams
//! are served while frames arrive); the runtime is single-threaded and its clock paused (it
//! jumps ahead when every task waits on a timer), so the time limit counts virtual time, and a
//! busy loop is caught by a budget of I/O calls instead.

#![no_main]

use ferry_fuzz::{Metered, measure};
use libfuzzer_sys::fuzz_target;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::task::JoinSet;
use transport::session_hello::{Hello, SESSION_HELLO, read_hello};
use transport::{BoxStream, MuxRole, MuxSession, Transport};

#[global_allocator]
static ALLOC: Metered = Metered;

/// Read sizes the peer's bytes arrive in, over and over: frames split at odd places. Small
/// while the host looks for the hello, so that most of a session's bytes come after the host
/// has set up its side (as they would from a guest that answers it), not with the hello.
const HELLO_READS: [usize; 6] = [1, 5, 12, 3, 7, 16];
const READS: [usize; 8] = [1, 5, 12, 64, 3, 4096, 16, 7];
/// A stdio port the host listens on besides the bridge's, and the port it dials.
const STDIO_PORT: u32 = 0x4000_0001;
const DIAL_PORT: u32 = 0x4000_0002;
/// Virtual time for a whole session: far beyond the mux's own timeouts (5 s).
const TIME_LIMIT: Duration = Duration::from_secs(3600);
/// Memory a session may use whatever its input (yamux takes up to 1 MiB for a frame body from
/// its 12-byte header), and per input byte (a 12-byte frame opens a stream: yamux's state, a
/// task and a buffer for it).
const FIXED_MEMORY: usize = 4 << 20;
const MEMORY_PER_BYTE: usize = 1024;

/// With FERRY_FUZZ_VERBOSE set, each input's outcome is printed (to check what the seeds
/// reach).
fn verbose() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var_os("FERRY_FUZZ_VERBOSE").is_some())
}

/// What the host got through a session, for the verbose output.
#[derive(Debug, Default)]
struct Seen {
    streams: AtomicUsize,
    bytes: AtomicUsize,
    dialled: AtomicUsize,
}

/// One runtime for the whole run: building one per input would dominate the time per exec.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("tokio runtime")
    })
}

/// The guest's end of the port: reads give the fuzz input, then end of stream; writes are
/// taken whole and dropped. Every call counts against a budget.
struct Peer {
    input: Vec<u8>,
    pos: usize,
    reads: usize,
    /// Reads wait first (set after the hello: `read_hello` measures its patience in real time,
    /// so it must never wait).
    interleave: bool,
    /// What the next read waits for, once decided.
    wait: Option<Wait>,
    calls: Arc<AtomicUsize>,
    budget: usize,
}

/// What a read waits for before it gives bytes.
enum Wait {
    /// One turn of the scheduler: the host's other tasks run between two reads.
    Turn,
    /// A timer on the paused clock, which fires only when every task waits: the guest pauses
    /// until the host has answered (every 4th read, and before the end of the stream: the
    /// guest said all it had to say and hangs up once the host is done with it).
    Quiet(Pin<Box<tokio::time::Sleep>>),
    Over,
}

impl Peer {
    fn call(&self) {
        let n = self.calls.fetch_add(1, Relaxed) + 1;
        assert!(
            n <= self.budget,
            "{n} I/O calls for {} input bytes: a busy loop",
            self.input.len()
        );
    }
}

impl AsyncRead for Peer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.call();
        if self.interleave {
            let quiet = self.reads % 4 == 3 || self.pos == self.input.len();
            let wait = self.wait.get_or_insert_with(|| {
                if quiet {
                    Wait::Quiet(Box::pin(tokio::time::sleep(Duration::from_millis(1))))
                } else {
                    Wait::Turn
                }
            });
            match wait {
                Wait::Turn => {
                    *wait = Wait::Over;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Wait::Quiet(sleep) => {
                    if sleep.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
                Wait::Over => {}
            }
            self.wait = None;
        }
        let sizes: &[usize] = if self.interleave {
            &READS
        } else {
            &HELLO_READS
        };
        let size = sizes[self.reads % sizes.len()];
        self.reads += 1;
        let n = size.min(buf.remaining()).min(self.input.len() - self.pos);
        buf.put_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.call();
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.call();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.call();
        Poll::Ready(Ok(()))
    }
}

/// What the host does with a stream: reads it to its end, answering each read with a few
/// bytes (as the bridge answers requests).
async fn serve(mut stream: BoxStream, seen: Arc<Seen>) {
    seen.streams.fetch_add(1, Relaxed);
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                seen.bytes.fetch_add(n, Relaxed);
                if stream.write_all(&buf[..n.min(16)]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown().await;
}

async fn host(data: &[u8], seen: Arc<Seen>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let peer = Peer {
        input: data.to_vec(),
        pos: 0,
        reads: 0,
        interleave: false,
        wait: None,
        calls: Arc::clone(&calls),
        budget: 10_000 + 64 * data.len(),
    };
    let mut reader = BufReader::new(peer);
    let first = data
        .windows(SESSION_HELLO.len())
        .position(|w| w == SESSION_HELLO);
    match read_hello(&mut reader, Duration::from_secs(5)).await {
        Ok(Hello::Found { discarded }) => {
            assert_eq!(Some(discarded), first, "not the first hello, or miscounted")
        }
        Ok(Hello::Closed) => {
            assert_eq!(first, None, "a hello was missed");
            return;
        }
        other => panic!("{other:?} from bytes that are all there at once"),
    }
    let peer = reader.get_mut();
    peer.interleave = true;
    peer.reads = 0;

    let session = MuxSession::new(reader, MuxRole::Client);
    let transport = Transport::mux(session.clone());
    let mut tasks = JoinSet::new();
    for port in [bridge::BRIDGE_PORT, STDIO_PORT] {
        let Ok(mut listener) = transport.listen(port).await else {
            assert!(session.is_closed(), "listening on a live session failed");
            continue;
        };
        let seen = Arc::clone(&seen);
        tasks.spawn(async move {
            let mut served = JoinSet::new();
            while let Ok(stream) = listener.accept().await {
                served.spawn(serve(stream, Arc::clone(&seen)));
            }
            while let Some(r) = served.join_next().await {
                r.expect("serving a stream");
            }
        });
    }
    let dialler = transport.clone();
    tasks.spawn(async move {
        if let Ok(stream) = dialler.dial(DIAL_PORT, Duration::from_secs(5)).await {
            seen.dialled.fetch_add(1, Relaxed);
            serve(stream, seen).await;
        }
    });
    drop(transport);

    session.closed().await;
    while let Some(r) = tasks.join_next().await {
        r.expect("a host task");
    }
    drop(session);
    // The session's own tasks (its driver, the port handshakes) end too.
    let metrics = tokio::runtime::Handle::current().metrics();
    while metrics.num_alive_tasks() > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = runtime();
    let seen = Arc::new(Seen::default());
    let ((), usage) = measure(|| {
        rt.block_on(async {
            let host = host(data, Arc::clone(&seen));
            if tokio::time::timeout(TIME_LIMIT, host).await.is_err() {
                panic!("the session did not end after its input did");
            }
        })
    });
    if verbose() {
        eprintln!("{} bytes: {seen:?}, memory {usage:?}", data.len());
    }
    let bound = FIXED_MEMORY + MEMORY_PER_BYTE * data.len();
    assert!(
        usage.peak <= bound,
        "{} input bytes took {} bytes of memory at once (bound {bound})",
        data.len(),
        usage.peak
    );
});
