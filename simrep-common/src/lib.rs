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
//! | [`FAULT_PAGES_MAP`] | per-CPU hash, [`WRITE_PAGES_MAX`] entries | `u64` guest frame (`gpa >> 12`) | `u64` write faults this epoch |
//! | [`WRITE_STATS_MAP`] | per-CPU array | `u32` [`WriteStat`] index | `u64` events since load |
//!
//! On hosts with hardware-assisted paging (VMX/SVM; they never fire under
//! PVM) [`KVM_PAGE_FAULT_PROGRAM`] (on `kvm:kvm_page_fault`) and
//! [`FAST_PAGE_FAULT_PROGRAM`] (on `kvmmmu:fast_page_fault`) record write
//! faults (error code bit 1) per guest frame in [`FAULT_PAGES_MAP`], one
//! map for both; a fault that takes both paths counts twice.
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

/// Capacity of [`RING_PAGES_MAP`], [`WALK_PAGES_MAP`] and
/// [`FAULT_PAGES_MAP`]: distinct pages per
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

/// Name of the per-CPU hash map of guest frames written as seen by
/// `kvm:kvm_page_fault` and `kvmmmu:fast_page_fault` (hardware-assisted
/// paging, VMX/SVM): key the guest frame (`gpa >> 12`, `u64`), value the
/// `u64` number of write-fault events of both tracepoints on this CPU since
/// the last reset.
pub const FAULT_PAGES_MAP: &str = "SIMREP_FAULT_PAGES";

/// Name of the program on `kvm:kvm_page_fault`.
pub const KVM_PAGE_FAULT_PROGRAM: &str = "kvm_page_fault";

/// Name of the program on `kvmmmu:fast_page_fault`.
pub const FAST_PAGE_FAULT_PROGRAM: &str = "fast_page_fault";

/// Offset of `u64 fault_address` (a guest physical address under EPT/NPT)
/// in the `kvm:kvm_page_fault` record.
pub const KVM_PAGE_FAULT_ADDRESS_OFFSET: usize = 24;

/// Offset of `u64 error_code` in the `kvm:kvm_page_fault` record.
pub const KVM_PAGE_FAULT_ERROR_CODE_OFFSET: usize = 32;

/// Offset of `gpa_t cr2_or_gpa` (a guest physical address under EPT/NPT)
/// in the `kvmmmu:fast_page_fault` record.
pub const FAST_PAGE_FAULT_GPA_OFFSET: usize = 16;

/// Offset of `u64 error_code` in the `kvmmmu:fast_page_fault` record.
pub const FAST_PAGE_FAULT_ERROR_CODE_OFFSET: usize = 24;

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
    /// `kvm_page_fault` and `fast_page_fault` events of the target (reads
    /// and writes, both programs).
    FaultEvents = 7,
    /// Of those, write faults (error code bit 1), recorded in
    /// [`FAULT_PAGES_MAP`].
    FaultWrites = 8,
    /// `kvm_page_fault` and `fast_page_fault` events of other thread groups.
    FaultFiltered = 9,
}

impl WriteStat {
    /// Number of statistics, the `max_entries` of [`WRITE_STATS_MAP`].
    pub const COUNT: u32 = 10;

