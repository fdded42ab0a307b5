//! simrep's eBPF programs, built for `bpfel-unknown-none` by `simrep/build.rs`.
//!
//! * `page_fault_user` (tracepoint `exceptions:page_fault_user`): counts the
//!   user page faults, and separately the write faults, of the thread group
//!   configured in `SIMREP_CONFIG` into the per-CPU array `SIMREP_FAULTS`.
//! * `kvm_dirty_ring_push` (tracepoint `kvm:kvm_dirty_ring_push`): per page
//!   the dirty ring reports for the configured thread group, bumps its
//!   per-CPU count in `SIMREP_RING_PAGES`.
//! * `kvm_mmu_pagetable_walk` (tracepoint `kvmmmu:kvm_mmu_pagetable_walk`):
//!   per guest write access walked by the shadow MMU, bumps the per-CPU count
//!   of the guest virtual page in `SIMREP_WALK_PAGES`.
//! * `kvm_page_fault` (tracepoint `kvm:kvm_page_fault`) and
//!   `fast_page_fault` (tracepoint `kvmmmu:fast_page_fault`), which fire
//!   on hosts with hardware-assisted paging (VMX/SVM), not under PVM: per
//!   guest write fault, bump the per-CPU count of the guest frame in
//!   `SIMREP_FAULT_PAGES` (one map for both).
//!
//! All of them count their events in `SIMREP_WRITE_STATS`.
//! * `cow_page_fault` (tracepoint `exceptions:page_fault_user`, in
//!   `cow.rs`): records the configured thread group's write faults in its
//!   guest-memory ranges in the ring buffer `SIMREP_COW_EVENTS`.
//!
//! The map and program names, the config struct and the counter indices live
//! in `simrep-common`, which user space shares.
#![no_std]
#![no_main]

// Copy-on-write fault tracing (issue 5), in its own file.
mod cow;

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    btf_maps::{Array, PerCpuArray, PerCpuHashMap},
    helpers::bpf_get_current_pid_tgid,
    macros::{btf_map, tracepoint},
    programs::TracePointContext,
};
use aya_log_ebpf::error;
use simrep_common::{
    ring_page_key, WriteStat, DIRTY_RING_PUSH_OFFSET_OFFSET, DIRTY_RING_PUSH_PROGRAM,
    DIRTY_RING_PUSH_SLOT_OFFSET, PAGETABLE_WALK_ADDR_OFFSET, PAGETABLE_WALK_PFERR_OFFSET,
    PAGETABLE_WALK_PROGRAM, RING_PAGES_MAP, WALK_PAGES_MAP, WRITE_PAGES_MAX, WRITE_STATS_MAP,
};
use simrep_common::{
    Counter, FaultConfig, CONFIG_MAP, FAULT_COUNTERS_MAP, PAGE_FAULT_USER_CATEGORY,
    PAGE_FAULT_USER_ERROR_CODE_OFFSET, PAGE_FAULT_USER_PROGRAM, PAGE_FAULT_USER_TRACEPOINT,
    PF_ERROR_WRITE,
};
use simrep_common::{
    FAST_PAGE_FAULT_ERROR_CODE_OFFSET, FAST_PAGE_FAULT_GPA_OFFSET, FAST_PAGE_FAULT_PROGRAM,
    FAULT_PAGES_MAP, KVM_PAGE_FAULT_ADDRESS_OFFSET, KVM_PAGE_FAULT_ERROR_CODE_OFFSET,
    KVM_PAGE_FAULT_PROGRAM,
};

// BTF-defined maps, so that `bpftool map dump` shows typed values.

/// The program's configuration, entry 0, written by user space.
#[btf_map]
static SIMREP_CONFIG: Array<FaultConfig, 1> = Array::new();

/// Per-CPU `u64` fault counters, indexed by [`Counter`].
#[btf_map]
static SIMREP_FAULTS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

/// Per-CPU write counts of pages reported by the dirty ring.
#[btf_map]
static SIMREP_RING_PAGES: PerCpuHashMap<u64, u64, { WRITE_PAGES_MAX as usize }> =
    PerCpuHashMap::new();

/// Per-CPU write counts of guest virtual pages seen by page-table walks.
#[btf_map]
static SIMREP_WALK_PAGES: PerCpuHashMap<u64, u64, { WRITE_PAGES_MAX as usize }> =
    PerCpuHashMap::new();

/// Per-CPU write-fault counts of guest frames seen by `kvm_page_fault` and
/// `fast_page_fault`.
#[btf_map]
static SIMREP_FAULT_PAGES: PerCpuHashMap<u64, u64, { WRITE_PAGES_MAX as usize }> =
    PerCpuHashMap::new();

/// Per-CPU `u64` statistics, indexed by [`WriteStat`].
#[btf_map]
static SIMREP_WRITE_STATS: PerCpuArray<u64, { WriteStat::COUNT as usize }> = PerCpuArray::new();

