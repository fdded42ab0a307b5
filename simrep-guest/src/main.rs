//! simrep's bundled guest.
//!
//! A `no_std`, `no_main` program for `x86_64-unknown-none`, linked at
//! [`abi::IMAGE_GPA`] by `linker.ld` and embedded in the `simrep` binary.
//! The VMM loads its `PT_LOAD` segments, builds the page tables and the GDT,
//! and enters [`_start`](kernel) in 64-bit mode at CPL0 with `rdi` = vCPU
//! index and `rsp` = that vCPU's CPL0 stack. There is no real-mode or
//! 32-bit boot code.
//!
//! The guest has two halves, because under PVM (see `ENVIRONMENT.md`) CPL0
//! code runs in KVM's instruction emulator, about 1000 times slower than
//! CPL3 code, which runs natively:
//!
//! * [`kernel`] (CPL0, a few hundred instructions): fills the IDT with
//!   exception gates, sets the TSS's `RSP0`, optionally starts a periodic
//!   x2APIC timer (its handler only counts ticks), and `iretq`s to CPL3.
//!   Its exception handler records the fault, writes a console line and
//!   stops the vCPU through the system device. No SSE anywhere (the target
//!   is soft-float), no `int n`, no `vmcall`. Measured under PVM: a timer
//!   tick costs the guest about 130 us (1000 Hz took 13 % off `churn`).
//! * [`user`] (CPL3): the workloads. They talk to the VMM only through
//!   MMIO to the unbacked window at [`abi::MMIO_BASE`] (each access is one
//!   `KVM_EXIT_MMIO`).
//!
//! The memory map and the MMIO register map are documented in [`abi`], the
//! file the VMM includes too.
//!
//! Built for the host (for example by `cargo build --workspace`), this crate
//! is an empty program that says how to build it.
#![cfg_attr(target_os = "none", no_std)]
#![cfg_attr(target_os = "none", no_main)]

// Shared with the VMM, which uses all of it; the guest uses a part.
#[allow(dead_code)]
mod abi;
// The block device driver, its append-only log and the `disk` workload.
#[cfg(target_os = "none")]
mod block;
// The service protocol, shared with the host (`simrep::proto`).
#[cfg(target_os = "none")]
mod kernel;
#[allow(dead_code)]
mod proto;
#[cfg(target_os = "none")]
mod user;
#[cfg(target_os = "none")]
mod workloads2;
// --- net: the network driver and the kv and bank services ---
#[cfg(target_os = "none")]
mod bank;
#[cfg(target_os = "none")]
mod heap;
#[cfg(target_os = "none")]
mod kv;
#[cfg(target_os = "none")]
mod net;
// --- end net ---

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "simrep-guest only runs inside simrep's VMM: build it with \
         `cargo build --release --target x86_64-unknown-none -p simrep-guest`"
    );
    std::process::exit(2);
}
