//! Project automation, run as `cargo xtask <command>`.
//!
//! * `setup`: installs what a fresh machine of this project's kind lacks
//!   (idempotent; seconds when nothing is missing).
//! * `test`: setup, then every test: unit, property, end-to-end, and a short
//!   run of every fuzz target.
//! * `run`: setup, then the main job: the bundled guest's `kv` service
//!   under `simrep run` with a disk, driven by `simrep load --verify` with
//!   live figures.
//! * `trace-demo`: a real server (memcached) under real load is traced and
//!   the trace analysed with every codec.
//! * `figures`: traces several real servers under their own load tools and
//!   analyses each trace (the README's table).
//! * `bench-repl`: native vs replicated (codec off, codec on) guests over a
//!   shaped 1 Gbit/s link between two network namespaces.

mod guest_run;
mod repl_bench;
mod servers;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command as Cmd;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "simrep project automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the toolchain components, bpf-linker, bpftool and Debian
    /// packages the project needs, and mount bpffs and tracefs.
    Setup(setup::SetupOptions),
    /// Set up, then run every test: unit, property, end-to-end (real
    /// processes, real eBPF), and each fuzz target for a short while.
    Test(TestArgs),
    /// Set up, then the main job: a `simrep backup` and a `simrep primary`
    /// on loopback (the bundled guest's kv service with a disk) under
    /// `simrep load --verify`, with a live table of the replication epochs
    /// and the client's figures; Ctrl-C stops every process cleanly.
    Run(GuestRunArgs),
    /// Set up, then trace memcached under memaslap load with `simrep trace
    /// capture` and analyse the trace with `simrep analyze`.
    TraceDemo(RunArgs),
    /// Trace several real servers under their own load tools and analyse
    /// each trace: the figures in the README.
    Figures(FiguresArgs),
    /// Native vs replicated guests (codec off, codec on), kv and bank, over
    /// a 1 Gbit/s link shaped between two network namespaces: throughput,
    /// latency, bytes per epoch, pause, CPU (target/bench-repl/).
    BenchRepl(Box<repl_bench::BenchReplArgs>),
}

#[derive(clap::Args)]
struct TestArgs {
    /// Skip `setup` (everything must already be installed).
    #[arg(long)]
    no_setup: bool,
    /// Seconds each fuzz target runs (0 skips fuzzing).
    #[arg(long, default_value_t = 20)]
    fuzz_seconds: u32,
    /// Only tests whose name contains this (passed to `cargo test`).
    filter: Option<String>,
}

