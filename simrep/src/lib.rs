//! simrep: a high-availability virtual machine monitor.
//!
//! The primary runs a KVM guest and, every epoch, sends the pages the guest
//! dirtied to a backup, each 512-byte area expressed as a compressed XOR
//! difference against the most similar area the backup already holds
//! (Gerofi et al., UCC 2011). This crate holds the library; `src/main.rs` is
//! the `simrep` command.
//!
//! * [`compress`]: the similarity codec and the baselines it is judged
//!   against. Pure: no I/O, no unsafe code.
//! * [`trace`]: the memory-trace format, capture of real processes and the
//!   replay analysis behind `simrep analyze`.
//! * [`ebpf`]: loading, attaching and reading simrep's eBPF programs.
//! * [`dirty`]: dirty-page tracking for the VMM (KVM dirty bitmap with
//!   manual protect, or the dirty ring) behind one harvest interface, and
//!   the copy-on-write view of guest memory (userfaultfd write-protect).
//! * [`vmm`]: the KVM VM, its vCPU threads and MMIO devices, and the
//!   bundled guest it boots (`simrep run`).
//! * [`replication`]: the replication wire protocol.
//! * [`load`]: `simrep load`, the kv/bank client with `--verify`, and its
//!   reference test server.
//! * [`proto`]: the wire protocol of the guest's `kv` and `bank` services,
//!   shared with the guest source.

mod affinity;
pub mod compress;
pub mod dirty;
pub mod ebpf;
pub mod load;
#[path = "../../simrep-guest/src/proto.rs"]
pub mod proto;
pub mod replication;
pub mod trace;
pub mod vmm;

/// `error: cause: cause ...`: an error and its sources on one line, for
/// logs and messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
