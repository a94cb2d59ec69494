//! The saved state of a shim: everything a new host process needs to take over a running UVM
//! (the save/restore of hcsshim's live-migration work, and ferry's host restart).
//!
//! JSON, because it is small, diffable, and read by people at 3 a.m.; behind a one-line header
//! that carries the format version, the body's length and its CRC-32, so that a truncated,
//! corrupt or newer file is refused with a clear error instead of being half-understood:
//!
//! ```text
//! FERRY-SNAPSHOT <version> <length> <crc32 hex>\n<JSON body>
//! ```
//!
//! Written atomically: a temporary file in the same directory, fsync, rename, fsync of the
//! directory. A reader sees the old snapshot or the new one, never a mix.

use host::{ConnectionState, MigrationState};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const VERSION: u32 = 1;
const MAGIC: &str = "FERRY-SNAPSHOT";
/// Refuse anything larger: a snapshot of thousands of processes is a few MiB.
const MAX_BODY: usize = 64 << 20;

/// How to reach the UVM again: its directory and the process to re-attach to (the local
/// backend's agent, or QEMU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UvmState {
    pub name: String,
    pub backend: String,
    pub state_dir: PathBuf,
    /// The agent's pid (local) or QEMU's (qemu).
    pub agent_pid: u32,
    /// The QEMU UVM's configuration (absent for the local backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qemu: Option<QemuState>,
    /// Bytes of each process's stdout/stderr kept on disk (absent in older snapshots).
    #[serde(default = "default_log_limit")]
    pub log_limit: u64,
}

/// What a new host process needs to know of a QEMU UVM (its sockets are in `state_dir`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QemuState {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: String,
    pub port_name: String,
    pub qemu: PathBuf,
    /// The version of the guest's last session hello (0 in older snapshots: unknown), so that
    /// the next host knows whether it may reset the guest's old session
    /// (`transport::session_hello`).
    #[serde(default)]
    pub session_hello: u8,
}

