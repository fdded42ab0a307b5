//! End-to-end tests of the copy-on-write view with a real KVM guest: the
//! `churn` workload's vCPUs write guest memory inside `KVM_RUN` while
//! readers check the view byte for byte against a snapshot taken at the
//! checkpoint.
//!
//! They need `/dev/kvm` and the right to open it and a userfaultfd (root on
//! this project's machines); without them every test fails and says why.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::require_kvm;

use simrep::dirty::cow::{CowMemory, CowOptions, CowStats, PageSource, PAGE_SIZE};
use simrep::vmm::run::{self, ChurnOptions, RunOptions, Workload};
use simrep::vmm::Vm;

const PAGE: u64 = PAGE_SIZE as u64;

fn churn(mem_bytes: u64, vcpus: u32, rate_mib_s: u32) -> RunOptions {
    RunOptions {
        workload: Workload::Churn,
        mem_bytes,
        vcpus,
        churn: ChurnOptions {
            rate_mib_s,
            report_ms: 0,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn progress(vm: &Vm, vcpus: u32) -> Vec<u64> {
    (0..vcpus)
        .map(|c| run::progress(vm, c).expect("progress"))
        .collect()
}

fn total(p: &[u64]) -> u64 {
    p.iter().sum()
}

fn boot(opts: &RunOptions) -> Vm {
    let vm = run::boot(opts).expect("boot the churn guest");
    let start = Instant::now();
    while progress(&vm, opts.vcpus).contains(&0) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "churn never started: {:?}",
            progress(&vm, opts.vcpus)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    vm
}

fn snapshot(vm: &Vm) -> Vec<u8> {
    let mem = vm.memory();
    let mut all = vec![0u8; mem.size() as usize];
    mem.read(0, &mut all).expect("snapshot");
    all
}

/// Pages written by the guest per second over `window`.
fn rate(vm: &Vm, vcpus: u32, window: Duration) -> f64 {
    let p0 = total(&progress(vm, vcpus));
    let t = Instant::now();
    std::thread::sleep(window);
    let p1 = total(&progress(vm, vcpus));
    (p1 - p0) as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_dur(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p99_dur(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * 0.99).round() as usize]
}

#[test]
fn view_equals_the_checkpoint_while_vcpus_write() {
    require_kvm();
    let vcpus = 2;
    // rate 0: the vCPUs write as fast as they can, every page of their
    // share of the heap every few milliseconds.
    let opts = churn(64 << 20, vcpus, 0);
    let mut vm = boot(&opts);
    let cow = CowMemory::new(Arc::clone(vm.memory())).expect("register guest memory");
    let pages = cow.pages();
    let before = rate(&vm, vcpus, Duration::from_millis(300));
    for round in 0..4 {
        vm.pause_all().expect("pause");
        let snap = snapshot(&vm);
        let p0 = progress(&vm, vcpus);
        // Rounds 0-2 arm all of memory; round 3 every third page (a set
        // view, its gaps protected too by the default coalescing).
        let armed: Vec<u64> = if round < 3 {
            (0..pages).collect()
        } else {
            (0..pages).step_by(3).collect()
        };
        let view = if round < 3 {
            cow.arm_all().expect("arm")
        } else {
            cow.arm(&armed).expect("arm a set")
        };
        vm.resume_all().expect("resume");
        // Let the guest write for a while, then read the whole view with two
        // threads while it keeps writing.
        std::thread::sleep(Duration::from_millis(200));
        let p_mid = progress(&vm, vcpus);
        let saved: Vec<BTreeSet<u64>> = std::thread::scope(|s| {
            let readers: Vec<_> = (0..2u64)
                .map(|r| {
                    let (view, snap, armed) = (&view, &snap, &armed);
                    s.spawn(move || {
                        let mut buf = [0u8; PAGE_SIZE];
                        let mut saved = BTreeSet::new();
                        for &gfn in armed.iter().skip(r as usize).step_by(2) {
                            let src = view.read_page(gfn, &mut buf).expect("read the view");
                            let want = &snap[(gfn * PAGE) as usize..][..PAGE_SIZE];
                            assert!(
                                buf[..] == *want,
                                "round {round}: page {gfn:#x} ({src:?}) differs from the checkpoint"
                            );
                            if src == PageSource::Saved {
                                saved.insert(gfn);
                            }
                        }
                        saved
                    })
                })
                .collect();
            readers.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let saved: BTreeSet<u64> = saved.into_iter().flatten().collect();
        let p1 = progress(&vm, vcpus);
        // Pages whose live content differs from the checkpoint now: the
        // guest wrote them; each must have been saved.
        vm.pause_all().expect("pause");
        let now = snapshot(&vm);
        let changed: Vec<u64> = armed
            .iter()
            .copied()
            .filter(|&g| {
                let r = (g * PAGE) as usize..((g + 1) * PAGE) as usize;
                now[r.clone()] != snap[r]
            })
            .collect();
        vm.resume_all().expect("resume");
        let stats = view.finish();
        eprintln!(
            "round {round}: progress {p0:?} -> {p_mid:?} -> {p1:?}; {} pages changed, {} read from copies; {stats:?}",
            changed.len(),
            saved.len()
        );
        for c in 0..vcpus as usize {
            assert!(
                p_mid[c] > p0[c] && p1[c] >= p_mid[c],
                "round {round}: vCPU {c} made no progress under the view: {p0:?} {p_mid:?} {p1:?}"
            );
        }
        assert!(
            !changed.is_empty(),
            "round {round}: the guest changed nothing"
        );
        // Every page that differs from the checkpoint was protected at the
        // checkpoint, so its first write must have been caught and copied.
        assert!(
            stats.pages_copied >= changed.len() as u64,
            "round {round}: {} pages changed but only {} were copied: writes bypassed the protection",
            changed.len(),
            stats.pages_copied
        );
        assert!(
            stats.pages_copied > 0 && stats.faults > 0,
            "round {round}: vCPU writes raised no write-protect fault"
        );
        assert_eq!(stats.handler_errors, 0);
    }
    // Nothing left protected: the guest runs with no fault at all, at its
    // old speed.
    let f0 = cow.faults_total();
    let after = rate(&vm, vcpus, Duration::from_millis(300));
    assert_eq!(
        cow.faults_total(),
        f0,
        "write-protect faults after finish: pages were left protected"
    );
    eprintln!("churn rate before arming {before:.0} pages/s, after finish {after:.0} pages/s");
    assert!(after > 0.0);
    assert!(vm.wait_exit(Duration::ZERO).is_none(), "a vCPU ended");
    vm.shutdown();
}

/// `AnonHugePages` of the mapping at `addr`, in MiB.
fn anon_huge_mib(addr: u64) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
    let mut inside = false;
    for line in smaps.lines() {
        let range = line.split(' ').next().unwrap_or("");
        if let Some((a, b)) = range.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                inside = (a..b).contains(&addr);
                continue;
            }
        }
        if let Some(v) = line.strip_prefix("AnonHugePages:").filter(|_| inside) {
            return v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .expect("kB")
                >> 10;
        }
    }
    panic!("no mapping at {addr:#x}")
}

fn random_pages(n: usize, pages: u64, seed: u64) -> Vec<u64> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % pages
        })
        .collect()
}

