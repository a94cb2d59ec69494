//! A writer for the "newc" cpio format, the one the Linux kernel unpacks as an initramfs.
//!
//! Each entry is a 110-byte ASCII header (magic `070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name padded to 4 bytes, then the data padded to 4 bytes; a `TRAILER!!!`
//! entry ends the archive. Reproducible by construction: entries are written sorted by path
//! (parents before children), with inode numbers in that order, owner root, and one fixed
//! mtime, so the same entries always give the same bytes.

use std::collections::BTreeMap;
use std::io::{self, Write};

const MAGIC: &[u8] = b"070701";
const TRAILER: &str = "TRAILER!!!";
/// Every entry's mtime (the epoch): the build time must not leak into the bytes.
pub const MTIME: u32 = 0;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    #[error("bad archive path {0:?}: must be relative, without empty, '.' or '..' components")]
    BadPath(String),
    #[error("{0:?} is already in the archive")]
    Duplicate(String),
    #[error("{0:?} is in the archive as a non-directory, so it cannot hold {1:?}")]
    NotADirectory(String, String),
    #[error("{0:?} is too large for a cpio entry ({1} bytes; the limit is 4 GiB)")]
    TooLarge(String, usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    perm: u32,
    kind: Kind,
}

/// The archive's entries, kept sorted by path.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, Entry>,
}

/// Checks a path and returns it without a leading `/` (the kernel takes names relative to /).
fn normalize(path: &str) -> Result<String, CpioError> {
    let p = path.strip_prefix('/').unwrap_or(path);
    let bad = p.is_empty()
        || p.contains('\0')
        || p.split('/').any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(CpioError::BadPath(path.to_owned()));
    }
    Ok(p.to_owned())
}

impl Archive {
    pub fn new() -> Archive {
        Archive::default()
    }

    /// A directory. Adding one that exists (as a directory) just sets its permissions.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), CpioError> {
        let p = normalize(path)?;
        self.parents(&p)?;
        match self.entries.get_mut(&p) {
            Some(Entry {
                kind: Kind::Dir,
                perm: old,
            }) => {
                *old = perm & 0o7777;
                Ok(())
            }
            Some(_) => Err(CpioError::Duplicate(p)),
            None => {
                self.entries.insert(
                    p,
                    Entry {
                        perm: perm & 0o7777,
                        kind: Kind::Dir,
                    },
                );
                Ok(())
            }
        }
    }

    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<(), CpioError> {
        if u32::try_from(data.len()).is_err() {
            return Err(CpioError::TooLarge(path.to_owned(), data.len()));
        }
        self.add(path, perm, Kind::File(data))
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), CpioError> {
        if target.is_empty() || target.contains('\0') {
            return Err(CpioError::BadPath(target.to_owned()));
        }
        self.add(path, 0o777, Kind::Symlink(target.to_owned()))
    }

    pub fn char_device(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        self.add(path, perm, Kind::CharDevice { major, minor })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn add(&mut self, path: &str, perm: u32, kind: Kind) -> Result<(), CpioError> {
        let p = normalize(path)?;
        self.parents(&p)?;
        if self.entries.contains_key(&p) {
            return Err(CpioError::Duplicate(p));
        }
        self.entries.insert(
            p,
            Entry {
                perm: perm & 0o7777,
                kind,
            },
        );
        Ok(())
    }

    /// Creates missing parent directories (0755) of a normalized path.
    fn parents(&mut self, p: &str) -> Result<(), CpioError> {
        let mut end = 0;
        while let Some(i) = p[end..].find('/') {
            let parent = &p[..end + i];
            match self.entries.get(parent) {
                Some(Entry {
                    kind: Kind::Dir, ..
                }) => {}
                Some(_) => return Err(CpioError::NotADirectory(parent.into(), p.into())),
                None => {
                    self.entries.insert(
                        parent.to_owned(),
                        Entry {
                            perm: 0o755,
                            kind: Kind::Dir,
                        },
                    );
                }
            }
            end += i + 1;
        }
        Ok(())
    }

    /// Writes the archive; returns the bytes written.
    pub fn write_to<W: Write>(&self, w: &mut W) -> io::Result<u64> {
        let mut out = Counter { w, n: 0 };
        // Sorted by path, so a parent (a prefix) always comes before its children.
        for (i, (name, e)) in self.entries.iter().enumerate() {
            let (mode, nlink, data, (rmaj, rmin)): (u32, u32, &[u8], (u32, u32)) = match &e.kind {
                Kind::Dir => (S_IFDIR, 2, &[], (0, 0)),
                Kind::File(d) => (S_IFREG, 1, d, (0, 0)),
                Kind::Symlink(t) => (S_IFLNK, 1, t.as_bytes(), (0, 0)),
                Kind::CharDevice { major, minor } => (S_IFCHR, 1, &[], (*major, *minor)),
            };
            let header = Header {
                ino: (i + 1) as u32,
                mode: mode | e.perm,
                nlink,
                filesize: data.len() as u32,
                rdevmajor: rmaj,
                rdevminor: rmin,
            };
            header.write(&mut out, name)?;
            out.write_all(data)?;
            out.pad()?;
        }
        Header {
            ino: 0,
            mode: 0,
            nlink: 1,
            filesize: 0,
            rdevmajor: 0,
            rdevminor: 0,
        }
        .write(&mut out, TRAILER)?;
        Ok(out.n)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = self.write_to(&mut v);
        v
    }
}

