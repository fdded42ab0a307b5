//! End-to-end tests of VM state save and restore with real KVM: a churn
//! guest saved on one VM continues on a fresh VM, in the same process and
//! in another process (`simrep run --checkpoint-dir` + SIGUSR1, kill -9,
//! `simrep restore`); corrupt checkpoints are refused with exit code 3.
//!
//! They need `/dev/kvm` (root on this project's machines); without it
//! every test fails and says why.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tests::{require_kvm, Proc};

use simrep::vmm::abi;
use simrep::vmm::checkpoint::{self, MemoryCopy};
use simrep::vmm::run::{self, ChurnOptions, RunOptions, Workload};
use simrep::vmm::state::{self, StateError, VmSnapshot};
use simrep::vmm::Vm;

/// A checkpointer writing into `dir` only when asked (no period, no
/// signal flag).
pub(crate) fn on_demand_checkpointer(dir: &Path) -> checkpoint::Checkpointer {
    checkpoint::Checkpointer::new(
        checkpoint::CheckpointOptions {
            dir: dir.to_owned(),
            every: None,
        },
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
    )
    .expect("checkpointer")
}

fn churn_opts(vcpus: u32, mem_bytes: u64) -> RunOptions {
    RunOptions {
        workload: Workload::Churn,
        mem_bytes,
        vcpus,
        timer_hz: 100,
        churn: ChurnOptions {
            rate_mib_s: 40,
            report_ms: 0,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn status(vm: &Vm, cpu: u32, offset: u64) -> u64 {
    vm.memory()
        .load_u64(abi::STATUS_GPA + u64::from(cpu) * 64 + offset)
        .expect("status")
}

fn progress(vm: &Vm, vcpus: u32) -> Vec<u64> {
    (0..vcpus).map(|c| status(vm, c, 0)).collect()
}

fn ticks(vm: &Vm, vcpus: u32) -> Vec<u64> {
    (0..vcpus)
        .map(|c| status(vm, c, abi::STATUS_TICKS_OFFSET))
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "{name}: median {:?} p99 {:?} max {:?}",
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v[v.len() - 1]
    )
}

#[test]
fn in_process_restore_continues_the_guest() {
    require_kvm();
    let vcpus = 2;
    let opts = churn_opts(vcpus, 64 << 20);
    let mut vm1 = run::boot(&opts).expect("boot");
    wait_until(
        "churn progress and timer ticks",
        Duration::from_secs(30),
        || {
            progress(&vm1, vcpus).iter().all(|&p| p > 1000)
                && ticks(&vm1, vcpus).iter().all(|&t| t > 5)
        },
    );

    // Saving running vCPUs is refused.
    match vm1.save_state() {
        Err(StateError::NotPaused { .. }) => {}
        other => panic!("save of running vCPUs: expected NotPaused, got {other:?}"),
    }

    vm1.pause_all().expect("pause");
    let snap = vm1.save_state().expect("save");
    let (p0, t0) = (progress(&vm1, vcpus), ticks(&vm1, vcpus));
    assert_eq!(snap.vcpu_count(), vcpus);
    assert_eq!(snap.mem_bytes, 64 << 20);
    assert_eq!(
        snap.boot_params().map(|b| b.vcpus),
        Some(vcpus),
        "boot params travel with the snapshot"
    );
    // The snapshot survives its byte format.
    let bytes = snap.encode();
    let decoded = VmSnapshot::decode(&bytes).expect("decode");
    assert!(decoded == snap);
    eprintln!(
        "snapshot of {vcpus} vCPUs: {} bytes, {} MSRs and {} CPUID entries per vCPU",
        bytes.len(),
        snap.vcpus[0].msrs.len(),
        snap.vcpus[0].cpuid.len()
    );

    let (vm2, times) = Vm::restore(&decoded, |mem| state::copy_memory(vm1.memory(), mem))
        .expect("restore into a fresh VM");
    eprintln!("in-process restore of 64 MiB: {times:?}");
    // Saving the restored, still paused VM gives back the same registers.
    let again = vm2.save_state().expect("save the restored VM");
    let tsc = |s: &VmSnapshot| {
        s.vcpus[0]
            .msrs
            .iter()
            .find(|m| m.index == 0x10)
            .map(|m| m.data)
    };
    if let (Some(a), Some(b)) = (tsc(&snap), tsc(&again)) {
        eprintln!(
            "guest TSC moved {:.1} ms between the save and the restored VM's save ({:?} of wall time)",
            b.wrapping_sub(a) as f64 / f64::from(snap.vcpus[0].tsc_khz),
            times.total
        );
    }
    for (a, b) in snap.vcpus.iter().zip(&again.vcpus) {
        assert_eq!(a.regs, b.regs, "vCPU {}: regs", a.id);
        assert_eq!(a.sregs, b.sregs, "vCPU {}: sregs", a.id);
        assert_eq!(a.xsave.region, b.xsave.region, "vCPU {}: xsave", a.id);
        assert_eq!(a.xcrs, b.xcrs, "vCPU {}: xcrs", a.id);
        assert_eq!(a.debugregs, b.debugregs, "vCPU {}: debugregs", a.id);
        assert_eq!(a.mp_state, b.mp_state, "vCPU {}: mp_state", a.id);
        assert_eq!(a.cpuid, b.cpuid, "vCPU {}: cpuid", a.id);
        assert_eq!(a.events, b.events, "vCPU {}: events", a.id);
        for (x, y) in a.msrs.iter().zip(&b.msrs) {
            // The TSC moves with the host clock under PVM.
            if x.index != 0x10 {
                assert_eq!((x.index, x.data), (y.index, y.data), "vCPU {}: MSR", a.id);
            }
        }
        assert_eq!(
            a.lapic.regs[0x20..0x390],
            b.lapic.regs[0x20..0x390],
            "vCPU {}: LAPIC",
            a.id
        );
    }
    // Guest memory is equal, byte for byte.
    let mut m1 = vec![0u8; 2 << 20];
    let mut m2 = vec![0u8; 2 << 20];
    for gpa in (0..64u64 << 20).step_by(2 << 20) {
        vm1.memory().read(gpa, &mut m1).expect("read");
        vm2.memory().read(gpa, &mut m2).expect("read");
        assert!(m1 == m2, "guest memory differs in the 2 MiB at {gpa:#x}");
    }
    assert_eq!(progress(&vm2, vcpus), p0);
    assert_eq!(ticks(&vm2, vcpus), t0);
    vm1.shutdown();
    drop(vm1);

    vm2.resume_all_and_wait().expect("resume the restored VM");
    let mut vm2 = vm2;
    wait_until(
        "the restored guest to make progress and take timer ticks",
        Duration::from_secs(30),
        || {
            let (p, t) = (progress(&vm2, vcpus), ticks(&vm2, vcpus));
            (0..vcpus as usize).all(|c| p[c] > p0[c] + 1000 && t[c] > t0[c] + 5)
        },
    );
    if let Some(ev) = vm2.wait_exit(Duration::ZERO) {
        panic!("a restored vCPU ended: {ev:?}");
    }
    eprintln!(
        "restored guest continued: progress {p0:?} -> {:?}, ticks {t0:?} -> {:?}",
        progress(&vm2, vcpus),
        ticks(&vm2, vcpus)
    );
    vm2.shutdown();
}

/// Not a timed test: prints the cost of a state save (and of the pause
/// around it) of a running churn guest; run with `--nocapture`.
#[test]
fn save_state_latency() {
    require_kvm();
    for vcpus in [1u32, 2] {
        let opts = churn_opts(vcpus, 64 << 20);
        let mut vm = run::boot(&opts).expect("boot");
        wait_until("churn progress", Duration::from_secs(30), || {
            !progress(&vm, vcpus).contains(&0)
        });
        let (mut saves, mut encodes, mut whole) = (Vec::new(), Vec::new(), Vec::new());
        let mut size = 0;
        for _ in 0..300 {
            std::thread::sleep(Duration::from_millis(2));
            let t = Instant::now();
            vm.pause_all().expect("pause");
            let s = Instant::now();
            let snap = vm.save_state().expect("save");
            saves.push(s.elapsed());
            vm.resume_all().expect("resume");
            whole.push(t.elapsed());
            let e = Instant::now();
            size = snap.encode().len();
            encodes.push(e.elapsed());
        }
        eprintln!(
            "{vcpus} vCPU(s): {}; {}; {} ({size} bytes)",
            summary("save_state", saves),
            summary("pause+save+resume", whole),
            summary("encode", encodes)
        );
        assert!(vm.wait_exit(Duration::ZERO).is_none(), "a vCPU ended");
        vm.shutdown();
    }
}

/// `churn cpu<N>: t=... pages=<P> ...` -> (N, P).
fn churn_line(line: &str) -> Option<(u32, u64)> {
    let rest = &line[line.find("churn cpu")? + 9..];
    let cpu: u32 = rest[..rest.find(':')?].parse().ok()?;
    let p = &rest[rest.find("pages=")? + 6..];
    let pages: u64 = p[..p.find(' ')?].parse().ok()?;
    Some((cpu, pages))
}

/// The progress counters in a checkpoint's memory image.
fn saved_progress(ckpt: &Path, vcpus: u32) -> Vec<u64> {
    let f = std::fs::File::open(ckpt.join(checkpoint::MEMORY_FILE)).expect("memory.raw");
    (0..vcpus)
        .map(|c| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, abi::STATUS_GPA + u64::from(c) * 64)
                .expect("read status");
            u64::from_le_bytes(b)
        })
        .collect()
}

