//! The host channel inside a QEMU VM: a named virtio-serial port carrying a yamux session.
//!
//! Facts this follows (notes/qemu-lab.md): the guest has no udev, so the port is found by its
//! name under `/sys/class/virtio-ports/*/name` and opened as `/dev/<vportNpM>`; while no host
//! client is connected to the port's socket, reads return end-of-file at once and writes
//! block; after a migration the host reconnects. So one session lasts as long as one host
//! client: when the port reports end-of-file (or fails) the session is over, and a supervisor
//! reopens the port, waits for the next host client and starts a new session. The bridge's own
//! reconnect loop then re-dials over it ([`transport::Transport::mux_reconnecting`]).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use transport::session_hello::ResetFilter;
use transport::{MuxRole, MuxSession, Transport};

/// Where the kernel lists virtio-serial ports, and where devtmpfs puts their nodes.
pub const SYSFS_PORTS: &str = "/sys/class/virtio-ports";
pub const DEV_DIR: &str = "/dev";

/// Pause between looks while the port is missing, busy, or has no host client. Short: after a
/// migration the guest should be back as soon as the host reconnects.
const RETRY: Duration = Duration::from_millis(50);
/// How often to look for a new host in the first moments after the last one left.
const FAST_LOOK: Duration = Duration::from_millis(5);
const FAST_LOOK_FOR: Duration = Duration::from_secs(2);
/// Quiet retries, but say something this often.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// The smallest read from the port (the multiplexer reads a frame's 12-byte header alone).
const MIN_READ: usize = 4096;
/// A port name longer than this is not ours (sysfs gives at most a page).
const MAX_NAME: usize = 256;

/// Finds the device node of the port called `name`: the `vportNpM` entry whose `name` file
/// holds it. `None` while it is not there (the name arrives from the host asynchronously,
/// after the device itself).
pub fn find_port(sys_dir: &Path, dev_dir: &Path, name: &str) -> io::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(sys_dir) {
        Ok(e) => e,
        // No virtio_console yet (module not loaded, or no device).
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut found: Vec<PathBuf> = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Ok(bytes) = std::fs::read(entry.path().join("name")) else {
            continue;
        };
        if bytes.len() > MAX_NAME {
            continue;
        }
        if String::from_utf8_lossy(&bytes).trim_end_matches(['\n', '\0']) == name {
            found.push(dev_dir.join(entry.file_name()));
        }
    }
    // Deterministic if the host (wrongly) gave two ports the same name.
    found.sort();
    Ok(found.into_iter().next())
}

/// An open port, as a non-blocking async byte stream, for one session.
pub struct VirtioPort {
    fd: AsyncFd<OwnedFd>,
    retired: Retirement,
    /// Drops the resets a host wrote for the session before this one
    /// ([`transport::session_hello`]).
    start: ResetFilter,
    /// What was read from the port (and passed the filter) that the reader's buffer had no
    /// room for yet: `carry[carry_at..]`.
    carry: Vec<u8>,
    carry_at: usize,
}

/// Ends a port's use by its session for good. The descriptor shares the device with the
/// next session's, and a session's driver may still try to write (a late yamux frame) after
/// the session has ended: such bytes would land after the next session's hello and break it.
/// Writes hold the lock across the system call, so once `retire` returns none is under way
/// and none will follow.
#[derive(Clone, Default)]
pub struct Retirement(std::sync::Arc<std::sync::Mutex<bool>>);

impl Retirement {
    pub fn retire(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
    }
}

impl VirtioPort {
    /// The handle that retires this port (see [`Retirement`]).
    pub fn retirement(&self) -> Retirement {
        self.retired.clone()
    }

