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
//!
//! # Write tracing (KVM tracepoints)
//!
//! [`DIRTY_RING_PUSH_PROGRAM`] (on `kvm:kvm_dirty_ring_push`, per page the
//! dirty ring reports) and [`PAGETABLE_WALK_PROGRAM`] (on
//! `kvmmmu:kvm_mmu_pagetable_walk`, per guest access the shadow MMU walks;
//! only writes, `pferr` bit 1, are recorded) share [`CONFIG_MAP`] and its
//! `target_tgid` filter. Their maps, pinned by the agent under
//! `/sys/fs/bpf/simrep/<vm>/`:
//!
//! | map | type | key | value |
//! |---|---|---|---|
//! | [`RING_PAGES_MAP`] | per-CPU hash, [`WRITE_PAGES_MAX`] entries | `u64` [`ring_page_key`]`(slot, offset)` | `u64` pushes this epoch |
//! | [`WALK_PAGES_MAP`] | per-CPU hash, [`WRITE_PAGES_MAX`] entries | `u64` guest virtual page (`addr >> 12`) | `u64` write walks this epoch |
//! | [`WRITE_STATS_MAP`] | per-CPU array | `u32` [`WriteStat`] index | `u64` events since load |
//!
//! The agent empties the page maps at every epoch boundary; the statistics
//! are cumulative and the agent reports per-epoch differences. Per-CPU maps
//! because the BPF target has no 64-bit atomic add here.
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

// ---- write-fault tracing (issue 5): KVM tracepoints --------------------

/// Name of the per-CPU hash map of pages the dirty ring reported: key a
/// [`ring_page_key`] (`u64`), value the `u64` number of
/// `kvm:kvm_dirty_ring_push` events for it on this CPU since the last reset.
pub const RING_PAGES_MAP: &str = "SIMREP_RING_PAGES";

/// Name of the per-CPU hash map of pages the guest wrote as seen by
/// `kvmmmu:kvm_mmu_pagetable_walk`: key the guest *virtual* page number
/// (`addr >> 12`, `u64`), value the `u64` number of write walks on this CPU
/// since the last reset.
pub const WALK_PAGES_MAP: &str = "SIMREP_WALK_PAGES";

/// Name of the per-CPU array of `u64` per-epoch statistics, indexed by
/// [`WriteStat`].
pub const WRITE_STATS_MAP: &str = "SIMREP_WRITE_STATS";

/// Capacity of [`RING_PAGES_MAP`] and [`WALK_PAGES_MAP`]: distinct pages per
/// epoch; events for more pages count as [`WriteStat::MapFull`].
pub const WRITE_PAGES_MAX: u32 = 262_144;

/// Name of the program on `kvm:kvm_dirty_ring_push`.
pub const DIRTY_RING_PUSH_PROGRAM: &str = "kvm_dirty_ring_push";

/// Name of the program on `kvmmmu:kvm_mmu_pagetable_walk`.
pub const PAGETABLE_WALK_PROGRAM: &str = "kvm_mmu_pagetable_walk";

/// Offset of `u32 slot` in the `kvm:kvm_dirty_ring_push` record.
pub const DIRTY_RING_PUSH_SLOT_OFFSET: usize = 20;

/// Offset of `u64 offset` (guest frame within the slot) in the
/// `kvm:kvm_dirty_ring_push` record.
pub const DIRTY_RING_PUSH_OFFSET_OFFSET: usize = 24;

/// Offset of `u64 addr` (guest virtual address) in the
/// `kvmmmu:kvm_mmu_pagetable_walk` record.
pub const PAGETABLE_WALK_ADDR_OFFSET: usize = 8;

/// Offset of `u32 pferr` (page-fault error code) in the
/// `kvmmmu:kvm_mmu_pagetable_walk` record.
pub const PAGETABLE_WALK_PFERR_OFFSET: usize = 16;

/// The key of [`RING_PAGES_MAP`]: the memory slot in the top 16 bits, the
/// frame offset within the slot in the low 48.
pub const fn ring_page_key(slot: u32, offset: u64) -> u64 {
    ((slot as u64 & 0xffff) << 48) | (offset & ((1 << 48) - 1))
}

/// Indices into the per-CPU statistics array [`WRITE_STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteStat {
    /// `kvm_dirty_ring_push` events of the target thread group.
    RingEvents = 0,
    /// `kvm_dirty_ring_push` events of other thread groups (filtered out).
    RingFiltered = 1,
    /// `kvm_mmu_pagetable_walk` events of the target (reads and writes).
    WalkEvents = 2,
    /// Of those, writes (`pferr` bit 1), recorded in [`WALK_PAGES_MAP`].
    WalkWrites = 3,
    /// `kvm_mmu_pagetable_walk` events of other thread groups.
    WalkFiltered = 4,
    /// Events not recorded because a page map was full.
    MapFull = 5,
    /// Tracepoint records that could not be read.
    ReadErrors = 6,
}

impl WriteStat {
    /// Number of statistics, the `max_entries` of [`WRITE_STATS_MAP`].
    pub const COUNT: u32 = 7;

    /// Every statistic, in index order.
    pub const ALL: [WriteStat; Self::COUNT as usize] = [
        WriteStat::RingEvents,
        WriteStat::RingFiltered,
        WriteStat::WalkEvents,
        WriteStat::WalkWrites,
        WriteStat::WalkFiltered,
        WriteStat::MapFull,
        WriteStat::ReadErrors,
    ];

    /// The statistic's index in [`WRITE_STATS_MAP`].
    pub const fn index(self) -> u32 {
        self as u32
    }
}

// ---- end of write-fault tracing ----------------------------------------

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
    fn write_stat_indices_are_dense() {
        for (i, c) in WriteStat::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i);
        }
    }

    #[test]
    fn ring_page_key_packs_slot_and_offset() {
        assert_eq!(ring_page_key(0, 0x1234), 0x1234);
        assert_eq!(ring_page_key(2, 5), (2 << 48) | 5);
    }

    #[test]
    fn counter_indices_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i);
        }
    }
}