fn latest(dir: &Path) -> PathBuf {
    dir.join(std::fs::read_link(dir.join(checkpoint::LATEST_LINK)).expect("latest link"))
}

#[test]
fn checkpoint_in_one_process_restore_in_another() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("ckpt");
    let ds = d.to_str().expect("utf-8 path");
    let mut run = Proc::spawn_temp(
        "simrep",
        &[
            "run",
            "--mem",
            "64M",
            "--vcpus",
            "2",
            "--rate",
            "40",
            "--report-ms",
            "200",
            "--timer-hz",
            "100",
            "--checkpoint-dir",
            ds,
        ],
    );
    run.wait_next("progress of both vCPUs", Duration::from_secs(30), |l| {
        churn_line(l).filter(|&(c, p)| c == 1 && p > 2000)
    });
    run.signal(nix::sys::signal::Signal::SIGUSR1);
    let line = run.wait_next("the checkpoint", Duration::from_secs(30), |l| {
        l.contains("checkpoint written").then(|| l.to_owned())
    });
    eprintln!("{line}");
    assert!(d.join(checkpoint::LATEST_LINK).exists(), "no latest link");
    // kill -9: no clean shutdown of the first process.
    run.kill9();
    let ckpt = latest(&d);
    let saved = saved_progress(&ckpt, 2);
    assert!(saved.iter().all(|&p| p > 500), "saved progress {saved:?}");
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(ckpt.join(checkpoint::MANIFEST_FILE)).expect("manifest"),
    )
    .expect("manifest is JSON");
    assert_eq!(manifest["vcpus"], 2);
    assert_eq!(manifest["mem_bytes"], 64 << 20);

    let mut restored = Proc::spawn_temp("simrep", &["restore", ds]);
    let mut seen = [false; 2];
    restored.wait_next(
        "both restored vCPUs to report progress past the checkpoint",
        Duration::from_secs(60),
        |l| {
            if let Some((c, p)) = churn_line(l) {
                assert!(
                    p >= saved[c as usize],
                    "cpu{c} went back: {p} < saved {}",
                    saved[c as usize]
                );
                if p > saved[c as usize] + 500 {
                    seen[c as usize] = true;
                }
            }
            (seen == [true, true]).then_some(())
        },
    );
    let (code, log) = restored.stop();
    assert_eq!(code, Some(0), "restore exit code; log:\n{log}");
    assert!(log.contains("guest restored and running"), "{log}");
    assert!(
        !log.contains("exception"),
        "the guest faulted after restore:\n{log}"
    );
    assert!(
        !log.contains("churn: 2 vCPU(s)"),
        "the guest booted again instead of continuing:\n{log}"
    );
    assert!(log.contains("interrupted=true"), "{log}");
}

