//! End-to-end tests of dirty tracking with real KVM: the `touch` guest
//! workload logs every page before it writes it, and each epoch's harvest
//! (bitmap with manual protect, or dirty ring) must equal what the guest
//! says it wrote, plus only the named bookkeeping pages.
//!
//! Run the figures with
//! `cargo test -p tests --test e2e dirty::harvest_cost -- --nocapture --ignored`.

use std::collections::HashSet;
use std::ops::Range;
use std::time::{Duration, Instant};
use tests::require_kvm;

use simrep::dirty::{DirtyMode, DirtyPages, DirtyTracker};
use simrep::vmm::abi::{self, TouchLogHeader, TouchParams};
use simrep::vmm::run::{self, RunOptions, TouchOptions, Workload};
use simrep::vmm::Vm;

const PAGE: u64 = abi::PAGE_SIZE;

fn touch_opts(mem_bytes: u64, vcpus: u32, timer_hz: u32, touch: TouchOptions) -> RunOptions {
    RunOptions {
        workload: Workload::Touch,
        mem_bytes,
        vcpus,
        timer_hz,
        touch,
        ..Default::default()
    }
}

/// Guest address of vCPU `cpu`'s `touch` log.
pub(crate) fn log_gpa(p: &TouchParams, cpu: u32) -> u64 {
    p.log_gpa + u64::from(cpu) * abi::touch_log_stride(p.log_entries)
}

/// The header of vCPU `cpu`'s `touch` log.
pub(crate) fn header(vm: &Vm, p: &TouchParams, cpu: u32) -> TouchLogHeader {
    vm.memory()
        .read_obj(log_gpa(p, cpu))
        .expect("read the touch log header")
}

/// The entries `from..count` of vCPU `cpu`'s log, and `count`.
pub(crate) fn read_log(vm: &Vm, p: &TouchParams, cpu: u32, from: u64) -> (u64, Vec<u64>) {
    let count = header(vm, p, cpu).count;
    assert!(count >= from, "vCPU {cpu}: log count went back");
    assert!(
        count - from <= p.log_entries,
        "vCPU {cpu}: {} entries since the last epoch overflow the {}-entry log",
        count - from,
        p.log_entries
    );
    let base = log_gpa(p, cpu) + abi::TOUCH_LOG_ENTRIES_OFFSET;
    let mut buf = vec![0u8; p.log_entries as usize * 8];
    vm.memory()
        .read(base, &mut buf)
        .expect("read the touch log");
    let at = |n: u64| {
        let i = (n % p.log_entries) as usize * 8;
        u64::from_le_bytes(buf[i..i + 8].try_into().unwrap())
    };
    (count, (from..count).map(at).collect())
}

/// Every dirty page read through the checkpoint's view equals `at`, the
/// memory at the checkpoint.
pub(crate) fn assert_view_is_checkpoint(
    c: &simrep::vmm::epoch::EpochCheckpoint,
    at: &[u8],
    epoch: impl std::fmt::Display,
) {
    let mut page = [0u8; 4096];
    for &gfn in &c.dirty {
        c.view.read_page(gfn, &mut page).expect("read view");
        let off = (gfn * PAGE) as usize;
        assert!(
            page[..] == at[off..off + PAGE as usize],
            "epoch {epoch}: view of page {gfn:#x} differs from the checkpoint"
        );
    }
}

/// The pages outside the `touch` region that the guest may dirty, by name.
fn bookkeeping(p: &TouchParams, vcpus: u32) -> Vec<(&'static str, Range<u64>)> {
    let pages = |start: u64, len: u64| start / PAGE..(start + len).div_ceil(PAGE);
    let mut v = vec![
        // progress counters (CPL3) and timer ticks (CPL0 handler)
        ("status page", pages(abi::STATUS_GPA, PAGE)),
        // the logs: entries and published counts
        (
            "touch logs",
            pages(
                p.log_gpa,
                u64::from(vcpus) * abi::touch_log_stride(p.log_entries),
            ),
        ),
    ];
    for cpu in 0..u64::from(vcpus) {
        v.push((
            "CPL3 stack",
            pages(
                abi::USER_STACKS_GPA + cpu * abi::USER_STACK_SIZE,
                abi::USER_STACK_SIZE,
            ),
        ));
        // interrupt frames of the LAPIC timer
        v.push((
            "CPL0 stack",
            pages(
                abi::KERNEL_STACKS_GPA + cpu * abi::KERNEL_STACK_SIZE,
                abi::KERNEL_STACK_SIZE,
            ),
        ));
    }
    v
}

