//! A copy-on-write view of guest memory, built on userfaultfd write-protect.
//!
//! At a checkpoint, with the vCPUs paused, [`CowMemory::arm_all`] (or
//! [`CowMemory::arm`] for a set of pages) write-protects guest memory and
//! returns a [`CowView`]. The guest is resumed at once. The first write to a
//! protected page — a vCPU inside `KVM_RUN` (KVM's `get_user_pages` raises
//! the fault) or any host thread — blocks in the kernel while the handler
//! thread copies the still unchanged 4 KiB page into a side store and then
//! removes the protection, which wakes the writer. Where few pages of the
//! view are left protected in the huge page (2 MiB) around it, the handler
//! saves them all and un-protects the whole block instead
//! ([`CowOptions::block_copy_max`]): un-protecting one 4 KiB page would
//! split the huge page for good and make every later arm dearer. Readers call
//! [`CowView::read_page`] from any number of threads and get the page as it
//! was at the checkpoint: the saved copy if the guest wrote the page since,
//! else the live page. [`CowView::release`] drops a page the reader is done
//! with (its copy, or its protection); [`CowView::finish`] (or dropping the
//! view) un-protects what is left, frees every copy and returns the
//! epoch's [`CowStats`], after which the next checkpoint can arm again.
//!
//! The pause can be shortened further: [`CowMemory::prearm`] protects the
//! expected dirty pages shortly before the checkpoint, while the guest
//! still runs (a write in between faults once per huge page, which is
//! noted and un-protected without a copy), and the arm then protects only
//! what is left: pages outside the pre-armed ranges and in the huge pages
//! written since.
//!
//! The side store never holds more copies than the view's pages in the
//! huge pages the guest wrote while the view was open (minus those
//! released early), and never more than the view's pages; the stats
//! report the peak. `mprotect` is never used: under PVM it breaks `KVM_RUN`
//! (`ENVIRONMENT.md`).
//!
//! # Page states and memory ordering
//!
//! Every guest page has one `AtomicU32` word: the epoch of the view that
//! last changed it (bits 2..) and its state in that epoch (bits 0..2):
//! protected, saved or released. A word of an older epoch means
//! "protected" when the view covers all of memory, and "not in the view"
//! otherwise, so arming all of memory writes no per-page state.
//!
//! The handler saves a page under the store lock: it copies the page (still
//! write-protected, so nobody can change it), moves the word from protected
//! to saved with a compare-and-swap (AcqRel), inserts the copy, and only
//! after unlocking un-protects the page (or its block, once every page of
//! the view still protected in it is saved). A reader of a protected page copies
//! the live page, issues an acquire fence and reloads the word (the seqlock
//! read of `crossbeam`'s `AtomicCell`): if the word is unchanged, no
//! un-protect can have happened before the reload — every un-protect
//! (handler, [`CowView::release`], closing the view) is sequenced after a
//! change of the word or of the open epoch — so no writer can have touched
//! the page before or during the copy, and the copy is the checkpoint
//! image. The fence keeps the reload after the copy's loads; a writer's
//! store that the copy might have seen is ordered after the word change by
//! the kernel (the write can only happen after the un-protect ioctl that
//! follows the change). If the word changed, the reader takes the saved copy
//! under the lock instead, so a page being saved concurrently is never read
//! torn.
//!
//! # Deadlock freedom
//!
//! The handler thread never writes guest memory and never waits on a lock
//! that a writer could hold while faulting: it takes only the store lock,
//! which no holder keeps across a guest-memory write.

mod uffd;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vmm::memory::{GuestMemory, MemoryError};

use self::uffd::{Uffd, UffdMsg, EVENT_PAGEFAULT, FEATURE_WP_UNPOPULATED, PAGEFAULT_FLAG_WP};

/// Bytes of one page of the view.
pub const PAGE_SIZE: usize = 4096;
const PAGE: u64 = PAGE_SIZE as u64;

/// Word state: armed, not written since the checkpoint (or not yet saved).
const PROTECTED: u32 = 1;
/// Word state: the handler holds a copy of the checkpoint content.
const SAVED: u32 = 2;
/// Word state: the reader released the page.
const RELEASED: u32 = 3;
/// Pages in a huge page (2 MiB): the handler un-protects whole blocks of
/// this many pages where it can.
const HUGE_PAGE_PAGES: u64 = 512;
/// Pages [`CowMemory::prearm`] protects with one ioctl (16 MiB): the
/// guest runs between pieces.
const PREARM_PIECE: u64 = 4096;
/// Effective state of a page that is not part of the open view.
const IDLE: u32 = 0;
/// The largest epoch a word can carry (30 bits); then all words reset.
const MAX_EPOCH: u32 = (1 << 30) - 1;

