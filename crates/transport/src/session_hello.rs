//! The start of a multiplexer session over a byte stream that outlives sessions.
//!
//! A virtio-serial port stays open across host connections: a host that connects may find
//! the guest still running the session of the host before it (the guest learns that its host
//! left only from the port's end-of-file, which can come after the next host has connected,
//! as after a migration). So the guest writes a session hello first in every session, and a
//! host starts its own side only after reading it: bytes before it belong to an older
//! session and are dropped (the resumable streams send them again).
//!
//! Telling the guest that its old session is over:
//! * a host that knows the guest understands it (the guest's hello said version 2) writes
//!   [`SESSION_RESET`] first on a new connection: it is not a multiplexer frame, so the old
//!   session, if the guest still runs one, fails on it at once and the guest starts a new
//!   one. A session the guest started on this connection before reading it drops it
//!   ([`ResetFilter`]). Under TCG this saves the wait for the old session to speak first;
//! * otherwise, or if the guest still does not answer, a host that hears no hello in time
//!   cuts the connection, so that the guest sees the end of its old session.
//!
//! Versions: 1 (`\0FERRY-MUX-SESSION-1\n`) knows no reset; 2 drops resets at its start. A
//! host reads both; a guest of version 2 needs a host that reads it.

use std::time::{Duration, Instant};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// What every hello starts with. NUL first: it never recurs inside a marker, so a simple
/// scan finds it. A version digit and a newline follow.
const HELLO_PREFIX: &[u8] = b"\0FERRY-MUX-SESSION-";
/// The hello this guest side writes.
pub const SESSION_HELLO: &[u8] = b"\0FERRY-MUX-SESSION-2\n";
/// The first version whose guest drops a [`SESSION_RESET`] at the start of a session.
pub const RESET_VERSION: u8 = 2;
/// Written by a host at the start of a connection: "whatever session you ran is over". Its
/// second byte is no multiplexer frame type, so a session that reads it as a frame fails.
pub const SESSION_RESET: &[u8] = b"\0FERRY-MUX-RESET\n";

/// Stale bytes a host discards while looking for the hello before it gives up on this
/// connection anyway.
const MAX_DISCARD: usize = 64 << 20;

/// Guest side: announces a new session.
pub async fn send_hello<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.write_all(SESSION_HELLO).await?;
    w.flush().await
}

/// Host side: tells a guest that understands it ([`RESET_VERSION`]) to end its old session.
pub async fn send_reset<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.write_all(SESSION_RESET).await?;
    w.flush().await
}

/// What a host found on a new connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// The hello, of this version: everything after it is the new session.
    Found { discarded: usize, version: u8 },
    /// None within the patience (an old session may still run, or the guest is not up).
    Missing { discarded: usize },
    /// The connection ended.
    Closed,
}

/// How long a hello may still follow bytes of an older session. Such bytes mean the guest
/// still runs it (a new session writes nothing before its hello, and what an old one had
/// queued arrives at once): better to cut soon than to wait out the patience.
pub const STALE_GRACE: Duration = Duration::from_millis(5);

/// Where a scan for a hello stands: how much of it matched so far.
#[derive(Default)]
struct Scan {
    matched: usize,
    version: u8,
}

impl Scan {
    /// Feeds one byte: Some(version) when it completes a hello; `discarded` counts the bytes
    /// that turned out not to be part of one.
    fn feed(&mut self, b: u8, discarded: &mut usize) -> Option<u8> {
        let n = HELLO_PREFIX.len();
        let fits = match self.matched {
            m if m < n => b == HELLO_PREFIX[m],
            m if m == n => b.is_ascii_digit() && b != b'0',
            _ => b == b'\n',
        };
        if fits {
            if self.matched == n {
                self.version = b - b'0';
            }
            self.matched += 1;
            if self.matched == n + 2 {
                return Some(self.version);
            }
        } else {
            *discarded += self.matched + 1;
            self.matched = usize::from(b == HELLO_PREFIX[0]);
            *discarded -= self.matched;
        }
        None
    }
}