    /// Opens the port. The kernel lets one opener at a time in: `EBUSY` means the last
    /// session's descriptor is still being closed.
    pub fn open(path: &Path) -> io::Result<OwnedFd> {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in the port path"))?;
        // SAFETY: open with a valid C string; the result is checked.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Whether a host client is connected right now: the port polls as hung up while none is.
    pub fn host_connected(fd: &OwnedFd) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN | libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        if unsafe { libc::poll(&mut p, 1, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(p.revents & libc::POLLHUP == 0)
    }

    /// Registers the descriptor with the runtime. Do this only once a host is connected:
    /// tokio keeps a hang-up it has seen as permanent readiness for that registration.
    pub fn new(fd: OwnedFd) -> io::Result<VirtioPort> {
        // The I/O below relies on EAGAIN, whoever opened the descriptor.
        // SAFETY: fcntl on a descriptor we own, with integer arguments.
        unsafe {
            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
            if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0
            {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the AsyncFd owns the descriptor for its whole life.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(VirtioPort {
            fd,
            retired: Retirement::default(),
            start: ResetFilter::default(),
            carry: Vec::new(),
            carry_at: 0,
        })
    }
}

fn check(n: isize) -> io::Result<usize> {
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl VirtioPort {
    /// Reads what the port has, as it comes.
    fn poll_read_port(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // A retired session reads nothing more: the bytes are the next session's.
            let retired = self.retired.0.lock().unwrap_or_else(|p| p.into_inner());
            if *retired {
                return Poll::Ready(Ok(()));
            }
            let unfilled = buf.initialize_unfilled();
            let result = guard.try_io(|fd| {
                // SAFETY: reading into an initialised buffer of the given length.
                check(unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                })
            });
            drop(retired);
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncRead for VirtioPort {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let carried = &this.carry[this.carry_at..];
            if !carried.is_empty() {
                let n = carried.len().min(buf.remaining());
                buf.put_slice(&carried[..n]);
                this.carry_at += n;
                return Poll::Ready(Ok(()));
            }
            if this.start.passing() && buf.remaining() >= MIN_READ {
                return this.poll_read_port(cx, buf);
            }
            // Never less than MIN_READ from the port: a reset arrives whole, and a session
            // that fails on its first bytes leaves none of it for the next one.
            let mut chunk = [0u8; MIN_READ];
            let mut chunk = ReadBuf::new(&mut chunk);
            ready!(this.poll_read_port(cx, &mut chunk))?;
            if chunk.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
            this.carry_at = 0;
            if this.start.passing() {
                // The common case once a session runs: the buffer is reused.
                this.carry.clear();
                this.carry.extend_from_slice(chunk.filled());
            } else {
                this.carry = this.start.feed(chunk.filled());
            }
        }
    }
}

impl AsyncWrite for VirtioPort {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            // A hang-up stays "ready" for good; without this a write to a port whose host
            // left would spin instead of ending the session.
            let hung_up = guard.ready().is_write_closed();
            let retired = self.retired.0.lock().unwrap_or_else(|p| p.into_inner());
            if *retired {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "this multiplexer session has ended",
                )));
            }
            let result = guard.try_io(|fd| {
                // SAFETY: writing from a valid buffer of the given length.
                check(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
            });
            drop(retired);
            match result {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) if hung_up => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the host disconnected from the virtio-serial port",
                    )));
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A transport over the port called `name` that survives host reconnects: spawns the
/// supervisor (on the current runtime) and returns the transport that follows its sessions.
pub fn transport(name: &str) -> Transport {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(supervise(name.to_owned(), tx));
    Transport::mux_reconnecting(rx)
}

/// Rate-limited "still waiting" messages.
struct Waiting {
    what: &'static str,
    since: Option<Instant>,
    last: Instant,
}

impl Waiting {
    fn new(what: &'static str) -> Waiting {
        Waiting {
            what,
            since: None,
            last: Instant::now(),
        }
    }

    fn tick(&mut self, name: &str, detail: &str) {
        match self.since {
            None => {
                self.since = Some(Instant::now());
                self.last = Instant::now();
                tracing::info!(port = name, detail, "waiting for {}", self.what);
            }
            Some(since) if self.last.elapsed() > WARN_EVERY => {
                self.last = Instant::now();
                tracing::warn!(port = name, detail, waited = ?since.elapsed(), "still waiting for {}", self.what);
            }
            Some(_) => {}
        }
    }

    fn done(&self, name: &str) {
        if let Some(since) = self.since {
            tracing::debug!(port = name, waited = ?since.elapsed(), "done waiting for {}", self.what);
        }
    }
}

