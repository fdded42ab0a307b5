//! Project automation, run as `cargo xtask <command>`.
//!
//! * `setup`: installs what a fresh machine of this project's kind lacks
//!   (idempotent; seconds when nothing is missing).
//! * `test`: setup, then every test (unit, property, end-to-end).
//! * `run`: setup, then the main job on real processes.

mod setup;

use anyhow::Result;
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
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup(opts) => setup::run(&opts),
    }
}
