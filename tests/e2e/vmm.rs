//! End-to-end tests of the VMM with real KVM: the bundled guest boots, runs
//! its workloads at CPL3, reports faults through its exception path, and
//! pauses/resumes on command.
//!
//! They need `/dev/kvm` and the right to open it (root on this project's
//! machines); without them every test fails and says why.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tests::{require_kvm, run_cli};

use simrep::vmm::abi;
use simrep::vmm::run::{self, ChurnOptions, Fault, RunOptions, Workload};
use simrep::vmm::vcpu::{VcpuError, VcpuOutcome, VcpuState};
use simrep::vmm::{boot, Vm, VmmError, GUEST_ELF};

fn small(workload: Workload) -> RunOptions {
    RunOptions {
        workload,
        mem_bytes: 64 << 20,
        vcpus: 1,
        churn: ChurnOptions {
            rate_mib_s: 50,
            report_ms: 0,
            ..Default::default()
        },
        mmio_round_trips: 10,
        ..Default::default()
    }
}

fn expect_exception(fault: Fault, vector: u64) -> abi::ExceptionReport {
    let opts = RunOptions {
        fault,
        ..small(Workload::Selftest)
    };
    match run::run(&opts, &AtomicBool::new(false)) {
        Err(VmmError::Vcpu(VcpuError::GuestException { vcpu: 0, report })) => {
            assert_eq!(
                report.vector, vector,
                "{fault:?}: wrong vector in {report:?}"
            );
            assert_eq!(
                report.cs & 3,
                3,
                "{fault:?}: the fault should come from CPL3"
            );
            report
        }
        other => panic!("{fault:?}: expected a guest exception, got {other:?}"),
    }
}