/// Errors of the copy-on-write view.
#[derive(Debug, thiserror::Error)]
pub enum CowError {
    /// The `userfaultfd` syscall or its API handshake failed.
    #[error("cannot open a userfaultfd with write-protect support (needs CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1, and Linux >= 5.7)")]
    Open(#[source] io::Error),
    /// Registering guest memory for write-protect failed.
    #[error("cannot register guest memory {host_addr:#x} (+{len:#x}) with userfaultfd write-protect (anonymous THP memory needs Linux >= 5.7)")]
    Register {
        /// Host address of the range.
        host_addr: u64,
        /// Its length in bytes.
        len: u64,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// `UFFDIO_WRITEPROTECT` failed.
    #[error("cannot {} guest pages {gfn:#x}..+{pages}", if *.protect { "write-protect" } else { "un-protect" })]
    WriteProtect {
        /// First guest frame.
        gfn: u64,
        /// Number of pages.
        pages: u64,
        /// Protect (true) or un-protect.
        protect: bool,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Starting the fault handler thread failed.
    #[error("cannot start the copy-on-write fault handler thread")]
    Spawn(#[source] io::Error),
    /// A view is already open: finish it before arming again.
    #[error("a copy-on-write view (epoch {epoch}) is still open")]
    AlreadyArmed {
        /// The open view's epoch.
        epoch: u32,
    },
    /// A guest frame number beyond guest memory.
    #[error("guest frame {gfn:#x} is outside guest memory ({pages} pages)")]
    OutOfRange {
        /// The frame asked for.
        gfn: u64,
        /// Pages of guest memory.
        pages: u64,
    },
    /// The page was not armed in this view.
    #[error("guest frame {gfn:#x} is not part of the copy-on-write view")]
    NotInView {
        /// The frame asked for.
        gfn: u64,
    },
    /// The page was released from this view.
    #[error("guest frame {gfn:#x} was already released from the copy-on-write view")]
    Released {
        /// The frame asked for.
        gfn: u64,
    },
    /// The view was closed under the reader (its [`CowMemory`] was dropped).
    #[error("the copy-on-write view of epoch {epoch} is closed")]
    Closed {
        /// The view's epoch.
        epoch: u32,
    },
    /// Reading guest memory failed.
    #[error("cannot read guest memory")]
    Memory(#[from] MemoryError),
}

/// Where [`CowView::read_page`] found the checkpoint content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageSource {
    /// The live page: not written since the checkpoint.
    Live,
    /// The copy the handler saved before the first write.
    Saved,
}

/// What one copy-on-write epoch cost, for the replication log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CowStats {
    /// The view's epoch (1, 2, ...).
    pub epoch: u32,
    /// Pages armed (write-protected at the checkpoint).
    pub armed_pages: u64,
    /// Pages write-protected by the arm: the armed pages plus the gaps
    /// that [`CowOptions`] merged into larger ranges (a write to such a
    /// page faults once and is un-protected without a copy). After a
    /// pre-arm, only the pages it had not protected or that were written
    /// since (rounded out the same way).
    pub protected_pages: u64,
    /// Time [`CowMemory::arm`] took (state set-up plus the ioctls).
    pub arm_time: Duration,
    /// Pages [`CowMemory::prearm`] protected ahead of the checkpoint (0:
    /// the view was armed without one).
    pub prearmed_pages: u64,
    /// Time the pre-arm took (while the guest ran).
    pub prearm_time: Duration,
    /// Write faults between the pre-arm and the checkpoint: each
    /// un-protected one huge page (2 MiB) without a copy, which the arm
    /// protected again.
    pub prearm_faults: u64,
    /// Write-protect faults handled while the view was open (duplicates and
    /// faults on released pages included).
    pub faults: u64,
    /// Pages copied into the side store.
    pub pages_copied: u64,
    /// Most copies held at once.
    pub peak_copies: u64,
    /// Most bytes of copies held at once.
    pub peak_copy_bytes: u64,
    /// Pages released early with [`CowView::release`].
    pub released: u64,
    /// Median time the handler took per fault (read event to un-protect).
    pub fault_median: Duration,
    /// 99th percentile of the same.
    pub fault_p99: Duration,
    /// Longest of the same.
    pub fault_max: Duration,
    /// Faults the handler could not resolve cleanly (logged).
    pub handler_errors: u64,
    /// Time [`CowView::finish`] took (un-protect everything, free copies).
    pub finish_time: Duration,
}

/// The part of the state the handler and the readers change under a lock.
#[derive(Debug, Default)]
struct Store {
    /// A view is open.
    active: bool,
    /// The open (or last) view's epoch.
    epoch: u32,
    /// The open view covers all of guest memory.
    whole: bool,
    /// The ranges `(first gfn, pages)` the open view write-protected.
    spans: Vec<(u64, u64)>,
    /// Checkpoint copies by guest frame.
    copies: HashMap<u64, Box<[u8]>>,
    peak: usize,
    copied: u64,
    faults: u64,
    fault_ns: Vec<u32>,
    handler_errors: u64,
    /// A pre-arm is pending ([`CowMemory::prearm`]): the ranges it
    /// protected while the guest ran. Only while no view is open.
    pre: Option<Vec<(u64, u64)>>,
    /// Huge pages (gfn / [`HUGE_PAGE_PAGES`]) written since the pre-arm
    /// (the handler un-protected them without a copy; the arm protects
    /// them again).
    pre_written: Vec<u64>,
    /// What the pending pre-arm cost.
    pre_time: Duration,
    /// [`CowOptions::block_copy_max`] of the open view.
    block_copy_max: u64,
}

#[derive(Debug)]
struct Shared {
    uffd: Uffd,
    mem: Arc<GuestMemory>,
    /// Host address of guest frame 0.
    base: u64,
    pages: u64,
    /// Per page: `epoch << 2 | state`.
    words: Box<[AtomicU32]>,
    /// Epoch of the open view, 0 when none is open.
    open_epoch: AtomicU32,
    released: AtomicU64,
    faults_total: AtomicU64,
    store: Mutex<Store>,
}

fn effective(word: u32, epoch: u32, whole: bool) -> u32 {
    if word >> 2 == epoch {
        word & 3
    } else if whole {
        PROTECTED
    } else {
        IDLE
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        // A panicking holder leaves the store consistent (every change is a
        // single insert/remove/assignment), so poisoning is ignored.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn protect(&self, gfn: u64, pages: u64, protect: bool) -> Result<(), CowError> {
        self.uffd
            .write_protect(self.base + gfn * PAGE, pages * PAGE, protect)
            .map_err(|source| CowError::WriteProtect {
                gfn,
                pages,
                protect,
                source,
            })
    }

    /// Handles one write-protect fault at host address `addr`.
    fn handle_fault(&self, addr: u64) {
        let t0 = Instant::now();
        self.faults_total.fetch_add(1, Ordering::Relaxed);
        let page_addr = addr & !(PAGE - 1);
        if page_addr < self.base || page_addr >= self.base + self.pages * PAGE {
            tracing::error!(
                addr = format_args!("{addr:#x}"),
                "write-protect fault outside guest memory"
            );
            return;
        }
        let gfn = (page_addr - self.base) / PAGE;
        // The huge page around it.
        let first = gfn / HUGE_PAGE_PAGES * HUGE_PAGE_PAGES;
        let block = (first, (first + HUGE_PAGE_PAGES).min(self.pages) - first);
        let mut read_error = None;
        // What to un-protect: the whole block where possible, so that it
        // stays one huge page.
        let mut range = block;
        {
            let mut st = self.lock();
            if !st.active && st.pre.is_some() {
                // Pre-armed and the checkpoint not taken yet: this write
                // happens before it. Note the block (the arm protects it
                // again) and un-protect it, both under the lock, so that
                // the arm, which takes the list under the same lock, never
                // misses a block un-protected here.
                st.pre_written.push(first / HUGE_PAGE_PAGES);
                if let Err(e) = self.protect(block.0, block.1, false) {
                    st.handler_errors += 1;
                    drop(st);
                    tracing::error!(gfn, error = %e, "cannot un-protect a pre-armed block: its writer stays blocked");
                }
                return;
            }
            if st.active {
                st.faults += 1;
                let (epoch, whole) = (st.epoch, st.whole);
                // The view's pages in the block that are still protected:
                // all saved now if there are few enough, else only this
                // one (un-protecting one page splits the huge page).
                let pending = (first..first + block.1)
                    .filter(|&g| {
                        effective(self.words[g as usize].load(Ordering::Acquire), epoch, whole)
                            == PROTECTED
                    })
                    .count() as u64;
                // A view of all memory (a synchronisation, read over
                // seconds) saves page by page: whole blocks could copy all
                // of memory.
                let max = if whole { 0 } else { st.block_copy_max };
                let save = if pending <= max {
                    first..first + block.1
                } else {
                    range = (gfn, 1);
                    gfn..gfn + 1
                };
                for g in save {
                    let word = &self.words[g as usize];
                    let w = word.load(Ordering::Acquire);
                    if effective(w, epoch, whole) != PROTECTED {
                        continue;
                    }
                    // The page is still write-protected: nobody can change
                    // it while it is copied.
                    let mut buf = vec![0u8; PAGE_SIZE].into_boxed_slice();
                    match self.mem.read(g * PAGE, &mut buf) {
                        Ok(()) => {
                            let saved = (epoch << 2) | SAVED;
                            if word
                                .compare_exchange(w, saved, Ordering::AcqRel, Ordering::Acquire)
                                .is_ok()
                            {
                                st.copies.insert(g, buf);
                                st.copied += 1;
                            }
                            // Else the reader released the page meanwhile:
                            // the copy is not needed.
                        }
                        Err(e) => {
                            // Leave the rest of the block protected.
                            st.handler_errors += 1;
                            read_error = Some(e);
                            range = (gfn, 1);
                            break;
                        }
                    }
                }
                st.peak = st.peak.max(st.copies.len());
            }
        }
        if let Some(e) = read_error {
            tracing::error!(gfn, error = %e, "cannot copy a write-protected page");
        }
        let unprotected = self.protect(range.0, range.1, false);
        let ns = u32::try_from(t0.elapsed().as_nanos()).unwrap_or(u32::MAX);
        let mut st = self.lock();
        if let Err(e) = unprotected {
            st.handler_errors += 1;
            tracing::error!(gfn, error = %e, "cannot un-protect a page: its writer stays blocked");
        }
        if st.active {
            st.fault_ns.push(ns);
        }
    }

    /// Un-protects the ranges `spans` (of a view or a pre-arm, named by
    /// `what` in the log). Un-protecting pages already un-protected is
    /// harmless, and a few large ranges cost far less than one ioctl per
    /// page.
    fn unprotect_all_of(&self, spans: &[(u64, u64)], what: &str) {
        let result = spans
            .iter()
            .try_for_each(|&(g, n)| self.protect(g, n, false));
        if let Err(e) = result {
            // Leaving pages protected would block their next writer
            // forever: fall back to un-protecting all of memory.
            tracing::error!(error = %e, "un-protect at the end of a {what} failed; retrying on all of memory");
            if let Err(e) = self.protect(0, self.pages, false) {
                tracing::error!(error = %e, "cannot un-protect guest memory");
            }
        }
    }

    /// Closes the view of `epoch` if it is still open: no more saves,
    /// un-protect what is left, free the copies. Returns its stats.
    fn close(&self, epoch: u32) -> Option<CowStats> {
        let t0 = Instant::now();
        let (copies, spans, mut stats) = {
            let mut st = self.lock();
            if !st.active || st.epoch != epoch {
                return None;
            }
            st.active = false;
            self.open_epoch.store(0, Ordering::Release);
            let mut ns = std::mem::take(&mut st.fault_ns);
            ns.sort_unstable();
            let pick = |p: f64| {
                ns.get(((ns.len().saturating_sub(1)) as f64 * p).round() as usize)
                    .map_or(Duration::ZERO, |&n| Duration::from_nanos(u64::from(n)))
            };
            let stats = CowStats {
                epoch,
                faults: st.faults,
                pages_copied: st.copied,
                peak_copies: st.peak as u64,
                peak_copy_bytes: st.peak as u64 * PAGE,
                released: self.released.load(Ordering::Relaxed),
                fault_median: pick(0.5),
                fault_p99: pick(0.99),
                fault_max: pick(1.0),
                handler_errors: st.handler_errors,
                ..Default::default()
            };
            (
                std::mem::take(&mut st.copies),
                std::mem::take(&mut st.spans),
                stats,
            )
        };
        self.unprotect_all_of(&spans, "view");
        drop(copies);
        stats.finish_time = t0.elapsed();
        Some(stats)
    }
}

/// How [`CowMemory::arm`] write-protects a set of pages.
///
/// Arming happens while the vCPUs are paused, and each
/// `UFFDIO_WRITEPROTECT` ioctl costs a few microseconds however short its
/// range, while a long range costs with the guest pages KVM has mapped in
/// it (on this PVM host ~60 ns each; without KVM a 1 GiB range of intact
/// huge pages costs 55 µs, 6 ms once faults have split them). Measured on
/// a 1 GiB guest: 1000 scattered pages one range each 1.7-2.6 ms, the same
/// pages rounded out to 2 MiB blocks 0.33 ms, 20 000 scattered pages
/// 75-170 ms one range each and 1.2 ms as one span, 15 000 pages within
/// 128 MiB 0.74 ms. So each run of armed pages is
/// rounded out to `align` pages (a huge page: protecting part of one
/// splits it into 4 KiB entries, which makes later arms dearer), runs at
/// most `coalesce_gap` pages apart are protected as one range, and when
/// more than `max_ranges` ranges remain the whole span from the first to
/// the last is protected with one ioctl. A page protected but not armed
/// costs only if the guest writes it while the view is open: one fault,
/// no copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CowOptions {
    /// Largest gap (pages not armed) merged into one protected range.
    pub coalesce_gap: u64,
    /// Most ranges an arm protects one by one before it protects the
    /// whole span instead.
    pub max_ranges: usize,
    /// Ranges start and end on multiples of this many pages (1: exactly
    /// the armed runs).
    pub align: u64,
    /// In a view of a set of pages, a write fault saves every page of the
    /// view still protected in its huge page (2 MiB) and un-protects the
    /// whole block when there are at most this many, else only the written
    /// page. Un-protecting a single 4 KiB page splits the huge page into
    /// 512 entries for good, and every later protect or un-protect of that
    /// memory then walks them: a 1 GiB arm costs ~6 ms once scattered
    /// writes have split it, 55 µs while it is whole. Saving the block's
    /// pages ahead costs one copy of at most 2 MiB, and the guest's later
    /// writes to the block fault no more (page by page, a fully dirty
    /// block costs it 512 faults). The copies never exceed the view's
    /// pages. A view of all memory always saves page by page.
    pub block_copy_max: u64,
}

impl Default for CowOptions {
    fn default() -> Self {
        CowOptions {
            coalesce_gap: 16,
            max_ranges: 1024,
            align: 512,
            block_copy_max: 512,
        }
    }
}

/// The ranges that write-protect the sorted, de-duplicated page set `set`
/// of a memory of `pages` pages under `options`.
///
/// One pass; pages inside the range being built are skipped without any
/// arithmetic (with 2 MiB alignment most pages of a large set are): 15–30
/// µs for 20 000 scattered pages, where adding every run took 95–370 µs.
fn protect_spans(set: &[u64], options: CowOptions, pages: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut i = 0;
    while i < set.len() {
        let g = set[i];
        i += 1;
        if out.last().is_some_and(|&(first, len)| g < first + len) {
            continue;
        }
        // The run of consecutive pages from `g`.
        let mut run_end = g + 1;
        while set.get(i) == Some(&run_end) {
            run_end += 1;
            i += 1;
        }
        add_run(&mut out, g, run_end, options, pages);
    }
    if out.len() > options.max_ranges {
        let first = out[0].0;
        let (last, n) = out[out.len() - 1];
        out = vec![(first, last + n - first)];
    }
    out
}

/// Adds the run of pages `g..run_end`, rounded out to `options.align`
/// (clipped to `pages`), to the sorted spans `out`: merged into the last
/// span when at most `options.coalesce_gap` pages lie between them.
fn add_run(out: &mut Vec<(u64, u64)>, g: u64, run_end: u64, options: CowOptions, pages: u64) {
    let align = options.align.max(1);
    let start = g / align * align;
    let end = run_end
        .div_ceil(align)
        .saturating_mul(align)
        .min(pages.max(run_end));
    match out.last_mut() {
        Some((first, len)) if start.saturating_sub(*first + *len) <= options.coalesce_gap => {
            *len = end.max(*first + *len) - *first;
        }
        _ => out.push((start, end - start)),
    }
}

/// Guest memory registered for copy-on-write views, with its fault
/// handler thread. One per VM; views are armed and finished on it each
/// checkpoint.
#[derive(Debug)]
pub struct CowMemory {
    shared: Arc<Shared>,
    options: CowOptions,
    /// Held by every arm, pre-arm and cancel: they never interleave.
    arming: Mutex<()>,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl CowMemory {
    /// Registers all of `mem` with userfaultfd write-protect (once) and
    /// starts the handler thread. Guest memory is not protected until a
    /// view is armed.
    ///
    /// # Errors
    ///
    /// [`CowError::Open`] or [`CowError::Register`] when the kernel lacks
    /// write-protect support for this memory or the process the right to
    /// open a userfaultfd; [`CowError::Spawn`].
    pub fn new(mem: Arc<GuestMemory>) -> Result<Self, CowError> {
        let uffd = Uffd::open(FEATURE_WP_UNPOPULATED).map_err(CowError::Open)?;
        let (base, len) = (mem.host_addr(), mem.size());
        // SAFETY: `base..base+len` is `mem`'s mapping, kept mapped by the
        // `Arc` that `Shared` holds for as long as the userfaultfd lives;
        // writes to it block only while a view is armed, and the handler
        // thread (started below, stopped after everything is un-protected)
        // resolves them.
        unsafe { uffd.register_wp(base, len) }.map_err(|source| CowError::Register {
            host_addr: base,
            len,
            source,
        })?;
        let pages = len / PAGE;
        let words = (0..pages).map(|_| AtomicU32::new(0)).collect();
        let shared = Arc::new(Shared {
            uffd,
            mem,
            base,
            pages,
            words,
            open_epoch: AtomicU32::new(0),
            released: AtomicU64::new(0),
            faults_total: AtomicU64::new(0),
            store: Mutex::new(Store::default()),
        });
        let stop = EventFd::new(EFD_NONBLOCK).map_err(CowError::Spawn)?;
        let thread = {
            let shared = Arc::clone(&shared);
            let stop = stop.try_clone().map_err(CowError::Spawn)?;
            std::thread::Builder::new()
                .name("cow-fault".into())
                .spawn(move || handler_loop(&shared, &stop))
                .map_err(CowError::Spawn)?
        };
        tracing::debug!(
            pages,
            features = format_args!("{:#x}", shared.uffd.features()),
            "guest memory registered for copy-on-write"
        );
        Ok(CowMemory {
            shared,
            options: CowOptions::default(),
            arming: Mutex::new(()),
            stop,
            thread: Some(thread),
        })
    }

    /// Sets how [`CowMemory::arm`] turns a page set into protected ranges.
    pub fn set_options(&mut self, options: CowOptions) {
        self.options = options;
    }

    /// Pages of guest memory.
    pub fn pages(&self) -> u64 {
        self.shared.pages
    }

    /// Write-protect faults handled since [`CowMemory::new`], including
    /// those after a view closed (which should not happen).
    pub fn faults_total(&self) -> u64 {
        self.shared.faults_total.load(Ordering::Relaxed)
    }

    /// Arms a view over all of guest memory: the checkpoint is now. Call it
    /// while nothing writes guest memory (vCPUs paused, devices quiet),
    /// then let the guest run.
    ///
    /// # Errors
    ///
    /// [`CowError::AlreadyArmed`] if a view is open;
    /// [`CowError::WriteProtect`] if the kernel refuses.
    pub fn arm_all(&self) -> Result<CowView, CowError> {
        self.arm_inner(None)
    }

    /// Arms a view over the pages `gfns` (any order, duplicates allowed).
    /// Same contract as [`CowMemory::arm_all`].
    ///
    /// # Errors
    ///
    /// [`CowError::OutOfRange`] for a frame beyond guest memory, else as
    /// [`CowMemory::arm_all`].
    pub fn arm(&self, gfns: &[u64]) -> Result<CowView, CowError> {
        // A checkpoint's dirty set comes sorted: no copy then.
        let mut sorted = Vec::new();
        let set = self.sorted_set(gfns, &mut sorted)?;
        self.arm_inner(Some(set))
    }

    /// Sorted, de-duplicated `gfns` within memory (no copy when they
    /// already are).
    fn sorted_set<'a>(
        &self,
        gfns: &'a [u64],
        sorted: &'a mut Vec<u64>,
    ) -> Result<&'a [u64], CowError> {
        let set = if gfns.windows(2).all(|w| w[0] < w[1]) {
            gfns
        } else {
            *sorted = gfns.to_vec();
            sorted.sort_unstable();
            sorted.dedup();
            &sorted[..]
        };
        if let Some(&gfn) = set.last().filter(|&&g| g >= self.shared.pages) {
            return Err(CowError::OutOfRange {
                gfn,
                pages: self.shared.pages,
            });
        }
        Ok(set)
    }

    /// Write-protects the ranges that would arm `gfns` now, while the guest
    /// runs, so that the checkpoint's [`CowMemory::arm`] has little left to
    /// do in the pause: a range costs with the pages KVM has mapped in it
    /// (see [`CowOptions`]), and this moves that cost out of the pause.
    /// Pass the pages expected to be dirty at the checkpoint (the last
    /// checkpoint's set is a good guess).
    ///
    /// The ranges are protected 16 MiB at a time: KVM drops its mappings
    /// of a range under its MMU lock, and the guest's vCPUs wait on the
    /// range being done, not on all of them. Until the arm, the first write
    /// to a pre-armed huge page (2 MiB) faults: the handler notes the block
    /// and un-protects it without a copy, so the writer goes on. The next
    /// [`CowMemory::arm`] (or [`CowMemory::arm_all`]) then protects only
    /// the pages it is given that are outside the pre-armed ranges or in
    /// the blocks written since, and the view holds exactly the image at
    /// the arm, as without a pre-arm.
    /// [`CowMemory::cancel_prearm`] un-protects everything instead.
    ///
    /// # Errors
    ///
    /// [`CowError::AlreadyArmed`] while a view is open (or a pre-arm is
    /// pending), [`CowError::OutOfRange`], [`CowError::WriteProtect`] (then
    /// nothing stays protected).
    pub fn prearm(&self, gfns: &[u64]) -> Result<Prearm, CowError> {
        let _arming = self.arming.lock().unwrap_or_else(|e| e.into_inner());
        let t0 = Instant::now();
        let sh = &*self.shared;
        let mut sorted = Vec::new();
        let set = self.sorted_set(gfns, &mut sorted)?;
        let spans = protect_spans(set, self.options, sh.pages);
        {
            let mut st = sh.lock();
            if st.active || st.pre.is_some() {
                return Err(CowError::AlreadyArmed { epoch: st.epoch });
            }
            // In pre-arm mode before the first range is protected: the
            // handler notes every fault from here on.
            st.pre = Some(spans.clone());
            st.pre_written.clear();
        }
        // In pieces (see above); between them the guest runs.
        let pieces = spans.iter().flat_map(|&(g, n)| {
            (g..g + n)
                .step_by(PREARM_PIECE as usize)
                .map(move |p| (p, PREARM_PIECE.min(g + n - p)))
        });
        for (g, n) in pieces {
            if let Err(e) = sh.protect(g, n, true) {
                self.cancel_locked();
                return Err(e);
            }
        }
        let time = t0.elapsed();
        sh.lock().pre_time = time;
        Ok(Prearm {
            protected_pages: spans.iter().map(|&(_, n)| n).sum(),
            time,
        })
    }

    /// Un-protects a pending pre-arm (see [`CowMemory::prearm`]); false if
    /// none was pending.
    pub fn cancel_prearm(&self) -> bool {
        let _arming = self.arming.lock().unwrap_or_else(|e| e.into_inner());
        self.cancel_locked()
    }

    /// Whether a pre-arm is pending.
    pub fn is_prearmed(&self) -> bool {
        self.shared.lock().pre.is_some()
    }

    fn cancel_locked(&self) -> bool {
        let sh = &*self.shared;
        let Some(spans) = ({
            let mut st = sh.lock();
            st.pre_written.clear();
            st.pre.take()
        }) else {
            return false;
        };
        // Out of pre-arm mode: a fault from here on is simply
        // un-protected by the handler.
        sh.unprotect_all_of(&spans, "pre-arm");
        true
    }

    fn arm_inner(&self, set: Option<&[u64]>) -> Result<CowView, CowError> {
        let _arming = self.arming.lock().unwrap_or_else(|e| e.into_inner());
        let t0 = Instant::now();
        let sh = &*self.shared;
        let (epoch, protect, prearm) = {
            // One lock hold from taking the pre-arm's written pages to
            // opening the view: a fault in between would otherwise be
            // un-protected without being noted.
            let mut st = sh.lock();
            if st.active {
                return Err(CowError::AlreadyArmed { epoch: st.epoch });
            }
            let pre = st.pre.take();
            let mut written = std::mem::take(&mut st.pre_written);
            let protect = match (&set, &pre) {
                (None, _) => vec![(0, sh.pages)],
                (Some(set), None) => protect_spans(set, self.options, sh.pages),
                (Some(set), Some(pre)) => {
                    written.sort_unstable();
                    written.dedup();
                    let rest = not_yet_protected(set, pre, &written);
                    protect_spans(&rest, self.options, sh.pages)
                }
            };
            let prearm = pre.as_ref().map(|pre| PrearmUse {
                protected_pages: pre.iter().map(|&(_, n)| n).sum(),
                time: st.pre_time,
                faults: written.len() as u64,
            });
            // What the view un-protects when it closes.
            let mut spans = pre.unwrap_or_default();
            spans.extend_from_slice(&protect);
            let mut epoch = st.epoch + 1;
            if epoch > MAX_EPOCH {
                for w in sh.words.iter() {
                    w.store(0, Ordering::Relaxed);
                }
                epoch = 1;
            }
            *st = Store {
                active: true,
                epoch,
                whole: set.is_none(),
                spans,
                copies: std::mem::take(&mut st.copies),
                block_copy_max: self.options.block_copy_max,
                ..Default::default()
            };
            sh.released.store(0, Ordering::Relaxed);
            (epoch, protect, prearm)
        };
        if let Some(set) = &set {
            let w = (epoch << 2) | PROTECTED;
            for &g in set.iter() {
                sh.words[g as usize].store(w, Ordering::Release);
            }
        }
        sh.open_epoch.store(epoch, Ordering::Release);
        let armed_pages = set.as_ref().map_or(sh.pages, |s| s.len() as u64);
        let protected = protect
            .iter()
            .try_for_each(|&(g, n)| sh.protect(g, n, true));
        if let Err(e) = protected {
            sh.close(epoch);
            return Err(e);
        }
        Ok(CowView {
            shared: Arc::clone(&self.shared),
            epoch,
            whole: set.is_none(),
            armed_pages,
            protected_pages: protect.iter().map(|&(_, n)| n).sum(),
            arm_time: t0.elapsed(),
            prearm,
            closed: false,
        })
    }
}

/// What a pre-arm did ([`CowMemory::prearm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prearm {
    /// Pages write-protected.
    pub protected_pages: u64,
    /// Time it took.
    pub time: Duration,
}

