//! End-to-end tests of the eBPF page-fault counter on the real kernel.
//!
//! They need root, bpffs at `/sys/fs/bpf`, tracefs at `/sys/kernel/tracing`
//! and `bpftool` (`cargo xtask setup` provides all of them); without one of
//! them a test fails and says which.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;
use simrep::ebpf::{EbpfError, FaultCounts, PageFaultCounter, CONFIG_MAP, FAULT_COUNTERS_MAP};

const PAGE: usize = 4096;
/// Pages the traced child writes.
const TARGET_PAGES: usize = 256;
/// Pages the untraced child writes: far more, so that counting them by
/// mistake cannot hide.
const BYSTANDER_PAGES: usize = 2048;

/// Env var that turns [`crash_helper`] on; its value is the instance name.
const CRASH_HELPER_ENV: &str = "SIMREP_E2E_EBPF_CRASH_HELPER";

/// Fails the test, with the reason, unless we run as root.
pub(crate) fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the eBPF end-to-end tests need root (CAP_BPF, CAP_PERFMON): run them as root"
    );
}

/// An instance name unique to this test process.
fn instance(test: &str) -> String {
    format!("e2e-{test}-{}", std::process::id())
}

/// Loads the counter or fails the test with the full reason.
fn load(name: &str, tgid: u32) -> PageFaultCounter {
    PageFaultCounter::load(name, tgid).unwrap_or_else(|e| {
        panic!(
            "cannot load the eBPF page-fault counter: {}",
            error_chain(&e)
        )
    })
}

pub(crate) use simrep::error_chain;

/// A forked child that, once released, writes one byte to each of `pages`
/// fresh anonymous pages and exits.
struct Toucher {
    pid: libc::pid_t,
    /// Write end of the pipe the child waits on.
    go: Option<OwnedFd>,
}

