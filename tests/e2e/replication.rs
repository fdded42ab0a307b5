//! End-to-end tests of replication: real `simrep backup` and `simrep
//! primary` processes with real KVM guests, real TCP between them, and a
//! real `simrep load --verify` client that spans the failover. The primary
//! is SIGKILLed at random moments; the backup is killed and restarted; the
//! stream between them is corrupted and truncated by a proxy in this
//! process.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::Proc;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct Pair {
    dir: tempfile::TempDir,
    backup: Proc,
    backup_addr: SocketAddr,
    service_port: u16,
}

/// Starts a backup (its failover service on a free port).
fn start_backup(extra: &[&str]) -> Pair {
    tests::require_root("replication tests");
    tests::require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("key"),
        b"0123456789abcdef-replication-test\n",
    )
    .expect("key");
    let service_port = free_port();
    let sp = service_port.to_string();
    let mut args = vec![
        "backup",
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        "key",
        "--service-port",
        &sp,
        "--service-bind",
        "127.0.0.1",
        "--state-dir",
        "bstate",
    ];
    args.extend_from_slice(extra);
    let mut backup = Proc::spawn(dir.path(), "backup", &args);
    let backup_addr = backup.wait_addr("waiting for a primary on ");
    Pair {
        dir,
        backup,
        backup_addr,
        service_port,
    }
}

/// Starts a `kv` primary replicating to `to`; returns it and its service
/// address once the backup holds its first checkpoint.
fn start_primary(dir: &Path, name: &str, to: SocketAddr, extra: &[&str]) -> (Proc, SocketAddr) {
    let to = to.to_string();
    let mut args = vec![
        "primary",
        "--backup",
        &to,
        "--key-file",
        "key",
        "--workload",
        "kv",
        "--mem",
        "64M",
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
    ];
    args.extend_from_slice(extra);
    let mut p = Proc::spawn(dir, name, &args);
    let addr = p.wait_addr("net: listening on ");
    p.wait_for("the guest is protected", Duration::from_secs(60));
    (p, addr)
}

struct LoadResult {
    code: Option<i32>,
    json: serde_json::Value,
    stderr: String,
}

fn spawn_load(dir: &Path, targets: &[String], duration: &str, extra: &[&str]) -> (Child, PathBuf) {
    let json = dir.join(format!("load-{}.json", free_port()));
    let mut cmd = Command::new(tests::simrep_bin());
    cmd.arg("load");
    for t in targets {
        cmd.args(["--target", t]);
    }
    cmd.args([
        "--workload",
        "kv",
        "--duration",
        duration,
        "--verify",
        "--connections",
        "4",
        "--keys",
        "64",
    ])
    .args(extra)
    .arg("--json")
    .arg(&json)
    .env("NO_COLOR", "1")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    (cmd.spawn().expect("spawn simrep load"), json)
}

fn finish_load(mut child: Child, json: &Path) -> LoadResult {
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let status = child.wait().expect("wait load");
    let json = std::fs::read_to_string(json)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null);
    LoadResult {
        code: status.code(),
        json,
        stderr: tests::strip_ansi(&stderr),
    }
}

fn verify_ok(r: &LoadResult, what: &str) {
    let v = &r.json["verify"];
    assert_eq!(
        r.code,
        Some(0),
        "{what}: simrep load --verify failed; stderr:\n{}",
        r.stderr
    );
    assert!(
        v.is_object(),
        "{what}: no verify section in the JSON: {}",
        r.json
    );
    assert!(
        v["problems_by_kind"]
            .as_object()
            .is_some_and(serde_json::Map::is_empty),
        "{what}: verification problems: {}",
        v
    );
    assert!(
        v["checked"].as_u64().unwrap_or(0) > 100,
        "{what}: too few responses checked: {v}"
    );
}

/// Ten-ish ms of randomness without a dependency.
fn rand_below(n: u64) -> u64 {
    static SEED: AtomicU64 = AtomicU64::new(0);
    if SEED.load(Ordering::Relaxed) == 0 {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64;
        SEED.store(t | 1, Ordering::Relaxed);
    }
    let mut x = SEED.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    SEED.store(x, Ordering::Relaxed);
    x % n
}

