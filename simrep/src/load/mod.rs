//! `simrep load`: a client of the guest's `kv` and `bank` services
//! ([`crate::proto`]) that measures throughput, latency and the shares of
//! good and tolerable responses, and with `--verify` checks every response
//! against a model of everything it wrote ([`model`]).
//!
//! * C connections (tokio tasks), each with one request in flight, in a
//!   closed loop (the next request as soon as the response is in) or an
//!   open loop at a fixed overall rate, where latency counts from the
//!   intended send time ([`metrics`]).
//! * Several targets: when a connection fails, the client moves to the next
//!   target (in order, wrapping) and retries with backoff until
//!   `failover_timeout`; the model is kept, the request in flight becomes
//!   *pending* (either outcome accepted until read), and with `--verify`
//!   each connection re-reads all its keys on the new target.
//! * A final sweep re-reads every key (account) the model knows.
//!
//! [`testserver`] is a reference server for tests.

#![forbid(unsafe_code)]

pub mod conn;
pub mod metrics;
pub mod model;
pub mod parse;
pub mod testserver;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use conn::{CallError, Conn, Failover, Targets};
use metrics::{status_name, Latency, Stats};
use model::{BankModel, Encoded, KvModel, Op, Problem, ProblemKind, Work};
use parse::{Mix, Rng, SizeRange};

/// Default kv mix: mostly reads, as in the usual key-value benchmarks.
pub const DEFAULT_KV_MIX: &str = "get=80,put=15,del=3,scan=2";
/// Default bank mix.
pub const DEFAULT_BANK_MIX: &str = "transfer=50,balance=40,history=10";
/// Default "good" response time: 10 ms. SPECweb counts a page as good
/// within 2 s and tolerable within 4 s; a sub-millisecond in-memory service
/// behind a VMM deserves thresholds two orders of magnitude tighter.
pub const DEFAULT_GOOD_MS: f64 = 10.0;
/// Default "tolerable" response time: 50 ms.
pub const DEFAULT_TOLERABLE_MS: f64 = 50.0;
/// Resolution of tokio's timer.
const TIMER_TICK: Duration = Duration::from_millis(1);
/// Problems kept in the report (all are counted).
const MAX_PROBLEMS_KEPT: usize = 1000;

/// Which service the load targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadWorkload {
    /// The key-value store.
    Kv,
    /// The bank.
    Bank,
}

impl std::str::FromStr for LoadWorkload {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kv" => Ok(LoadWorkload::Kv),
            "bank" => Ok(LoadWorkload::Bank),
            _ => Err(format!("unknown workload `{s}` (expected kv or bank)")),
        }
    }
}

/// Everything a load run needs.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// `HOST:PORT` targets, in failover order.
    pub targets: Vec<String>,
    /// kv or bank.
    pub workload: LoadWorkload,
    /// Concurrent connections.
    pub connections: u32,
    /// Requests per second over all connections; 0: closed loop.
    pub rate: u64,
    /// Measured time.
    pub duration: Duration,
    /// Unmeasured time before it.
    pub warmup: Duration,
    /// Check every response against the model.
    pub verify: bool,
    /// kv: keys in all (partitioned between connections).
    pub keys: u64,
    /// kv: `PUT` value sizes.
    pub value_size: SizeRange,
    /// Operation weights of the workload.
    pub mix: Mix,
    /// kv: most entries per `SCAN`.
    pub scan_len: u32,
    /// bank: accounts `0..accounts` (partitioned between connections).
    pub accounts: u32,
    /// bank: largest transfer in cents.
    pub max_amount: u64,
    /// A response within this time is good.
    pub good: Duration,
    /// A response within this time is tolerable.
    pub tolerable: Duration,
    /// A request without response for this long counts as lost.
    pub request_timeout: Duration,
    /// Limit of one connection attempt.
    pub connect_timeout: Duration,
    /// Give up when no target accepts for this long.
    pub failover_timeout: Duration,
    /// Seed of the operation mix (and the kv namespace tag).
    pub seed: u64,
    /// Worker threads of the client runtime.
    pub threads: usize,
}

