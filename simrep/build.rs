//! Build script: builds the bundled guest (and, later, the eBPF programs).
mod build_guest;

fn main() -> anyhow::Result<()> {
    let guest = build_guest::build_guest()?;
    println!("cargo:rustc-env=SIMREP_GUEST_ELF={}", guest.display());
    Ok(())
}
