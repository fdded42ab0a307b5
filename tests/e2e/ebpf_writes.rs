//! End-to-end tests of eBPF write tracing (`simrep::ebpf::WriteTracer`) with
//! a real KVM guest: the gated `touch` workload logs each page before it
//! writes it, and the pages the programs saw written in a round must equal
//! (dirty ring) or include (page-table walks) the logged ones.
//!
//! The programs filter by thread group, so every VM of a process is
//! attributed to it: each test runs its VM in a child process (this test
//! binary re-run on one ignored helper), where it is the only VM.
//!
//! Needs root, bpffs, tracefs, `bpftool` and `/dev/kvm`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use simrep::dirty::{DirtyMode, DirtyPages};
use simrep::ebpf::{
    EbpfError, EpochWrites, WriteSource, WriteTracer, WriteTracing, CONFIG_MAP, FAULT_PAGES_MAP,
    RING_PAGES_MAP, WALK_PAGES_MAP, WRITE_PINNED_MAPS, WRITE_STATS_MAP,
};
use simrep::vmm::abi::{self, TouchParams};
use simrep::vmm::run::{self, RunOptions, TouchOptions, Workload};
use simrep::vmm::Vm;
use tests::require_kvm;

use super::dirty::{header, read_log};
use super::ebpf::{bpftool_dump, dump_entries, error_chain, json_number, require_root};

const PAGE: u64 = abi::PAGE_SIZE;
/// Pages written per gated round.
const PER_ROUND: u32 = 200;
/// Rounds checked.
const ROUNDS: u64 = 4;
/// Env var naming the helper's scenario.
const HELPER_ENV: &str = "SIMREP_E2E_EBPF_WRITES_HELPER";
/// Env var with the VM name the helper uses (default: made up).
const NAME_ENV: &str = "SIMREP_E2E_EBPF_WRITES_NAME";

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
        .write_obj(p.log_gpa + abi::TOUCH_LOG_GO_OFFSET, round)
        .expect("write go");
}

/// Runs `scenario` in a child process; fails with its output if it fails.
fn in_child(scenario: &str) {
    require_root();
    require_kvm();
    let text = tests::run_ignored_test("ebpf_writes::helper", &[(HELPER_ENV, scenario)]);
    eprintln!("{text}");
    assert!(text.contains("1 passed"), "the helper did not run:\n{text}");
}

#[test]
fn ring_pages_equal_the_guest_log() {
    in_child("ring");
}

#[test]
fn walk_pages_include_the_guest_log() {
    in_child("walk");
}

#[test]
fn stale_pins_of_a_crashed_vmm_are_replaced() {
    require_root();
    let name = format!("e2e-writes-stale-{}", std::process::id());
    tests::run_ignored_test(
        "ebpf_writes::helper",
        &[(HELPER_ENV, "crash"), (NAME_ENV, &name)],
    );
    let pin_dir = PathBuf::from("/sys/fs/bpf/simrep").join(&name);
    let stale = pin_dir.join(CONFIG_MAP);
    assert!(stale.exists(), "the crashed run left no pin to replace");
    let stale_config = dump_entries(&bpftool_dump(&stale, true));

    let me = std::process::id();
    let tracer = WriteTracer::start(&name, me)
        .unwrap_or_else(|e| panic!("restart over stale pins: {}", error_chain(&e)));
    let config = dump_entries(&bpftool_dump(&tracer.map_pin_path(CONFIG_MAP), true));
    assert_ne!(config, stale_config, "the stale pin was not replaced");
    assert_eq!(
        json_number(&config[0]["value"]["target_tgid"]),
        u64::from(me),
        "{config:?}"
    );
    drop(tracer);
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
}

#[test]
fn no_source_is_unavailable_with_the_reasons() {
    require_root();
    let name = format!("e2e-writes-none-{}", std::process::id());
    match WriteTracer::try_start_with(&name, std::process::id(), &[]) {
        WriteTracing::Unavailable {
            reason: EbpfError::NoWriteSource { missing },
        } => {
            assert!(
                missing.contains("kvm:kvm_dirty_ring_push: not requested")
                    && missing.contains("kvmmmu:kvm_mmu_pagetable_walk: not requested")
                    && missing.contains("kvm:kvm_page_fault: not requested")
                    && missing.contains("kvmmmu:fast_page_fault: not requested"),
                "{missing}"
            );
        }
        other => panic!("expected Unavailable(NoWriteSource), got {other:?}"),
    }
    // Nothing is left pinned by the failed start.
    let pin_dir = PathBuf::from("/sys/fs/bpf/simrep").join(&name);
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
    // Invalid names are refused before anything is loaded.
    assert!(matches!(
        WriteTracer::try_start("../x", 1),
        WriteTracing::Unavailable {
            reason: EbpfError::InvalidName { .. }
        }
    ));
}