impl LoadOptions {
    /// Defaults for `targets` and `workload` (the values `--help` shows).
    pub fn new(targets: Vec<String>, workload: LoadWorkload) -> LoadOptions {
        let mix = match workload {
            LoadWorkload::Kv => Mix::parse(DEFAULT_KV_MIX, &model::KV_OPS),
            LoadWorkload::Bank => Mix::parse(DEFAULT_BANK_MIX, &model::BANK_OPS),
        }
        .unwrap_or_else(|_| Mix { weights: vec![] });
        LoadOptions {
            targets,
            workload,
            connections: 8,
            rate: 0,
            duration: Duration::from_secs(30),
            warmup: Duration::ZERO,
            verify: false,
            keys: 10_000,
            value_size: SizeRange { min: 128, max: 128 },
            mix,
            scan_len: 16,
            accounts: 1000,
            max_amount: 1000,
            good: Duration::from_secs_f64(DEFAULT_GOOD_MS / 1e3),
            tolerable: Duration::from_secs_f64(DEFAULT_TOLERABLE_MS / 1e3),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            failover_timeout: Duration::from_secs(30),
            seed: 0,
            threads: 2,
        }
    }
}

/// Why a load run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad options.
    #[error("invalid load options: {0}")]
    Config(String),
    /// No target accepted a connection: at the start, or for longer than
    /// the failover timeout.
    #[error("no target reachable: {0}")]
    NoTarget(String),
    /// A target answered something that is not the protocol.
    #[error("target {target} broke the protocol: {detail}")]
    Protocol {
        /// The target.
        target: String,
        /// What was wrong.
        detail: String,
    },
    /// The runtime could not be built.
    #[error("starting the client runtime")]
    Runtime(#[source] std::io::Error),
}

/// The verdict of `--verify`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct VerifyReport {
    /// Responses checked against the model.
    pub checked: u64,
    /// Sweeps (re-reads of every key of a connection): first, after each
    /// reconnection, final.
    pub sweeps: u64,
    /// Problems by kind.
    pub problems_by_kind: BTreeMap<ProblemKind, u64>,
    /// The first problems found (at most 1000).
    pub problems: Vec<Problem>,
    /// bank: the total balance of the client's accounts at the start.
    pub bank_total_start: Option<u64>,
    /// bank: the total balance at the end.
    pub bank_total_end: Option<u64>,
}

impl VerifyReport {
    /// Problems in all.
    pub fn problem_count(&self) -> u64 {
        self.problems_by_kind.values().sum()
    }

    fn add(&mut self, p: Problem) {
        *self.problems_by_kind.entry(p.kind).or_default() += 1;
        if self.problems.len() < MAX_PROBLEMS_KEPT {
            self.problems.push(p);
        }
    }
}

/// The figures of a run (`--json` writes this).
#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    /// kv or bank.
    pub workload: LoadWorkload,
    /// The targets, in failover order.
    pub targets: Vec<String>,
    /// Connections.
    pub connections: u32,
    /// Offered rate (0: closed loop).
    pub rate: u64,
    /// Operation mix.
    pub mix: String,
    /// Measured seconds.
    pub duration_s: f64,
    /// Unmeasured seconds before.
    pub warmup_s: f64,
    /// Requests sent in the measured time.
    pub requests: u64,
    /// Responses to them.
    pub responses: u64,
    /// Responses per second.
    pub throughput_rps: f64,
    /// Latency of the responses.
    pub latency: Latency,
    /// Good threshold (ms).
    pub good_ms: f64,
    /// Tolerable threshold (ms).
    pub tolerable_ms: f64,
    /// Share of requests answered within the good threshold.
    pub good_share: f64,
    /// Share of requests answered within the tolerable threshold.
    pub tolerable_share: f64,
    /// Non-OK statuses (`not_found`...) and failures (`connection_lost`).
    pub errors: BTreeMap<String, u64>,
    /// Responses per operation.
    pub ops: BTreeMap<String, u64>,
    /// Switches between targets.
    pub failovers: Vec<Failover>,
    /// Reconnections after lost connections.
    pub reconnects: u64,
    /// Longest time without any successful response (ms).
    pub longest_gap_ms: f64,
    /// `--verify` results.
    pub verify: Option<VerifyReport>,
    /// Whether Ctrl-C ended the run early.
    pub interrupted: bool,
}

/// One live line (per second).
#[derive(Clone, Debug)]
pub struct Interval {
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// Still in the warm-up.
    pub warmup: bool,
    /// Responses per second in the interval.
    pub rps: f64,
    /// Median latency in the interval (ms).
    pub p50_ms: f64,
    /// 99th percentile in the interval (ms).
    pub p99_ms: f64,
    /// Failures so far.
    pub failures: u64,
    /// `--verify` problems so far.
    pub problems: u64,
    /// The current target.
    pub target: String,
}