/// The pre-arm a view was armed on, for its stats.
#[derive(Debug, Clone, Copy)]
struct PrearmUse {
    protected_pages: u64,
    time: Duration,
    faults: u64,
}

/// The pages of the sorted set `set` that the arm must protect after a
/// pre-arm of the sorted, disjoint ranges `pre`: those outside `pre`, and
/// those in the huge pages written since (`written`, sorted block
/// numbers).
fn not_yet_protected(set: &[u64], pre: &[(u64, u64)], written: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut spans = pre.iter().peekable();
    let mut written = written.iter().peekable();
    for &g in set {
        let block = g / HUGE_PAGE_PAGES;
        while spans.next_if(|&&(first, n)| first + n <= g).is_some() {}
        while written.next_if(|&&w| w < block).is_some() {}
        let covered = spans.peek().is_some_and(|&&(first, _)| first <= g);
        if !covered || written.peek() == Some(&&block) {
            out.push(g);
        }
    }
    out
}

impl Drop for CowMemory {
    fn drop(&mut self) {
        let sh = &self.shared;
        let epoch = sh.open_epoch.load(Ordering::Acquire);
        if epoch != 0 {
            tracing::warn!(epoch, "copy-on-write memory dropped with a view open");
            sh.close(epoch);
        }
        self.cancel_locked();
        if let Err(e) = self.stop.write(1) {
            tracing::error!(error = %e, "cannot stop the copy-on-write handler");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // SAFETY: the range registered in `new`; everything is un-protected.
        if let Err(e) = unsafe { sh.uffd.unregister(sh.base, sh.pages * PAGE) } {
            tracing::warn!(error = %e, "cannot unregister guest memory from userfaultfd");
        }
    }
}

fn handler_loop(shared: &Shared, stop: &EventFd) {
    let mut msgs = [UffdMsg::default(); 64];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: shared.uffd.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs for the
        // duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            tracing::error!(error = %err, "copy-on-write handler: poll failed");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        loop {
            let got = match shared.uffd.read_msgs(&mut msgs) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    tracing::error!(error = %e, "copy-on-write handler: read failed");
                    return;
                }
            };
            for m in &msgs[..got] {
                if m.event == EVENT_PAGEFAULT && m.arg[0] & PAGEFAULT_FLAG_WP != 0 {
                    shared.handle_fault(m.arg[1]);
                } else {
                    tracing::warn!(
                        event = m.event,
                        flags = m.arg[0],
                        "unexpected userfaultfd event"
                    );
                }
            }
        }
    }
}