/// Not a timed test: guest write throughput of `churn` (as fast as
/// possible, 256 MiB, dirty ring, 100 ms epochs with a harvest each) with
/// and without the programs attached, alternating runs in child processes.
/// Run with `--ignored --nocapture`.
#[test]
#[ignore = "a benchmark: run with --ignored --nocapture"]
fn churn_overhead() {
    for i in 0..3 {
        for mode in ["bench-off", "bench-ring", "bench-walk", "bench-both"] {
            eprintln!("run {i} {mode}");
            in_child(mode);
        }
    }
}

/// Runs churn for 20 epochs; prints guest pages written per second.
fn bench_churn(tracer: WriteTracer, mode: &str) {
    // Without: detach and unpin before the guest starts.
    let mut tracer = (mode != "off").then_some(tracer);
    let opts = RunOptions {
        workload: Workload::Churn,
        mem_bytes: 256 << 20,
        vcpus: 1,
        timer_hz: 0,
        churn: run::ChurnOptions {
            rate_mib_s: 0,
            report_ms: 0,
            ..Default::default()
        },
        ..Default::default()
    };
    let (mut vm, mut tracker) = run::boot_tracked(&opts, DirtyMode::Ring { entries: 65536 })
        .expect("boot with dirty tracking");
    std::thread::sleep(Duration::from_millis(300));
    vm.pause_all().expect("pause");
    tracker.harvest().expect("first harvest");
    if let Some(t) = tracer.as_mut() {
        t.take_epoch().expect("epoch");
    }
    let (mut pages, mut ran, mut dirty, mut seen) = (0u64, Duration::ZERO, 0usize, 0usize);
    let mut take = Duration::ZERO;
    for _ in 0..20 {
        let before = run::progress(&vm, 0).expect("progress");
        let t0 = Instant::now();
        vm.resume_all().expect("resume");
        std::thread::sleep(Duration::from_millis(100));
        vm.pause_all().expect("pause");
        ran += t0.elapsed();
        pages += run::progress(&vm, 0).expect("progress") - before;
        let h = tracker.harvest().expect("harvest");
        dirty += h.len();
        if let Some(t) = tracer.as_mut() {
            let t0 = Instant::now();
            let w = t.take_epoch().expect("epoch");
            take += t0.elapsed();
            seen += w.ring_frames.len().max(w.walk_pages.len());
            let c = w.cross_check(tracer_source(t), &h);
            if !c.is_exact() {
                eprintln!("cross-check: {c}");
            }
        }
    }
    vm.shutdown();
    eprintln!(
        "BENCH programs {mode}: {:.0} pages/s written ({pages} pages in {ran:.2?}), {dirty} pages harvested, {seen} seen by eBPF (take_epoch {take:.2?} in total)",
        pages as f64 / ran.as_secs_f64()
    );
}

/// The source a benchmark tracer cross-checks: the ring if attached.
fn tracer_source(t: &WriteTracer) -> WriteSource {
    if t.sources().contains(&WriteSource::DirtyRing) {
        WriteSource::DirtyRing
    } else {
        WriteSource::PagetableWalk
    }
}