/// Host side: reads up to and including the hello, discarding what comes before it, for at
/// most `patience`, and at most `stale_grace` once stale bytes have come: [`STALE_GRACE`],
/// or the whole patience after a [`SESSION_RESET`] (the old session's bytes then only mean
/// that the guest has not read the reset yet). Reads only from `r`'s buffer onwards, so the
/// bytes after the hello stay in `r` for the session.
pub async fn read_hello<R: AsyncBufRead + Unpin>(
    r: &mut R,
    patience: Duration,
    stale_grace: Duration,
) -> std::io::Result<Hello> {
    let mut deadline = Instant::now() + patience;
    let mut scan = Scan::default();
    let mut discarded = 0usize;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let buf = match tokio::time::timeout(left, r.fill_buf()).await {
            Err(_) => return Ok(Hello::Missing { discarded }),
            Ok(Err(e)) => return Err(e),
            Ok(Ok([])) => return Ok(Hello::Closed),
            Ok(Ok(buf)) => buf,
        };
        let mut used = 0;
        for &b in buf {
            used += 1;
            if let Some(version) = scan.feed(b, &mut discarded) {
                r.consume(used);
                return Ok(Hello::Found { discarded, version });
            }
        }
        r.consume(used);
        if discarded > 0 {
            deadline = deadline.min(Instant::now() + stale_grace);
        }
        if discarded > MAX_DISCARD {
            return Ok(Hello::Missing { discarded });
        }
    }
}

/// Guest side, on a new session's input: drops the [`SESSION_RESET`]s a host wrote before it
/// read this session's hello (meant for the session before), and the end of one whose start
/// the session before read, and passes everything from the first other byte on. Holds back
/// at most a marker's length while it cannot tell yet. (A multiplexer frame starts with a
/// zero byte, which a marker has only first: the end of one is never mistaken for a frame.)
#[derive(Default)]
pub struct ResetFilter {
    /// Bytes read that may still turn out to be (part of) a reset.
    held: Vec<u8>,
    /// Something was dropped already: no partial marker can follow.
    dropped: bool,
    passing: bool,
}

/// What the bytes held so far are.
enum Held {
    /// A marker, or its end, of this many bytes: drop them.
    Marker(usize),
    /// Possibly one, once more bytes come.
    Undecided,
    /// Data: the session's own.
    Data,
}

impl ResetFilter {
    /// Whether the filter has stopped looking (everything now passes as it is read).
    pub fn passing(&self) -> bool {
        self.passing
    }

    /// Takes the bytes just read; returns those to pass on now (possibly none, while a
    /// marker may be starting).
    pub fn feed(&mut self, input: &[u8]) -> Vec<u8> {
        if self.passing {
            return input.to_vec();
        }
        self.held.extend_from_slice(input);
        loop {
            match self.classify() {
                Held::Marker(n) => {
                    self.held.drain(..n);
                    self.dropped = true;
                }
                Held::Undecided => return Vec::new(),
                Held::Data => {
                    self.passing = true;
                    return std::mem::take(&mut self.held);
                }
            }
        }
    }

