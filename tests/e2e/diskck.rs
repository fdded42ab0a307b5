//! End-to-end tests of checkpoints that include the guest's disk image
//! (`simrep run --disk FILE --checkpoint-dir DIR`, `simrep restore DIR
//! --disk NEW`): real KVM, real processes, real TCP.
//!
//! They need `/dev/kvm` (root); without it every test fails and says why.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tests::{require_kvm, Proc};

use simrep::proto::{op, status};
use simrep::vmm::checkpoint::{Manifest, DISK_FILE};
use simrep::vmm::run::{self, RunOptions, Workload};

use crate::net::{spawn_listening, spawn_service, Client};

fn sparse_image(path: &Path, bytes: u64) {
    std::fs::File::create(path).unwrap().set_len(bytes).unwrap();
}

fn wait_for(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(Instant::now() < deadline, "no {what} within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn manifest(dir: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(dir.join("latest").join("manifest.json")).unwrap())
        .unwrap()
}

/// Runs `simrep args...` to its end (at most 120 s).
fn run_cli(args: &[&str]) -> (Option<i32>, String) {
    tests::run_cli(args, Duration::from_secs(120))
}

fn stop_cleanly(p: &mut Proc, what: &str) {
    let st = p.interrupt();
    assert_eq!(
        st.code(),
        Some(0),
        "{what} did not stop cleanly:\n{}",
        p.text()
    );
}

fn value(i: u32) -> Vec<u8> {
    format!("value-{i}-{}", "x".repeat((i as usize * 37) % 3000)).into_bytes()
}

/// Checks that `addr` serves exactly the checkpoint's data: every key put
/// before it, not the one put after it.
fn check_checkpoint_data(c: &mut Client, keys: u32) {
    for i in 0..keys {
        assert_eq!(
            c.call(op::GET, format!("k{i:03}").as_bytes(), b""),
            (status::OK, value(i)),
            "key k{i:03}"
        );
    }
    assert_eq!(c.call(op::GET, b"k005", b"").0, status::OK);
    assert_eq!(c.call(op::GET, b"after", b"").0, status::NOT_FOUND);
}

/// (1) A kv guest with a disk, checkpointed on SIGUSR1 and killed: the
/// restored guest (on a copy of the checkpoint's disk) serves exactly the
/// checkpoint's data; stopped, its disk alone boots a fresh guest whose log
/// replay shows the same data plus what the restored guest wrote. The
/// restored guest checkpoints again and that checkpoint restores too. The
/// first checkpoint restores twice; (3) a corrupt `disk.raw` is refused with
/// exit code 3 and leaves no file behind; the disk choice errors are exit
/// code 2.
#[test]
fn a_kv_guest_with_a_disk_restores_consistently_and_its_disk_boots_alone() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("kv.img");
    sparse_image(&disk, 256 << 20);
    let ckdir = dir.path().join("ck");
    let ck = ckdir.to_str().unwrap().to_owned();
    let (mut first, addr) = spawn_service(
        "kv",
        &["--disk", disk.to_str().unwrap(), "--checkpoint-dir", &ck],
    );
    let mut c = Client::connect(addr);
    const KEYS: u32 = 150;
    for i in 0..KEYS {
        assert_eq!(
            c.call(op::PUT, format!("k{i:03}").as_bytes(), &value(i)).0,
            status::OK
        );
    }
    first.signal(nix::sys::signal::Signal::SIGUSR1);
    wait_for(&ckdir.join("latest").join("manifest.json"), "checkpoint");
    // After the checkpoint: in the first guest's disk log, not in the
    // checkpoint.
    assert_eq!(c.call(op::PUT, b"after", b"lost").0, status::OK);
    drop(c);
    first.kill9();
    let m = manifest(&ckdir);
    let entry = m.disk.clone().expect("the manifest names the disk image");
    assert_eq!(entry.file, DISK_FILE);
    assert_eq!(entry.bytes, 256 << 20);
    let data = m.disk_data_bytes.unwrap();
    assert!(data > 0 && data < 16 << 20, "disk data bytes {data}");
    eprintln!(
        "checkpoint of a 256 MiB disk with {} KiB of data: disk held {} ms, whole write {} ms",
        data >> 10,
        m.disk_copy_ms.unwrap(),
        m.write_ms
    );
    let ckpt_path = std::fs::canonicalize(ckdir.join("latest")).unwrap();
    // The copy is sparse.
    let allocated = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(ckpt_path.join(DISK_FILE))
            .unwrap()
            .blocks()
            * 512
    };
    assert!(allocated < 32 << 20, "disk.raw allocates {allocated} bytes");

    // Disk choices that cannot work: exit code 2, nothing started.
    let restored = dir.path().join("restored.img");
    let (code, err) = run_cli(&["restore", &ck, "--port", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("holds a disk image"), "{err}");
    let (code, err) = run_cli(&[
        "restore",
        &ck,
        "--port",
        "0",
        "--disk",
        disk.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("exists"), "{err}");

    let restored_s = restored.to_str().unwrap().to_owned();
    // The restored guest checkpoints again (its new disk included).
    let ck2dir = dir.path().join("ck2");
    let ck2 = ck2dir.to_str().unwrap().to_owned();
    let (mut second, addr) = spawn_listening(&[
        "restore",
        &ck,
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
        "--disk",
        &restored_s,
        "--checkpoint-dir",
        &ck2,
    ]);
    let mut c = Client::connect(addr);
    check_checkpoint_data(&mut c, KEYS);
    assert_eq!(c.call(op::PUT, b"restored", b"yes").0, status::OK);
    assert_eq!(c.call(op::DEL, b"k001", b"").0, status::OK);
    second.signal(nix::sys::signal::Signal::SIGUSR1);
    wait_for(
        &ck2dir.join("latest").join("manifest.json"),
        "second checkpoint",
    );
    assert_eq!(c.call(op::PUT, b"after2", b"kept").0, status::OK);
    drop(c);
    stop_cleanly(&mut second, "the restored guest");
    let from_ck2 = dir.path().join("from-ck2.img");
    let (mut again2, addr) = spawn_listening(&[
        "restore",
        &ck2,
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
        "--disk",
        from_ck2.to_str().unwrap(),
    ]);
    let mut c = Client::connect(addr);
    assert_eq!(
        c.call(op::GET, b"restored", b""),
        (status::OK, b"yes".to_vec())
    );
    assert_eq!(c.call(op::GET, b"k001", b"").0, status::NOT_FOUND);
    assert_eq!(c.call(op::GET, b"k002", b""), (status::OK, value(2)));
    assert_eq!(c.call(op::GET, b"after2", b"").0, status::NOT_FOUND);
    drop(c);
    stop_cleanly(&mut again2, "the restore of the second checkpoint");

    // The restored disk alone: a fresh guest replays its log.
    let (mut third, addr) = spawn_service("kv", &["--disk", &restored_s]);
    let mut c = Client::connect(addr);
    for i in (0..KEYS).filter(|&i| i != 1) {
        assert_eq!(
            c.call(op::GET, format!("k{i:03}").as_bytes(), b""),
            (status::OK, value(i)),
            "key k{i:03} after log replay"
        );
    }
    assert_eq!(c.call(op::GET, b"k001", b"").0, status::NOT_FOUND);
    assert_eq!(c.call(op::GET, b"after", b"").0, status::NOT_FOUND);
    assert_eq!(
        c.call(op::GET, b"restored", b""),
        (status::OK, b"yes".to_vec())
    );
    // Written after the second checkpoint by a guest stopped cleanly: on
    // its disk.
    assert_eq!(
        c.call(op::GET, b"after2", b""),
        (status::OK, b"kept".to_vec())
    );
    drop(c);
    stop_cleanly(&mut third, "the guest booted on the restored disk");

    // The checkpoint was not modified: it restores again, to the same data.
    let again = dir.path().join("again.img");
    let (mut fourth, addr) = spawn_listening(&[
        "restore",
        &ck,
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
        "--disk",
        again.to_str().unwrap(),
    ]);
    let mut c = Client::connect(addr);
    check_checkpoint_data(&mut c, KEYS);
    assert_eq!(c.call(op::GET, b"restored", b"").0, status::NOT_FOUND);
    drop(c);
    stop_cleanly(&mut fourth, "the second restore");

    // (3) A corrupt disk.raw (a copy of the checkpoint with one byte of
    // the log changed): exit code 3, no target file left.
    let bad = dir.path().join("bad-ckpt");
    std::fs::create_dir(&bad).unwrap();
    for f in std::fs::read_dir(&ckpt_path).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), bad.join(f.file_name())).unwrap();
    }
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(bad.join(DISK_FILE))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 100).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], 100).unwrap();
    }
    let target = dir.path().join("from-bad.img");
    let (code, err) = run_cli(&[
        "restore",
        bad.to_str().unwrap(),
        "--port",
        "0",
        "--disk",
        target.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("disk.raw is corrupt"), "{err}");
    assert!(
        !target.exists(),
        "a corrupt image left {}",
        target.display()
    );
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".restoring"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// (2) The `disk` workload checkpointed every 20 ms while it runs: a
/// restore from the newest checkpoint (on a copy of its disk image) runs
/// the workload's checks to the end and they pass.
#[test]
fn the_disk_workload_passes_its_checks_after_a_restore() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    sparse_image(&disk, 64 << 20);
    let ck = dir.path().join("ck");
    let ck_s = ck.to_str().unwrap().to_owned();
    let (code, err) = run_cli(&[
        "run",
        "--workload",
        "disk",
        "--mem",
        "64M",
        "--disk",
        disk.to_str().unwrap(),
        "--disk-pattern-sectors",
        "20000",
        "--disk-log-records",
        "200",
        "--disk-bench",
        "32M",
        "--checkpoint-dir",
        &ck_s,
        "--checkpoint-every",
        "10ms",
    ]);
    assert_eq!(code, Some(0), "the checkpointed run:\n{err}");
    assert!(err.contains("disk: ok"), "{err}");
    let checkpoints = err.matches("checkpoint written").count();
    assert!(checkpoints > 0, "no checkpoint during the run:\n{err}");
    let m = manifest(&ck);
    assert!(m.disk.is_some());
    assert!(
        m.disk_data_bytes.unwrap() > 0,
        "the last checkpoint was taken before the guest wrote anything"
    );
    let restored = dir.path().join("restored.img");
    let restored_s = restored.to_str().unwrap().to_owned();
    let (code, err) = run_cli(&["restore", &ck_s, "--disk", &restored_s]);
    assert_eq!(code, Some(0), "the restored run:\n{err}");
    assert!(err.contains("disk: ok"), "{err}");
    assert!(!err.contains("FAIL"), "{err}");
    // It continued the guest rather than booting it again.
    assert!(!err.contains("disk: capacity"), "{err}");
    // The restored disk holds the whole log: a fresh guest replays it.
    let (code, err) = run_cli(&[
        "run",
        "--workload",
        "disk",
        "--mem",
        "64M",
        "--disk",
        &restored_s,
        "--disk-pattern-sectors",
        "16",
        "--disk-log-records",
        "1",
    ]);
    assert_eq!(code, Some(0), "the run on the restored disk:\n{err}");
    assert!(err.contains("disk: log: replayed 200 records"), "{err}");
    assert!(err.contains("replay: 201 records, all valid"), "{err}");
    eprintln!("{checkpoints} checkpoints during the run; the restore passed");
}