/// Not a test: run by the tests above in a child process.
#[test]
#[ignore = "helper run by the ebpf_writes tests in a child process"]
fn helper() {
    let Ok(scenario) = std::env::var(HELPER_ENV) else {
        return;
    };
    let vm_name = std::env::var(NAME_ENV)
        .unwrap_or_else(|_| format!("e2e-writes-{scenario}-{}", std::process::id()));
    let mut tracer = WriteTracer::start(&vm_name, std::process::id())
        .unwrap_or_else(|e| panic!("cannot start eBPF write tracing: {}", error_chain(&e)));
    eprintln!(
        "active sources {:?}, missing {:?}",
        tracer.sources(),
        tracer.missing()
    );
    if scenario == "crash" {
        assert!(tracer.map_pin_path(WALK_PAGES_MAP).exists());
        // Like a crash: no destructors run, the pins stay.
        std::process::exit(0);
    }
    if let Some(mode) = scenario.strip_prefix("bench-") {
        bench_churn(tracer, mode);
        return;
    }
    let source = match scenario.as_str() {
        "ring" => WriteSource::DirtyRing,
        "walk" => WriteSource::PagetableWalk,
        other => panic!("unknown scenario {other}"),
    };
    // Both tracepoints exist in this host's tracefs (they fire only with
    // hardware-assisted paging), so their programs load and attach.
    for fault_source in [WriteSource::KvmPageFault, WriteSource::FastPageFault] {
        assert!(
            tracer.sources().contains(&fault_source),
            "{fault_source:?} did not attach: {:?}",
            tracer.missing()
        );
    }
    assert!(
        tracer.sources().contains(&source),
        "{source:?} is not active on this host: {:?}",
        tracer.missing()
    );
    // A second instance aimed at another process (init) sees the same
    // events and filters all of them out.
    let mut bystander = match WriteTracer::try_start(&format!("{vm_name}-other"), 1) {
        WriteTracing::Active(t) => *t,
        WriteTracing::Unavailable { reason } => panic!("second tracer: {}", error_chain(&reason)),
    };
    // The same name while the first instance lives: unavailable, with why.
    match WriteTracer::try_start(&vm_name, 1) {
        WriteTracing::Unavailable {
            reason: EbpfError::PinDirInUse { .. },
        } => {}
        other => panic!("expected Unavailable(PinDirInUse), got {other:?}"),
    }
    let pin_dir = tracer.pin_dir().to_owned();
    assert_eq!(pin_dir, PathBuf::from("/sys/fs/bpf/simrep").join(&vm_name));

    let mem = 64 << 20;
    let opts = RunOptions {
        workload: Workload::Touch,
        mem_bytes: mem,
        vcpus: 1,
        timer_hz: 0,
        touch: TouchOptions {
            pages_per_round: PER_ROUND,
            gated: true,
            region_bytes: mem,
            ..Default::default()
        },
        ..Default::default()
    };
    let p = opts.boot_params(1).touch;
    let (mut vm, mut tracker) = run::boot_tracked(&opts, DirtyMode::Ring { entries: 65536 })
        .expect("boot with dirty tracking");
    wait_round(&vm, &p, 1);
    vm.pause_all().expect("pause");
    tracker.harvest().expect("first harvest");
    let boot = tracer.take_epoch().expect("take the boot epoch");
    eprintln!("boot epoch: {:?}", boot.stats);
    let region = p.region_gpa / PAGE..p.region_gpa / PAGE + p.region_pages;

    let mut last = None;
    for round in 1..=ROUNDS {
        let (before, _) = read_log(&vm, &p, 0, 0);
        go(&vm, &p, round);
        vm.resume_all().expect("resume");
        wait_round(&vm, &p, round + 1);
        vm.pause_all().expect("pause");
        let harvest = tracker.harvest().expect("harvest");
        let (_, logged) = read_log(&vm, &p, 0, before);
        assert_eq!(logged.len(), PER_ROUND as usize, "round {round}");
        let logged: BTreeSet<u64> = logged.into_iter().collect();
        if round == ROUNDS {
            check_bpftool(&tracer, &scenario);
        }
        let w = tracer.take_epoch().expect("take the epoch");
        check_round(round, &scenario, &w, &logged, &harvest, &region);
        last = Some(w);
    }
    let last = last.expect("rounds ran");
    // A paused guest writes nothing: the next epoch is empty.
    let idle = tracer.take_epoch().expect("take an empty epoch");
    assert!(
        idle.ring_frames.is_empty() && idle.walk_pages.is_empty(),
        "paused guest: {idle:?}"
    );
    assert_eq!(idle.stats.ring_events + idle.stats.walk_events, 0);
    eprintln!("last round stats: {:?}", last.stats);
    let other = bystander.take_epoch().expect("bystander epoch");
    eprintln!("tracer aimed at pid 1: {:?}", other.stats);
    assert!(
        other.ring_frames.is_empty() && other.walk_pages.is_empty(),
        "events of this process were attributed to pid 1: {other:?}"
    );
    let ours = ROUNDS * u64::from(PER_ROUND) / 2;
    match source {
        WriteSource::DirtyRing => assert!(other.stats.ring_filtered >= ours, "{other:?}"),
        WriteSource::PagetableWalk => assert!(other.stats.walk_filtered >= ours, "{other:?}"),
        WriteSource::KvmPageFault | WriteSource::FastPageFault => {
            unreachable!("the scenarios are ring and walk")
        }
    }
    drop(bystander);

    vm.shutdown();
    let pins: Vec<PathBuf> = WRITE_PINNED_MAPS
        .iter()
        .map(|m| tracer.map_pin_path(m))
        .collect();
    assert!(pins.iter().all(|p| p.exists()));
    drop(tracer);
    for pin in &pins {
        assert!(!pin.exists(), "{} left behind", pin.display());
    }
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
}

