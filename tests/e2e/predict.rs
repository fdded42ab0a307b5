//! End-to-end tests of write-fault prediction (`simrep::dirty::predict`)
//! with real KVM: the `touch` guest logs every page before it writes it;
//! with prediction on, every logged page must still be harvested, pages
//! reported without a write must have been hot, and hot pages must stay
//! writable (KVM's `pf_fixed` counter, from debugfs, drops).
//!
//! The figures (churn at 50 ms epochs, with and without prediction):
//! `cargo test -p tests --test e2e predict::bench -- --ignored --nocapture`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use simrep::dirty::{DirtyError, DirtyMode, DirtyPages, DirtyTracker, Prediction};
use simrep::ebpf::{WriteSource, WriteTracer};
use simrep::vmm::abi;
use simrep::vmm::epoch::{EpochCheckpointer, EpochError};
use simrep::vmm::run::{self, ChurnOptions, RunOptions, TouchOptions, Workload};
use simrep::vmm::Vm;
use tests::require_kvm;

use super::dirty::{assert_view_is_checkpoint, read_log};
use super::ebpf::{error_chain, require_root};

const PAGE: u64 = abi::PAGE_SIZE;

/// Counts write faults: one `kvmmmu:kvm_mmu_pagetable_walk` write walk
/// per fault on a write-protected page (shadow paging, as here).
struct Faults(WriteTracer);

impl Faults {
    fn start() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "e2e-predict-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let t = WriteTracer::start_with(&name, std::process::id(), &[WriteSource::PagetableWalk])
            .unwrap_or_else(|e| panic!("cannot start eBPF write tracing: {}", error_chain(&e)));
        Faults(t)
    }

    /// Write faults since the previous call (call with the vCPUs paused).
    fn take(&mut self) -> u64 {
        self.0.take_epoch().expect("eBPF epoch").stats.walk_writes
    }
}

/// Runs the `helper` scenario in a child process (the eBPF programs count
/// every VM of the process, and tests run in parallel threads).
fn in_child(scenario: &str) {
    require_root();
    require_kvm();
    let text = tests::run_ignored_test("predict::helper", &[(HELPER_ENV, scenario)]);
    eprintln!("{text}");
    assert!(text.contains("1 passed"), "the helper did not run:\n{text}");
}

const HELPER_ENV: &str = "SIMREP_E2E_PREDICT_HELPER";

/// Not a test: run by the tests above in a child process.
#[test]
#[ignore = "helper run by the predict tests in a child process"]
fn helper() {
    let Ok(scenario) = std::env::var(HELPER_ENV) else {
        return;
    };
    match scenario.as_str() {
        "faults" => faults_scenario(),
        "bench" => bench_scenario(),
        other => panic!("unknown scenario {other}"),
    }
}

/// What one run of [`touch_epochs`] saw.
#[derive(Debug, Default)]
struct TouchRun {
    /// Write faults over the measured epochs (when counted).
    faults: u64,
    /// Pages harvested over the measured epochs.
    reported: u64,
    /// Distinct pages the guest logged over the measured epochs.
    logged: u64,
    /// Pages left writable, summed over harvests.
    unprotected: u64,
    /// Reported pages the guest did not write that epoch (all were hot).
    sent_unwritten: u64,
}

