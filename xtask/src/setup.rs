//! `cargo xtask setup` (placeholder).
use anyhow::Result;

/// Options of `cargo xtask setup`.
#[derive(clap::Args, Debug, Default)]
pub struct SetupOptions {}

/// Installs what is missing.
pub fn run(_opts: &SetupOptions) -> Result<()> {
    Ok(())
}
