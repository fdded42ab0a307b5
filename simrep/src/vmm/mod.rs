//! The VMM: a KVM VM that runs simrep's bundled guest.
//!
//! KVM on the project's machines is PVM (see `ENVIRONMENT.md`): guest CPL3
//! code runs natively, CPL0 code in KVM's instruction emulator. The bundled
//! guest (`simrep-guest/`) is therefore a thin CPL0 stub plus workloads at
//! CPL3 that reach the VMM through MMIO exits.
//!
//! * [`abi`]: the guest memory map, boot parameters and MMIO registers,
//!   shared with the guest source.
//! * [`memory`]: guest RAM (anonymous, THP, pre-faulted, accessed volatile
//!   through vm-memory).
//! * [`vm`]: the KVM VM, in-kernel irqchip and PIT, vCPU creation,
//!   pause/resume of all vCPUs.
//! * [`vcpu`]: one thread per vCPU, Paused / Running / Exited over
//!   channels, kicked out of `KVM_RUN` with a signal + `immediate_exit`.
//! * [`devices`]: the MMIO dispatcher, console and system device.
//! * [`block`]: the block device (a host file behind a per-epoch write
//!   buffer).
//! * [`net`]: the paravirtual network device (client TCP connections,
//!   request/response rings in guest memory, the output gate).
//! * [`boot`], [`elf`]: page tables, GDT, long-mode register state and the
//!   ELF loader for the guest image.
//! * [`epoch`]: one replication checkpoint: pause, dirty harvest, state
//!   save, copy-on-write arm, resume, with its timings.
//! * [`run`](mod@run): `simrep run`: boot the guest with a workload and run it until
//!   it ends or the caller stops it.
//! * [`state`]: full VM state save/restore ([`state::VmSnapshot`],
//!   [`Vm::save_state`], [`Vm::restore`]) and its byte format; the
//!   per-device state hook ([`state::DeviceState`]).
//! * [`checkpoint`]: checkpoint directories on disk (`simrep run
//!   --checkpoint-dir`, `simrep restore`).

#[path = "../../../simrep-guest/src/abi.rs"]
pub mod abi;
pub mod block;
pub mod boot;
pub mod checkpoint;
pub mod devices;
pub mod disk_image;
pub mod elf;
pub mod epoch;
pub mod memory;
pub mod net;
pub mod run;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use memory::GuestMemory;
pub use run::{run, RunOptions, RunSummary};
pub use vm::Vm;

/// The bundled guest's ELF image, built by `build.rs` for
/// `x86_64-unknown-none`.
pub static GUEST_ELF: &[u8] = include_bytes!(env!("SIMREP_GUEST_ELF"));

// SAFETY: `#[repr(C)]` structs of `u32`/`u64` fields laid out without
// padding (checked by the size assertions below); every bit pattern is a
// valid value.
unsafe impl vm_memory::ByteValued for abi::BootParams {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for abi::ChurnParams {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for abi::SelftestParams {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for abi::VcpuStatus {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for abi::ExceptionReport {}

const _: () = assert!(size_of::<abi::ChurnParams>() == 24);
const _: () = assert!(size_of::<abi::SelftestParams>() == 8);
const _: () = assert!(size_of::<abi::BootParams>() == 72 + 56 + 24 + 56 + 16);
const _: () = assert!(size_of::<abi::VcpuStatus>() == 64);
const _: () = assert!(size_of::<abi::ExceptionReport>() == 72);
const _: () = assert!(size_of::<abi::ExceptionReport>() <= 0x60);

// ---- dirty-tracking workloads (touch, random) ----
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for abi::TouchParams {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for abi::TouchLogHeader {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for abi::RandomParams {}
const _: () = assert!(size_of::<abi::TouchParams>() == 56);
const _: () = assert!(size_of::<abi::TouchLogHeader>() == 64);
const _: () = assert!(size_of::<abi::RandomParams>() == 24);

/// Errors of running a VM, as `simrep run` reports them.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The options do not make a valid VM.
    #[error("invalid VM configuration")]
    Config(#[from] boot::BootError),
    /// Creating or driving the KVM VM failed (no `/dev/kvm`, no permission,
    /// a failing ioctl, a vCPU that does not answer).
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// A vCPU stopped with an error: the guest faulted, triple-faulted, hit
    /// an unknown MMIO address, or KVM failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// The guest ended with a nonzero status.
    #[error("guest on vCPU {vcpu} exited with status {status}")]
    GuestFailed {
        /// The vCPU.
        vcpu: u32,
        /// The status it wrote to `SYS_EXIT`.
        status: u64,
    },
    /// Reading guest memory failed.
    #[error("cannot read guest memory")]
    Memory(#[from] memory::MemoryError),
    /// The disk image cannot be used (missing, not a file, bad size), or
    /// writing it at the end of the run failed.
    #[error(transparent)]
    Disk(#[from] block::BlockError),
    /// The network service could not start.
    #[error(transparent)]
    Net(#[from] net::NetError),
    /// Saving, restoring or checkpointing VM state failed.
    #[error(transparent)]
    State(#[from] state::StateError),
    /// Writing or reading a checkpoint directory failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// The guest made no progress for too long.
    #[error("guest made no progress for {seconds} s (runaway or hung guest)")]
    NoProgress {
        /// How long it was stuck.
        seconds: u64,
    },
}