struct Shared {
    opts: LoadOptions,
    targets: Targets,
    t0: Instant,
    measure_start: Instant,
    end: Instant,
    stop: Arc<AtomicBool>,
    live: Vec<Mutex<Histogram<u64>>>,
    failures: AtomicU64,
    problems: AtomicU64,
    /// When the last connection stopped sending workload requests (ns
    /// since `t0`): the end of the measured time (sweeps are not measured).
    stopped_ns: AtomicU64,
}

struct ConnResult {
    stats: Stats,
    problems: Vec<Problem>,
    checked: u64,
    sweeps: u64,
    bank: Option<(Option<u64>, u64)>,
}

fn op_name(o: &Op) -> &'static str {
    match o {
        Op::Get(_) => "get",
        Op::Put(..) => "put",
        Op::Del(_) => "del",
        Op::Scan(..) => "scan",
        Op::Transfer { .. } => "transfer",
        Op::Balance(_) => "balance",
        Op::History(..) => "history",
    }
}

/// Checks the options.
///
/// # Errors
///
/// [`LoadError::Config`] naming the bad option.
pub fn validate(o: &LoadOptions) -> Result<(), LoadError> {
    let bad = |m: String| Err(LoadError::Config(m));
    if o.targets.is_empty() {
        return bad("at least one --target is needed".into());
    }
    for t in &o.targets {
        conn::check_target(t).map_err(LoadError::Config)?;
    }
    if !(1..=9999).contains(&o.connections) {
        return bad(format!(
            "--connections {} is outside 1..=9999",
            o.connections
        ));
    }
    if o.duration.is_zero() {
        return bad("--duration must be above 0".into());
    }
    match o.workload {
        LoadWorkload::Kv if o.keys < u64::from(o.connections) => {
            bad(format!("--keys {} is fewer than --connections {}: every connection needs keys of its own", o.keys, o.connections))
        }
        LoadWorkload::Kv if o.keys > u64::from(o.connections) * u64::from(u32::MAX) => bad("--keys is too large".into()),
        LoadWorkload::Bank if o.accounts < o.connections => bad(format!(
            "--accounts {} is fewer than --connections {}: every connection needs accounts of its own",
            o.accounts, o.connections
        )),
        _ if o.tolerable < o.good => bad("--tolerable-ms is below --good-ms".into()),
        _ if o.threads == 0 => bad("--threads must be at least 1".into()),
        _ => Ok(()),
    }
}

/// Runs the load: connects, drives the workload for warm-up plus duration
/// (or until `stop`), sweeps, and reports. `live` is called about once a
/// second.
///
/// # Errors
///
/// [`LoadError`]: bad options, no reachable target (at the start or for
/// longer than the failover timeout), a target that broke the protocol.
/// Problems found by `--verify` are in the report, not errors.
pub fn run(
    opts: &LoadOptions,
    stop: Arc<AtomicBool>,
    live: &mut dyn FnMut(&Interval),
) -> Result<LoadReport, LoadError> {
    validate(opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads)
        .enable_all()
        .build()
        .map_err(LoadError::Runtime)?;
    rt.block_on(run_async(opts.clone(), stop, live))
}

