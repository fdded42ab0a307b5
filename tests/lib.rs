//! Helpers for the end-to-end tests.
//!
//! The tests run the real `simrep` binary: `cargo xtask test` builds it and
//! passes its path in `SIMREP_BIN`; under a plain `cargo test` the binary
//! next to the test executable's directory is used. A test that cannot find
//! what it needs fails with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

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

/// A `simrep` child process. Its stderr (the log) goes to `<name>.log` and
/// its stdout to `<name>.out` in a directory, so a chatty child never
/// blocks on a full pipe and a failing test can print the whole log. It is
/// SIGKILLed when dropped.
pub struct Proc {
    name: String,
    child: std::process::Child,
    log: PathBuf,
    out: PathBuf,
    /// Log lines [`Proc::wait_next`] has consumed.
    cursor: usize,
    /// The log directory when the process owns it ([`Proc::spawn_temp`]).
    _dir: Option<tempfile::TempDir>,
}

impl Proc {
    /// Starts `simrep args...` in `dir` (its working directory, where its
    /// log files go), logging at `info` without colours.
    ///
    /// # Panics
    /// When the log files cannot be created or the binary cannot start.
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Proc {
        Self::spawn_with(dir, name, args, Some(dir))
    }

    /// Starts `simrep args...` in this process's working directory, with
    /// its log files in a directory of its own.
    ///
    /// # Panics
    /// As [`Proc::spawn`].
    pub fn spawn_temp(name: &str, args: &[&str]) -> Proc {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut p = Self::spawn_with(dir.path(), name, args, None);
        p._dir = Some(dir);
        p
    }

    fn spawn_with(dir: &Path, name: &str, args: &[&str], cwd: Option<&Path>) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = dir.join(format!("{name}.out"));
        let create = |p: &Path| {
            std::fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()))
        };
        let mut cmd = Command::new(simrep_bin());
        cmd.args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "simrep=info")
            .stdin(std::process::Stdio::null())
            .stdout(create(&out))
            .stderr(create(&log));
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn simrep {args:?}: {e}"));
        Proc {
            name: name.into(),
            child,
            log,
            out,
            cursor: 0,
            _dir: None,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The log (stderr) so far, without colours.
    pub fn text(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The standard output so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; returns the line.
    ///
    /// # Panics
    /// When the process exits first or `timeout` passes, with its log.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        self.wait_for_nth(needle, 1, timeout)
    }

    /// Waits until the log contains `needle` on `n` lines; returns the
    /// `n`th of them.
    ///
    /// # Panics
    /// As [`Proc::wait_for`].
    pub fn wait_for_nth(&mut self, needle: &str, n: usize, timeout: Duration) -> String {
        let t = Instant::now();
        loop {
            let text = self.text();
            if let Some(line) = text.lines().filter(|l| l.contains(needle)).nth(n - 1) {
                return line.to_owned();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before logging {needle:?}; its log:\n{}",
                    self.name,
                    self.text()
                );
            }
            assert!(
                t.elapsed() < timeout,
                "{} did not log {needle:?} within {timeout:?}; its log:\n{text}",
                self.name,
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the next complete log line, after those earlier calls
    /// consumed, for which `f` returns `Some` (`what` names it in errors).
    ///
    /// # Panics
    /// When the process exits first or `timeout` passes, with its log.
    pub fn wait_next<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let t = Instant::now();
        loop {
            let exited = self.child.try_wait().ok().flatten();
            let text = self.text();
            let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            for (i, line) in complete.lines().enumerate().skip(self.cursor) {
                self.cursor = i + 1;
                if let Some(v) = f(line) {
                    return v;
                }
            }
            if let Some(status) = exited {
                panic!(
                    "{} exited ({status}) before {what}; its log:\n{text}",
                    self.name
                );
            }
            assert!(
                t.elapsed() < timeout,
                "{} did not log {what} within {timeout:?}; its log:\n{text}",
                self.name,
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT, then its exit code and whole log.
    ///
    /// # Panics
    /// As [`Proc::interrupt`].
    pub fn stop(&mut self) -> (Option<i32>, String) {
        let status = self.interrupt();
        (status.code(), self.text())
    }

    /// Waits (30 s at most) for a log line `... <needle> ADDR` and returns
    /// ADDR, with an unspecified IP replaced by 127.0.0.1.
    ///
    /// # Panics
    /// As [`Proc::wait_for`], or when no address follows `needle`.
    pub fn wait_addr(&mut self, needle: &str) -> std::net::SocketAddr {
        let line = self.wait_for(needle, Duration::from_secs(30));
        let rest = &line[line.find(needle).expect("found") + needle.len()..];
        let word = rest.split_whitespace().next().unwrap_or("");
        let addr: std::net::SocketAddr = word
            .parse()
            .unwrap_or_else(|_| panic!("no address in {line:?}"));
        if addr.ip().is_unspecified() {
            std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        }
    }

    /// Sends `signal` to the process.
    ///
    /// # Panics
    /// When kill(2) fails.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.id() as i32), signal)
            .unwrap_or_else(|e| panic!("kill {} with {signal}: {e}", self.name));
    }

    /// SIGKILL, and reaps the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to end by itself.
    ///
    /// # Panics
    /// When it is still running after `timeout` (it is killed), with its
    /// log.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            if t.elapsed() > timeout {
                self.kill9();
                panic!(
                    "{} did not end within {timeout:?}; its log:\n{}",
                    self.name,
                    self.text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT, then waits (20 s at most) for the exit status.
    ///
    /// # Panics
    /// As [`Proc::wait_exit`].
    pub fn interrupt(&mut self) -> std::process::ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGINT);
        self.wait_exit(Duration::from_secs(20))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `simrep args...` to its end (killed and failing after `deadline`);
/// returns its exit code and its log (stderr) without colours.
///
/// # Panics
/// When it does not end in time.
pub fn run_cli(args: &[&str], deadline: Duration) -> (Option<i32>, String) {
    let mut p = Proc::spawn_temp("simrep", args);
    let status = p.wait_exit(deadline);
    (status.code(), p.text())
}

/// Runs the ignored test `test` (`module::name`) of this test binary alone
/// in a child process with the environment `env` (the scenario it plays:
/// eBPF programs count a whole process, and a "crash" must not take the
/// test runner with it). Returns its stdout and stderr.
///
/// # Panics
/// When the child cannot run or fails, with its output.
pub fn run_ignored_test(test: &str, env: &[(&str, &str)]) -> String {
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new(exe)
        .args([test, "--exact", "--ignored", "--nocapture"])
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {test} in a child process: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{test} ({env:?}) failed in its child process:\n{text}"
    );
    text
}