/// Byte-wise string equality usable in constants.
pub(crate) const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// The `#[map]` and `#[tracepoint]` macros take the object names from the item
// names; keep them equal to the names user space looks up.
const _: () = assert!(str_eq(CONFIG_MAP, "SIMREP_CONFIG"));
const _: () = assert!(str_eq(FAULT_COUNTERS_MAP, "SIMREP_FAULTS"));
const _: () = assert!(str_eq(PAGE_FAULT_USER_PROGRAM, "page_fault_user"));
const _: () = assert!(str_eq(RING_PAGES_MAP, "SIMREP_RING_PAGES"));
const _: () = assert!(str_eq(WALK_PAGES_MAP, "SIMREP_WALK_PAGES"));
const _: () = assert!(str_eq(WRITE_STATS_MAP, "SIMREP_WRITE_STATS"));
const _: () = assert!(str_eq(DIRTY_RING_PUSH_PROGRAM, "kvm_dirty_ring_push"));
const _: () = assert!(str_eq(PAGETABLE_WALK_PROGRAM, "kvm_mmu_pagetable_walk"));
const _: () = assert!(str_eq(PAGE_FAULT_USER_CATEGORY, "exceptions"));
const _: () = assert!(str_eq(FAULT_PAGES_MAP, "SIMREP_FAULT_PAGES"));
const _: () = assert!(str_eq(KVM_PAGE_FAULT_PROGRAM, "kvm_page_fault"));
const _: () = assert!(str_eq(FAST_PAGE_FAULT_PROGRAM, "fast_page_fault"));
const _: () = assert!(str_eq(PAGE_FAULT_USER_TRACEPOINT, "page_fault_user"));

/// Entry point on `exceptions:page_fault_user`. (Private: the macro drops
/// this doc comment from the exported wrapper, which `missing_docs` would
/// flag; `no_mangle` exports it all the same.)
#[tracepoint(category = "exceptions", name = "page_fault_user")]
fn page_fault_user(ctx: TracePointContext) -> u32 {
    match try_page_fault_user(&ctx) {
        Ok(ret) => ret,
        Err(err) => {
            // Only on the (unexpected) failure path, never per fault.
            error!(&ctx, "page_fault_user: cannot read the record: {}", err);
            bump(Counter::ReadErrors);
            0
        }
    }
}

/// Counts one user page fault if it belongs to the configured thread group.
fn try_page_fault_user(ctx: &TracePointContext) -> Result<u32, i64> {
    // The upper 32 bits are the thread-group id.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let target = SIMREP_CONFIG.get(0).map_or(0, |c| c.target_tgid);
    if target == 0 || tgid != target {
        bump(Counter::OtherFaults);
        return Ok(0);
    }
    // SAFETY: the offset is that of the 8-byte `error_code` field of the
    // `page_fault_user` record (checked by user space against the kernel's
    // format file before loading); the helper copies it out of the record
    // and reports, instead of faulting, if it cannot.
    let error_code: u64 =
        unsafe { ctx.read_at(PAGE_FAULT_USER_ERROR_CODE_OFFSET) }.map_err(i64::from)?;
    bump(Counter::Faults);
    if error_code & PF_ERROR_WRITE != 0 {
        bump(Counter::WriteFaults);
    }
    Ok(0)
}

/// Adds one to this CPU's slot of `counter`.
#[inline(always)]
fn bump(counter: Counter) {
    if let Some(slot) = SIMREP_FAULTS.get_ptr_mut(counter.index()) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array entry,
        // valid and 8-byte aligned for the program's run; programs do not
        // migrate between CPUs while running, so no other writer races with
        // this plain add.
        unsafe { *slot += 1 };
    }
}

/// Whether the current task belongs to the configured thread group.
#[inline(always)]
fn is_target() -> bool {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let target = SIMREP_CONFIG.get(0).map_or(0, |c| c.target_tgid);
    target != 0 && tgid == target
}

/// Entry point on `kvm:kvm_dirty_ring_push`.
#[tracepoint(category = "kvm", name = "kvm_dirty_ring_push")]
fn kvm_dirty_ring_push(ctx: TracePointContext) -> u32 {
    if !is_target() {
        stat(WriteStat::RingFiltered);
        return 0;
    }
    // SAFETY: offsets of `u32 slot` and `u64 offset` in the record (checked
    // by user space against the format file); the helper copies them out
    // and reports, instead of faulting, if it cannot.
    let read = unsafe {
        (
            ctx.read_at::<u32>(DIRTY_RING_PUSH_SLOT_OFFSET),
            ctx.read_at::<u64>(DIRTY_RING_PUSH_OFFSET_OFFSET),
        )
    };
    let (Ok(slot), Ok(offset)) = read else {
        stat(WriteStat::ReadErrors);
        return 0;
    };
    stat(WriteStat::RingEvents);
    count_page(&SIMREP_RING_PAGES, ring_page_key(slot, offset));
    0
}