async fn run_async(
    opts: LoadOptions,
    stop: Arc<AtomicBool>,
    live: &mut dyn FnMut(&Interval),
) -> Result<LoadReport, LoadError> {
    let targets = Targets::new(
        opts.targets.clone(),
        opts.connect_timeout,
        opts.failover_timeout,
        stop.clone(),
    );
    targets.probe().await?;
    let seed = if opts.seed == 0 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    } else {
        opts.seed
    };
    let tag = Rng::new(seed ^ 0x7461_6773).next_u64();
    let t0 = Instant::now();
    let measure_start = t0 + opts.warmup;
    let sh = Arc::new(Shared {
        targets,
        t0,
        measure_start,
        end: measure_start + opts.duration,
        stop,
        live: (0..opts.connections)
            .map(|_| Mutex::new(metrics::histogram()))
            .collect(),
        failures: AtomicU64::new(0),
        problems: AtomicU64::new(0),
        stopped_ns: AtomicU64::new(0),
        opts: LoadOptions { seed, ..opts },
    });
    let o = &sh.opts;
    let mut set = tokio::task::JoinSet::new();
    for c in 0..o.connections {
        let work = match o.workload {
            LoadWorkload::Kv => Work::Kv(KvModel::new(
                tag,
                c,
                o.connections,
                o.keys,
                o.mix.clone(),
                o.value_size,
                o.scan_len,
            )),
            LoadWorkload::Bank => Work::Bank(BankModel::new(
                c,
                o.connections,
                o.accounts,
                o.mix.clone(),
                o.max_amount,
            )),
        };
        set.spawn(conn_task(Arc::clone(&sh), c, work));
    }
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let mut last_tick = Instant::now();
    let mut results = Vec::new();
    while !set.is_empty() {
        tokio::select! {
            r = set.join_next() => match r {
                Some(Ok(Ok(res))) => results.push(res),
                Some(Ok(Err(e))) => {
                    set.abort_all();
                    return Err(e);
                }
                Some(Err(e)) => {
                    set.abort_all();
                    return Err(LoadError::Config(format!("a connection task failed: {e}")));
                }
                None => break,
            },
            _ = tick.tick() => {
                let mut h = metrics::histogram();
                for m in &sh.live {
                    let mut m = m.lock().unwrap_or_else(|e| e.into_inner());
                    let _ = h.add(&*m);
                    m.reset();
                }
                let secs = last_tick.elapsed().as_secs_f64();
                last_tick = Instant::now();
                live(&Interval {
                    elapsed_s: sh.t0.elapsed().as_secs_f64(),
                    warmup: Instant::now() < sh.measure_start,
                    rps: h.len() as f64 / secs.max(1e-9),
                    p50_ms: h.value_at_quantile(0.5) as f64 / 1e6,
                    p99_ms: h.value_at_quantile(0.99) as f64 / 1e6,
                    failures: sh.failures.load(Ordering::Relaxed),
                    problems: sh.problems.load(Ordering::Relaxed),
                    target: sh.targets.current_addr(),
                });
            }
        }
    }
    Ok(report(&sh, results))
}

fn report(sh: &Shared, results: Vec<ConnResult>) -> LoadReport {
    let o = &sh.opts;
    let mut all = Stats::new();
    let mut verify = VerifyReport::default();
    let mut bank_start = Some(0u64);
    let mut bank_end = 0u64;
    for r in &results {
        all.merge(&r.stats);
        verify.checked += r.checked;
        verify.sweeps += r.sweeps;
        for p in &r.problems {
            verify.add(p.clone());
        }
        if let Some((start, end)) = r.bank {
            bank_start = bank_start.zip(start).map(|(a, b)| a + b);
            bank_end += end;
        }
    }
    if o.verify && o.workload == LoadWorkload::Bank {
        verify.bank_total_start = bank_start;
        verify.bank_total_end = Some(bank_end);
        if let Some(start) = bank_start.filter(|s| *s != bank_end) {
            verify.add(Problem {
                kind: ProblemKind::Conservation,
                detail: format!(
                    "the total balance of accounts 0..{} was {start} at the start and is {bank_end} at the end",
                    o.accounts
                ),
            });
        }
    }
    let interrupted = sh.stop.load(Ordering::Relaxed);
    let stopped = sh.t0 + Duration::from_nanos(sh.stopped_ns.load(Ordering::Relaxed));
    let measured_end = stopped.min(sh.end);
    let duration_s = measured_end
        .saturating_duration_since(sh.measure_start)
        .as_secs_f64();
    let share = |n: u64| {
        if all.requests == 0 {
            0.0
        } else {
            n as f64 / all.requests as f64
        }
    };
    LoadReport {
        workload: o.workload,
        targets: o.targets.clone(),
        connections: o.connections,
        rate: o.rate,
        mix: o.mix.to_string(),
        duration_s,
        warmup_s: o.warmup.as_secs_f64(),
        requests: all.requests,
        responses: all.responses,
        throughput_rps: if duration_s > 0.0 {
            all.responses as f64 / duration_s
        } else {
            0.0
        },
        latency: all.latency(),
        good_ms: o.good.as_secs_f64() * 1e3,
        tolerable_ms: o.tolerable.as_secs_f64() * 1e3,
        good_share: share(all.good),
        tolerable_share: share(all.tolerable),
        errors: all.errors.clone(),
        ops: all.ops.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        failovers: sh.targets.failovers(),
        reconnects: sh.targets.reconnects(),
        longest_gap_ms: sh.targets.longest_gap_ms(),
        verify: o.verify.then_some(verify),
        interrupted,
    }
}

