//! Helpers for the end-to-end tests.
//!
//! The tests run the real `simrep` binary: `cargo xtask test` builds it and
//! passes its path in `SIMREP_BIN`; under a plain `cargo test` the binary
//! next to the test executable's directory is used. A test that cannot find
//! what it needs fails with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// The `simrep` binary to test.
///
/// # Panics
/// When no binary can be found: run `cargo xtask test` (or `cargo build -p simrep`).
pub fn simrep_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SIMREP_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "SIMREP_BIN={} does not exist", p.display());
        return p;
    }
    // target/<profile>/deps/e2e-<hash> -> target/<profile>/simrep
    let exe = std::env::current_exe().expect("current_exe");
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("simrep"))
        .expect("test binary lives in target/<profile>/deps");
    assert!(
        candidate.exists(),
        "the simrep binary was not found at {}: run `cargo xtask test` or `cargo build -p simrep` first",
        candidate.display()
    );
    candidate
}

/// A `Command` for the `simrep` binary.
pub fn simrep() -> Command {
    Command::new(simrep_bin())
}

/// The real sample trace shipped in `../shared/memtrace/`.
///
/// # Panics
/// When the file is missing (the checkout must have `shared/` beside it).
pub fn sample_trace() -> PathBuf {
    let p = workspace_root().join("../shared/memtrace/sqlite-bank-sample.trace");
    assert!(
        p.exists(),
        "sample trace missing at {}: the project's shared/ folder must sit beside the checkout",
        p.display()
    );
    p
}

/// Runs a command and returns its output, printing stderr for diagnosis.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    eprintln!(
        "{cmd:?} -> {}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Whether this process runs as root (the end-to-end tests need it).
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{what} needs root (run the tests as root, as CI does)"
    );
}

/// Fails the test with the reason unless KVM is usable here (`/dev/kvm`
/// exists and this user may open it).
///
/// # Panics
/// Without usable KVM.
pub fn require_kvm() {
    if !Path::new("/dev/kvm").exists() {
        panic!("these tests need KVM: /dev/kvm does not exist on this host");
    }
    if let Err(e) = simrep::vmm::vm::open_kvm() {
        panic!("these tests need KVM: {e} (run as root)");
    }
}

/// `s` without ANSI escape sequences (log lines may carry colours).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
