//! Tests of the copy-on-write view with host threads as writers (no KVM).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use proptest::prelude::*;

use super::*;

const MIB: u64 = 1 << 20;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn memory(bytes: u64) -> Arc<GuestMemory> {
    let mem = Arc::new(GuestMemory::new(bytes).expect("guest memory"));
    let mut rng = Rng(0x1234_5678 ^ bytes);
    let mut page = [0u8; PAGE_SIZE];
    for gfn in 0..bytes / PAGE {
        for chunk in page.chunks_exact_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        mem.write(gfn * PAGE, &page).unwrap();
    }
    mem
}

fn snapshot(mem: &GuestMemory) -> Vec<u8> {
    let mut all = vec![0u8; mem.size() as usize];
    mem.read(0, &mut all).unwrap();
    all
}

fn page_of(snap: &[u8], gfn: u64) -> &[u8] {
    &snap[(gfn * PAGE) as usize..][..PAGE_SIZE]
}

fn live(mem: &GuestMemory, gfn: u64) -> [u8; PAGE_SIZE] {
    let mut buf = [0u8; PAGE_SIZE];
    mem.read(gfn * PAGE, &mut buf).unwrap();
    buf
}

/// Runs `f` on another thread and fails if it does not end in time (a
/// writer blocked forever on a protected page).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what}: did not finish within 10 s (writer blocked?)"))
}

/// `AnonHugePages` of the mapping that contains `addr`, from
/// `/proc/self/smaps`, in KiB.
fn anon_huge_kib(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    inside = (a..b).contains(&addr);
                    continue;
                }
            }
        }
        if inside {
            if let Some(v) = line.strip_prefix("AnonHugePages:") {
                return v.trim().trim_end_matches("kB").trim().parse().unwrap();
            }
        }
    }
    panic!("no mapping at {addr:#x} in /proc/self/smaps")
}

#[test]
fn write_protect_works_on_anonymous_thp_guest_memory() {
    let mem = memory(16 * MIB);
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let huge = anon_huge_kib(mem.host_addr());
    eprintln!(
        "THP {}; AnonHugePages of guest memory: {huge} kB",
        thp.trim()
    );
    if !thp.contains("[never]") {
        assert!(huge > 0, "guest memory should be THP-backed");
    }
    let snap = snapshot(&mem);
    let cow = CowMemory::new(Arc::clone(&mem)).expect("register guest memory for WP");
    let view = cow.arm_all().unwrap();
    // A write into the middle of a huge page: the handler must save exactly
    // that 4 KiB page.
    let gfn = 513;
    mem.write(gfn * PAGE + 100, &[0xee; 64]).unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    assert_eq!(view.read_page(gfn, &mut buf).unwrap(), PageSource::Saved);
    assert_eq!(&buf[..], page_of(&snap, gfn));
    assert_eq!(view.read_page(gfn + 1, &mut buf).unwrap(), PageSource::Live);
    assert_eq!(&buf[..], page_of(&snap, gfn + 1));
    assert_eq!(live(&mem, gfn)[100], 0xee);
    let stats = view.finish();
    assert_eq!((stats.pages_copied, stats.peak_copies), (1, 1));
    assert_eq!(stats.peak_copy_bytes, PAGE);
}

#[test]
fn view_shows_the_checkpoint_and_finish_unprotects_everything() {
    let mem = memory(8 * MIB);
    let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    let snap = snapshot(&mem);
    let view = cow.arm_all().unwrap();
    assert_eq!(view.armed_pages(), cow.pages());
    for gfn in [0, 3, 100, 2047] {
        mem.write(gfn * PAGE, &[gfn as u8 ^ 0x5a; PAGE_SIZE])
            .unwrap();
        mem.write(gfn * PAGE + 8, b"again").unwrap();
    }
    let mut buf = [0u8; PAGE_SIZE];
    for gfn in 0..cow.pages() {
        view.read_page(gfn, &mut buf).unwrap();
        assert_eq!(&buf[..], page_of(&snap, gfn), "page {gfn}");
    }
    assert_eq!(view.copies(), 4);
    let stats = view.finish();
    assert_eq!(stats.pages_copied, 4);
    assert_eq!(stats.faults, 4, "the second write to a page must not fault");
    assert_eq!(stats.peak_copies, 4);
    assert!(stats.fault_median > Duration::ZERO);
    assert!(stats.fault_max >= stats.fault_median);
    // Nothing stays protected: writes everywhere do not fault.
    let before = cow.faults_total();
    for gfn in 0..cow.pages() {
        mem.write(gfn * PAGE + 17, &[1]).unwrap();
    }
    assert_eq!(cow.faults_total(), before);
}