/// What one connection carries through its run.
struct ConnCtx {
    sh: Arc<Shared>,
    c: usize,
    conn: Conn,
    enc: Encoded,
    problems: Vec<Problem>,
    checked: u64,
    sweeps: u64,
}

impl ConnCtx {
    fn note_problems(&mut self, before: usize) {
        let new = self.problems.len() - before;
        if new > 0 {
            let total = self.sh.problems.fetch_add(new as u64, Ordering::Relaxed) + new as u64;
            for p in &self.problems[before..] {
                if total <= 20 {
                    tracing::error!(connection = self.c, "verify: {p}");
                }
            }
        }
    }

    async fn reconnect(&mut self) -> Result<(), LoadError> {
        let failed = (self.conn.target, self.conn.gen);
        self.conn = self.sh.targets.connect(Some(failed)).await?;
        Ok(())
    }

    fn protocol(&self, detail: String) -> LoadError {
        LoadError::Protocol {
            target: self.sh.targets.addrs()[self.conn.target].clone(),
            detail,
        }
    }

    /// Re-reads every key of the connection and checks it.
    async fn sweep(&mut self, work: &mut Work) -> Result<(), LoadError> {
        let timeout = self.sh.opts.request_timeout;
        'again: loop {
            for o in work.sweep() {
                work.encode(&o, &mut self.enc);
                let gen = self.conn.gen;
                match self.conn.call(&self.enc, timeout).await {
                    Ok((st, body)) => {
                        self.sh.targets.success(gen);
                        let before = self.problems.len();
                        work.check(&o, st, body, true, &mut self.problems);
                        self.checked += 1;
                        self.note_problems(before);
                    }
                    Err(CallError::Lost(e)) => {
                        tracing::debug!(connection = self.c, error = %e, "connection lost during a sweep");
                        self.reconnect().await?;
                        continue 'again;
                    }
                    Err(CallError::Protocol(e)) => return Err(self.protocol(e)),
                }
            }
            work.swept();
            self.sweeps += 1;
            return Ok(());
        }
    }
}

