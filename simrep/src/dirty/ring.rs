//! The KVM dirty ring: one ring of `struct kvm_dirty_gfn` per vCPU, mapped
//! from the vCPU fd at page offset `KVM_DIRTY_LOG_PAGE_OFFSET`.
//!
//! KVM pushes an entry (slot, page offset within the slot) the first time a
//! vCPU writes a write-protected page and publishes it by setting
//! `KVM_DIRTY_GFN_F_DIRTY` in its flags with release semantics. Userspace
//! reads entries in order from its own fetch index, loading the flags with
//! acquire, and hands each entry back by storing `KVM_DIRTY_GFN_F_RESET`
//! with release; `KVM_RESET_DIRTY_RINGS` then recycles the handed-back
//! entries and write-protects their pages again. A page can appear more than
//! once (ENVIRONMENT.md measured duplicates), so callers de-duplicate.
//!
//! When a ring fills up to its soft limit the vCPU leaves `KVM_RUN` with
//! `KVM_EXIT_DIRTY_RING_FULL`; [`DirtyRings::drain_full`] is what the vCPU
//! thread calls then: it moves its ring's entries into a pending list that
//! the next harvest returns, resets, and lets the vCPU continue.

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_dirty_gfn, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::VcpuFd;

use super::{kvm, DirtyError};

/// `KVM_DIRTY_GFN_F_DIRTY`: KVM published the entry.
const GFN_F_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: userspace collected the entry.
const GFN_F_RESET: u32 = 2;

/// One vCPU's dirty ring, mapped from its vCPU fd.
#[derive(Debug)]
pub struct DirtyRing {
    vcpu: u32,
    ptr: NonNull<kvm_dirty_gfn>,
    entries: u32,
    /// The next entry to read (free-running; the slot is `fetch % entries`).
    fetch: u32,
}

