//! `cargo xtask run`: the product on one machine. A `simrep backup` and a
//! `simrep primary` (the bundled guest's `kv` service with a disk) on
//! loopback, driven by `simrep load --verify`, with a live table of the
//! replication epochs (one row per second, summarising that second's
//! epochs) next to the client's throughput and latency. Optionally the
//! primary is SIGKILLed mid-run to show the failover. Ctrl-C stops the
//! client (which finishes its verification), then the primary and the
//! backup.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Stops a child with SIGINT (a clean stop), then kills it if it lingers.
struct Guard(Option<Child>, &'static str);

impl Guard {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: kill(2) on our own, not yet reaped, child's pid.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("{} did not stop within 10 s; killing it", self.1);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What `cargo xtask run` does.
pub struct Options {
    /// Client run time.
    pub duration: String,
    /// Guest memory.
    pub mem: String,
    /// Output directory.
    pub out: PathBuf,
    /// Client connections.
    pub connections: u32,
    /// SIGKILL the primary this long after the load starts.
    pub kill_primary_after: Option<Duration>,
    /// The codec (`simrep primary --codec`).
    pub codec: String,
    /// Epoch length in ms.
    pub epoch_ms: u32,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn_logged(simrep: &Path, args: &[String], log: &Path, what: &'static str) -> Result<Guard> {
    let f = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(simrep)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    Ok(Guard(Some(child), what))
}

fn wait_for_log(g: &mut Guard, log: &Path, needle: &str, timeout: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if let Some(status) = g.exited() {
            bail!(
                "{} exited ({status}) before logging {needle:?}; see {}:\n{}",
                g.1,
                log.display(),
                tail(&text, 15)
            );
        }
        if t.elapsed() > timeout {
            bail!(
                "{} did not log {needle:?} within {timeout:?}; see {}",
                g.1,
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One epoch's line of `--stats`, the fields the table shows.
#[derive(Default, Clone, Copy)]
struct Epoch {
    epoch: u64,
    dirty: f64,
    raw: f64,
    out: f64,
    pause_us: f64,
    ack_ms: Option<f64>,
    held: f64,
    interval_ms: f64,
}

fn parse_epoch(line: &str) -> Option<Epoch> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Some(Epoch {
        epoch: v["epoch"].as_u64()?,
        dirty: f("dirty_pages"),
        raw: f("raw_bytes"),
        out: f("out_bytes"),
        pause_us: f("pause_us"),
        ack_ms: v["ack_ms"].as_f64(),
        held: f("held_responses"),
        interval_ms: f("interval_ms"),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The client's latest live line (`  12.0s  24180 req/s  p50 ... p99 ...`).
fn client_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .rev()
        .find(|l| l.contains("req/s") && l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            // [t, n, req/s, p50, v, ms, p99, v, ms, ...]
            match (w.get(1), w.get(4), w.get(7)) {
                (Some(r), Some(p50), Some(p99)) => {
                    format!("{r:>7} req/s p50 {p50:>6} p99 {p99:>7} ms")
                }
                _ => String::new(),
            }
        })
        .unwrap_or_default()
}

/// Runs the main job.
pub fn run(simrep: &Path, o: &Options) -> Result<()> {
    let out = &o.out;
    std::fs::create_dir_all(out)?;
    let disk = out.join("kv-disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 30))
        .with_context(|| format!("creating {}", disk.display()))?;
    let key = out.join("key");
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut k))
        .context("reading /dev/urandom")?;
    std::fs::write(&key, k).context("writing the key file")?;
    let state_dir = out.join("backup-state");
    let _ = std::fs::remove_dir_all(&state_dir);
    let stats = out.join("epochs.jsonl");
    let _ = std::fs::remove_file(&stats);
    let (repl, service, port, m_primary, m_backup) = (
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
        free_port()?,
    );
    // Ctrl-C reaches the foreground process group: the client stops, makes
    // its final verification pass and prints its summary; this process
    // notes it, then stops the primary and the backup, which run in process
    // groups of their own.
    let interrupted = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&interrupted))
        .context("installing the Ctrl-C handler")?;

    let s = |x: &str| x.to_owned();
    let backup_log = out.join("backup.log");
    let backup_args = vec![
        s("backup"),
        s("--listen"),
        format!("127.0.0.1:{repl}"),
        s("--key-file"),
        key.display().to_string(),
        s("--service-port"),
        service.to_string(),
        s("--service-bind"),
        s("127.0.0.1"),
        s("--state-dir"),
        state_dir.display().to_string(),
        s("--metrics"),
        format!("127.0.0.1:{m_backup}"),
    ];
    eprintln!(
        "== backup:  simrep {}  (log {})",
        backup_args.join(" "),
        backup_log.display()
    );
    let mut backup = spawn_logged(simrep, &backup_args, &backup_log, "simrep backup")?;
    wait_for_log(
        &mut backup,
        &backup_log,
        "waiting for a primary",
        Duration::from_secs(30),
    )?;

    let primary_log = out.join("primary.log");
    let primary_args = vec![
        s("primary"),
        s("--backup"),
        format!("127.0.0.1:{repl}"),
        s("--key-file"),
        key.display().to_string(),
        s("--workload"),
        s("kv"),
        s("--mem"),
        o.mem.clone(),
        s("--port"),
        port.to_string(),
        s("--bind"),
        s("127.0.0.1"),
        s("--disk"),
        disk.display().to_string(),
        s("--epoch-ms"),
        o.epoch_ms.to_string(),
        s("--codec"),
        o.codec.clone(),
        s("--stats"),
        stats.display().to_string(),
        s("--metrics"),
        format!("127.0.0.1:{m_primary}"),
    ];
    eprintln!(
        "== primary: simrep {}  (log {})",
        primary_args.join(" "),
        primary_log.display()
    );
    let mut primary = spawn_logged(simrep, &primary_args, &primary_log, "simrep primary")?;
    eprintln!("== synchronising the backup while the guest runs ...");
    wait_for_log(
        &mut primary,
        &primary_log,
        "the guest is protected",
        Duration::from_secs(180),
    )?;
    eprintln!(
        "== protected. `simrep status --addr 127.0.0.1:{m_primary}` (primary) or --addr 127.0.0.1:{m_backup} (backup)"
    );

    let load_log = out.join("load.log");
    let json = out.join("load.json");
    let conns = o.connections.to_string();
    eprintln!(
        "== client: simrep load --target 127.0.0.1:{port} --target 127.0.0.1:{service} --duration {} --connections {conns} --verify (Ctrl-C stops early)",
        o.duration
    );
    let lf = std::fs::File::create(&load_log)?;
    let load = Command::new(simrep)
        .args(["load", "--target", &format!("127.0.0.1:{port}")])
        .args(["--target", &format!("127.0.0.1:{service}")])
        .args(["--workload", "kv", "--duration", &o.duration])
        .args(["--connections", &conns, "--keys", "4000"])
        .args([
            "--value-size",
            "64-4096",
            "--warmup",
            "1s",
            "--verify",
            "--json",
        ])
        .arg(&json)
        .env("NO_COLOR", "1")
        .stdout(lf.try_clone()?)
        .stderr(lf)
        .spawn()
        .context("starting simrep load")?;
    let mut load = Guard(Some(load), "simrep load");

    let started = Instant::now();
    let mut reader = BufReader::new(loop {
        match std::fs::File::open(&stats) {
            Ok(f) => break f,
            Err(_) if started.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", stats.display())),
        }
    });
    reader.seek(SeekFrom::End(0))?;
    let header = format!(
        "{:>6} {:>7} {:>5} {:>8} {:>9} {:>9} {:>6} {:>8} {:>8} {:>5}  {}",
        "time",
        "epoch",
        "ep/s",
        "pages/ep",
        "raw KB/ep",
        "sent KB/ep",
        "ratio",
        "pause ms",
        "ack ms",
        "held",
        "client (last second)"
    );
    let mut rows = 0;
    let mut killed = false;
    let mut partial = String::new();
    let mut pending: Vec<Epoch> = Vec::new();
    while load.exited().is_none() {
        std::thread::sleep(Duration::from_secs(1));
        if let (Some(after), false) = (o.kill_primary_after, killed) {
            if started.elapsed() >= after {
                primary.kill9();
                killed = true;
                eprintln!("== SIGKILLed the primary at {:.1} s: the backup takes over, the client follows", started.elapsed().as_secs_f64());
            }
        }
        let mut line = String::new();
        let mut epochs = Vec::new();
        while reader.read_line(&mut line)? > 0 {
            if line.ends_with('\n') {
                partial.push_str(&line);
                if let Some(e) = parse_epoch(partial.trim()) {
                    epochs.push(e);
                }
                partial.clear();
            } else {
                partial.push_str(&line);
            }
            line.clear();
        }
        // Rows are written when acked: an epoch line carries its ack.
        pending.extend(epochs);
        let now: Vec<Epoch> = std::mem::take(&mut pending);
        if rows % 20 == 0 {
            eprintln!("{header}");
        }
        rows += 1;
        let t = started.elapsed().as_secs_f64();
        if now.is_empty() {
            let why = if killed {
                "primary gone"
            } else {
                "no epochs (link slow or down?)"
            };
            eprintln!("{t:>5.0}s {:>7} {why:>60}  {}", "-", client_line(&load_log));
            continue;
        }
        let n = now.len() as f64;
        let last = now.last().copied().unwrap_or_default();
        let raw: f64 = now.iter().map(|e| e.raw).sum();
        let sent: f64 = now.iter().map(|e| e.out).sum();
        let acks: Vec<f64> = now.iter().filter_map(|e| e.ack_ms).collect();
        eprintln!(
            "{t:>5.0}s {:>7} {:>5.0} {:>8.0} {:>9.1} {:>10.1} {:>5.1}% {:>8.2} {:>8.2} {:>5.0}  {}",
            last.epoch,
            1000.0 / median(now.iter().map(|e| e.interval_ms).collect()).max(1.0),
            now.iter().map(|e| e.dirty).sum::<f64>() / n,
            raw / n / 1024.0,
            sent / n / 1024.0,
            if raw > 0.0 { 100.0 * sent / raw } else { 0.0 },
            median(now.iter().map(|e| e.pause_us / 1000.0).collect()),
            median(acks),
            now.iter().map(|e| e.held).sum::<f64>() / n,
            client_line(&load_log)
        );
    }
    let status = load.exited();
    load.0 = None;
    let text = std::fs::read_to_string(&load_log).unwrap_or_default();
    if let Some(i) = text.find("kv load on") {
        eprintln!("\n{}", &text[i..]);
    }
    drop(primary);
    drop(backup);
    if interrupted.load(Ordering::Relaxed) {
        eprintln!("== interrupted (Ctrl-C): the client, the primary and the backup stopped");
        return Ok(());
    }
    match status {
        Some(s) if s.success() => {}
        Some(s) => bail!("simrep load failed ({s}); see {}", load_log.display()),
        None => bail!("simrep load ended without a status"),
    }
    eprintln!(
        "== done: per-epoch stats in {}, client report in {}, logs in {}",
        stats.display(),
        json.display(),
        out.display()
    );
    Ok(())
}
