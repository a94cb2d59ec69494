//! The control protocol between the `ferry` CLI and a UVM's shim, over the shim's Unix
//! socket.
//!
//! A client sends one JSON line (a [`Request`]) and reads one JSON line (a [`Reply`]). For
//! requests that stream (a foreground run, exec, attach, logs, wait), both sides then switch to
//! small binary frames: `[tag: u8][len: u32 LE][payload]`, payloads at most [`MAX_PAYLOAD`].

use serde::{Deserialize, Serialize};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};

/// Largest request or reply line.
pub const MAX_LINE: usize = 1 << 20;
/// Largest frame payload.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// Where a container's root filesystem comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Rootfs {
    /// A directory on the host.
    Dir(String),
    /// A built-in image (`busybox`).
    Image(String),
}

/// What to run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub tty: bool,
    /// Give the process a stdin pipe.
    #[serde(default)]
    pub stdin: bool,
    /// Initial console size (rows, columns) for a terminal.
    #[serde(default)]
    pub console: Option<(u16, u16)>,
    /// Return once started instead of streaming.
    #[serde(default)]
    pub detach: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The UVM's properties and containers.
    Info,
    /// Stop the UVM and the shim.
    Stop,
    /// Write a snapshot and stop the shim, leaving the UVM running.
    Save { to: Option<String> },
    /// Create a container and start its init process.
    Run {
        id: Option<String>,
        rootfs: Rootfs,
        process: ProcessSpec,
    },
    /// Start another process in a running container.
    Exec {
        container: String,
        process: ProcessSpec,
    },
    /// Stream a process's output (and feed its stdin) from now on.
    Attach {
        container: String,
        pid: Option<u32>,
        /// Go on from these offsets instead of what comes next: a client whose shim was
        /// replaced mid-session resumes where it was.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<LogOffsets>,
    },
    /// Containers, or the processes of one container.
    Ps { container: Option<String> },
    Kill {
        container: String,
        pid: Option<u32>,
        signal: i32,
    },
    /// Block until the process exits; the reply carries the exit code.
    Wait { container: String, pid: Option<u32> },
    /// Output captured so far (and, with `follow`, until the process exits).
    Logs {
        container: String,
        pid: Option<u32>,
        follow: bool,
        /// Go on from these offsets instead of the beginning: a follower whose shim was
        /// replaced (`ferry uvm upgrade`, a restore) resumes where it was.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<LogOffsets>,
    },
    /// Delete an exited container (with `force`, kill it first).
    Rm { container: String, force: bool },
    /// Live-migrate the UVM to the ferry host at `to` (see [`crate::shim::migrate`]). The
    /// reply is a stream of JSON lines: events, then a final [`Reply`].
    Migrate {
        to: String,
        /// Protobuf-encoded `InitializeOptions` (empty: defaults).
        #[serde(default)]
        options: Vec<u8>,
        #[serde(default)]
        dry_run: bool,
    },
    /// Run the guest here again after a migration whose destination was lost once the state
    /// had been sent (the operator has checked that the destination does not run it).
    ResumeSource,
    /// Copy a container's root filesystem into a QEMU guest (see `shim::rootfs`): the reply
    /// names the directory; the tar follows as input frames.
    ImportRootfs { container: String },
    /// (shim to shim) Receive a migrating UVM: sent by the source's shim to a destination
    /// shim started with `ferry uvm receive`.
    Incoming(crate::shim::migrate::IncomingSpec),
}

impl Request {
    /// Whether frames follow a successful reply.
    pub fn streams(&self) -> bool {
        match self {
            Request::Run { process, .. } | Request::Exec { process, .. } => !process.detach,
            Request::Attach { .. } | Request::Logs { .. } | Request::ImportRootfs { .. } => true,
            _ => false,
        }
    }
}

/// Positions in a process's output streams: bytes since the process started, dropped ones
/// included.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LogOffsets {
    pub stdout: u64,
    pub stderr: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Reply {
    pub fn ok(data: serde_json::Value) -> Reply {
        Reply {
            ok: true,
            error: None,
            data,
        }
    }

    pub fn error(message: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(message.into()),
            data: serde_json::Value::Null,
        }
    }
}

/// In the refusal a host process gives while it hands its UVM to another (a client may try
/// again and reach the new one).
pub const HANDING_OVER: &str = "is stopping or being handed to another host process";

