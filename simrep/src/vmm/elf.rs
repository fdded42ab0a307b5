//! A minimal ELF64 loader for the bundled guest.
//!
//! Only what the guest image needs: a little-endian x86-64 `ET_EXEC` file
//! whose `PT_LOAD` segments are copied to their physical addresses (the
//! guest is identity-mapped and linked at a fixed address, so there is
//! nothing to relocate). Written by hand rather than taken from
//! `linux-loader` or `goblin`: it is ~100 lines with every bound checked,
//! it reads from a byte slice (the image is embedded in the binary), and it
//! keeps the VMM free of a second vm-memory version (linux-loader pins its
//! own) and of a general-purpose parser's surface.

/// Errors of the ELF loader.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    /// The file is shorter than a header or table it declares.
    #[error("ELF image truncated: {what} needs bytes {start:#x}..{end:#x} of {len}")]
    Truncated {
        /// Which structure.
        what: &'static str,
        /// Its first byte.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// The file's length.
        len: usize,
    },
    /// Not an ELF64 little-endian x86-64 executable.
    #[error("not an x86-64 ELF64 little-endian executable: {0}")]
    NotX86_64Exec(&'static str),
    /// A segment's file size exceeds its memory size.
    #[error("segment {index}: file size {filesz:#x} exceeds memory size {memsz:#x}")]
    BadSegment {
        /// Program-header index.
        index: usize,
        /// Bytes in the file.
        filesz: u64,
        /// Bytes in memory.
        memsz: u64,
    },
    /// A segment or the entry point lies outside the allowed load window.
    #[error("{what} at {start:#x}..{end:#x} is outside the load window {lo:#x}..{hi:#x}")]
    OutOfWindow {
        /// What was out of bounds.
        what: &'static str,
        /// Start of it.
        start: u64,
        /// End of it.
        end: u64,
        /// Window start.
        lo: u64,
        /// Window end.
        hi: u64,
    },
    /// The image has no `PT_LOAD` segment.
    #[error("the ELF image has no loadable segment")]
    NoSegments,
}

/// One `PT_LOAD` segment, borrowed from the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Guest-physical load address.
    pub paddr: u64,
    /// Bytes copied from the file.
    pub data: &'a [u8],
    /// Bytes in memory (the rest after `data` is zeroed).
    pub memsz: u64,
}

/// A parsed image: its entry point and its loadable segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfImage<'a> {
    /// Entry point (a guest-physical address, identity-mapped).
    pub entry: u64,
    /// The `PT_LOAD` segments in file order.
    pub segments: Vec<Segment<'a>>,
}

const PT_LOAD: u32 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;

fn bytes<'a>(
    file: &'a [u8],
    what: &'static str,
    start: u64,
    len: u64,
) -> Result<&'a [u8], ElfError> {
    let end = start.checked_add(len).ok_or(ElfError::Truncated {
        what,
        start,
        end: u64::MAX,
        len: file.len(),
    })?;
    let (s, e) = (usize::try_from(start), usize::try_from(end));
    match (s, e) {
        (Ok(s), Ok(e)) if e <= file.len() => Ok(&file[s..e]),
        _ => Err(ElfError::Truncated {
            what,
            start,
            end,
            len: file.len(),
        }),
    }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Parses `file` and checks that every segment and the entry point lie in
