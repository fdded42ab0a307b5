//! End-to-end tests of the block device with real KVM: the guest's `disk`
//! workload against a real host file, checked byte for byte from the host;
//! the append-only log across runs; error statuses for bad requests; clear
//! errors and exit codes for unusable disk images.
//!
//! They need `/dev/kvm` (root on this project's machines); without it they
//! fail and say why.

use std::path::Path;
use std::time::{Duration, Instant};
use tests::require_kvm;

use simrep::vmm::abi;

const SECTOR: usize = 512;
/// `simrep run`'s default layout: the log in sectors 0..2048, the pattern
/// right after it.
const LOG_SECTORS: usize = 2048;
const SEED: u64 = 1;

/// Runs `simrep args...` to its end (at most 120 s).
fn run_cli(args: &[&str]) -> (Option<i32>, String) {
    tests::run_cli(args, Duration::from_secs(120))
}

fn image(dir: &Path, bytes: usize) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    std::fs::write(&p, vec![0u8; bytes]).unwrap();
    p
}

fn run_disk(disk: &Path, pattern: u32, records: u32) -> (Option<i32>, String) {
    run_cli(&[
        "run",
        "--workload",
        "disk",
        "--mem",
        "64M",
        "--disk",
        disk.to_str().unwrap(),
        "--disk-pattern-sectors",
        &pattern.to_string(),
        "--disk-log-records",
        &records.to_string(),
    ])
}

/// CRC-32 (IEEE), bit by bit: independent of the guest's table version.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = !0u32;
    for part in parts {
        for &b in *part {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
    }
    !c
}

/// The `disk` workload's record `seq` (as `simrep-guest/src/block.rs`
/// makes it).
fn expected_record(seq: u64) -> Vec<u8> {
    let len = 1 + (seq.wrapping_mul(2_654_435_761) % 6000) as usize;
    (0..len)
        .map(|j| (seq as u8).wrapping_mul(31) ^ (j as u8).wrapping_mul(7) ^ (j >> 8) as u8)
        .collect()
}

/// Parses the log region of an image as the guest's `Log::replay` does;
/// returns the payloads and the sectors they take.
fn parse_log(img: &[u8]) -> (Vec<Vec<u8>>, usize) {
    let hdr = abi::LOG_HEADER_SIZE as usize;
    let mut records = Vec::new();
    let mut s = 0usize;
    let mut last_gen = 0;
    while s < LOG_SECTORS {
        let h = &img[s * SECTOR..];
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let len = word(4) as usize;
        let seq = u64::from_le_bytes(h[8..16].try_into().unwrap());
        let gen = word(16);
        if word(0) != abi::LOG_MAGIC
            || seq != records.len() as u64
            || gen < last_gen
            || len as u64 > abi::LOG_MAX_RECORD
        {
            break;
        }
        let sectors = (hdr + len).div_ceil(SECTOR);
        if s + sectors > LOG_SECTORS {
            break;
        }
        let payload = &h[hdr..hdr + len];
        if crc32(&[&h[..20], payload]) != word(20) {
            break;
        }
        last_gen = gen;
        assert!(
            h[hdr + len..sectors * SECTOR].iter().all(|&b| b == 0),
            "record {seq} is not zero-padded"
        );
        records.push(payload.to_vec());
        s += sectors;
    }
    (records, s)
}

fn pattern_sector(sector: u64) -> Vec<u8> {
    (0..64)
        .flat_map(|w| abi::disk_pattern_word(SEED, sector, w).to_le_bytes())
        .collect()
}