    /// Every statistic, in index order.
    pub const ALL: [WriteStat; Self::COUNT as usize] = [
        WriteStat::RingEvents,
        WriteStat::RingFiltered,
        WriteStat::WalkEvents,
        WriteStat::WalkWrites,
        WriteStat::WalkFiltered,
        WriteStat::MapFull,
        WriteStat::ReadErrors,
        WriteStat::FaultEvents,
        WriteStat::FaultWrites,
        WriteStat::FaultFiltered,
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

// ---- copy-on-write fault tracing (issue 5): exceptions:page_fault_user ----
//
// [`COW_FAULT_PROGRAM`] runs on `exceptions:page_fault_user` next to
// [`PAGE_FAULT_USER_PROGRAM`]. It keeps only *write* faults (error code bit
// 1) of the thread group in [`CowConfig::target_tgid`] whose address lies in
// one of the [`CowConfig::ranges`] (the VMM's guest-memory mappings). Each
// such fault is one [`CowEventRecord`] in the ring buffer [`COW_EVENTS_MAP`]
// and is counted in the per-CPU array [`COW_STATS_MAP`] ([`CowStat`]). With
// the VMM's userfaultfd write-protect view armed, these are the
// copy-on-write faults of host threads writing guest memory.
//
// | map | type | key | value |
// |---|---|---|---|
// | [`COW_CONFIG_MAP`] | array, 1 entry | `u32` 0 | [`CowConfig`] |
// | [`COW_EVENTS_MAP`] | ring buffer, [`COW_EVENTS_BYTES`] bytes | - | [`CowEventRecord`] records |
// | [`COW_STATS_MAP`] | per-CPU array | `u32` [`CowStat`] index | `u64` events since load |

/// Name of the program on `exceptions:page_fault_user` that records
/// copy-on-write (write) faults in guest memory.
pub const COW_FAULT_PROGRAM: &str = "cow_page_fault";

/// Name of the array map (one entry, index 0) holding the [`CowConfig`].
pub const COW_CONFIG_MAP: &str = "SIMREP_COW_CONFIG";

/// Name of the ring buffer of [`CowEventRecord`]s.
pub const COW_EVENTS_MAP: &str = "SIMREP_COW_EVENTS";

/// Name of the per-CPU array of `u64` statistics, indexed by [`CowStat`].
pub const COW_STATS_MAP: &str = "SIMREP_COW_STATS";

/// Size of [`COW_EVENTS_MAP`] in bytes (a power of two, a multiple of the
/// page size): 43 690 records of 48 bytes (40 plus the ring's 8-byte
/// header) fit.
pub const COW_EVENTS_BYTES: u32 = 2 << 20;

/// Most guest-memory ranges [`CowConfig`] holds.
pub const COW_RANGES_MAX: usize = 4;

/// Offset of `unsigned long address` (the faulting virtual address) in the
/// `exceptions:page_fault_user` record.
pub const PAGE_FAULT_USER_ADDRESS_OFFSET: usize = 8;

/// One guest-memory mapping of the VMM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowRange {
    /// Host virtual address of the mapping.
    pub host_addr: u64,
    /// Its length in bytes (0: unused slot).
    pub len: u64,
    /// Guest physical address that `host_addr` maps.
    pub guest_phys: u64,
}

/// Configuration of [`COW_FAULT_PROGRAM`], entry 0 of [`COW_CONFIG_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowConfig {
    /// Thread group (the VMM process) whose faults are recorded; 0 records
    /// nothing.
    pub target_tgid: u32,
    /// Ranges in use, the first `nr_ranges` of `ranges`.
    pub nr_ranges: u32,
    /// The guest-memory mappings.
    pub ranges: [CowRange; COW_RANGES_MAX],
}

/// One write fault in guest memory, as written to [`COW_EVENTS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowEventRecord {
    /// Faulting host virtual address (exact, not page-aligned).
    pub host_addr: u64,
    /// Guest frame number: `(guest_phys + host_addr - range.host_addr) >> 12`.
    pub gfn: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at the fault.
    pub ktime_ns: u64,
    /// The x86 page-fault error code (low 32 bits; bit 0 present, bit 1
    /// write, bit 2 user).
    pub error_code: u32,
    /// CPU the fault was taken on.
    pub cpu: u32,
    /// Faulting thread id (kernel pid).
    pub tid: u32,
    /// Index of the range in [`CowConfig::ranges`].
    pub range: u32,
}

/// Indices into the per-CPU statistics array [`COW_STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CowStat {
    /// Write faults of the target in a configured range (recorded or not).
    CowFaults = 0,
    /// Of those, events dropped because the ring buffer was full.
    RingFull = 1,
    /// Read faults of the target in a configured range (not recorded).
    ReadFaults = 2,
    /// Faults of the target outside the configured ranges.
    OutsideRanges = 3,
    /// Faults of other thread groups (filtered out).
    OtherTgid = 4,
    /// Tracepoint records that could not be read.
    ReadErrors = 5,
}

impl CowStat {
    /// Number of statistics, the `max_entries` of [`COW_STATS_MAP`].
    pub const COUNT: u32 = 6;

    /// Every statistic, in index order.
    pub const ALL: [CowStat; Self::COUNT as usize] = [
        CowStat::CowFaults,
        CowStat::RingFull,
        CowStat::ReadFaults,
        CowStat::OutsideRanges,
        CowStat::OtherTgid,
        CowStat::ReadErrors,
    ];

    /// The statistic's index in [`COW_STATS_MAP`].
    pub const fn index(self) -> u32 {
        self as u32
    }
}

// SAFETY: `CowConfig` is `#[repr(C)]`, `Copy`, made of `u32`s and `u64`s
// laid out without padding (checked by the size assertion below), so every
// bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for CowConfig {}

// SAFETY: as for `CowConfig`: `#[repr(C)]`, `Copy`, no padding.
#[cfg(feature = "user")]
unsafe impl aya::Pod for CowEventRecord {}

const _: () = assert!(core::mem::size_of::<CowRange>() == 24);
const _: () = assert!(core::mem::size_of::<CowConfig>() == 8 + 24 * COW_RANGES_MAX);
const _: () = assert!(core::mem::size_of::<CowEventRecord>() == 40);
const _: () = assert!(core::mem::align_of::<CowEventRecord>() == 8);

#[cfg(test)]
mod cow_tests {
    use super::*;

    #[test]
    fn cow_stat_indices_are_dense() {
        for (i, c) in CowStat::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i);
        }
    }
}

// ---- end of copy-on-write fault tracing ----------------------------------

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