impl Toucher {
    fn fork(pages: usize) -> Self {
        let mut fds = [0; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by
        // nobody else.
        let (rx, tx) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: the child runs only async-signal-safe code (read, mmap,
        // madvise, plain stores, _exit) before it exits, as required after
        // fork in a multi-threaded process.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: child side of fork; see above. Never returns.
            unsafe { child_touch(rx.as_raw_fd(), pages) }
        }
        drop(rx);
        Self { pid, go: Some(tx) }
    }

    /// Releases the child.
    fn go(&mut self) {
        let tx = self.go.take().expect("released twice");
        // SAFETY: writes one byte from a valid buffer to an open pipe.
        let n = unsafe { libc::write(tx.as_raw_fd(), b"g".as_ptr().cast(), 1) };
        assert_eq!(
            n,
            1,
            "write to child pipe: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits for the child; asserts it exited with 0.
    fn wait(mut self) {
        let mut status = 0;
        // SAFETY: waits for our own child; `status` is a valid int.
        let rc = unsafe { libc::waitpid(self.pid, &mut status, 0) };
        assert_eq!(rc, self.pid, "waitpid: {}", std::io::Error::last_os_error());
        self.pid = 0;
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "toucher child failed: status {status:#x}"
        );
    }
}

impl Drop for Toucher {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: kills and reaps our own child (the test failed early).
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// Child side of [`Toucher::fork`]: waits for the go byte, touches `pages`
/// fresh pages, exits. Only async-signal-safe calls.
///
/// # Safety
///
/// Only to be called in a freshly forked child; never returns.
unsafe fn child_touch(go: libc::c_int, pages: usize) -> ! {
    let mut byte = 0u8;
    // SAFETY: reads one byte into a valid buffer; a closed pipe returns 0.
    let n = unsafe { libc::read(go, (&mut byte as *mut u8).cast(), 1) };
    if n != 1 {
        // SAFETY: _exit is always safe to call.
        unsafe { libc::_exit(2) };
    }
    let len = pages * PAGE;
    // SAFETY: a fresh private anonymous mapping, no address hint.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        // SAFETY: _exit is always safe to call.
        unsafe { libc::_exit(3) };
    }
    // One fault per 4 KiB page: no transparent huge pages here. Advisory;
    // its failure only makes the count smaller, which the test would catch.
    // SAFETY: `mem..mem+len` is the mapping just created.
    unsafe { libc::madvise(mem, len, libc::MADV_NOHUGEPAGE) };
    let base = mem.cast::<u8>();
    for i in 0..pages {
        // SAFETY: `i * PAGE < len`, inside the writable mapping.
        unsafe { base.add(i * PAGE).write_volatile(1) };
    }
    // SAFETY: _exit is always safe to call.
    unsafe { libc::_exit(0) }
}

/// Runs `bpftool [-j] map dump pinned PATH`; fails the test if bpftool is
/// missing or fails.
pub(crate) fn bpftool_dump(path: &Path, json: bool) -> String {
    let mut cmd = Command::new("bpftool");
    if json {
        cmd.arg("-j");
    }
    cmd.args(["map", "dump", "pinned"]).arg(path);
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run bpftool ({e}); install it with `cargo xtask setup`")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("bpftool prints UTF-8")
}

/// A number in bpftool's JSON: a plain number (the maps have BTF), or an
/// array of little-endian hex bytes like `["0x01","0x00",...]` (raw dumps).
pub(crate) fn json_number(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().expect("unsigned number"),
        Value::Array(bytes) => bytes.iter().rev().fold(0u64, |acc, b| {
            let s = b.as_str().expect("hex byte string");
            let byte = u64::from_str_radix(s.trim_start_matches("0x"), 16).expect("hex byte");
            (acc << 8) | byte
        }),
        other => panic!("unexpected bpftool value {other}"),
    }
}

/// The entries of `bpftool -j map dump`, using BTF-formatted ones if given.
pub(crate) fn dump_entries(json: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(json).expect("bpftool -j prints JSON");
    v.as_array()
        .expect("bpftool -j map dump prints an array")
        .iter()
        .map(|e| e.get("formatted").unwrap_or(e).clone())
        .collect()
}

/// Sum over CPUs of entry `key` in a per-CPU array dump.
fn per_cpu_sum(entries: &[Value], key: u32) -> u64 {
    let entry = entries
        .iter()
        .find(|e| json_number(&e["key"]) == u64::from(key))
        .unwrap_or_else(|| panic!("no key {key} in {entries:?}"));
    entry["values"]
        .as_array()
        .expect("per-CPU values")
        .iter()
        .map(|v| json_number(&v["value"]))
        .sum()
}

#[test]
fn counts_write_faults_of_the_target_only() {
    require_root();
    let name = instance("count");

    let mut target = Toucher::fork(TARGET_PAGES);
    let mut bystander = Toucher::fork(BYSTANDER_PAGES);
    let target_tgid = u32::try_from(target.pid).expect("positive pid");

    let counter = load(&name, target_tgid);
    let before = counter.counts().expect("read counters");
    assert_eq!(
        (before.faults, before.write_faults),
        (0, 0),
        "the target has not run yet"
    );

    target.go();
    bystander.go();
    target.wait();
    bystander.wait();

    let c = counter.counts().expect("read counters");
    eprintln!("counts after the children ran: {c:?}");
    assert!(
        c.write_faults >= TARGET_PAGES as u64,
        "expected >= {TARGET_PAGES} write faults of the target, got {c:?}"
    );
    assert!(c.faults >= c.write_faults, "{c:?}");
    // The bystander's faults must not be attributed to the target: the
    // target itself makes its pages plus a few dozen (copy-on-write of the
    // stack after fork, exit).
    assert!(
        c.faults < (TARGET_PAGES + BYSTANDER_PAGES / 2) as u64,
        "faults of another process were counted: {c:?}"
    );
    assert!(
        c.other_faults - before.other_faults >= BYSTANDER_PAGES as u64,
        "the bystander's faults were not even seen: {c:?}"
    );
    assert_eq!(c.read_errors, 0, "{c:?}");

    // Nothing counts once the target is gone, whatever others do.
    let mut bystander = Toucher::fork(BYSTANDER_PAGES);
    bystander.go();
    bystander.wait();
    let after = counter.counts().expect("read counters");
    assert_eq!(
        (after.faults, after.write_faults),
        (c.faults, c.write_faults),
        "faults counted after the target exited"
    );
}

#[test]
fn pinned_maps_dump_with_bpftool_and_go_away_on_drop() {
    require_root();
    let name = instance("pins");

    let mut target = Toucher::fork(TARGET_PAGES);
    let target_tgid = u32::try_from(target.pid).expect("positive pid");
    let counter = load(&name, target_tgid);
    let pin_dir = counter.pin_dir().to_owned();
    assert_eq!(pin_dir, Path::new("/sys/fs/bpf/simrep").join(&name));
    let faults_pin = counter.map_pin_path(FAULT_COUNTERS_MAP);
    let config_pin = counter.map_pin_path(CONFIG_MAP);
    assert!(faults_pin.exists(), "{} not pinned", faults_pin.display());
    assert!(config_pin.exists(), "{} not pinned", config_pin.display());

    target.go();
    target.wait();
    // The target is gone: the counts are final.
    let counts: FaultCounts = counter.counts().expect("read counters");
    assert!(counts.write_faults >= TARGET_PAGES as u64, "{counts:?}");

    let plain = bpftool_dump(&faults_pin, false);
    eprintln!("bpftool map dump pinned {}:\n{plain}", faults_pin.display());
    assert!(
        plain.contains("\"key\": 1") && plain.contains("\"cpu\": 0"),
        "bpftool does not show the typed per-CPU counters:\n{plain}"
    );

    let entries = dump_entries(&bpftool_dump(&faults_pin, true));
    assert_eq!(
        per_cpu_sum(&entries, simrep::ebpf::Counter::WriteFaults.index()),
        counts.write_faults,
        "bpftool and the API disagree on the write faults"
    );
    assert_eq!(
        per_cpu_sum(&entries, simrep::ebpf::Counter::Faults.index()),
        counts.faults,
        "bpftool and the API disagree on the faults"
    );

    // The maps carry BTF, so bpftool shows the config struct by field.
    let config = dump_entries(&bpftool_dump(&config_pin, true));
    assert_eq!(
        json_number(&config[0]["value"]["target_tgid"]),
        u64::from(target_tgid),
        "pinned config: {config:?}"
    );

    drop(counter);
    assert!(!faults_pin.exists(), "{} left behind", faults_pin.display());
    assert!(!config_pin.exists(), "{} left behind", config_pin.display());
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
}

#[test]
fn a_live_instance_name_is_refused() {
    require_root();
    let name = instance("live");
    let first = load(&name, 1);
    match PageFaultCounter::load(&name, 1) {
        Err(EbpfError::PinDirInUse { path }) => assert_eq!(path, first.pin_dir()),
        other => panic!("expected PinDirInUse, got {other:?}"),
    }
    drop(first);
    drop(load(&name, 1));
}

#[test]
fn stale_pins_of_a_crashed_run_are_replaced() {
    require_root();
    let name = instance("stale");
    let pin_dir = PathBuf::from("/sys/fs/bpf/simrep").join(&name);

    // A separate process loads under `name` and exits without dropping.
    tests::run_ignored_test("ebpf::crash_helper", &[(CRASH_HELPER_ENV, &name)]);
    let stale = pin_dir.join(CONFIG_MAP);
    assert!(stale.exists(), "the crashed run left no pin to replace");
    let stale_config = dump_entries(&bpftool_dump(&stale, true));

    let my_tgid = std::process::id();
    let counter = load(&name, my_tgid);
    let config = dump_entries(&bpftool_dump(&counter.map_pin_path(CONFIG_MAP), true));
    assert_ne!(config, stale_config, "the stale pin was not replaced");
    assert_eq!(
        json_number(&config[0]["value"]["target_tgid"]),
        u64::from(my_tgid),
        "the pin does not show the new instance's config: {config:?}"
    );
    drop(counter);
    assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
}

/// Not a test: [`stale_pins_of_a_crashed_run_are_replaced`] runs it in
/// a child process, where it loads and "crashes" (exits without cleanup).
#[test]
#[ignore = "helper run by stale_pins_of_a_crashed_run_are_replaced"]
fn crash_helper() {
    let Ok(name) = std::env::var(CRASH_HELPER_ENV) else {
        return;
    };
    let counter = load(&name, 1);
    assert!(counter.map_pin_path(CONFIG_MAP).exists());
    // Like a crash: no destructors run, the pins stay.
    std::process::exit(0);
}