#[test]
fn a_set_view_covers_only_its_pages() {
    let mem = memory(8 * MIB);
    let mut cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    cow.set_options(CowOptions {
        coalesce_gap: 0,
        max_ranges: usize::MAX,
        align: 1,
        block_copy_max: 0,
    });
    let snap = snapshot(&mem);
    let set = [7u64, 5, 6, 1000, 7, 2047];
    let view = cow.arm(&set).unwrap();
    assert_eq!(view.armed_pages(), 5);
    let before = cow.faults_total();
    mem.write(8 * PAGE, &[0; 16]).unwrap();
    assert_eq!(cow.faults_total(), before, "page 8 is not armed");
    mem.write(6 * PAGE, &[0; 16]).unwrap();
    assert_eq!(cow.faults_total(), before + 1);
    let mut buf = [0u8; PAGE_SIZE];
    for gfn in [5, 6, 7, 1000, 2047] {
        view.read_page(gfn, &mut buf).unwrap();
        assert_eq!(&buf[..], page_of(&snap, gfn));
    }
    assert!(matches!(
        view.read_page(8, &mut buf),
        Err(CowError::NotInView { gfn: 8 })
    ));
    assert!(matches!(
        view.read_page(2048, &mut buf),
        Err(CowError::OutOfRange { gfn: 2048, .. })
    ));
    let stats = view.finish();
    assert_eq!((stats.armed_pages, stats.pages_copied), (5, 1));
    assert_eq!(stats.protected_pages, 5);
    mem.write(1000 * PAGE, &[0; 16]).unwrap();
    assert_eq!(cow.faults_total(), before + 1);
    assert!(matches!(
        cow.arm(&[1, 2048]),
        Err(CowError::OutOfRange { gfn: 2048, .. })
    ));
}

#[test]
fn release_drops_copies_and_protection_early() {
    let mem = memory(8 * MIB);
    let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    let snap = snapshot(&mem);
    let view = cow.arm_all().unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    // A page not written yet: release removes its protection.
    view.release(10).unwrap();
    let before = cow.faults_total();
    mem.write(10 * PAGE, &[9; 8]).unwrap();
    assert_eq!(cow.faults_total(), before, "a released page must not fault");
    assert!(matches!(
        view.read_page(10, &mut buf),
        Err(CowError::Released { gfn: 10 })
    ));
    // A saved page: release frees its copy.
    mem.write(11 * PAGE, &[9; 8]).unwrap();
    assert_eq!(view.copies(), 1);
    view.read_page(11, &mut buf).unwrap();
    assert_eq!(&buf[..], page_of(&snap, 11));
    view.release(11).unwrap();
    view.release(11).unwrap();
    assert_eq!(view.copies(), 0);
    assert!(view.read_page(11, &mut buf).is_err());
    assert!(matches!(
        cow.arm_all(),
        Err(CowError::AlreadyArmed { epoch: 1 })
    ));
    let stats = view.finish();
    assert_eq!(
        (stats.pages_copied, stats.released, stats.peak_copies),
        (1, 2, 1)
    );
}

#[test]
fn release_range_releases_a_run_of_pages_with_one_unprotect() {
    let mem = memory(8 * MIB);
    let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    let snap = snapshot(&mem);
    let view = cow.arm_all().unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    // 21 saved, 22 released already, the rest of 16..32 protected.
    mem.write(21 * PAGE, &[9; 8]).unwrap();
    view.release(22).unwrap();
    assert_eq!(view.copies(), 1);
    view.release_range(16, 16).unwrap();
    assert_eq!(view.copies(), 0, "the saved copy is dropped");
    let before = cow.faults_total();
    for gfn in 16..32 {
        mem.write(gfn * PAGE, &[7; 8]).unwrap();
        assert!(matches!(
            view.read_page(gfn, &mut buf),
            Err(CowError::Released { .. })
        ));
    }
    assert_eq!(cow.faults_total(), before, "released pages must not fault");
    // Its neighbours are still in the view.
    for gfn in [15, 32] {
        mem.write(gfn * PAGE, &[7; 8]).unwrap();
        view.read_page(gfn, &mut buf).unwrap();
        assert_eq!(&buf[..], page_of(&snap, gfn));
    }
    view.release_range(16, 16).unwrap();
    view.release_range(0, 0).unwrap();
    assert!(matches!(
        view.release_range(2040, 9),
        Err(CowError::OutOfRange { .. })
    ));
    let stats = view.finish();
    assert_eq!(
        (stats.pages_copied, stats.released, stats.faults),
        (3, 16, 3)
    );
}

#[test]
fn dropping_the_memory_closes_an_open_view_without_blocking_writers() {
    let mem = memory(4 * MIB);
    let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    let view = cow.arm_all().unwrap();
    drop(cow);
    let m = Arc::clone(&mem);
    within("write after drop", move || {
        m.write(5 * PAGE, &[1; 8]).unwrap()
    });
    let mut buf = [0u8; PAGE_SIZE];
    assert!(matches!(
        view.read_page(5, &mut buf),
        Err(CowError::Closed { epoch: 1 })
    ));
    assert!(matches!(view.release(5), Err(CowError::Closed { .. })));
    let stats = view.finish();
    assert_eq!(stats.pages_copied, 0, "a closed view has no stats");
}

/// Many writer threads hammer random pages while reader threads read the
/// whole view; every page must equal the snapshot. Without releases the
/// number of copies equals the number of distinct pages written, exactly.
/// Writes random pages of `mem` from `writers` threads until `stop`.
fn random_writes(mem: &GuestMemory, writers: usize, seed: u64, stop: &AtomicBool) {
    std::thread::scope(|s| {
        for w in 0..writers {
            s.spawn(move || {
                let mut rng = Rng(seed + w as u64);
                let pages = mem.size() / PAGE;
                while !stop.load(Ordering::Relaxed) {
                    let gfn = rng.next() % pages;
                    mem.write(
                        gfn * PAGE + rng.next() % (PAGE - 8),
                        &rng.next().to_le_bytes(),
                    )
                    .unwrap();
                }
            });
        }
    });
}

