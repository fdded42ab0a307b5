//! End-to-end tests: capture of real processes (python3 programs writing
//! memory in known patterns) through the library API, read back with
//! `Replay`. They need root (or ptrace rights over the children) and
//! `python3`; without them they fail with the reason.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use simrep::compress::PageView;
use simrep::trace::capture::{capture, CaptureOptions, EndReason, EpochSummary};
use simrep::trace::format::{key_slot, make_key, SHARED_SLOT_BASE};
use simrep::trace::Replay;

/// Pages of the test buffer; the first `HOT` are rewritten continuously.
const PAGES: u64 = 256;
const HOT: u64 = 8;
const PAGE: u64 = 4096;

/// Writes a page-aligned buffer: page `p` starts with `SIMREP-COLD-%04d`,
/// the first `HOT` pages get a counter at byte 16, forever. Prints the
/// buffer's address once it is initialised.
const PATTERN: &str = r#"
import ctypes, sys, time
N, HOT = int(sys.argv[1]), int(sys.argv[2])
LIFE = float(sys.argv[3])
buf = bytearray(N * 4096 + 4096)
addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
start = (addr + 4095) // 4096 * 4096
off = start - addr
for p in range(N):
    o = off + p * 4096
    buf[o:o + 16] = b"SIMREP-COLD-%04d" % p
print(start, flush=True)
t0 = time.monotonic()
i = 0
while LIFE <= 0 or time.monotonic() - t0 < LIFE:
    i += 1
    for p in range(HOT):
        o = off + p * 4096 + 16
        buf[o:o + 8] = i.to_bytes(8, "little")
    time.sleep(0.001)
"#;

/// Parent and child share an anonymous `MAP_SHARED` mapping; the child
/// writes a counter into its first page and into a private buffer.
const TREE: &str = r#"
import mmap, os, sys, time
shared = mmap.mmap(-1, 16 * 4096)
shared[0:16] = b"SIMREP-SHARED-00"
pid = os.fork()
if pid == 0:
    own = bytearray(b"SIMREP-CHILD-BUF" * 4096)
    i = 0
    while True:
        i += 1
        shared[16:24] = i.to_bytes(8, "little")
        own[16:24] = i.to_bytes(8, "little")
        time.sleep(0.001)
print(pid, flush=True)
while True:
    time.sleep(0.01)
"#;

/// A child process killed when the test ends, whatever happens.
struct Target {
    child: Child,
    first_line: String,
}

impl Target {
    fn python(script: &str, args: &[&str]) -> Self {
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(script)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("python3 is needed for the capture tests: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut first_line = String::new();
        BufReader::new(stdout)
            .read_line(&mut first_line)
            .expect("read the target's first line");
        assert!(
            !first_line.is_empty(),
            "the python target printed nothing (crashed?)"
        );
        Self { child, first_line }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn number(&self) -> u64 {
        self.first_line
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("target printed {:?}: {e}", self.first_line))
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills a process (not our child: a grandchild) when the test ends.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .status();
    }
}

/// The state letter in `/proc/PID/stat`, `None` if the process is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

fn assert_running(pid: u32) {
    let state = proc_state(pid);
    assert!(
        matches!(state, Some('R' | 'S' | 'D')),
        "target {pid} not left running after the capture: state {state:?}"
    );
}

fn run_capture(
    opts: &CaptureOptions,
    path: &Path,
    stop: &AtomicBool,
) -> (simrep::trace::capture::CaptureSummary, Vec<EpochSummary>) {
    let file = std::fs::File::create(path).expect("create trace file");
    let mut epochs = Vec::new();
    let summary = capture(opts, std::io::BufWriter::new(file), stop, &mut |e| {
        epochs.push(e.clone())
    })
    .unwrap_or_else(|e| panic!("capture failed (needs root or ptrace rights): {e:?}"));
    (summary, epochs)
}

#[test]
fn capture_sees_the_written_pattern() {
    let target = Target::python(PATTERN, &[&PAGES.to_string(), &HOT.to_string(), "0"]);
    let start = target.number();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("pattern.trace");
    let opts = CaptureOptions {
        epochs: Some(5),
        epoch_ms: 50,
        ..CaptureOptions::new(target.pid())
    };
    let (summary, per_epoch) = run_capture(&opts, &path, &AtomicBool::new(false));
    assert_running(target.pid());
    assert_eq!(summary.epochs, 5);
    assert_eq!(summary.end, EndReason::EpochLimit);
    assert_eq!(per_epoch.len(), 5);
    for e in &per_epoch {
        eprintln!(
            "epoch {}: {} pages read, {} dirty, {} dropped, stop {:.2} ms (read {:.2} ms), compare {:.2} ms",
            e.epoch,
            e.tracked_pages,
            e.dirty,
            e.dropped,
            e.stop_ns as f64 / 1e6,
            e.read_ns as f64 / 1e6,
            e.compare_ns as f64 / 1e6
        );
    }

    let mut replay = Replay::open(&path).expect("open trace");
    assert!(replay.header().is_zstd());
    assert_eq!(replay.header().epoch_ms, 50);
    let key = |p: u64| make_key(0, start + p * PAGE);
    let mut last_counter = 0u64;
    let mut n = 0;
    while let Some(d) = replay.next_epoch().expect("trace readable") {
        assert_eq!(d.epoch, n);
        let frame = |p: u64| {
            replay
                .frame_of(key(p))
                .unwrap_or_else(|| panic!("page {p} of the buffer not in the trace"))
        };
        if n == 0 {
            assert_eq!(d.dirty.len() as u32, replay.frame_count());
            for p in 0..PAGES {
                let page = replay.image().page(frame(p));
                assert_eq!(&page[..16], format!("SIMREP-COLD-{p:04}").as_bytes());
            }
        } else {
            for p in 0..HOT {
                assert!(
                    d.dirty.binary_search(&frame(p)).is_ok(),
                    "hot page {p} not dirty in epoch {n}"
                );
            }
            for p in HOT..PAGES {
                assert!(
                    d.dirty.binary_search(&frame(p)).is_err(),
                    "cold page {p} dirty in epoch {n}"
                );
            }
            assert!(d.run_ns >= 40_000_000, "ran only {} ns", d.run_ns);
        }
        let page = replay.image().page(frame(0));
        let mut c = [0u8; 8];
        c.copy_from_slice(&page[16..24]);
        let counter = u64::from_le_bytes(c);
        assert!(
            counter > last_counter || n == 0,
            "counter did not advance in epoch {n}"
        );
        last_counter = counter;
        assert!(d.stop_ns > 0 && d.tracked_pages >= PAGES);
        n += 1;
    }
    assert_eq!(n, 5);
    assert!(replay.processes().iter().any(|p| p.pid == target.pid()));
}

#[test]
fn stop_flag_ends_the_capture_and_resumes_the_target() {
    let target = Target::python(PATTERN, &["64", "4", "0"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stopped.trace");
    let opts = CaptureOptions {
        epoch_ms: 20,
        zstd_level: None,
        ..CaptureOptions::new(target.pid())
    };
    let stop = AtomicBool::new(false);
    let (summary, _) = std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            stop.store(true, Ordering::Relaxed);
        });
        run_capture(&opts, &path, &stop)
    });
    assert_running(target.pid());
    assert_eq!(summary.end, EndReason::StopRequested);
    assert!(summary.epochs >= 3, "{} epochs", summary.epochs);
    let mut replay = Replay::open(&path).expect("open trace");
    let mut n = 0;
    while replay.next_epoch().expect("trace readable").is_some() {
        n += 1;
    }
    assert_eq!(n, summary.epochs);
}