/// A guest that keeps rewriting its memory while `memory.raw` is written:
/// the checkpoint holds memory exactly as it was at the pause (compared
/// byte for byte with a copy taken at the end of the pause), both with the
/// copy-on-write view (the guest takes write faults meanwhile, twice in a
/// row so that the view is armed again) and with the copy during the pause
/// (the fallback); restored, the guest continues from it.
#[test]
fn a_checkpoint_of_a_churning_guest_holds_memory_as_of_the_pause() {
    require_kvm();
    const MEM: u64 = 128 << 20;
    let vcpus = 2;
    let mut opts = churn_opts(vcpus, MEM);
    opts.churn.rate_mib_s = 400;
    let mut vm = run::boot(&opts).expect("boot");
    wait_until("churn progress", Duration::from_secs(30), || {
        progress(&vm, vcpus).iter().all(|&p| p > 5000)
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ck = on_demand_checkpointer(&dir.path().join("ck"));
    let mut last = None;
    for (round, copy) in [(0, false), (1, false), (2, true)] {
        ck.set_copy_during_pause(copy);
        let mut at_pause = vec![0u8; MEM as usize];
        let mut saved = Vec::new();
        let r = ck
            .checkpoint_with(&vm, &mut |vm| {
                vm.memory().read(0, &mut at_pause).expect("read");
                saved = progress(vm, vcpus);
            })
            .expect("checkpoint");
        eprintln!(
            "round {round} ({}): paused {:?} (save {:?}, arm {:?}, copy {:?}, disk hold {:?}), write {:?}, cow {:?}",
            if copy { "copy" } else { "view" },
            r.paused,
            r.save,
            r.arm,
            r.copy,
            r.hold,
            r.written.total_time,
            r.cow
        );
        if copy {
            assert!(r.cow.is_none() && r.copy > Duration::ZERO);
        } else {
            let cow = r.cow.as_ref().expect("a copy-on-write view was used");
            assert!(
                cow.pages_copied > 0,
                "the guest wrote no page during the write: {cow:?}"
            );
            assert_eq!(cow.handler_errors, 0);
            assert_eq!(r.copy, Duration::ZERO);
        }
        let file = std::fs::read(r.written.path.join(checkpoint::MEMORY_FILE)).expect("read");
        assert_eq!(file.len() as u64, MEM);
        if let Some(gpa) = (0..MEM as usize)
            .step_by(4096)
            .find(|&g| file[g..g + 4096] != at_pause[g..g + 4096])
        {
            panic!("round {round}: memory.raw differs from memory at the pause at {gpa:#x}");
        }
        assert_eq!(saved_progress(&r.written.path, vcpus), saved);
        // The guest ran on meanwhile.
        assert!(progress(&vm, vcpus).iter().zip(&saved).all(|(a, b)| a > b));
        last = Some((at_pause, saved));
    }
    vm.shutdown();
    drop(vm);
    let (at_pause, saved) = last.expect("a checkpoint");
    let loaded = checkpoint::load(&dir.path().join("ck")).expect("load");
    let (vm2, _) = checkpoint::restore(&loaded).expect("restore");
    let mut back = vec![0u8; MEM as usize];
    vm2.memory().read(0, &mut back).expect("read");
    assert!(back == at_pause, "restored memory differs from the pause");
    vm2.resume_all_and_wait().expect("resume");
    let mut vm2 = vm2;
    wait_until(
        "the restored guest to continue",
        Duration::from_secs(30),
        || {
            progress(&vm2, vcpus)
                .iter()
                .zip(&saved)
                .all(|(p, s)| *p > s + 1000)
        },
    );
    if let Some(ev) = vm2.wait_exit(Duration::ZERO) {
        panic!("a restored vCPU ended: {ev:?}");
    }
    vm2.shutdown();
}

/// Where guest memory cannot be registered for copy-on-write (here: it
/// already is, by another userfaultfd), the checkpointer copies memory
/// during the pause instead and the checkpoint is the same; once the other
/// registration is gone, it can be told to use the view again.
#[test]
fn without_a_copy_on_write_view_checkpoints_copy_memory_during_the_pause() {
    use simrep::dirty::cow::CowMemory;
    require_kvm();
    const MEM: u64 = 32 << 20;
    let mut vm = run::boot(&churn_opts(1, MEM)).expect("boot");
    wait_until("churn progress", Duration::from_secs(30), || {
        progress(&vm, 1)[0] > 1000
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ck = on_demand_checkpointer(&dir.path().join("ck"));
    let mut other = Some(CowMemory::new(vm.memory().clone()).expect("first registration"));
    for round in 0..2 {
        let mut at_pause = vec![0u8; MEM as usize];
        let r = ck
            .checkpoint_with(&vm, &mut |vm| {
                vm.memory().read(0, &mut at_pause).expect("read")
            })
            .expect("checkpoint");
        let file = std::fs::read(r.written.path.join(checkpoint::MEMORY_FILE)).expect("read");
        assert!(
            file == at_pause,
            "round {round}: memory.raw is not memory at the pause"
        );
        if round == 0 {
            assert!(ck.copies_during_pause(), "no fallback to the copy");
            assert!(r.cow.is_none() && r.copy > Duration::ZERO, "{r:?}");
            drop(other.take());
            ck.set_copy_during_pause(false);
        } else {
            assert!(!ck.copies_during_pause());
            assert!(r.cow.is_some() && r.copy == Duration::ZERO, "{r:?}");
        }
    }
    vm.shutdown();
}

/// `sequence` of the checkpoint `latest` points at.
fn latest_sequence(dir: &Path) -> u64 {
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(latest(dir).join(checkpoint::MANIFEST_FILE)).expect("manifest"),
    )
    .expect("manifest is JSON");
    m["sequence"].as_u64().expect("sequence")
}

fn checkpoint_dirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n != checkpoint::LATEST_LINK)
        .collect();
    v.sort();
    v
}

#[test]
fn periodic_checkpoints_replace_each_other_and_a_restored_guest_checkpoints_again() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("ckpt");
    let ds = d.to_str().expect("utf-8 path");
    let mut run = Proc::spawn_temp(
        "simrep",
        &[
            "run",
            "--mem",
            "32M",
            "--rate",
            "20",
            "--report-ms",
            "0",
            "--checkpoint-dir",
            ds,
            "--checkpoint-every",
            "400ms",
        ],
    );
    for _ in 0..3 {
        run.wait_next("a periodic checkpoint", Duration::from_secs(30), |l| {
            l.contains("checkpoint written").then_some(())
        });
    }
    let (code, log) = run.stop();
    assert_eq!(code, Some(0), "{log}");
    let seq = latest_sequence(&d);
    assert!(seq >= 3, "sequence {seq}");
    // Only the newest checkpoint is kept, and no temporary directory.
    assert_eq!(checkpoint_dirs(&d), vec![format!("ckpt-{seq:010}")]);

    // Restore, and checkpoint the restored guest into the same directory.
    let mut restored = Proc::spawn_temp("simrep", &["restore", ds, "--checkpoint-dir", ds]);
    restored.wait_next("the restore", Duration::from_secs(60), |l| {
        l.contains("guest restored and running").then_some(())
    });
    restored.signal(nix::sys::signal::Signal::SIGUSR1);
    restored.wait_next(
        "a checkpoint of the restored guest",
        Duration::from_secs(30),
        |l| l.contains("checkpoint written").then_some(()),
    );
    let (code, log) = restored.stop();
    assert_eq!(code, Some(0), "{log}");
    assert_eq!(latest_sequence(&d), seq + 1, "the sequence continues");
    assert_eq!(checkpoint_dirs(&d), vec![format!("ckpt-{:010}", seq + 1)]);
}