/// The primary is SIGKILLed at a random moment while `simrep load
/// --verify` writes and reads; the backup takes over and every
/// acknowledged write is there. Repeated (20 times by default,
/// `SIMREP_KILLS` to change), half of the runs with a disk.
#[test]
fn sigkill_the_primary_at_random_moments_loses_no_acknowledged_write() {
    let kills: u32 = std::env::var("SIMREP_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut failovers = Vec::new();
    for i in 0..kills {
        let mut pair = start_backup(&[]);
        let dir = pair.dir.path().to_owned();
        let with_disk = i % 2 == 1;
        let mut extra = vec!["--epoch-ms", if i % 3 == 0 { "20" } else { "50" }];
        if with_disk {
            let f = std::fs::File::create(dir.join("disk.raw")).expect("disk");
            f.set_len(32 << 20).expect("size disk");
            extra.extend_from_slice(&["--disk", "disk.raw"]);
        }
        let (mut primary, paddr) = start_primary(&dir, "primary", pair.backup_addr, &extra);
        let targets = [
            paddr.to_string(),
            format!("127.0.0.1:{}", pair.service_port),
        ];
        let (load, json) = spawn_load(&dir, &targets, "3s", &[]);
        let delay = 300 + rand_below(2000);
        std::thread::sleep(Duration::from_millis(delay));
        primary.kill9();
        let r = finish_load(load, &json);
        let line = pair.backup.wait_for("FAILOVER", Duration::from_secs(20));
        verify_ok(
            &r,
            &format!("run {i} (killed after {delay} ms, disk {with_disk})"),
        );
        let ms: f64 = line
            .split("failover_ms=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(f64::NAN);
        eprintln!("run {i}: killed after {delay} ms, disk {with_disk}: failover {ms:.0} ms");
        failovers.push(ms);
        // The resumed guest keeps serving: a second verified run on it.
        let (load2, json2) = spawn_load(&dir, &targets[1..], "500ms", &[]);
        let r2 = finish_load(load2, &json2);
        assert_eq!(r2.code, Some(0), "after failover: {}", r2.stderr);
        assert_eq!(
            pair.backup.interrupt().code(),
            Some(0),
            "the failed-over backup stops cleanly; log:\n{}",
            pair.backup.text()
        );
    }
    failovers.sort_by(f64::total_cmp);
    eprintln!(
        "{kills} failovers: median {:.0} ms, max {:.0} ms (detection + grace + restore)",
        failovers[failovers.len() / 2],
        failovers[failovers.len() - 1]
    );
}

/// The backup is killed and restarted on the same address: the primary
/// runs on unprotected (and says so), then synchronises the new backup
/// while the guest serves a verifying client throughout.
#[test]
fn kill_and_restart_the_backup() {
    let mut pair = start_backup(&[]);
    let dir = pair.dir.path().to_owned();
    let metrics = format!("127.0.0.1:{}", free_port());
    let (mut primary, paddr) =
        start_primary(&dir, "primary", pair.backup_addr, &["--metrics", &metrics]);
    let (load, json) = spawn_load(&dir, &[paddr.to_string()], "6s", &[]);
    std::thread::sleep(Duration::from_millis(1000));
    pair.backup.kill9();
    primary.wait_for("the guest runs UNPROTECTED", Duration::from_secs(10));
    let st = Command::new(tests::simrep_bin())
        .args(["status", "--addr", &metrics, "--json"])
        .output()
        .expect("simrep status");
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    assert_eq!(st["state"], "unprotected", "{st}");
    assert_eq!(st["protected"], false, "{st}");
    std::thread::sleep(Duration::from_millis(1000));
    // A new backup on the same address.
    let addr = pair.backup_addr.to_string();
    let sp = pair.service_port.to_string();
    let mut backup2 = Proc::spawn(
        &dir,
        "backup2",
        &[
            "backup",
            "--listen",
            &addr,
            "--key-file",
            "key",
            "--service-port",
            &sp,
            "--service-bind",
            "127.0.0.1",
            "--state-dir",
            "bstate2",
        ],
    );
    backup2.wait_for("first checkpoint committed", Duration::from_secs(30));
    // The primary logs protection when the backup's ack reaches it, a
    // moment after the backup logged its commit.
    primary.wait_for_nth("the guest is protected", 2, Duration::from_secs(10));
    let log = primary.text();
    assert_eq!(
        log.matches("the guest is protected").count(),
        2,
        "protected twice (before and after the backup's restart):\n{log}"
    );
    let r = finish_load(load, &json);
    verify_ok(&r, "across a backup restart");
    let st = Command::new(tests::simrep_bin())
        .args(["status", "--addr", &metrics, "--json"])
        .output()
        .expect("simrep status");
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).expect("status JSON");
    assert_eq!(st["state"], "protected", "{st}");
    assert_eq!(primary.interrupt().code(), Some(0), "{}", primary.text());
    // A clean primary stop says goodbye: the backup does not take over.
    backup2.wait_for("the primary said goodbye", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(800));
    assert!(!backup2.text().contains("FAILOVER"), "{}", backup2.text());
}

/// What the proxy does to the primary-to-backup stream once armed.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Flip the last byte of the next chunk (inside a sealed record).
    Flip,
    /// Forward half of the next chunk, then cut the connection
    /// (mid-record).
    Truncate,
}