fn check_round(
    round: u64,
    scenario: &str,
    w: &EpochWrites,
    logged: &BTreeSet<u64>,
    harvest: &DirtyPages,
    region: &std::ops::Range<u64>,
) {
    let ring: BTreeSet<u64> = w.ring_frames.keys().copied().collect();
    let walk: BTreeSet<u64> = w.walk_pages.keys().copied().collect();
    eprintln!(
        "round {round}: logged {}, harvest {}, ring {}, walk {} pages; {:?}",
        logged.len(),
        harvest.len(),
        ring.len(),
        walk.len(),
        w.stats
    );
    assert_eq!(w.stats.read_errors, 0, "{:?}", w.stats);
    assert_eq!(w.stats.map_full, 0, "{:?}", w.stats);
    assert!(w.ring_other_slots.is_empty(), "{:?}", w.ring_other_slots);
    // The fault sources: consistent counters. Under PVM (this host)
    // `kvm_page_fault` and `fast_page_fault` never fire, so the counts
    // themselves are not checked here; on VMX/SVM they are the guest's
    // write faults.
    assert_eq!(w.stats.fault_writes, w.fault_frames.values().sum::<u64>());
    assert!(
        w.stats.fault_events >= w.stats.fault_writes,
        "{:?}",
        w.stats
    );
    let c = w.cross_check(WriteSource::KvmPageFault, harvest);
    assert_eq!(c.both + c.only_ebpf.len(), w.fault_frames.len(), "{c}");
    match scenario {
        "ring" => {
            let in_region: BTreeSet<u64> = ring
                .iter()
                .copied()
                .filter(|g| region.contains(g))
                .collect();
            assert_eq!(
                &in_region, logged,
                "round {round}: the ring pages in the touch region differ from the guest's log"
            );
            // KVM pushes what the harvest reads; the harvest may add only
            // a page the VMM itself wrote (the `go` word in the log page).
            let c = w.cross_check(WriteSource::DirtyRing, harvest);
            eprintln!("round {round}: cross-check {c}");
            assert!(
                c.only_ebpf.is_empty() && c.only_harvest.len() <= 1,
                "round {round}: eBPF and the harvest differ: {c}"
            );
            assert_eq!(w.stats.ring_events, w.ring_frames.values().sum::<u64>());
        }
        _ => {
            eprintln!(
                "round {round}: cross-check {}",
                w.cross_check(WriteSource::PagetableWalk, harvest)
            );
            // Identity-mapped guest: virtual page = frame.
            let missed: Vec<_> = logged.difference(&walk).collect();
            assert!(
                missed.is_empty(),
                "round {round}: logged pages without a write walk: {missed:#x?}"
            );
            assert_eq!(w.stats.walk_writes, w.walk_pages.values().sum::<u64>());
            assert!(w.stats.walk_events >= w.stats.walk_writes);
        }
    }
}

/// `bpftool map dump pinned` (plain and `-j`) shows the epoch's pages.
fn check_bpftool(tracer: &WriteTracer, scenario: &str) {
    let map = if scenario == "ring" {
        RING_PAGES_MAP
    } else {
        WALK_PAGES_MAP
    };
    let path = tracer.map_pin_path(map);
    let plain = bpftool_dump(&path, false);
    assert!(
        plain.contains("\"cpu\": 0"),
        "bpftool does not show the per-CPU page map:\n{plain}"
    );
    let entries = dump_entries(&bpftool_dump(&path, true));
    assert!(
        entries.len() >= PER_ROUND as usize,
        "bpftool -j shows {} entries in {map}, expected >= {PER_ROUND}",
        entries.len()
    );
    for e in &entries {
        let sum: u64 = e["values"]
            .as_array()
            .expect("per-CPU values")
            .iter()
            .map(|v| json_number(&v["value"]))
            .sum();
        assert!(sum > 0, "entry without events: {e}");
    }
    // The fault-page map dumps too (empty under PVM: its tracepoints do not
    // fire here), with every entry non-zero.
    let fault_path = tracer.map_pin_path(FAULT_PAGES_MAP);
    assert!(fault_path.exists(), "{} not pinned", fault_path.display());
    let _ = bpftool_dump(&fault_path, false);
    let faults = dump_entries(&bpftool_dump(&fault_path, true));
    let fault_sum: u64 = faults
        .iter()
        .flat_map(|e| e["values"].as_array().expect("per-CPU values").iter())
        .map(|v| json_number(&v["value"]))
        .sum();
    assert!(faults.is_empty() || fault_sum > 0, "{faults:?}");
    let stats = dump_entries(&bpftool_dump(&tracer.map_pin_path(WRITE_STATS_MAP), true));
    assert_eq!(stats.len(), simrep::ebpf::WriteStat::COUNT as usize);
    let _: &Value = &stats[0]["values"];
    eprintln!(
        "bpftool map dump pinned {}: {} entries",
        path.display(),
        entries.len()
    );
}
