//! Unit tests of the capture: /proc parsing, page selection, error paths.

use super::*;

#[test]
fn parses_stat_with_odd_comm() {
    let line = "1234 (a) b (c) S 77 1234 1 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 98765 1 2 3";
    let s = parse_stat(line).expect("parses");
    assert_eq!(s.state, 'S');
    assert_eq!(s.ppid, 77);
    assert_eq!(s.starttime, 98765);
    assert!(parse_stat("garbage").is_none());
}

#[test]
fn parses_own_stat() {
    let s = read_stat(Pid::this()).expect("readable").expect("exists");
    assert_eq!(s.ppid, nix::unistd::getppid().as_raw());
    assert!(s.starttime > 0);
}

#[test]
fn parses_maps_lines() {
    let m = parse_maps_line(
        "7f1c2a000000-7f1c2a021000 rw-p 00000000 00:00 0                          [heap]",
    )
    .expect("parses");
    assert_eq!((m.start, m.end), (0x7f1c2a000000, 0x7f1c2a021000));
    assert_eq!(m.prot, PROT_READ | PROT_WRITE);
    assert_eq!(m.name, "[heap]");
    assert_eq!(classify(&m), Kind::PrivateAnon);
    let m = parse_maps_line("7f00-8000 rw-p 00002000 fe:00 247282    /usr/lib/libc.so.6 (deleted)")
        .expect("parses");
    assert_eq!(m.offset, 0x2000);
    assert_eq!(m.dev, 0xfe << 32);
    assert_eq!(m.inode, 247282);
    assert_eq!(m.name, "/usr/lib/libc.so.6 (deleted)");
    assert_eq!(classify(&m), Kind::PrivateFile);
    let m =
        parse_maps_line("1000-2000 rw-s 00000000 00:01 1025 /dev/zero (deleted)").expect("parses");
    assert_eq!(classify(&m), Kind::SharedObject);
    let m =
        parse_maps_line("1000-2000 rw-s 00000000 00:1a 9 /memfd:buf (deleted)").expect("parses");
    assert_eq!(classify(&m), Kind::SharedObject);
    let m = parse_maps_line("1000-2000 rw-s 00000000 fe:00 9 /var/db/file").expect("parses");
    assert_eq!(classify(&m), Kind::Skip);
    let m = parse_maps_line("1000-2000 r--p 00000000 00:00 0").expect("parses");
    assert_eq!(m.name, "");
    assert_eq!(classify(&m), Kind::Skip);
    let m = parse_maps_line("1000-2000 rw-p 00000000 00:00 0 [vvar]").expect("parses");
    assert_eq!(classify(&m), Kind::Skip);
    assert!(parse_maps_line("nonsense").is_none());
}

#[test]
fn every_own_maps_line_parses() {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
    for line in maps.lines() {
        assert!(parse_maps_line(line).is_some(), "{line}");
    }
}

#[test]
fn resident_pages_of_own_heap() {
    let v = vec![7u8; 64 * PAGE_SIZE];
    let pagemap = File::open("/proc/self/pagemap").expect("pagemap");
    let start = (v.as_ptr() as u64).next_multiple_of(PAGE_SIZE as u64);
    let mut out = Vec::new();
    resident_pages(
        &pagemap,
        start,
        start + 63 * PAGE_SIZE as u64,
        &mut out,
        &mut Vec::new(),
    )
    .expect("pagemap readable");
    assert_eq!(out.len(), 63);
    assert!(out.windows(2).all(|w| w[0] + PAGE_SIZE as u64 == w[1]));
    drop(v);
}

#[test]
fn snapshot_reads_own_pages_and_skips_unmapped() {
    let mut v = vec![0u8; 4 * PAGE_SIZE];
    let base = (v.as_ptr() as u64).next_multiple_of(PAGE_SIZE as u64);
    let off = (base - v.as_ptr() as u64) as usize;
    v[off] = 1;
    v[off + PAGE_SIZE] = 2;
    let plan = vec![
        (1, base),
        (2, 8),
        (3, base + PAGE_SIZE as u64),
        (4, 16 * PAGE_SIZE as u64),
    ];
    let mut snap = Snapshot::default();
    let r = snap.read(Pid::this(), 0, &plan).expect("read");
    assert!(matches!(r, ReadOutcome::Done));
    assert_eq!(snap.len, 2);
    assert_eq!(snap.keys, vec![1, 3]);
    assert_eq!(snap.unreadable, 2);
    assert_eq!(snap.pages[0][0], 1);
    assert_eq!(snap.pages[1][0], 2);
}

