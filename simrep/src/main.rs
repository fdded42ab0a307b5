//! The `simrep` command.
//!
//! Only `simrep run` lives here for now (the full CLI is written on another
//! branch and merged by hand).

use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use simrep::vmm::run::{parse_size, ChurnOptions, Fault, Workload};
use simrep::vmm::{vm::VmError, RunOptions, VmmError};

/// simrep: a high-availability VMM.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the bundled guest alone, without replication (the native
    /// baseline). Guest console lines are logged; Ctrl-C stops it.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Workload: churn (dirty memory at a rate) or selftest (checks, then a
    /// deliberate fault).
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
}

/// Exit codes of `simrep run`.
mod exit {
    /// The host has no usable KVM (missing /dev/kvm, no permission).
    pub const NO_KVM: u8 = 3;
    /// The guest misbehaved: exception, triple fault, unknown MMIO, no
    /// progress, nonzero exit status.
    pub const GUEST: u8 = 4;
    /// Anything else.
    pub const OTHER: u8 = 1;
}

fn exit_code(e: &VmmError) -> u8 {
    match e {
        VmmError::Vm(
            VmError::NoKvm(_)
            | VmError::NoPermission(_)
            | VmError::OpenKvm(_)
            | VmError::NotKvm { .. },
        ) => exit::NO_KVM,
        VmmError::Vcpu(_) | VmmError::GuestFailed { .. } | VmmError::NoProgress { .. } => {
            exit::GUEST
        }
        VmmError::Config(_) => 2,
        _ => exit::OTHER,
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run(a) => {
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
                    eprintln!("simrep: cannot install the signal handler: {e}");
                    return ExitCode::from(exit::OTHER);
                }
            }
            let opts = RunOptions {
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
                ..Default::default()
            };
            match simrep::vmm::run(&opts, &stop) {
                Ok(s) => {
                    tracing::info!(
                        elapsed = ?s.elapsed,
                        progress = ?s.progress,
                        outcomes = ?s.outcomes,
                        interrupted = s.interrupted,
                        "guest stopped"
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    let mut msg = format!("simrep run: {e}");
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        msg.push_str(&format!(": {s}"));
                        src = s.source();
                    }
                    eprintln!("{msg}");
                    ExitCode::from(exit_code(&e))
                }
            }
        }
    }
}