/// The checkpoint image of guest memory while the guest runs on. `Send` and
/// `Sync`: share it (by reference or in an `Arc`) with reader threads.
#[derive(Debug)]
pub struct CowView {
    shared: Arc<Shared>,
    epoch: u32,
    whole: bool,
    armed_pages: u64,
    protected_pages: u64,
    arm_time: Duration,
    prearm: Option<PrearmUse>,
    closed: bool,
}

impl CowView {
    /// The view's epoch (1 for the first view of a [`CowMemory`]).
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Pages armed in this view.
    pub fn armed_pages(&self) -> u64 {
        self.armed_pages
    }

    /// How long arming took.
    pub fn arm_time(&self) -> Duration {
        self.arm_time
    }

    /// With a pre-arm ([`CowMemory::prearm`]): the write faults between it
    /// and the arm (see [`CowStats::prearm_faults`]).
    pub fn prearm_faults(&self) -> Option<u64> {
        self.prearm.map(|p| p.faults)
    }

    /// Copies held now.
    pub fn copies(&self) -> usize {
        self.shared.lock().copies.len()
    }

    fn word(&self, gfn: u64) -> Result<&AtomicU32, CowError> {
        let sh = &*self.shared;
        if sh.open_epoch.load(Ordering::Acquire) != self.epoch {
            return Err(CowError::Closed { epoch: self.epoch });
        }
        sh.words.get(gfn as usize).ok_or(CowError::OutOfRange {
            gfn,
            pages: sh.pages,
        })
    }