fn hammer(rounds: u32, writers: usize, readers: usize, release: bool, set: bool, prearm: bool) {
    let mem = memory(32 * MIB);
    let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    let pages = cow.pages();
    for round in 0..rounds {
        let armed: Vec<u64> = if set {
            let mut rng = Rng(u64::from(round) + 77);
            (0..pages / 3).map(|_| rng.next() % pages).collect()
        } else {
            (0..pages).collect()
        };
        if prearm {
            // Pre-armed while writers run, which go on for a while after.
            let stop = AtomicBool::new(false);
            std::thread::scope(|s| {
                let (mem, stop) = (&mem, &stop);
                s.spawn(move || random_writes(mem, writers, u64::from(round) << 16, stop));
                std::thread::sleep(Duration::from_millis(1));
                cow.prearm(&armed).unwrap();
                std::thread::sleep(Duration::from_millis(3));
                stop.store(true, Ordering::Relaxed);
            });
        }
        let snap = snapshot(&mem);
        let armed_set: BTreeSet<u64> = armed.iter().copied().collect();
        let view = if set {
            cow.arm(&armed).unwrap()
        } else {
            cow.arm_all().unwrap()
        };
        if prearm {
            assert!(
                view.prearm_faults().unwrap() > 0,
                "no write landed between the pre-arm and the arm"
            );
        }
        let stop = AtomicBool::new(false);
        let written: Vec<BTreeSet<u64>> = std::thread::scope(|s| {
            let ws: Vec<_> = (0..writers)
                .map(|w| {
                    let (mem, stop) = (&mem, &stop);
                    s.spawn(move || {
                        let mut rng = Rng((u64::from(round) << 8) + w as u64 + 1);
                        let mut touched = BTreeSet::new();
                        // At least 256 writes each, so that writes land in
                        // the view even when the readers finish first on a
                        // loaded machine.
                        let mut n = 0u32;
                        while n < 256 || !stop.load(Ordering::Relaxed) {
                            n += 1;
                            let gfn = rng.next() % pages;
                            let off = rng.next() % (PAGE - 8);
                            mem.write(gfn * PAGE + off, &rng.next().to_le_bytes())
                                .unwrap();
                            touched.insert(gfn);
                        }
                        touched
                    })
                })
                .collect();
            let rs: Vec<_> = (0..readers)
                .map(|r| {
                    let (view, snap, armed_set) = (&view, &snap, &armed_set);
                    s.spawn(move || {
                        let mut buf = [0u8; PAGE_SIZE];
                        let mut sources = [0u64; 2];
                        // Readers walk the pages in different orders.
                        let order: Vec<u64> = if r % 2 == 0 {
                            armed_set.iter().copied().collect()
                        } else {
                            armed_set.iter().rev().copied().collect()
                        };
                        for gfn in order {
                            match view.read_page(gfn, &mut buf) {
                                Ok(src) => {
                                    sources[(src == PageSource::Saved) as usize] += 1;
                                    assert!(
                                        buf[..] == *page_of(snap, gfn),
                                        "round {round}: page {gfn} differs from the checkpoint ({src:?})"
                                    );
                                }
                                Err(CowError::Released { .. }) if release => {}
                                Err(e) => panic!("round {round}: page {gfn}: {e}"),
                            }
                            if release && r == 0 && gfn % 2 == 0 {
                                view.release(gfn).unwrap();
                            }
                        }
                        sources
                    })
                })
                .collect();
            let sources: Vec<[u64; 2]> = rs.into_iter().map(|h| h.join().unwrap()).collect();
            stop.store(true, Ordering::Relaxed);
            eprintln!("round {round}: reads [live, saved] per reader {sources:?}");
            ws.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let written: BTreeSet<u64> = written.into_iter().flatten().collect();
        let written_armed = written.intersection(&armed_set).count() as u64;
        let stats = view.finish();
        eprintln!(
            "round {round}: {} pages written ({written_armed} armed), stats {stats:?}",
            written.len()
        );
        // A fault saves the armed pages of its huge page when few are
        // left, so more pages than the written ones may be copied, never
        // more than the armed ones.
        assert!(stats.pages_copied <= armed_set.len() as u64);
        assert!(stats.peak_copies <= stats.pages_copied);
        if !release {
            assert!(
                stats.pages_copied >= written_armed,
                "every armed page written must be copied"
            );
            assert_eq!(stats.peak_copies, stats.pages_copied);
        }
        assert_eq!(stats.handler_errors, 0);
        assert!(written_armed > 0, "the writers did not overlap the readers");
    }
    let before = cow.faults_total();
    for gfn in 0..pages {
        mem.write(gfn * PAGE, &[0]).unwrap();
    }
    assert_eq!(cow.faults_total(), before, "pages left protected");
}

#[test]
fn hammer_whole_view_with_many_writers() {
    hammer(3, 4, 2, false, false, false);
}

#[test]
fn hammer_with_early_release() {
    hammer(2, 3, 2, true, false, false);
}

#[test]
fn hammer_set_views() {
    hammer(2, 3, 2, false, true, false);
}

#[test]
fn hammer_prearmed_views_with_writers_racing_the_prearm() {
    hammer(2, 3, 2, false, false, true);
    hammer(2, 3, 2, false, true, true);
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        gfn: u64,
        off: u16,
        byte: u8,
    },
    Read {
        gfn: u64,
    },
    Release {
        gfn: u64,
    },
    Rearm {
        set: Option<Vec<u64>>,
        /// Pre-arm these pages first, then write these pages before the
        /// arm.
        pre: Option<(Vec<u64>, Vec<u64>)>,
    },
}

const PROP_PAGES: u64 = 1024;

fn op() -> impl Strategy<Value = Op> {
    let gfn = 0..PROP_PAGES;
    // Small page numbers more often, so ops collide.
    let hot = prop_oneof![0..16u64, gfn.clone()];
    let set = proptest::collection::vec(prop_oneof![0..32u64, gfn], 1..20);
    prop_oneof![
        6 => (hot.clone(), 0..4096u16, any::<u8>()).prop_map(|(gfn, off, byte)| Op::Write { gfn, off, byte }),
        4 => hot.clone().prop_map(|gfn| Op::Read { gfn }),
        2 => hot.clone().prop_map(|gfn| Op::Release { gfn }),
        1 => proptest::option::of(set.clone()).prop_map(|set| Op::Rearm { set, pre: None }),
        1 => (
            proptest::option::of(set.clone()),
            set,
            proptest::collection::vec(hot, 0..12),
        )
            .prop_map(|(set, pre, written)| Op::Rearm { set, pre: Some((pre, written)) }),
    ]
}

/// The model's state of a page in the open view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    NotInView,
    Pending,
    Saved,
    Released,
}