/// Writes a real checkpoint of a small churn guest into `dir` (in-process).
fn make_checkpoint(dir: &Path) -> PathBuf {
    let opts = churn_opts(1, 16 << 20);
    let mut vm = run::boot(&opts).expect("boot");
    wait_until("churn progress", Duration::from_secs(30), || {
        progress(&vm, 1)[0] > 100
    });
    vm.pause_all().expect("pause");
    let snap = vm.save_state().expect("save");
    let copy = MemoryCopy::capture(vm.memory()).expect("copy");
    vm.shutdown();
    checkpoint::write(dir, 1, &snap, &copy, Duration::ZERO)
        .expect("write")
        .path
}

fn restore_cli(dir: &Path) -> (Option<i32>, String) {
    let out = Command::new(tests::simrep_bin())
        .args(["restore", dir.to_str().expect("utf-8")])
        .env("NO_COLOR", "1")
        .output()
        .expect("run simrep restore");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn corrupt_copy(good: &Path, name: &str, damage: impl FnOnce(&Path)) -> PathBuf {
    let bad = good.parent().expect("parent").join(name);
    std::fs::create_dir(&bad).expect("mkdir");
    for f in [
        checkpoint::MANIFEST_FILE,
        checkpoint::STATE_FILE,
        checkpoint::MEMORY_FILE,
    ] {
        std::fs::copy(good.join(f), bad.join(f)).expect("copy");
    }
    damage(&bad);
    bad
}

fn flip(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).expect("read");
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).expect("write");
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open")
        .set_len(len)
        .expect("truncate");
}

