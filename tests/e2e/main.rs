//! End-to-end tests: the real `simrep` binary and library against real
//! processes, real eBPF and (later) real KVM. They need root and this
//! project's set-up (`cargo xtask setup`); a test that cannot run fails with
//! its reason.

mod analyze;
mod block;
mod capture;
mod cow;
mod dirty;
mod diskck;
mod ebpf;
mod ebpf_cow;
mod ebpf_writes;
mod load;
mod net;
mod predict;
mod replication;
mod state;
mod status;
mod vmm;