fn sorted(v: &[u64]) -> Vec<u64> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.dedup();
    v
}

fn protect_model(prot: &mut [bool], spans: &[(u64, u64)]) {
    for &(f, n) in spans {
        prot[f as usize..(f + n) as usize].fill(true);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(24),
        ..ProptestConfig::default()
    })]

    /// A model of the view: the snapshot at arm, each page's state and
    /// whether it is write-protected (which predicts every fault), with
    /// pre-arms and whole-block saves. Every read must agree with it.
    #[test]
    fn view_matches_a_model(
        ops in proptest::collection::vec(op(), 1..120),
        block_copy_max in prop_oneof![Just(0u64), Just(3), Just(512)],
    ) {
        let mem = memory(PROP_PAGES * PAGE);
        let mut cow = CowMemory::new(Arc::clone(&mem)).unwrap();
        let options = CowOptions { block_copy_max, ..CowOptions::default() };
        cow.set_options(options);
        let n = PROP_PAGES as usize;
        let block_of = |g: u64| {
            let f = g / HUGE_PAGE_PAGES * HUGE_PAGE_PAGES;
            f as usize..(f + HUGE_PAGE_PAGES).min(PROP_PAGES) as usize
        };
        let mut snap = snapshot(&mem);
        let mut view = cow.arm_all().unwrap();
        let mut state = vec![Model::Pending; n];
        let mut whole = true;
        let mut prot = vec![true; n];
        let mut buf = [0u8; PAGE_SIZE];
        for op in ops {
            match op {
                Op::Write { gfn, off, byte } => {
                    let off = u64::from(off).min(PAGE - 1);
                    let before = cow.faults_total();
                    mem.write(gfn * PAGE + off, &[byte]).unwrap();
                    let g = gfn as usize;
                    prop_assert_eq!(cow.faults_total() - before, u64::from(prot[g]), "write to {}", gfn);
                    if prot[g] {
                        let block = block_of(gfn);
                        let pending = state[block.clone()].iter().filter(|&&s| s == Model::Pending).count() as u64;
                        let max = if whole { 0 } else { block_copy_max };
                        if pending <= max {
                            for p in block.clone() {
                                if state[p] == Model::Pending {
                                    state[p] = Model::Saved;
                                }
                            }
                            prot[block].fill(false);
                        } else {
                            if state[g] == Model::Pending {
                                state[g] = Model::Saved;
                            }
                            prot[g] = false;
                        }
                    }
                }
                Op::Read { gfn } => {
                    let got = view.read_page(gfn, &mut buf);
                    match state[gfn as usize] {
                        Model::NotInView => prop_assert!(matches!(got, Err(CowError::NotInView { .. })), "{got:?}"),
                        Model::Released => prop_assert!(matches!(got, Err(CowError::Released { .. })), "{got:?}"),
                        s => {
                            let src = got.unwrap();
                            prop_assert_eq!(src == PageSource::Saved, s == Model::Saved, "page {}", gfn);
                            prop_assert!(buf[..] == *page_of(&snap, gfn), "page {}", gfn);
                        }
                    }
                }
                Op::Release { gfn } => {
                    let got = view.release(gfn);
                    let g = gfn as usize;
                    match state[g] {
                        Model::NotInView => prop_assert!(matches!(got, Err(CowError::NotInView { .. })), "{got:?}"),
                        s => {
                            got.unwrap();
                            if s == Model::Pending {
                                prot[g] = false;
                            }
                            state[g] = Model::Released;
                        }
                    }
                }
                Op::Rearm { set, pre } => {
                    let saved = state.iter().filter(|&&s| s == Model::Saved).count();
                    prop_assert_eq!(view.copies(), saved);
                    view.finish();
                    prot.fill(false);
                    let mut pre_spans = None;
                    let mut blocks = BTreeSet::new();
                    if let Some((pre, written)) = &pre {
                        let spans = protect_spans(&sorted(pre), options, PROP_PAGES);
                        let p = cow.prearm(pre).unwrap();
                        prop_assert_eq!(p.protected_pages, spans.iter().map(|&(_, n)| n).sum::<u64>());
                        protect_model(&mut prot, &spans);
                        // Writes before the checkpoint: none may block,
                        // a write to a protected page faults and
                        // un-protects its block.
                        for (i, &g) in written.iter().enumerate() {
                            let before = cow.faults_total();
                            mem.write(g * PAGE + i as u64, &[i as u8 ^ 0xa5]).unwrap();
                            prop_assert_eq!(cow.faults_total() - before, u64::from(prot[g as usize]), "pre-armed write to {}", g);
                            if prot[g as usize] {
                                blocks.insert(g / HUGE_PAGE_PAGES);
                                prot[block_of(g)].fill(false);
                            }
                        }
                        pre_spans = Some(spans);
                    }
                    snap = snapshot(&mem);
                    view = match &set {
                        None => cow.arm_all().unwrap(),
                        Some(s) => cow.arm(s).unwrap(),
                    };
                    prop_assert!(!cow.is_prearmed());
                    prop_assert_eq!(view.prearm_faults(), pre.as_ref().map(|_| blocks.len() as u64));
                    whole = set.is_none();
                    match &set {
                        None => {
                            state.fill(Model::Pending);
                            prot.fill(true);
                        }
                        Some(s) => {
                            let s = sorted(s);
                            state.fill(Model::NotInView);
                            for &g in &s {
                                state[g as usize] = Model::Pending;
                            }
                            let rest: Vec<u64> = match &pre_spans {
                                None => s,
                                Some(spans) => s.into_iter().filter(|&g| {
                                    !spans.iter().any(|&(f, n)| (f..f + n).contains(&g))
                                        || blocks.contains(&(g / HUGE_PAGE_PAGES))
                                }).collect(),
                            };
                            protect_model(&mut prot, &protect_spans(&rest, options, PROP_PAGES));
                        }
                    }
                }
            }
        }
        let saved = state.iter().filter(|&&s| s == Model::Saved).count();
        prop_assert_eq!(view.copies(), saved);
        let stats = view.finish();
        prop_assert_eq!(stats.handler_errors, 0);
    }
}