#[test]
fn corrupt_checkpoints_are_refused_with_exit_code_3() {
    require_kvm();
    let tmp = tempfile::tempdir().expect("tempdir");
    let good = make_checkpoint(&tmp.path().join("d"));
    let state_len = std::fs::metadata(good.join(checkpoint::STATE_FILE))
        .expect("stat")
        .len();
    let mem = |p: &Path| p.join(checkpoint::MEMORY_FILE);
    let st = |p: &Path| p.join(checkpoint::STATE_FILE);
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        ("missing directory", tmp.path().join("nope"), "cannot read"),
        (
            "empty directory",
            {
                let e = tmp.path().join("empty");
                std::fs::create_dir(&e).expect("mkdir");
                e
            },
            "holds no checkpoint",
        ),
        (
            "state truncated",
            corrupt_copy(&good, "st-trunc", |p| truncate(&st(p), state_len / 2)),
            "state.bin is corrupt",
        ),
        (
            "state bit flip",
            corrupt_copy(&good, "st-flip", |p| flip(&st(p), state_len / 3)),
            "state.bin is corrupt",
        ),
        (
            "state replaced consistently",
            corrupt_copy(&good, "st-swap", |p| {
                // A state file whose manifest entry matches but whose own
                // checksum does not: caught by the state format itself.
                let mut b = std::fs::read(st(p)).expect("read");
                let last = b.len() - 1;
                b[last] ^= 1;
                std::fs::write(st(p), &b).expect("write");
                let m = p.join(checkpoint::MANIFEST_FILE);
                let mut v: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&m).expect("read")).expect("json");
                v["state"]["crc32"] = crc32(&b).into();
                std::fs::write(&m, serde_json::to_vec(&v).expect("json")).expect("write");
            }),
            "checksum mismatch",
        ),
        (
            "manifest garbage",
            corrupt_copy(&good, "mf-garbage", |p| {
                std::fs::write(p.join(checkpoint::MANIFEST_FILE), b"{not json").expect("write")
            }),
            "bad manifest",
        ),
        (
            "manifest truncated",
            corrupt_copy(&good, "mf-trunc", |p| {
                truncate(&p.join(checkpoint::MANIFEST_FILE), 40)
            }),
            "bad manifest",
        ),
        (
            "memory truncated",
            corrupt_copy(&good, "mem-trunc", |p| truncate(&mem(p), 8 << 20)),
            "memory.raw is corrupt",
        ),
        (
            "memory bit flip",
            corrupt_copy(&good, "mem-flip", |p| flip(&mem(p), abi::HEAP_GPA + 12345)),
            "memory.raw is corrupt",
        ),
        (
            "memory missing",
            corrupt_copy(&good, "mem-gone", |p| {
                std::fs::remove_file(mem(p)).expect("rm")
            }),
            "memory.raw",
        ),
    ];
    for (what, path, needle) in cases {
        let (code, err) = restore_cli(&path);
        assert_eq!(code, Some(3), "{what}: exit code; stderr:\n{err}");
        assert!(
            err.contains(needle),
            "{what}: expected `{needle}` in:\n{err}"
        );
        assert!(!err.contains("panicked"), "{what}: panic:\n{err}");
        eprintln!("{what}: {}", err.lines().last().unwrap_or(""));
    }
    // The good one restores (and is stopped by SIGINT).
    let mut p = Proc::spawn_temp("simrep", &["restore", good.to_str().expect("utf-8")]);
    p.wait_next("the restore", Duration::from_secs(60), |l| {
        l.contains("guest restored and running").then_some(())
    });
    let (code, log) = p.stop();
    assert_eq!(code, Some(0), "{log}");
}