    fn classify(&self) -> Held {
        let held = &self.held[..];
        if held.is_empty() {
            return Held::Undecided;
        }
        // Whole markers; at the very start also the end of one (from its second byte on).
        let first = if self.dropped {
            0
        } else {
            SESSION_RESET.len() - 1
        };
        let mut undecided = false;
        for start in 0..=first {
            let part = &SESSION_RESET[start..];
            if held.starts_with(part) {
                return Held::Marker(part.len());
            }
            undecided |= part.starts_with(held);
        }
        if undecided {
            Held::Undecided
        } else {
            Held::Data
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, BufReader};

    /// Reads a hello with the usual stale grace and ample patience.
    async fn read<R: AsyncBufRead + Unpin>(r: &mut R) -> Hello {
        read_hello(r, Duration::from_secs(5), STALE_GRACE)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn finds_the_hello_after_stale_bytes_and_leaves_the_rest() {
        let mut input = b"old session \0FERRY half\0\0\0FERRY-MUX-SESSION-x\n".to_vec();
        input.extend_from_slice(SESSION_HELLO);
        input.extend_from_slice(b"new session");
        let mut r = BufReader::with_capacity(4, &input[..]);
        let found = read(&mut r).await;
        assert_eq!(
            found,
            Hello::Found {
                discarded: 46,
                version: 2
            }
        );
        let mut rest = String::new();
        r.read_to_string(&mut rest).await.unwrap();
        assert_eq!(rest, "new session");
    }

    #[tokio::test]
    async fn an_old_session_that_goes_on_is_given_up_on_soon() {
        let (mut old, host) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut old, b"yamux frames")
            .await
            .unwrap();
        let mut r = BufReader::new(host);
        let t = Instant::now();
        let got = read_hello(&mut r, Duration::from_secs(30), STALE_GRACE)
            .await
            .unwrap();
        assert_eq!(got, Hello::Missing { discarded: 12 });
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "waited out the patience"
        );
    }

    #[tokio::test]
    async fn silence_and_end_are_reported() {
        let (_keep, quiet) = tokio::io::duplex(64);
        let mut r = BufReader::new(quiet);
        let got = read_hello(&mut r, Duration::from_millis(20), STALE_GRACE)
            .await
            .unwrap();
        assert_eq!(got, Hello::Missing { discarded: 0 });
        let mut r = BufReader::new(&b"abc"[..]);
        let got = read(&mut r).await;
        assert_eq!(got, Hello::Closed);
    }

    #[tokio::test]
    async fn the_guest_side_writes_what_the_host_side_reads() {
        let (mut guest, host) = tokio::io::duplex(64);
        send_hello(&mut guest).await.unwrap();
        let mut r = BufReader::new(host);
        let got = read(&mut r).await;
        assert_eq!(
            got,
            Hello::Found {
                discarded: 0,
                version: 2
            }
        );
    }

    #[tokio::test]
    async fn a_version_1_hello_is_still_read() {
        let input = b"\0FERRY-MUX-SESSION-1\nrest".to_vec();
        let mut r = BufReader::with_capacity(3, &input[..]);
        let got = read(&mut r).await;
        assert_eq!(
            got,
            Hello::Found {
                discarded: 0,
                version: 1
            }
        );
    }

    /// Feeds `input` in pieces of `step` bytes; returns what passed.
    fn filtered(input: &[u8], step: usize) -> Vec<u8> {
        let mut f = ResetFilter::default();
        input.chunks(step).flat_map(|c| f.feed(c)).collect()
    }

    #[test]
    fn resets_at_a_sessions_start_are_dropped_however_they_are_split() {
        let mut input = SESSION_RESET.repeat(2);
        // A multiplexer frame starts with a zero byte too: it must pass whole.
        input.extend_from_slice(&[0, 1, 0, 0, 7]);
        for step in 1..=input.len() {
            assert_eq!(filtered(&input, step), [0, 1, 0, 0, 7], "step {step}");
        }
    }

    #[test]
    fn the_end_of_a_reset_the_last_session_read_in_part_is_dropped() {
        for read in 1..SESSION_RESET.len() {
            let mut input = SESSION_RESET[read..].to_vec();
            input.extend_from_slice(SESSION_RESET);
            input.extend_from_slice(&[0, 1, 0, 0, 7]);
            for step in 1..=input.len() {
                assert_eq!(
                    filtered(&input, step),
                    [0, 1, 0, 0, 7],
                    "read {read} step {step}"
                );
            }
        }
    }

    #[test]
    fn a_reset_after_the_session_began_is_passed_on() {
        let mut input = vec![0, 2];
        input.extend_from_slice(SESSION_RESET);
        for step in 1..=input.len() {
            assert_eq!(filtered(&input, step), input, "step {step}");
        }
        // And data that merely starts like a marker.
        let input = b"\0FERRY-MUX-RESEX".to_vec();
        assert_eq!(filtered(&input, 4), input);
    }
}
