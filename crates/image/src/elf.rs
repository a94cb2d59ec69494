//! Just enough ELF reading to check the image's inputs: is a program statically linked (no
//! `PT_INTERP`), and does a kernel carry the PVH entry note QEMU needs to boot it directly.

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point QEMU boots an ELF kernel through.
const PVH_NOTE_TYPE: u32 = 18;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
pub const EM_X86_64: u16 = 62;
/// More program headers than any real binary has; bounds the walk over a hostile file.
const MAX_PHNUM: usize = 4096;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("not a 64-bit little-endian ELF file")]
    Unsupported,
    #[error("truncated or malformed ELF file: {0}")]
    Malformed(&'static str),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub machine: u16,
    /// Has a program interpreter, i.e. is dynamically linked.
    pub dynamic: bool,
    /// Carries the PVH entry note.
    pub pvh_entry: bool,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

pub fn inspect(b: &[u8]) -> Result<ElfInfo, ElfError> {
    if b.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Err(ElfError::NotElf);
    }
    if b.get(4) != Some(&2) || b.get(5) != Some(&1) {
        return Err(ElfError::Unsupported);
    }
    let short = ElfError::Malformed("header");
    let machine = u16_at(b, 18).ok_or(short.clone())?;
    let phoff = usize::try_from(u64_at(b, 32).ok_or(short.clone())?)
        .map_err(|_| ElfError::Malformed("program header offset"))?;
    let phentsize = usize::from(u16_at(b, 54).ok_or(short.clone())?);
    let phnum = usize::from(u16_at(b, 56).ok_or(short)?);
    if phnum > MAX_PHNUM || (phnum > 0 && phentsize < 56) {
        return Err(ElfError::Malformed("program header table"));
    }
    let mut info = ElfInfo {
        machine,
        dynamic: false,
        pvh_entry: false,
    };
    for i in 0..phnum {
        let ph = phentsize
            .checked_mul(i)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(ElfError::Malformed("program header offset"))?;
        let bad = ElfError::Malformed("program header");
        let p_type = u32_at(b, ph).ok_or(bad.clone())?;
        match p_type {
            PT_INTERP => info.dynamic = true,
            PT_NOTE => {
                let off = u64_at(b, ph + 8).ok_or(bad.clone())?;
                let size = u64_at(b, ph + 32).ok_or(bad)?;
                let notes = usize::try_from(off)
                    .ok()
                    .zip(usize::try_from(size).ok())
                    .and_then(|(o, s)| b.get(o..o.checked_add(s)?))
                    .ok_or(ElfError::Malformed("note segment out of bounds"))?;
                info.pvh_entry |= has_pvh_note(notes);
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Walks a note segment: (namesz, descsz, type, name padded to 4, desc padded to 4)*.
fn has_pvh_note(mut notes: &[u8]) -> bool {
    while notes.len() >= 12 {
        let (Some(namesz), Some(descsz), Some(kind)) =
            (u32_at(notes, 0), u32_at(notes, 4), u32_at(notes, 8))
        else {
            return false;
        };
        let name_end = 12 + (namesz as usize);
        let desc_start = 12 + (namesz as usize).next_multiple_of(4);
        let next = desc_start.saturating_add((descsz as usize).next_multiple_of(4));
        let Some(name) = notes.get(12..name_end) else {
            return false;
        };
        if kind == PVH_NOTE_TYPE && name == b"Xen\0" {
            return true;
        }
        match notes.get(next..) {
            Some(rest) => notes = rest,
            None => return false,
        }
    }
    false
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny x86-64 ELF: one PT_NOTE (with the PVH note when asked) and optionally a
    /// PT_INTERP. Only the fields [`inspect`] reads are filled in.
    pub(crate) fn fake_elf(pvh: bool, interp: bool) -> Vec<u8> {
        let mut notes = Vec::new();
        let mut note = |name: &[u8], kind: u32, desc: &[u8]| {
            notes.extend_from_slice(&(name.len() as u32).to_le_bytes());
            notes.extend_from_slice(&(desc.len() as u32).to_le_bytes());
            notes.extend_from_slice(&kind.to_le_bytes());
            notes.extend_from_slice(name);
            notes.resize(notes.len().next_multiple_of(4), 0);
            notes.extend_from_slice(desc);
            notes.resize(notes.len().next_multiple_of(4), 0);
        };
        note(b"GNU\0", 3, &[1, 2, 3, 4, 5]);
        if pvh {
            note(b"Xen\0", PVH_NOTE_TYPE, &0x0100_0000u32.to_le_bytes());
        }
        let phnum = 1 + usize::from(interp);
        let phoff = 64usize;
        let notes_off = phoff + 56 * phnum;
        let mut b = vec![0u8; notes_off];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        b[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&(phnum as u16).to_le_bytes());
        let ph = phoff;
        b[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        b[ph + 8..ph + 16].copy_from_slice(&(notes_off as u64).to_le_bytes());
        b[ph + 32..ph + 40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        if interp {
            b[ph + 56..ph + 60].copy_from_slice(&PT_INTERP.to_le_bytes());
        }
        b.extend_from_slice(&notes);
        b
    }

    #[test]
    fn reads_the_flags() {
        let i = inspect(&fake_elf(true, false)).unwrap();
        assert_eq!(
            (i.machine, i.dynamic, i.pvh_entry),
            (EM_X86_64, false, true)
        );
        let i = inspect(&fake_elf(false, true)).unwrap();
        assert_eq!((i.dynamic, i.pvh_entry), (true, false));
    }

    #[test]
    fn hostile_input_is_an_error_not_a_panic() {
        assert_eq!(inspect(b"MZ"), Err(ElfError::NotElf));
        assert_eq!(inspect(b"\x7fELF\x01\x01"), Err(ElfError::Unsupported));
        let good = fake_elf(true, true);
        for cut in 0..good.len() {
            let _ = inspect(&good[..cut]);
        }
        // A note segment pointing past the end.
        let mut b = fake_elf(true, false);
        b[64 + 8..64 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(inspect(&b), Err(ElfError::Malformed(_))));
        // Absurd note sizes.
        let mut b = fake_elf(true, false);
        let notes_off = 64 + 56;
        b[notes_off..notes_off + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(!inspect(&b).unwrap().pvh_entry);
    }

    #[test]
    fn the_system_shell_is_dynamic() {
        // Not a guarantee on every distribution, but true of Debian's /bin/sh.
        if let Ok(b) = std::fs::read("/bin/sh")
            && let Ok(i) = inspect(&b)
        {
            assert!(i.dynamic);
        }
    }
}