/// Frame tags. Shim → client: output, exit, error. Client → shim: input, resize, signal.
pub mod tag {
    pub const STDOUT: u8 = 1;
    pub const STDERR: u8 = 2;
    /// Payload: the exit code, i32 LE. The last frame of a stream.
    pub const EXIT: u8 = 3;
    /// Payload: UTF-8 text. The last frame of a stream.
    pub const ERROR: u8 = 4;
    /// Payload: u64 LE, bytes of output skipped because the log limit dropped them, then the
    /// tag of the stream they were skipped in (one byte; older shims sent only the count).
    pub const DROPPED: u8 = 5;
    pub const STDIN: u8 = 16;
    pub const STDIN_EOF: u8 = 17;
    /// Payload: rows u16 LE, columns u16 LE.
    pub const RESIZE: u8 = 18;
    /// Payload: signal number, i32 LE.
    pub const SIGNAL: u8 = 19;
}

pub async fn write_line<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

/// Reads one JSON line, bounded by [`MAX_LINE`].
pub async fn read_line<R: AsyncBufRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut R,
) -> std::io::Result<T> {
    let mut buf = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    if buf.last() != Some(&b'\n') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("control message longer than {MAX_LINE} bytes or truncated"),
        ));
    }
    serde_json::from_slice(&buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A frame's header.
pub fn frame_head(tag: u8, len: usize) -> [u8; 5] {
    debug_assert!(len <= MAX_PAYLOAD);
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&(len as u32).to_le_bytes());
    head
}

/// Writes all of `bufs` (several frames, say) with as few system calls as the writer allows.
pub async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut bufs: &mut [std::io::IoSlice<'_>],
) -> std::io::Result<()> {
    std::io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = if w.is_write_vectored() {
            w.write_vectored(bufs).await?
        } else {
            w.write(&bufs[0]).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        std::io::IoSlice::advance_slices(&mut bufs, n);
    }
    Ok(())
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    tag: u8,
    payload: &[u8],
) -> std::io::Result<()> {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    let mut head = [0u8; 5];
    head[0] = tag;
    head[1..].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    // Header and payload in one system call (a stream relays one frame per chunk of output).
    let bufs = [std::io::IoSlice::new(&head), std::io::IoSlice::new(payload)];
    let n = w.write_vectored(&bufs).await?;
    if n < head.len() {
        w.write_all(&head[n..]).await?;
        w.write_all(payload).await
    } else {
        w.write_all(&payload[n - head.len()..]).await
    }
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(u8, Vec<u8>)>> {
    let mut payload = Vec::new();
    Ok(read_frame_into(r, &mut payload)
        .await?
        .map(|t| (t, payload)))
}

/// Reads one frame's payload into `payload` (reused across calls); returns its tag, or
/// `Ok(None)` at a clean end of stream.
pub async fn read_frame_into<R: AsyncRead + Unpin>(
    r: &mut R,
    payload: &mut Vec<u8>,
) -> std::io::Result<Option<u8>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("control frame of {len} bytes exceeds {MAX_PAYLOAD}"),
        ));
    }
    payload.resize(len, 0);
    r.read_exact(payload).await?;
    Ok(Some(head[0]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_and_frames_round_trip_and_are_bounded() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut b = tokio::io::BufReader::new(b);
        let req = Request::Kill {
            container: "web".into(),
            pid: Some(7),
            signal: 15,
        };
        write_line(&mut a, &req).await.unwrap();
        write_frame(&mut a, tag::STDOUT, b"hello").await.unwrap();
        let back: Request = read_line(&mut b).await.unwrap();
        assert!(matches!(
            back,
            Request::Kill {
                pid: Some(7),
                signal: 15,
                ..
            }
        ));
        assert_eq!(
            read_frame(&mut b).await.unwrap(),
            Some((tag::STDOUT, b"hello".to_vec()))
        );
        // An oversized frame header is refused before allocating.
        a.write_all(&[tag::STDIN, 0xff, 0xff, 0xff, 0x7f])
            .await
            .unwrap();
        assert!(read_frame(&mut b).await.is_err());
        drop(a);
        assert_eq!(read_frame(&mut b).await.unwrap(), None);
    }
}
