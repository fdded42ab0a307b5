//! Dirty tracking: which guest pages the vCPUs wrote since the last
//! checkpoint, behind one interface over two KVM mechanisms.
//!
//! * [`DirtyMode::Bitmap`]: `KVM_MEM_LOG_DIRTY_PAGES` with
//!   `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`. A harvest reads the bitmap
//!   (`KVM_GET_DIRTY_LOG`, which then does not clear it) and re-protects
//!   exactly the pages it returns (`KVM_CLEAR_DIRTY_LOG`). Its cost grows
//!   with guest RAM (the bitmap is walked) and with the dirty pages.
//! * [`DirtyMode::Ring`]: the per-vCPU dirty ring
//!   (`KVM_CAP_DIRTY_LOG_RING_ACQ_REL`). A harvest reads the rings' new
//!   entries and resets them (`KVM_RESET_DIRTY_RINGS`). Its cost grows with
//!   the dirty pages only. A vCPU whose ring fills leaves `KVM_RUN` with
//!   `KVM_EXIT_DIRTY_RING_FULL`; its thread drains the ring into a pending
//!   list ([`DirtyRings::drain_full`]) and runs on, and the next harvest
//!   returns those pages too.
//!
//! Both give the same answer: [`DirtyTracker::harvest`], called while every
//! vCPU is paused, returns the sorted, de-duplicated guest frame numbers
//! written by the guest since the previous harvest, and re-arms tracking
//! for them. **The first harvest returns every page of guest RAM** in both
//! modes: the VMM wrote the boot image through its own mapping, which KVM
//! never logs, so the first checkpoint must be a full one.
//!
//! Writes the VMM makes through its own mapping of guest memory (devices
//! filling guest buffers) are never logged by KVM in either mode; whoever
//! makes them must report those pages separately.
//!
//! Costs on this project's machines (PVM, 1 GiB guest, from
//! `cargo test -p tests --test e2e dirty::harvest_cost -- --ignored
//! --nocapture`): with ~1k dirty pages both modes take 0.2-0.4 ms a
//! harvest, almost all of it re-arming; with ~20k the bitmap takes ~1 ms
//! and the ring 3.5-12 ms (`KVM_RESET_DIRTY_RINGS` write-protects scattered
//! pages one entry at a time). The bitmap is the cheaper mode here.
//!
//! `KVM_RESET_DIRTY_RINGS` must not be interrupted by a signal: KVM then
//! returns success but leaves pages unprotected, and their next writes are
//! lost. [`kvm::reset_dirty_rings`] blocks signals around the ioctl.
//!
//! Setting up (see [`crate::vmm::Vm::enable_dirty_log`]): enable the mode
//! after `Vm::new` and before `Vm::create_vcpus` (the ring must exist before
//! any vCPU), then take the tracker with `Vm::dirty_tracker` once the vCPUs
//! exist. Reading the dirty pages' contents is
//! [`crate::vmm::GuestMemory`]'s job; reading them *as they were at the
//! checkpoint* while the guest runs on is [`cow`]'s (userfaultfd
//! write-protect).

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;

pub mod cow;
pub mod kvm;
pub mod pages;
pub mod predict;
pub mod ring;

pub use pages::DirtyPages;
pub use predict::{PredictStats, Prediction, Predictor};
pub use ring::{DirtyRing, DirtyRings};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// The memory slot that holds all of guest RAM.
pub const SLOT: u32 = 0;

/// How dirty pages are tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyMode {
    /// KVM's dirty bitmap with manual protect (`KVM_CLEAR_DIRTY_LOG`).
    Bitmap,
    /// The per-vCPU dirty ring.
    Ring {
        /// Entries per vCPU ring: a power of two, 256..=65536 (16 bytes
        /// each). A ring smaller than an epoch's dirty pages still works
        /// (full rings are drained by the vCPU threads) but costs exits.
        entries: u32,
    },
}