/// Entry point on `kvmmmu:kvm_mmu_pagetable_walk`.
#[tracepoint(category = "kvmmmu", name = "kvm_mmu_pagetable_walk")]
fn kvm_mmu_pagetable_walk(ctx: TracePointContext) -> u32 {
    if !is_target() {
        stat(WriteStat::WalkFiltered);
        return 0;
    }
    // SAFETY: offsets of `u64 addr` and `u32 pferr` in the record (checked
    // by user space against the format file); the helper copies them out
    // and reports, instead of faulting, if it cannot.
    let read = unsafe {
        (
            ctx.read_at::<u64>(PAGETABLE_WALK_ADDR_OFFSET),
            ctx.read_at::<u32>(PAGETABLE_WALK_PFERR_OFFSET),
        )
    };
    let (Ok(addr), Ok(pferr)) = read else {
        stat(WriteStat::ReadErrors);
        return 0;
    };
    stat(WriteStat::WalkEvents);
    if u64::from(pferr) & PF_ERROR_WRITE != 0 {
        stat(WriteStat::WalkWrites);
        count_page(&SIMREP_WALK_PAGES, addr >> 12);
    }
    0
}

/// Entry point on `kvm:kvm_page_fault` (VMX/SVM). On VMX `error_code` is
/// the EPT-violation exit qualification, whose bit 1 also means a write.
#[tracepoint(category = "kvm", name = "kvm_page_fault")]
fn kvm_page_fault(ctx: TracePointContext) -> u32 {
    guest_fault(
        &ctx,
        KVM_PAGE_FAULT_ADDRESS_OFFSET,
        KVM_PAGE_FAULT_ERROR_CODE_OFFSET,
    )
}

/// Entry point on `kvmmmu:fast_page_fault` (VMX/SVM).
#[tracepoint(category = "kvmmmu", name = "fast_page_fault")]
fn fast_page_fault(ctx: TracePointContext) -> u32 {
    guest_fault(
        &ctx,
        FAST_PAGE_FAULT_GPA_OFFSET,
        FAST_PAGE_FAULT_ERROR_CODE_OFFSET,
    )
}

/// Counts one guest page fault whose record has the `u64` guest physical
/// address at `gpa_offset` and the `u64` error code at `error_offset`; a
/// write fault bumps its frame in `SIMREP_FAULT_PAGES`.
#[inline(always)]
fn guest_fault(ctx: &TracePointContext, gpa_offset: usize, error_offset: usize) -> u32 {
    if !is_target() {
        stat(WriteStat::FaultFiltered);
        return 0;
    }
    // SAFETY: offsets of the two `u64` fields in the record (checked by user
    // space against the format file); the helper copies them out and
    // reports, instead of faulting, if it cannot.
    let read = unsafe {
        (
            ctx.read_at::<u64>(gpa_offset),
            ctx.read_at::<u64>(error_offset),
        )
    };
    let (Ok(gpa), Ok(error_code)) = read else {
        stat(WriteStat::ReadErrors);
        return 0;
    };
    stat(WriteStat::FaultEvents);
    if error_code & PF_ERROR_WRITE != 0 {
        stat(WriteStat::FaultWrites);
        count_page(&SIMREP_FAULT_PAGES, gpa >> 12);
    }
    0
}

/// Adds one to this CPU's count of `key` in `map`, creating the entry.
#[inline(always)]
fn count_page(map: &PerCpuHashMap<u64, u64, { WRITE_PAGES_MAX as usize }>, key: u64) {
    if let Some(slot) = map.get_ptr_mut(key) {
        // SAFETY: this CPU's value of a per-CPU hash entry, valid for the
        // program's run; programs do not migrate while running, and no
        // other program on this CPU writes it concurrently.
        unsafe { *slot += 1 };
        return;
    }
    // Another program on this CPU cannot have inserted it in between (no
    // preemption inside a program); EEXIST only if user space raced us.
    if map.insert(key, 1u64, BPF_NOEXIST as u64).is_err() {
        stat(WriteStat::MapFull);
    }
}

/// Adds one to this CPU's slot of statistic `s`.
#[inline(always)]
fn stat(s: WriteStat) {
    if let Some(slot) = SIMREP_WRITE_STATS.get_ptr_mut(s.index()) {
        // SAFETY: as in `bump`: this CPU's slot of a per-CPU array entry.
        unsafe { *slot += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that can reach a panic, so this is never
    // called; it only satisfies `no_std`.
    loop {}
}

/// The kernel requires a GPL-compatible licence for the helpers used here
/// (`bpf_probe_read_kernel`).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