#[test]
fn coalesced_gaps_fault_once_without_a_copy() {
    let mem = memory(8 * MIB);
    let mut cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    // Page by page: the block 0..512 around the pages is protected, so
    // the gap 11..20 is too.
    cow.set_options(CowOptions {
        block_copy_max: 0,
        ..CowOptions::default()
    });
    let snap = snapshot(&mem);
    let view = cow.arm(&[10, 20]).unwrap();
    let before = cow.faults_total();
    mem.write(15 * PAGE, &[1; 8]).unwrap();
    mem.write(15 * PAGE + 8, &[1; 8]).unwrap();
    mem.write(20 * PAGE, &[1; 8]).unwrap();
    assert_eq!(cow.faults_total(), before + 2);
    let mut buf = [0u8; PAGE_SIZE];
    assert!(matches!(
        view.read_page(15, &mut buf),
        Err(CowError::NotInView { gfn: 15 })
    ));
    assert_eq!(view.read_page(20, &mut buf).unwrap(), PageSource::Saved);
    assert_eq!(&buf[..], page_of(&snap, 20));
    let stats = view.finish();
    assert_eq!(
        (stats.armed_pages, stats.protected_pages, stats.pages_copied),
        (2, 512, 1)
    );
}

#[test]
fn a_fault_saves_its_huge_page_and_keeps_it_whole() {
    let mem = memory(16 * MIB);
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    // Measured once registered: its own mapping from then on (before, it
    // may share one with another test's memory).
    let huge_before = anon_huge_kib(mem.host_addr());
    assert_eq!(CowOptions::default().block_copy_max, 512);
    for round in 0..3u64 {
        let snap = snapshot(&mem);
        // 40 armed pages in each of the 8 huge pages.
        let set: Vec<u64> = (0..8 * 40)
            .map(|i| (i / 40) * 512 + (i % 40) * 7 + round)
            .collect();
        let view = cow.arm(&set).unwrap();
        let before = cow.faults_total();
        // One write into a gap of each huge page, then to all armed pages:
        // one fault per huge page.
        for b in 0..8u64 {
            mem.write((b * 512 + 500) * PAGE, &[round as u8; 8])
                .unwrap();
        }
        for &g in &set {
            mem.write(g * PAGE + 16, &[0xcc; 8]).unwrap();
        }
        assert_eq!(cow.faults_total(), before + 8);
        let mut buf = [0u8; PAGE_SIZE];
        for &g in &set {
            assert_eq!(view.read_page(g, &mut buf).unwrap(), PageSource::Saved);
            assert_eq!(&buf[..], page_of(&snap, g), "page {g}");
        }
        let stats = view.finish();
        assert_eq!((stats.faults, stats.pages_copied), (8, set.len() as u64));
    }
    // No huge page was split.
    if !thp.contains("[never]") {
        assert_eq!(anon_huge_kib(mem.host_addr()), huge_before);
    }
    // A huge page with more armed pages than the limit is saved page by
    // page.
    let mut cow = cow;
    cow.set_options(CowOptions {
        block_copy_max: 128,
        ..CowOptions::default()
    });
    let snap = snapshot(&mem);
    let set: Vec<u64> = (0..200).collect();
    let view = cow.arm(&set).unwrap();
    let before = cow.faults_total();
    mem.write(3 * PAGE, &[1; 8]).unwrap();
    mem.write(4 * PAGE, &[1; 8]).unwrap();
    assert_eq!(cow.faults_total(), before + 2);
    let mut buf = [0u8; PAGE_SIZE];
    assert_eq!(view.read_page(3, &mut buf).unwrap(), PageSource::Saved);
    assert_eq!(view.read_page(5, &mut buf).unwrap(), PageSource::Live);
    assert_eq!(&buf[..], page_of(&snap, 5));
    assert_eq!(view.finish().pages_copied, 2);
}

