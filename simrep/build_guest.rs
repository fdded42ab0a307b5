//! Builds the bundled guest (`simrep-guest`) for `x86_64-unknown-none`.
//!
//! Kept apart from `build.rs` so the eBPF build can live there. The guest is
//! built by a nested `cargo build --release` with its own target directory
//! under `OUT_DIR` (so it never contends for the outer build's lock), with
//! the outer build's flags and wrappers removed: the host's
//! `target-cpu=x86-64-v3` must not leak into guest code that the PVM
//! instruction emulator runs, and clippy must not wrap the guest build.

use std::env;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// The guest's target triple.
const GUEST_TARGET: &str = "x86_64-unknown-none";

/// Environment the outer cargo sets that must not reach the nested build.
const SCRUBBED_ENV: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CLIPPY_ARGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
];

/// Builds `simrep-guest` and returns the path of its ELF image.
///
/// Emits `rerun-if-changed` for the guest's sources, so the nested build
/// runs again only when they change.
///
/// # Errors
///
/// Fails when the workspace layout is not the expected one, when cargo
/// cannot be started, or when the guest does not build (its compiler output
/// is included in the error).
pub fn build_guest() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .context("simrep has no parent directory")?
        .to_path_buf();
    let guest_dir = workspace.join("simrep-guest");
    if !guest_dir.join("Cargo.toml").is_file() {
        bail!("the guest crate is missing: {}", guest_dir.display());
    }
    for path in ["Cargo.toml", "build.rs", "linker.ld", "src"] {
        println!("cargo:rerun-if-changed={}", guest_dir.join(path).display());
    }
    println!("cargo:rerun-if-changed=build_guest.rs");

    let out_dir = PathBuf::from(env::var("OUT_DIR").context("OUT_DIR")?);
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&workspace)
        .args([
            "build",
            "--release",
            "--target",
            GUEST_TARGET,
            "-p",
            "simrep-guest",
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        // Cargo reads a build script's stdout for directives: keep the
        // nested cargo's output off it.
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    // The guest runs at the address it is linked at: no PIE, no dynamic
    // relocations for the loader to apply.
    cmd.env("CARGO_ENCODED_RUSTFLAGS", "-Crelocation-model=static");
    let output = cmd
        .output()
        .with_context(|| format!("cannot run `{cargo} build` for the guest"))?;
    if !output.status.success() {
        bail!(
            "building simrep-guest for {GUEST_TARGET} failed ({}); is the target installed \
             (`rustup target add {GUEST_TARGET}`)?\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let elf = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("simrep-guest");
    if !elf.is_file() {
        bail!("the guest build succeeded but {} is missing", elf.display());
    }
    Ok(elf)
}