fn crc32(b: &[u8]) -> u32 {
    // Same CRC as the format (IEEE); computed bitwise to stay independent.
    let mut crc = !0u32;
    for &byte in b {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Figures for a 1 GiB guest (not a timed test; run with `--ignored
/// --nocapture`, with `SIMREP_BIN=target/release/simrep` for release
/// figures): the pause of 5 checkpoints (pause + state save + arming the
/// copy-on-write view or copying memory + disk hold + resume), their
/// writes, and a restore in a fresh process, split into memory
/// load and KVM state.
#[test]
#[ignore = "measurement: 1 GiB guest, prints figures"]
fn checkpoint_1gib_figures() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().join("ckpt");
    let ds = d.to_str().expect("utf-8 path");
    let mut run = Proc::spawn_temp(
        "simrep",
        &[
            "run",
            "--mem",
            "1G",
            "--vcpus",
            "2",
            "--rate",
            "100",
            "--report-ms",
            "500",
            "--timer-hz",
            "100",
            "--checkpoint-dir",
            ds,
        ],
    );
    run.wait_next("progress", Duration::from_secs(120), |l| {
        churn_line(l).filter(|&(c, _)| c == 1)
    });
    let field = |line: &str, name: &str| -> Option<Duration> {
        let rest = &line[line.find(&format!(" {name}="))? + name.len() + 2..];
        let v: f64 = rest.split(' ').next()?.parse().ok()?;
        Some(Duration::from_secs_f64(v / 1e3))
    };
    let (mut paused, mut written) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        run.signal(nix::sys::signal::Signal::SIGUSR1);
        let line = run.wait_next("the checkpoint", Duration::from_secs(120), |l| {
            l.contains("checkpoint written").then(|| l.to_owned())
        });
        eprintln!("{}", &line[line.find("checkpoint").unwrap_or(0)..]);
        paused.extend(field(&line, "paused_ms"));
        written.extend(field(&line, "write_ms"));
        // Let the guest run between checkpoints.
        std::thread::sleep(Duration::from_secs(1));
    }
    assert_eq!((paused.len(), written.len()), (5, 5), "unparsed log lines");
    eprintln!("{}", summary("checkpoint pause", paused));
    eprintln!("{}", summary("checkpoint write", written));
    let (code, _) = run.stop();
    assert_eq!(code, Some(0));
    // Drop the page cache's copy so that the restore reads from disk too.
    let cold = std::env::var_os("SIMREP_COLD").is_some();
    if cold {
        let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    }
    let t = Instant::now();
    let mut p = Proc::spawn_temp("simrep", &["restore", ds]);
    let line = p.wait_next("the restore", Duration::from_secs(120), |l| {
        l.contains("guest restored and running")
            .then(|| l.to_owned())
    });
    let to_running = t.elapsed();
    eprintln!(
        "restore ({}): process start to guest running {to_running:?}; {}",
        if cold {
            "cold cache"
        } else {
            "warm page cache"
        },
        &line[line.find("guest restored").unwrap_or(0)..]
    );
    let (code, _) = p.stop();
    assert_eq!(code, Some(0));
}
