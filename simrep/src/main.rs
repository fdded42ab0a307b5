//! The `simrep` command.
//!
//! Exit codes are listed in `--help` ([`EXIT_HELP`]).

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use simrep::compress::CodecSpec;
use simrep::load::parse::{parse_duration, Mix, SizeRange};
use simrep::load::{LoadError, LoadOptions, LoadWorkload};
use simrep::trace::analysis::{self, AnalysisError, AnalyzeOptions, CodecChoice};
use simrep::trace::capture::{self, CaptureError, CaptureOptions};
use simrep::trace::replay::Replay;
use simrep::vmm::checkpoint::{self, CheckpointError, CheckpointOptions, Checkpointer};
use simrep::vmm::run::{parse_size, ChurnOptions, DiskOptions, Fault, Workload};
use simrep::vmm::state::StateError;
use simrep::vmm::{vm::VmError, RunOptions, VmmError};

const EXIT_HELP: &str = "\
Exit codes:
  0    success (also after Ctrl-C stopped a guest cleanly)
  1    internal error
  2    bad usage or configuration (unknown flag, bad value)
  3    bad or unreadable input (missing file, malformed trace or
       checkpoint, unusable --disk image)
  4    the guest misbehaved (exception, triple fault, unknown MMIO, no
       progress) or a codec decoded a page wrongly
  5    the capture target could not be traced (no such process, no permission)
  6    output could not be written
  7    no usable KVM (/dev/kvm missing or not accessible)
  8    `simrep load --verify` found lost or wrong data
  9    `simrep load` could not reach any target; `simrep status`: nothing
       answers at --addr
  10   `simrep load`: a target broke the protocol (malformed response);
       `simrep status`: the answer is not a simrep status
  130  capture interrupted (Ctrl-C); the epochs captured so far form a valid trace

Logging: RUST_LOG (e.g. RUST_LOG=simrep=debug) or -v / -q.";

