//! `cargo xtask bench-repl`: the replication figures of the README.
//!
//! Two network namespaces joined by a veth pair stand for two hosts; both
//! directions of the pair are shaped to a fixed rate (1 Gbit/s by default:
//! `tc ... netem rate`, or `tbf rate` where the kernel has no netem) and
//! the shaping is verified with a bulk TCP transfer each way before any
//! figure is taken. The backup listens in one namespace, the primary (or
//! the native guest) and the load client run in the other, the client
//! against 127.0.0.1 (only the replication link is shaped).
//!
//! For each workload (`kv`, `bank`) three guests are measured one after the
//! other in one invocation: native (`simrep run`), replicated with the codec
//! off (`simrep primary --codec raw`, plain asynchronous replication) and
//! with the codec on (`--codec similarity`). Each is driven first open loop
//! at a fixed offered rate (the same for all three: output commit holds every
//! response until its epoch is acked, so a closed-loop client measures the
//! epoch length, not the service), then closed loop with many connections
//! for context. Per phase: throughput, latency, good/tolerable shares (from
//! `simrep load --json`), bytes, dirty pages, pause and ack latency per
//! epoch (from the primary's `--stats` lines inside the measured window),
//! encode speed, and the CPU time of the guest's process (and the
//! backup's) over the window.
//!
//! Output: a markdown report and a JSON file under `--out`
//! (`target/bench-repl`), the per-run logs and raw files beneath it, and the
//! goal checks: codec on at least 90 % of native throughput, p99 within
//! native p99 plus two epochs, and clearly fewer bytes than codec off.
//!
//! The namespaces are always removed: at the end, on an error and on Ctrl-C
//! (SIGINT/SIGTERM are caught; every child runs in its own process group and
//! is stopped by this process).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// Namespace of the primary, the native guest and the load client.
const NS_P: &str = "simrep-bench-p";
/// Namespace of the backup.
const NS_B: &str = "simrep-bench-b";
/// The veth end in [`NS_P`].
const VETH_P: &str = "simrep-bp0";
/// The veth end in [`NS_B`].
const VETH_B: &str = "simrep-bb0";
/// Address of [`VETH_P`].
const ADDR_P: &str = "10.77.0.1";
/// Address of [`VETH_B`].
const ADDR_B: &str = "10.77.0.2";

/// Most connections chosen automatically: the guest's network device
/// refuses more than 1024 (`vmm::net::MAX_CONNECTIONS`).
const MAX_AUTO_CONNECTIONS: u32 = 1000;

/// Options of `cargo xtask bench-repl`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchReplArgs {
    /// Workloads to measure (kv, bank); default both.
    #[arg(long = "workload")]
    pub workloads: Vec<String>,
    /// Modes to measure (native, raw, similarity); default all three.
    #[arg(long = "mode")]
    pub modes: Vec<String>,
    /// Measured time of the open-loop phase per run (20s, 1m, ...).
    #[arg(long, default_value = "20s")]
    pub duration: String,
    /// Unmeasured time before each phase (connections are opened, the
    /// store fills).
    #[arg(long, default_value = "5s")]
    pub warmup: String,
    /// Measured time of the closed-loop phase per run (0s: skip it).
    #[arg(long, default_value = "10s")]
    pub closed_duration: String,
    /// Connections of the closed-loop phase.
    #[arg(long, default_value_t = 256)]
    pub closed_connections: u32,
    /// Offered rate of the open-loop phase in requests/s (the same for
    /// native and replicated).
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    /// Connections of the open-loop phase (default: 2 x rate x 2 epochs,
    /// at least 64, so that held responses never starve the client; at most
    /// 1000, as the guest's network device takes at most 1024).
    #[arg(long)]
    pub connections: Option<u32>,
    /// Guest memory.
    #[arg(long, default_value = "512M")]
    pub mem: String,
    /// Epoch length in ms.
    #[arg(long, default_value_t = 50)]
    pub epoch_ms: u32,
    /// Encoder threads of the primary.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// kv: PUT value sizes (`simrep load --value-size`).
    #[arg(long, default_value = "1K-4K")]
    pub value_size: String,
    /// kv: operation mix (`simrep load --mix`); PUT-heavy so that the guest
    /// dirties enough memory for the bytes per epoch to matter.
    #[arg(long, default_value = "get=50,put=50")]
    pub kv_mix: String,
    /// kv: keys.
    #[arg(long, default_value_t = 10000)]
    pub keys: u64,
    /// bank: accounts used by the client (the guest has 10000; the client
    /// splits them between its connections, so with fewer accounts than a
    /// few per connection transfers degenerate).
    #[arg(long, default_value_t = 10000)]
    pub accounts: u64,
    /// Good-response threshold in ms (`simrep load --good-ms`).
    #[arg(long, default_value_t = 10.0)]
    pub good_ms: f64,
    /// Tolerable-response threshold in ms (`simrep load --tolerable-ms`).
    #[arg(long, default_value_t = 50.0)]
    pub tolerable_ms: f64,
    /// Rate of the replication link, in tc's syntax.
    #[arg(long, default_value = "1gbit")]
    pub link_rate: String,
    /// One-way delay added to each direction in µs (netem only; tbf, the
    /// fallback where the kernel has no netem, adds none).
    #[arg(long, default_value_t = 100)]
    pub delay_us: u32,
    /// Shaper: auto (netem if the kernel has it, else tbf), netem or tbf.
    #[arg(long, default_value = "auto")]
    pub shaper: String,
    /// Measure the whole matrix this many times (interleaved); the tables
    /// and goals use the median of each figure over the repetitions, the
    /// JSON keeps every run.
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Fail (exit non-zero) when a goal is missed.
    #[arg(long)]
    pub check: bool,
    /// Where the report, the JSON and the per-run files go.
    #[arg(long, default_value = "target/bench-repl")]
    pub out: PathBuf,
}

/// Set by SIGINT/SIGTERM; every wait loop checks it.
static STOP: AtomicBool = AtomicBool::new(false);

fn interrupted() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted (Ctrl-C): stopping every process and removing the namespaces");
    }
    Ok(())
}

/// Sleeps `d`, returning early with an error on Ctrl-C.
fn sleep_checked(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        interrupted()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(50)));
    }
}

fn parse_secs(s: &str) -> Result<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .with_context(|| format!("bad duration {s:?} (500ms, 20s, 2m)"))?;
    Ok(v * mult)
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs `ip`/`tc` with arguments, failing with its stderr.
fn run_tool(prog: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("starting {prog} (Debian package iproute2)"))?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The shaped link.