struct Header {
    ino: u32,
    mode: u32,
    nlink: u32,
    filesize: u32,
    rdevmajor: u32,
    rdevminor: u32,
}

impl Header {
    fn write<W: Write>(&self, out: &mut Counter<W>, name: &str) -> io::Result<()> {
        let namesize = name.len() as u32 + 1;
        let fields = [
            self.ino,
            self.mode,
            0, // uid
            0, // gid
            self.nlink,
            MTIME,
            self.filesize,
            0, // devmajor
            0, // devminor
            self.rdevmajor,
            self.rdevminor,
            namesize,
            0, // check (only for the "crc" variant)
        ];
        let mut h = Vec::with_capacity(110 + name.len() + 4);
        h.extend_from_slice(MAGIC);
        for f in fields {
            h.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        h.extend_from_slice(name.as_bytes());
        h.push(0);
        out.write_all(&h)?;
        out.pad()
    }
}

/// Counts what goes through, for the 4-byte alignment.
struct Counter<'a, W> {
    w: &'a mut W,
    n: u64,
}

impl<W: Write> Counter<'_, W> {
    fn write_all(&mut self, b: &[u8]) -> io::Result<()> {
        self.w.write_all(b)?;
        self.n += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.n % 4) as usize) % 4;
        self.write_all(&[0u8; 3][..pad])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, mode, data, rdev)
    type Parsed = (String, u32, Vec<u8>, (u32, u32));

    /// A minimal newc reader for the tests.
    fn parse(mut b: &[u8]) -> Vec<Parsed> {
        let mut out = Vec::new();
        let mut pos = 0usize;
        loop {
            assert_eq!(&b[..6], MAGIC, "magic at offset {pos}");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            assert_eq!((field(2), field(3), field(5)), (0, 0, MTIME));
            let name_end = 110 + namesize as usize;
            let name = String::from_utf8(b[110..name_end - 1].to_vec()).unwrap();
            let data_start = name_end.next_multiple_of(4);
            let data = b[data_start..data_start + size as usize].to_vec();
            let next = (data_start + size as usize).next_multiple_of(4);
            pos += next;
            b = &b[next..];
            if name == TRAILER {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, data, (rmaj, rmin)));
        }
    }

    fn sample(reverse: bool) -> Archive {
        let mut a = Archive::new();
        type Op = Box<dyn Fn(&mut Archive)>;
        let mut ops: Vec<Op> = vec![
            Box::new(|a| a.file("/init", 0o755, b"#!init".to_vec()).unwrap()),
            Box::new(|a| a.file("bin/busybox", 0o755, vec![7; 1001]).unwrap()),
            Box::new(|a| a.symlink("bin/sh", "busybox").unwrap()),
            Box::new(|a| a.char_device("dev/console", 0o600, 5, 1).unwrap()),
            Box::new(|a| a.dir("tmp", 0o1777).unwrap()),
            Box::new(|a| {
                a.file("lib/modules/ferry/order", 0o644, b"a.ko\n".to_vec())
                    .unwrap()
            }),
        ];
        if reverse {
            ops.reverse();
        }
        for op in ops {
            op(&mut a);
        }
        a
    }

    #[test]
    fn same_entries_same_bytes() {
        let a = sample(false).to_bytes();
        let b = sample(true).to_bytes();
        assert_eq!(a, b);
        assert_eq!(a.len() % 4, 0);
    }

    #[test]
    fn entries_round_trip_sorted_with_parents() {
        let entries = parse(&sample(false).to_bytes());
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/busybox",
                "bin/sh",
                "dev",
                "dev/console",
                "init",
                "lib",
                "lib/modules",
                "lib/modules/ferry",
                "lib/modules/ferry/order",
                "tmp"
            ]
        );
        let get = |n: &str| entries.iter().find(|e| e.0 == n).unwrap();
        assert_eq!(get("bin").1, S_IFDIR | 0o755);
        assert_eq!(get("tmp").1, S_IFDIR | 0o1777);
        assert_eq!(get("bin/busybox").2, vec![7; 1001]);
        assert_eq!(get("bin/sh").1, S_IFLNK | 0o777);
        assert_eq!(get("bin/sh").2, b"busybox");
        assert_eq!(get("dev/console").1, S_IFCHR | 0o600);
        assert_eq!(get("dev/console").3, (5, 1));
    }

    #[test]
    fn bad_input_is_refused() {
        let mut a = Archive::new();
        for p in ["", "/", "a//b", "../x", "a/./b", "a/..", "a\0b"] {
            assert!(
                matches!(a.file(p, 0o644, vec![]), Err(CpioError::BadPath(_))),
                "{p:?}"
            );
        }
        a.file("x", 0o644, vec![]).unwrap();
        assert_eq!(
            a.file("/x", 0o644, vec![]),
            Err(CpioError::Duplicate("x".into()))
        );
        assert!(matches!(
            a.file("x/y", 0o644, vec![]),
            Err(CpioError::NotADirectory(..))
        ));
        assert!(matches!(a.symlink("l", ""), Err(CpioError::BadPath(_))));
    }

    /// GNU cpio, when installed, reads the archive back: names, a symlink, a file's bytes.
    #[test]
    fn gnu_cpio_reads_it() {
        let Ok(out) = std::process::Command::new("cpio").arg("--version").output() else {
            eprintln!("skipped: gnu_cpio_reads_it needs the cpio tool (apt-get install cpio)");
            return;
        };
        assert!(out.status.success());
        let dir = std::env::temp_dir().join(format!("ferry-cpio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = sample(false);
        // cpio cannot make device nodes without root; keep the extraction part portable.
        a.entries.remove("dev/console");
        let bytes = a.to_bytes();
        let run = |args: &[&str]| {
            use std::io::Write;
            let mut child = std::process::Command::new("cpio")
                .args(args)
                .current_dir(&dir)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            child.stdin.take().unwrap().write_all(&bytes).unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(out.status.success(), "cpio {args:?}: {out:?}");
            String::from_utf8(out.stdout).unwrap()
        };
        let listed = run(&["-t", "--quiet"]);
        let names: Vec<&str> = listed.lines().collect();
        assert_eq!(names.len(), a.len());
        assert!(names.contains(&"bin/sh") && names.contains(&"lib/modules/ferry/order"));
        run(&["-i", "-d", "--quiet", "--no-preserve-owner"]);
        assert_eq!(
            std::fs::read_link(dir.join("bin/sh")).unwrap(),
            std::path::Path::new("busybox")
        );
        assert_eq!(
            std::fs::read(dir.join("bin/busybox")).unwrap(),
            vec![7; 1001]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