/// Runs sessions over the port, one per host client, forever (or until nobody follows them).
async fn supervise(name: String, tx: watch::Sender<Option<MuxSession>>) {
    let mut generation = 0u64;
    // The port stays open across sessions: closing it and opening it again costs a retry
    // while the kernel still holds the last descriptor (EBUSY), which is time the next host
    // waits for its session.
    let mut device: Option<OwnedFd> = None;
    loop {
        let fd = open_connected(&name, &mut device).await;
        let mut port = match VirtioPort::new(fd) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(port = %name, error = %e, "cannot register the port with the runtime");
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        // The host starts its side at this marker: whatever an earlier session left in the
        // channel is not mistaken for this one (transport::session_hello).
        if let Err(e) = transport::session_hello::send_hello(&mut port).await {
            tracing::info!(port = %name, error = %e, "the host left before the session began");
            continue;
        }
        generation += 1;
        let retirement = port.retirement();
        let session = MuxSession::new(port, MuxRole::Server);
        tracing::info!(port = %name, session = generation, "host connected; multiplexer session started");
        tx.send_replace(Some(session.clone()));
        tokio::select! {
            _ = session.closed() => {}
            // Nobody holds the transport any more: the agent has stopped.
            _ = tx.closed() => return,
        }
        tx.send_replace(None);
        // Before the next session's hello: nothing of this one may follow it.
        retirement.retire();
        // A new host is coming (a migration, a restore): be quick about it.
        crate::priority::host_changed();
        tracing::info!(port = %name, session = generation, "host gone (end of port); waiting for the next host");
        drop(session);
    }
}