#[test]
fn disk_workload_passes_and_the_file_holds_exactly_what_the_guest_flushed() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), 16 << 20);
    let (code, err) = run_disk(&disk, 1000, 40);
    assert_eq!(code, Some(0), "stderr:\n{err}");
    for line in [
        "disk: capacity 32768 sectors (16 MiB)",
        "disk: pattern: 1000 sectors written, read back before and after the flush: ok",
        "disk: log: replayed 0 records",
        "disk: log: appended 40 records, flushed; replay: 40 records, all valid",
        "disk: ok",
    ] {
        assert!(err.contains(line), "missing `{line}` in:\n{err}");
    }
    assert!(!err.contains("FAIL"), "{err}");

    let img = std::fs::read(&disk).unwrap();
    assert_eq!(img.len(), 16 << 20, "the image changed size");
    // The log region: 40 valid records with the expected payloads, zeros after.
    let (records, used) = parse_log(&img);
    assert_eq!(records.len(), 40);
    for (seq, r) in records.iter().enumerate() {
        assert_eq!(r, &expected_record(seq as u64), "record {seq}");
    }
    assert!(
        img[used * SECTOR..LOG_SECTORS * SECTOR]
            .iter()
            .all(|&b| b == 0),
        "bytes after the last log record"
    );
    // The pattern region, sector by sector.
    for i in 0..1000u64 {
        let s = LOG_SECTORS + i as usize;
        assert_eq!(
            &img[s * SECTOR..(s + 1) * SECTOR],
            &pattern_sector(LOG_SECTORS as u64 + i)[..],
            "pattern sector {s}"
        );
    }
    // Nothing else was written (the error probes wrote nothing).
    assert!(
        img[(LOG_SECTORS + 1000) * SECTOR..].iter().all(|&b| b == 0),
        "bytes after the pattern are not zero"
    );
}

#[test]
fn bad_guest_requests_get_error_statuses_and_the_guest_goes_on() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), 4 << 20);
    let (code, err) = run_disk(&disk, 8, 1);
    assert_eq!(code, Some(0), "stderr:\n{err}");
    for probe in [
        "probe out-of-range sector: status OUT_OF_RANGE as expected",
        "probe zero count: status BAD_COUNT as expected",
        "probe oversized count: status BAD_COUNT as expected",
        "probe unknown op: status BAD_OP as expected",
        "probe buffer outside RAM: status BAD_BUFFER as expected",
        "probe descriptor outside RAM: status BAD_DESCRIPTOR as expected",
        "disk: ok",
    ] {
        assert!(err.contains(probe), "missing `{probe}` in:\n{err}");
    }
    // The VMM counted the failed requests (5 probes + the bad descriptor).
    assert!(err.contains("failed: 6"), "stats line:\n{err}");
}

#[test]
fn the_log_persists_across_runs_and_replay_stops_at_a_corrupt_record() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let disk = image(dir.path(), 8 << 20);
    let (code, err) = run_disk(&disk, 16, 30);
    assert_eq!(code, Some(0), "first run:\n{err}");
    let (code, err) = run_disk(&disk, 16, 25);
    assert_eq!(code, Some(0), "second run:\n{err}");
    assert!(err.contains("disk: log: replayed 30 records"), "{err}");
    assert!(
        err.contains("appended 25 records, flushed; replay: 55 records, all valid"),
        "{err}"
    );
    let mut img = std::fs::read(&disk).unwrap();
    let (records, _) = parse_log(&img);
    assert_eq!(records.len(), 55);

    // Flip a payload byte of record 20: the log ends before it.
    let mut s = 0;
    for r in &records[..20] {
        s += (abi::LOG_HEADER_SIZE as usize + r.len()).div_ceil(SECTOR);
    }
    img[s * SECTOR + abi::LOG_HEADER_SIZE as usize] ^= 0xff;
    std::fs::write(&disk, &img).unwrap();
    let (code, err) = run_disk(&disk, 16, 5);
    assert_eq!(code, Some(0), "third run:\n{err}");
    assert!(err.contains("disk: log: replayed 20 records"), "{err}");
    assert!(err.contains("replay: 25 records, all valid"), "{err}");
    let (records, _) = parse_log(&std::fs::read(&disk).unwrap());
    assert_eq!(records.len(), 25);
}

#[test]
fn without_a_disk_the_device_has_no_capacity_and_rejects_io() {
    require_kvm();
    let (code, err) = run_cli(&["run", "--workload", "disk", "--mem", "64M"]);
    assert_eq!(code, Some(4), "a disk test without a disk fails:\n{err}");
    assert!(err.contains("disk: capacity 0 sectors"), "{err}");
    assert!(err.contains("read -> NO_DISK, flush -> NO_DISK"), "{err}");
    assert!(err.contains("exited with status 2"), "{err}");
}

