//! The checkpoint step of a replication epoch (DESIGN.md, "One replication
//! epoch", step 2), with the guest paused as briefly as possible:
//!
//! 1. pause every vCPU;
//! 2. harvest the dirty pages (KVM's log, plus the pages the VMM's own
//!    devices wrote, which KVM never logs);
//! 3. save vCPU, VM and device state;
//! 4. make the dirty pages' contents stable for the encoder: a small
//!    dirty set (at most [`EpochCheckpointer::copy_limit`] pages) is copied
//!    right away, a larger one gets copy-on-write armed over it, so that the
//!    encoder reads exactly this checkpoint's contents while the guest runs
//!    on;
//! 5. re-arm dirty logging for the harvested pages (after step 4: arming
//!    copy-on-write drops KVM's mappings of the protected range, so the
//!    re-arm then has little left to write-protect; at ~19 300 pages of a
//!    1 GiB guest 0.26 instead of ~0.9 ms);
//! 6. resume.
//!
//! Arming copy-on-write costs with the pages KVM has mapped in the
//! protected ranges (~60 ns each here: ~1.1 ms at 20 000 scattered pages
//! of a 1 GiB guest). [`EpochCheckpointer::prearm`], called
//! [`EpochCheckpointer::prearm_lead`] before the checkpoint, moves that
//! out of the pause: it protects the pages written so far in the epoch and
//! the last armed set while the guest runs, and the arm in the pause then
//! protects only the dirty pages outside them and the huge pages the guest
//! wrote in between (the primary does this every epoch).
//!
//! With write-fault prediction on ([`EpochCheckpointer::set_prediction`])
//! a dirty set above the limit is split: its hot pages are copied (arming
//! copy-on-write would write-protect them and bring back the write faults
//! prediction saves: measured, ~4000 faults an epoch either way), the rest
//! gets copy-on-write.
//!
//! Why both: a small dirty set costs less to copy than to arm (1000
//! scattered pages: ~0.5 ms copied, ~0.3 ms armed, and no write faults
//! after the pause); at 20 000 pages the copy (80 MB) costs 50 ms. A
//! pre-armed checkpoint always arms: what is left to arm then costs less
//! than any copy.
//!
//! The encoder reads the pages through [`EpochCheckpoint::view`] and calls
//! [`EpochView::finish`] when done; the next checkpoint needs the previous
//! view finished.

use std::time::{Duration, Instant};

use crate::dirty::cow::{CowError, CowMemory, CowOptions, CowStats, CowView, Prearm};
use crate::dirty::{DirtyError, DirtyPages, DirtyTracker, PredictStats, Prediction};

use super::state::{StateError, VmSnapshot};
use super::vm::{Vm, VmError};

