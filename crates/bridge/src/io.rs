//! Reading and writing frames on an async byte stream.
//!
//! The reader never allocates more than the frame limit, whatever a header claims: an oversized
//! body is skipped through a small fixed buffer so the stream stays usable.

use crate::frame::{Frame, FrameError, HEADER_SIZE, Header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The peer closed the stream cleanly between frames.
    #[error("connection closed by peer")]
    Closed,
    /// The stream ended inside a frame.
    #[error("connection closed in the middle of a frame ({got} of {expected} bytes read)")]
    Truncated { expected: usize, got: usize },
    #[error("I/O error reading a frame: {0}")]
    Io(#[from] std::io::Error),
    /// The frame itself is bad; see [`FrameError::is_stream_fatal`] for whether reading may go on.
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Reads until `buf` is full; returns how many bytes were read before end-of-stream.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Reads one frame. Not cancellation-safe: run it in a dedicated reader task, not in `select!`.
/// An oversized frame or one of an unknown type is skipped (its body read into a small
/// scratch buffer) before its error is returned, so a reader that answers the error can go on.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame_size: u32,
) -> Result<Frame, ReadError> {
    read(r, max_frame_size, true).await
}

/// Like [`read_frame`], but every bad header is reported as soon as it is read, without
/// reading the body it announces: for a reader that gives up on the stream at the first bad
/// frame anyway (the host), so that a peer claiming a 4 GiB body and then going quiet, or
/// trickling it, cannot keep it busy.
pub async fn read_frame_strict<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame_size: u32,
) -> Result<Frame, ReadError> {
    read(r, max_frame_size, false).await
}

async fn read<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame_size: u32,
    skip_bad_bodies: bool,
) -> Result<Frame, ReadError> {
    let mut head = [0u8; HEADER_SIZE];
    let got = read_full(r, &mut head).await?;
    if got == 0 {
        return Err(ReadError::Closed);
    }
    if got < HEADER_SIZE {
        return Err(ReadError::Truncated {
            expected: HEADER_SIZE,
            got,
        });
    }
    let header = Header::decode(&head);
    let ident = match header.validate(max_frame_size) {
        Ok(ident) => ident,
        Err(e @ FrameError::TooSmall { .. }) => return Err(e.into()),
        Err(e) if !skip_bad_bodies => return Err(e.into()),
        Err(e) => {
            // Too large or unknown type: the size is still trustworthy, so skip the body and
            // report the error; the caller may answer it and keep reading.
            skip(r, header.body_len()).await?;
            return Err(e.into());
        }
    };
    let mut body = vec![0u8; header.body_len()];
    let got = read_full(r, &mut body).await?;
    if got < body.len() {
        return Err(ReadError::Truncated {
            expected: header.size as usize,
            got: HEADER_SIZE + got,
        });
    }
    Ok(Frame {
        ident,
        id: header.id,
        body,
    })
}

async fn skip<R: AsyncRead + Unpin>(r: &mut R, mut len: usize) -> Result<(), ReadError> {
    let total = len;
    let mut scratch = [0u8; 4096];
    while len > 0 {
        let want = len.min(scratch.len());
        let n = r.read(&mut scratch[..want]).await?;
        if n == 0 {
            return Err(ReadError::Truncated {
                expected: total,
                got: total - len,
            });
        }
        len -= n;
    }
    Ok(())
}

/// Encodes and writes one frame (refusing to exceed the limit), then flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
    max_frame_size: u32,
) -> Result<(), WriteError> {
    let bytes = frame.encode(max_frame_size)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("I/O error writing a frame: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::{Identifier, Rpc};

    fn frame_bytes(raw_type: u32, id: u64, body: &[u8]) -> Vec<u8> {
        let mut v = Header {
            raw_type,
            size: (HEADER_SIZE + body.len()) as u32,
            id,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(body);
        v
    }

    #[tokio::test]
    async fn reads_frames_and_skips_oversized_ones() {
        let mut input = frame_bytes(0x10100601, 1, &[b'x'; 5000]);
        input.extend(frame_bytes(0x10109901, 2, b"{}"));
        input.extend(frame_bytes(0x10100601, 3, br#"{"ProcessId":7}"#));
        let mut r = &input[..];
        let e = read_frame(&mut r, 1024).await.unwrap_err();
        assert!(matches!(
            e,
            ReadError::Frame(FrameError::TooLarge { id: 1, .. })
        ));
        let e = read_frame(&mut r, 1024).await.unwrap_err();
        assert!(matches!(
            e,
            ReadError::Frame(FrameError::UnknownType { id: 2, .. })
        ));
        let f = read_frame(&mut r, 1024).await.unwrap();
        assert_eq!(f.ident, Identifier::Request(Rpc::WaitForProcess));
        assert_eq!(f.id, 3);
        assert!(matches!(
            read_frame(&mut r, 1024).await,
            Err(ReadError::Closed)
        ));
    }

    #[tokio::test]
    async fn the_strict_reader_stops_at_a_bad_header() {
        // A header claiming 1 GiB, then nothing: the strict reader does not wait for the body.
        let mut input = Header {
            raw_type: 0x30100101,
            size: 1 << 30,
            id: 0,
        }
        .encode()
        .to_vec();
        input.extend_from_slice(b"{\"partial");
        let (mut guest, mut host) = tokio::io::duplex(1024);
        tokio::io::AsyncWriteExt::write_all(&mut guest, &input)
            .await
            .unwrap();
        let e = read_frame_strict(&mut host, 1024).await.unwrap_err();
        assert!(matches!(
            e,
            ReadError::Frame(FrameError::TooLarge {
                size: 1073741824,
                ..
            })
        ));
        let mut unknown = &frame_bytes(0x10109901, 2, b"{}")[..];
        assert!(matches!(
            read_frame_strict(&mut unknown, 1024).await,
            Err(ReadError::Frame(FrameError::UnknownType { id: 2, .. }))
        ));
        drop(guest);
    }

    #[tokio::test]
    async fn truncation_and_tiny_sizes() {
        let full = frame_bytes(0x10100601, 1, b"{}");
        let mut r = &full[..10];
        assert!(matches!(
            read_frame(&mut r, 1024).await,
            Err(ReadError::Truncated {
                expected: 16,
                got: 10
            })
        ));
        let mut r = &full[..17];
        assert!(matches!(
            read_frame(&mut r, 1024).await,
            Err(ReadError::Truncated { .. })
        ));
        let tiny = Header {
            raw_type: 0x10100601,
            size: 4,
            id: 9,
        }
        .encode();
        let mut r = &tiny[..];
        match read_frame(&mut r, 1024).await {
            Err(ReadError::Frame(e)) => assert!(e.is_stream_fatal()),
            other => panic!("unexpected {other:?}"),
        }
        // A header claiming 4 GiB is refused without allocating it.
        let huge = Header {
            raw_type: 0x10100601,
            size: u32::MAX,
            id: 9,
        }
        .encode();
        let mut r = &huge[..];
        assert!(matches!(
            read_frame(&mut r, 1024).await,
            Err(ReadError::Truncated { .. })
        ));
    }
}
