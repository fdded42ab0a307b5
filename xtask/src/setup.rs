//! `cargo xtask setup`: installs what a fresh machine lacks, idempotently.
//!
//! Every item is checked first with a cheap probe that actually exercises the
//! thing (`rustup ... --installed`, `bpf-linker --version`, `dpkg-query`,
//! `/proc/mounts`); only missing items are installed, so a second run takes a
//! second or two. One line is printed per item:
//!
//! ```text
//! ok         nightly toolchain: rustc 1.97.0-nightly (e50aa6fba 2026-05-19)
//! installed  cargo-fuzz: cargo-fuzz 0.13.1
//! missing    bpffs at /sys/fs/bpf: not mounted          (--check only)
//! FAILED     package memcached: needs root
//! ```
//!
//! The run fails (non-zero exit) when any item is missing afterwards.

use std::{
    cell::Cell,
    ffi::OsStr,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use anyhow::{anyhow, bail, Context as _, Result};

/// The bpf-linker release known to work with the pinned aya crates.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the project needs: `bpftool` dumps the pinned maps,
/// `memcached` and `libmemcached-tools` (`memcslap`) are the real server and
/// load tool the demo and tests trace, `python3` runs helper scripts.
const APT_PACKAGES: &[&str] = &["bpftool", "memcached", "libmemcached-tools", "python3"];

/// Options of `cargo xtask setup`.
#[derive(clap::Args, Debug, Default)]
pub struct SetupOptions {
    /// Only report what is present and what is missing; install nothing.
    /// Exits non-zero if anything is missing.
    #[arg(long)]
    pub check: bool,
    /// Also the servers and load tools that `cargo xtask figures` traces
    /// (Redis, MariaDB, sysbench).
    #[arg(long)]
    pub figures: bool,
}

/// Debian packages only `cargo xtask figures` needs.
const FIGURES_PACKAGES: &[&str] = &["redis-server", "redis-tools", "mariadb-server", "sysbench"];

/// Result of probing one item.
enum Probe {
    /// Present and working; the detail says what was found.
    Present(String),
    /// Missing or broken; the detail says why.
    Absent(String),
}

/// Checks whether an item is present and working.
type ProbeFn = Box<dyn Fn(&Context) -> Result<Probe>>;
/// Installs an item.
type InstallFn = Box<dyn Fn(&Context) -> Result<()>>;

/// One thing the machine needs.
struct Item {
    /// What is printed on the item's line.
    name: String,
    /// Installing it needs root (apt, mount).
    needs_root: bool,
    /// Cheap check whether the item is present and working.
    probe: ProbeFn,
    /// Installs the item.
    install: InstallFn,
}

/// State shared by the items during one run.
struct Context {
    /// `apt-get update` already ran in this run.
    apt_updated: Cell<bool>,
}

/// Installs what is missing (or, with `--check`, only reports it).
pub fn run(opts: &SetupOptions) -> Result<()> {
    let root = is_root().context("cannot tell whether we run as root")?;
    let ctx = Context {
        apt_updated: Cell::new(false),
    };
    let mut failures = Vec::new();
    let mut need_root = false;
    for item in items(opts.figures) {
        match handle(&item, &ctx, opts.check, root) {
            Ok(line) => println!("{line}"),
            Err(err) => {
                let reason = format!("{err:#}");
                let label = if opts.check { "missing" } else { "FAILED" };
                println!("{label:<10} {}: {reason}", item.name);
                failures.push(format!("{} ({reason})", item.name));
                need_root |= item.needs_root && !root;
            }
        }
    }
    if failures.is_empty() {
        return Ok(());
    }
    let mut msg = format!("{} item(s) not ready:", failures.len());
    for failure in &failures {
        let _ = write!(msg, "\n  - {failure}");
    }
    if opts.check {
        msg.push_str("\nrun `cargo xtask setup` (as root) to install them");
    } else if need_root {
        msg.push_str("\nDebian packages and mounts need root: run `sudo -E cargo xtask setup`");
    }
    Err(anyhow!(msg))
}

/// Checks one item and installs it if needed; returns the line to print.
fn handle(item: &Item, ctx: &Context, check_only: bool, root: bool) -> Result<String> {
    let reason = match (item.probe)(ctx)? {
        Probe::Present(detail) => return Ok(format!("{:<10} {}: {detail}", "ok", item.name)),
        Probe::Absent(reason) => reason,
    };
    if check_only {
        bail!("{reason}");
    }
    if item.needs_root && !root {
        bail!("{reason}; installing it needs root");
    }
    (item.install)(ctx).with_context(|| format!("{reason}; installing it failed"))?;
    match (item.probe)(ctx)? {
        Probe::Present(detail) => Ok(format!("{:<10} {}: {detail}", "installed", item.name)),
        Probe::Absent(after) => bail!("still missing after installing it: {after}"),
    }
}

/// Everything the project needs, in dependency order.
fn items(figures: bool) -> Vec<Item> {
    let mut items = vec![
        Item {
            name: "nightly toolchain".into(),
            needs_root: false,
            probe: Box::new(|_| {
                // `rustup toolchain list` first: some rustup versions install
                // a missing toolchain on `rustc +nightly` by themselves.
                let list = run_capture("rustup", ["toolchain", "list"])?;
                if !list.lines().any(|l| l.starts_with("nightly-")) {
                    return Ok(Probe::Absent("not installed".into()));
                }
                Ok(match run_capture("rustc", ["+nightly", "--version"]) {
                    Ok(version) => Probe::Present(version.trim().to_owned()),
                    Err(err) => Probe::Absent(format!("{err:#}")),
                })
            }),
            install: Box::new(|_| {
                run_status(
                    "rustup",
                    ["toolchain", "install", "nightly", "--profile", "minimal"],
                )
            }),
        },
        rustup_component("nightly", "rust-src"),
        rustup_target("stable", "x86_64-unknown-none"),
        rustup_component("stable", "rustfmt"),
        rustup_component("stable", "clippy"),
        Item {
            name: format!("bpf-linker {BPF_LINKER_VERSION}"),
            needs_root: false,
            probe: Box::new(|_| Ok(probe_bpf_linker())),
            install: Box::new(|_| install_bpf_linker()),
        },
        Item {
            name: "cargo-fuzz".into(),
            needs_root: false,
            probe: Box::new(|_| {
                Ok(match run_capture("cargo", ["fuzz", "--version"]) {
                    Ok(version) => Probe::Present(version.trim().to_owned()),
                    Err(_) => Probe::Absent("`cargo fuzz` is not installed".into()),
                })
            }),
            install: Box::new(|_| {
                cargo_install(&["cargo-fuzz", "--locked"], None).context("cargo install cargo-fuzz")
            }),
        },
    ];
    items.extend(APT_PACKAGES.iter().map(|&pkg| apt_package(pkg)));
    if figures {
        items.extend(FIGURES_PACKAGES.iter().map(|&pkg| apt_package(pkg)));
    }
    items.push(mount_item("bpffs", "bpf", "/sys/fs/bpf"));
    items.push(mount_item("tracefs", "tracefs", "/sys/kernel/tracing"));
    items
}

/// A rustup component of `toolchain`.
fn rustup_component(toolchain: &'static str, component: &'static str) -> Item {
    Item {
        name: format!("{toolchain} component {component}"),
        needs_root: false,
        probe: Box::new(move |_| {
            let installed = run_capture(
                "rustup",
                ["component", "list", "--installed", "--toolchain", toolchain],
            )?;
            // Components are listed as `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
            let found = installed
                .lines()
                .find(|l| *l == component || l.starts_with(&format!("{component}-")));
            Ok(match found {
                Some(line) => Probe::Present(line.to_owned()),
                None => Probe::Absent("not installed".into()),
            })
        }),
        install: Box::new(move |_| {
            run_status(
                "rustup",
                ["component", "add", component, "--toolchain", toolchain],
            )
        }),
    }
}

/// A rustup target of `toolchain`.
fn rustup_target(toolchain: &'static str, target: &'static str) -> Item {
    Item {
        name: format!("{toolchain} target {target}"),
        needs_root: false,
        probe: Box::new(move |_| {
            let installed = run_capture(
                "rustup",
                ["target", "list", "--installed", "--toolchain", toolchain],
            )?;
            Ok(if installed.lines().any(|l| l == target) {
                Probe::Present("installed".into())
            } else {
                Probe::Absent("not installed".into())
            })
        }),
        install: Box::new(move |_| {
            run_status(
                "rustup",
                ["target", "add", target, "--toolchain", toolchain],
            )
        }),
    }
}

/// `bpf-linker` must run (it is dynamically linked against the nightly's
/// LLVM, so a nightly update breaks it) and be the pinned version.
fn probe_bpf_linker() -> Probe {
    match run_capture("bpf-linker", ["--version"]) {
        Ok(out) if out.contains(BPF_LINKER_VERSION) => Probe::Present(out.trim().to_owned()),
        Ok(out) => Probe::Absent(format!("found {}, want {BPF_LINKER_VERSION}", out.trim())),
        Err(err) => Probe::Absent(format!("{err:#}")),
    }
}

/// Builds bpf-linker against the nightly toolchain's own LLVM shared library
/// (Debian's LLVM is too old), as ENVIRONMENT.md describes.
fn install_bpf_linker() -> Result<()> {
    let (major, sysroot, lib) = nightly_llvm()?;
    let libdir = sysroot.join("lib");
    let libdir = libdir.display();
    let rustflags = format!("-L native={libdir} -l dylib={lib} -C link-arg=-Wl,-rpath,{libdir}");
    let features = format!("llvm-{major},no-llvm-linking");
    cargo_install(
        &[
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &features,
        ],
        Some(&rustflags),
    )
    .with_context(|| format!("cargo install bpf-linker (LLVM {major}, lib{lib}.so)"))
}

/// The nightly's LLVM major version, sysroot and LLVM library name (as given
/// to `-l dylib=`), e.g. `(22, /root/.rustup/toolchains/nightly-..., "LLVM-22-rust-1.97.0-nightly")`.
fn nightly_llvm() -> Result<(u32, PathBuf, String)> {
    let vv = run_capture("rustc", ["+nightly", "-vV"])?;
    let llvm = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .ok_or_else(|| anyhow!("`rustc +nightly -vV` reports no LLVM version:\n{vv}"))?;
    let major: u32 = llvm
        .split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .ok_or_else(|| anyhow!("cannot parse LLVM version {llvm:?}"))?;
    let sysroot = PathBuf::from(run_capture("rustc", ["+nightly", "--print", "sysroot"])?.trim());
    let libdir = sysroot.join("lib");
    let prefix = format!("libLLVM-{major}-rust-");
    let mut names = Vec::new();
    for entry in fs::read_dir(&libdir).with_context(|| format!("list {}", libdir.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_prefix("lib").and_then(|n| n.strip_suffix(".so")) {
            if name.starts_with(&prefix) {
                names.push(stem.to_owned());
            }
        }
    }
    match names.as_slice() {
        [lib] => Ok((major, sysroot, lib.clone())),
        [] => bail!("no {prefix}*.so in {}", libdir.display()),
        many => bail!("several LLVM libraries in {}: {many:?}", libdir.display()),
    }
}

/// A Debian package, checked with `dpkg-query`, installed with `apt-get`.
fn apt_package(pkg: &'static str) -> Item {
    Item {
        name: format!("package {pkg}"),
        needs_root: true,
        probe: Box::new(move |_| {
            let out = Command::new("dpkg-query")
                .args(["-W", "-f=${Status} ${Version}", pkg])
                .output()
                .context("run dpkg-query (is this Debian?)")?;
            let text = String::from_utf8_lossy(&out.stdout);
            Ok(match text.strip_prefix("install ok installed ") {
                Some(version) if out.status.success() => Probe::Present(version.to_owned()),
                _ => Probe::Absent("not installed".into()),
            })
        }),
        install: Box::new(move |ctx| {
            if !ctx.apt_updated.get() {
                run_status("apt-get", ["update", "-q"])?;
                ctx.apt_updated.set(true);
            }
            let status = Command::new("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends", pkg])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .context("run apt-get install")?;
            if !status.success() {
                bail!("apt-get install {pkg}: {status}");
            }
            Ok(())
        }),
    }
}

/// A pseudo file system mounted at `target`.
fn mount_item(name: &str, fstype: &'static str, target: &'static str) -> Item {
    Item {
        name: format!("{name} at {target}"),
        needs_root: true,
        probe: Box::new(move |_| {
            let mounts = fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
            let mounted = mounts.lines().any(|l| {
                let mut fields = l.split_whitespace().skip(1);
                fields.next() == Some(target) && fields.next() == Some(fstype)
            });
            Ok(if mounted {
                Probe::Present("mounted".into())
            } else {
                Probe::Absent("not mounted".into())
            })
        }),
        install: Box::new(move |_| {
            fs::create_dir_all(target).with_context(|| format!("create {target}"))?;
            run_status("mount", ["-t", fstype, fstype, target])
        }),
    }
}

/// `cargo install ARGS`, run outside the workspace so that its
/// `.cargo/config.toml` (host-specific rustflags) does not apply.
fn cargo_install(args: &[&str], rustflags: Option<&str>) -> Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.arg("install")
        .args(args)
        .current_dir(std::env::temp_dir());
    // Inherited from `cargo xtask` and meaningless for `cargo install`.
    cmd.env_remove("CARGO_TARGET_DIR");
    match rustflags {
        Some(flags) => cmd.env("RUSTFLAGS", flags),
        None => cmd.env_remove("RUSTFLAGS"),
    };
    let status = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?}: {status}");
    }
    Ok(())
}

/// Runs a command with inherited output; fails unless it succeeds.
fn run_status<I, S>(program: &str, args: I) -> Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let status = cmd.status().with_context(|| format!("spawn {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?}: {status}");
    }
    Ok(())
}

/// Runs a command and returns its stdout; fails (with its stderr) unless it
/// succeeds.
fn run_capture<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .output()
        .with_context(|| format!("`{program}` cannot be run"))?;
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!("`{program}` failed ({status}): {last}");
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// Whether the effective user is root (from `/proc/self/status`).
fn is_root() -> Result<bool> {
    let status = fs::read_to_string(Path::new("/proc/self/status"))?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no Uid line in /proc/self/status"))?;
    Ok(uid == "0")
}
