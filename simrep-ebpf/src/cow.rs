//! `cow_page_fault` (tracepoint `exceptions:page_fault_user`): records the
//! write faults of the configured thread group inside its guest-memory
//! ranges — with the VMM's userfaultfd write-protect view armed, its
//! copy-on-write faults — as [`CowEventRecord`]s in the ring buffer
//! `SIMREP_COW_EVENTS`, and counts them in the per-CPU array
//! `SIMREP_COW_STATS`. Configuration (thread group, ranges) in
//! `SIMREP_COW_CONFIG`. Layouts and names in `simrep-common`.

use aya_ebpf::{
    btf_maps::{Array, PerCpuArray, RingBuf},
    helpers::{bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use simrep_common::{
    CowConfig, CowEventRecord, CowStat, COW_CONFIG_MAP, COW_EVENTS_BYTES, COW_EVENTS_MAP,
    COW_FAULT_PROGRAM, COW_STATS_MAP, PAGE_FAULT_USER_ADDRESS_OFFSET,
    PAGE_FAULT_USER_ERROR_CODE_OFFSET, PF_ERROR_WRITE,
};

use crate::str_eq;

/// The configuration, entry 0, written by user space.
#[btf_map]
static SIMREP_COW_CONFIG: Array<CowConfig, 1> = Array::new();

/// Ring buffer of copy-on-write fault events.
#[btf_map]
static SIMREP_COW_EVENTS: RingBuf<CowEventRecord, { COW_EVENTS_BYTES as usize }> = RingBuf::new();

/// Per-CPU `u64` statistics, indexed by [`CowStat`].
#[btf_map]
static SIMREP_COW_STATS: PerCpuArray<u64, { CowStat::COUNT as usize }> = PerCpuArray::new();

const _: () = assert!(str_eq(COW_CONFIG_MAP, "SIMREP_COW_CONFIG"));
const _: () = assert!(str_eq(COW_EVENTS_MAP, "SIMREP_COW_EVENTS"));
const _: () = assert!(str_eq(COW_STATS_MAP, "SIMREP_COW_STATS"));
const _: () = assert!(str_eq(COW_FAULT_PROGRAM, "cow_page_fault"));

/// Entry point on `exceptions:page_fault_user`.
#[tracepoint(category = "exceptions", name = "page_fault_user")]
fn cow_page_fault(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(config) = SIMREP_COW_CONFIG.get(0) else {
        return 0;
    };
    if config.target_tgid == 0 || (pid_tgid >> 32) as u32 != config.target_tgid {
        stat(CowStat::OtherTgid);
        return 0;
    }
    // SAFETY: offsets of the 8-byte `address` and `error_code` fields of the
    // `page_fault_user` record (checked by user space against the kernel's
    // format file before loading); the helper copies them out of the record
    // and reports, instead of faulting, if it cannot.
    let read = unsafe {
        (
            ctx.read_at::<u64>(PAGE_FAULT_USER_ADDRESS_OFFSET),
            ctx.read_at::<u64>(PAGE_FAULT_USER_ERROR_CODE_OFFSET),
        )
    };
    let (Ok(addr), Ok(error_code)) = read else {
        stat(CowStat::ReadErrors);
        return 0;
    };
    // A fixed bound the verifier can see; no indexing, so no bounds check
    // (and no panic path) is generated.
    let mut index = 0u32;
    for range in config.ranges.iter() {
        if index >= config.nr_ranges {
            break;
        }
        if addr >= range.host_addr && addr - range.host_addr < range.len {
            if error_code & PF_ERROR_WRITE == 0 {
                stat(CowStat::ReadFaults);
                return 0;
            }
            stat(CowStat::CowFaults);
            let record = CowEventRecord {
                host_addr: addr,
                gfn: (range.guest_phys + (addr - range.host_addr)) >> 12,
                // SAFETY: neither helper has preconditions.
                ktime_ns: unsafe { bpf_ktime_get_ns() },
                error_code: error_code as u32,
                // SAFETY: as above.
                cpu: unsafe { bpf_get_smp_processor_id() },
                tid: pid_tgid as u32,
                range: index,
            };
            if SIMREP_COW_EVENTS.output(record, 0).is_err() {
                stat(CowStat::RingFull);
            }
            return 0;
        }
        index += 1;
    }
    stat(CowStat::OutsideRanges);
    0
}

/// Adds one to this CPU's slot of statistic `s`.
#[inline(always)]
fn stat(s: CowStat) {
    if let Some(slot) = SIMREP_COW_STATS.get_ptr_mut(s.index()) {
        // SAFETY: this CPU's slot of a per-CPU array entry, valid and 8-byte
        // aligned for the program's run; programs do not migrate between
        // CPUs while running, so no other writer races with this plain add.
        unsafe { *slot += 1 };
    }
}