/// Measurement (no timed asserts): the checkpoint pause and the disk copy
/// of a kv guest on a 256 MiB disk holding some MiB of log, in process.
#[test]
fn measure_disk_checkpoint_256mib() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("kv.img");
    sparse_image(&disk, 256 << 20);
    let opts = RunOptions {
        workload: Workload::Kv,
        mem_bytes: 256 << 20,
        disk: Some(disk.clone()),
        ..Default::default()
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (mut vm, net) = run::boot_service(&opts, Some(listener)).unwrap();
    let mut c = Client::connect(addr);
    let big = vec![0x5au8; 60_000];
    let mut ck = crate::state::on_demand_checkpointer(&dir.path().join("ck"));
    // A second client keeps putting small values meanwhile: each PUT is a
    // logged write and a FLUSH, which waits while the disk is held.
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let putter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(addr);
            let mut lat = Vec::new();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                assert_eq!(
                    c.call(op::PUT, format!("p{}", i % 64).as_bytes(), b"v").0,
                    status::OK
                );
                lat.push((t, t.elapsed()));
                i += 1;
            }
            lat
        })
    };
    let mut windows = Vec::new();
    for round in 0..3u32 {
        for i in 0..200u32 {
            let key = format!("r{round}-{i}");
            assert_eq!(c.call(op::PUT, key.as_bytes(), &big).0, status::OK);
        }
        let t = Instant::now();
        let r = ck.checkpoint(&vm).unwrap();
        windows.push((t, Instant::now()));
        eprintln!(
            "round {round}: disk data {} MiB, paused {:.3} ms (save {} us, copy-on-write arm {:.3} ms, memory copy {:.3} ms, disk hold {} us), disk held (settle + copy + fsync) {:.1} ms, whole write {:.1} ms, copy-on-write faults {:?}",
            r.written.manifest.disk_data_bytes.unwrap() >> 20,
            r.paused.as_secs_f64() * 1e3,
            r.save.as_micros(),
            r.arm.as_secs_f64() * 1e3,
            r.copy.as_secs_f64() * 1e3,
            r.hold.as_micros(),
            r.written.disk_time.unwrap().as_secs_f64() * 1e3,
            r.written.total_time.as_secs_f64() * 1e3,
            r.cow.as_ref().map(|c| c.faults),
        );
        // The guest runs after the checkpoint.
        assert_eq!(c.call(op::GET, b"r0-0", b"").0, status::OK);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let lat = putter.join().unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let t0 = windows[0].0;
    let mut worst = lat.clone();
    worst.sort_by_key(|(_, d)| std::cmp::Reverse(*d));
    for (t, d) in worst.iter().take(5) {
        eprintln!(
            "slow PUT at +{:.1} ms: {:.1} ms",
            ms(t.saturating_duration_since(t0)),
            ms(*d)
        );
    }
    for (a, b) in &windows {
        eprintln!(
            "checkpoint +{:.1}..+{:.1} ms",
            ms(a.saturating_duration_since(t0)),
            ms(b.saturating_duration_since(t0))
        );
    }
    // PUTs that overlap a checkpoint (pause, hold, file writes) and the
    // others (the big PUTs of the other client compete with them).
    let (mut during, mut outside): (Vec<_>, Vec<_>) = lat
        .iter()
        .partition(|(t, d)| windows.iter().any(|&(a, b)| *t < b && *t + *d > a));
    for (name, v) in [
        ("during checkpoints", &mut during),
        ("outside", &mut outside),
    ] {
        v.sort_by_key(|(_, d)| *d);
        if v.is_empty() {
            eprintln!("concurrent small PUTs {name}: none");
            continue;
        }
        eprintln!(
            "concurrent small PUTs {name}: {} done, p50 {:.2} ms, p99 {:.2} ms, max {:.1} ms",
            v.len(),
            ms(v[v.len() / 2].1),
            ms(v[v.len() * 99 / 100].1),
            ms(v[v.len() - 1].1)
        );
    }
    drop(c);
    drop(net);
    vm.shutdown();
}
