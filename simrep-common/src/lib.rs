//! Types shared between the `simrep` agent and its eBPF programs.
//!
//! Everything here is `no_std`, `#[repr(C)]` and fixed-width, so that the
//! kernel side and the user side agree on the layout byte for byte. With the
//! `user` feature the types implement [`aya::Pod`] so that user space can
//! read and write them in maps.
//!
//! # Page-fault counting
//!
//! The program [`PAGE_FAULT_USER_PROGRAM`] runs on the
//! `exceptions:page_fault_user` tracepoint. It reads the one [`FaultConfig`]
//! in the array map [`CONFIG_MAP`] and, for user page faults of the
//! configured thread group, bumps per-CPU `u64` counters in the per-CPU array
//! [`FAULT_COUNTERS_MAP`], indexed by [`Counter`]. User space sums the
//! counters over CPUs. Both maps are BTF-defined, so
//! `bpftool map dump pinned /sys/fs/bpf/simrep/<name>/<map>` shows typed
//! values.
#![no_std]

/// Name of the array map (one entry, index 0) holding the [`FaultConfig`].
pub const CONFIG_MAP: &str = "SIMREP_CONFIG";

/// Name of the per-CPU array map of `u64` fault counters, indexed by
/// [`Counter`].
pub const FAULT_COUNTERS_MAP: &str = "SIMREP_FAULTS";

/// Name of the tracepoint program counting user page faults.
pub const PAGE_FAULT_USER_PROGRAM: &str = "page_fault_user";

/// Tracepoint category of [`PAGE_FAULT_USER_PROGRAM`].
pub const PAGE_FAULT_USER_CATEGORY: &str = "exceptions";

/// Tracepoint name of [`PAGE_FAULT_USER_PROGRAM`].
pub const PAGE_FAULT_USER_TRACEPOINT: &str = "page_fault_user";

/// Offset of `unsigned long error_code` in the `exceptions:page_fault_user`
/// record (see `/sys/kernel/tracing/events/exceptions/page_fault_user/format`).
/// User space checks it against the running kernel before loading.
pub const PAGE_FAULT_USER_ERROR_CODE_OFFSET: usize = 24;

/// x86 page-fault error code bit: the access was a write.
pub const PF_ERROR_WRITE: u64 = 1 << 1;

/// Configuration of the page-fault program, entry 0 of [`CONFIG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultConfig {
    /// Thread-group id (user-space "pid") whose faults are counted; 0 counts
    /// nothing (no user process has tgid 0).
    pub target_tgid: u32,
    /// Reserved, must be 0 (keeps the struct free of implicit padding if a
    /// field is added).
    pub reserved: u32,
}

/// Indices into the per-CPU counter array [`FAULT_COUNTERS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// User page faults of the target thread group (reads and writes).
    Faults = 0,
    /// User write faults (error code bit 1) of the target thread group.
    WriteFaults = 1,
    /// User page faults of other thread groups: seen, not attributed.
    OtherFaults = 2,
    /// Tracepoint records that could not be read.
    ReadErrors = 3,
}

impl Counter {
    /// Number of counters, the `max_entries` of [`FAULT_COUNTERS_MAP`].
    pub const COUNT: u32 = 4;

    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Faults,
        Counter::WriteFaults,
        Counter::OtherFaults,
        Counter::ReadErrors,
    ];

    /// The counter's index in [`FAULT_COUNTERS_MAP`].
    pub const fn index(self) -> u32 {
        self as u32
    }
}

// SAFETY: `FaultConfig` is `#[repr(C)]`, `Copy`, made of two `u32` with no
// padding, so every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for FaultConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_fixed() {
        assert_eq!(core::mem::size_of::<FaultConfig>(), 8);
        assert_eq!(core::mem::align_of::<FaultConfig>(), 4);
    }

    #[test]
    fn counter_indices_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i);
        }
    }
}