/// Boots `touch` over a region of `region_bytes` (1 vCPU, ~12k writes an
/// epoch), runs `epochs` epochs of `run_for` with `prediction`, and checks
/// each harvest against the guest's log: every page written before the
/// pause is harvested, and a harvested region page that was not written
/// was hot.
fn touch_epochs(
    region_bytes: u64,
    prediction: Option<Prediction>,
    epochs: usize,
    mut faults: Option<&mut Faults>,
) -> TouchRun {
    require_kvm();
    let run_for = Duration::from_millis(60);
    let opts = RunOptions {
        workload: Workload::Touch,
        mem_bytes: 64 << 20,
        vcpus: 1,
        timer_hz: 0,
        touch: TouchOptions {
            pages_per_round: 256,
            idle_us: 1000,
            region_bytes,
            ..Default::default()
        },
        ..Default::default()
    };
    let p = opts.boot_params(1).touch;
    let region = p.region_gpa / PAGE..p.region_gpa / PAGE + p.region_pages;
    let (mut vm, mut tracker): (Vm, DirtyTracker) =
        run::boot_tracked(&opts, DirtyMode::Bitmap).expect("boot with dirty tracking");
    tracker.set_prediction(prediction).expect("set prediction");
    std::thread::sleep(run_for);
    vm.pause_all().expect("pause");
    let first = tracker.harvest().expect("first harvest");
    assert_eq!(first.len() as u64, (64 << 20) / PAGE, "first harvest: all");
    let (mut seen, logged) = read_log(&vm, &p, 0, 0);
    // The last logged page may be written after the resume.
    let mut uncertain: Option<(u64, bool)> = logged.last().map(|&g| (g, false));
    let mut hot_before: HashSet<u64> = HashSet::new();
    let mut out = TouchRun::default();
    let mut logged_all = HashSet::new();
    if let Some(f) = faults.as_deref_mut() {
        f.take();
    }
    for epoch in 1..=epochs {
        vm.resume_all().expect("resume");
        std::thread::sleep(run_for);
        vm.pause_all().expect("pause");
        let h: DirtyPages = tracker.harvest().expect("harvest");
        let epoch_faults = faults.as_deref_mut().map_or(0, Faults::take);
        let (count, logged) = read_log(&vm, &p, 0, seen);
        seen = count;
        assert!(!logged.is_empty(), "epoch {epoch}: the guest wrote nothing");
        let mut written: HashSet<u64> = logged.iter().copied().collect();
        if let Some((u, _)) = uncertain {
            written.insert(u);
        }
        let (&last, certain) = logged.split_last().unwrap();
        for &g in certain {
            assert!(
                h.contains(g),
                "epoch {epoch}: page {g:#x} was written but not harvested (prediction {prediction:?})"
            );
        }
        if let Some((u, true)) = uncertain {
            assert!(
                h.contains(u),
                "epoch {epoch}: page {u:#x} (last of the previous epoch) was never harvested"
            );
        }
        uncertain = Some((last, !h.contains(last)));
        for g in h.iter().filter(|g| region.contains(g)) {
            if !written.contains(&g) {
                assert!(
                    hot_before.contains(&g),
                    "epoch {epoch}: page {g:#x} harvested, not written, and not hot"
                );
                out.sent_unwritten += 1;
            }
        }
        hot_before = match tracker.predictor() {
            Some(pr) => h.iter().filter(|&g| pr.is_hot(g)).collect(),
            None => HashSet::new(),
        };
        // The first epochs build the history; measure from the third.
        if epoch > 2 {
            out.faults += epoch_faults;
            out.reported += h.len() as u64;
            out.unprotected += tracker.prediction_stats().map_or(0, |s| s.unprotected);
            logged_all.extend(certain.iter().copied());
        }
        if let Some(s) = tracker.prediction_stats() {
            eprintln!(
                "{prediction:?} epoch {epoch}: {} harvested, {} logged, write faults {}, hot {}, unprotected {}{}",
                h.len(),
                logged.len(),
                epoch_faults,
                s.hot,
                s.unprotected,
                if s.rechecked { " (re-check)" } else { "" }
            );
        }
    }
    if let Some(ev) = vm.wait_exit(Duration::ZERO) {
        panic!("the vCPU ended: {ev:?}");
    }
    vm.shutdown();
    out.logged = logged_all.len() as u64;
    eprintln!("region {region_bytes} B, {prediction:?}: {out:?}");
    out
}

#[test]
fn prediction_keeps_every_written_page_and_saves_write_faults() {
    in_child("faults");
}