#[test]
fn spans_coalesce_gaps_and_cap_the_ioctls() {
    let opts = CowOptions {
        coalesce_gap: 2,
        max_ranges: 3,
        align: 1,
        ..CowOptions::default()
    };
    assert_eq!(protect_spans(&[], opts, 100), vec![]);
    assert_eq!(
        protect_spans(&[1, 2, 5, 9], opts, 100),
        vec![(1, 5), (9, 1)]
    );
    assert_eq!(
        protect_spans(&[0, 10, 20, 30], opts, 100),
        vec![(0, 31)],
        "more than max_ranges: one span"
    );
    assert_eq!(
        protect_spans(&[0, 10, 20], opts, 100),
        vec![(0, 1), (10, 1), (20, 1)]
    );
}

#[test]
fn spans_are_rounded_out_to_whole_blocks_within_memory() {
    let opts = CowOptions {
        coalesce_gap: 0,
        max_ranges: usize::MAX,
        align: 8,
        ..CowOptions::default()
    };
    // 3 and 5 share a block; 17 is in the third; 33..35 end in a block
    // cut short by the end of memory (36 pages).
    assert_eq!(
        protect_spans(&[3, 5, 17, 33, 34, 35], opts, 36),
        vec![(0, 8), (16, 8), (32, 4)]
    );
    // Adjacent blocks merge into one range.
    assert_eq!(protect_spans(&[7, 8], opts, 64), vec![(0, 16)]);
    // The default: 2 MiB blocks.
    let d = CowOptions::default();
    assert_eq!(protect_spans(&[1000, 1001], d, 1 << 18), vec![(512, 512)]);
    assert_eq!(
        protect_spans(&[1000, 5000], d, 1 << 18),
        vec![(512, 512), (4608, 512)]
    );
    // Every armed page is covered, by exactly one range.
    let set: Vec<u64> = (0..300)
        .map(|i| i * i % 4096)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let spans = protect_spans(&set, d, 4096);
    for &g in &set {
        assert_eq!(
            spans.iter().filter(|&&(f, n)| g >= f && g < f + n).count(),
            1,
            "page {g}"
        );
    }
    assert!(spans.iter().all(|&(f, n)| f + n <= 4096));
}

#[test]
fn effective_state_follows_the_epoch() {
    assert_eq!(effective(0, 1, true), PROTECTED);
    assert_eq!(effective(0, 1, false), IDLE);
    assert_eq!(effective((1 << 2) | SAVED, 1, false), SAVED);
    assert_eq!(effective((1 << 2) | SAVED, 2, true), PROTECTED);
    assert_eq!(effective((1 << 2) | RELEASED, 2, false), IDLE);
}

#[test]
fn many_epochs_in_a_row() {
    let mem = memory(4 * MIB);
    let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    for e in 1..=200u32 {
        let snap = snapshot(&mem);
        let view = if e % 3 == 0 {
            cow.arm(&[u64::from(e) % 1024, 5]).unwrap()
        } else {
            cow.arm_all().unwrap()
        };
        assert_eq!(view.epoch(), e);
        mem.write(5 * PAGE, &e.to_le_bytes()).unwrap();
        view.read_page(5, &mut buf).unwrap();
        assert_eq!(&buf[..], page_of(&snap, 5));
        let stats = view.finish();
        // The write to 5 saves the other armed page too when it is in
        // the same huge page.
        let other = u64::from(e) % 1024;
        let want = if e % 3 == 0 && other < 512 && other != 5 {
            2
        } else {
            1
        };
        assert_eq!(stats.pages_copied, want, "epoch {e}");
    }
}