#[test]
fn target_exit_ends_the_capture_cleanly() {
    let target = Target::python(PATTERN, &["64", "4", "0.4"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("exited.trace");
    let opts = CaptureOptions {
        epoch_ms: 30,
        ..CaptureOptions::new(target.pid())
    };
    let t = Instant::now();
    let (summary, _) = run_capture(&opts, &path, &AtomicBool::new(false));
    assert!(t.elapsed() < Duration::from_secs(10));
    // The child is a zombie until reaped: it exited, the capture noticed.
    assert_eq!(summary.end, EndReason::TargetExited);
    assert!(summary.epochs >= 2, "{} epochs", summary.epochs);
    let mut replay = Replay::open(&path).expect("open trace");
    let mut n = 0;
    while replay.next_epoch().expect("trace readable").is_some() {
        n += 1;
    }
    assert_eq!(n, summary.epochs);
}

#[test]
fn tree_capture_follows_children_and_shared_memory() {
    let parent = Target::python(TREE, &[]);
    let child_pid = parent.number() as u32;
    let _child = KillOnDrop(child_pid);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tree.trace");
    let opts = CaptureOptions {
        tree: true,
        epochs: Some(4),
        epoch_ms: 40,
        ..CaptureOptions::new(parent.pid())
    };
    let (summary, per_epoch) = run_capture(&opts, &path, &AtomicBool::new(false));
    assert_running(parent.pid());
    assert_running(child_pid);
    assert_eq!(summary.processes, 2);
    assert!(per_epoch.iter().all(|e| e.processes == 2));

    let mut replay = Replay::open(&path).expect("open trace");
    let mut n = 0;
    while let Some(d) = replay.next_epoch().expect("trace readable") {
        let shared_dirty = d
            .dirty
            .iter()
            .filter(|&&f| key_slot(replay.key_of(f)) >= SHARED_SLOT_BASE)
            .count();
        let child_dirty = d
            .dirty
            .iter()
            .filter(|&&f| key_slot(replay.key_of(f)) == 1)
            .count();
        assert!(shared_dirty >= 1, "no shared page dirty in epoch {n}");
        assert!(child_dirty >= 1, "no page of the child dirty in epoch {n}");
        n += 1;
    }
    assert_eq!(n, 4);
    let procs = replay.processes();
    assert!(procs.iter().any(|p| p.pid == parent.pid() && p.slot == 0));
    assert!(procs.iter().any(|p| p.pid == child_pid && p.slot == 1));
    // The shared mapping's first page holds its marker, and is read once.
    let shared: Vec<u32> = (0..replay.frame_count())
        .filter(|&f| replay.key_of(f) == make_key(SHARED_SLOT_BASE, 0))
        .collect();
    assert_eq!(shared.len(), 1);
    assert_eq!(&replay.image().page(shared[0])[..16], b"SIMREP-SHARED-00");
}