fn faults_scenario() {
    let mut f = Faults::start();
    // 512 pages, ~12k writes an epoch: every page is rewritten every epoch.
    let off = touch_epochs(2 << 20, None, 10, Some(&mut f));
    let on = touch_epochs(
        2 << 20,
        Some(Prediction {
            k: 2,
            recheck_every: 4,
        }),
        10,
        Some(&mut f),
    );
    assert_eq!(off.unprotected, 0);
    assert!(
        on.unprotected > 0,
        "prediction left no page writable: {on:?}"
    );
    // Without prediction every rewritten page faults once an epoch; with
    // it only the re-check epochs (1 in 4) and pages that went cold do.
    assert!(
        off.faults >= off.logged,
        "without prediction, fewer write faults ({}) than pages written ({}): the counter does not count write faults",
        off.faults,
        off.logged
    );
    assert!(
        on.faults * 2 < off.faults,
        "prediction did not halve the write faults: {} with, {} without",
        on.faults,
        off.faults
    );
}

#[test]
fn prediction_is_exact_when_pages_go_hot_and_cold() {
    // 4096 pages, ~12k random writes an epoch: ~95 % of the pages are
    // written in a given epoch, so pages keep going hot and dropping out.
    for k in [1, 2, 4] {
        let r = touch_epochs(
            16 << 20,
            Some(Prediction {
                k,
                recheck_every: 3,
            }),
            12,
            None,
        );
        assert!(r.unprotected > 0, "k={k}: no page went hot: {r:?}");
    }
}

#[test]
fn prediction_in_ring_mode_is_refused() {
    require_kvm();
    let opts = RunOptions {
        workload: Workload::Touch,
        mem_bytes: 64 << 20,
        vcpus: 1,
        ..Default::default()
    };
    let (mut vm, tracker) =
        run::boot_tracked(&opts, DirtyMode::Ring { entries: 4096 }).expect("boot");
    let mut cp = EpochCheckpointer::new(&vm, tracker).expect("checkpointer");
    let err = cp
        .set_prediction(Some(Prediction::with_k(2)))
        .expect_err("ring mode accepted prediction");
    assert!(
        matches!(err, EpochError::Dirty(DirtyError::PredictionInRingMode)),
        "{err:?}"
    );
    let msg = format!("{}", DirtyError::PredictionInRingMode);
    assert!(msg.contains("ring") && msg.contains("bitmap"), "{msg}");
    cp.set_prediction(None).expect("off is always fine");
    vm.shutdown();
}

/// A 1-vCPU `touch` guest of `mem` bytes writing rounds of 256 pages of a
/// `region`-byte region with `idle_us` between them, and a checkpointer
/// for it (with write-fault prediction K=2, re-check every 4, if
/// `predict`).
fn touching_checkpointer(
    mem: u64,
    idle_us: u32,
    region: u64,
    predict: bool,
) -> (Vm, EpochCheckpointer) {
    let opts = RunOptions {
        workload: Workload::Touch,
        mem_bytes: mem,
        vcpus: 1,
        touch: TouchOptions {
            pages_per_round: 256,
            idle_us,
            region_bytes: region,
            ..Default::default()
        },
        ..Default::default()
    };
    let (vm, tracker) = run::boot_tracked(&opts, DirtyMode::Bitmap).expect("boot");
    let mut cp = EpochCheckpointer::new(&vm, tracker).expect("checkpointer");
    if predict {
        cp.set_prediction(Some(Prediction {
            k: 2,
            recheck_every: 4,
        }))
        .expect("prediction");
    }
    (vm, cp)
}

/// A checkpoint, and all of guest memory as it was during its pause.
fn checkpoint_and_snapshot(
    cp: &mut EpochCheckpointer,
    vm: &Vm,
) -> (simrep::vmm::epoch::EpochCheckpoint, Vec<u8>) {
    let mut at = vec![0u8; vm.memory().size() as usize];
    let c = cp
        .checkpoint_with(vm, false, &mut |vm| {
            vm.memory().read(0, &mut at).expect("snapshot");
        })
        .expect("checkpoint");
    (c, at)
}