#[test]
fn store_drops_unmarked() {
    let mut s = Store::default();
    s.insert(5, &ZERO_PAGE, 1);
    s.insert(3, &ZERO_PAGE, 1);
    s.insert(9, &ZERO_PAGE, 2);
    assert_eq!(s.take_unmarked(2), vec![3, 5]);
    assert_eq!(s.index.len(), 1);
    s.insert(4, &ZERO_PAGE, 2);
    assert_eq!(s.pages.len(), 3);
}

#[test]
fn no_such_process() {
    let opts = CaptureOptions::new(999_999_999);
    let stop = AtomicBool::new(false);
    let r = capture(&opts, Vec::new(), &stop, &mut |_| {});
    assert!(
        matches!(r, Err(CaptureError::NoSuchProcess { pid: 999_999_999 })),
        "{r:?}"
    );
}

#[test]
fn zombie_target_is_exited() {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let pid = child.id();
    // Wait for it to become a zombie without reaping it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while read_stat(Pid::from_raw(pid as i32))
        .expect("stat")
        .map(|s| s.state)
        != Some('Z')
    {
        assert!(Instant::now() < deadline, "child did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    let stop = AtomicBool::new(false);
    let r = capture(&CaptureOptions::new(pid), Vec::new(), &stop, &mut |_| {});
    assert!(matches!(r, Err(CaptureError::TargetExited { .. })), "{r:?}");
    child.wait().expect("reap");
}

#[test]
fn zero_epochs_rejected() {
    let opts = CaptureOptions {
        epochs: Some(0),
        ..CaptureOptions::new(1)
    };
    let r = capture(&opts, Vec::new(), &AtomicBool::new(false), &mut |_| {});
    assert!(matches!(r, Err(CaptureError::InvalidOptions { .. })));
}

#[test]
fn captures_a_sleeping_child_and_resumes_it() {
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .expect("spawn sleep");
    let pid = child.id();
    let opts = CaptureOptions {
        epochs: Some(3),
        epoch_ms: 20,
        zstd_level: None,
        ..CaptureOptions::new(pid)
    };
    let mut seen = Vec::new();
    let mut out = Vec::new();
    let r = capture(&opts, &mut out, &AtomicBool::new(false), &mut |e| {
        seen.push(e.clone())
    });
    let state = read_stat(Pid::from_raw(pid as i32))
        .expect("stat")
        .map(|s| s.state);
    child.kill().expect("kill");
    child.wait().expect("reap");
    let s = r.expect("capture");
    assert_eq!(s.epochs, 3);
    assert_eq!(s.end, EndReason::EpochLimit);
    assert_eq!(seen.len(), 3);
    assert!(seen[0].tracked_pages > 0);
    assert_eq!(u64::from(seen[0].dirty), seen[0].tracked_pages);
    assert!(
        state.is_some_and(|c| c != 'T'),
        "child left stopped: {state:?}"
    );
    let mut replay = crate::trace::Replay::new(&out[..]).expect("header");
    let mut n = 0;
    while let Some(d) = replay.next_epoch().expect("valid trace") {
        assert_eq!(d.epoch, n);
        n += 1;
    }
    assert_eq!(n, 3);
}

/// Spawns `sleep 30`, killed and reaped on drop.
struct Sleeper(std::process::Child);

impl Sleeper {
    fn new() -> Self {
        Self(
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("spawn sleep"),
        )
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.0.id() as i32)
    }

    fn state(&self) -> Option<char> {
        read_stat(self.pid()).expect("stat").map(|s| s.state)
    }

    fn wait_state(&self, want: char) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.state() != Some(want) {
            assert!(
                Instant::now() < deadline,
                "state {:?}, want {want}",
                self.state()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn guard_resumes_on_panic() {
    let target = Sleeper::new();
    let pid = target.pid();
    let r = std::panic::catch_unwind(|| {
        let mut guard = StopGuard::new();
        guard.stop(pid).expect("SIGSTOP");
        target.wait_state('T');
        panic!("capture bug");
    });
    assert!(r.is_err());
    target.wait_state('S');
}

/// A writer that fails once it has taken `left` bytes.
struct FailingWriter {
    left: usize,
}

impl Write for FailingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Err(io::Error::other("disk full"));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn write_error_is_reported_and_target_resumed() {
    let target = Sleeper::new();
    let opts = CaptureOptions {
        epochs: Some(3),
        epoch_ms: 10,
        zstd_level: None,
        ..CaptureOptions::new(target.0.id())
    };
    let out = FailingWriter { left: 10_000 };
    let r = capture(&opts, out, &AtomicBool::new(false), &mut |_| {});
    assert!(
        matches!(r, Err(CaptureError::WriteTrace { epoch: 0, .. })),
        "{r:?}"
    );
    target.wait_state('S');
}