/// Two namespaces joined by a shaped veth pair; removed on drop.
struct Link {
    /// Open handles of /run/netns/{NS_P, NS_B} (for setns).
    p: Option<File>,
    b: Option<File>,
    /// Which qdisc shapes the link, with its parameters.
    shaper: String,
}

impl Link {
    fn create(args: &BenchReplArgs) -> Result<Link> {
        for ns in [NS_P, NS_B] {
            if Path::new("/run/netns").join(ns).exists() {
                eprintln!("removing namespace {ns} left over by an earlier run");
                let _ = run_tool("ip", &["netns", "del", ns]);
            }
        }
        // From here on, drop removes whatever exists.
        let mut link = Link {
            p: None,
            b: None,
            shaper: String::new(),
        };
        run_tool("ip", &["netns", "add", NS_P])?;
        run_tool("ip", &["netns", "add", NS_B])?;
        run_tool(
            "ip",
            &[
                "link", "add", VETH_P, "netns", NS_P, "type", "veth", "peer", "name", VETH_B,
                "netns", NS_B,
            ],
        )?;
        for (ns, dev, addr) in [(NS_P, VETH_P, ADDR_P), (NS_B, VETH_B, ADDR_B)] {
            run_tool(
                "ip",
                &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
            )?;
            run_tool("ip", &["-n", ns, "link", "set", dev, "up"])?;
            run_tool("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        link.p = Some(File::open(Path::new("/run/netns").join(NS_P))?);
        link.b = Some(File::open(Path::new("/run/netns").join(NS_B))?);
        link.shaper = link.shape(args)?;
        Ok(link)
    }

    /// Shapes both directions; returns a description of the shaper.
    fn shape(&self, args: &BenchReplArgs) -> Result<String> {
        let qdisc = |ns: &str, dev: &str, spec: &[&str]| {
            let mut tc = vec!["-n", ns, "qdisc", "add", "dev", dev, "root"];
            tc.extend_from_slice(spec);
            run_tool("tc", &tc)
        };
        let delay = format!("{}us", args.delay_us);
        let netem = |ns: &str, dev: &str| {
            qdisc(
                ns,
                dev,
                &[
                    "netem",
                    "rate",
                    &args.link_rate,
                    "delay",
                    &delay,
                    "limit",
                    "10000",
                ],
            )
        };
        // tbf: a token bucket at the rate; the burst covers a 64 KiB GSO
        // segment twice, the queue holds 10 ms at the rate.
        let tbf = |ns: &str, dev: &str| {
            qdisc(
                ns,
                dev,
                &[
                    "tbf",
                    "rate",
                    &args.link_rate,
                    "burst",
                    "128kb",
                    "latency",
                    "10ms",
                ],
            )
        };
        let both = |f: &dyn Fn(&str, &str) -> Result<()>| -> Result<()> {
            f(NS_P, VETH_P)?;
            f(NS_B, VETH_B)
        };
        match args.shaper.as_str() {
            "netem" => {
                both(&netem)?;
                Ok(format!(
                    "netem rate {} delay {} us, both directions",
                    args.link_rate, args.delay_us
                ))
            }
            "tbf" => {
                both(&tbf)?;
                Ok(format!(
                    "tbf rate {} (burst 128 KiB, queue 10 ms), both directions; no added delay",
                    args.link_rate
                ))
            }
            "auto" => match netem(NS_P, VETH_P) {
                Ok(()) => {
                    netem(NS_B, VETH_B)?;
                    Ok(format!(
                        "netem rate {} delay {} us, both directions",
                        args.link_rate, args.delay_us
                    ))
                }
                Err(e) => {
                    eprintln!(
                        "netem is not available ({e:#}; this kernel lacks CONFIG_NET_SCH_NETEM?): shaping with tbf instead, without added delay"
                    );
                    both(&tbf)?;
                    Ok(format!(
                        "tbf rate {} (burst 128 KiB, queue 10 ms), both directions; netem not in this kernel, so no added delay",
                        args.link_rate
                    ))
                }
            },
            other => bail!("unknown --shaper {other:?} (auto, netem, tbf)"),
        }
    }

    fn fd(&self, ns: &str) -> Result<RawFd> {
        let f = if ns == NS_P { &self.p } else { &self.b };
        Ok(f.as_ref().context("namespace not open")?.as_raw_fd())
    }

    /// A command that runs `program` inside namespace `ns`.
    fn command(&self, ns: &str, program: &Path) -> Result<Command> {
        let fd = self.fd(ns)?;
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls setns(2), which is async-signal-safe; `fd` stays open in the
        // parent (the Link owns it) until after the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // Its own process group: Ctrl-C reaches this process only, which
        // stops the children in order (client, primary, backup).
        cmd.process_group(0);
        Ok(cmd)
    }

    /// Runs `f` on a thread that entered namespace `ns` (sockets created
    /// there belong to it).
    fn in_ns<T: Send + 'static>(
        &self,
        ns: &str,
        f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
    ) -> Result<T> {
        let fd = self.fd(ns)?;
        let ns_name = ns.to_string();
        std::thread::spawn(move || -> Result<T> {
            // SAFETY: setns(2) on an open namespace fd; it changes only the
            // network namespace of this (short-lived) thread.
            if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("entering namespace {ns_name}"));
            }
            Ok(f()?)
        })
        .join()
        .map_err(|_| anyhow!("a namespace thread panicked"))?
    }

    /// Bulk TCP transfer from `from` to `to`: goodput in Gbit/s and the
    /// round-trip time of one-byte ping-pongs in µs (median).
    fn probe(&self, from: &str, to: &str, to_addr: &str, bytes: u64) -> Result<(f64, f64)> {
        let addr: SocketAddr = format!("{to_addr}:7999").parse()?;
        let listener = self.in_ns(to, move || TcpListener::bind(addr))?;
        let rx = std::thread::spawn(move || -> std::io::Result<u64> {
            let (mut s, _) = listener.accept()?;
            s.set_nodelay(true)?;
            // Ping-pong phase: echo single bytes until a 0.
            let mut b = [0u8; 1];
            loop {
                s.read_exact(&mut b)?;
                s.write_all(&b)?;
                if b[0] == 0 {
                    break;
                }
            }
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                let k = s.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                n += k as u64;
            }
            s.write_all(b"x")?;
            Ok(n)
        });
        let mut s = self.in_ns(from, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })?;
        s.set_nodelay(true)?;
        let mut rtts = Vec::new();
        let mut b = [1u8; 1];
        for i in 0..200 {
            b[0] = if i == 199 { 0 } else { 1 };
            let t = Instant::now();
            s.write_all(&b)?;
            s.read_exact(&mut b)?;
            rtts.push(t.elapsed().as_secs_f64() * 1e6);
        }
        let buf = vec![0x5au8; 1 << 20];
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            s.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        s.read_exact(&mut b)?;
        let secs = t.elapsed().as_secs_f64();
        let got = rx
            .join()
            .map_err(|_| anyhow!("probe receiver panicked"))??;
        if got != sent {
            bail!("link probe: sent {sent} bytes, received {got}");
        }
        Ok((sent as f64 * 8.0 / secs / 1e9, percentile(&mut rtts, 50.0)))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.p = None;
        self.b = None;
        for ns in [NS_P, NS_B] {
            if Path::new("/run/netns").join(ns).exists() {
                if let Err(e) = run_tool("ip", &["netns", "del", ns]) {
                    eprintln!("could not remove namespace {ns}: {e:#}");
                }
            }
        }
    }
}