/// With prediction and a dirty set above the copy limit the checkpoint
/// copies the hot pages and arms copy-on-write over the rest: every dirty
/// page read through that mixed view equals guest memory at the
/// checkpoint although the guest keeps writing while the view is open.
#[test]
fn mixed_views_hold_the_checkpoint() {
    use simrep::vmm::epoch::EpochView;
    require_kvm();
    let mem = 64u64 << 20;
    let (mut vm, mut cp) = touching_checkpointer(mem, 1000, 16 << 20, true);
    // Every dirty set goes past the limit.
    cp.copy_limit = 0;
    let (mut mixed, mut hot_copied, mut cold_cow) = (0, 0, 0);
    for epoch in 0..10 {
        std::thread::sleep(Duration::from_millis(60));
        let (c, at) = checkpoint_and_snapshot(&mut cp, &vm);
        // The guest writes into the open view.
        std::thread::sleep(Duration::from_millis(30));
        assert_view_is_checkpoint(&c, &at, epoch);
        if let EpochView::Mixed { gfns, cow, .. } = &c.view {
            mixed += 1;
            hot_copied += gfns.len();
            if cow.is_some() {
                cold_cow += c.dirty.len() - gfns.len();
            }
            for g in gfns {
                assert!(cp.tracker().predictor().unwrap().is_hot(*g));
            }
        }
        c.view.finish();
    }
    vm.shutdown();
    eprintln!("{mixed} mixed views: {hot_copied} hot pages copied, {cold_cow} copy-on-write");
    assert!(mixed >= 5, "only {mixed} mixed views");
    assert!(
        hot_copied > 0 && cold_cow > 0,
        "{hot_copied} copied, {cold_cow} cow"
    );
}

/// One benchmark configuration's per-epoch means.
struct Figures {
    faults: f64,
    sent: f64,
    unprotected: f64,
    pages_per_s: f64,
    pause_ms: f64,
}