/// Not a timed test: measures arming, fault cost and the guest's slowdown
/// under a view (run with `--nocapture`); fails only on absurd results.
#[test]
fn cow_costs_with_a_1gib_guest() {
    require_kvm();
    let reps = 7;
    // One vCPU at full speed over 1 GiB: inside a short window every write
    // goes to a page not yet written, so every written page is one fault.
    let opts = churn(1 << 30, 1, 0);
    let mut vm = boot(&opts);
    let mut cow = CowMemory::new(Arc::clone(vm.memory())).expect("register");
    let pages = cow.pages();
    let window = Duration::from_millis(200);
    let mut arm_all = Vec::new();
    let mut finish_all = Vec::new();
    let mut fault_handler = Vec::new();
    let mut per_fault_guest = Vec::new();
    let mut rate_armed = Vec::new();
    let mut rate_free = Vec::new();
    let mut last: Option<CowStats> = None;
    for _ in 0..reps {
        rate_free.push(rate(&vm, 1, window));
        vm.pause_all().expect("pause");
        let p0 = total(&progress(&vm, 1));
        let view = cow.arm_all().expect("arm");
        let t = Instant::now();
        vm.resume_all().expect("resume");
        std::thread::sleep(window);
        let p1 = total(&progress(&vm, 1));
        let dt = t.elapsed();
        let stats = view.finish();
        let written = p1 - p0;
        rate_armed.push(written as f64 / dt.as_secs_f64());
        if written > 0 {
            per_fault_guest.push(dt / u32::try_from(written).unwrap_or(u32::MAX));
        }
        arm_all.push(stats.arm_time);
        finish_all.push(stats.finish_time);
        fault_handler.push(stats.fault_median);
        last = Some(stats);
    }
    eprintln!("last whole-memory epoch: {last:?}");
    let huge_before = anon_huge_mib(vm.memory().host_addr());
    let mut arm_set = Vec::new();
    let per_page = CowOptions {
        coalesce_gap: 0,
        max_ranges: usize::MAX,
        align: 1,
        block_copy_max: 0,
    };
    for n in [1000usize, 20_000] {
        for (layout, clustered) in [("random", false), ("in runs of 64", true)] {
            for (opt_name, options) in [("default", CowOptions::default()), ("per-run", per_page)] {
                cow.set_options(options);
                let (mut arm, mut fin, mut protected) = (Vec::new(), Vec::new(), 0);
                for i in 0..reps {
                    let seed = 0x9e37_79b9 + i as u64;
                    let set = if clustered {
                        random_pages(n / 64, pages / 64, seed)
                            .into_iter()
                            .flat_map(|b| b * 64..b * 64 + 64)
                            .collect()
                    } else {
                        random_pages(n, pages, seed)
                    };
                    vm.pause_all().expect("pause");
                    let view = cow.arm(&set).expect("arm a set");
                    vm.resume_all().expect("resume");
                    std::thread::sleep(Duration::from_millis(50));
                    let stats = view.finish();
                    arm.push(stats.arm_time);
                    fin.push(stats.finish_time);
                    protected = stats.protected_pages;
                }
                arm_set.push(format!(
                    "arm {n} pages {layout}, {opt_name} options: {:?} (p99 {:?}), finish {:?}, {protected} pages protected",
                    median_dur(arm.clone()),
                    p99_dur(arm),
                    median_dur(fin)
                ));
            }
        }
    }
    cow.set_options(CowOptions::default());
    // The same whole-memory arm once the sets' faults and un-protects have
    // split many huge pages.
    let huge_after = anon_huge_mib(vm.memory().host_addr());
    let mut arm_split = Vec::new();
    for _ in 0..reps {
        vm.pause_all().expect("pause");
        let view = cow.arm_all().expect("arm");
        vm.resume_all().expect("resume");
        std::thread::sleep(Duration::from_millis(50));
        arm_split.push(view.finish().arm_time);
    }
    let f0 = cow.faults_total();
    let free_after = rate(&vm, 1, window);
    assert_eq!(cow.faults_total(), f0, "faults with no view open");
    vm.shutdown();

    eprintln!(
        "1 GiB guest, 1 vCPU, churn at full speed, {reps} runs, medians:\n\
         arm whole range {:?} (p99 {:?}), finish {:?}, with {huge_before} MiB in huge pages\n\
         arm whole range {:?} with {huge_after} MiB in huge pages (after the set epochs)\n\
         {}\n\
         fault: handler {:?} per page, guest-observed {:?} per written page\n\
         churn rate: no view {:.0} pages/s, view armed {:.0} pages/s, after the last finish {:.0} pages/s",
        median_dur(arm_all.clone()),
        p99_dur(arm_all),
        median_dur(finish_all),
        median_dur(arm_split),
        arm_set.join("\n"),
        median_dur(fault_handler),
        median_dur(per_fault_guest),
        median(rate_free),
        median(rate_armed),
        free_after,
    );
}