/// `window` (guest-physical addresses).
///
/// # Errors
///
/// An [`ElfError`] naming the first problem found.
pub fn parse(file: &[u8], window: std::ops::Range<u64>) -> Result<ElfImage<'_>, ElfError> {
    let eh = bytes(file, "ELF header", 0, 64)?;
    if eh[0..4] != *b"\x7fELF" {
        return Err(ElfError::NotX86_64Exec("bad magic"));
    }
    if eh[4] != 2 || eh[5] != 1 {
        return Err(ElfError::NotX86_64Exec("not ELF64 little-endian"));
    }
    if u16_at(eh, 16) != ET_EXEC {
        return Err(ElfError::NotX86_64Exec("not ET_EXEC (built as PIE?)"));
    }
    if u16_at(eh, 18) != EM_X86_64 {
        return Err(ElfError::NotX86_64Exec("not x86-64"));
    }
    let entry = u64_at(eh, 24);
    let phoff = u64_at(eh, 32);
    let phentsize = u64::from(u16_at(eh, 54));
    let phnum = u64::from(u16_at(eh, 56));
    if phentsize < 56 {
        return Err(ElfError::NotX86_64Exec("program header entries too small"));
    }
    let table = bytes(file, "program headers", phoff, phentsize * phnum)?;
    let out_of_window = |what, start: u64, end: u64| ElfError::OutOfWindow {
        what,
        start,
        end,
        lo: window.start,
        hi: window.end,
    };

    let mut segments = Vec::new();
    for index in 0..phnum as usize {
        let ph = &table[index * phentsize as usize..][..56];
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let offset = u64_at(ph, 8);
        let paddr = u64_at(ph, 24);
        let filesz = u64_at(ph, 32);
        let memsz = u64_at(ph, 40);
        if filesz > memsz {
            return Err(ElfError::BadSegment {
                index,
                filesz,
                memsz,
            });
        }
        let end = paddr
            .checked_add(memsz)
            .ok_or(out_of_window("segment", paddr, u64::MAX))?;
        if paddr < window.start || end > window.end {
            return Err(out_of_window("segment", paddr, end));
        }
        let data = bytes(file, "segment data", offset, filesz)?;
        segments.push(Segment { paddr, data, memsz });
    }
    if segments.is_empty() {
        return Err(ElfError::NoSegments);
    }
    if !window.contains(&entry) {
        return Err(out_of_window("entry point", entry, entry));
    }
    Ok(ElfImage { entry, segments })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny ELF with one segment of 4 file bytes and 16 memory bytes.
    fn tiny(paddr: u64, entry: u64) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56 + 4];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes());
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&4u64.to_le_bytes());
        ph[40..48].copy_from_slice(&16u64.to_le_bytes());
        f[120..124].copy_from_slice(b"\x90\x90\xf4\xcc");
        f
    }

    #[test]
    fn parses_a_minimal_image() {
        let f = tiny(0x10_0000, 0x10_0000);
        let img = parse(&f, 0x10_0000..0x20_0000).unwrap();
        assert_eq!(img.entry, 0x10_0000);
        assert_eq!(img.segments.len(), 1);
        assert_eq!(img.segments[0].data, b"\x90\x90\xf4\xcc");
        assert_eq!(img.segments[0].memsz, 16);
    }

    #[test]
    fn rejects_bad_images() {
        let f = tiny(0x10_0000, 0x10_0000);
        assert!(matches!(
            parse(&f[..40], 0..u64::MAX),
            Err(ElfError::Truncated { .. })
        ));
        assert!(matches!(
            parse(&f[..121], 0..u64::MAX),
            Err(ElfError::Truncated { .. })
        ));
        let mut pie = f.clone();
        pie[16] = 3;
        assert!(matches!(
            parse(&pie, 0..u64::MAX),
            Err(ElfError::NotX86_64Exec(_))
        ));
        let mut magic = f.clone();
        magic[1] = b'X';
        assert!(matches!(
            parse(&magic, 0..u64::MAX),
            Err(ElfError::NotX86_64Exec(_))
        ));
        assert!(matches!(
            parse(&f, 0..0x10_0008),
            Err(ElfError::OutOfWindow { .. })
        ));
        let outside_entry = tiny(0x10_0000, 0x30_0000);
        assert!(matches!(
            parse(&outside_entry, 0x10_0000..0x20_0000),
            Err(ElfError::OutOfWindow { .. })
        ));
        let wrap = tiny(u64::MAX - 4, u64::MAX - 4);
        assert!(parse(&wrap, 0..u64::MAX).is_err());
    }

    #[test]
    fn parses_the_bundled_guest() {
        let img = parse(
            super::super::GUEST_ELF,
            super::super::abi::IMAGE_GPA..super::super::abi::IMAGE_END,
        )
        .unwrap();
        assert_eq!(img.entry, super::super::abi::IMAGE_GPA);
        assert!(!img.segments.is_empty());
    }
}