    /// Copies the checkpoint content of page `gfn` into `buf`.
    ///
    /// # Errors
    ///
    /// [`CowError::NotInView`] for a page not armed, [`CowError::Released`]
    /// for a released one, [`CowError::OutOfRange`], or
    /// [`CowError::Closed`] if the [`CowMemory`] was dropped.
    pub fn read_page(&self, gfn: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<PageSource, CowError> {
        let word = self.word(gfn)?;
        let w = word.load(Ordering::Acquire);
        match effective(w, self.epoch, self.whole) {
            PROTECTED => {
                self.shared.mem.read(gfn * PAGE, buf)?;
                // Seqlock validation (see the module docs): the reload
                // stays after the copy's loads.
                fence(Ordering::Acquire);
                if word.load(Ordering::Relaxed) == w
                    && self.shared.open_epoch.load(Ordering::Relaxed) == self.epoch
                {
                    return Ok(PageSource::Live);
                }
                // Saved (or released) meanwhile.
                self.read_saved(gfn, buf)
            }
            SAVED => self.read_saved(gfn, buf),
            RELEASED => Err(CowError::Released { gfn }),
            _ => Err(CowError::NotInView { gfn }),
        }
    }

    fn read_saved(&self, gfn: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<PageSource, CowError> {
        let st = self.shared.lock();
        if !st.active || st.epoch != self.epoch {
            return Err(CowError::Closed { epoch: self.epoch });
        }
        match st.copies.get(&gfn) {
            Some(copy) => {
                buf.copy_from_slice(copy);
                Ok(PageSource::Saved)
            }
            None => Err(CowError::Released { gfn }),
        }
    }

    /// Releases page `gfn`: the reader is done with it. Drops its copy, or
    /// removes its write protection if the guest has not written it yet.
    /// Releasing a page twice is harmless.
    ///
    /// # Errors
    ///
    /// [`CowError::NotInView`], [`CowError::OutOfRange`],
    /// [`CowError::Closed`], or [`CowError::WriteProtect`] if the kernel
    /// refuses to un-protect.
    pub fn release(&self, gfn: u64) -> Result<(), CowError> {
        let word = self.word(gfn)?;
        let released = (self.epoch << 2) | RELEASED;
        loop {
            let w = word.load(Ordering::Acquire);
            let state = effective(w, self.epoch, self.whole);
            match state {
                PROTECTED | SAVED => {
                    if word
                        .compare_exchange(w, released, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue;
                    }
                    self.shared.released.fetch_add(1, Ordering::Relaxed);
                    if state == PROTECTED {
                        return self.shared.protect(gfn, 1, false);
                    }
                    let copy = {
                        let mut st = self.shared.lock();
                        if st.active && st.epoch == self.epoch {
                            st.copies.remove(&gfn)
                        } else {
                            None
                        }
                    };
                    drop(copy);
                    return Ok(());
                }
                RELEASED => return Ok(()),
                _ => return Err(CowError::NotInView { gfn }),
            }
        }
    }

    /// Releases the pages `first..first + pages` of the view like
    /// [`CowView::release`] (pages of the range that are not in the view
    /// are left alone, released ones stay released), with one un-protect
    /// over the whole range: page by page, a reader going through all of
    /// memory would pay one ioctl per page and split every huge page that
    /// the guest did not write.
    ///
    /// # Errors
    ///
    /// [`CowError::OutOfRange`] for a range beyond guest memory,
    /// [`CowError::Closed`], or [`CowError::WriteProtect`] if the kernel
    /// refuses to un-protect.
    pub fn release_range(&self, first: u64, pages: u64) -> Result<(), CowError> {
        let sh = &*self.shared;
        if sh.open_epoch.load(Ordering::Acquire) != self.epoch {
            return Err(CowError::Closed { epoch: self.epoch });
        }
        let end = first.saturating_add(pages);
        if end > sh.pages {
            return Err(CowError::OutOfRange {
                gfn: end - 1,
                pages: sh.pages,
            });
        }
        let released = (self.epoch << 2) | RELEASED;
        let mut saved = Vec::new();
        let mut count = 0u64;
        for gfn in first..end {
            let word = &sh.words[gfn as usize];
            loop {
                let w = word.load(Ordering::Acquire);
                let state = effective(w, self.epoch, self.whole);
                if state != PROTECTED && state != SAVED {
                    break;
                }
                if word
                    .compare_exchange(w, released, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
                {
                    count += 1;
                    if state == SAVED {
                        saved.push(gfn);
                    }
                    break;
                }
            }
        }
        sh.released.fetch_add(count, Ordering::Relaxed);
        if !saved.is_empty() {
            let copies: Vec<_> = {
                let mut st = sh.lock();
                if st.active && st.epoch == self.epoch {
                    saved.iter().filter_map(|g| st.copies.remove(g)).collect()
                } else {
                    Vec::new()
                }
            };
            drop(copies);
        }
        // As in `release`: the un-protect follows the word changes, and
        // un-protecting pages the handler already un-protected is
        // harmless.
        if pages == 0 {
            return Ok(());
        }
        sh.protect(first, pages, false)
    }

    /// Ends the view: un-protects every page still protected, frees all
    /// copies and returns the epoch's stats. Dropping the view does the
    /// same (without the stats).
    pub fn finish(mut self) -> CowStats {
        self.closed = true;
        let mut stats = self.shared.close(self.epoch).unwrap_or_default();
        stats.epoch = self.epoch;
        stats.armed_pages = self.armed_pages;
        stats.protected_pages = self.protected_pages;
        stats.arm_time = self.arm_time;
        if let Some(p) = self.prearm {
            stats.prearmed_pages = p.protected_pages;
            stats.prearm_time = p.time;
            stats.prearm_faults = p.faults;
        }
        tracing::debug!(?stats, "copy-on-write view finished");
        stats
    }
}

impl Drop for CowView {
    fn drop(&mut self) {
        if !self.closed {
            self.shared.close(self.epoch);
        }
    }
}
