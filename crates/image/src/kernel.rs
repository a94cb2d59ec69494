//! Getting the uncompressed ELF `vmlinux` out of a bzImage.
//!
//! Under TCG, a bzImage spends ~6 s of a ~10 s boot decompressing itself in emulation; QEMU
//! boots the ELF inside directly through its PVH note (notes/qemu-lab.md). The x86 boot
//! protocol (2.08+) says where that ELF sits, compressed: `payload_offset` and
//! `payload_length` in the setup header, counted from the protected-mode code, which starts
//! after `setup_sects + 1` sectors. The kernel build appends the uncompressed size (4 bytes,
//! little-endian) to the compressed stream; it is checked against the result.
//!
//! Decompression runs the system's `xz` / `zstd` tools rather than a crate: no new compiled
//! dependency (build time on 2 cores is precious), liblzma's speed (a pure-Rust xz decoder is
//! several times slower on a 60+ MiB kernel), and the tools ship with every Debian that has
//! apt (xz-utils, zstd). Debian's kernels use xz (CONFIG_KERNEL_XZ); zstd is what others pick.

use crate::elf;
use std::io::{Read, Write};
use std::process::{Command, Stdio};

/// Bounds the decompressed kernel (Debian's is ~65 MiB).
pub const MAX_VMLINUX: usize = 512 << 20;