/// Checks each epoch's harvest against the guest's logs.
struct Checker {
    p: TouchParams,
    vcpus: u32,
    region: Range<u64>,
    allowed: Vec<(&'static str, Range<u64>)>,
    /// Per vCPU: log entries consumed so far.
    seen: Vec<u64>,
    /// Per vCPU: the last logged page of the previous epoch (maybe not yet
    /// written at that pause) and whether it must show up now (it was not
    /// in the previous harvest).
    uncertain: Vec<Option<(u64, bool)>>,
    /// Bookkeeping pages seen, by name.
    extras_seen: HashSet<(&'static str, u64)>,
}

impl Checker {
    fn new(vm: &Vm, p: TouchParams, vcpus: u32, first: &DirtyPages) -> Self {
        let pages = vm.memory().size() / PAGE;
        assert_eq!(
            first.len() as u64,
            pages,
            "the first harvest must return every page of guest RAM"
        );
        assert_eq!(first.as_slice(), (0..pages).collect::<Vec<_>>().as_slice());
        let mut seen = Vec::new();
        let mut uncertain = Vec::new();
        for cpu in 0..vcpus {
            let (count, logged) = read_log(vm, &p, cpu, 0);
            seen.push(count);
            // Everything was in the full harvest; the last page may still
            // be written after the resume.
            uncertain.push(logged.last().map(|&g| (g, false)));
        }
        let start = p.region_gpa / PAGE;
        Checker {
            p,
            vcpus,
            region: start..start + p.region_pages,
            allowed: bookkeeping(&p, vcpus),
            seen,
            uncertain,
            extras_seen: HashSet::new(),
        }
    }

    /// "name: count (first..last)" for each kind of bookkeeping page seen.
    fn extras_summary(&self) -> String {
        let mut out = Vec::new();
        for (name, _) in &self.allowed {
            let mut g: Vec<u64> = self
                .extras_seen
                .iter()
                .filter(|(n, _)| n == name)
                .map(|&(_, g)| g)
                .collect();
            g.sort();
            g.dedup();
            if let (Some(first), Some(last)) = (g.first(), g.last()) {
                let s = format!("{name}: {} ({first:#x}..={last:#x})", g.len());
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        out.join(", ")
    }

    /// Checks one epoch's harvest; returns the pages the guest logged.
    fn epoch(&mut self, vm: &Vm, epoch: usize, h: &DirtyPages) -> usize {
        let mut allowed_region: HashSet<u64> = HashSet::new();
        let mut logged_total = 0;
        for cpu in 0..self.vcpus {
            let c = cpu as usize;
            let (count, logged) = read_log(vm, &self.p, cpu, self.seen[c]);
            self.seen[c] = count;
            logged_total += logged.len();
            allowed_region.extend(logged.iter().copied());
            if let Some((u, _)) = self.uncertain[c] {
                allowed_region.insert(u);
            }
            let Some((&last, certain)) = logged.split_last() else {
                // Nothing new: the previous uncertain page may still come.
                continue;
            };
            // Every logged page but the last was written before the pause.
            for &g in certain {
                assert!(
                    h.contains(g),
                    "epoch {epoch}, vCPU {cpu}: page {g:#x} was logged (and written) but not harvested"
                );
            }
            // The guest logged past the previous uncertain page, so it
            // wrote it; if it was not harvested before, it must be now.
            if let Some((u, true)) = self.uncertain[c] {
                assert!(
                    h.contains(u),
                    "epoch {epoch}, vCPU {cpu}: page {u:#x} (last of the previous epoch) was never harvested"
                );
            }
            self.uncertain[c] = Some((last, !h.contains(last)));
        }
        let mut unexplained = Vec::new();
        for g in h.iter() {
            if self.region.contains(&g) {
                if !allowed_region.contains(&g) {
                    unexplained.push(g);
                }
            } else if let Some((name, _)) = self.allowed.iter().find(|(_, r)| r.contains(&g)) {
                self.extras_seen.insert((name, g));
            } else {
                unexplained.push(g);
            }
        }
        assert!(
            unexplained.is_empty(),
            "epoch {epoch}: {} harvested pages the guest did not write: {:#x?}",
            unexplained.len(),
            &unexplained[..unexplained.len().min(20)]
        );
        logged_total
    }
}

/// Boots `touch`, then runs `epochs` epochs of resume, run `run_for`,
/// pause, harvest, check. Returns the tracker and the VM.
fn exact_epochs(
    mode: DirtyMode,
    vcpus: u32,
    timer_hz: u32,
    epochs: usize,
    run_for: Duration,
) -> (Vm, DirtyTracker, Checker) {
    require_kvm();
    // Rounds of 256 writes with 1 ms idles: up to ~15k logged writes in
    // a 60 ms epoch (rewrites of already-dirty pages run at native speed,
    // so an unpaced guest would overflow any log).
    let touch = TouchOptions {
        pages_per_round: 256,
        idle_us: 1000,
        ..Default::default()
    };
    let opts = touch_opts(64 << 20, vcpus, timer_hz, touch);
    let p = opts.boot_params(1).touch;
    let (mut vm, mut tracker) = run::boot_tracked(&opts, mode).expect("boot with dirty tracking");
    std::thread::sleep(run_for);
    vm.pause_all().expect("pause");
    let first = tracker.harvest().expect("first harvest");
    let mut check = Checker::new(&vm, p, vcpus, &first);
    let mut total = 0;
    for epoch in 1..=epochs {
        vm.resume_all().expect("resume");
        std::thread::sleep(run_for);
        vm.pause_all().expect("pause");
        let h = tracker.harvest().expect("harvest");
        let logged = check.epoch(&vm, epoch, &h);
        assert!(logged > 0, "epoch {epoch}: the guest wrote nothing");
        total += logged;
        let st = tracker.last_stats();
        eprintln!(
            "{mode:?} epoch {epoch}: {} pages harvested ({} log entries or bits read), {logged} writes logged",
            h.len(),
            st.entries
        );
    }
    if let Some(ev) = vm.wait_exit(Duration::ZERO) {
        panic!("a vCPU ended: {ev:?}");
    }
    eprintln!(
        "{mode:?}: {total} logged writes over {epochs} epochs; bookkeeping pages seen: {}",
        check.extras_summary()
    );
    vm.shutdown();
    (vm, tracker, check)
}

#[test]
fn bitmap_harvest_equals_the_guest_log() {
    exact_epochs(DirtyMode::Bitmap, 2, 0, 8, Duration::from_millis(60));
}

#[test]
fn ring_harvest_equals_the_guest_log() {
    let (_, tracker, _) = exact_epochs(
        DirtyMode::Ring { entries: 65536 },
        2,
        0,
        8,
        Duration::from_millis(60),
    );
    assert_eq!(tracker.ring_full_exits(), 0, "the ring should not fill");
}

#[test]
fn harvest_is_exact_with_the_timer_on() {
    exact_epochs(DirtyMode::Bitmap, 1, 1000, 5, Duration::from_millis(60));
    exact_epochs(
        DirtyMode::Ring { entries: 65536 },
        1,
        1000,
        5,
        Duration::from_millis(60),
    );
}

#[test]
fn full_dirty_rings_lose_nothing() {
    // 256 entries (the smallest ring) against a guest writing thousands of
    // pages an epoch: the vCPU threads drain full rings many times.
    let (_, tracker, _) = exact_epochs(
        DirtyMode::Ring { entries: 256 },
        2,
        0,
        6,
        Duration::from_millis(80),
    );
    eprintln!("ring-full exits handled: {}", tracker.ring_full_exits());
    assert!(
        tracker.ring_full_exits() > 0,
        "the ring never filled: the test did not exercise KVM_EXIT_DIRTY_RING_FULL"
    );
}

/// Boots a gated `touch` guest, lets it finish round 1 and pauses it.
fn gated(mode: DirtyMode, mem: u64, pages_per_round: u32) -> (Vm, DirtyTracker, TouchParams) {
    gated_in(mode, mem, pages_per_round, mem)
}

/// [`gated`] with the pages drawn from the first `region` bytes.
fn gated_in(
    mode: DirtyMode,
    mem: u64,
    pages_per_round: u32,
    region: u64,
) -> (Vm, DirtyTracker, TouchParams) {
    require_kvm();
    let opts = touch_opts(
        mem,
        1,
        0,
        TouchOptions {
            pages_per_round,
            gated: true,
            region_bytes: region,
            ..Default::default()
        },
    );
    let p = opts.boot_params(1).touch;
    let (vm, tracker) = run::boot_tracked(&opts, mode).expect("boot with dirty tracking");
    wait_round(&vm, &p, 1);
    vm.pause_all().expect("pause");
    (vm, tracker, p)
}

fn wait_round(vm: &Vm, p: &TouchParams, round: u64) {
    let start = Instant::now();
    while header(vm, p, 0).rounds_done < round {
        if let Some(ev) = vm.wait_exit(Duration::ZERO) {
            panic!("the vCPU ended: {ev:?}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "round {round} did not finish"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn go(vm: &Vm, p: &TouchParams, round: u64) {
    vm.memory()
        .write_obj(log_gpa(p, 0) + abi::TOUCH_LOG_GO_OFFSET, round)
        .expect("write go");
}

#[test]
fn harvest_after_nothing_ran_is_empty() {
    for mode in [DirtyMode::Bitmap, DirtyMode::Ring { entries: 4096 }] {
        let (mut vm, mut tracker, p) = gated(mode, 64 << 20, 100);
        let first = tracker.harvest().expect("first harvest");
        assert_eq!(first.len() as u64, (64 << 20) / PAGE, "{mode:?}");
        // Paused: nothing can run, so nothing is dirty.
        let h = tracker.harvest().expect("harvest");
        assert!(
            h.is_empty(),
            "{mode:?}: paused guest dirtied {:x?}",
            h.as_slice()
        );
        // Resumed but idle (gated, no timer): it polls `go` through
        // SYS_IDLE. Only its stack may be dirtied.
        vm.resume_all().expect("resume");
        std::thread::sleep(Duration::from_millis(100));
        vm.pause_all().expect("pause");
        let h = tracker.harvest().expect("harvest");
        let stack =
            abi::USER_STACKS_GPA / PAGE..(abi::USER_STACKS_GPA + abi::USER_STACK_SIZE) / PAGE;
        assert!(
            h.iter().all(|g| stack.contains(&g)),
            "{mode:?}: idle guest dirtied {:x?} (allowed: its CPL3 stack {stack:x?})",
            h.as_slice()
        );
        eprintln!("{mode:?}: idle guest dirtied {:x?}", h.as_slice());
        // One more round: exactly its pages (and the log and stack).
        let (before, _) = read_log(&vm, &p, 0, 0);
        go(&vm, &p, 1);
        vm.resume_all().expect("resume");
        wait_round(&vm, &p, 2);
        vm.pause_all().expect("pause");
        let h = tracker.harvest().expect("harvest");
        let (_, logged) = read_log(&vm, &p, 0, before);
        assert_eq!(logged.len(), 100);
        let region = p.region_gpa / PAGE..p.region_gpa / PAGE + p.region_pages;
        let in_region: Vec<u64> = h.iter().filter(|g| region.contains(g)).collect();
        assert_eq!(
            in_region,
            DirtyPages::from_unsorted(logged).into_vec(),
            "{mode:?}: a gated round is fully written before it is published"
        );
        vm.shutdown();
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn stats(v: &mut [Duration]) -> String {
    v.sort();
    format!(
        "median {:>9.1?} p99 {:>9.1?}",
        percentile(v, 0.5),
        percentile(v, 0.99)
    )
}

/// Not a timed test: prints harvest and checkpoint-pause costs for a 1 GiB
/// guest with about 1k and 20k dirty pages per epoch, in both modes.
#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn harvest_cost_1gib() {
    const EPOCHS: usize = 25;
    for mode in [DirtyMode::Bitmap, DirtyMode::Ring { entries: 65536 }] {
        for per_round in [1000u32, 20000] {
            let (mut vm, mut tracker, p) = gated(mode, 1 << 30, per_round);
            let t = Instant::now();
            let first = tracker.harvest().expect("first harvest");
            let first_cost = t.elapsed();
            let mut check = Checker::new(&vm, p, 1, &first);
            let (mut harvest, mut pause, mut resume, mut total, mut pages) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut collect, mut rearm) = (Vec::new(), Vec::new());
            for epoch in 1..=EPOCHS {
                go(&vm, &p, epoch as u64);
                vm.resume_all().expect("resume");
                wait_round(&vm, &p, epoch as u64 + 1);
                let t0 = Instant::now();
                vm.pause_all().expect("pause");
                let t1 = Instant::now();
                let h = tracker.harvest().expect("harvest");
                let t2 = Instant::now();
                vm.resume_all().expect("resume");
                let t3 = Instant::now();
                vm.pause_all().expect("pause");
                check.epoch(&vm, epoch, &h);
                pause.push(t1 - t0);
                harvest.push(t2 - t1);
                resume.push(t3 - t2);
                total.push(t3 - t0);
                pages.push(h.len());
                let st = tracker.last_stats();
                collect.push(st.collect);
                rearm.push(st.rearm);
            }
            pages.sort();
            eprintln!(
                "{:<22} {per_round:>5} writes/epoch ({} dirty pages median): harvest {} (collect {}, re-arm {}); pause+harvest+resume {}; pause {}; resume {}; first (full) harvest {first_cost:.1?}",
                format!("{mode:?}"),
                pages[pages.len() / 2],
                stats(&mut harvest),
                stats(&mut collect),
                stats(&mut rearm),
                stats(&mut total),
                stats(&mut pause),
                stats(&mut resume),
            );
            vm.shutdown();
        }
    }
}

#[test]
fn random_workload_writes_incompressible_pages() {
    require_kvm();
    let opts = RunOptions {
        workload: Workload::Random,
        mem_bytes: 64 << 20,
        churn: run::ChurnOptions {
            rate_mib_s: 0,
            buffer_bytes: Some(8 << 20),
            report_ms: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut vm = run::boot(&opts).expect("boot random");
    let start = Instant::now();
    // One pass over the 8 MiB buffer is 2048 pages.
    while run::progress(&vm, 0).expect("progress") < 4096 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "random made no progress"
        );
        if let Some(ev) = vm.wait_exit(Duration::ZERO) {
            panic!("the vCPU ended: {ev:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.pause_all().expect("pause");
    let mut buf = vec![0u8; 8 << 20];
    vm.memory()
        .read(abi::HEAP_GPA, &mut buf)
        .expect("read heap");
    vm.shutdown();
    let words: Vec<u64> = buf
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let distinct: HashSet<u64> = words.iter().copied().collect();
    // wyrand output: no zero pages and (practically) no repeated words, so
    // neither zero-page elision, deduplication nor a byte compressor gains.
    assert!(
        distinct.len() as f64 > words.len() as f64 * 0.999,
        "{} distinct of {} words",
        distinct.len(),
        words.len()
    );
    let mut counts = [0u64; 256];
    for &b in &buf {
        counts[b as usize] += 1;
    }
    let n = buf.len() as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum();
    eprintln!("random: byte entropy {entropy:.4} bits/byte over 8 MiB");
    assert!(entropy > 7.99, "byte entropy {entropy}");
}

#[test]
fn random_workload_runs_from_the_cli() {
    require_kvm();
    let out = std::process::Command::new(tests::simrep_bin())
        .args([
            "run",
            "--workload",
            "random",
            "--mem",
            "64M",
            "--rate",
            "50",
            "--seconds",
            "1",
            "--report-ms",
            "300",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("run simrep");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr:\n{err}");
    assert!(err.contains("random: 1 vCPU(s)"), "{err}");
    assert!(err.contains("random cpu0: done"), "{err}");
}

#[test]
fn dirty_tracking_is_set_up_in_order() {
    use simrep::dirty::DirtyError;
    use simrep::vmm::vm::VmError;
    require_kvm();
    let mut vm = Vm::new(16 << 20).expect("vm");
    assert!(matches!(vm.dirty_tracker(), Err(VmError::Phase(_))));
    assert!(matches!(
        vm.enable_dirty_log(DirtyMode::Ring { entries: 100 }),
        Err(VmError::Dirty(DirtyError::RingSize { entries: 100, .. }))
    ));
    vm.enable_dirty_log(DirtyMode::Ring { entries: 512 })
        .expect("ring");
    assert!(matches!(
        vm.enable_dirty_log(DirtyMode::Bitmap),
        Err(VmError::Phase(_))
    ));
    // The rings exist once the vCPUs do.
    assert!(matches!(vm.dirty_tracker(), Err(VmError::Phase(_))));
    vm.create_vcpus(2).expect("vcpus");
    let mut tracker = vm.dirty_tracker().expect("tracker");
    assert_eq!(tracker.pages(), (16 << 20) / PAGE);
    assert_eq!(
        tracker.harvest().expect("first").len() as u64,
        tracker.pages()
    );
    assert!(tracker.harvest().expect("second").is_empty());

    // Bitmap mode cannot be turned on once vCPUs exist.
    let mut late = Vm::new(16 << 20).expect("vm");
    late.create_vcpus(1).expect("vcpus");
    assert!(matches!(
        late.enable_dirty_log(DirtyMode::Bitmap),
        Err(VmError::Phase(_))
    ));
    // Bitmap mode: the first harvest is every page (INITIALLY_SET), then
    // nothing while no vCPU runs.
    let mut bm = Vm::new(16 << 20).expect("vm");
    bm.enable_dirty_log(DirtyMode::Bitmap).expect("bitmap");
    let mut tracker = bm.dirty_tracker().expect("tracker");
    assert_eq!(
        tracker.harvest().expect("first").len() as u64,
        tracker.pages()
    );
    assert!(tracker.harvest().expect("second").is_empty());
}

fn snapshot(vm: &Vm) -> Vec<u8> {
    let mut buf = vec![0u8; vm.memory().size() as usize];
    vm.memory().read(0, &mut buf).expect("read guest memory");
    buf
}

/// The whole checkpoint step (pause, harvest, save, COW arm, resume) over
/// several epochs of a guest that keeps writing while each view is open:
/// every page that changed between two checkpoints is in the dirty set
/// (guest writes and the VMM's own writes alike), and every dirty page
/// read through the view equals the guest memory at the checkpoint.
#[test]
fn epoch_checkpoints_cover_every_change_and_views_hold_the_checkpoint() {
    use simrep::vmm::epoch::{EpochCheckpointer, EpochView};
    // copy_limit 0: every view is copy-on-write; the default: these small
    // epochs are copied during the pause.
    for copy_limit in [0, simrep::vmm::epoch::DEFAULT_COPY_LIMIT] {
        let (vm, tracker, p) = gated(DirtyMode::Bitmap, 64 << 20, 300);
        let mut ck = EpochCheckpointer::new(&vm, tracker).expect("checkpointer");
        ck.copy_limit = copy_limit;
        vm.pause_all().expect("pause");
        let mut before = snapshot(&vm);
        let first = ck.checkpoint(&vm).expect("first checkpoint");
        assert_eq!(first.dirty.len() as u64, (64 << 20) / PAGE, "first = all");
        first.view.finish();
        // Round r may start once `go` >= r - 1; `rounds_done` counts rounds.
        let mut rounds = header(&vm, &p, 0).rounds_done;
        let mut one_round = |vm: &Vm| {
            go(vm, &p, rounds);
            rounds += 1;
            wait_round(vm, &p, rounds);
        };
        for epoch in 1..=5 {
            // A round of guest writes, and the VMM's own write of `go`.
            one_round(&vm);
            vm.pause_all().expect("pause");
            let at = snapshot(&vm);
            let c = ck.checkpoint(&vm).expect("checkpoint");
            assert_eq!(
                matches!(c.view, EpochView::Cow(_)),
                copy_limit == 0,
                "view kind with copy_limit {copy_limit}"
            );
            let dirty: HashSet<u64> = c.dirty.iter().copied().collect();
            let changed: Vec<u64> = (0..at.len() / PAGE as usize)
                .filter(|&i| {
                    let r = i * PAGE as usize..(i + 1) * PAGE as usize;
                    before[r.clone()] != at[r]
                })
                .map(|i| i as u64)
                .collect();
            assert!(
                changed.len() >= 250,
                "epoch {epoch}: only {} pages changed",
                changed.len()
            );
            for gfn in &changed {
                assert!(
                    dirty.contains(gfn),
                    "epoch {epoch}: page {gfn:#x} changed but is not dirty"
                );
            }
            // The guest writes another round into the open view.
            one_round(&vm);
            assert_view_is_checkpoint(&c, &at, epoch);
            if let Some(stats) = c.view.finish() {
                assert!(
                    stats.pages_copied > 0,
                    "epoch {epoch}: the guest wrote into the view without a copy"
                );
            }
            before = at;
        }
    }
}

/// Not a timed test: the checkpoint pause (pause + harvest + state save +
/// COW arm + resume) of a 1 GiB guest with about 1k and 20k dirty pages
/// per epoch, against the goal "no more than the harvest plus 1 ms".
#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn checkpoint_pause_1gib() {
    use simrep::vmm::epoch::EpochCheckpointer;
    const EPOCHS: usize = 30;
    // Pages drawn from all of memory, and (the last rows) from a 128 MiB
    // working set; copy-on-write armed in the pause, or pre-armed
    // (`EpochCheckpointer::prearm`) after the guest's round, just before
    // the checkpoint (the guest idle: the best case;
    // `checkpoint_pause_prearmed_running_guest` has it writing).
    for (per_round, copy_limit, region, prearm) in [
        (1000u32, usize::MAX, 1u64 << 30, false),
        (1000, 0, 1 << 30, false),
        (1000, 0, 1 << 30, true),
        (20000, usize::MAX, 1 << 30, false),
        (20000, 0, 1 << 30, false),
        (20000, 0, 1 << 30, true),
        (20000, 0, 128 << 20, false),
        (20000, 0, 128 << 20, true),
    ] {
        let (vm, tracker, p) = gated_in(DirtyMode::Bitmap, 1 << 30, per_round, region);
        let mut ck = EpochCheckpointer::new(&vm, tracker).expect("checkpointer");
        ck.copy_limit = 0;
        ck.checkpoint(&vm).expect("first checkpoint").view.finish();
        ck.copy_limit = copy_limit;
        let mut rounds = header(&vm, &p, 0).rounds_done;
        let (mut total, mut harvest, mut save, mut arm, mut pause, mut resume, mut over) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut collect, mut rearm) = (vec![], vec![]);
        let (mut prearm_time, mut prearm_faults) = (vec![], vec![]);
        let mut pages = vec![];
        for _ in 0..EPOCHS {
            go(&vm, &p, rounds);
            rounds += 1;
            wait_round(&vm, &p, rounds);
            if prearm {
                if let Some(pa) = ck.prearm().expect("pre-arm") {
                    prearm_time.push(pa.time);
                }
            }
            let c = ck.checkpoint(&vm).expect("checkpoint");
            if let simrep::vmm::epoch::EpochView::Cow(v) = &c.view {
                if let Some(w) = v.prearm_faults() {
                    prearm_faults.push(w);
                }
            }
            let t = c.timings;
            total.push(t.total);
            harvest.push(t.harvest);
            save.push(t.save);
            arm.push(t.arm);
            pause.push(t.pause);
            resume.push(t.resume);
            over.push(t.total.saturating_sub(t.harvest));
            pages.push(c.dirty.len());
            let h = ck.tracker().last_stats();
            collect.push(h.collect);
            rearm.push(h.rearm);
            c.view.finish();
        }
        pages.sort();
        prearm_faults.sort();
        let prearmed = if prearm {
            assert!(
                prearm_time.len() >= EPOCHS - 1,
                "only {} of {EPOCHS} checkpoints were pre-armed",
                prearm_time.len()
            );
            format!(
                " (pre-armed {} before, {} faults in between (median))",
                stats(&mut prearm_time),
                prearm_faults
                    .get(prearm_faults.len() / 2)
                    .copied()
                    .unwrap_or(0)
            )
        } else {
            String::new()
        };
        eprintln!(
            "1 GiB, {} dirty pages/epoch (median) in {} MiB, {}{prearmed}: checkpoint pause {}; harvest {} (log read {}, re-arm {}); pause-minus-harvest {}; state save {}; copy/COW arm {}; vCPU pause {}; resume {}",
            pages[pages.len() / 2],
            region >> 20,
            if copy_limit == 0 { "copy-on-write" } else { "copied in the pause" },
            stats(&mut total),
            stats(&mut harvest),
            stats(&mut collect),
            stats(&mut rearm),
            stats(&mut over),
            stats(&mut save),
            stats(&mut arm),
            stats(&mut pause),
            stats(&mut resume),
        );
    }
}

/// Not a timed test: the checkpoint pause of a 1 GiB guest that keeps
/// writing scattered pages while every view is open (read through by the
/// test, as the primary does), with checkpoints every 50 or 75 ms. Three
/// settings, each on a fresh VM: faults saved page by page (which splits
/// huge pages, as before `CowOptions::block_copy_max`), whole huge pages
/// saved, and that plus a pre-arm (`EpochCheckpointer::prearm`)
/// `prearm_lead()` before each checkpoint.
#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn checkpoint_pause_prearmed_running_guest() {
    use simrep::dirty::cow::CowOptions;
    use simrep::vmm::epoch::{EpochCheckpointer, EpochView};
    const EPOCHS: usize = 30;
    // Rounds of `per_round` scattered writes with `idle_us` between them,
    // a checkpoint every `ms` (the last row: ~20 000 pages an epoch).
    for (per_round, idle_us, ms) in [(1000u32, 2000u32, 50u64), (1000, 0, 50), (1000, 0, 75)] {
        let interval = Duration::from_millis(ms);
        for (name, block_copy_max, prearm) in [
            ("page by page", 0u64, false),
            (
                "whole huge pages",
                CowOptions::default().block_copy_max,
                false,
            ),
            (
                "whole huge pages, pre-armed",
                CowOptions::default().block_copy_max,
                true,
            ),
        ] {
            let opts = touch_opts(
                1 << 30,
                1,
                0,
                TouchOptions {
                    pages_per_round: per_round,
                    idle_us,
                    region_bytes: 1 << 30,
                    ..Default::default()
                },
            );
            let (mut vm, tracker) =
                run::boot_tracked(&opts, DirtyMode::Bitmap).expect("boot with dirty tracking");
            let mut ck = EpochCheckpointer::new(&vm, tracker).expect("checkpointer");
            ck.set_cow_options(CowOptions {
                block_copy_max,
                ..CowOptions::default()
            });
            ck.copy_limit = 0;
            ck.checkpoint(&vm).expect("first checkpoint").view.finish();
            let (mut over, mut total, mut arm, mut pages) = (vec![], vec![], vec![], vec![]);
            let (mut faults, mut prearm_faults, mut prearm_time) = (vec![], vec![], vec![]);
            let mut buf = [0u8; 4096];
            let mut next = Instant::now() + interval;
            for _ in 0..EPOCHS {
                if prearm {
                    std::thread::sleep(
                        next.saturating_duration_since(Instant::now() + ck.prearm_lead()),
                    );
                    if let Some(pa) = ck.prearm().expect("pre-arm") {
                        prearm_time.push(pa.time);
                    }
                }
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                next += interval;
                let c = ck.checkpoint(&vm).expect("checkpoint");
                let t = c.timings;
                over.push(t.total.saturating_sub(t.harvest));
                total.push(t.total);
                arm.push(t.arm);
                pages.push(c.dirty.len());
                if let EpochView::Cow(v) = &c.view {
                    if let Some(w) = v.prearm_faults() {
                        prearm_faults.push(w);
                    }
                }
                // Read every page through the view while the guest runs,
                // as the primary does.
                for &g in &c.dirty {
                    c.view
                        .read_page(g, &mut buf)
                        .expect("read through the view");
                }
                if let Some(st) = c.view.finish() {
                    faults.push(st.faults);
                }
                assert!(vm.wait_exit(Duration::ZERO).is_none(), "the guest ended");
            }
            if prearm {
                assert!(
                    prearm_time.len() >= EPOCHS - 1,
                    "only {} checkpoints were pre-armed",
                    prearm_time.len()
                );
            }
            pages.sort();
            faults.sort();
            prearm_faults.sort();
            let med = |v: &[u64]| v.get(v.len() / 2).copied().unwrap_or(0);
            eprintln!(
                "running guest ({per_round} pages a round, {idle_us} us idle), 1 GiB, checkpoint every {interval:?}, {name}: {} dirty pages/epoch (median), {} write faults/epoch while the view is open; checkpoint pause {}; pause-minus-harvest {}; COW arm {}{}",
                pages[pages.len() / 2],
                med(&faults),
                stats(&mut total),
                stats(&mut over),
                stats(&mut arm),
                if prearm {
                    format!(
                        "; pre-arm took {}, faults between it and the checkpoint {} (median)",
                        stats(&mut prearm_time),
                        med(&prearm_faults)
                    )
                } else {
                    String::new()
                }
            );
            drop(ck);
            vm.shutdown();
        }
    }
}