// SAFETY: the mapping is plain shared memory owned by this value (unmapped
// in `Drop`); every access goes through `&mut self` or atomics, so moving
// it to another thread or sharing it behind a `Mutex` is sound.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of `vcpu_fd` (vCPU `vcpu`), which has `entries`
    /// entries (the size given to [`kvm::enable_dirty_ring`]).
    ///
    /// # Errors
    ///
    /// [`DirtyError::MapRing`] when `mmap` fails (no ring enabled, wrong
    /// size).
    pub fn map(vcpu_fd: &impl AsRawFd, vcpu: u32, entries: u32) -> Result<Self, DirtyError> {
        let len = entries as usize * kvm::DIRTY_GFN_SIZE as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as libc::off_t;
        // SAFETY: a fresh shared mapping of the vCPU fd at the offset KVM
        // documents for the dirty ring; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd.as_raw_fd(),
                libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(DirtyError::MapRing {
                vcpu,
                source: std::io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(addr.cast()).ok_or(DirtyError::MapRing {
            vcpu,
            source: std::io::Error::from_raw_os_error(libc::EFAULT),
        })?;
        Ok(DirtyRing {
            vcpu,
            ptr,
            entries,
            fetch: 0,
        })
    }

    /// The flags word of entry `i`, as an atomic.
    fn flags(&self, i: u32) -> &AtomicU32 {
        // SAFETY: `i < entries`, so the entry lies in the mapping, which
        // lives as long as `self`; `flags` is the first, 4-byte aligned
        // field of a `kvm_dirty_gfn`, and KVM and userspace access it only
        // atomically (that is the ring's protocol).
        unsafe { AtomicU32::from_ptr(&raw mut (*self.ptr.as_ptr().add(i as usize)).flags) }
    }

    /// Collects every published entry into `out` as page numbers within
    /// the slot (checked against `pages`, the slot's size), marks each
    /// collected, and returns how many it collected. The entries go back to
    /// KVM at the next [`kvm::reset_dirty_rings`].
    ///
    /// # Errors
    ///
    /// [`DirtyError::RingEntry`] for an entry outside slot 0's pages (the
    /// VMM has one slot).
    pub fn harvest(&mut self, pages: u64, out: &mut Vec<u64>) -> Result<usize, DirtyError> {
        let mut n = 0;
        loop {
            let i = self.fetch % self.entries;
            let flags = self.flags(i);
            if flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
                return Ok(n);
            }
            // SAFETY: entry `i` is in the mapping; the acquire load above
            // makes KVM's writes of `slot` and `offset` visible, and KVM does
            // not touch the entry again until it is reset.
            let (slot, offset) = unsafe {
                let e = self.ptr.as_ptr().add(i as usize);
                (
                    std::ptr::read_volatile(&raw const (*e).slot),
                    std::ptr::read_volatile(&raw const (*e).offset),
                )
            };
            if slot != 0 || offset >= pages {
                return Err(DirtyError::RingEntry {
                    vcpu: self.vcpu,
                    slot,
                    offset,
                });
            }
            out.push(offset);
            flags.store(GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * kvm::DIRTY_GFN_SIZE as usize;
        // SAFETY: unmaps exactly the mapping `map` created; nothing else
        // refers to it once `self` is dropped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), len) };
    }
}

/// The rings of all vCPUs of a VM, shared between the [`super::DirtyTracker`]
/// and the vCPU threads (which drain their own ring when it fills).
#[derive(Debug)]
pub struct DirtyRings {
    /// A duplicate of the VM fd, for `KVM_RESET_DIRTY_RINGS`.
    vm: OwnedFd,
    rings: Vec<Mutex<DirtyRing>>,
    /// Entries collected by vCPU threads on a full ring, not yet harvested.
    pending: Mutex<Vec<u64>>,
    pages: u64,
    full_exits: AtomicU64,
}

impl DirtyRings {
    /// Maps the ring of every vCPU in `vcpus` (index = vCPU id). `vm` is a
    /// duplicate of the VM fd; `pages` the size of slot 0.
    ///
    /// # Errors
    ///
    /// [`DirtyError::MapRing`].
    pub fn map(
        vm: OwnedFd,
        vcpus: &[VcpuFd],
        entries: u32,
        pages: u64,
    ) -> Result<Self, DirtyError> {
        let rings = (0u32..)
            .zip(vcpus)
            .map(|(id, fd)| DirtyRing::map(fd, id, entries).map(Mutex::new))
            .collect::<Result<_, _>>()?;
        Ok(DirtyRings {
            vm,
            rings,
            pending: Mutex::new(Vec::new()),
            pages,
            full_exits: AtomicU64::new(0),
        })
    }

    /// Number of rings (vCPUs).
    pub fn len(&self) -> usize {
        self.rings.len()
    }

    /// Whether there are no rings.
    pub fn is_empty(&self) -> bool {
        self.rings.is_empty()
    }

    /// How many `KVM_EXIT_DIRTY_RING_FULL` exits the vCPU threads handled.
    pub fn full_exits(&self) -> u64 {
        self.full_exits.load(Ordering::Relaxed)
    }

    /// Called by vCPU `vcpu`'s thread on `KVM_EXIT_DIRTY_RING_FULL`: moves
    /// the ring's entries to the pending list and resets the rings, so the
    /// vCPU can run on. Nothing is lost: the next harvest returns them.
    ///
    /// # Errors
    ///
    /// [`DirtyError::RingEntry`] for a bad entry; [`DirtyError::Ioctl`]
    /// when the reset fails; [`DirtyError::NoRing`] for an unknown vCPU.
    pub fn drain_full(&self, vcpu: u32) -> Result<(), DirtyError> {
        let ring = self
            .rings
            .get(vcpu as usize)
            .ok_or(DirtyError::NoRing { vcpu })?;
        let n = {
            let mut pending = lock(&self.pending);
            lock(ring).harvest(self.pages, &mut pending)?
        };
        kvm::reset_dirty_rings(&self.vm)?;
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            vcpu,
            entries = n,
            "dirty ring full: drained into the pending set"
        );
        Ok(())
    }

    /// Collects the pending entries and every ring's published entries
    /// into `out` (unsorted, with duplicates), then resets the rings.
    /// Call with all vCPUs paused, so that no page is written between the
    /// collection and the reset.
    ///
    /// # Errors
    ///
    /// As [`DirtyRings::drain_full`].
    pub fn harvest(&self, out: &mut Vec<u64>) -> Result<(), DirtyError> {
        self.collect(out)?;
        self.rearm()
    }

    /// The first half of [`DirtyRings::harvest`]: the pending entries and
    /// every ring's published entries into `out`, each handed back to KVM.
    ///
    /// # Errors
    ///
    /// [`DirtyError::RingEntry`] for a bad entry.
    pub fn collect(&self, out: &mut Vec<u64>) -> Result<(), DirtyError> {
        out.append(&mut lock(&self.pending));
        for ring in &self.rings {
            lock(ring).harvest(self.pages, out)?;
        }
        Ok(())
    }

    /// The second half of [`DirtyRings::harvest`]: `KVM_RESET_DIRTY_RINGS`,
    /// which write-protects the handed-back pages again. Done even when the
    /// rings had nothing new: it costs one VM ioctl and guarantees that no
    /// entry is left handed back but not re-armed when the guest resumes.
    ///
    /// # Errors
    ///
    /// [`DirtyError::Ioctl`].
    pub fn rearm(&self) -> Result<(), DirtyError> {
        kvm::reset_dirty_rings(&self.vm).map(|_| ())
    }
}

/// Locks `m`; a poisoned lock (a vCPU thread panicked while holding it)
/// still holds consistent data, because every update is a push or a
/// counter bump, so it is used as is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