/// simrep: high-availability VMs with similarity-compressed replication.
#[derive(Parser)]
#[command(name = "simrep", version, about, after_help = EXIT_HELP)]
struct Cli {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bundled guest alone, without replication (the native
    /// baseline). Guest console lines are logged; Ctrl-C stops it.
    Run(RunArgs),
    /// Continue a guest from a checkpoint written by `simrep run
    /// --checkpoint-dir` (the newest one in DIR, or DIR itself if it is a
    /// checkpoint). Needs no guest flags: they are in the checkpoint.
    Restore(RestoreArgs),
    /// Memory traces of real processes: capture.
    #[command(subcommand)]
    Trace(TraceCommand),
    /// Replay a memory trace through every codec side by side: bytes sent,
    /// speed, reference memory, a decode check of every page, and the
    /// paper's Fig. 1 (similarity of dirty areas by area size).
    #[command(after_help = CODEC_HELP)]
    Analyze(AnalyzeArgs),
    // --- simrep load (begin) ---
    /// Drive the guest's kv or bank service over TCP: throughput, latency
    /// percentiles, good/tolerable shares; --verify checks every response
    /// against a model of what was written; several --target fail over.
    #[command(after_help = LOAD_HELP)]
    Load(Box<LoadArgs>),
    /// (testing only) A reference kv/bank server for tests of `simrep load`.
    #[command(hide = true)]
    LoadTestserver(TestServerArgs),
    // --- simrep load (end) ---
    // --- simrep status (begin) ---
    /// Show a running primary's or backup's role, epoch, lag, link and
    /// protection state, queried from its metrics endpoint (`--metrics ADDR`
    /// of `simrep primary` / `simrep backup`).
    #[command(after_help = STATUS_HELP)]
    Status(StatusArgs),
    // --- simrep status (end) ---
    /// Run the bundled guest protected by a backup (`simrep backup` on
    /// another host): every epoch the guest is paused briefly, its dirty
    /// memory is encoded with the similarity codec and sent, and each
    /// response reaches its client only after the backup committed the
    /// epoch that produced it. Takes every guest flag of `simrep run`.
    #[command(after_help = PRIMARY_HELP)]
    Primary(Box<PrimaryArgs>),
    /// Hold the primary's last committed checkpoint and resume the guest
    /// from it when the primary is lost (its service then answers on
    /// --service-port).
    #[command(after_help = BACKUP_HELP)]
    Backup(BackupArgs),
}

const CODEC_HELP: &str = "\
Codec specs (--codec, repeatable). Without --codec: the default similarity
codec, the paper's plain codec (80 % and median thresholds), XBZRLE with the
default codec's memory budget, zstd level 1 per epoch, lz4 per page, raw.
  similarity[:key=value,...]   preset=fast|small|paper (fast: the default),
                               area=64..2048, hash=median|fraction80,
                               table=auto|BITS, bucket=N, depth=N,
                               cache=auto|PAGES|SIZE, stage=lz4|zstd|none,
                               fp=on|off (block fingerprints), chunk=N,
                               search=full|plain
  xbzrle[:cache=64MiB]         same-address XOR with a bounded cache
                               (no cache=: the default codec's budget)
  zstd[:level=1]               zstd over the whole epoch
  lz4                          lz4 per page
  raw                          pages verbatim";

#[derive(Subcommand)]
enum TraceCommand {
    /// Record a running process's memory, epoch by epoch: stop it (SIGSTOP),
    /// read every writable mapping (process_vm_readv), write the pages that
    /// changed, resume it (SIGCONT), let it run for one epoch, repeat. The
    /// target is always resumed, on Ctrl-C and on errors too.
    Capture(CaptureArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Workload: churn (dirty memory at a rate), selftest (checks, then a
    /// deliberate fault), random (incompressible writes, with churn's
    /// --rate, --buffer, --seconds and --report-ms), disk (block device
    /// test; needs --disk), touch (logged page writes for dirty-tracking
    /// tests), kv (key-value service on --port) or bank (banking service on
    /// --port).
    #[arg(long, default_value = "churn")]
    workload: Workload,
    /// Guest RAM (a multiple of 2 MiB, at least 8M): 256M, 1G, ...
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    mem: u64,
    /// Number of vCPUs (1..=32).
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// churn: dirty rate in MiB/s over all vCPUs (0 = as fast as possible).
    #[arg(long, default_value_t = 100)]
    rate: u32,
    /// churn: share of each rewritten page that keeps its content, in %.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    similarity: u32,
    /// churn: bytes of guest memory to churn (default: all of the heap).
    #[arg(long, value_parser = parse_size)]
    buffer: Option<u64>,
    /// churn: interval between progress lines in ms (0: none).
    #[arg(long, default_value_t = 1000)]
    report_ms: u32,
    /// churn: stop after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    seconds: u32,
    /// selftest: deliberate fault: none, pf, ud, gp, de or mmio.
    #[arg(long, default_value = "pf")]
    fault: Fault,
    /// Periodic LAPIC timer in Hz, handled by the guest's CPL0 stub (0: off).
    #[arg(long, default_value_t = 0)]
    timer_hz: u32,
    /// Stop with an error when the guest makes no progress for this many
    /// seconds (churn only; 0: off).
    #[arg(long, default_value_t = 0)]
    watchdog: u64,
    /// Disk image for the guest's block device: an existing file whose size
    /// is a multiple of 512 bytes (create one with `truncate -s 64M FILE`).
    /// Guest writes are buffered and reach the file on the guest's FLUSH
    /// (then synced) and at the end of the run. Without it the device has
    /// capacity 0.
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
    /// disk: sectors of test pattern to write, flush and verify.
    #[arg(long, default_value_t = 1024)]
    disk_pattern_sectors: u32,
    /// disk: log records to append (after replaying those already there).
    #[arg(long, default_value_t = 64)]
    disk_log_records: u32,
    /// disk: bytes to move per request size (4 KiB, 64 KiB) in the
    /// throughput measurement (0: skip it): 16M, 64M, ...
    #[arg(long, default_value = "0", value_parser = parse_size)]
    disk_bench: u64,
    /// disk: single-sector requests to time (0: skip).
    #[arg(long, default_value_t = 0)]
    disk_bench_requests: u32,
    /// kv, bank: TCP port of the service (0: an ephemeral port; the log
    /// says which).
    #[arg(long, default_value_t = 7000)]
    port: u16,
    /// kv, bank: address the service listens on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: std::net::IpAddr,
    /// kv: guest memory for keys and values (default: all of the heap the
    /// network rings leave).
    #[arg(long, value_parser = parse_size)]
    kv_mem: Option<u64>,
    /// bank: number of accounts.
    #[arg(long, default_value_t = 10_000)]
    accounts: u32,
    /// bank: history records kept per account.
    #[arg(long, default_value_t = 32)]
    history: u32,
    /// Write checkpoints into this directory: on SIGUSR1, and periodically
    /// with --checkpoint-every. `simrep restore DIR` continues the guest.
    /// With --disk the disk image is part of each checkpoint (disk.raw).
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// With --checkpoint-dir: also write a checkpoint this often (500ms,
    /// 10s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, requires = "checkpoint_dir")]
    checkpoint_every: Option<std::time::Duration>,
}

#[derive(Debug, clap::Args)]
struct RestoreArgs {
    /// The checkpoint directory (as given to --checkpoint-dir), or one
    /// checkpoint inside it.
    dir: PathBuf,
    /// Stop with an error when the guest makes no progress for this many
    /// seconds (0: off).
    #[arg(long, default_value_t = 0)]
    watchdog: u64,
    /// Write further checkpoints into this directory (may be the one
    /// restored from): on SIGUSR1, and periodically with --checkpoint-every.
    #[arg(long, value_name = "DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// With --checkpoint-dir: also write a checkpoint this often.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration, requires = "checkpoint_dir")]
    checkpoint_every: Option<std::time::Duration>,
    /// kv, bank: TCP port of the restored service (0: an ephemeral port;
    /// the log says which).
    #[arg(long, default_value_t = 7000)]
    port: u16,
    /// kv, bank: address the restored service listens on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: std::net::IpAddr,
    /// A checkpoint with a disk image: a new file (it must not exist) that
    /// receives a copy of the checkpoint's disk.raw and becomes the
    /// restored guest's disk. The checkpoint itself is never modified.
    #[arg(long, value_name = "FILE")]
    disk: Option<PathBuf>,
}

/// A duration as `simrep load` parses them (`500ms`, `10s`, `5m`, plain
/// seconds) that must be positive.
fn parse_positive_duration(s: &str) -> Result<std::time::Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("duration `{s}` must be positive")),
        d => Ok(d),
    }
}

#[derive(clap::Args)]
struct CaptureArgs {
    /// Process to trace.
    #[arg(long)]
    pid: u32,
    /// Also trace the process's descendants (children, grandchildren...).
    #[arg(long)]
    tree: bool,
    /// Run time of the target between two stops, in milliseconds.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    epoch_ms: u32,
    /// Number of delta epochs to record after the initial full image
    /// (Ctrl-C ends the capture early, with a valid trace).
    #[arg(long, default_value_t = 20)]
    epochs: u32,
    /// zstd level of the trace body (0: no compression).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(0..=22))]
    zstd_level: i32,
    /// Description stored in the trace (what was traced, under which load).
    #[arg(long)]
    description: Option<String>,
    /// Output file.
    #[arg(short, long)]
    output: PathBuf,
}

#[derive(clap::Args)]
struct AnalyzeArgs {
    /// The memory trace (see shared/memtrace/FORMAT.md).
    trace: PathBuf,
    /// Codecs to compare (repeatable); see below. Without it, the default set.
    #[arg(long = "codec", value_name = "SPEC")]
    codecs: Vec<CodecSpec>,
    /// Write the full report as JSON (one record per codec).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw plots (SVG) into this directory.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Skip the Fig. 1 similarity analysis.
    #[arg(long)]
    no_fig1: bool,
    /// Replay at most this many delta epochs.
    #[arg(long)]
    epochs: Option<u32>,
}

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let code = classify(&error);
        Failure { code, error }
    }
}