/// Widens the race the seqlock check guards: readers read a few hot pages
/// in a tight loop while writers' first writes to them are being saved,
/// epoch after epoch. A reader that trusted a live copy without re-checking
/// the page's state would return a torn or post-checkpoint page here.
#[test]
fn readers_racing_the_handler_on_hot_pages_see_the_checkpoint() {
    const HOT: u64 = 8;
    let mem = memory(4 * MIB);
    let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    let hot: Vec<u64> = (0..HOT).map(|i| 100 + i * 37).collect();
    let (mut live_reads, mut saved_reads) = (0u64, 0u64);
    for epoch in 0..300u64 {
        let snap = snapshot(&mem);
        let view = if epoch % 2 == 0 {
            cow.arm(&hot).unwrap()
        } else {
            cow.arm_all().unwrap()
        };
        let stop = AtomicBool::new(false);
        let counts: Vec<[u64; 2]> = std::thread::scope(|s| {
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let (view, snap, hot, stop) = (&view, &snap, &hot, &stop);
                    s.spawn(move || {
                        let mut buf = [0u8; PAGE_SIZE];
                        let mut n = [0u64; 2];
                        while !stop.load(Ordering::Relaxed) {
                            for &gfn in hot {
                                let src = view.read_page(gfn, &mut buf).unwrap();
                                n[(src == PageSource::Saved) as usize] += 1;
                                assert!(
                                    buf[..] == *page_of(snap, gfn),
                                    "epoch {epoch}: page {gfn} ({src:?}) is not the checkpoint"
                                );
                            }
                        }
                        n
                    })
                })
                .collect();
            let (mem, hot) = (&mem, &hot);
            let writer = s.spawn(move || {
                // Whole-page writes: a torn read shows up anywhere.
                for (i, &gfn) in hot.iter().enumerate() {
                    let fill = (epoch as u8) ^ (i as u8) ^ 0xa5;
                    mem.write(gfn * PAGE, &[fill; PAGE_SIZE]).unwrap();
                }
            });
            writer.join().unwrap();
            std::thread::sleep(Duration::from_micros(200));
            stop.store(true, Ordering::Relaxed);
            readers.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for c in counts {
            live_reads += c[0];
            saved_reads += c[1];
        }
        let stats = view.finish();
        assert_eq!(stats.pages_copied, HOT, "epoch {epoch}");
    }
    eprintln!("hot-page reads: {live_reads} live, {saved_reads} from copies");
    assert!(live_reads > 0 && saved_reads > 0);
}

/// What arming costs without KVM: all of a 1 GiB memory with its huge
/// pages intact, then after 20 000 scattered writes under protection split
/// them. Compare with the arm of a KVM guest in the e2e test
/// `checkpoint_pause_1gib` (the difference is KVM's handling of the
/// protection change). `cargo test --release -p simrep --lib
/// arm_cost_without_kvm -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, prints figures"]
fn arm_cost_without_kvm() {
    let bytes = 1u64 << 30;
    let mem = Arc::new(GuestMemory::new(bytes).expect("guest memory"));
    for gfn in 0..bytes / PAGE {
        mem.write(gfn * PAGE, &[1u8; 8]).unwrap();
    }
    let cow = CowMemory::new(mem.clone()).unwrap();
    let mut rng = Rng(12345);
    for round in 0..6 {
        let v = cow.arm_all().unwrap();
        if round >= 3 {
            for _ in 0..20_000 {
                let g = rng.next() % (bytes / PAGE);
                mem.write(g * PAGE, &[2u8; 8]).unwrap();
            }
        }
        let s = v.finish();
        eprintln!(
            "round {round}{}: arm_all {:?}, finish {:?}, huge pages {} KiB",
            if round >= 3 {
                " (20000 scattered writes)"
            } else {
                ""
            },
            s.arm_time,
            s.finish_time,
            anon_huge_kib(mem.host_addr())
        );
    }
}

/// The spans as the first version computed them: every maximal run of
/// pages added in turn (no pages skipped).
fn spans_reference(set: &[u64], options: CowOptions, pages: u64) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &g in set {
        match runs.last_mut() {
            Some((first, n)) if *first + *n == g => *n += 1,
            _ => runs.push((g, 1)),
        }
    }
    let mut out = Vec::new();
    for (g, n) in runs {
        add_run(&mut out, g, g + n, options, pages);
    }
    if out.len() > options.max_ranges {
        out = vec![(
            out[0].0,
            out[out.len() - 1].0 + out[out.len() - 1].1 - out[0].0,
        )];
    }
    out
}

proptest! {
    #[test]
    fn spans_equal_the_run_by_run_computation(
        set in proptest::collection::btree_set(0u64..5000, 0..400),
        align in prop_oneof![Just(1u64), Just(4), Just(16), Just(512), 1u64..100],
        gap in 0u64..40,
        max_ranges in 1usize..50,
        pages in 1u64..6000,
    ) {
        let set: Vec<u64> = set.into_iter().filter(|&g| g < pages).collect();
        let options = CowOptions { coalesce_gap: gap, max_ranges, align, ..CowOptions::default() };
        prop_assert_eq!(
            protect_spans(&set, options, pages),
            spans_reference(&set, options, pages)
        );
    }
}

