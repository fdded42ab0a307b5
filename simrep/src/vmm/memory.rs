//! Guest RAM: one anonymous mapping, huge-page backed and pre-faulted.
//!
//! The mapping is owned by [`vm_memory`] (`GuestMemoryMmap`), and all VMM
//! accesses go through its `Bytes` interface, which copies volatile: guest
//! memory is never seen as `&[u8]` while vCPUs run. Under PVM's shadow
//! paging, `MADV_HUGEPAGE` plus pre-faulting gives the guest 2 MiB shadow
//! mappings (ENVIRONMENT.md: 256 MiB first-touch in 6-9 ms instead of
//! 20-55 us per 4 KiB page).

use std::sync::atomic::Ordering;

use kvm_bindings::kvm_userspace_memory_region;
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use super::abi::LARGE_PAGE_SIZE;

/// Errors of guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero or not a multiple of 2 MiB.
    #[error("guest memory size {size:#x} is not a positive multiple of 2 MiB")]
    BadSize {
        /// The size asked for.
        size: u64,
    },
    /// `mmap` of the guest memory failed.
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        /// The size asked for.
        size: u64,
        /// What mmap said.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// Building the region list failed (should not happen for one region).
    #[error("cannot build the guest memory map")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// Pre-faulting the guest memory failed (out of memory?).
    #[error("cannot pre-fault {size} bytes of guest memory")]
    Prefault {
        /// The size of the mapping.
        size: u64,
        /// What madvise said.
        #[source]
        source: std::io::Error,
    },
    /// A guest address range is outside guest RAM.
    #[error("guest access at {gpa:#x} (+{len}) is outside guest RAM")]
    Access {
        /// Start of the access.
        gpa: u64,
        /// Length of the access.
        len: usize,
        /// What vm-memory said.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Guest RAM at guest-physical address 0.
#[derive(Debug)]
pub struct GuestMemory {
    mem: GuestMemoryMmap,
    size: u64,
    host_addr: u64,
    /// One bit per 4 KiB page the VMM wrote through [`Self::write`] or
    /// [`Self::write_obj`] (device emulation): KVM's dirty log only sees
    /// the guest's own writes.
    host_written: Box<[std::sync::atomic::AtomicU64]>,
}

impl GuestMemory {
    /// Maps `size` bytes of anonymous private memory, asks for transparent
    /// huge pages and pre-faults all of it.
    ///
    /// # Errors
    ///
    /// [`MemoryError::BadSize`] unless `size` is a positive multiple of
    /// 2 MiB; [`MemoryError::Map`] or [`MemoryError::Prefault`] when the host
    /// has not got the memory.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(LARGE_PAGE_SIZE) {
            return Err(MemoryError::BadSize { size });
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize { size })?;
        let region = MmapRegion::new(len).map_err(|source| MemoryError::Map { size, source })?;
        let host = region.as_ptr();
        if !(host as u64).is_multiple_of(LARGE_PAGE_SIZE) {
            tracing::warn!(host = ?host, "guest memory is not 2 MiB aligned: fewer huge pages");
        }
        // SAFETY: `host..host+len` is the mapping just created, owned by
        // `region`; MADV_HUGEPAGE only changes how the kernel backs it.
        if unsafe { libc::madvise(host.cast(), len, libc::MADV_HUGEPAGE) } != 0 {
            tracing::warn!(err = %std::io::Error::last_os_error(), "MADV_HUGEPAGE failed");
        }
        // SAFETY: as above; MADV_POPULATE_WRITE faults the pages in as if
        // written (zero-filled), without changing their content.
        if unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) } != 0 {
            let source = std::io::Error::last_os_error();
            return Err(MemoryError::Prefault { size, source });
        }
        let region =
            GuestRegionMmap::new(region, GuestAddress(0)).ok_or(MemoryError::BadSize { size })?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(MemoryError::Regions)?;
        let pages = size / super::abi::PAGE_SIZE;
        Ok(GuestMemory {
            mem,
            size,
            host_addr: host as u64,
            host_written: (0..pages.div_ceil(64))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        })
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Host virtual address of guest-physical address 0.
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }

    /// The vm-memory view, for code that works on `GuestMemory` traits.
    pub fn inner(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The KVM memory slot that maps all of guest RAM.
    pub fn kvm_region(&self, slot: u32) -> kvm_userspace_memory_region {
        kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: self.size,
            userspace_addr: self.host_addr,
        }
    }

    /// Whether `gpa..gpa+len` lies in guest RAM.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Records that the VMM wrote `gpa..gpa+len`.
    fn mark_host_written(&self, gpa: u64, len: usize) {
        if len == 0 {
            return;
        }
        let first = gpa / super::abi::PAGE_SIZE;
        let last = (gpa + len as u64 - 1) / super::abi::PAGE_SIZE;
        for page in first..=last {
            if let Some(w) = self.host_written.get((page / 64) as usize) {
                w.fetch_or(1 << (page % 64), Ordering::Relaxed);
            }
        }
    }

    /// The guest pages (GPA / 4 KiB, increasing) the VMM wrote through
    /// [`Self::write`] / [`Self::write_obj`] since the last call; the set
    /// starts over. A checkpoint adds them to KVM's dirty pages, which
    /// never include writes made through the VMM's own mapping.
    pub fn take_host_written(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, w) in self.host_written.iter().enumerate() {
            // A plain load first: most words are zero, and an atomic swap
            // of each of a large guest's words costs more than the rest of
            // the harvest.
            if w.load(Ordering::Relaxed) == 0 {
                continue;
            }
            let mut bits = w.swap(0, Ordering::Relaxed);
            while bits != 0 {
                out.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }

    /// Copies `data` into guest memory at `gpa` (volatile).
    ///
    /// # Errors
    ///
    /// [`MemoryError::Access`] when the range is not in guest RAM.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.mark_host_written(gpa, data.len());
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|source| MemoryError::Access {
                gpa,
                len: data.len(),
                source,
            })
    }

    /// Copies guest memory at `gpa` into `buf` (volatile).
    ///
    /// # Errors
    ///
    /// [`MemoryError::Access`] when the range is not in guest RAM.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|source| MemoryError::Access {
                gpa,
                len: buf.len(),
                source,
            })
    }

    /// Writes a plain-data value at `gpa`.
    ///
    /// # Errors
    ///
    /// [`MemoryError::Access`] when the range is not in guest RAM.
    pub fn write_obj<T: vm_memory::ByteValued>(&self, gpa: u64, val: T) -> Result<(), MemoryError> {
        self.mark_host_written(gpa, size_of::<T>());
        self.mem
            .write_obj(val, GuestAddress(gpa))
            .map_err(|source| MemoryError::Access {
                gpa,
                len: size_of::<T>(),
                source,
            })
    }

    /// Reads a plain-data value at `gpa`.
    ///
    /// # Errors
    ///
    /// [`MemoryError::Access`] when the range is not in guest RAM.
    pub fn read_obj<T: vm_memory::ByteValued>(&self, gpa: u64) -> Result<T, MemoryError> {
        self.mem
            .read_obj(GuestAddress(gpa))
            .map_err(|source| MemoryError::Access {
                gpa,
                len: size_of::<T>(),
                source,
            })
    }

    /// Atomically loads an aligned `u64` the guest may be writing.
    ///
    /// # Errors
    ///
    /// [`MemoryError::Access`] when the address is not in guest RAM or not
    /// 8-byte aligned.
    pub fn load_u64(&self, gpa: u64) -> Result<u64, MemoryError> {
        self.mem
            .load(GuestAddress(gpa), Ordering::Acquire)
            .map_err(|source| MemoryError::Access {
                gpa,
                len: 8,
                source,
            })
    }

    /// Number of regions (always 1 for now).
    pub fn regions(&self) -> usize {
        self.mem.iter().filter(|r| r.len() > 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_sizes_that_are_not_2mib_multiples() {
        assert!(matches!(
            GuestMemory::new(0),
            Err(MemoryError::BadSize { .. })
        ));
        assert!(matches!(
            GuestMemory::new(4096),
            Err(MemoryError::BadSize { .. })
        ));
    }

    #[test]
    fn reads_back_writes_and_bounds_checks() {
        let mem = GuestMemory::new(4 << 20).unwrap();
        assert_eq!(mem.size(), 4 << 20);
        assert_eq!(mem.regions(), 1);
        mem.write(0x1234, b"hello").unwrap();
        let mut buf = [0u8; 5];
        mem.read(0x1234, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        mem.write_obj(0x2000, 0xdead_beef_u64).unwrap();
        assert_eq!(mem.load_u64(0x2000).unwrap(), 0xdead_beef);
        assert!(mem.write((4 << 20) - 2, b"abc").is_err());
        assert!(mem.contains(0, 4 << 20));
        assert!(!mem.contains(1, 4 << 20));
        assert!(!mem.contains(u64::MAX, 2));
        let region = mem.kvm_region(0);
        assert_eq!(region.memory_size, 4 << 20);
        assert_eq!(region.userspace_addr, mem.host_addr());
    }

    #[test]
    fn host_writes_are_recorded_by_page_and_taken_once() {
        let mem = GuestMemory::new(4 << 20).unwrap();
        assert!(mem.take_host_written().is_empty());
        mem.write(0x0fff, b"ab").unwrap(); // pages 0 and 1
        mem.write_obj(0x3f_f000 + 8, 7u64).unwrap(); // the last page
        mem.write(0x10_0000, &[]).unwrap(); // nothing
        let mut buf = [0u8; 8];
        mem.read(0x5000, &mut buf).unwrap(); // reads are not writes
        assert_eq!(mem.take_host_written(), vec![0, 1, 0x3ff]);
        assert!(mem.take_host_written().is_empty());
        // A failed (out of range) write marks nothing inside RAM wrongly.
        assert!(mem.write(4 << 20, b"x").is_err());
        assert!(mem.take_host_written().is_empty());
    }
}
