//! Sparse copies of disk images with a CRC-32 of their logical content:
//! a checkpoint's `disk.raw` and the working copy `simrep restore --disk`
//! makes of it.
//!
//! Only the source's data extents are read (`SEEK_DATA`/`SEEK_HOLE`);
//! holes stay holes, and all-zero 4 KiB blocks inside data extents become
//! holes too. The CRC covers the whole image, holes read as zeros, so the
//! same function copies and verifies.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Unit of the zero-run CRC table (a sector).
const UNIT: u64 = 512;
/// Granularity of the zero check inside data extents.
const BLOCK: usize = 4096;
/// Bytes read at a time.
const CHUNK: usize = 1 << 20;

/// What [`copy_sparse`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageCopy {
    /// The image's logical size.
    pub bytes: u64,
    /// CRC-32 (IEEE) of the logical content.
    pub crc32: u32,
    /// Bytes written to the copy (non-zero 4 KiB blocks).
    pub data_bytes: u64,
}

/// CRC-32 of runs of zero bytes in O(log n): `runs[k]` is the hasher state
/// of `2^k` zero sectors.
struct ZeroCrc {
    runs: Vec<crc32fast::Hasher>,
}

impl ZeroCrc {
    fn new() -> Self {
        let mut first = crc32fast::Hasher::new();
        first.update(&[0u8; UNIT as usize]);
        let mut runs = vec![first];
        for k in 1..48 {
            let mut h = runs[k - 1].clone();
            h.combine(&runs[k - 1]);
            runs.push(h);
        }
        ZeroCrc { runs }
    }

    /// Appends `bytes` zero bytes (a multiple of 512) to `h`.
    fn extend(&self, h: &mut crc32fast::Hasher, bytes: u64) {
        let units = bytes / UNIT;
        for (k, run) in self.runs.iter().enumerate() {
            if units & (1 << k) != 0 {
                h.combine(run);
            }
        }
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}

/// `lseek(fd, off, whence)`, `None` at ENXIO (no more data / holes).
fn seek(file: &File, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off = libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a file descriptor this `File` owns; it only moves
    // the file offset.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Copies the first `len` bytes (a multiple of 512) of `src` into `dst`
/// (if given: truncated to `len` first, data written with `pwrite`, not
/// synced), keeping holes; returns the CRC-32 of the logical content.
/// With `dst` `None` it only computes the CRC.
///
/// # Errors
///
/// `Err((true, e))` when reading `src` failed, `Err((false, e))` when
/// writing `dst` failed.
pub fn copy_sparse(
    src: &File,
    dst: Option<&File>,
    len: u64,
) -> Result<ImageCopy, (bool, io::Error)> {
    let rd = |e| (true, e);
    let wr = |e| (false, e);
    if let Some(d) = dst {
        d.set_len(0).map_err(wr)?;
        d.set_len(len).map_err(wr)?;
    }
    let zeros = ZeroCrc::new();
    let mut crc = crc32fast::Hasher::new();
    let mut data_bytes = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let down = |x: u64| x / UNIT * UNIT;
    // Everything below `pos` is copied and hashed.
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(src, pos, libc::SEEK_DATA).map_err(rd)? {
            Some(d) => down(d.min(len)),
            None => len,
        };
        if data > pos {
            zeros.extend(&mut crc, data - pos);
            pos = data;
            continue;
        }
        let hole = seek(src, pos, libc::SEEK_HOLE)
            .map_err(rd)?
            .unwrap_or(len)
            .min(len);
        let end = hole.div_ceil(UNIT) * UNIT;
        let end = end.max(pos + UNIT).min(len);
        while pos < end {
            let n = (end - pos).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            src.read_exact_at(chunk, pos).map_err(rd)?;
            for (i, b) in chunk.chunks(BLOCK).enumerate() {
                if is_zero(b) {
                    zeros.extend(&mut crc, b.len() as u64);
                } else {
                    crc.update(b);
                    data_bytes += b.len() as u64;
                    if let Some(d) = dst {
                        d.write_all_at(b, pos + (i * BLOCK) as u64).map_err(wr)?;
                    }
                }
            }
            pos += n as u64;
        }
    }
    Ok(ImageCopy {
        bytes: len,
        crc32: crc.finalize(),
        data_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_keep_holes_content_and_crc() {
        let dir = tempfile::tempdir().unwrap();
        let src_path = dir.path().join("src");
        let src = File::create(&src_path).unwrap();
        let len = (16 << 20) + 3 * 512;
        src.set_len(len).unwrap();
        src.write_all_at(b"hello", 700).unwrap();
        src.write_all_at(&[0xaa; 9000], 5 << 20).unwrap();
        src.write_all_at(&[0u8; 8192], 8 << 20).unwrap(); // zero data: a hole in the copy
        src.write_all_at(&[7], len - 1).unwrap();
        let src = File::open(&src_path).unwrap();
        let mut all = vec![0u8; len as usize];
        src.read_exact_at(&mut all, 0).unwrap();
        let dst_path = dir.path().join("dst");
        let dst = File::create(&dst_path).unwrap();
        let c = copy_sparse(&src, Some(&dst), len).unwrap();
        assert_eq!(c.bytes, len);
        assert_eq!(c.crc32, crc32fast::hash(&all));
        // Blocks with data: 1 (hello) + 3 (9000 bytes over 4 KiB blocks) + the tail.
        assert_eq!(c.data_bytes, 4096 + 3 * 4096 + (len % 4096));
        let mut back = vec![0u8; len as usize];
        File::open(&dst_path)
            .unwrap()
            .read_exact_at(&mut back, 0)
            .unwrap();
        assert!(back == all);
        let allocated = std::fs::metadata(&dst_path).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        assert!(allocated.unwrap() < 1 << 20, "the copy is sparse");
        // Verifying only gives the same CRC; one changed byte changes it.
        assert_eq!(copy_sparse(&src, None, len).unwrap().crc32, c.crc32);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&src_path)
            .unwrap();
        f.write_all_at(&[0xab], 5 << 20).unwrap();
        assert_ne!(copy_sparse(&src, None, len).unwrap().crc32, c.crc32);
    }

    #[test]
    fn an_empty_sparse_image_hashes_as_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z");
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        let f = File::open(&p).unwrap();
        let c = copy_sparse(&f, None, 1 << 20).unwrap();
        assert_eq!(c.crc32, crc32fast::hash(&vec![0u8; 1 << 20]));
        assert_eq!(c.data_bytes, 0);
    }
}