fn default_log_limit() -> u64 {
    crate::shim::output::DEFAULT_LOG_LIMIT
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessState {
    pub pid: u32,
    pub args: Vec<String>,
    pub tty: bool,
    pub init: bool,
    pub migration: MigrationState,
    /// Bytes of stdout/stderr the host holds (None: no pipe).
    pub stdout_offset: Option<u64>,
    pub stderr_offset: Option<u64>,
    /// Where a resumable stdin stood (absent in older snapshots and for raw pipes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<host::stdio::StdinState>,
    /// The exit code, if the process had exited when saved.
    pub exit_code: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerState {
    pub id: String,
    pub rootfs: PathBuf,
    pub created: u64,
    pub processes: Vec<ProcessState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub uvm: UvmState,
    pub connection: ConnectionState,
    pub containers: Vec<ContainerState>,
    /// Seconds since the epoch, and the shim that wrote it.
    pub saved_at: u64,
    pub saved_by_pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a ferry snapshot")]
    NotASnapshot(PathBuf),
    #[error(
        "{path}: snapshot format version {found} is not supported (this ferry reads version {VERSION})"
    )]
    UnsupportedVersion { path: PathBuf, found: String },
    #[error("{path}: truncated: the header promises {expected} bytes, the file holds {found}")]
    Truncated {
        path: PathBuf,
        expected: usize,
        found: usize,
    },
    #[error("{path}: corrupt: checksum {found:08x} does not match the header's {expected:08x}")]
    Corrupt {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{path}: unreadable snapshot body: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `snap` to `path` atomically and durably.
pub fn write(path: &Path, snap: &Snapshot) -> Result<(), SnapshotError> {
    write_with(path, snap, true)
}

/// Writes `snap` to `path` atomically; `durable` also waits for the disk. Without it, a
/// crash of the host process still leaves the old snapshot or the new one, but a crash of
/// the machine may leave neither: fine where the UVM would not survive that crash either
/// (a migration's destination, where every millisecond is the guest's blackout).
pub fn write_with(path: &Path, snap: &Snapshot, durable: bool) -> Result<(), SnapshotError> {
    let bytes = encode_at(path, snap)?;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("snapshot");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        if durable {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durable {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

/// The path that errors of [`encode`] and [`decode`] name: they handle bytes, not a file.
const NO_FILE: &str = "-";

/// A snapshot file's bytes: the header line, then the JSON body. Errors name the path `-`.
pub fn encode(snap: &Snapshot) -> Result<Vec<u8>, SnapshotError> {
    encode_at(Path::new(NO_FILE), snap)
}

/// [`encode`], with errors naming `path`.
fn encode_at(path: &Path, snap: &Snapshot) -> Result<Vec<u8>, SnapshotError> {
    let body = serde_json::to_vec_pretty(snap).map_err(|e| SnapshotError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let header = format!(
        "{MAGIC} {VERSION} {} {:08x}\n",
        body.len(),
        crc32fast::hash(&body)
    );
    let mut bytes = Vec::with_capacity(header.len() + body.len());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// Reads and checks a snapshot.
pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    // Checked before reading too, so that a huge file is not read into memory at all.
    if meta.len() > MAX_FILE as u64 {
        return Err(too_large(path, meta.len()));
    }
    let data = std::fs::read(path).map_err(io_err(path))?;
    decode_at(path, &data)
}

/// The largest snapshot file: the body's limit and a header line.
const MAX_FILE: usize = MAX_BODY + MAX_HEADER;
/// The header line's longest (newline included): anything longer is not a snapshot.
const MAX_HEADER: usize = 128;

fn too_large(path: &Path, len: u64) -> SnapshotError {
    SnapshotError::Invalid {
        path: path.to_path_buf(),
        reason: format!("{len} bytes is larger than any snapshot ferry writes"),
    }
}

/// Checks and decodes a snapshot file's bytes (what [`read`] does once it has them). Errors
/// name the path `-`. Allocates nothing sized by the header: the length it claims is only
/// compared with the bytes there are.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    decode_at(Path::new(NO_FILE), bytes)
}

/// [`decode`], with errors naming `path`.
fn decode_at(path: &Path, data: &[u8]) -> Result<Snapshot, SnapshotError> {
    if data.len() > MAX_FILE {
        return Err(too_large(path, data.len() as u64));
    }
    let nl = data
        .iter()
        .take(MAX_HEADER)
        .position(|&b| b == b'\n')
        .ok_or_else(|| SnapshotError::NotASnapshot(path.to_path_buf()))?;
    let header = std::str::from_utf8(&data[..nl])
        .map_err(|_| SnapshotError::NotASnapshot(path.to_path_buf()))?;
    let fields: Vec<&str> = header.split(' ').collect();
    let [magic, version, len, crc] = fields[..] else {
        return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
    };
    if magic != MAGIC {
        return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
    }
    if version != VERSION.to_string() {
        return Err(SnapshotError::UnsupportedVersion {
            path: path.to_path_buf(),
            found: version.chars().take(16).collect(),
        });
    }
    let (Ok(len), Ok(crc)) = (len.parse::<usize>(), u32::from_str_radix(crc, 16)) else {
        return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
    };
    let body = &data[nl + 1..];
    if body.len() != len {
        return Err(SnapshotError::Truncated {
            path: path.to_path_buf(),
            expected: len,
            found: body.len(),
        });
    }
    let found = crc32fast::hash(body);
    if found != crc {
        return Err(SnapshotError::Corrupt {
            path: path.to_path_buf(),
            expected: crc,
            found,
        });
    }
    serde_json::from_slice(body).map_err(|e| SnapshotError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        Snapshot {
            uvm: UvmState {
                name: "u".into(),
                backend: "local".into(),
                state_dir: "/run/ferry/uvms/u".into(),
                agent_pid: 42,
                qemu: None,
                log_limit: 1 << 20,
            },
            connection: ConnectionState {
                next_id: 1234,
                next_port: 0x4000_0010,
            },
            containers: vec![ContainerState {
                id: "web".into(),
                rootfs: "/r".into(),
                created: 1,
                processes: vec![ProcessState {
                    pid: 7,
                    args: vec!["sh".into()],
                    tty: false,
                    init: true,
                    migration: MigrationState {
                        stdin_port: 0,
                        stdout_port: 0x4000_0001,
                        stderr_port: 0x4000_0002,
                        wait_call_id: 17,
                    },
                    stdout_offset: Some(100),
                    stdin: Some(host::stdio::StdinState {
                        acked: 7,
                        pending: b"not yet seen".to_vec(),
                        closed: true,
                    }),
                    stderr_offset: Some(0),
                    exit_code: None,
                }],
            }],
            saved_at: 2,
            saved_by_pid: 3,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-snap-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d.join("snap")
    }

    #[test]
    fn round_trip_and_every_kind_of_damage_is_refused() {
        let p = tmp("rt");
        write(&p, &sample()).unwrap();
        assert_eq!(read(&p).unwrap(), sample());
        let good = std::fs::read(&p).unwrap();

        // One flipped byte in the body.
        let mut bad = good.clone();
        let last = bad.len() - 3;
        bad[last] ^= 0x20;
        std::fs::write(&p, &bad).unwrap();
        assert!(matches!(read(&p), Err(SnapshotError::Corrupt { .. })));

        // Truncated.
        std::fs::write(&p, &good[..good.len() - 10]).unwrap();
        assert!(matches!(read(&p), Err(SnapshotError::Truncated { .. })));

        // A newer format.
        let text = String::from_utf8(good.clone()).unwrap().replacen(
            "FERRY-SNAPSHOT 1 ",
            "FERRY-SNAPSHOT 2 ",
            1,
        );
        std::fs::write(&p, text).unwrap();
        let e = read(&p).unwrap_err();
        assert!(matches!(e, SnapshotError::UnsupportedVersion { .. }));
        assert!(e.to_string().contains("version 2"), "{e}");

        // Not a snapshot at all, and a missing file.
        std::fs::write(&p, b"{\"hello\": 1}\n").unwrap();
        assert!(matches!(read(&p), Err(SnapshotError::NotASnapshot(_))));
        std::fs::write(&p, vec![b'x'; 4096]).unwrap();
        assert!(matches!(read(&p), Err(SnapshotError::NotASnapshot(_))));
        std::fs::remove_file(&p).unwrap();
        assert!(matches!(read(&p), Err(SnapshotError::Io { .. })));
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn bytes_decode_as_the_file_reads() {
        let p = tmp("bytes");
        write(&p, &sample()).unwrap();
        let file = std::fs::read(&p).unwrap();
        assert_eq!(encode(&sample()).unwrap(), file);
        assert_eq!(decode(&file).unwrap(), sample());
        // Errors without a file name the path `-`.
        let e = decode(&file[..file.len() - 1]).unwrap_err();
        assert!(matches!(e, SnapshotError::Truncated { .. }));
        assert!(e.to_string().starts_with("-: truncated"), "{e}");
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }

    #[test]
    fn writing_replaces_atomically_and_leaves_no_temporary() {
        let p = tmp("atomic");
        write(&p, &sample()).unwrap();
        let mut s2 = sample();
        s2.connection.next_id = 99_999;
        write(&p, &s2).unwrap();
        assert_eq!(read(&p).unwrap().connection.next_id, 99_999);
        let leftovers: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
}