impl Default for DirtyMode {
    fn default() -> Self {
        DirtyMode::Ring { entries: 65536 }
    }
}

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// KVM lacks a capability the mode needs.
    #[error("KVM lacks {0}")]
    Unsupported(&'static str),
    /// A dirty-logging ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        /// The ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A dirty-ring size KVM would refuse.
    #[error("dirty ring of {entries} entries: need a power of two in {min}..={max}")]
    RingSize {
        /// The size asked for.
        entries: u32,
        /// Fewest entries (one page).
        min: u32,
        /// Most entries KVM allows.
        max: u32,
    },
    /// `KVM_CLEAR_DIRTY_LOG`'s first page is not a multiple of 64.
    #[error("KVM_CLEAR_DIRTY_LOG first_page {first_page} is not a multiple of 64")]
    Misaligned {
        /// The page asked for.
        first_page: u64,
    },
    /// A bitmap too small for the pages it must describe.
    #[error("dirty bitmap of {words} words is too small for {pages} pages")]
    BitmapTooSmall {
        /// Its length in 64-bit words.
        words: usize,
        /// The pages it must cover.
        pages: u64,
    },
    /// Mapping a vCPU's dirty ring failed.
    #[error("cannot map the dirty ring of vCPU {vcpu}")]
    MapRing {
        /// The vCPU.
        vcpu: u32,
        /// What mmap said.
        #[source]
        source: std::io::Error,
    },
    /// A ring entry names a page outside guest RAM.
    #[error(
        "vCPU {vcpu}'s dirty ring has an entry for slot {slot} page {offset}, outside guest RAM"
    )]
    RingEntry {
        /// The vCPU.
        vcpu: u32,
        /// The slot in the entry.
        slot: u32,
        /// The page offset in the entry.
        offset: u64,
    },
    /// A vCPU without a ring.
    #[error("vCPU {vcpu} has no dirty ring")]
    NoRing {
        /// The vCPU.
        vcpu: u32,
    },
    /// Duplicating the VM fd failed.
    #[error("cannot duplicate the VM fd")]
    DupFd(#[source] std::io::Error),
    // --- write-fault prediction ---
    /// Write-fault prediction needs the bitmap mode.
    #[error(
        "write-fault prediction is not supported in dirty-ring mode (the ring re-protects every page it reports); use the bitmap mode"
    )]
    PredictionInRingMode,
    /// Prediction settings out of range.
    #[error(
        "write-fault prediction k={k} recheck_every={recheck_every}: need k in 1..={max_k} and recheck_every >= 1"
    )]
    BadPrediction {
        /// Harvests a page must be dirty in.
        k: u32,
        /// The re-check period.
        recheck_every: u32,
        /// Largest k.
        max_k: u32,
    },
}

/// Duplicates the VM fd, so that a tracker or the rings can issue VM
/// ioctls without borrowing the `Vm`.
///
/// # Errors
///
/// [`DirtyError::DupFd`].
pub fn dup_vm_fd(vm: &VmFd) -> Result<OwnedFd, DirtyError> {
    // SAFETY: the fd is open for as long as `vm` is borrowed, which covers
    // this call; the duplicate is independent of it.
    let fd = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
    fd.try_clone_to_owned().map_err(DirtyError::DupFd)
}

/// Turns on the KVM side of `mode` before the slot gets
/// `KVM_MEM_LOG_DIRTY_PAGES`: manual protect for the bitmap, the ring
/// capability for the ring (which must precede vCPU creation).
///
/// # Errors
///
/// As [`kvm::enable_manual_protect`] and [`kvm::enable_dirty_ring`].
pub fn enable(vm: &VmFd, mode: DirtyMode) -> Result<(), DirtyError> {
    match mode {
        DirtyMode::Bitmap => kvm::enable_manual_protect(vm),
        DirtyMode::Ring { entries } => kvm::enable_dirty_ring(vm, entries),
    }
}

/// What the last [`DirtyTracker::harvest`] cost.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HarvestStats {
    /// Reading the log (`KVM_GET_DIRTY_LOG` and the bitmap walk, or the
    /// rings' entries) and building the sorted page list.
    pub collect: std::time::Duration,
    /// Re-arming tracking (`KVM_CLEAR_DIRTY_LOG` or `KVM_RESET_DIRTY_RINGS`).
    pub rearm: std::time::Duration,
    /// Ring mode: entries read (duplicates included); bitmap mode: pages.
    pub entries: usize,
    /// Pages returned.
    pub pages: usize,
}

/// Harvests the pages the guest dirtied. Made by
/// [`crate::vmm::Vm::dirty_tracker`].
#[derive(Debug)]
pub struct DirtyTracker {
    mode: DirtyMode,
    vm: OwnedFd,
    pages: u64,
    rings: Option<Arc<DirtyRings>>,
    /// Bitmap mode: the bitmap `KVM_GET_DIRTY_LOG` fills, reused.
    bitmap: Vec<u64>,
    /// Ring mode: unsorted entries, reused.
    scratch: Vec<u64>,
    harvests: u64,
    /// A collection awaits its [`DirtyTracker::rearm`].
    rearm_pending: bool,
    last: HarvestStats,
    /// Bitmap mode: write-fault prediction, when on.
    predictor: Option<Predictor>,
    /// Bitmap mode with prediction: the bits to clear, reused.
    clear: Vec<u64>,
    /// Bitmap mode: the bitmap [`DirtyTracker::peek_into`] reads, reused.
    peek: Vec<u64>,
}