#[test]
fn a_prearmed_view_protects_only_what_changed_since_and_shows_the_checkpoint() {
    let mem = memory(8 * MIB);
    let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    // Pre-arm huge pages 0 (pages 0..512), 2 (1024..1536) and 3.
    let p = cow.prearm(&[3, 7, 1100, 1600]).unwrap();
    assert_eq!(p.protected_pages, 3 * 512);
    assert!(cow.is_prearmed());
    // Writes before the checkpoint go through: one fault per huge page,
    // no copy.
    let before = cow.faults_total();
    within("writes after the pre-arm", {
        let mem = Arc::clone(&mem);
        move || {
            mem.write(7 * PAGE, &[0x11; 16]).unwrap();
            mem.write(8 * PAGE, &[0x12; 16]).unwrap();
            mem.write(1100 * PAGE, &[0x13; 16]).unwrap();
            mem.write(600 * PAGE, &[0x14; 16]).unwrap();
        }
    });
    assert_eq!(
        cow.faults_total(),
        before + 2,
        "huge pages 0 and 2 fault once"
    );
    // The checkpoint: huge page 3 is still protected from the pre-arm;
    // 0 and 2 were written since and 1 (page 600) is outside it.
    let snap = snapshot(&mem);
    let set = [3u64, 7, 600, 1100, 1101, 1600];
    let view = cow.arm(&set).unwrap();
    assert!(!cow.is_prearmed());
    assert_eq!(view.prearm_faults(), Some(2));
    let faults = cow.faults_total();
    for &g in &set {
        mem.write(g * PAGE + 40, &[0xee; 8]).unwrap();
    }
    assert_eq!(
        cow.faults_total(),
        faults + 4,
        "every armed page is protected at the checkpoint: one fault per huge page"
    );
    let mut buf = [0u8; PAGE_SIZE];
    for &g in &set {
        assert_eq!(view.read_page(g, &mut buf).unwrap(), PageSource::Saved);
        assert_eq!(&buf[..], page_of(&snap, g), "page {g}");
    }
    let stats = view.finish();
    assert_eq!(stats.prearmed_pages, 3 * 512);
    assert_eq!(stats.prearm_faults, 2);
    // The arm protected huge pages 0, 1 and 2, not 3.
    assert_eq!(stats.protected_pages, 3 * 512);
    assert_eq!(stats.pages_copied, set.len() as u64);
    // Everything is un-protected after the view.
    let faults = cow.faults_total();
    for g in [0u64, 3, 511, 600, 1100, 1535, 1600, 2047] {
        mem.write(g * PAGE, &[1; 8]).unwrap();
    }
    assert_eq!(cow.faults_total(), faults);
}

#[test]
fn a_cancelled_prearm_leaves_nothing_protected() {
    let mem = memory(4 * MIB);
    let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    cow.prearm(&[1, 700]).unwrap();
    assert!(matches!(
        cow.prearm(&[2]),
        Err(CowError::AlreadyArmed { .. })
    ));
    mem.write(PAGE, &[1; 8]).unwrap();
    assert!(cow.cancel_prearm());
    assert!(!cow.cancel_prearm());
    let faults = cow.faults_total();
    for g in [0u64, 1, 2, 700, 1023] {
        mem.write(g * PAGE, &[2; 8]).unwrap();
    }
    assert_eq!(cow.faults_total(), faults);
    // A view armed afterwards starts from scratch.
    let snap = snapshot(&mem);
    let view = cow.arm(&[1, 700]).unwrap();
    assert_eq!(view.prearm_faults(), None);
    mem.write(700 * PAGE, &[3; 8]).unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    view.read_page(700, &mut buf).unwrap();
    assert_eq!(&buf[..], page_of(&snap, 700));
    // No pre-arm while a view is open.
    assert!(matches!(
        cow.prearm(&[5]),
        Err(CowError::AlreadyArmed { .. })
    ));
    assert_eq!(view.finish().prearmed_pages, 0);
}

#[test]
fn dropping_the_memory_with_a_prearm_pending_does_not_block_writers() {
    let mem = memory(4 * MIB);
    let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
    cow.prearm(&[5]).unwrap();
    drop(cow);
    within("write after dropping a pre-armed memory", move || {
        mem.write(5 * PAGE, &[9; 8]).unwrap();
    });
}

proptest! {
    #[test]
    fn not_yet_protected_is_the_pages_outside_or_written(
        set in proptest::collection::btree_set(0u64..3000, 0..300),
        pre in proptest::collection::btree_set(0u64..3000, 1..200),
        written in proptest::collection::btree_set(0u64..6, 0..4),
    ) {
        let pre: Vec<u64> = pre.into_iter().collect();
        let spans = protect_spans(&pre, CowOptions::default(), 3000);
        let set: Vec<u64> = set.into_iter().collect();
        let written: Vec<u64> = written.into_iter().collect();
        let want: Vec<u64> = set.iter().copied().filter(|g| {
            !spans.iter().any(|&(f, n)| (f..f + n).contains(g))
                || written.contains(&(g / HUGE_PAGE_PAGES))
        }).collect();
        prop_assert_eq!(not_yet_protected(&set, &spans, &written), want);
    }
}