async fn conn_task(sh: Arc<Shared>, c: u32, mut work: Work) -> Result<ConnResult, LoadError> {
    let o = sh.opts.clone();
    let mut rng = Rng::new(o.seed ^ u64::from(c + 1).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut stats = Stats::new();
    let conn = sh.targets.connect(None).await?;
    let mut cx = ConnCtx {
        sh: Arc::clone(&sh),
        c: c as usize,
        conn,
        enc: Encoded::default(),
        problems: Vec::new(),
        checked: 0,
        sweeps: 0,
    };
    if o.verify && work.needs_baseline() {
        cx.sweep(&mut work).await?;
    }
    let per =
        (o.rate > 0).then(|| Duration::from_secs_f64(f64::from(o.connections) / o.rate as f64));
    let mut next = sh.t0
        + if o.rate > 0 {
            Duration::from_secs_f64(f64::from(c) / o.rate as f64)
        } else {
            Duration::ZERO
        };
    loop {
        if sh.stop.load(Ordering::Relaxed) {
            break;
        }
        let intended = match per {
            Some(p) => {
                if next >= sh.end {
                    break;
                }
                // tokio's timer ticks in whole milliseconds: sleeping for
                // less would send late and charge the timer's lag to the
                // service. Send up to one tick early instead; latency then
                // counts from the earlier of the intended and the actual send.
                if next > Instant::now() + TIMER_TICK {
                    tokio::time::sleep_until((next - TIMER_TICK).into()).await;
                }
                let t = next;
                next += p;
                t
            }
            None => {
                let now = Instant::now();
                if now >= sh.end {
                    break;
                }
                now
            }
        };
        let op = work.next_op(&mut rng);
        work.encode(&op, &mut cx.enc);
        let measured = intended >= sh.measure_start;
        let sent = Instant::now();
        let gen = cx.conn.gen;
        match cx.conn.call(&cx.enc, o.request_timeout).await {
            Ok((st, body)) => {
                let latency = intended.min(sent).elapsed();
                sh.targets.success(gen);
                let before = cx.problems.len();
                work.check(&op, st, body, o.verify, &mut cx.problems);
                cx.note_problems(before);
                if o.verify {
                    cx.checked += 1;
                }
                if let Ok(mut h) = sh.live[c as usize].lock() {
                    h.saturating_record((latency.as_nanos() as u64).max(1));
                }
                if measured {
                    stats.response(op_name(&op), latency, o.good, o.tolerable);
                    if st != crate::proto::status::OK {
                        stats.error(status_name(st));
                    }
                }
            }
            Err(CallError::Lost(e)) => {
                sh.failures.fetch_add(1, Ordering::Relaxed);
                if measured {
                    stats.failure("connection_lost");
                }
                tracing::debug!(connection = c, error = %e, "connection lost");
                work.lost(&op);
                cx.reconnect().await?;
                if o.verify {
                    cx.sweep(&mut work).await?;
                }
            }
            Err(CallError::Protocol(e)) => return Err(cx.protocol(e)),
        }
    }
    sh.stopped_ns
        .fetch_max(sh.t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
    if o.verify {
        cx.sweep(&mut work).await?;
    }
    let bank = match &work {
        Work::Bank(m) if o.verify => Some((m.initial_total(), m.total())),
        _ => None,
    };
    Ok(ConnResult {
        stats,
        problems: cx.problems,
        checked: cx.checked,
        sweeps: cx.sweeps,
        bank,
    })
}

/// The human summary of a report.
pub fn render_summary(r: &LoadReport) -> String {
    let mut s = String::new();
    let pct = |x: f64| x * 100.0;
    let _ = writeln!(
        s,
        "{} load on {} ({} connection{}, {}, mix {}): {:.1} s measured",
        match r.workload {
            LoadWorkload::Kv => "kv",
            LoadWorkload::Bank => "bank",
        },
        r.targets.join(", "),
        r.connections,
        if r.connections == 1 { "" } else { "s" },
        if r.rate == 0 {
            "closed loop".to_string()
        } else {
            format!("open loop at {} req/s", r.rate)
        },
        r.mix,
        r.duration_s
    );
    let _ = writeln!(
        s,
        "  throughput  {:.0} req/s ({} responses to {} requests)",
        r.throughput_rps, r.responses, r.requests
    );
    let l = &r.latency;
    let _ = writeln!(
        s,
        "  latency     p50 {:.3} ms  p99 {:.3} ms  p99.9 {:.3} ms  max {:.3} ms  mean {:.3} ms",
        l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.mean_ms
    );
    let _ = writeln!(
        s,
        "  good        {:.2} % within {} ms, tolerable {:.2} % within {} ms",
        pct(r.good_share),
        r.good_ms,
        pct(r.tolerable_share),
        r.tolerable_ms
    );
    if !r.errors.is_empty() {
        let e: Vec<String> = r.errors.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let _ = writeln!(s, "  non-OK      {}", e.join(", "));
    }
    if !r.failovers.is_empty() || r.reconnects > 0 {
        let _ = writeln!(
            s,
            "  reconnects  {}; longest time without a response {:.1} ms",
            r.reconnects, r.longest_gap_ms
        );
    }
    for f in &r.failovers {
        let _ = writeln!(
            s,
            "  failover    at {:.2} s from {} to {}: gap {}{}",
            f.at_s,
            f.from,
            f.to,
            f.gap_ms
                .map_or("(no response after it)".to_string(), |g| format!(
                    "{g:.1} ms"
                )),
            if f.moves > 1 {
                format!(" ({} moves along the target list)", f.moves)
            } else {
                String::new()
            }
        );
    }
    if let Some(v) = &r.verify {
        let n = v.problem_count();
        if n == 0 {
            let _ = writeln!(
                s,
                "  verify      OK: {} responses checked, {} sweeps, no lost or wrong data",
                v.checked, v.sweeps
            );
        } else {
            let kinds: Vec<String> = v
                .problems_by_kind
                .iter()
                .map(|(k, c)| format!("{c} {k}"))
                .collect();
            let _ = writeln!(
                s,
                "  verify      FAILED: {} ({} responses checked, {} sweeps)",
                kinds.join(", "),
                v.checked,
                v.sweeps
            );
            for p in v.problems.iter().take(20) {
                let _ = writeln!(s, "    {p}");
            }
            if n > 20 {
                let _ = writeln!(s, "    ... {} more (all in --json)", n - 20);
            }
        }
        if let (Some(a), Some(b)) = (v.bank_total_start, v.bank_total_end) {
            let _ = writeln!(s, "  bank total  {a} at the start, {b} at the end");
        }
    }
    if r.interrupted {
        let _ = writeln!(s, "  (interrupted before the end)");
    }
    s
}

#[cfg(test)]
mod tests;