impl DirtyTracker {
    /// A tracker for slot 0 of `pages` pages. `rings` must be given in
    /// ring mode (all vCPUs' rings).
    ///
    /// # Errors
    ///
    /// [`DirtyError::DupFd`]; [`DirtyError::NoRing`] in ring mode without
    /// rings.
    pub fn new(
        vm: &VmFd,
        mode: DirtyMode,
        pages: u64,
        rings: Option<Arc<DirtyRings>>,
    ) -> Result<Self, DirtyError> {
        if matches!(mode, DirtyMode::Ring { .. }) && rings.as_ref().is_none_or(|r| r.is_empty()) {
            return Err(DirtyError::NoRing { vcpu: 0 });
        }
        Ok(DirtyTracker {
            mode,
            vm: dup_vm_fd(vm)?,
            pages,
            rings,
            bitmap: match mode {
                DirtyMode::Bitmap => vec![0; kvm::bitmap_words(pages)],
                DirtyMode::Ring { .. } => Vec::new(),
            },
            scratch: Vec::new(),
            harvests: 0,
            rearm_pending: false,
            last: HarvestStats::default(),
            predictor: None,
            clear: Vec::new(),
            peek: Vec::new(),
        })
    }

    /// The mode.
    pub fn mode(&self) -> DirtyMode {
        self.mode
    }

    /// Pages of guest RAM.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Ring mode: how many full-ring exits the vCPU threads handled so far.
    pub fn ring_full_exits(&self) -> u64 {
        self.rings.as_ref().map_or(0, |r| r.full_exits())
    }

    /// The pages written since the previous harvest (the first harvest:
    /// every page), sorted and de-duplicated; tracking is re-armed for them.
    /// Call while every vCPU is paused.
    ///
    /// # Errors
    ///
    /// [`DirtyError`] from the failing ioctl or a bad ring entry.
    pub fn harvest(&mut self) -> Result<DirtyPages, DirtyError> {
        let mut out = DirtyPages::default();
        self.harvest_into(&mut out)?;
        Ok(out)
    }

    /// [`DirtyTracker::harvest`] into `out` (replaced), reusing its
    /// allocation.
    ///
    /// # Errors
    ///
    /// As [`DirtyTracker::harvest`].
    pub fn harvest_into(&mut self, out: &mut DirtyPages) -> Result<(), DirtyError> {
        self.collect_into(out)?;
        self.rearm()
    }

    /// The pages the guest has written since the previous harvest so far,
    /// read while it runs, without re-arming anything (the next harvest
    /// returns them again): what the next checkpoint's dirty set will
    /// mostly be. Bitmap mode only; false (and `out` left alone) in ring
    /// mode and before the first harvest. With prediction on, the hot
    /// pages are not among them (KVM does not log them).
    ///
    /// # Errors
    ///
    /// [`DirtyError`] from `KVM_GET_DIRTY_LOG`.
    pub fn peek_into(&mut self, out: &mut DirtyPages) -> Result<bool, DirtyError> {
        if !matches!(self.mode, DirtyMode::Bitmap) || self.harvests == 0 {
            return Ok(false);
        }
        self.peek.resize(kvm::bitmap_words(self.pages), 0);
        kvm::get_dirty_log(&self.vm, SLOT, self.pages, &mut self.peek)?;
        out.set_from_bitmap(&self.peek, self.pages);
        Ok(true)
    }

    /// The first half of [`DirtyTracker::harvest_into`]: reads the pages
    /// written since the previous harvest into `out`, without re-arming
    /// tracking for them. [`DirtyTracker::rearm`] must follow before the
    /// vCPUs run again. If it did not (a checkpoint failed in between),
    /// bitmap mode returns those pages again (their bits are still set);
    /// ring mode re-arms them first and loses them, as a failed
    /// [`DirtyTracker::harvest`] does.
    ///
    /// Splitting the two lets a checkpoint write-protect guest memory for
    /// copy-on-write in between: under shadow paging that protection drops
    /// the guest's mappings of the whole range, after which re-arming the
    /// log finds nothing left to write-protect and costs far less.
    ///
    /// # Errors
    ///
    /// As [`DirtyTracker::harvest`].
    pub fn collect_into(&mut self, out: &mut DirtyPages) -> Result<(), DirtyError> {
        if self.rearm_pending && matches!(self.mode, DirtyMode::Ring { .. }) {
            self.rearm()?;
        }
        let t0 = Instant::now();
        let entries = match self.mode {
            DirtyMode::Bitmap => {
                kvm::get_dirty_log(&self.vm, SLOT, self.pages, &mut self.bitmap)?;
                out.set_from_bitmap(&self.bitmap, self.pages);
                if let Some(p) = self.predictor.as_mut().filter(|_| self.harvests > 0) {
                    // What to clear: all but the hot pages. The first
                    // harvest (every page) is no observation of the guest:
                    // it is cleared in full.
                    p.observe(&self.bitmap, &mut self.clear);
                }
                out.len()
            }
            DirtyMode::Ring { .. } => {
                let rings = self.rings.as_ref().ok_or(DirtyError::NoRing { vcpu: 0 })?;
                self.scratch.clear();
                rings.collect(&mut self.scratch)?;
                let entries = self.scratch.len();
                if self.harvests == 0 {
                    // Pages the VMM wrote before the guest ran were never
                    // logged: the first checkpoint is all of RAM.
                    self.scratch.clear();
                    out.set_all(self.pages);
                } else {
                    out.set_unsorted(&mut self.scratch);
                }
                entries
            }
        };
        self.last = HarvestStats {
            collect: t0.elapsed(),
            rearm: Duration::ZERO,
            entries,
            pages: out.len(),
        };
        self.rearm_pending = true;
        Ok(())
    }

