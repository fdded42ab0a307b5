//! End-to-end tests of `simrep load`: the real binary against real
//! reference servers (`simrep load-testserver` processes, or servers in this
//! process through the library) over loopback TCP. Servers that lose or
//! corrupt data, die (SIGKILL) or answer garbage.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use simrep::load::testserver::{Faults, Service, SharedState, TestServer};

/// A `simrep load-testserver` process, killed (SIGKILL) when dropped.
struct ServerProc {
    child: Child,
    addr: String,
}

impl ServerProc {
    fn start(extra: &[&str]) -> ServerProc {
        let mut child = Command::new(tests::simrep_bin())
            .args(["load-testserver", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn simrep load-testserver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("read the server's first line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("load-testserver printed {line:?}"))
            .to_string();
        ServerProc { child, addr }
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct LoadRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    json: Option<serde_json::Value>,
}

/// `simrep load --verify` for 3 s over `keys` keys against `a`, failing
/// over to `b`; `during` runs meanwhile.
fn verify_failover(a: &str, b: &str, keys: &str, during: impl FnOnce()) -> LoadRun {
    load(
        &[
            "--target",
            a,
            "--target",
            b,
            "--duration",
            "3s",
            "--verify",
            "--keys",
            keys,
            "-q",
        ],
        during,
    )
}

/// Runs `simrep load args... --json FILE`; `during` runs while it does.
fn load(args: &[&str], during: impl FnOnce()) -> LoadRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("load.json");
    let mut child = Command::new(tests::simrep_bin())
        .arg("load")
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn simrep load");
    during();
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("simrep load {args:?} did not end within 90 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let run = LoadRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        json: read_json(&json),
    };
    eprintln!(
        "simrep load {args:?} -> {:?}\n--- stdout ---\n{}\n--- stderr (tail) ---\n{}",
        run.code,
        run.stdout,
        tail(&run.stderr, 3000)
    );
    assert!(
        !run.stderr.contains("panicked"),
        "simrep load panicked:\n{}",
        run.stderr
    );
    run
}

fn tail(s: &str, n: usize) -> &str {
    let mut at = s.len().saturating_sub(n);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}

fn read_json(p: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(p).ok()?;
    Some(serde_json::from_str(&text).expect("--json writes valid JSON"))
}

fn problems(j: &serde_json::Value) -> u64 {
    j["verify"]["problems_by_kind"]
        .as_object()
        .expect("verify.problems_by_kind")
        .values()
        .map(|v| v.as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn load_clean_kv_run_verifies_and_reports_figures() {
    let srv = ServerProc::start(&[]);
    let r = load(
        &[
            "--target",
            &srv.addr,
            "--duration",
            "2s",
            "--warmup",
            "300ms",
            "--verify",
            "--connections",
            "4",
            "--keys",
            "2000",
            "--value-size",
            "16-4K",
        ],
        || {},
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j = r.json.expect("JSON report");
    assert!(j["throughput_rps"].as_f64().unwrap() > 100.0, "{j}");
    assert!(j["responses"].as_u64().unwrap() > 200, "{j}");
    assert!(j["latency"]["p50_ms"].as_f64().unwrap() > 0.0, "{j}");
    assert!(j["latency"]["p999_ms"].as_f64() >= j["latency"]["p50_ms"].as_f64());
    for op in ["get", "put", "del", "scan"] {
        assert!(j["ops"][op].as_u64().unwrap_or(0) > 0, "no {op} in {j}");
    }
    assert_eq!(problems(&j), 0, "{j}");
    // Every key re-read at the end.
    assert!(j["verify"]["checked"].as_u64().unwrap() >= j["responses"].as_u64().unwrap() + 2000);
    assert!(
        r.stdout.contains("throughput") && r.stdout.contains("p99.9"),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("verify      OK"), "{}", r.stdout);
    // The live line (once a second, on stderr).
    assert!(r.stderr.contains("req/s"), "{}", r.stderr);
}

#[test]
fn load_clean_bank_run_conserves_money() {
    let srv = ServerProc::start(&["--workload", "bank", "--accounts", "64"]);
    let r = load(
        &[
            "--target",
            &srv.addr,
            "--workload",
            "bank",
            "--accounts",
            "64",
            "--duration",
            "2s",
            "--verify",
            "--rate",
            "2000",
            "-q",
        ],
        || {},
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j = r.json.expect("JSON report");
    assert_eq!(problems(&j), 0, "{j}");
    assert_eq!(
        j["verify"]["bank_total_start"],
        j["verify"]["bank_total_end"]
    );
    assert_eq!(j["verify"]["bank_total_start"].as_u64(), Some(64 * 100_000));
    assert!(j["ops"]["transfer"].as_u64().unwrap() > 100, "{j}");
    // Open loop at 2000/s for 2 s.
    let rps = j["throughput_rps"].as_f64().unwrap();
    assert!((1500.0..2500.0).contains(&rps), "{rps}");
    // -q: no live lines.
    assert!(!r.stderr.contains("req/s"), "{}", r.stderr);
}

#[test]
fn load_verify_catches_a_server_that_loses_writes() {
    let srv = ServerProc::start(&["--lose-writes-after", "200"]);
    let r = load(
        &[
            "--target",
            &srv.addr,
            "--duration",
            "2s",
            "--verify",
            "--keys",
            "500",
            "-q",
        ],
        || {},
    );
    assert_eq!(r.code, Some(8), "{}", r.stderr);
    let j = r.json.expect("JSON report");
    assert!(
        j["verify"]["problems_by_kind"]["lost_write"]
            .as_u64()
            .unwrap()
            > 0,
        "{j}"
    );
    // The message names the key.
    let key_line = r
        .stdout
        .lines()
        .find(|l| l.contains("lost acknowledged write: ") && l.contains("key "))
        .unwrap_or_else(|| panic!("no lost-write line naming a key in:\n{}", r.stdout));
    assert!(key_line.contains(':'), "{key_line}");
    assert!(r.stderr.contains("--verify found"), "{}", r.stderr);
}

#[test]
fn load_verify_catches_corrupted_values() {
    let srv = ServerProc::start(&["--corrupt-reads-after", "100"]);
    let r = load(
        &[
            "--target",
            &srv.addr,
            "--duration",
            "1s",
            "--verify",
            "--keys",
            "200",
            "-q",
        ],
        || {},
    );
    assert_eq!(r.code, Some(8), "{}", r.stderr);
    let j = r.json.expect("JSON report");
    assert!(
        j["verify"]["problems_by_kind"]["wrong_value"]
            .as_u64()
            .unwrap()
            > 0,
        "{j}"
    );
    assert!(r.stdout.contains("wrong value: key "), "{}", r.stdout);
}

#[test]
fn load_fails_over_to_a_server_with_the_same_data() {
    let state = SharedState::new(0);
    let a = TestServer::bind("127.0.0.1:0", Service::Kv, state.clone(), Faults::default())
        .expect("server a");
    let b = TestServer::bind("127.0.0.1:0", Service::Kv, state.clone(), Faults::default())
        .expect("server b");
    let (aa, ba) = (a.addr().to_string(), b.addr().to_string());
    let r = verify_failover(&aa, &ba, "3000", move || {
        std::thread::sleep(Duration::from_millis(1200));
        assert!(
            a.requests() > 0,
            "server a got no requests before its shutdown"
        );
        a.shutdown(); // every connection closes at once
    });
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j = r.json.expect("JSON report");
    assert_eq!(problems(&j), 0, "{j}");
    let f = j["failovers"].as_array().expect("failovers");
    assert!(!f.is_empty(), "no failover recorded: {j}");
    assert_eq!(f[0]["from"].as_str(), Some(aa.as_str()));
    assert_eq!(f[0]["to"].as_str(), Some(ba.as_str()));
    assert!(f[0]["gap_ms"].as_f64().is_some(), "{j}");
    assert!(b.requests() > 1000, "server b served {}", b.requests());
    assert!(r.stdout.contains("failover"), "{}", r.stdout);
    assert!(state.kv_len() > 0);
}

/// The next target is not up yet when the first dies (a backup still
/// taking over): the client goes round the list until it serves, and
/// reports that as one failover from the dead target to the one that
/// answered, with its number of moves.
#[test]
fn load_reports_one_failover_while_the_next_target_comes_up_late() {
    let state = SharedState::new(0);
    let a = TestServer::bind("127.0.0.1:0", Service::Kv, state.clone(), Faults::default())
        .expect("server a");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let aa = a.addr().to_string();
    let ba = format!("127.0.0.1:{port}");
    let late = std::sync::Arc::new(std::sync::Mutex::new(None));
    let slot = late.clone();
    let r = verify_failover(&aa, &ba, "2000", move || {
        std::thread::sleep(Duration::from_millis(1000));
        a.shutdown();
        std::thread::sleep(Duration::from_millis(700));
        let b = TestServer::bind(
            &format!("127.0.0.1:{port}"),
            Service::Kv,
            state,
            Faults::default(),
        )
        .expect("server b on the reserved port");
        *slot.lock().unwrap() = Some(b);
    });
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j = r.json.expect("JSON report");
    assert_eq!(problems(&j), 0, "{j}");
    let f = j["failovers"].as_array().expect("failovers");
    assert_eq!(f.len(), 1, "one failover: {j}");
    assert_eq!(f[0]["from"].as_str(), Some(aa.as_str()), "{j}");
    assert_eq!(f[0]["to"].as_str(), Some(ba.as_str()), "{j}");
    assert!(f[0]["moves"].as_u64().unwrap() > 1, "{j}");
    let gap = f[0]["gap_ms"].as_f64().expect("a response after it");
    assert!(
        gap >= 600.0,
        "the gap spans the 700 ms without a server: {j}"
    );
    let b = late.lock().unwrap().take().expect("server b ran");
    assert!(b.requests() > 100, "server b served {}", b.requests());
}

#[test]
fn load_reports_writes_missing_after_failover_to_an_empty_server() {
    let mut a = ServerProc::start(&[]);
    let b = ServerProc::start(&[]);
    let (aa, ba) = (a.addr.clone(), b.addr.clone());
    let r = verify_failover(&aa, &ba, "2000", || {
        std::thread::sleep(Duration::from_millis(1200));
        a.kill(); // SIGKILL
    });
    assert_eq!(r.code, Some(8), "{}", r.stderr);
    let j = r.json.expect("JSON report");
    assert!(
        j["verify"]["problems_by_kind"]["lost_write"]
            .as_u64()
            .unwrap()
            > 0,
        "{j}"
    );
    assert!(!j["failovers"].as_array().unwrap().is_empty(), "{j}");
    assert!(r.stdout.contains("acknowledged PUT"), "{}", r.stdout);
}

#[test]
fn load_garbage_responses_are_a_clear_error() {
    let srv = ServerProc::start(&["--garbage-after", "50"]);
    let r = load(&["--target", &srv.addr, "--duration", "2s", "-q"], || {});
    assert_eq!(r.code, Some(10), "{}", r.stderr);
    assert!(r.stderr.contains("broke the protocol"), "{}", r.stderr);
    assert!(r.stderr.contains(&srv.addr), "{}", r.stderr);
}

#[test]
fn load_unreachable_targets_exit_9() {
    let port = |_| {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let (t1, t2) = (port(1), port(2));
    let r = load(
        &["--target", &t1, "--target", &t2, "--duration", "1s"],
        || {},
    );
    assert_eq!(r.code, Some(9), "{}", r.stderr);
    assert!(
        r.stderr.contains("no target reachable") && r.stderr.contains(&t2),
        "{}",
        r.stderr
    );

    // Reachable at the start, then gone for longer than --failover-timeout.
    let mut srv = ServerProc::start(&[]);
    let addr = srv.addr.clone();
    let start = Instant::now();
    let r = load(
        &[
            "--target",
            &addr,
            "--duration",
            "30s",
            "--failover-timeout",
            "1s",
            "-q",
        ],
        || {
            std::thread::sleep(Duration::from_millis(700));
            srv.kill();
        },
    );
    assert_eq!(r.code, Some(9), "{}", r.stderr);
    assert!(r.stderr.contains("--failover-timeout"), "{}", r.stderr);
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn load_bad_flags_exit_2() {
    for args in [
        &["--target", "127.0.0.1:1", "--value-size", "100K"][..],
        &["--target", "127.0.0.1:1", "--mix", "get=1,fly=2"][..],
        &["--target", "127.0.0.1:1", "--duration", "3 weeks"][..],
        &["--target", "nohost", "--duration", "1s"][..],
    ] {
        let r = load(args, || {});
        assert_eq!(r.code, Some(2), "{args:?}: {}", r.stderr);
    }
}

#[test]
fn load_bank_fails_over_with_transfers_in_flight() {
    let state = SharedState::new(200);
    let a = TestServer::bind(
        "127.0.0.1:0",
        Service::Bank,
        state.clone(),
        Faults::default(),
    )
    .expect("server a");
    let b =
        TestServer::bind("127.0.0.1:0", Service::Bank, state, Faults::default()).expect("server b");
    let (aa, ba) = (a.addr().to_string(), b.addr().to_string());
    let r = load(
        &[
            "--target",
            &aa,
            "--target",
            &ba,
            "--workload",
            "bank",
            "--accounts",
            "200",
            "--mix",
            "transfer=90,balance=10",
            "--duration",
            "2s",
            "--verify",
            "-q",
        ],
        move || {
            std::thread::sleep(Duration::from_millis(900));
            a.shutdown();
        },
    );
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let j = r.json.expect("JSON report");
    assert_eq!(problems(&j), 0, "{j}");
    assert!(!j["failovers"].as_array().unwrap().is_empty(), "{j}");
    assert_eq!(j["verify"]["bank_total_end"].as_u64(), Some(200 * 100_000));
    assert!(b.requests() > 100, "server b served {}", b.requests());
}

/// Ctrl-C while the only target is down and the client keeps retrying
/// (a long --failover-timeout): it stops at once with exit 9 and says why,
/// instead of retrying until the timeout.
#[test]
fn load_ctrl_c_while_the_target_is_down_stops_at_once() {
    let mut server = ServerProc::start(&[]);
    let addr = server.addr.clone();
    let started = Instant::now();
    let run = load(
        &[
            "--target",
            &addr,
            "--duration",
            "60s",
            "--failover-timeout",
            "60s",
            "-q",
        ],
        || {
            std::thread::sleep(Duration::from_millis(800));
            server.kill();
            std::thread::sleep(Duration::from_millis(500));
            // The client is the only `simrep load` this test started.
            let pids = Command::new("pgrep")
                .args(["-f", &format!("simrep load --target {addr}")])
                .output()
                .expect("pgrep");
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-INT", pid]).status();
            }
        },
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(run.code, Some(9), "{}", run.stderr);
    assert!(run.stderr.contains("interrupted"), "{}", run.stderr);
}