fn classify(error: &anyhow::Error) -> u8 {
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<VmmError>() {
            return match e {
                VmmError::Vm(
                    VmError::NoKvm(_)
                    | VmError::NoPermission(_)
                    | VmError::OpenKvm(_)
                    | VmError::NotKvm { .. },
                ) => 7,
                VmmError::Vcpu(_) | VmmError::GuestFailed { .. } | VmmError::NoProgress { .. } => 4,
                VmmError::Config(_) => 2,
                VmmError::Disk(
                    simrep::vmm::block::BlockError::Open { .. }
                    | simrep::vmm::block::BlockError::NotAFile { .. }
                    | simrep::vmm::block::BlockError::BadSize { .. },
                ) => 3,
                VmmError::Net(simrep::vmm::net::NetError::Listen { .. }) => 2,
                VmmError::Checkpoint(
                    CheckpointError::State {
                        source: StateError::Vm(v),
                        ..
                    }
                    | CheckpointError::Vm(StateError::Vm(v)),
                )
                | VmmError::State(StateError::Vm(v))
                    if matches!(
                        v,
                        VmError::NoKvm(_)
                            | VmError::NoPermission(_)
                            | VmError::OpenKvm(_)
                            | VmError::NotKvm { .. }
                    ) =>
                {
                    7
                }
                VmmError::Checkpoint(c) if c.is_bad_input() => 3,
                VmmError::State(s) if s.is_bad_input() => 3,
                VmmError::Checkpoint(CheckpointError::Write { .. }) => 6,
                VmmError::Checkpoint(CheckpointError::DiskChoice { .. }) => 2,
                _ => 1,
            };
        }
        if let Some(e) = cause.downcast_ref::<AnalysisError>() {
            return match e {
                AnalysisError::Mismatch { .. }
                | AnalysisError::Decode { .. }
                | AnalysisError::Encode { .. } => 4,
                AnalysisError::ReadTrace(_) | AnalysisError::EmptyTrace => 3,
                AnalysisError::Plot { .. } | AnalysisError::CreateDir { .. } => 6,
            };
        }
        if let Some(e) = cause.downcast_ref::<CaptureError>() {
            return match e {
                CaptureError::InvalidOptions { .. } => 2,
                CaptureError::WriteTrace { .. } => 6,
                _ => 5,
            };
        }
        if cause.downcast_ref::<simrep::trace::TraceError>().is_some() {
            return 3;
        }
        if let Some(e) = cause.downcast_ref::<LoadError>() {
            return match e {
                LoadError::Config(_) => 2,
                LoadError::NoTarget(_) => 9,
                LoadError::Protocol { .. } => 10,
                LoadError::Runtime(_) => 1,
            };
        }
        if cause.downcast_ref::<UsageError>().is_some() {
            return 2;
        }
        if cause.downcast_ref::<OutputError>().is_some() {
            return 6;
        }
    }
    1
}