/// Parses tc's rate syntax (1gbit, 500mbit, 100kbit, 10000000bit) into bit/s.
fn rate_bits(s: &str) -> Option<f64> {
    let s = s.to_ascii_lowercase();
    for (suf, m) in [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)] {
        if let Some(n) = s.strip_suffix(suf) {
            return n.parse::<f64>().ok().map(|v| v * m);
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Processes.

/// A child stopped with SIGINT (then SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Option<Child>,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc> {
        let f = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Fails if the child has exited.
    fn check_alive(&mut self, log: &Path) -> Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(status) = c.try_wait()? {
                self.child = None;
                bail!(
                    "{} exited early ({status}); its log {}:\n{}",
                    self.name,
                    log.display(),
                    tail(log, 15)
                );
            }
        }
        Ok(())
    }

    /// Waits for the exit; SIGINT at `deadline`, then SIGKILL.
    fn wait(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let end = Instant::now() + limit;
        let c = self.child.as_mut().context("process already reaped")?;
        loop {
            if let Some(st) = c.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() > end {
                bail!("{} did not finish within {limit:?}", self.name);
            }
            interrupted()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child, not yet reaped.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGINT) };
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("{} did not stop within 10 s; killing it", self.name);
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

fn tail(path: &Path, n: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// utime + stime of a process in seconds.
fn cpu_secs(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let rest = &s[s.rfind(')').context("bad /proc stat")? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is field 3, utime 14, stime 15.
    let utime: f64 = f.get(11).context("bad /proc stat")?.parse()?;
    let stime: f64 = f.get(12).context("bad /proc stat")?.parse()?;
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime + stime) / hz)
}

/// Busy CPU time of the whole machine in seconds (all cores: user, nice,
/// system, irq, softirq, steal), from /proc/stat.
fn machine_busy_secs() -> Result<f64> {
    let s = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = s.lines().next().context("empty /proc/stat")?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: f64 = [0usize, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| v.get(i).copied().unwrap_or(0.0))
        .sum();
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy / hz)
}

// ---------------------------------------------------------------------------
// Statistics.

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Per-epoch figures of the primary's stats lines within a window.
fn epoch_figures(stats: &Path, from_ms: u64, to_ms: u64) -> Result<Value> {
    let text =
        std::fs::read_to_string(stats).with_context(|| format!("reading {}", stats.display()))?;
    let mut recs = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue; // a line being written
        };
        let t = v["unix_ms"].as_u64().unwrap_or(0);
        if t >= from_ms && t <= to_ms {
            recs.push(v);
        }
    }
    let col = |k: &str| -> Vec<f64> { recs.iter().filter_map(|r| r[k].as_f64()).collect() };
    let mut out_b = col("out_bytes");
    let raw_b = col("raw_bytes");
    let mut dirty = col("dirty_pages");
    let mut pause = col("pause_us");
    let mut ack = col("ack_ms");
    let encode_ms = col("encode_ms");
    let interval = col("interval_ms");
    let unprotected = recs
        .iter()
        .filter(|r| !r["protected"].as_bool().unwrap_or(false))
        .count();
    let sum_out: f64 = out_b.iter().sum();
    let sum_raw: f64 = raw_b.iter().sum();
    let sum_enc: f64 = encode_ms.iter().sum();
    Ok(json!({
        "epochs": recs.len(),
        "unprotected_epochs": unprotected,
        "interval_ms_mean": mean(&interval),
        "out_bytes_mean": mean(&out_b),
        "out_bytes_p50": percentile(&mut out_b, 50.0),
        "out_bytes_p99": percentile(&mut out_b, 99.0),
        "raw_bytes_mean": mean(&raw_b),
        "ratio": if sum_raw > 0.0 { sum_out / sum_raw } else { f64::NAN },
        "dirty_pages_mean": mean(&dirty),
        "dirty_pages_p50": percentile(&mut dirty, 50.0),
        "dirty_pages_p99": percentile(&mut dirty, 99.0),
        "pause_us_p50": percentile(&mut pause, 50.0),
        "pause_us_p99": percentile(&mut pause, 99.0),
        "ack_ms_p50": percentile(&mut ack, 50.0),
        "ack_ms_p99": percentile(&mut ack, 99.0),
        "encode_mb_s": if sum_enc > 0.0 { sum_raw / 1e6 / (sum_enc / 1e3) } else { f64::NAN },
        "link_mbit_s": if !interval.is_empty() {
            sum_out * 8.0 / 1e6 / (interval.iter().sum::<f64>() / 1e3)
        } else { f64::NAN },
    }))
}

// ---------------------------------------------------------------------------
// One run.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Native,
    Raw,
    Similarity,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Native, Mode::Raw, Mode::Similarity];

    fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Raw => "raw",
            Mode::Similarity => "similarity",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Raw => "codec off",
            Mode::Similarity => "codec on",
        }
    }
}

/// Phase of a run: open loop at the offered rate, or closed loop.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Closed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Open => "open",
            Phase::Closed => "closed",
        }
    }
}

struct Ctx<'a> {
    simrep: &'a Path,
    link: &'a Link,
    args: &'a BenchReplArgs,
    key: PathBuf,
    warmup_s: f64,
}