/// Churn at `rate` MiB/s over `buffer` bytes, 50 ms epochs through
/// [`EpochCheckpointer`] with `copy_limit` (views finished at once: no
/// encoder), for `epochs` epochs after 10 warm-up epochs.
fn bench_churn(
    rate: u32,
    buffer: u64,
    copy_limit: usize,
    prediction: Option<Prediction>,
    epochs: usize,
) -> Figures {
    let opts = RunOptions {
        workload: Workload::Churn,
        mem_bytes: 256 << 20,
        vcpus: 1,
        churn: ChurnOptions {
            rate_mib_s: rate,
            buffer_bytes: Some(buffer),
            report_ms: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut faults = Faults::start();
    let (mut vm, tracker) = run::boot_tracked(&opts, DirtyMode::Bitmap).expect("boot churn");
    let mut cp = EpochCheckpointer::new(&vm, tracker).expect("checkpointer");
    cp.set_prediction(prediction).expect("set prediction");
    cp.copy_limit = copy_limit;
    let epoch = Duration::from_millis(50);
    let (mut faults_sum, mut sent, mut unprot, mut pause) = (0u64, 0u64, 0u64, Duration::ZERO);
    let mut start = None;
    for i in 0..10 + epochs {
        std::thread::sleep(epoch);
        // The faults of the epoch just ended, read while it is paused.
        let mut f = 0;
        let c = cp
            .checkpoint_with(&vm, false, &mut |_| f = faults.take())
            .expect("checkpoint");
        c.view.finish();
        if i == 10 {
            start = Some((Instant::now(), run::progress(&vm, 0).expect("progress")));
        } else if i > 10 {
            sent += c.dirty.len() as u64;
            unprot += cp.prediction_stats().map_or(0, |s| s.unprotected);
            pause += c.timings.total;
            faults_sum += f;
        }
        if let Some(ev) = vm.wait_exit(Duration::ZERO) {
            panic!("churn ended: {ev:?}");
        }
    }
    let (t0, p0) = start.unwrap();
    let pages = run::progress(&vm, 0).expect("progress") - p0;
    let secs = t0.elapsed().as_secs_f64();
    vm.shutdown();
    let n = (epochs - 1) as f64;
    Figures {
        faults: faults_sum as f64 / n,
        sent: sent as f64 / n,
        unprotected: unprot as f64 / n,
        pages_per_s: pages as f64 / secs,
        pause_ms: pause.as_secs_f64() * 1000.0 / n,
    }
}

/// Not a timed test: prints write faults, pages sent and churn throughput
/// per 50 ms epoch, without prediction and with k = 1, 2, 4.
#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn bench() {
    in_child("bench");
}

fn bench_scenario() {
    let epochs = 80;
    eprintln!(
        "| churn | copy limit | prediction | write faults/epoch | pages sent/epoch | left writable/epoch | churn pages/s | pause ms/epoch |"
    );
    eprintln!("|---|---|---|---|---|---|---|---|");
    let default_limit = simrep::vmm::epoch::DEFAULT_COPY_LIMIT;
    for (rate, buffer, limit) in [
        (100, 1u64 << 20, default_limit),
        (0, 1 << 20, default_limit),
        (100, 16 << 20, default_limit),
        (100, 64 << 20, default_limit),
        (400, 16 << 20, default_limit),
        (400, 16 << 20, 8192),
    ] {
        let mut cfgs: Vec<Option<Prediction>> = vec![None];
        for k in [1, 2, 4] {
            cfgs.push(Some(Prediction {
                k,
                recheck_every: 20,
            }));
        }
        cfgs.push(Some(Prediction {
            k: 2,
            recheck_every: 5,
        }));
        for cfg in cfgs {
            let f = bench_churn(rate, buffer, limit, cfg, epochs);
            let name = match cfg {
                None => "off".to_string(),
                Some(p) => format!("k={} recheck={}", p.k, p.recheck_every),
            };
            let rate = if rate == 0 {
                "max".to_string()
            } else {
                format!("{rate} MiB/s")
            };
            eprintln!(
                "| {rate}, {} MiB buffer | {limit} | {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} |",
                buffer >> 20,
                f.faults,
                f.sent,
                f.unprotected,
                f.pages_per_s,
                f.pause_ms
            );
        }
    }
}

/// Pre-armed checkpoints (`EpochCheckpointer::prearm` a little before each,
/// the guest writing all along, and on into the open view): every dirty
/// page read through the view equals guest memory at the checkpoint, with
/// write-fault prediction off and on. The pre-arm protects the pages the
/// guest wrote so far, so it runs from the first epoch on.
#[test]
fn prearmed_views_hold_the_checkpoint() {
    require_kvm();
    let mem = 64u64 << 20;
    for predict in [false, true] {
        let (mut vm, mut cp) = touching_checkpointer(mem, 200, 32 << 20, predict);
        // Small enough that every epoch's set is larger.
        cp.copy_limit = 64;
        cp.checkpoint(&vm).expect("first checkpoint").view.finish();
        let (mut prearmed, mut faults) = (0, 0);
        for epoch in 0..12 {
            std::thread::sleep(Duration::from_millis(40));
            if let Some(p) = cp.prearm().expect("pre-arm") {
                assert!(p.protected_pages > 0);
                prearmed += 1;
            }
            // The guest writes between the pre-arm and the checkpoint.
            std::thread::sleep(Duration::from_millis(3));
            let (c, at) = checkpoint_and_snapshot(&mut cp, &vm);
            assert!(
                !cp.cow().is_prearmed(),
                "the checkpoint took the pre-arm over"
            );
            // The guest writes into the open view.
            std::thread::sleep(Duration::from_millis(20));
            assert_view_is_checkpoint(&c, &at, format!("{epoch} (predict {predict})"));
            if let Some(st) = c.view.finish() {
                faults += st.prearm_faults;
            }
        }
        vm.shutdown();
        eprintln!(
            "predict {predict}: {prearmed} of 12 checkpoints pre-armed, {faults} huge pages written between pre-arm and checkpoint"
        );
        assert!(prearmed >= 11, "only {prearmed} pre-armed");
        assert!(
            faults > 0,
            "the guest wrote nothing between pre-arm and checkpoint"
        );
    }
}