#[derive(clap::Args)]
struct GuestRunArgs {
    /// How long the client drives the guest (30s, 2m, ...).
    #[arg(long, default_value = "30s")]
    duration: String,
    /// Guest memory.
    #[arg(long, default_value = "512M")]
    mem: String,
    /// Where the logs, per-epoch stats, client report and disk go.
    #[arg(long, default_value = "out/run")]
    out: PathBuf,
    /// Client connections (each has one request in flight; with output
    /// commit each gets about one response per epoch).
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// SIGKILL the primary this many seconds into the load, to watch the
    /// backup take over and the client follow it.
    #[arg(long, value_name = "SECONDS")]
    kill_primary_after: Option<u64>,
    /// Codec on the replication link (`raw`: codec off).
    #[arg(long, default_value = "similarity")]
    codec: String,
    /// Epoch length in ms.
    #[arg(long, default_value_t = 50)]
    epoch_ms: u32,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Delta epochs to capture.
    #[arg(long, default_value_t = 30)]
    epochs: u32,
    /// Epoch length in milliseconds.
    #[arg(long, default_value_t = 100)]
    epoch_ms: u32,
    /// Where the trace, the JSON report and the plots go.
    #[arg(long, default_value = "out/trace-demo")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct FiguresArgs {
    /// Delta epochs to capture per server.
    #[arg(long, default_value_t = 30)]
    epochs: u32,
    /// Where traces and reports go.
    #[arg(long, default_value = "out/figures")]
    out: PathBuf,
    /// Servers to trace (memcached, redis, mariadb); default all.
    #[arg(long = "server")]
    servers: Vec<String>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    match cli.command {
        Command::Setup(opts) => setup::run(&opts),
        Command::Test(args) => test(&root, &args),
        Command::Run(args) => {
            setup::run(&setup::SetupOptions::default())?;
            let simrep = build_release(&root)?;
            guest_run::run(
                &simrep,
                &guest_run::Options {
                    duration: args.duration,
                    mem: args.mem,
                    out: args.out,
                    connections: args.connections,
                    kill_primary_after: args.kill_primary_after.map(std::time::Duration::from_secs),
                    codec: args.codec,
                    epoch_ms: args.epoch_ms,
                },
            )
        }
        Command::TraceDemo(args) => run(&root, &args),
        Command::Figures(args) => figures(&root, &args),
        Command::BenchRepl(args) => {
            let simrep = build_release(&root)?;
            repl_bench::run(&simrep, &args)
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest
        .parent()
        .context("xtask has no parent directory")?
        .to_owned())
}

/// Runs a command, failing with its command line if it fails.
pub(crate) fn sh(cmd: &mut Cmd) -> Result<()> {
    let line = format!("{cmd:?}");
    eprintln!("$ {line}");
    let status = cmd.status().with_context(|| format!("starting {line}"))?;
    if !status.success() {
        bail!("{line} failed: {status}");
    }
    Ok(())
}

fn cargo() -> Cmd {
    Cmd::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn test(root: &Path, args: &TestArgs) -> Result<()> {
    if !args.no_setup {
        setup::run(&setup::SetupOptions::default())?;
    }
    sh(cargo().args(["build", "--all-targets"]))?;
    let bin = root.join("target/debug/simrep");
    let mut t = cargo();
    t.args(["test"]).env("SIMREP_BIN", &bin);
    if let Some(f) = &args.filter {
        t.arg(f);
    }
    sh(&mut t)?;
    if args.fuzz_seconds > 0 {
        for target in [
            "decode_epoch",
            "trace_reader",
            "vm_state",
            "replication_record",
            "backup_receive",
        ] {
            sh(Cmd::new("cargo")
                .current_dir(root.join("fuzz"))
                .args(["+nightly", "fuzz", "run", target, "--"])
                .arg(format!("-max_total_time={}", args.fuzz_seconds))
                .arg("-rss_limit_mb=4096"))?;
        }
    }
    eprintln!("all tests passed");
    Ok(())
}

fn build_release(root: &Path) -> Result<PathBuf> {
    sh(cargo().args(["build", "--release", "-p", "simrep"]))?;
    Ok(root.join("target/release/simrep"))
}

fn run(root: &Path, args: &RunArgs) -> Result<()> {
    setup::run(&setup::SetupOptions::default())?;
    let simrep = build_release(root)?;
    std::fs::create_dir_all(&args.out)?;
    let trace = args.out.join("memcached.trace");
    servers::trace_server(
        &simrep,
        servers::Server::Memcached,
        &trace,
        args.epochs,
        args.epoch_ms,
    )?;
    analyze(&simrep, &trace, &args.out)?;
    eprintln!(
        "trace, report (analysis.json) and plots are in {}",
        args.out.display()
    );
    Ok(())
}

fn analyze(simrep: &Path, trace: &Path, out: &Path) -> Result<()> {
    sh(Cmd::new(simrep)
        .arg("analyze")
        .arg(trace)
        .arg("--json")
        .arg(out.join("analysis.json"))
        .arg("--plot")
        .arg(out.join("plots")))
}

fn figures(root: &Path, args: &FiguresArgs) -> Result<()> {
    setup::run(&setup::SetupOptions {
        figures: true,
        ..Default::default()
    })?;
    let simrep = build_release(root)?;
    let list: Vec<servers::Server> = if args.servers.is_empty() {
        servers::Server::ALL.to_vec()
    } else {
        args.servers
            .iter()
            .map(|s| s.parse())
            .collect::<Result<_>>()?
    };
    let sample = root.join("../shared/memtrace/sqlite-bank-sample.trace");
    if sample.exists() {
        let out = args.out.join("sqlite-bank-sample");
        std::fs::create_dir_all(&out)?;
        analyze(&simrep, &sample, &out)?;
    }
    for server in list {
        let out = args.out.join(server.name());
        std::fs::create_dir_all(&out)?;
        let trace = out.join(format!("{}.trace", server.name()));
        servers::trace_server(&simrep, server, &trace, args.epochs, 100)?;
        analyze(&simrep, &trace, &out)?;
    }
    Ok(())
}