/// Writing an output file failed.
#[derive(Debug, thiserror::Error)]
#[error("writing {0}")]
struct OutputError(PathBuf, #[source] std::io::Error);

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    init_logging(cli.verbose, cli.quiet);
    let result = match cli.command {
        Command::Run(args) => cmd_run(args),
        Command::Restore(args) => cmd_restore(args),
        Command::Trace(TraceCommand::Capture(args)) => cmd_capture(args),
        Command::Analyze(args) => cmd_analyze(args),
        Command::Load(args) => cmd_load(*args, cli.quiet),
        Command::LoadTestserver(args) => cmd_load_testserver(args),
        Command::Status(args) => cmd_status(args),
        Command::Primary(args) => cmd_primary(*args, &matches),
        Command::Backup(args) => cmd_backup(args),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn progress_bar(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {percent:>3}% {elapsed} (eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn cmd_analyze(args: AnalyzeArgs) -> Result<ExitCode, Failure> {
    let replay = Replay::open(&args.trace).map_err(AnalysisError::from)?;
    let file_len = std::fs::metadata(&args.trace).map_or(0, |m| m.len());
    let opts = AnalyzeOptions {
        codecs: args
            .codecs
            .iter()
            .enumerate()
            .map(|(i, spec)| CodecChoice {
                spec: spec.clone(),
                default: i == 0,
            })
            .collect(),
        fig1_sizes: if args.no_fig1 {
            Vec::new()
        } else {
            analysis::FIG1_AREA_SIZES.to_vec()
        },
        max_epochs: args.epochs,
    };
    let bar = progress_bar(file_len, "replaying");
    let report = analysis::analyze(replay, &opts, &mut |p| bar.set_position(p.bytes_read))
        .with_context(|| format!("analysing {}", args.trace.display()))?;
    bar.finish_and_clear();
    print!("{}", analysis::render_table(&report));
    if let Some(path) = &args.json {
        write_json(path, &report)?;
        tracing::info!(path = %path.display(), "JSON report written");
    }
    if let Some(dir) = &args.plot {
        for p in analysis::plot(&report, dir)? {
            tracing::info!(path = %p.display(), "plot written");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), Failure> {
    let write = || -> std::io::Result<()> {
        let mut f = BufWriter::new(File::create(path)?);
        serde_json::to_writer_pretty(&mut f, value)?;
        f.write_all(b"\n")?;
        f.flush()
    };
    write().map_err(|e| OutputError(path.to_owned(), e))?;
    Ok(())
}

/// A flag set by SIGINT (Ctrl-C) and SIGTERM.
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing the Ctrl-C handler")?;
    }
    Ok(stop)
}

/// The log line of a guest that stopped.
fn log_stopped(s: &simrep::vmm::run::RunSummary) {
    tracing::info!(
        elapsed = ?s.elapsed,
        progress = ?s.progress,
        outcomes = ?s.outcomes,
        interrupted = s.interrupted,
        "guest stopped"
    );
}

fn cmd_capture(args: CaptureArgs) -> Result<ExitCode, Failure> {
    let stop = stop_flag()?;
    let out = File::create(&args.output).map_err(|e| OutputError(args.output.clone(), e))?;
    let opts = CaptureOptions {
        tree: args.tree,
        epoch_ms: args.epoch_ms,
        // Epoch 0 (the full image) plus the delta epochs asked for.
        epochs: Some(args.epochs.saturating_add(1)),
        zstd_level: (args.zstd_level > 0).then_some(args.zstd_level),
        description: args.description,
        ..CaptureOptions::new(args.pid)
    };
    let bar = progress_bar(u64::from(args.epochs) + 1, "capturing");
    let summary = capture::capture(&opts, BufWriter::new(out), &stop, &mut |e| {
        bar.inc(1);
        tracing::debug!(
            epoch = e.epoch,
            tracked = e.tracked_pages,
            dirty = e.dirty,
            dropped = e.dropped,
            stop_ms = e.stop_ns as f64 / 1e6,
            "epoch captured"
        );
    })
    .with_context(|| format!("capturing pid {} into {}", args.pid, args.output.display()))?;
    bar.finish_and_clear();
    println!(
        "{} epochs ({} pages in the initial image, {} dirty pages after it) written to {}; \
         longest stop {:.1} ms, ended: {:?}",
        summary.epochs,
        summary.initial_pages,
        summary.dirty_pages,
        args.output.display(),
        summary.max_stop_ns as f64 / 1e6,
        summary.end,
    );
    if stop.load(Ordering::Relaxed) {
        eprintln!("interrupted: the trace holds the epochs captured so far");
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

fn cmd_run(a: RunArgs) -> Result<ExitCode, Failure> {
    let stop = stop_flag()?;
    let opts = run_options(&a);
    let mut checkpointer = checkpointer(a.checkpoint_dir, a.checkpoint_every)?;
    let s = checkpoint::run_with_checkpoints(&opts, &stop, checkpointer.as_mut())?;
    log_stopped(&s);
    Ok(ExitCode::SUCCESS)
}

/// The guest options of `simrep run` (and `simrep primary`).
fn run_options(a: &RunArgs) -> RunOptions {
    RunOptions {
        workload: a.workload,
        mem_bytes: a.mem,
        vcpus: a.vcpus,
        churn: ChurnOptions {
            rate_mib_s: a.rate,
            similarity_pct: a.similarity,
            buffer_bytes: a.buffer,
            report_ms: a.report_ms,
            seconds: a.seconds,
        },
        fault: a.fault,
        timer_hz: a.timer_hz,
        watchdog: (a.watchdog > 0).then(|| std::time::Duration::from_secs(a.watchdog)),
        disk: a.disk.clone(),
        disk_test: DiskOptions {
            pattern_sectors: a.disk_pattern_sectors,
            log_records: a.disk_log_records,
            bench_bytes: a.disk_bench,
            bench_requests: a.disk_bench_requests,
            ..Default::default()
        },
        port: a.port,
        bind: a.bind,
        kv_data_bytes: a.kv_mem,
        bank_accounts: a.accounts,
        bank_history: a.history,
        ..Default::default()
    }
}

/// A checkpointer for `--checkpoint-dir`, asked for a checkpoint by
/// SIGUSR1.
fn checkpointer(
    dir: Option<PathBuf>,
    every: Option<std::time::Duration>,
) -> Result<Option<Checkpointer>, Failure> {
    let Some(dir) = dir else {
        return Ok(None);
    };
    let request = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&request))
        .context("installing the SIGUSR1 handler")?;
    let c = Checkpointer::new(CheckpointOptions { dir, every }, request).map_err(VmmError::from)?;
    Ok(Some(c))
}

fn cmd_restore(a: RestoreArgs) -> Result<ExitCode, Failure> {
    let stop = stop_flag()?;
    let mut checkpointer = checkpointer(a.checkpoint_dir, a.checkpoint_every)?;
    let ropts = checkpoint::RestoreOptions {
        watchdog: (a.watchdog > 0).then(|| std::time::Duration::from_secs(a.watchdog)),
        listen: Some(std::net::SocketAddr::new(a.bind, a.port)),
        disk: a.disk,
    };
    let s = checkpoint::restore_and_run(&a.dir, &ropts, &stop, checkpointer.as_mut())
        .with_context(|| format!("restoring from {}", a.dir.display()))?;
    log_stopped(&s);
    Ok(ExitCode::SUCCESS)
}

// --- simrep load (begin) ---

const LOAD_HELP: &str = "\
Operation mixes (--mix, weights): kv get=80,put=15,del=3,scan=2 (default);
bank transfer=50,balance=40,history=10 (default).

Latency: from the send time (closed loop) or from the intended send time
(--rate N: open loop), so a stall counts for every request it delays. Good
and tolerable: answered within --good-ms (10) / --tolerable-ms (50); SPECweb
uses 2 s and 4 s for whole web pages, far too lax for a sub-ms service.

--verify: keys (accounts) are split between connections so each is touched
by one connection at a time; kv keys live in a fresh namespace per run.
Every response is checked; a write whose response was lost may or may not
have happened until a read settles it. After every reconnection and at the
end each connection re-reads all its keys. Lost acknowledged writes, wrong
values, unexpected keys, a changed bank total: exit code 8.

Several --target: on a lost or refused connection the client moves to the
next target (in order, wrapping), retrying until --failover-timeout; the
summary gives each failover's gap (time without any response).";

#[derive(clap::Args)]
struct LoadArgs {
    /// Service address HOST:PORT; repeat for failover targets (in order).
    #[arg(long = "target", value_name = "HOST:PORT", required = true)]
    targets: Vec<String>,
    /// Service: kv or bank.
    #[arg(long, default_value = "kv")]
    workload: LoadWorkload,
    /// Concurrent connections, each with one request in flight.
    #[arg(long, default_value_t = 8)]
    connections: u32,
    /// Measured time (500ms, 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    duration: std::time::Duration,
    /// Unmeasured time before the measurement.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: std::time::Duration,
    /// Requests per second over all connections (open loop); 0: closed
    /// loop, as fast as the service answers.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Check every response against a model of all writes; re-read
    /// everything at the end and after each failover.
    #[arg(long)]
    verify: bool,
    /// kv: number of keys (split between connections).
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// kv: PUT value size in bytes, fixed or a range (128, 64-4096, 1K-64K;
    /// at most 64K).
    #[arg(long, default_value = "128")]
    value_size: SizeRange,
    /// Operation weights (see below); default depends on the workload.
    #[arg(long)]
    mix: Option<String>,
    /// kv: most entries per SCAN (1..=1024).
    #[arg(long, default_value_t = 16)]
    scan_len: u32,
    /// bank: accounts 0..N used (split between connections; at most the
    /// service's number of accounts).
    #[arg(long, default_value_t = 1000)]
    accounts: u32,
    /// bank: largest transfer in cents.
    #[arg(long, default_value_t = 1000)]
    max_amount: u64,
    /// A response within this many ms is good.
    #[arg(long, default_value_t = simrep::load::DEFAULT_GOOD_MS)]
    good_ms: f64,
    /// A response within this many ms is tolerable.
    #[arg(long, default_value_t = simrep::load::DEFAULT_TOLERABLE_MS)]
    tolerable_ms: f64,
    /// A request without response for this long counts as lost (the
    /// connection is dropped).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    request_timeout: std::time::Duration,
    /// Limit of one connection attempt.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    connect_timeout: std::time::Duration,
    /// Give up (exit 9) when no target accepts a connection for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    failover_timeout: std::time::Duration,
    /// Seed of the operation sequence (0: from the clock).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Client worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Write every figure as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct TestServerArgs {
    /// Address to listen on (port 0: any; the address is printed on stdout).
    #[arg(long)]
    listen: String,
    /// Service: kv or bank.
    #[arg(long, default_value = "kv")]
    workload: LoadWorkload,
    /// bank: number of accounts.
    #[arg(long, default_value_t = 1000)]
    accounts: u32,
    /// Acknowledge but drop writes after this many.
    #[arg(long)]
    lose_writes_after: Option<u64>,
    /// Corrupt values read after this many reads.
    #[arg(long)]
    corrupt_reads_after: Option<u64>,
    /// Answer garbage after this many responses.
    #[arg(long)]
    garbage_after: Option<u64>,
}

fn cmd_load(a: LoadArgs, quiet: bool) -> Result<ExitCode, Failure> {
    let stop = stop_flag()?;
    let mut o = LoadOptions::new(a.targets, a.workload);
    if let Some(m) = &a.mix {
        let names: &[&'static str] = match a.workload {
            LoadWorkload::Kv => &simrep::load::model::KV_OPS,
            LoadWorkload::Bank => &simrep::load::model::BANK_OPS,
        };
        o.mix = Mix::parse(m, names).map_err(LoadError::Config)?;
    }
    let ms = |x: f64, what: &str| -> Result<std::time::Duration, LoadError> {
        std::time::Duration::try_from_secs_f64(x / 1e3)
            .map_err(|_| LoadError::Config(format!("bad {what} {x}")))
    };
    o.connections = a.connections;
    o.duration = a.duration;
    o.warmup = a.warmup;
    o.rate = a.rate;
    o.verify = a.verify;
    o.keys = a.keys;
    o.value_size = a.value_size;
    o.scan_len = a.scan_len;
    o.accounts = a.accounts;
    o.max_amount = a.max_amount;
    o.good = ms(a.good_ms, "--good-ms")?;
    o.tolerable = ms(a.tolerable_ms, "--tolerable-ms")?;
    o.request_timeout = a.request_timeout;
    o.connect_timeout = a.connect_timeout;
    o.failover_timeout = a.failover_timeout;
    o.seed = a.seed;
    o.threads = a.threads;
    let report = simrep::load::run(&o, stop, &mut |i| {
        if !quiet {
            eprintln!(
                "{:>6.1}s {}{:>9.0} req/s  p50 {:.3} ms  p99 {:.3} ms  failures {}  verify problems {}  target {}",
                i.elapsed_s,
                if i.warmup { "(warm-up) " } else { "" },
                i.rps,
                i.p50_ms,
                i.p99_ms,
                i.failures,
                i.problems,
                i.target
            );
        }
    })?;
    print!("{}", simrep::load::render_summary(&report));
    if let Some(path) = &a.json {
        write_json(path, &report)?;
    }
    match &report.verify {
        Some(v) if v.problem_count() > 0 => {
            eprintln!(
                "error: --verify found {} problems (lost or wrong data)",
                v.problem_count()
            );
            Ok(ExitCode::from(8))
        }
        _ => Ok(ExitCode::SUCCESS),
    }
}

fn cmd_load_testserver(a: TestServerArgs) -> Result<ExitCode, Failure> {
    use simrep::load::testserver::{self, Faults, Service, SharedState};
    let listener = std::net::TcpListener::bind(&a.listen)
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listening address")?;
    println!("listening on {addr}");
    std::io::stdout().flush().context("writing to stdout")?;
    let service = match a.workload {
        LoadWorkload::Kv => Service::Kv,
        LoadWorkload::Bank => Service::Bank,
    };
    let faults = Faults {
        lose_writes_after: a.lose_writes_after,
        corrupt_reads_after: a.corrupt_reads_after,
        garbage_after: a.garbage_after,
        stall: None,
    };
    testserver::serve_forever(listener, service, SharedState::new(a.accounts), faults)
        .context("serving")?;
    Ok(ExitCode::SUCCESS)
}
// --- simrep load (end) ---

// --- simrep status (begin) ---

const STATUS_HELP: &str = "\
Queries GET /status on the metrics endpoint of a running `simrep primary` or
`simrep backup` (the address given to its --metrics flag); /metrics on the
same address serves Prometheus text.

Exit codes: 0 the status was printed; 2 bad --addr; 9 nothing answers at the
address (no engine running there, or it runs without --metrics); 10 something
answered, but not with a valid simrep status.";

#[derive(clap::Args)]
struct StatusArgs {
    /// The engine's metrics address (its --metrics flag).
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:9700")]
    addr: String,
    /// Print the raw JSON status instead of text.
    #[arg(long)]
    json: bool,
    /// Give up after this long without an answer (500ms, 2s).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    timeout: std::time::Duration,
}

fn cmd_status(a: StatusArgs) -> Result<ExitCode, Failure> {
    use simrep::replication::observe::{self, ObserveError};
    use std::net::ToSocketAddrs;
    let addr = match a.addr.to_socket_addrs().map(|mut it| it.next()) {
        Ok(Some(addr)) => addr,
        Ok(None) => {
            eprintln!("error: --addr {}: no address", a.addr);
            return Ok(ExitCode::from(2));
        }
        Err(e) => {
            eprintln!("error: --addr {}: {e}", a.addr);
            return Ok(ExitCode::from(2));
        }
    };
    let status = observe::fetch(addr, "/status", a.timeout)
        .and_then(|body| observe::parse_status(addr, &body).map(|s| (s, body)));
    match status {
        Ok((status, body)) => {
            if a.json {
                print!("{body}");
                if !body.ends_with('\n') {
                    println!();
                }
            } else {
                print!("{}", observe::format_status(&status));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let code = match e {
                ObserveError::NoAnswer { .. } => 9,
                _ => 10,
            };
            eprintln!("error: {:#}", anyhow::Error::from(e));
            Ok(ExitCode::from(code))
        }
    }
}
// --- simrep status (end) ---

// --- simrep primary / backup (begin) ---

const PRIMARY_HELP: &str = "\
Example (the backup first, on another host or port):
  head -c 32 /dev/urandom > key
  simrep backup --listen 0.0.0.0:7100 --key-file key --service-port 7000
  sudo simrep primary --backup BACKUP:7100 --key-file key --workload kv --mem 512M --port 7000

A vm.toml given with --config holds guest flags by their long names
(workload = \"kv\", mem = \"512M\", vcpus = 2, port = 7000, disk = \"disk.raw\",
...); flags given on the command line win.

The guest starts at once, unprotected, and runs while the backup is
synchronised (a progress bar on a terminal). It is protected from the
first epoch the backup commits. If the backup is lost, the guest keeps
running unprotected (logs, `simrep status` and the metrics say so) and
the primary reconnects and synchronises it again when it returns. When
the link cannot keep up, epochs stretch: at most two epochs wait for the
link, then the next checkpoint waits.

Per-epoch stats (--stats FILE, JSON lines): pause and its parts, dirty
pages, raw and sent bytes and ratio, areas by encoding kind, encode time
and MB/s, send time, ack latency, held responses.

Exit codes as for `simrep run`; 2 also for a bad --backup, --key-file or
--config.";

const BACKUP_HELP: &str = "\
The backup decodes every epoch against its committed image, checks it
(record counts, the codec stream, page count, a 128-bit digest), writes
the epoch's disk writes to STATE_DIR/disk.raw, commits and acks. A
corrupted, truncated, replayed or unauthenticated stream, or a bad epoch,
is rejected and the committed checkpoint stays as it was.

Failover: when no record arrives from the primary for --link-timeout, or
its connection breaks without a goodbye, and it does not reconnect within
--grace, the backup restores the last committed checkpoint (memory, vCPUs,
devices, disk) into a fresh VM and serves on --service-port until Ctrl-C.
A primary that stops cleanly (Ctrl-C) says goodbye: no failover.";

#[derive(clap::Args)]
struct PrimaryArgs {
    /// The backup's replication address (its --listen).
    #[arg(long, value_name = "HOST:PORT")]
    backup: String,
    /// File holding the pre-shared key shared with the backup (at least
    /// 16 bytes; a trailing newline is ignored).
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// Epoch length in ms (a checkpoint is taken this often).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(5..=10_000))]
    epoch_ms: u64,
    /// Codec on the wire: similarity (the default), raw (codec off: plain
    /// asynchronous replication), lz4, zstd-1, xbzrle; see `simrep analyze
    /// --help` for parameters.
    #[arg(long, default_value = "similarity")]
    codec: CodecSpec,
    /// Encoder threads (2 or more: a pool whose threads are pinned one per
    /// CPU the process may use, round robin; 1: the epoch thread encodes).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Write one JSON line per epoch to FILE.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics and the status on
    /// /status (for `simrep status --addr ADDR`).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// The backup is lost after this long without a record from it.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    link_timeout: std::time::Duration,
    /// Write-fault prediction: pages dirty in each of the last K checkpoints
    /// stay writable (no write fault next epoch) and are sent every epoch;
    /// 0 turns it off. The default 2 is measured (README).
    #[arg(long, value_name = "K", default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=64))]
    predict: u32,
    /// With --predict: re-protect every hot page every N checkpoints, so
    /// pages the guest stopped writing cool down.
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    predict_recheck: u32,
    /// Do not pre-arm copy-on-write. By default, when the last epoch's
    /// dirty set was armed copy-on-write (too large to copy in the pause),
    /// the primary write-protects it again shortly before the next
    /// checkpoint, while the guest runs, so that the pause only protects
    /// what changed since (README: checkpoint pause). With this flag the
    /// whole arm happens in the pause, as a comparison.
    #[arg(long)]
    no_prearm: bool,
    /// Dirty sets of up to this many 4 KiB pages are copied while the guest
    /// is paused; larger ones get copy-on-write (the guest resumes at once
    /// and a page is copied on its first write). 0: always copy-on-write.
    #[arg(long, value_name = "PAGES", default_value_t = simrep::vmm::epoch::DEFAULT_COPY_LIMIT)]
    copy_limit: usize,
    /// Trace guest write faults and the VMM's copy-on-write faults with
    /// eBPF (needs root, bpffs, tracefs and the KVM tracepoints; without
    /// them the primary runs on and says what is missing): per-epoch fault
    /// counts and a cross-check with the dirty log in --stats, --metrics
    /// and `simrep status`. Costs pause time (the maps are read while the
    /// guest is paused).
    #[arg(long)]
    ebpf: bool,
    /// Guest flags from a TOML file (see below).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    guest: RunArgs,
}

#[derive(clap::Args)]
struct BackupArgs {
    /// Address to accept the primary on.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: String,
    /// File holding the pre-shared key (the primary's --key-file).
    #[arg(long, value_name = "FILE")]
    key_file: PathBuf,
    /// After a failover the guest's service listens on this port.
    #[arg(long, default_value_t = 7000)]
    service_port: u16,
    /// ... and this address.
    #[arg(long, default_value = "0.0.0.0")]
    service_bind: std::net::IpAddr,
    /// Directory for the backup's copy of the guest's disk.
    #[arg(long, value_name = "DIR", default_value = "simrep-backup")]
    state_dir: PathBuf,
    /// The primary is lost after this long without a record from it.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    link_timeout: std::time::Duration,
    /// After losing the primary's connection, wait this long for it to
    /// reconnect before taking over.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    grace: std::time::Duration,
    /// Serve Prometheus metrics on http://ADDR/metrics and /status.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Never take over (keep replicating; for maintenance and tests).
    #[arg(long)]
    no_failover: bool,
}

/// A bad --key-file, --backup, --listen or --config (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn read_key(path: &Path) -> Result<simrep::replication::protocol::PreSharedKey, Failure> {
    let mut bytes = std::fs::read(path)
        .map_err(|e| UsageError(format!("cannot read the key file {}: {e}", path.display())))?;
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    simrep::replication::protocol::PreSharedKey::new(&bytes)
        .map_err(|e| UsageError(format!("key file {}: {e}", path.display())).into())
}

fn resolve(what: &str, s: &str) -> Result<std::net::SocketAddr, Failure> {
    use std::net::ToSocketAddrs;
    match s.to_socket_addrs().map(|mut it| it.next()) {
        Ok(Some(a)) => Ok(a),
        Ok(None) => Err(UsageError(format!("{what} {s}: no address")).into()),
        Err(e) => Err(UsageError(format!("{what} {s}: {e}")).into()),
    }
}

/// Guest flags a `--config` file may set.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct VmConfigFile {
    workload: Option<String>,
    mem: Option<String>,
    vcpus: Option<u32>,
    port: Option<u16>,
    bind: Option<std::net::IpAddr>,
    disk: Option<PathBuf>,
    rate: Option<u32>,
    similarity: Option<u32>,
    kv_mem: Option<String>,
    accounts: Option<u32>,
    history: Option<u32>,
    timer_hz: Option<u32>,
}

/// Applies `--config FILE` to the guest flags not given on the command line.
fn apply_config(
    path: &Path,
    g: &mut RunArgs,
    matches: Option<&clap::ArgMatches>,
) -> Result<(), Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| UsageError(format!("cannot read --config {}: {e}", path.display())))?;
    let c: VmConfigFile = toml::from_str(&text)
        .map_err(|e| UsageError(format!("--config {}: {e}", path.display())))?;
    let explicit = |id: &str| {
        matches.is_some_and(|m| {
            matches!(
                m.value_source(id),
                Some(clap::parser::ValueSource::CommandLine)
            )
        })
    };
    let bad = |k: &str, e: String| -> Failure {
        UsageError(format!("--config {}: {k}: {e}", path.display())).into()
    };
    if let (Some(v), false) = (&c.workload, explicit("workload")) {
        g.workload = v.parse().map_err(|e: String| bad("workload", e))?;
    }
    if let (Some(v), false) = (&c.mem, explicit("mem")) {
        g.mem = parse_size(v).map_err(|e| bad("mem", e))?;
    }
    if let (Some(v), false) = (c.vcpus, explicit("vcpus")) {
        g.vcpus = v;
    }
    if let (Some(v), false) = (c.port, explicit("port")) {
        g.port = v;
    }
    if let (Some(v), false) = (c.bind, explicit("bind")) {
        g.bind = v;
    }
    if let (Some(v), false) = (&c.disk, explicit("disk")) {
        g.disk = Some(v.clone());
    }
    if let (Some(v), false) = (c.rate, explicit("rate")) {
        g.rate = v;
    }
    if let (Some(v), false) = (c.similarity, explicit("similarity")) {
        g.similarity = v.min(100);
    }
    if let (Some(v), false) = (&c.kv_mem, explicit("kv_mem")) {
        g.kv_mem = Some(parse_size(v).map_err(|e| bad("kv-mem", e))?);
    }
    if let (Some(v), false) = (c.accounts, explicit("accounts")) {
        g.accounts = v;
    }
    if let (Some(v), false) = (c.history, explicit("history")) {
        g.history = v;
    }
    if let (Some(v), false) = (c.timer_hz, explicit("timer_hz")) {
        g.timer_hz = v;
    }
    Ok(())
}

fn cmd_primary(mut a: PrimaryArgs, matches: &clap::ArgMatches) -> Result<ExitCode, Failure> {
    use simrep::replication::primary::{run_primary, PrimaryError, PrimaryOptions};
    let stop = stop_flag()?;
    if let Some(path) = a.config.clone() {
        let sub = matches.subcommand_matches("primary");
        apply_config(&path, &mut a.guest, sub)?;
    }
    if a.guest.checkpoint_dir.is_some() {
        return Err(UsageError(
            "--checkpoint-dir is for `simrep run`; the backup holds the primary's checkpoints"
                .into(),
        )
        .into());
    }
    let backup = resolve("--backup", &a.backup)?;
    let key = read_key(&a.key_file)?;
    let opts = PrimaryOptions {
        run: run_options(&a.guest),
        backup,
        key,
        epoch: std::time::Duration::from_millis(a.epoch_ms),
        codec: a.codec,
        threads: a.threads.max(1),
        stats: a.stats,
        metrics: a.metrics,
        link_timeout: a.link_timeout,
        dirty_mode: simrep::dirty::DirtyMode::Bitmap,
        ebpf: a.ebpf,
        predict: (a.predict > 0).then_some(simrep::dirty::Prediction {
            k: a.predict,
            recheck_every: a.predict_recheck,
        }),
        prearm: !a.no_prearm,
        copy_limit: a.copy_limit,
    };
    match run_primary(opts, &stop) {
        Ok(s) => {
            tracing::info!(
                epochs = s.epochs,
                acked = s.acked,
                syncs = s.syncs,
                elapsed = ?s.elapsed,
                interrupted = s.interrupted,
                "primary stopped"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(PrimaryError::Vmm(e)) => Err(e.into()),
        Err(e) => Err(e.into()),
    }
}

fn cmd_backup(a: BackupArgs) -> Result<ExitCode, Failure> {
    use simrep::replication::backup::{run_backup, BackupError, BackupOptions, BackupOutcome};
    let stop = stop_flag()?;
    let listen = resolve("--listen", &a.listen)?;
    let key = read_key(&a.key_file)?;
    let opts = BackupOptions {
        listen,
        key,
        service: std::net::SocketAddr::new(a.service_bind, a.service_port),
        state_dir: a.state_dir,
        link_timeout: a.link_timeout,
        grace: a.grace,
        metrics: a.metrics,
        no_failover: a.no_failover,
    };
    match run_backup(opts, stop) {
        Ok(BackupOutcome::Stopped { committed }) => {
            tracing::info!(committed = ?committed, "backup stopped");
            Ok(ExitCode::SUCCESS)
        }
        Ok(BackupOutcome::FailedOver {
            epoch,
            failover,
            run,
        }) => {
            tracing::info!(
                epoch,
                failover_ms = failover.as_secs_f64() * 1e3,
                elapsed = ?run.elapsed,
                "resumed guest stopped"
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(BackupError::Failover(e)) => Err(anyhow::Error::new(e).context("failover").into()),
        Err(e @ BackupError::Listen { .. }) => Err(UsageError(e.to_string()).into()),
        Err(e) => Err(e.into()),
    }
}

// --- simrep primary / backup (end) ---