const XZ_MAGIC: &[u8] = &[0xFD, b'7', b'z', b'X', b'Z', 0];
const ZSTD_MAGIC: &[u8] = &[0x28, 0xB5, 0x2F, 0xFD];
const GZIP_MAGIC: &[u8] = &[0x1F, 0x8B];

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("not a bzImage: {0}")]
    NotBzImage(String),
    #[error(
        "the kernel's payload is compressed with {0}, which ferry cannot unpack (it handles xz and zstd)"
    )]
    UnsupportedCompression(String),
    #[error("cannot run {tool} to decompress the kernel ({hint}): {source}")]
    Tool {
        tool: &'static str,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed to decompress the kernel: {detail}")]
    Decompress { tool: &'static str, detail: String },
    #[error("the decompressed kernel is unusable: {0}")]
    BadVmlinux(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Xz,
    Zstd,
}

impl Compression {
    fn tool(self) -> (&'static str, &'static [&'static str], &'static str) {
        match self {
            // --single-stream: stop at the end of the xz stream (the size trailer is cut off
            // anyway; this also tolerates padding).
            Compression::Xz => (
                "xz",
                &["-dc", "--single-stream"],
                "apt-get install xz-utils",
            ),
            Compression::Zstd => ("zstd", &["-dcq"], "apt-get install zstd"),
        }
    }
}

/// The compressed payload of a bzImage, its compression, and the uncompressed size the
/// kernel build recorded after it.
pub fn payload(bz: &[u8]) -> Result<(Compression, &[u8], u32), KernelError> {
    let field = |off: usize, len: usize| {
        bz.get(off..off + len)
            .ok_or_else(|| KernelError::NotBzImage("file too short for a setup header".into()))
    };
    if field(0x202, 4)? != b"HdrS" {
        return Err(KernelError::NotBzImage("no HdrS signature".into()));
    }
    let version = u16::from_le_bytes(field(0x206, 2)?.try_into().unwrap_or_default());
    if version < 0x208 {
        return Err(KernelError::NotBzImage(format!(
            "boot protocol {}.{:02} predates payload fields (2.08)",
            version >> 8,
            version & 0xff
        )));
    }
    let setup_sects = match field(0x1f1, 1)?[0] {
        0 => 4, // the protocol's "0 means 4"
        n => usize::from(n),
    };
    let u32_at = |off| -> Result<usize, KernelError> {
        Ok(u32::from_le_bytes(field(off, 4)?.try_into().unwrap_or_default()) as usize)
    };
    let (offset, length) = (u32_at(0x248)?, u32_at(0x24c)?);
    let start = (setup_sects + 1) * 512 + offset;
    let p = start
        .checked_add(length)
        .and_then(|end| bz.get(start..end))
        .ok_or_else(|| {
            KernelError::NotBzImage(format!(
                "payload ({length} bytes at {start}) lies outside the file ({} bytes)",
                bz.len()
            ))
        })?;
    let compression = if p.starts_with(XZ_MAGIC) {
        Compression::Xz
    } else if p.starts_with(ZSTD_MAGIC) {
        Compression::Zstd
    } else if p.starts_with(GZIP_MAGIC) {
        return Err(KernelError::UnsupportedCompression("gzip".into()));
    } else {
        let head: Vec<String> = p.iter().take(6).map(|b| format!("{b:02x}")).collect();
        return Err(KernelError::UnsupportedCompression(format!(
            "an unknown format (magic {})",
            head.join(" ")
        )));
    };
    let Some((stream, size)) = p.split_last_chunk::<4>() else {
        return Err(KernelError::NotBzImage("payload too short".into()));
    };
    Ok((compression, stream, u32::from_le_bytes(*size)))
}

/// The uncompressed, checked ELF kernel.
pub fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>, KernelError> {
    let (compression, stream, size) = payload(bz)?;
    if size as usize > MAX_VMLINUX {
        return Err(KernelError::NotBzImage(format!(
            "the recorded kernel size ({size} bytes) exceeds the {MAX_VMLINUX}-byte limit"
        )));
    }
    let vmlinux = decompress(compression, stream, MAX_VMLINUX)?;
    if vmlinux.len() != size as usize {
        return Err(KernelError::BadVmlinux(format!(
            "{} bytes, but the bzImage records {size}",
            vmlinux.len()
        )));
    }
    let info = elf::inspect(&vmlinux).map_err(|e| KernelError::BadVmlinux(e.to_string()))?;
    if info.machine != elf::EM_X86_64 {
        return Err(KernelError::BadVmlinux(format!(
            "not an x86-64 kernel (ELF machine {})",
            info.machine
        )));
    }
    if !info.pvh_entry {
        return Err(KernelError::BadVmlinux(
            "no PVH entry note (a kernel built without CONFIG_PVH cannot be booted uncompressed)"
                .into(),
        ));
    }
    Ok(vmlinux)
}

fn decompress(c: Compression, input: &[u8], max: usize) -> Result<Vec<u8>, KernelError> {
    let (tool, args, hint) = c.tool();
    let mut child = Command::new(tool)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| KernelError::Tool { tool, hint, source })?;
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(KernelError::Decompress {
            tool,
            detail: "no pipes to the tool".into(),
        });
    };
    // Feed and drain at once: either side alone would fill a pipe and stall.
    let (out, err, fed) = std::thread::scope(|s| {
        let feeder = s.spawn(move || stdin.write_all(input));
        let errs = s.spawn(move || {
            let mut e = Vec::new();
            let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut e);
            e
        });
        let mut out = Vec::new();
        // One byte past the bound tells "too large" from "exactly at the bound".
        let mut reader = stdout.take(max as u64 + 1);
        let read = reader.read_to_end(&mut out);
        // Closing our end stops a tool that has more to say (it gets EPIPE), which in turn
        // unblocks the feeder.
        drop(reader);
        (
            read.map(|_| out),
            errs.join().unwrap_or_default(),
            feeder.join(),
        )
    });
    let status = child.wait();
    let detail = |what: String| KernelError::Decompress {
        tool,
        detail: format!("{what}: {}", String::from_utf8_lossy(&err).trim()),
    };
    let out = out.map_err(|e| detail(format!("reading its output: {e}")))?;
    if out.len() > max {
        return Err(detail(format!("output exceeds {max} bytes")));
    }
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => return Err(detail(s.to_string())),
        Err(e) => return Err(detail(e.to_string())),
    }
    if let Ok(Err(e)) = fed {
        return Err(detail(format!("feeding it: {e}")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped file around `compressed` (setup header fields only).
    fn fake_bzimage(compressed: &[u8], size: u32, setup_sects: u8) -> Vec<u8> {
        let sects = if setup_sects == 0 {
            4
        } else {
            setup_sects as usize
        };
        let pm_start = (sects + 1) * 512;
        let offset = 0x3a0usize; // anywhere inside the protected-mode part
        let mut b = vec![0u8; pm_start + offset];
        b[0x1f1] = setup_sects;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&(offset as u32).to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(compressed.len() as u32 + 4).to_le_bytes());
        b.extend_from_slice(compressed);
        b.extend_from_slice(&size.to_le_bytes());
        b.extend_from_slice(&[0u8; 100]); // what follows the payload in a real bzImage
        b
    }

    fn compress(tool: &str, args: &[&str], data: &[u8]) -> Option<Vec<u8>> {
        let mut child = Command::new(tool)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .ok()?;
        let mut stdin = child.stdin.take()?;
        let data = data.to_vec();
        let t = std::thread::spawn(move || stdin.write_all(&data));
        let out = child.wait_with_output().ok()?;
        t.join().ok()?.ok()?;
        out.status.success().then_some(out.stdout)
    }

    #[test]
    fn extracts_an_xz_or_zstd_kernel() {
        let mut elf = crate::elf::tests::fake_elf(true, false);
        elf.resize(300_000, 0x90);
        let mut ran = 0;
        // The kernel's own xz settings: CRC32 checks.
        for (tool, args) in [
            ("xz", &["-z", "-c", "--check=crc32"][..]),
            ("zstd", &["-c", "-q"]),
        ] {
            let Some(c) = compress(tool, args, &elf) else {
                eprintln!(
                    "skipped: the {tool} part of extracts_an_xz_or_zstd_kernel ({tool} is not installed)"
                );
                continue;
            };
            for sects in [0u8, 27, 39] {
                let bz = fake_bzimage(&c, elf.len() as u32, sects);
                assert_eq!(
                    extract_vmlinux(&bz).unwrap(),
                    elf,
                    "{tool}, setup_sects {sects}"
                );
            }
            // A recorded size that does not match is caught.
            let bz = fake_bzimage(&c, elf.len() as u32 - 1, 39);
            assert!(matches!(
                extract_vmlinux(&bz),
                Err(KernelError::BadVmlinux(_))
            ));
            ran += 1;
        }
        assert!(ran > 0, "neither xz nor zstd is installed");
    }

    #[test]
    fn a_kernel_without_pvh_note_is_refused() {
        let elf = crate::elf::tests::fake_elf(false, false);
        let Some(c) = compress("xz", &["-z", "-c", "--check=crc32"], &elf) else {
            eprintln!("skipped: a_kernel_without_pvh_note_is_refused needs xz");
            return;
        };
        let err = extract_vmlinux(&fake_bzimage(&c, elf.len() as u32, 39)).unwrap_err();
        assert!(err.to_string().contains("PVH"), "{err}");
    }

    #[test]
    fn bad_bzimages_are_errors() {
        assert!(matches!(payload(b"short"), Err(KernelError::NotBzImage(_))));
        let good = fake_bzimage(&[0xFD, b'7', b'z', b'X', b'Z', 0, 1, 2], 10, 39);
        assert_eq!(payload(&good).unwrap().0, Compression::Xz);
        // Every truncation is an error, never a panic.
        for cut in 0..good.len() - 100 {
            assert!(payload(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut gz = good.clone();
        let start = 40 * 512 + 0x3a0;
        gz[start..start + 2].copy_from_slice(GZIP_MAGIC);
        assert!(matches!(
            payload(&gz),
            Err(KernelError::UnsupportedCompression(_))
        ));
        let mut huge = good.clone();
        huge[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(payload(&huge), Err(KernelError::NotBzImage(_))));
        let mut old = good;
        old[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
        assert!(matches!(payload(&old), Err(KernelError::NotBzImage(_))));
    }

    /// The real thing, when a Debian kernel is around (e.g. the image test's download cache).
    #[test]
    fn extracts_a_real_kernel_if_present() {
        let Some(path) = std::env::var_os("FERRY_TEST_BZIMAGE") else {
            eprintln!(
                "skipped: extracts_a_real_kernel_if_present (set FERRY_TEST_BZIMAGE=/boot/vmlinuz-...)"
            );
            return;
        };
        let bz = std::fs::read(path).unwrap();
        let v = extract_vmlinux(&bz).unwrap();
        assert!(v.len() > 1 << 20);
    }
}