#[test]
fn unusable_disk_images_are_clear_errors_before_the_guest_starts() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0u8; 1000]).unwrap();
    let empty = dir.path().join("empty.img");
    std::fs::write(&empty, b"").unwrap();
    let missing = dir.path().join("missing.img");
    let cases = [
        (missing.as_path(), "cannot open disk image"),
        (dir.path(), "is not a regular file"),
        (
            odd.as_path(),
            "is 1000 bytes: not a positive multiple of 512",
        ),
        (
            empty.as_path(),
            "is 0 bytes: not a positive multiple of 512",
        ),
    ];
    for (path, msg) in cases {
        let (code, err) = run_cli(&[
            "run",
            "--workload",
            "disk",
            "--mem",
            "64M",
            "--disk",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(3), "{}: stderr:\n{err}", path.display());
        assert!(
            err.contains(msg),
            "{}: no `{msg}` in:\n{err}",
            path.display()
        );
        assert!(
            err.contains(&path.display().to_string()),
            "the error names the file:\n{err}"
        );
        assert!(!err.contains("guest started"), "the guest started:\n{err}");
    }
}

/// The replication API with a real guest: with the `Replicated` policy the
/// VMM takes the guest's writes epoch by epoch while it runs, the file
/// never changes before a commit, the guest still reads its own writes
/// (its checks pass), a backup image built from the epochs alone equals
/// the primary's after the commit, and holds the pattern and the log.
#[test]
fn replicated_disk_changes_only_on_commit_and_epochs_rebuild_it_on_a_backup() {
    use simrep::vmm::block::{DiskFile, FlushPolicy};
    use simrep::vmm::run::{self, DiskOptions, RunOptions, Workload};
    use simrep::vmm::vcpu::VcpuOutcome;

    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let primary = image(dir.path(), 4 << 20);
    let backup = dir.path().join("backup.img");
    std::fs::write(&backup, vec![0u8; 4 << 20]).unwrap();
    let opts = RunOptions {
        workload: Workload::Disk,
        mem_bytes: 64 << 20,
        disk: Some(primary.clone()),
        disk_policy: FlushPolicy::Replicated,
        disk_test: DiskOptions {
            pattern_sectors: 600,
            log_records: 100,
            probe_errors: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut vm = run::boot(&opts).expect("boot");
    let block = vm.bus().block();
    assert_eq!(block.policy(), FlushPolicy::Replicated);
    let mut epochs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let event = loop {
        if let Some(ev) = vm.wait_exit(Duration::from_millis(2)) {
            break ev;
        }
        assert!(Instant::now() < deadline, "the guest did not finish");
        vm.pause_all().expect("pause");
        epochs.push(block.take_epoch_writes());
        vm.resume_all().expect("resume");
    };
    vm.shutdown();
    assert!(
        matches!(event.result, Ok(VcpuOutcome::GuestExit(0))),
        "the guest's checks failed: {:?}",
        event.result
    );
    epochs.push(block.take_epoch_writes());
    let written = epochs.iter().filter(|e| !e.is_empty()).count();
    // Usually many; a starved test thread may see the guest finish in one.
    eprintln!("{} epochs, {written} with writes", epochs.len());
    assert!(written >= 1, "no epoch carried the guest's writes");
    for (i, e) in epochs.iter().enumerate() {
        assert_eq!(e.epoch, i as u64, "epochs are numbered in order");
    }
    assert!(
        std::fs::read(&primary).unwrap().iter().all(|&b| b == 0),
        "the primary's file changed before any commit"
    );
    assert!(block.buffered_bytes() > 0);

    // The backup applies each epoch as it commits it.
    let b = DiskFile::open(&backup).unwrap();
    for e in &epochs {
        b.apply(e).unwrap();
    }
    // The primary commits everything the backup acked.
    let last = epochs.last().unwrap().epoch;
    block.commit(last).unwrap();
    assert_eq!(block.buffered_bytes(), 0);
    let p = std::fs::read(&primary).unwrap();
    assert!(
        p == std::fs::read(&backup).unwrap(),
        "backup image differs from the primary's"
    );
    let (records, _) = parse_log(&p);
    assert_eq!(records.len(), 100);
    for i in 0..600u64 {
        let s = LOG_SECTORS + i as usize;
        assert_eq!(
            &p[s * SECTOR..(s + 1) * SECTOR],
            &pattern_sector(LOG_SECTORS as u64 + i)[..],
            "pattern sector {s}"
        );
    }
}