/// A TCP proxy that damages the stream of the connection live when
/// `armed` is set, once, and passes every other byte through. Returns its
/// address, the arming flag and a flag set once the damage is done.
fn proxy(to: SocketAddr, damage: Damage) -> (SocketAddr, Arc<AtomicBool>, Arc<AtomicBool>) {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let addr = l.local_addr().expect("addr");
    let armed = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let (armed2, done2) = (Arc::clone(&armed), Arc::clone(&done));
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { continue };
            let Ok(server) = TcpStream::connect(to) else {
                continue;
            };
            let (mut c2, mut s2) = (
                client.try_clone().expect("dup"),
                server.try_clone().expect("dup"),
            );
            // backup -> primary: untouched.
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut s2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
            let (armed, done) = (Arc::clone(&armed2), Arc::clone(&done2));
            std::thread::spawn(move || {
                let (mut client, mut server) = (client, server);
                let mut buf = [0u8; 65536];
                loop {
                    let n = match client.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let chunk = &mut buf[..n];
                    if n > 8 && armed.load(Ordering::Relaxed) && !done.swap(true, Ordering::Relaxed)
                    {
                        match damage {
                            Damage::Flip => chunk[n - 1] ^= 0x5a,
                            Damage::Truncate => {
                                let _ = server.write_all(&chunk[..n / 2]);
                                let _ = server.shutdown(std::net::Shutdown::Both);
                                let _ = client.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                        }
                    }
                    if server.write_all(chunk).is_err() {
                        break;
                    }
                }
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (addr, armed, done)
}

fn committed_epoch(status_addr: &str) -> Option<u64> {
    let out = Command::new(tests::simrep_bin())
        .args(["status", "--addr", status_addr, "--json"])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["acked_epoch"].as_u64()
}

/// The stream is corrupted (one flipped byte) or truncated in flight once
/// the backup holds checkpoints: the backup rejects it, keeps its
/// committed state, does not take over, and the primary reconnects and
/// synchronises it again; a verifying client sees nothing lost.
#[test]
fn a_corrupted_or_truncated_stream_is_rejected_and_state_kept() {
    for damage in [Damage::Flip, Damage::Truncate] {
        let metrics = format!("127.0.0.1:{}", free_port());
        // The grace leaves the primary time to reconnect after the cut.
        let mut pair = start_backup(&["--metrics", &metrics, "--grace", "3s"]);
        let dir = pair.dir.path().to_owned();
        let (proxy_addr, armed, done) = proxy(pair.backup_addr, damage);
        let (mut primary, paddr) = start_primary(&dir, "primary", proxy_addr, &[]);
        let (load, json) = spawn_load(&dir, &[paddr.to_string()], "3s", &[]);
        std::thread::sleep(Duration::from_millis(700));
        armed.store(true, Ordering::Relaxed);
        let t = Instant::now();
        while !done.load(Ordering::Relaxed) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{damage:?}: the stream never reached the damage point"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let before = committed_epoch(&metrics);
        match damage {
            Damage::Flip => {
                pair.backup
                    .wait_for("stream from the primary rejected", Duration::from_secs(10));
            }
            Damage::Truncate => {
                pair.backup
                    .wait_for("primary lost", Duration::from_secs(10));
            }
        }
        // The primary comes back and is protected again.
        primary.wait_for("backup lost", Duration::from_secs(10));
        let t = Instant::now();
        while primary.text().matches("the guest is protected").count() < 2 {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "{damage:?}: not protected again; primary log:\n{}\nbackup log:\n{}",
                primary.text(),
                pair.backup.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = finish_load(load, &json);
        verify_ok(&r, &format!("{damage:?}"));
        let log = pair.backup.text();
        assert!(!log.contains("FAILOVER"), "{damage:?}: no failover:\n{log}");
        assert!(
            before.is_some(),
            "{damage:?}: the backup held a checkpoint when the stream broke"
        );
        let after = committed_epoch(&metrics);
        assert!(after.is_some(), "{damage:?}: replicating again");
        assert_eq!(primary.interrupt().code(), Some(0));
    }
}

/// A primary with the wrong key is refused at the handshake; the backup
/// keeps waiting and a primary with the right key is served afterwards.
#[test]
fn a_primary_with_the_wrong_key_is_refused() {
    let mut pair = start_backup(&[]);
    let dir = pair.dir.path().to_owned();
    std::fs::write(dir.join("wrong"), b"fedcba9876543210-not-the-key").expect("key");
    let to = pair.backup_addr.to_string();
    let mut bad = Proc::spawn(
        &dir,
        "bad-primary",
        &[
            "primary",
            "--backup",
            &to,
            "--key-file",
            "wrong",
            "--workload",
            "kv",
            "--mem",
            "64M",
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
        ],
    );
    bad.wait_for("cannot reach the backup", Duration::from_secs(20));
    pair.backup
        .wait_for("refused a connection", Duration::from_secs(10));
    assert!(!bad.text().contains("protected"), "{}", bad.text());
    assert_eq!(bad.interrupt().code(), Some(0));
    let (mut good, _) = start_primary(&dir, "primary", pair.backup_addr, &[]);
    assert_eq!(good.interrupt().code(), Some(0));
}

/// Bad flags, key files and configuration files are refused with exit 2
/// and a clear message; a good `--config vm.toml` sets the guest.
#[test]
fn bad_keys_and_configs_are_refused_and_a_config_file_sets_the_guest() {
    let mut pair = start_backup(&[]);
    let dir = pair.dir.path().to_owned();
    let to = pair.backup_addr.to_string();
    std::fs::write(dir.join("short"), b"too short").expect("key");
    std::fs::write(
        dir.join("bad.toml"),
        "workload = \"kv\"\nmemory = \"64M\"\n",
    )
    .expect("toml");
    std::fs::write(
        dir.join("vm.toml"),
        "workload = \"kv\"\nmem = \"64M\"\nbind = \"127.0.0.1\"\nport = 0\n",
    )
    .expect("toml");
    let run = |args: &[&str]| {
        let out = Command::new(tests::simrep_bin())
            .args(args)
            .current_dir(&dir)
            .env("NO_COLOR", "1")
            .output()
            .expect("run simrep");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["primary", "--backup", &to, "--key-file", "missing"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read the key file"), "{err}");
    let (code, err) = run(&["primary", "--backup", &to, "--key-file", "short"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("key file"), "{err}");
    let (code, err) = run(&[
        "primary",
        "--backup",
        &to,
        "--key-file",
        "key",
        "--config",
        "bad.toml",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown field `memory`"), "{err}");
    let (code, err) = run(&[
        "primary",
        "--backup",
        "no-such-host.invalid:1",
        "--key-file",
        "key",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--backup"), "{err}");
    let (code, err) = run(&["backup", "--listen", &to, "--key-file", "key"]);
    assert_eq!(code, Some(2), "a second backup on a used port: {err}");
    assert!(err.contains("cannot listen"), "{err}");
    let mut p = Proc::spawn(
        &dir,
        "primary",
        &[
            "primary",
            "--backup",
            &to,
            "--key-file",
            "key",
            "--config",
            "vm.toml",
        ],
    );
    p.wait_for("the guest is protected", Duration::from_secs(60));
    let log = p.text();
    assert!(log.contains("workload=kv mem_mib=64"), "{log}");
    assert_eq!(p.interrupt().code(), Some(0));
    pair.backup
        .wait_for("the primary said goodbye", Duration::from_secs(10));
}

/// `simrep primary --ebpf`: the per-epoch stats carry the write faults
/// eBPF saw and the cross-check with the dirty log, the metrics count
/// them, `bpftool` reads the pinned maps of the running primary, and the
/// pins are gone after a clean stop.
#[test]
fn the_primary_reports_ebpf_fault_figures_per_epoch() {
    let pair = start_backup(&[]);
    let dir = pair.dir.path().to_owned();
    let metrics = format!("127.0.0.1:{}", free_port());
    let (mut primary, paddr) = start_primary(
        &dir,
        "primary",
        pair.backup_addr,
        &["--ebpf", "--stats", "stats.jsonl", "--metrics", &metrics],
    );
    primary.wait_for("eBPF write tracing on", Duration::from_secs(5));
    let pins = PathBuf::from(format!("/sys/fs/bpf/simrep/primary{}", primary.id()));
    let (load, json) = spawn_load(&dir, &[paddr.to_string()], "2s", &[]);
    let r = finish_load(load, &json);
    verify_ok(&r, "with eBPF tracing");
    let dump = super::ebpf::bpftool_dump(&pins.join("SIMREP_WRITE_STATS"), true);
    let entries = super::ebpf::dump_entries(&dump);
    assert!(!entries.is_empty(), "bpftool read the pinned stats: {dump}");
    let body = simrep::replication::observe::fetch(
        metrics.parse().expect("addr"),
        "/metrics",
        Duration::from_secs(5),
    )
    .expect("metrics endpoint answers");
    assert!(body.contains("simrep_ebpf_write_faults_total"), "{body}");
    let st = simrep::replication::observe::fetch_status(
        metrics.parse().expect("addr"),
        Duration::from_secs(5),
    )
    .expect("status");
    assert!(
        st.extra.contains_key("ebpf_write_faults_last_epoch"),
        "eBPF figures in the status: {st:?}"
    );
    assert_eq!(primary.interrupt().code(), Some(0));
    let stats = std::fs::read_to_string(dir.join("stats.jsonl")).expect("stats file");
    let (mut faults, mut checked) = (0u64, 0u64);
    for line in stats.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
        faults += v["write_faults"]
            .as_u64()
            .expect("write_faults in every line");
        if v["harvest_only_pages"].is_u64() && v["ebpf_only_pages"].is_u64() {
            checked += 1;
        }
    }
    assert!(faults > 0, "eBPF saw the guest's write faults:\n{stats}");
    assert!(checked > 0, "cross-checks reported");
    assert!(!pins.exists(), "pins removed on a clean stop");
}

/// Copy-on-write in every epoch (`--copy-limit 0`), pre-armed before each
/// checkpoint while the guest runs, under verified `kv` load; then the
/// primary is killed: the backup takes over and no acknowledged write is
/// lost. The stats show that the epochs were pre-armed. With and without
/// write-fault prediction (its hot pages are copied, the rest armed).
#[test]
fn prearmed_copy_on_write_epochs_lose_no_acknowledged_write() {
    for predict in ["0", "2"] {
        let mut pair = start_backup(&[]);
        let dir = pair.dir.path().to_owned();
        let (mut primary, paddr) = start_primary(
            &dir,
            "primary",
            pair.backup_addr,
            &[
                "--copy-limit",
                "0",
                "--predict",
                predict,
                "--stats",
                "stats.jsonl",
            ],
        );
        let targets = [
            paddr.to_string(),
            format!("127.0.0.1:{}", pair.service_port),
        ];
        let (load, json) = spawn_load(&dir, &targets, "3s", &[]);
        std::thread::sleep(Duration::from_millis(1500));
        primary.kill9();
        let r = finish_load(load, &json);
        pair.backup.wait_for("FAILOVER", Duration::from_secs(20));
        verify_ok(&r, &format!("pre-armed epochs, --predict {predict}"));
        let stats = std::fs::read_to_string(dir.join("stats.jsonl")).expect("stats file");
        let (mut epochs, mut prearmed) = (0, 0);
        for line in stats.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("JSON line");
            epochs += 1;
            if v["prearm_us"].is_u64() {
                prearmed += 1;
            }
        }
        eprintln!("--predict {predict}: {prearmed} of {epochs} epochs pre-armed");
        assert!(
            epochs >= 10 && prearmed * 2 >= epochs,
            "--predict {predict}: only {prearmed} of {epochs} epochs were pre-armed:\n{stats}"
        );
        assert_eq!(
            pair.backup.interrupt().code(),
            Some(0),
            "the failed-over backup stops cleanly; log:\n{}",
            pair.backup.text()
        );
    }
}
