//! Build script: builds the bundled guest (`simrep-guest`, for
//! `x86_64-unknown-none`, see `build_guest.rs`) and the eBPF programs of `simrep-ebpf` for
//! `bpfel-unknown-none` with `aya-build` (nightly, `-Z build-std=core`,
//! bpf-linker), as the aya-template does. The object lands in
//! `$OUT_DIR/simrep-ebpf` and is embedded by `src/ebpf/mod.rs`.
//!
//! The build fails, saying to run `cargo xtask setup`, when the nightly
//! toolchain, its `rust-src` or a working `bpf-linker` is missing: simrep
//! never silently ships without its programs.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{anyhow, bail, Context as _, Result};

mod build_guest;

/// The toolchain aya-build uses (it runs `rustup run nightly cargo build`).
const TOOLCHAIN: &str = "nightly";

fn main() -> Result<()> {
    if env::var_os("CARGO_CFG_FUZZING").is_some() {
        return fuzzing_placeholders();
    }
    let guest = build_guest::build_guest()?;
    println!("cargo:rustc-env=SIMREP_GUEST_ELF={}", guest.display());

    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", manifest_dir.display()))?;
    let ebpf_dir = workspace.join("simrep-ebpf");
    let common_dir = workspace.join("simrep-common");

    // Rebuild only when the eBPF sources, the shared types or the eBPF
    // toolchain change (aya-build adds the eBPF crate's directory itself).
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    println!(
        "cargo:rerun-if-changed={}",
        common_dir.join("src").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        common_dir.join("Cargo.toml").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );

    let toolchain = check_toolchain().context(
        "simrep embeds its eBPF programs and cannot build them; \
         run `cargo xtask setup` to install the eBPF toolchain",
    )?;
    for path in toolchain {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    let package = aya_build::Package {
        name: "simrep-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    // aya-build forwards every stderr line of the inner cargo as a
    // `cargo:warning`, which cargo replays on every later build; keep the
    // inner cargo's progress lines out of it (compiler diagnostics and
    // errors still come through).
    env::set_var("CARGO_TERM_QUIET", "true");
    aya_build::build_ebpf([package], aya_build::Toolchain::Custom(TOOLCHAIN))
        .context("building simrep-ebpf (see the warnings above for the compiler's output)")
}

/// Checks that the nightly toolchain with `rust-src` and a working
/// `bpf-linker` are there; returns the files whose change (a nightly update,
/// a re-installed bpf-linker) must rebuild the programs.
fn check_toolchain() -> Result<Vec<PathBuf>> {
    let sysroot =
        run(Command::new("rustup").args(["run", TOOLCHAIN, "rustc", "--print", "sysroot"]))
            .with_context(|| format!("the {TOOLCHAIN} toolchain is not usable"))?;
    let sysroot = PathBuf::from(sysroot.trim());
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core");
    if !core_src.is_dir() {
        bail!(
            "the {TOOLCHAIN} toolchain has no rust-src component ({} is missing)",
            core_src.display()
        );
    }
    let linker = find_in_path("bpf-linker")
        .ok_or_else(|| anyhow!("bpf-linker is not installed (not found in PATH)"))?;
    // It is linked against the nightly's LLVM: a nightly update breaks it.
    run(Command::new(&linker).arg("--version")).with_context(|| {
        format!(
            "{} does not run (built against another nightly's LLVM?)",
            linker.display()
        )
    })?;
    Ok(vec![linker, sysroot.join("bin/rustc")])
}

/// Runs a command; returns its stdout or fails with its stderr.
fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The first executable file called `name` in `PATH`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

/// Whether `path` is a file with an execute bit.
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `cargo fuzz` builds (`--cfg fuzzing`) exercise the decoders only: they
/// embed empty placeholders instead of building the guest and the eBPF
/// programs, which keeps the sanitizer build short. Such a binary cannot
/// boot a guest or load a program, and is never shipped.
fn fuzzing_placeholders() -> Result<()> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let guest = out.join("simrep-guest-placeholder");
    std::fs::write(&guest, b"")?;
    std::fs::write(out.join("simrep-ebpf"), b"")?;
    println!("cargo:rustc-env=SIMREP_GUEST_ELF={}", guest.display());
    Ok(())
}