/// Finds and opens the port (unless `device` holds it open already), then waits until a host
/// client is on it; returns a descriptor of its own for the session.
async fn open_connected(name: &str, device: &mut Option<OwnedFd>) -> OwnedFd {
    let mut finding = Waiting::new("the virtio-serial port");
    let mut host = Waiting::new("a host on the virtio-serial port");
    loop {
        let fd = match device.take() {
            Some(fd) => fd,
            None => {
                let path = match find_port(Path::new(SYSFS_PORTS), Path::new(DEV_DIR), name) {
                    Ok(Some(p)) => p,
                    Ok(None) => {
                        finding.tick(name, "no port by that name yet");
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                    Err(e) => {
                        finding.tick(name, &format!("{SYSFS_PORTS}: {e}"));
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                };
                match VirtioPort::open(&path) {
                    Ok(fd) => fd,
                    Err(e) => {
                        // EBUSY: another descriptor of the port is still closing; ENOENT:
                        // the node is not in /dev yet.
                        finding.tick(name, &format!("open {}: {e}", path.display()));
                        tokio::time::sleep(RETRY).await;
                        continue;
                    }
                }
            }
        };
        finding.done(name);
        match VirtioPort::host_connected(&fd) {
            Ok(true) => match fd.try_clone() {
                Ok(session_fd) => {
                    host.done(name);
                    *device = Some(fd);
                    return session_fd;
                }
                Err(e) => {
                    host.tick(name, &format!("dup: {e}"));
                    *device = Some(fd);
                }
            },
            Ok(false) => {
                host.tick(name, "no host client on the port's socket");
                *device = Some(fd);
            }
            // The port went away (device unplugged): find it again.
            Err(e) => host.tick(name, &format!("poll the port: {e}")),
        }
        // The port cannot signal a host's arrival (it polls as hung up until then), so look
        // often at first: right after a migration or a host restart the next host is moments
        // away, and every millisecond here is output not flowing.
        let waited = host.since.map(|t| t.elapsed()).unwrap_or_default();
        tokio::time::sleep(if waited < FAST_LOOK_FOR {
            FAST_LOOK
        } else {
            RETRY
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The port's I/O carries a multiplexer session, and its end is seen as a hang-up; a
    /// socket pair stands in for the character device (same poll semantics for this).
    #[tokio::test]
    async fn carries_a_session_and_sees_the_host_leave() {
        let (guest_end, host_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = OwnedFd::from(guest_end);
        assert!(VirtioPort::host_connected(&fd).unwrap());
        let guest_session = MuxSession::new(VirtioPort::new(fd).unwrap(), MuxRole::Server);
        let guest = Transport::mux(guest_session.clone());
        host_end.set_nonblocking(true).unwrap();
        let host_session = MuxSession::new(
            tokio::net::UnixStream::from_std(host_end).unwrap(),
            MuxRole::Client,
        );
        let host = Transport::mux(host_session.clone());
        let mut listener = host.listen(9).await.unwrap();
        let (dialed, accepted) =
            tokio::join!(guest.dial(9, Duration::from_secs(10)), listener.accept());
        let (mut d, mut a) = (dialed.unwrap(), accepted.unwrap());
        let big = vec![0x5a; 1 << 20];
        let writer = tokio::spawn(async move {
            d.write_all(&big).await.unwrap();
            d.shutdown().await.unwrap();
            d
        });
        let mut got = Vec::new();
        a.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 1 << 20);
        drop(writer.await.unwrap());

        // The host goes away: the guest's session ends.
        drop((a, listener, host, host_session));
        tokio::time::timeout(Duration::from_secs(10), guest_session.closed())
            .await
            .expect("the guest's session ends when the host leaves");
    }

    /// A host that finds the guest's old session still running ends it with a reset; the
    /// session the guest starts next drops the reset if it reads it first.
    #[tokio::test]
    async fn a_reset_ends_an_old_session_and_is_dropped_by_a_new_one() {
        use transport::session_hello::SESSION_RESET;
        // An old session, under way (it has read its host's frames): a reset written into
        // it, as by the next host, ends it at once.
        let (guest_end, host_end) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut next_host = host_end.try_clone().unwrap();
        host_end.set_nonblocking(true).unwrap();
        let old = MuxSession::new(
            VirtioPort::new(OwnedFd::from(guest_end)).unwrap(),
            MuxRole::Server,
        );
        let old_host = Transport::mux(MuxSession::new(
            tokio::net::UnixStream::from_std(host_end).unwrap(),
            MuxRole::Client,
        ));
        let mut listener = guest_listener(&old, 5).await;
        let (dialed, accepted) =
            tokio::join!(old_host.dial(5, Duration::from_secs(10)), listener.accept());
        let (mut d, mut a) = (dialed.unwrap(), accepted.unwrap());
        d.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        a.read_exact(&mut one).await.unwrap();
        std::io::Write::write_all(&mut next_host, SESSION_RESET).unwrap();
        tokio::time::timeout(Duration::from_secs(10), old.closed())
            .await
            .expect("the old session ends on a reset");

        // A new session that reads resets first (split across writes) works as usual.
        let (guest_end, mut host_end) = tokio_pair();
        let guest = Transport::mux(MuxSession::new(
            VirtioPort::new(OwnedFd::from(guest_end)).unwrap(),
            MuxRole::Server,
        ));
        host_end.write_all(&SESSION_RESET[..5]).await.unwrap();
        host_end.flush().await.unwrap();
        tokio::task::yield_now().await;
        host_end.write_all(&SESSION_RESET[5..]).await.unwrap();
        host_end.write_all(SESSION_RESET).await.unwrap();
        let host = Transport::mux(MuxSession::new(host_end, MuxRole::Client));
        let mut listener = host.listen(7).await.unwrap();
        let (dialed, accepted) =
            tokio::join!(guest.dial(7, Duration::from_secs(10)), listener.accept());
        let (mut d, mut a) = (dialed.unwrap(), accepted.unwrap());
        d.write_all(b"after the resets").await.unwrap();
        d.shutdown().await.unwrap();
        let mut got = String::new();
        a.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "after the resets");
    }

    async fn guest_listener(session: &MuxSession, port: u32) -> transport::Listener {
        Transport::mux(session.clone()).listen(port).await.unwrap()
    }

    fn tokio_pair() -> (std::os::unix::net::UnixStream, tokio::net::UnixStream) {
        let (guest_end, host_end) = std::os::unix::net::UnixStream::pair().unwrap();
        host_end.set_nonblocking(true).unwrap();
        (
            guest_end,
            tokio::net::UnixStream::from_std(host_end).unwrap(),
        )
    }

    #[test]
    fn a_closed_peer_polls_as_hung_up() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let fd = OwnedFd::from(a);
        assert!(VirtioPort::host_connected(&fd).unwrap());
        drop(b);
        assert!(!VirtioPort::host_connected(&fd).unwrap());
    }

    #[test]
    fn finds_a_port_by_name() {
        let dir = std::env::temp_dir().join(format!("ferry-vport-{}", std::process::id()));
        let sys = dir.join("sys");
        for (entry, name) in [
            ("vport0p0", ""),
            ("vport0p1", "ferry.0\n"),
            ("vport0p2", "other"),
        ] {
            std::fs::create_dir_all(sys.join(entry)).unwrap();
            std::fs::write(sys.join(entry).join("name"), name).unwrap();
        }
        let dev = Path::new("/dev");
        assert_eq!(
            find_port(&sys, dev, "ferry.0").unwrap(),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(find_port(&sys, dev, "missing").unwrap(), None);
        assert_eq!(
            find_port(&dir.join("absent"), dev, "ferry.0").unwrap(),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
