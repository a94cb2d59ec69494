//! The start of a multiplexer session over a byte stream that outlives sessions.
//!
//! A virtio-serial port stays open across host connections: a host that connects may find
//! the guest still running the session of the host before it (the guest learns that its host
//! left only from the port's end-of-file, which can come after the next host has connected,
//! as after a migration). So the guest writes [`SESSION_HELLO`] first in every session, and a
//! host starts its own side only after reading it: bytes before it belong to an older
//! session and are dropped (the resumable streams send them again). A host that hears no
//! hello in time cuts the connection, so that the guest sees the end of its old session.

use std::time::{Duration, Instant};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

/// NUL first: it never recurs inside the marker, so a simple scan finds it.
pub const SESSION_HELLO: &[u8] = b"\0FERRY-MUX-SESSION-1\n";

/// Stale bytes a host discards while looking for the hello before it gives up on this
/// connection anyway.
const MAX_DISCARD: usize = 64 << 20;

/// Guest side: announces a new session.
pub async fn send_hello<W: AsyncWrite + Unpin>(w: &mut W) -> std::io::Result<()> {
    w.write_all(SESSION_HELLO).await?;
    w.flush().await
}

/// What a host found on a new connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Hello {
    /// The hello: everything after it is the new session.
    Found { discarded: usize },
    /// None within the patience (an old session may still run, or the guest is not up).
    Missing { discarded: usize },
    /// The connection ended.
    Closed,
}

/// How long a hello may still follow bytes of an older session. Such bytes mean the guest
/// still runs it (a new session writes nothing before its hello, and what an old one had
/// queued arrives at once): better to cut soon than to wait out the patience.
pub const STALE_GRACE: Duration = Duration::from_millis(5);

/// Host side: reads up to and including the hello, discarding what comes before it, for at
/// most `patience` (at most [`STALE_GRACE`] once stale bytes have come). Reads only from
/// `r`'s buffer onwards, so the bytes after the hello stay in `r` for the session.
pub async fn read_hello<R: AsyncBufRead + Unpin>(
    r: &mut R,
    patience: Duration,
) -> std::io::Result<Hello> {
    let mut deadline = Instant::now() + patience;
    let (mut matched, mut discarded) = (0usize, 0usize);
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
            if b == SESSION_HELLO[matched] {
                matched += 1;
                if matched == SESSION_HELLO.len() {
                    r.consume(used);
                    return Ok(Hello::Found { discarded });
                }
            } else {
                discarded += matched + 1;
                matched = usize::from(b == SESSION_HELLO[0]);
                discarded -= matched;
            }
        }
        r.consume(used);
        if discarded > 0 {
            deadline = deadline.min(Instant::now() + STALE_GRACE);
        }
        if discarded > MAX_DISCARD {
            return Ok(Hello::Missing { discarded });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, BufReader};

    #[tokio::test]
    async fn finds_the_hello_after_stale_bytes_and_leaves_the_rest() {
        let mut input = b"old session \0FERRY half\0\0".to_vec();
        input.extend_from_slice(SESSION_HELLO);
        input.extend_from_slice(b"new session");
        let mut r = BufReader::with_capacity(4, &input[..]);
        let found = read_hello(&mut r, Duration::from_secs(5)).await.unwrap();
        assert_eq!(found, Hello::Found { discarded: 25 });
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
        let got = read_hello(&mut r, Duration::from_secs(30)).await.unwrap();
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
        let got = read_hello(&mut r, Duration::from_millis(20)).await.unwrap();
        assert_eq!(got, Hello::Missing { discarded: 0 });
        let mut r = BufReader::new(&b"abc"[..]);
        let got = read_hello(&mut r, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, Hello::Closed);
    }

    #[tokio::test]
    async fn the_guest_side_writes_what_the_host_side_reads() {
        let (mut guest, host) = tokio::io::duplex(64);
        send_hello(&mut guest).await.unwrap();
        let mut r = BufReader::new(host);
        let got = read_hello(&mut r, Duration::from_secs(5)).await.unwrap();
        assert_eq!(got, Hello::Found { discarded: 0 });
    }
}