/// Errors of a checkpoint. After one, the VM may be left paused.
#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    /// Pausing or resuming the vCPUs failed.
    #[error("checkpoint: pausing or resuming the vCPUs failed")]
    Vm(#[from] VmError),
    /// The dirty harvest failed.
    #[error("checkpoint: dirty harvest failed")]
    Dirty(#[from] DirtyError),
    /// Saving the state failed.
    #[error("checkpoint: saving the VM state failed")]
    State(#[from] StateError),
    /// Arming copy-on-write failed.
    #[error("checkpoint: arming copy-on-write failed")]
    Cow(#[from] CowError),
}

/// Where the pause time of one checkpoint went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpochTimings {
    /// Until every vCPU was out of `KVM_RUN`.
    pub pause: Duration,
    /// The dirty harvest (KVM log read and re-armed, device pages merged).
    pub harvest: Duration,
    /// vCPU, VM and device state saved.
    pub save: Duration,
    /// Copy-on-write armed over the dirty pages, or the pages copied.
    pub arm: Duration,
    /// Until every vCPU was told to run again.
    pub resume: Duration,
    /// From the pause request to the resume: what the guest lost.
    pub total: Duration,
}

/// One checkpoint: what changed, the saved state, and a stable view of
/// the changed pages' contents at the checkpoint.
#[derive(Debug)]
pub struct EpochCheckpoint {
    /// Guest frame numbers written since the previous checkpoint, sorted,
    /// unique (by the guest or by the VMM's devices).
    pub dirty: Vec<u64>,
    /// The saved vCPU, VM and device state.
    pub state: VmSnapshot,
    /// The checkpoint's contents of the dirty pages, while the guest runs.
    pub view: EpochView,
    /// Pause-time breakdown.
    pub timings: EpochTimings,
}

/// The checkpoint's contents of the dirty pages.
#[derive(Debug)]
pub enum EpochView {
    /// Copied during the pause, in `dirty` order (`PAGE_SIZE` bytes each).
    Copied {
        /// The dirty pages, sorted.
        gfns: Vec<u64>,
        /// Their contents.
        data: Vec<u8>,
    },
    /// Copy-on-write over the live pages.
    Cow(CowView),
    /// With write-fault prediction and a dirty set above the copy limit:
    /// the hot pages copied during the pause (arming copy-on-write over
    /// them would write-protect them again and cost the write faults
    /// prediction saves), the other dirty pages copy-on-write.
    Mixed {
        /// The hot dirty pages, sorted.
        gfns: Vec<u64>,
        /// Their contents.
        data: Vec<u8>,
        /// Copy-on-write over the other dirty pages (`None`: all were hot).
        cow: Option<CowView>,
    },
}

impl EpochView {
    /// The checkpoint's contents of dirty page `gfn`.
    ///
    /// # Errors
    ///
    /// [`CowError::NotInView`] for a page that is not dirty; the copy-on-
    /// write view's errors.
    pub fn read_page(&self, gfn: u64, buf: &mut [u8; 4096]) -> Result<(), CowError> {
        match self {
            EpochView::Copied { gfns, data } => {
                let i = gfns
                    .binary_search(&gfn)
                    .map_err(|_| CowError::NotInView { gfn })?;
                buf.copy_from_slice(&data[i * 4096..(i + 1) * 4096]);
                Ok(())
            }
            EpochView::Cow(v) => v.read_page(gfn, buf).map(|_| ()),
            EpochView::Mixed { gfns, data, cow } => match gfns.binary_search(&gfn) {
                Ok(i) => {
                    buf.copy_from_slice(&data[i * 4096..(i + 1) * 4096]);
                    Ok(())
                }
                Err(_) => match cow {
                    Some(v) => v.read_page(gfn, buf).map(|_| ()),
                    None => Err(CowError::NotInView { gfn }),
                },
            },
        }
    }

    /// Releases the view (un-protects, frees copies); the statistics of a
    /// copy-on-write view.
    pub fn finish(self) -> Option<CowStats> {
        match self {
            EpochView::Copied { .. } => None,
            EpochView::Cow(v) => Some(v.finish()),
            EpochView::Mixed { cow, .. } => cow.map(CowView::finish),
        }
    }
}

/// Dirty sets up to this many pages are copied during the pause (see the
/// module docs; measured on this project's machines).
pub const DEFAULT_COPY_LIMIT: usize = 4096;

/// Copies the pages `gfns` of the paused `vm`; on an error the guest is
/// resumed first.
fn copy_pages(vm: &Vm, gfns: &[u64]) -> Result<Vec<u8>, EpochError> {
    let mut data = vec![0u8; gfns.len() * 4096];
    for (i, &gfn) in gfns.iter().enumerate() {
        if let Err(e) = vm
            .memory()
            .read(gfn * 4096, &mut data[i * 4096..(i + 1) * 4096])
        {
            let _ = vm.resume_all();
            return Err(EpochError::Cow(CowError::Memory(e)));
        }
    }
    Ok(data)
}

/// The sorted union of the sorted lists `a` and `b`, without duplicates.
fn merge_sorted(a: &[u64], b: &[u64]) -> Vec<u64> {
    fn push(out: &mut Vec<u64>, g: u64) {
        if out.last() != Some(&g) {
            out.push(g);
        }
    }
    let mut out = Vec::with_capacity(a.len() + b.len());
    let mut b = b.iter().copied().peekable();
    for &x in a {
        while let Some(y) = b.next_if(|&y| y < x) {
            push(&mut out, y);
        }
        push(&mut out, x);
    }
    for y in b {
        push(&mut out, y);
    }
    out
}

/// Takes checkpoints of one VM.
#[derive(Debug)]
pub struct EpochCheckpointer {
    tracker: DirtyTracker,
    cow: CowMemory,
    pages: DirtyPages,
    /// The dirty set of the last checkpoint that armed copy-on-write over
    /// it: what [`EpochCheckpointer::prearm`] protects for the next one.
    last_cow: Option<Vec<u64>>,
    /// What the last pre-arm took.
    last_prearm: Option<Duration>,
    /// Dirty sets up to this many pages are copied during the pause;
    /// larger ones get copy-on-write (and so does every set after a
    /// [`EpochCheckpointer::prearm`]).
    pub copy_limit: usize,
    /// With write-fault prediction: hot dirty pages are copied during the
    /// pause only up to this many; above it the whole dirty set gets
    /// copy-on-write.
    pub hot_copy_limit: usize,
}

impl EpochCheckpointer {
    /// A checkpointer for `vm` with its dirty `tracker` (from
    /// [`super::run::boot_tracked`] or [`Vm::dirty_tracker`]). Registers
    /// guest memory for copy-on-write.
    ///
    /// # Errors
    ///
    /// [`EpochError::Cow`] when userfaultfd is not available.
    pub fn new(vm: &Vm, tracker: DirtyTracker) -> Result<Self, EpochError> {
        Ok(EpochCheckpointer {
            tracker,
            cow: CowMemory::new(vm.memory().clone())?,
            pages: DirtyPages::default(),
            last_cow: None,
            last_prearm: None,
            copy_limit: DEFAULT_COPY_LIMIT,
            hot_copy_limit: DEFAULT_COPY_LIMIT,
        })
    }

    /// The copy-on-write memory (for statistics).
    pub fn cow(&self) -> &CowMemory {
        &self.cow
    }

    /// Sets how copy-on-write protects and saves pages (benchmarks
    /// compare settings with it).
    pub fn set_cow_options(&mut self, options: CowOptions) {
        self.cow.set_options(options);
    }

    // --- write-fault prediction ---

    /// Turns write-fault prediction on or off for the following
    /// checkpoints (see [`crate::dirty::predict`]): pages dirty in each of
    /// the last `k` checkpoints stay writable and are in every checkpoint's
    /// dirty set until the next re-check. Bitmap dirty mode only.
    ///
    /// # Errors
    ///
    /// [`EpochError::Dirty`] with [`DirtyError::PredictionInRingMode`] or
    /// [`DirtyError::BadPrediction`].
    pub fn set_prediction(&mut self, prediction: Option<Prediction>) -> Result<(), EpochError> {
        Ok(self.tracker.set_prediction(prediction)?)
    }

    /// The prediction counters after the last checkpoint, when on.
    pub fn prediction_stats(&self) -> Option<PredictStats> {
        self.tracker.prediction_stats()
    }

    /// The dirty tracker (mode, last harvest's cost, prediction).
    pub fn tracker(&self) -> &DirtyTracker {
        &self.tracker
    }

    /// With prediction on and hot pages among `dirty` (sorted): those
    /// pages, which the view copies instead of arming copy-on-write. Not
    /// when there are more than [`Self::hot_copy_limit`]: when the guest
    /// writes most of its memory every epoch, every page turns hot, and
    /// copying them all would pause it for as long as copying its memory
    /// (a 1 GiB guest: 0.3-1.7 s measured).
    fn hot_dirty(&self, dirty: &[u64], all: bool) -> Option<Vec<u64>> {
        let p = self.tracker.predictor().filter(|_| !all)?;
        let hot: Vec<u64> = dirty.iter().copied().filter(|&g| p.is_hot(g)).collect();
        (!hot.is_empty() && hot.len() <= self.hot_copy_limit).then_some(hot)
    }

    /// Protects, while the guest runs, the pages the next checkpoint is
    /// expected to arm copy-on-write over (the pages the guest has written
    /// so far in this epoch, read from the dirty log without re-arming it,
    /// and the last checkpoint's armed set), so that the arm in its pause
    /// has only the rest to do (see [`CowMemory::prearm`]). Call it
    /// shortly before the checkpoint: the first write to each pre-armed
    /// huge page in between costs the guest a fault, and the arm protects
    /// that block again.
    ///
    /// With write-fault prediction on, the last armed set is the last
    /// checkpoint's cold dirty pages (its hot ones were copied). Does
    /// nothing (`None`) when a pre-arm is already pending, or when the last
    /// checkpoint copied all its pages and the pages written so far are
    /// few enough to copy too. A pre-armed checkpoint always uses
    /// copy-on-write for what it does not copy as hot, whatever the size
    /// of its dirty set: the arm then costs less than a copy.
    ///
    /// # Errors
    ///
    /// [`EpochError::Cow`], e.g. [`CowError::AlreadyArmed`] when the last
    /// view is not finished. Nothing stays protected then.
    pub fn prearm(&mut self) -> Result<Option<Prearm>, EpochError> {
        if self.cow.is_prearmed() {
            return Ok(None);
        }
        let mut so_far = DirtyPages::default();
        let peeked = self.tracker.peek_into(&mut so_far)?;
        let big = peeked && so_far.len() > self.copy_limit;
        let merged;
        let set: &[u64] = match (&self.last_cow, big) {
            (Some(last), true) => {
                merged = merge_sorted(last, so_far.as_slice());
                &merged
            }
            (Some(last), false) => last,
            (None, true) => so_far.as_slice(),
            (None, false) => return Ok(None),
        };
        if set.is_empty() {
            return Ok(None);
        }
        let p = self.cow.prearm(set)?;
        self.last_prearm = Some(p.time);
        Ok(Some(p))
    }

    /// Un-protects a pending pre-arm (when no checkpoint will follow
    /// soon); false if none was pending.
    pub fn cancel_prearm(&mut self) -> bool {
        self.cow.cancel_prearm()
    }

    /// How long before the checkpoint to call
    /// [`EpochCheckpointer::prearm`]: what the last pre-arm took (1 ms
    /// before the first) plus 1 ms, at most 20 ms. The shorter, the fewer
    /// huge pages the guest writes in between (each costs it a fault and
    /// is protected again in the pause).
    pub fn prearm_lead(&self) -> Duration {
        let took = self.last_prearm.unwrap_or(Duration::from_millis(1));
        (took + Duration::from_millis(1)).min(Duration::from_millis(20))
    }

    /// Takes one checkpoint; the guest is running again when it returns.
    /// The first checkpoint's dirty set is all of guest memory.
    ///
    /// # Errors
    ///
    /// [`EpochError`]; [`EpochError::Cow`] with
    /// [`CowError::AlreadyArmed`] when the previous view is not finished.
    pub fn checkpoint(&mut self, vm: &Vm) -> Result<EpochCheckpoint, EpochError> {
        self.checkpoint_with(vm, false, &mut |_| {})
    }

    /// [`Self::checkpoint`] for replication: `during_pause` runs while the
    /// vCPUs are paused, after the state is saved (to close the epoch of
    /// the devices' held output and disk writes at the same instant), and
    /// with `all` the view covers every page of guest memory (an initial
    /// synchronisation) while `dirty` is still the harvest, so the next
    /// checkpoint's dirty set starts from this one.
    ///
    /// # Errors
    ///
    /// As [`Self::checkpoint`].
    pub fn checkpoint_with(
        &mut self,
        vm: &Vm,
        all: bool,
        during_pause: &mut dyn FnMut(&Vm),
    ) -> Result<EpochCheckpoint, EpochError> {
        let t0 = Instant::now();
        vm.pause_all()?;
        let t_pause = Instant::now();
        // Collected now, re-armed after the copy-on-write arm (see
        // `DirtyTracker::collect_into`).
        self.tracker.collect_into(&mut self.pages)?;
        let mut dirty: Vec<u64> = self.pages.as_slice().to_vec();
        let mut host = vm.memory().take_host_written();
        if let Some(net) = vm.bus().net() {
            host.extend(net.take_written_pages());
        }
        if !host.is_empty() {
            host.sort_unstable();
            dirty = merge_sorted(&dirty, &host);
        }
        let t_harvest = Instant::now();
        let state = match vm.save_state() {
            Ok(s) => s,
            Err(e) => {
                let _ = vm.resume_all();
                return Err(e.into());
            }
        };
        during_pause(vm);
        let t_save = Instant::now();
        let frames = vm.memory().size() / 4096;
        let prearmed = self.cow.is_prearmed();
        let copy = !prearmed
            && if all {
                frames <= self.copy_limit as u64
            } else {
                dirty.len() <= self.copy_limit
            };
        // The pages armed over (`None`: all of memory or nothing), for the
        // next pre-arm.
        let mut armed_set = None;
        let view = if copy {
            let gfns: Vec<u64> = if all {
                (0..frames).collect()
            } else {
                dirty.clone()
            };
            let data = copy_pages(vm, &gfns)?;
            EpochView::Copied { gfns, data }
        } else if let Some(hot) = self.hot_dirty(&dirty, all) {
            // Write-fault prediction: copy the hot pages, copy-on-write
            // the rest.
            let data = copy_pages(vm, &hot)?;
            let cold: Vec<u64> = dirty
                .iter()
                .copied()
                .filter(|g| hot.binary_search(g).is_err())
                .collect();
            // Pre-armed: armed even when empty, which takes the pre-arm
            // over (un-protected when the view is finished).
            let cow = if cold.is_empty() && !prearmed {
                None
            } else {
                match self.cow.arm(&cold) {
                    Ok(v) => Some(v),
                    Err(e) => {
                        let _ = vm.resume_all();
                        return Err(e.into());
                    }
                }
            };
            armed_set = Some(cold);
            EpochView::Mixed {
                gfns: hot,
                data,
                cow,
            }
        } else {
            let armed = if all {
                self.cow.arm_all()
            } else {
                self.cow.arm(&dirty)
            };
            match armed {
                Ok(v) => EpochView::Cow(v),
                Err(e) => {
                    // Do not leave the guest paused on an arming error.
                    let _ = vm.resume_all();
                    return Err(e.into());
                }
            }
        };
        let t_arm = Instant::now();
        if let Err(e) = self.tracker.rearm() {
            drop(view);
            let _ = vm.resume_all();
            return Err(e.into());
        }
        let t_rearm = Instant::now();
        vm.resume_all()?;
        let t_resume = Instant::now();
        self.last_cow = match &view {
            EpochView::Cow(_) if !all => Some(dirty.clone()),
            EpochView::Mixed { .. } => armed_set.filter(|s| !s.is_empty()),
            _ => None,
        };
        Ok(EpochCheckpoint {
            dirty,
            state,
            view,
            timings: EpochTimings {
                pause: t_pause - t0,
                harvest: (t_harvest - t_pause) + (t_rearm - t_arm),
                save: t_save - t_harvest,
                arm: t_arm - t_save,
                resume: t_resume - t_rearm,
                total: t_resume - t0,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn merge_is_the_sorted_union(
            a in proptest::collection::btree_set(0u64..500, 0..200),
            b in proptest::collection::vec(0u64..500, 0..200),
        ) {
            let mut b = b;
            b.sort_unstable();
            let av: Vec<u64> = a.iter().copied().collect();
            let want: Vec<u64> = a.iter().copied().chain(b.iter().copied())
                .collect::<std::collections::BTreeSet<_>>().into_iter().collect();
            prop_assert_eq!(super::merge_sorted(&av, &b), want);
        }
    }
}