#[test]
fn churn_runs_and_reports_progress_on_the_console() {
    require_kvm();
    let (code, err) = run_cli(
        &[
            "run",
            "--workload",
            "churn",
            "--mem",
            "64M",
            "--vcpus",
            "2",
            "--rate",
            "40",
            "--report-ms",
            "500",
            "--seconds",
            "2",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "stderr:\n{err}");
    assert!(err.contains("churn: 2 vCPU(s)"), "no churn banner:\n{err}");
    for cpu in 0..2 {
        assert!(
            err.contains(&format!("churn cpu{cpu}: t=")),
            "no progress from cpu{cpu}:\n{err}"
        );
        assert!(
            err.contains(&format!("churn cpu{cpu}: done")),
            "cpu{cpu} did not finish:\n{err}"
        );
    }
    assert!(err.contains("guest stopped"), "{err}");
}

#[test]
fn selftest_page_fault_goes_through_the_guest_exception_path() {
    require_kvm();
    let (code, err) = run_cli(
        &[
            "run",
            "--workload",
            "selftest",
            "--fault",
            "pf",
            "--mem",
            "64M",
        ],
        Duration::from_secs(60),
    );
    // The guest's own line, written by its CPL0 handler ...
    assert!(
        err.contains("exception #PF vector=14 error=0x6"),
        "no guest report:\n{err}"
    );
    // ... and the VMM's typed error and exit code.
    assert!(
        err.contains("guest exception #PF (vector 14)") && err.contains("cr2 0x8"),
        "{err}"
    );
    assert_eq!(code, Some(4), "stderr:\n{err}");
    assert!(err.contains("selftest cpu0: running at CPL3"), "{err}");
    assert!(err.contains("memory check: 0 bad words"), "{err}");
    if let Some(line) = err.lines().find(|l| l.contains("mmio write round trip")) {
        eprintln!("{line}");
    }
}

#[test]
fn selftest_other_exceptions_report_their_vectors() {
    require_kvm();
    let pf = expect_exception(Fault::PageFault, 14);
    assert_eq!(
        (pf.error_code, pf.cr2),
        (0x6, 0x8),
        "user write to a non-present page"
    );
    expect_exception(Fault::InvalidOpcode, 6);
    let gp = expect_exception(Fault::GeneralProtection, 13);
    assert_eq!(gp.error_code, 0);
    expect_exception(Fault::DivideError, 0);
}

#[test]
fn selftest_without_fault_exits_cleanly() {
    require_kvm();
    let opts = RunOptions {
        fault: Fault::None,
        ..small(Workload::Selftest)
    };
    let summary = run::run(&opts, &AtomicBool::new(false)).expect("selftest");
    assert_eq!(summary.outcomes, vec![VcpuOutcome::GuestExit(0)]);
    assert!(!summary.interrupted);
}

#[test]
fn unknown_mmio_address_is_a_typed_error() {
    require_kvm();
    let opts = RunOptions {
        fault: Fault::UnknownMmio,
        ..small(Workload::Selftest)
    };
    match run::run(&opts, &AtomicBool::new(false)) {
        Err(VmmError::Vcpu(VcpuError::UnknownMmio {
            gpa,
            write: true,
            len: 8,
            rip,
            ..
        })) => {
            assert_eq!(gpa, abi::MMIO_BASE + 0x10_0000);
            assert!(
                (abi::IMAGE_GPA..abi::IMAGE_END).contains(&rip),
                "rip {rip:#x}"
            );
        }
        other => panic!("expected UnknownMmio, got {other:?}"),
    }
}

/// Boots the bundled guest's memory layout but starts vCPU 0 at `rip`
/// (still CPL0, long mode).
fn boot_at(rip: u64, prepare: impl FnOnce(&Vm)) -> VcpuError {
    let opts = small(Workload::Selftest);
    let mut vm = Vm::new(opts.mem_bytes).expect("vm");
    vm.create_vcpus(1).expect("vcpus");
    let params = opts.boot_params(vm.tsc_khz().expect("tsc"));
    boot::setup_memory(vm.memory(), GUEST_ELF, &params).expect("setup");
    prepare(&vm);
    vm.start(|id, sregs| {
        let mut regs = boot::entry_regs(id, rip);
        regs.rip = rip;
        (regs, boot::entry_sregs(sregs, id, 1))
    })
    .expect("start");
    let ev = vm
        .wait_exit(Duration::from_secs(30))
        .expect("the vCPU should stop");
    ev.result.expect_err("the vCPU should fail")
}

#[test]
fn triple_fault_is_reported_as_shutdown() {
    require_kvm();
    // Executing the unmapped null page at CPL0 before the guest filled its
    // IDT: #PF -> (no gate) #GP -> #DF -> triple fault.
    match boot_at(0, |_| {}) {
        VcpuError::Shutdown { vcpu: 0, .. } => {}
        other => panic!("expected a shutdown, got {other:?}"),
    }
}

#[test]
fn sse_at_cpl0_is_a_kvm_internal_error_with_its_rip() {
    require_kvm();
    // `addps xmm0, xmm1` at CPL0: PVM's instruction emulator cannot run SSE
    // arithmetic (ENVIRONMENT.md).
    let at = abi::HEAP_GPA;
    match boot_at(at, |vm| {
        vm.memory()
            .write(at, &[0x0f, 0x58, 0xc1, 0xf4])
            .expect("write code")
    }) {
        VcpuError::InternalError {
            vcpu: 0,
            suberror,
            rip,
            ..
        } => {
            eprintln!("internal error suberror {suberror} at {rip:#x}");
            assert_eq!(rip, at);
        }
        other => panic!("expected a KVM internal error, got {other:?}"),
    }
}

fn progress(vm: &Vm, vcpus: u32) -> Vec<u64> {
    (0..vcpus)
        .map(|c| run::progress(vm, c).expect("progress"))
        .collect()
}

fn wait_for_progress(vm: &Vm, vcpus: u32) {
    let start = Instant::now();
    while progress(vm, vcpus).contains(&0) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "churn never started: {:?}",
            progress(vm, vcpus)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn pause_freezes_the_guest_and_resume_continues_it() {
    require_kvm();
    let vcpus = 2;
    let opts = RunOptions {
        vcpus,
        churn: ChurnOptions {
            rate_mib_s: 200,
            report_ms: 0,
            ..Default::default()
        },
        ..small(Workload::Churn)
    };
    let mut vm = run::boot(&opts).expect("boot");
    wait_for_progress(&vm, vcpus);
    for round in 0..3 {
        vm.pause_all().expect("pause");
        assert_eq!(vm.vcpu_states(), vec![VcpuState::Paused; vcpus as usize]);
        let frozen = progress(&vm, vcpus);
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(
            progress(&vm, vcpus),
            frozen,
            "round {round}: the guest ran while paused"
        );
        if round % 2 == 0 {
            vm.resume_all_and_wait().expect("resume");
            assert_eq!(vm.vcpu_states(), vec![VcpuState::Running; vcpus as usize]);
        } else {
            vm.resume_all().expect("resume");
        }
        std::thread::sleep(Duration::from_millis(150));
        let after = progress(&vm, vcpus);
        for c in 0..vcpus as usize {
            assert!(
                after[c] > frozen[c],
                "round {round}: vCPU {c} made no progress after resume"
            );
        }
    }
    assert!(
        vm.wait_exit(Duration::ZERO).is_none(),
        "no vCPU should have ended"
    );
    vm.shutdown();
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn ticks(vm: &Vm, vcpus: u32) -> Vec<u64> {
    (0..vcpus)
        .map(|c| {
            let gpa = abi::STATUS_GPA + u64::from(c) * 64 + abi::STATUS_TICKS_OFFSET;
            vm.memory().load_u64(gpa).expect("ticks")
        })
        .collect()
}

#[test]
fn lapic_timer_interrupts_reach_the_guest_and_return_to_cpl3() {
    require_kvm();
    let vcpus = 2;
    let opts = RunOptions {
        vcpus,
        timer_hz: 1000,
        ..small(Workload::Churn)
    };
    let mut vm = run::boot(&opts).expect("boot");
    wait_for_progress(&vm, vcpus);
    std::thread::sleep(Duration::from_millis(300));
    vm.pause_all().expect("pause");
    let (t1, p1) = (ticks(&vm, vcpus), progress(&vm, vcpus));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        ticks(&vm, vcpus),
        t1,
        "no interrupt is delivered while paused"
    );
    vm.resume_all().expect("resume");
    std::thread::sleep(Duration::from_millis(300));
    let (t2, p2) = (ticks(&vm, vcpus), progress(&vm, vcpus));
    eprintln!("LAPIC ticks at 1000 Hz: {t1:?} after ~0.3 s, {t2:?} after ~0.6 s");
    for c in 0..vcpus as usize {
        assert!(t1[c] > 10, "vCPU {c}: too few timer ticks: {t1:?}");
        assert!(t2[c] > t1[c], "vCPU {c}: no ticks after resume");
        assert!(
            p2[c] > p1[c],
            "vCPU {c}: the workload did not survive the interrupts"
        );
    }
    assert!(vm.wait_exit(Duration::ZERO).is_none());
    vm.shutdown();
}

fn summary(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "{name} median {:?} p99 {:?} max {:?}",
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v[v.len() - 1]
    )
}

/// Not a timed test: prints the pause and resume latencies (run with
/// `--nocapture`), and fails only if they are absurd.
#[test]
fn pause_resume_latency() {
    require_kvm();
    // rate 100: the vCPUs mostly idle in SYS_IDLE (a pause wakes a
    // sleeping thread); rate 0: they never leave CPL3 (a pause is the
    // signal kick out of KVM_RUN).
    for (vcpus, rate) in [(1u32, 100u32), (2, 100), (1, 0), (2, 0)] {
        let opts = RunOptions {
            vcpus,
            churn: ChurnOptions {
                rate_mib_s: rate,
                report_ms: 0,
                ..Default::default()
            },
            ..small(Workload::Churn)
        };
        let vm = run::boot(&opts).expect("boot");
        wait_for_progress(&vm, vcpus);
        let (mut pauses, mut resumes, mut resumes_waited) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..400 {
            std::thread::sleep(Duration::from_millis(2));
            let t = Instant::now();
            vm.pause_all().expect("pause");
            pauses.push(t.elapsed());
            let t = Instant::now();
            if i % 2 == 0 {
                vm.resume_all().expect("resume");
                resumes.push(t.elapsed());
            } else {
                vm.resume_all_and_wait().expect("resume");
                resumes_waited.push(t.elapsed());
            }
        }
        let median_pause = {
            let mut p = pauses.clone();
            p.sort();
            percentile(&p, 0.5)
        };
        eprintln!(
            "{vcpus} vCPU(s), churn at {rate} MiB/s: {}; {}; {}",
            summary("pause_all", pauses),
            summary("resume_all", resumes),
            summary("resume_all_and_wait", resumes_waited)
        );
        assert!(
            median_pause < Duration::from_millis(100),
            "pause median {median_pause:?}"
        );
    }
}

#[test]
fn ctrl_c_stops_the_guest_cleanly() {
    require_kvm();
    let mut p = tests::Proc::spawn_temp(
        "run",
        &[
            "run",
            "--workload",
            "churn",
            "--mem",
            "64M",
            "--report-ms",
            "200",
        ],
    );
    std::thread::sleep(Duration::from_millis(2500));
    p.signal(nix::sys::signal::Signal::SIGINT);
    let status = p.wait_exit(Duration::from_secs(10));
    let err = p.text();
    assert_eq!(status.code(), Some(0), "stderr:\n{err}");
    assert!(err.contains("churn cpu0: t="), "{err}");
    assert!(err.contains("interrupted=true"), "{err}");
}

#[test]
fn bad_configuration_is_rejected_before_kvm() {
    let opts = RunOptions {
        mem_bytes: 3 << 20,
        ..Default::default()
    };
    assert!(matches!(
        run::run(&opts, &AtomicBool::new(false)),
        Err(VmmError::Config(_))
    ));
    let (code, err) = run_cli(&["run", "--vcpus", "0"], Duration::from_secs(30));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("vCPUs requested"), "{err}");
    // --checkpoint-dir with --disk is supported (the disk image goes into
    // the checkpoint): an unusable image is still refused before the guest
    // starts, as without checkpoints.
    let ck = tempfile::tempdir().unwrap();
    let (code, err) = run_cli(
        &[
            "run",
            "--workload",
            "disk",
            "--disk",
            "/dev/null",
            "--checkpoint-dir",
            ck.path().to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("not a regular file"), "{err}");
}