/// Measures one (workload, mode): starts the guest (and the backup), waits
/// for protection, runs the phases; returns one JSON object per phase.
fn measure(ctx: &Ctx, workload: &str, mode: Mode, idx: u16, rep: u32) -> Result<Vec<Value>> {
    let args = ctx.args;
    let name = if args.repeat > 1 {
        format!("{workload}-{}-{rep}", mode.name())
    } else {
        format!("{workload}-{}", mode.name())
    };
    let dir = args.out.join("runs").join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    std::fs::create_dir_all(&dir)?;
    let service_port = 7200 + idx;
    let repl_port = 7100 + idx;
    let stats = dir.join("stats.jsonl");
    let guest_log = dir.join(if mode == Mode::Native {
        "native.log"
    } else {
        "primary.log"
    });
    let backup_log = dir.join("backup.log");

    // Declared in this order so that drop stops the guest before the backup.
    let mut backup = None;
    if mode != Mode::Native {
        let mut c = ctx.link.command(NS_B, ctx.simrep)?;
        c.args(["backup", "--listen", &format!("{ADDR_B}:{repl_port}")])
            .arg("--key-file")
            .arg(&ctx.key)
            .args(["--service-port", &(service_port + 50).to_string()])
            .args(["--service-bind", "127.0.0.1", "--no-failover"])
            .arg("--state-dir")
            .arg(dir.join("backup-state"));
        backup = Some(Proc::spawn("simrep backup", &mut c, &backup_log)?);
        // Wait until it listens (from the primary's side of the link).
        let addr: SocketAddr = format!("{ADDR_B}:{repl_port}").parse()?;
        wait_until(Duration::from_secs(30), "the backup to listen", || {
            if let Some(b) = backup.as_mut() {
                b.check_alive(&backup_log)?;
            }
            Ok(ctx
                .link
                .in_ns(NS_P, move || {
                    TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                })
                .is_ok())
        })?;
    }
    let mut c = ctx.link.command(NS_P, ctx.simrep)?;
    match mode {
        Mode::Native => {
            c.arg("run");
        }
        Mode::Raw | Mode::Similarity => {
            c.args(["primary", "--backup", &format!("{ADDR_B}:{repl_port}")])
                .arg("--key-file")
                .arg(&ctx.key)
                .args(["--epoch-ms", &args.epoch_ms.to_string()])
                .args(["--codec", mode.name()])
                .args(["--threads", &args.threads.to_string()])
                .arg("--stats")
                .arg(&stats);
        }
    }
    c.args(["--workload", workload, "--mem", &args.mem, "--vcpus", "1"])
        .args(["--bind", "127.0.0.1", "--port", &service_port.to_string()]);
    let guest_name = if mode == Mode::Native {
        "simrep run"
    } else {
        "simrep primary"
    };
    let mut guest = Proc::spawn(guest_name, &mut c, &guest_log)?;
    let pid = guest.pid();
    let svc: SocketAddr = format!("127.0.0.1:{service_port}").parse()?;
    wait_until(Duration::from_secs(60), "the guest's service", || {
        guest.check_alive(&guest_log)?;
        Ok(ctx
            .link
            .in_ns(NS_P, move || {
                TcpStream::connect_timeout(&svc, Duration::from_millis(500))
            })
            .is_ok())
    })?;
    if mode != Mode::Native {
        let t = Instant::now();
        wait_until(
            Duration::from_secs(180),
            "protection (the backup's first committed checkpoint)",
            || {
                guest.check_alive(&guest_log)?;
                if let Some(b) = backup.as_mut() {
                    b.check_alive(&backup_log)?;
                }
                let s = std::fs::read_to_string(&stats).unwrap_or_default();
                Ok(s.lines().any(|l| l.contains("\"protected\":true")))
            },
        )?;
        eprintln!("   protected after {:.1} s", t.elapsed().as_secs_f64());
    }

    let mut phases = vec![(Phase::Open, parse_secs(&args.duration)?)];
    let closed = parse_secs(&args.closed_duration)?;
    if closed > 0.0 {
        phases.push((Phase::Closed, closed));
    }
    let mut results = Vec::new();
    for (phase, secs) in phases {
        let json_path = dir.join(format!("load-{}.json", phase.name()));
        let mut lc = ctx.link.command(NS_P, ctx.simrep)?;
        lc.args(["load", "--target", &svc.to_string(), "--workload", workload])
            .args(["--duration", &format!("{secs}s")])
            .args(["--warmup", &format!("{}s", ctx.warmup_s)])
            .args(["--good-ms", &args.good_ms.to_string()])
            .args(["--tolerable-ms", &args.tolerable_ms.to_string()])
            .args(["--seed", &(1000 + u64::from(idx)).to_string()])
            .arg("--json")
            .arg(&json_path);
        let conns = match phase {
            Phase::Open => {
                let c = args.connections.unwrap_or_else(|| {
                    let per_epoch = args.rate as f64 * f64::from(args.epoch_ms) / 1000.0;
                    ((4.0 * per_epoch).ceil() as u32).clamp(64, MAX_AUTO_CONNECTIONS)
                });
                lc.args(["--rate", &args.rate.to_string()]);
                c
            }
            Phase::Closed => args.closed_connections,
        };
        lc.args(["--connections", &conns.to_string()]);
        if workload == "kv" {
            lc.args(["--mix", &args.kv_mix])
                .args(["--value-size", &args.value_size])
                .args(["--keys", &args.keys.to_string()]);
        } else {
            lc.args(["--accounts", &args.accounts.to_string()]);
        }
        let load_log = dir.join(format!("load-{}.log", phase.name()));
        eprintln!(
            "   {} loop: {conns} connections{}, {}s warm-up + {secs}s",
            phase.name(),
            if phase == Phase::Open {
                format!(" at {} req/s", args.rate)
            } else {
                String::new()
            },
            ctx.warmup_s
        );
        let started = Instant::now();
        let mut load = Proc::spawn("simrep load", &mut lc, &load_log)?;
        // The measured window: after the warm-up, for `secs`.
        sleep_checked(Duration::from_secs_f64(ctx.warmup_s))?;
        let m0 = machine_busy_secs()?;
        let (g0, b0, t0, w0) = (
            cpu_secs(pid)?,
            backup.as_ref().map(|b| cpu_secs(b.pid())).transpose()?,
            unix_ms(),
            Instant::now(),
        );
        let end = started + Duration::from_secs_f64(ctx.warmup_s + secs);
        while Instant::now() < end {
            sleep_checked(Duration::from_millis(100))?;
            guest.check_alive(&guest_log)?;
            if let Some(b) = backup.as_mut() {
                b.check_alive(&backup_log)?;
            }
        }
        let m1 = machine_busy_secs()?;
        let (g1, b1, t1, wsecs) = (
            cpu_secs(pid)?,
            backup.as_ref().map(|b| cpu_secs(b.pid())).transpose()?,
            unix_ms(),
            w0.elapsed().as_secs_f64(),
        );
        let st = load.wait(Duration::from_secs_f64(secs + 120.0))?;
        if !st.success() {
            bail!(
                "simrep load failed ({st}); its log {}:\n{}",
                load_log.display(),
                tail(&load_log, 15)
            );
        }
        let report: Value = serde_json::from_str(
            &std::fs::read_to_string(&json_path)
                .with_context(|| format!("reading {}", json_path.display()))?,
        )?;
        let epochs = if mode == Mode::Native {
            Value::Null
        } else {
            epoch_figures(&stats, t0, t1)?
        };
        let errors: u64 = report["errors"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter(|(k, _)| k.as_str() != "not_found")
                    .filter_map(|(_, v)| v.as_u64())
                    .sum()
            })
            .unwrap_or(0);
        results.push(json!({
            "workload": workload,
            "mode": mode.name(),
            "phase": phase.name(),
            "rep": rep,
            "connections": conns,
            "offered_rps": if phase == Phase::Open { json!(args.rate) } else { Value::Null },
            "throughput_rps": report["throughput_rps"],
            "p50_ms": report["latency"]["p50_ms"],
            "p99_ms": report["latency"]["p99_ms"],
            "p999_ms": report["latency"]["p999_ms"],
            "good_share": report["good_share"],
            "tolerable_share": report["tolerable_share"],
            "errors": errors,
            "cpu_cores": (g1 - g0) / wsecs,
            "backup_cpu_cores": match (b0, b1) {
                (Some(a), Some(b)) => json!((b - a) / wsecs),
                _ => Value::Null,
            },
            "machine_busy_cores": (m1 - m0) / wsecs,
            "epochs": epochs,
        }));
        guest.check_alive(&guest_log)?;
    }
    guest.stop();
    drop(guest);
    drop(backup);
    Ok(results)
}

fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
    let end = Instant::now() + limit;
    loop {
        interrupted()?;
        if ready()? {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------
// Report.

/// One row per (workload, mode, phase), in order of first appearance, each
/// number the median (nearest rank) over the repetitions, `runs` their
/// count.
fn medians(rows: &[Value]) -> Vec<Value> {
    let key = |r: &Value| (r["workload"].clone(), r["mode"].clone(), r["phase"].clone());
    let mut groups: Vec<Vec<&Value>> = Vec::new();
    for r in rows {
        match groups.iter_mut().find(|g| key(g[0]) == key(r)) {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    fn med(vals: &[&Value], k: &str) -> Option<Value> {
        let mut v: Vec<f64> = vals.iter().filter_map(|x| x[k].as_f64()).collect();
        (v.len() == vals.len() && !v.is_empty()).then(|| json!(percentile(&mut v, 50.0)))
    }
    groups
        .into_iter()
        .map(|g| {
            let mut out = g[0].clone();
            let obj = out.as_object_mut().expect("rows are objects");
            let keys: Vec<String> = obj.keys().cloned().collect();
            for k in keys {
                if k == "rep" {
                    continue;
                }
                if let Some(m) = med(&g, &k) {
                    obj.insert(k, m);
                } else if k == "epochs" && obj[&k].is_object() {
                    let inner: Vec<&Value> = g.iter().map(|r| &r["epochs"]).collect();
                    let mut e = obj[&k].clone();
                    let eo = e.as_object_mut().expect("checked");
                    let ek: Vec<String> = eo.keys().cloned().collect();
                    for k2 in ek {
                        if let Some(m) = med(&inner, &k2) {
                            eo.insert(k2, m);
                        }
                    }
                    obj.insert(k, e);
                }
            }
            obj.remove("rep");
            obj.insert("runs".into(), json!(g.len()));
            out
        })
        .collect()
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

fn e(v: &Value, k: &str) -> f64 {
    v["epochs"][k].as_f64().unwrap_or(f64::NAN)
}

fn fmt_n(x: f64, prec: usize) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{x:.prec$}")
    }
}

fn kib(x: f64) -> String {
    if x.is_nan() {
        "-".into()
    } else {
        format!("{:.0}", x / 1024.0)
    }
}

fn find<'a>(rows: &'a [Value], wl: &str, mode: Mode, phase: Phase) -> Option<&'a Value> {
    rows.iter()
        .find(|r| r["workload"] == wl && r["mode"] == mode.name() && r["phase"] == phase.name())
}

/// The markdown tables and the goal checks; returns (markdown, goals JSON,
/// all goals met).
fn report(rows: &[Value], args: &BenchReplArgs, header: &str) -> (String, Value, bool) {
    let mut md = String::new();
    let _ = writeln!(md, "{header}\n");
    let _ = writeln!(
        md,
        "### Service (good: within {} ms, tolerable: within {} ms; CPU: the guest's process over the measured window, in cores; repl. CPU = replicated − native at the same offered load, open loop only; machine: busy cores of the whole machine ({} cores) in the window, this benchmark's load client and other users included)\n",
        args.good_ms, args.tolerable_ms, std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        md,
        "| workload | mode | load | req/s | p50 ms | p99 ms | good | tolerable | errors | CPU cores | repl. CPU | backup CPU | machine |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let wl = r["workload"].as_str().unwrap_or("");
        let phase = if r["phase"] == "open" {
            Phase::Open
        } else {
            Phase::Closed
        };
        let native_cpu = find(rows, wl, Mode::Native, phase).map(|n| f(n, "cpu_cores"));
        let mode = r["mode"].as_str().unwrap_or("");
        // Only at the same offered load: closed loop, native serves far
        // more requests than a replicated guest, so their CPU differs for
        // that reason alone.
        let repl_cpu = match native_cpu {
            Some(n) if mode != "native" && phase == Phase::Open => fmt_n(f(r, "cpu_cores") - n, 2),
            _ => "-".into(),
        };
        let load = if phase == Phase::Open {
            format!(
                "open {} req/s, {} conns",
                fmt_n(f(r, "offered_rps"), 0),
                fmt_n(f(r, "connections"), 0)
            )
        } else {
            format!("closed, {} conns", fmt_n(f(r, "connections"), 0))
        };
        let label = Mode::ALL
            .iter()
            .find(|m| m.name() == mode)
            .map_or(mode, |m| m.label());
        let _ = writeln!(
            md,
            "| {wl} | {label} | {load} | {} | {} | {} | {} % | {} % | {} | {} | {repl_cpu} | {} | {} |",
            fmt_n(f(r, "throughput_rps"), 0),
            fmt_n(f(r, "p50_ms"), 2),
            fmt_n(f(r, "p99_ms"), 2),
            fmt_n(100.0 * f(r, "good_share"), 1),
            fmt_n(100.0 * f(r, "tolerable_share"), 1),
            fmt_n(f(r, "errors"), 0),
            fmt_n(f(r, "cpu_cores"), 2),
            fmt_n(f(r, "backup_cpu_cores"), 2),
            fmt_n(f(r, "machine_busy_cores"), 2),
        );
    }
    let _ = writeln!(
        md,
        "\n### Replication, per epoch (the primary's --stats lines inside the measured window)\n"
    );
    let _ = writeln!(
        md,
        "| workload | mode | load | epochs | interval ms | dirty pages mean/p50/p99 | sent KiB mean/p50/p99 | raw KiB mean | ratio | link Mbit/s | pause µs p50/p99 | ack ms p50/p99 | encode MB/s |"
    );
    let _ = writeln!(
        md,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in rows.iter().filter(|r| r["mode"] != "native") {
        let mode = r["mode"].as_str().unwrap_or("");
        let label = Mode::ALL
            .iter()
            .find(|m| m.name() == mode)
            .map_or(mode, |m| m.label());
        let _ = writeln!(
            md,
            "| {} | {label} | {} | {} | {} | {}/{}/{} | {}/{}/{} | {} | {} | {} | {}/{} | {}/{} | {} |",
            r["workload"].as_str().unwrap_or(""),
            r["phase"].as_str().unwrap_or(""),
            fmt_n(e(r, "epochs"), 0),
            fmt_n(e(r, "interval_ms_mean"), 1),
            fmt_n(e(r, "dirty_pages_mean"), 0),
            fmt_n(e(r, "dirty_pages_p50"), 0),
            fmt_n(e(r, "dirty_pages_p99"), 0),
            kib(e(r, "out_bytes_mean")),
            kib(e(r, "out_bytes_p50")),
            kib(e(r, "out_bytes_p99")),
            kib(e(r, "raw_bytes_mean")),
            fmt_n(e(r, "ratio"), 3),
            fmt_n(e(r, "link_mbit_s"), 1),
            fmt_n(e(r, "pause_us_p50"), 0),
            fmt_n(e(r, "pause_us_p99"), 0),
            fmt_n(e(r, "ack_ms_p50"), 2),
            fmt_n(e(r, "ack_ms_p99"), 2),
            fmt_n(e(r, "encode_mb_s"), 0),
        );
    }
    // Goals, on the open-loop phase (the fixed offered load).
    let _ = writeln!(md, "\n### Goals (open loop, same offered load)\n");
    let mut goals = Vec::new();
    let mut all = true;
    let mut workloads: Vec<&str> = rows.iter().filter_map(|r| r["workload"].as_str()).collect();
    workloads.dedup();
    let epoch = f64::from(args.epoch_ms);
    for wl in workloads {
        let n = find(rows, wl, Mode::Native, Phase::Open);
        let on = find(rows, wl, Mode::Similarity, Phase::Open);
        let off = find(rows, wl, Mode::Raw, Phase::Open);
        let mut check = |name: String, ok: Option<bool>, detail: String| {
            let verdict = match ok {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "not measured",
            };
            if ok == Some(false) {
                all = false;
            }
            let _ = writeln!(md, "- {wl}: {name}: **{verdict}** ({detail})");
            goals.push(json!({"workload": wl, "goal": name, "met": ok, "detail": detail}));
        };
        match (n, on) {
            (Some(n), Some(on)) => {
                let share = f(on, "throughput_rps") / f(n, "throughput_rps");
                check(
                    "codec-on throughput >= 90 % of native".into(),
                    Some(share >= 0.9),
                    format!(
                        "{:.0} vs {:.0} req/s = {:.1} %",
                        f(on, "throughput_rps"),
                        f(n, "throughput_rps"),
                        100.0 * share
                    ),
                );
                let limit = f(n, "p99_ms") + 2.0 * epoch;
                check(
                    "codec-on p99 <= native p99 + 2 epochs".into(),
                    Some(f(on, "p99_ms") <= limit),
                    format!(
                        "{:.2} ms vs {:.2} + {:.0} = {:.2} ms",
                        f(on, "p99_ms"),
                        f(n, "p99_ms"),
                        2.0 * epoch,
                        limit
                    ),
                );
            }
            _ => {
                check(
                    "codec-on vs native".into(),
                    None,
                    "needs both native and similarity runs".into(),
                );
            }
        }
        match (on, off) {
            (Some(on), Some(off)) => {
                let (b_on, b_off) = (e(on, "out_bytes_mean"), e(off, "out_bytes_mean"));
                // Bytes per response, so that a difference in throughput
                // cannot flatter either side.
                let per_req = |r: &Value, b: f64| {
                    b * (1000.0 / e(r, "interval_ms_mean")) / f(r, "throughput_rps")
                };
                let (q_on, q_off) = (per_req(on, b_on), per_req(off, b_off));
                check(
                    "codec on sends clearly fewer bytes than codec off (at most 2/3)".into(),
                    Some(q_on <= q_off * 2.0 / 3.0),
                    format!(
                        "{:.0} vs {:.0} KiB per epoch, {:.0} vs {:.0} bytes per response: {:.2}x fewer; ratio {:.3} vs {:.3}; p99 {:.2} vs {:.2} ms; ack p99 {:.2} vs {:.2} ms",
                        b_on / 1024.0,
                        b_off / 1024.0,
                        q_on,
                        q_off,
                        q_off / q_on,
                        e(on, "ratio"),
                        e(off, "ratio"),
                        f(on, "p99_ms"),
                        f(off, "p99_ms"),
                        e(on, "ack_ms_p99"),
                        e(off, "ack_ms_p99"),
                    ),
                );
            }
            _ => check(
                "codec on vs codec off".into(),
                None,
                "needs both raw and similarity runs".into(),
            ),
        }
    }
    (md, Value::Array(goals), all)
}

// ---------------------------------------------------------------------------
// Entry point.

/// Runs the benchmark with the release binary `simrep`.
pub fn run(simrep: &Path, args: &BenchReplArgs) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-repl creates network namespaces and runs KVM guests: run it as root");
    }
    for tool in ["ip", "tc"] {
        if Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            bail!("`{tool}` is missing: install the Debian package iproute2");
        }
    }
    let workloads: Vec<String> = if args.workloads.is_empty() {
        vec!["kv".into(), "bank".into()]
    } else {
        args.workloads.clone()
    };
    for w in &workloads {
        if w != "kv" && w != "bank" {
            bail!("unknown --workload {w:?} (kv, bank)");
        }
    }
    let modes: Vec<Mode> = if args.modes.is_empty() {
        Mode::ALL.to_vec()
    } else {
        args.modes
            .iter()
            .map(|m| {
                Mode::ALL
                    .into_iter()
                    .find(|x| x.name() == m)
                    .with_context(|| format!("unknown --mode {m:?} (native, raw, similarity)"))
            })
            .collect::<Result<_>>()?
    };
    let warmup_s = parse_secs(&args.warmup)?;
    parse_secs(&args.duration)?;
    parse_secs(&args.closed_duration)?;
    std::fs::create_dir_all(&args.out)?;
    let out = std::fs::canonicalize(&args.out)?;
    let mut resolved = args.clone();
    resolved.out = out;
    resolved.workloads = workloads.clone();
    let args = &resolved;

    // Ctrl-C and SIGTERM set STOP; the loops notice and unwind, and the
    // destructors stop the children and remove the namespaces.
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&flag))
            .context("installing the Ctrl-C handler")?;
    }
    let watcher = Arc::clone(&flag);
    std::thread::spawn(move || loop {
        if watcher.load(Ordering::Relaxed) {
            STOP.store(true, Ordering::Relaxed);
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    });

    let key = args.out.join("bench.key");
    let mut k = [0u8; 32];
    File::open("/dev/urandom")?.read_exact(&mut k)?;
    std::fs::write(&key, k)?;

    eprintln!(
        "== link: namespaces {NS_P} ({ADDR_P}) and {NS_B} ({ADDR_B}), veth {VETH_P}/{VETH_B}"
    );
    let link = Link::create(args)?;
    eprintln!("   shaped: {}", link.shaper);
    let mut probes = Vec::new();
    let want = rate_bits(&args.link_rate);
    for (from, to, to_addr) in [(NS_P, NS_B, ADDR_B), (NS_B, NS_P, ADDR_P)] {
        interrupted()?;
        let (gbit, rtt_us) = link.probe(from, to, to_addr, 96 << 20)?;
        eprintln!("   probe {from} -> {to}: {gbit:.3} Gbit/s TCP goodput, RTT {rtt_us:.0} µs");
        if let Some(w) = want {
            let share = gbit * 1e9 / w;
            if share > 1.05 {
                bail!(
                    "the link is not shaped: {gbit:.3} Gbit/s measured {from} -> {to}, more than {} allows",
                    args.link_rate
                );
            }
            if share < 0.7 {
                eprintln!(
                    "   warning: only {:.0} % of {} reached (a busy machine?)",
                    100.0 * share,
                    args.link_rate
                );
            }
        }
        probes.push(json!({"from": from, "to": to, "goodput_gbit_s": gbit, "rtt_us_p50": rtt_us}));
    }

    let ctx = Ctx {
        simrep,
        link: &link,
        args,
        key,
        warmup_s,
    };
    let mut rows = Vec::new();
    let mut retried = Vec::new();
    let mut idx = 0u16;
    for rep in 1..=args.repeat.max(1) {
        for wl in &workloads {
            for &mode in &modes {
                if args.repeat > 1 {
                    eprintln!(
                        "== {wl}, {} (repetition {rep} of {})",
                        mode.label(),
                        args.repeat
                    );
                } else {
                    eprintln!("== {wl}, {}", mode.label());
                }
                // A run whose process dies under it (another process on this
                // shared machine may signal it) is repeated once, and says so.
                let mut attempt = 1;
                let runs = loop {
                    match measure(&ctx, wl, mode, idx, rep) {
                        Ok(r) => break r,
                        Err(e) if attempt < 2 && !STOP.load(Ordering::Relaxed) => {
                            eprintln!("   run failed, repeating it once: {e:#}");
                            retried.push(
                            json!({"workload": wl, "mode": mode.name(), "error": format!("{e:#}")}),
                        );
                            attempt += 1;
                            idx += 1;
                        }
                        Err(e) => return Err(e),
                    }
                };
                rows.extend(runs);
                idx += 1;
            }
        }
    }
    let shaper = link.shaper.clone();
    drop(link);

    let header = format!(
        "## Replication benchmark (`cargo xtask bench-repl`)\n\n\
         Guest: {} RAM, 1 vCPU, {} ms epochs, {} encoder threads. Link: {} ({}). \
         Probe: {}. Load: `simrep load` beside the primary against 127.0.0.1 (unshaped); \
         open loop {} req/s after {} warm-up for {}, then closed loop with {} connections for {}; \
         kv: mix {}, values {}, {} keys; bank: {} accounts, default mix.{}",
        args.mem,
        args.epoch_ms,
        args.threads,
        args.link_rate,
        shaper,
        probes
            .iter()
            .map(|p| format!(
                "{} -> {} {:.3} Gbit/s, RTT {:.0} µs",
                p["from"].as_str().unwrap_or(""),
                p["to"].as_str().unwrap_or(""),
                f(p, "goodput_gbit_s"),
                f(p, "rtt_us_p50")
            ))
            .collect::<Vec<_>>()
            .join("; "),
        args.rate,
        args.warmup,
        args.duration,
        args.closed_connections,
        args.closed_duration,
        args.kv_mix,
        args.value_size,
        args.keys,
        args.accounts,
        if args.repeat > 1 {
            format!(
                " Each figure is the median over {} interleaved runs (every run is in report.json).",
                args.repeat
            )
        } else {
            String::new()
        },
    );
    let med = medians(&rows);
    let (mut md, goals, all) = report(&med, args, &header);
    for r in &retried {
        let _ = writeln!(
            md,
            "\nNote: the {} {} run failed once and was repeated: {}",
            r["workload"].as_str().unwrap_or(""),
            r["mode"].as_str().unwrap_or(""),
            r["error"]
                .as_str()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("")
        );
    }
    let md_path = args.out.join("report.md");
    let json_path = args.out.join("report.json");
    std::fs::write(&md_path, &md)?;
    let doc = json!({
        "config": {
            "mem": args.mem, "epoch_ms": args.epoch_ms, "threads": args.threads,
            "rate": args.rate, "connections": args.connections,
            "closed_connections": args.closed_connections,
            "duration": args.duration, "warmup": args.warmup,
            "closed_duration": args.closed_duration,
            "value_size": args.value_size, "kv_mix": args.kv_mix, "keys": args.keys,
            "accounts": args.accounts, "good_ms": args.good_ms,
            "tolerable_ms": args.tolerable_ms, "link_rate": args.link_rate,
        },
        "link": probes,
        "runs": rows,
        "medians": med,
        "goals": goals,
        "all_goals_met": all,
        "repeated_runs": retried,
    });
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)?)?;
    println!("{md}");
    eprintln!(
        "report: {} and {}; per-run logs and stats under {}",
        md_path.display(),
        json_path.display(),
        args.out.join("runs").display()
    );
    if args.check && !all {
        bail!("a goal was missed (see the report)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates_parse() {
        assert_eq!(parse_secs("20s").unwrap(), 20.0);
        assert_eq!(parse_secs("500ms").unwrap(), 0.5);
        assert_eq!(parse_secs("2m").unwrap(), 120.0);
        assert_eq!(parse_secs("7").unwrap(), 7.0);
        assert!(parse_secs("fast").is_err());
        assert_eq!(rate_bits("1gbit"), Some(1e9));
        assert_eq!(rate_bits("500Mbit"), Some(5e8));
        assert_eq!(rate_bits("fast"), None);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&mut v, 50.0), 50.0);
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut v, 100.0), 100.0);
        assert!(percentile(&mut [], 50.0).is_nan());
    }

    fn line(t: u64, out: u64, raw: u64, ack: Option<f64>) -> String {
        json!({"epoch": t, "unix_ms": t, "interval_ms": 50.0, "pause_us": t * 10,
               "dirty_pages": raw / 4096, "raw_bytes": raw, "out_bytes": out,
               "encode_ms": 1.0, "ack_ms": ack, "protected": true})
        .to_string()
    }

    #[test]
    fn epoch_figures_use_only_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("stats.jsonl");
        let mut text = String::new();
        text.push_str(&line(1, 999_999, 4096, Some(1.0)));
        text.push('\n');
        for t in 10..20 {
            text.push_str(&line(t, 1000 * t, 8192, Some(t as f64)));
            text.push('\n');
        }
        text.push_str(&line(30, 999_999, 4096, None));
        text.push_str("\n{\"epoch\": 31, \"unix_"); // a line being written
        std::fs::write(&p, text).unwrap();
        let v = epoch_figures(&p, 10, 19).unwrap();
        assert_eq!(v["epochs"], 10);
        assert_eq!(v["out_bytes_mean"], 14500.0);
        assert_eq!(v["out_bytes_p50"], 14000.0);
        assert_eq!(v["out_bytes_p99"], 19000.0);
        assert_eq!(v["dirty_pages_mean"], 2.0);
        assert_eq!(v["ack_ms_p50"], 14.0);
        assert_eq!(v["ratio"], 145_000.0 / 81_920.0);
        // 8192 bytes per ms of encoding.
        assert_eq!(v["encode_mb_s"], 8.192);
    }

    fn row(wl: &str, mode: Mode, rps: f64, p99: f64, out: f64) -> Value {
        json!({"workload": wl, "mode": mode.name(), "phase": "open", "connections": 1000,
        "offered_rps": 5000, "throughput_rps": rps, "p50_ms": 1.0, "p99_ms": p99,
        "good_share": 1.0, "tolerable_share": 1.0, "errors": 0, "cpu_cores": 0.5,
        "backup_cpu_cores": null, "machine_busy_cores": 1.0,
        "epochs": if mode == Mode::Native { Value::Null } else {
            json!({"out_bytes_mean": out, "interval_ms_mean": 50.0, "ratio": 0.5})
        }})
    }

    #[test]
    fn medians_group_by_run_and_phase() {
        let mut rows = Vec::new();
        for (rep, p99) in [(1, 9.0), (2, 1.0), (3, 5.0)] {
            let mut r = row("kv", Mode::Raw, 5000.0, p99, 1000.0 * p99);
            r["rep"] = json!(rep);
            rows.push(r);
        }
        rows.push(row("bank", Mode::Raw, 4000.0, 2.0, 7.0));
        let m = medians(&rows);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0]["p99_ms"], 5.0);
        assert_eq!(m[0]["epochs"]["out_bytes_mean"], 5000.0);
        assert_eq!(m[0]["runs"], 3);
        assert!(m[0].get("rep").is_none());
        assert_eq!(m[1]["throughput_rps"], 4000.0);
        assert_eq!(m[1]["runs"], 1);
    }

    #[test]
    fn goals_are_checked_against_native_and_codec_off() {
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            a: BenchReplArgs,
        }
        let args = W::parse_from(["x"]).a;
        let ok = [
            row("kv", Mode::Native, 5000.0, 5.0, 0.0),
            row("kv", Mode::Raw, 5000.0, 90.0, 2e6),
            row("kv", Mode::Similarity, 4600.0, 104.0, 1e6),
        ];
        let (md, goals, all) = report(&ok, &args, "h");
        assert!(all, "{md}");
        assert_eq!(goals.as_array().unwrap().len(), 3);
        // Too slow, too late, and not enough fewer bytes: all three missed.
        let bad = [
            row("kv", Mode::Native, 5000.0, 5.0, 0.0),
            row("kv", Mode::Raw, 5000.0, 90.0, 2e6),
            row("kv", Mode::Similarity, 4400.0, 106.0, 1.5e6),
        ];
        let (md, goals, all) = report(&bad, &args, "h");
        assert!(!all);
        assert_eq!(md.matches("MISSED").count(), 3, "{md}");
        assert!(goals.as_array().unwrap().iter().all(|g| g["met"] == false));
    }
}