    /// The second half of [`DirtyTracker::harvest_into`]: re-arms tracking
    /// for the pages the last [`DirtyTracker::collect_into`] returned
    /// (with prediction on, all but the hot ones). Does nothing when
    /// nothing is pending.
    ///
    /// # Errors
    ///
    /// [`DirtyError`] from the failing ioctl; the re-arm stays pending.
    pub fn rearm(&mut self) -> Result<(), DirtyError> {
        if !self.rearm_pending {
            return Ok(());
        }
        let first = self.harvests == 0;
        let t0 = Instant::now();
        match self.mode {
            DirtyMode::Bitmap if self.predictor.is_some() && !first => {
                clear_span(&self.vm, self.pages, &self.clear)?;
            }
            DirtyMode::Bitmap => self.clear_bitmap()?,
            DirtyMode::Ring { .. } => {
                let rings = self.rings.as_ref().ok_or(DirtyError::NoRing { vcpu: 0 })?;
                rings.rearm()?;
            }
        }
        self.last.rearm = t0.elapsed();
        self.rearm_pending = false;
        self.harvests += 1;
        Ok(())
    }

    /// What the last harvest cost.
    pub fn last_stats(&self) -> HarvestStats {
        self.last
    }

    /// Clears the bits of `self.bitmap` in KVM and re-protects their pages.
    fn clear_bitmap(&mut self) -> Result<(), DirtyError> {
        clear_span(&self.vm, self.pages, &self.bitmap)
    }

    // --- write-fault prediction (see [`predict`]) ---

    /// Turns write-fault prediction on (`Some`, with a fresh history) or
    /// off (`None`: the next harvest re-protects every page it returns).
    /// Bitmap mode only.
    ///
    /// # Errors
    ///
    /// [`DirtyError::PredictionInRingMode`]; [`DirtyError::BadPrediction`].
    pub fn set_prediction(&mut self, prediction: Option<Prediction>) -> Result<(), DirtyError> {
        let Some(cfg) = prediction else {
            self.predictor = None;
            return Ok(());
        };
        if !matches!(self.mode, DirtyMode::Bitmap) {
            return Err(DirtyError::PredictionInRingMode);
        }
        if !cfg.is_valid() {
            return Err(DirtyError::BadPrediction {
                k: cfg.k,
                recheck_every: cfg.recheck_every,
                max_k: predict::MAX_K,
            });
        }
        tracing::info!(
            k = cfg.k,
            recheck_every = cfg.recheck_every,
            "write-fault prediction on"
        );
        self.predictor = Some(Predictor::new(cfg, self.pages));
        Ok(())
    }

    /// The prediction settings, when on.
    pub fn prediction(&self) -> Option<Prediction> {
        self.predictor.as_ref().map(Predictor::config)
    }

    /// The prediction counters, when on.
    pub fn prediction_stats(&self) -> Option<PredictStats> {
        self.predictor.as_ref().map(Predictor::stats)
    }

    /// The predictor, when on (hot set, counters).
    pub fn predictor(&self) -> Option<&Predictor> {
        self.predictor.as_ref()
    }
}

/// Clears the bits of `bitmap` (one bit per page of slot 0's `pages`) in
/// KVM and re-protects their pages.
fn clear_span(vm: &OwnedFd, pages: u64, bitmap: &[u64]) -> Result<(), DirtyError> {
    // Clear (and re-protect) only the span of words that has bits: the
    // kernel walks every word of the range it is given.
    let Some(first) = bitmap.iter().position(|&w| w != 0) else {
        return Ok(());
    };
    let last = bitmap.iter().rposition(|&w| w != 0).unwrap_or(first);
    let first_page = first as u64 * 64;
    let end = ((last as u64 + 1) * 64).min(pages);
    let num_pages = u32::try_from(end - first_page).map_err(|_| DirtyError::BitmapTooSmall {
        words: bitmap.len(),
        pages: end - first_page,
    })?;
    kvm::clear_dirty_log(vm, SLOT, first_page, num_pages, &bitmap[first..=last])
}

#[cfg(test)]
mod tests;
