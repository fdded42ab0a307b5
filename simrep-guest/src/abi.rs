//! The contract between the VMM and the bundled guest: the guest memory map,
//! the descriptor-table layout, the boot parameters and the MMIO registers.
//!
//! This file is compiled twice: into the guest (`simrep-guest`, for
//! `x86_64-unknown-none`) and into the VMM (`simrep::vmm::abi`, through a
//! `#[path]` include), so that both sides read one definition. It uses
//! `core` only, and every structure is `#[repr(C)]` with explicit padding
//! and fixed-width fields.
//!
//! # Guest memory map
//!
//! Guest RAM is one region at guest-physical address 0. The VMM identity-maps
//! it (virtual address = guest-physical address) with 4 KiB pages in the
//! first 2 MiB and 2 MiB pages above; the MMIO window is mapped uncached.
//! "S" pages are supervisor-only, "U" pages are reachable from CPL3.
//!
//! | GPA range                   | what                                            | access |
//! |-----------------------------|-------------------------------------------------|--------|
//! | `0x0000_0000..0x0000_1000`  | not mapped (null guard)                         | -      |
//! | `0x0000_1000..0x0000_2000`  | [`BootParams`], written by the VMM              | U, RO  |
//! | `0x0000_2000..0x0000_3000`  | GDT, written by the VMM ([`gdt`])               | S, RW  |
//! | `0x0000_3000..0x0000_4000`  | one 128-byte TSS per vCPU (guest sets RSP0)     | S, RW  |
//! | `0x0000_4000..0x0000_5000`  | IDT (256 gates), filled by the guest            | S, RW  |
//! | `0x0000_5000..0x0000_6000`  | [`VcpuStatus`] per vCPU (progress counters)     | U, RW  |
//! | `0x0000_6000..0x0000_8000`  | [`ExceptionReport`] per vCPU, 256 bytes each    | S, RW  |
//! | `0x0001_0000..0x0006_0000`  | page tables, written by the VMM                 | S, RW  |
//! | `0x0006_0000..0x000e_0000`  | CPL0 stacks, 16 KiB per vCPU                    | S, RW  |
//! | `0x0010_0000..0x0020_0000`  | the guest image (ELF `PT_LOAD` segments)        | U, RW  |
//! | `0x0020_0000..0x0040_0000`  | CPL3 stacks, 64 KiB per vCPU                    | U, RW  |
//! | `0x0040_0000..mem_size`     | workload heap                                   | U, RW  |
//! | [`MMIO_BASE`]`..+2 MiB`     | MMIO window: no memory behind it (KVM exits)    | U, RW, uncached |
//!
//! # MMIO registers
//!
//! Every access in the window leaves `KVM_RUN` with `KVM_EXIT_MMIO`; an
//! address no device claims stops the VM with an error. Accesses are
//! little-endian and must use the width given.
//!
//! | address                     | width | dir | register |
//! |-----------------------------|-------|-----|----------|
//! | [`CONSOLE_LINE`]            | 8     | W   | `gpa \| len << 48`: the guest bytes `gpa..gpa+len` are one console line (no newline needed; `len <=` [`CONSOLE_MAX_LINE`]) |
//! | [`CONSOLE_PUTC`]            | 1     | W   | one byte; the VMM buffers until `\n` (slow path, one exit a byte) |
//! | [`SYS_EXIT`]                | 8     | W   | the workload finished with this status (0 = success); the vCPU stops |
//! | [`SYS_EXCEPTION`]           | 8     | W   | GPA of an [`ExceptionReport`]; the vCPU stops with a guest-exception error |
//! | [`SYS_TIME_NS`]             | 8     | R   | host monotonic clock in ns |
//! | [`SYS_NOP`]                 | 8     | W   | ignored: measures the MMIO exit round trip |
//! | [`SYS_IDLE`]                | 8     | W   | idle this vCPU for up to this many ns (capped at [`SYS_IDLE_MAX_NS`]); the VMM waits on the vCPU thread, so a pause or stop ends the wait early |
//! | [`NET_SETUP`] .. [`NET_WAIT`] | 8   | W   | the network device (request/response rings in guest RAM): see [`NET_BASE`] |
//!
//! <!-- block device registers: begin -->
//! | [`BLOCK_CAPACITY`]          | 8     | R   | disk size in 512-byte sectors (0: no disk attached) |
//! | [`BLOCK_REQUEST`]           | 8     | W   | GPA of a [`BlockRequest`]: the VMM executes it synchronously during this exit and writes its status back into the descriptor |
//! | [`BLOCK_STATUS`]            | 8     | R   | the status of this vCPU's last [`BLOCK_REQUEST`] (the only place a [`block_status::BAD_DESCRIPTOR`] shows) |
//!
//! Block requests: `op` is a [`block_op`] code; READ and WRITE move `count`
//! sectors (1..=[`BLOCK_MAX_SECTORS`]) from sector `sector` to or from the
//! guest bytes `buffer..buffer + count * 512` (any address in RAM, no
//! alignment needed); FLUSH ignores the other fields. Every field is
//! validated; a bad one fails the request with a [`block_status`] code and
//! never stops the guest. See `simrep/src/vmm/block.rs` for the write buffer
//! and what a completed WRITE and FLUSH guarantee.
//! <!-- block device registers: end -->
//!
//! While a vCPU idles through [`SYS_IDLE`] it is outside `KVM_RUN`, so
//! periodic timer interrupts that fall in the idle are coalesced into one.
//!
//! A whole console line costs one exit: the guest formats it in its own
//! memory and writes one 8-byte doorbell value carrying the line's address
//! and length.

/// Size of a small page.
pub const PAGE_SIZE: u64 = 0x1000;
/// Size of a large (2 MiB) page.
pub const LARGE_PAGE_SIZE: u64 = 0x20_0000;

/// GPA of the [`BootParams`] page.
pub const BOOT_PARAMS_GPA: u64 = 0x1000;
/// GPA of the GDT (see [`gdt`] for its entries).
pub const GDT_GPA: u64 = 0x2000;
/// GPA of the first TSS; vCPU `i` uses `TSS_GPA + i * TSS_STRIDE`.
pub const TSS_GPA: u64 = 0x3000;
/// Bytes between two TSSes (a 64-bit TSS is 104 bytes).
pub const TSS_STRIDE: u64 = 0x80;
/// Offset of `RSP0` inside a 64-bit TSS.
pub const TSS_RSP0_OFFSET: u64 = 4;
/// Limit of a 64-bit TSS (its size minus one).
pub const TSS_LIMIT: u32 = 0x67;
/// GPA of the IDT (256 gates of 16 bytes; filled by the guest).
pub const IDT_GPA: u64 = 0x4000;
/// Limit of the IDT.
pub const IDT_LIMIT: u16 = 0xfff;
/// GPA of the [`VcpuStatus`] array.
pub const STATUS_GPA: u64 = 0x5000;
/// GPA of the [`ExceptionReport`] array.
pub const EXCEPTION_REPORT_GPA: u64 = 0x6000;
/// Bytes between two exception reports (the report, then its text line).
pub const EXCEPTION_REPORT_STRIDE: u64 = 0x100;
/// GPA of the page-table area (PML4 first).
pub const PAGE_TABLES_GPA: u64 = 0x1_0000;
/// End of the page-table area.
pub const PAGE_TABLES_END: u64 = 0x6_0000;
/// GPA of the CPL0 stacks; vCPU `i`'s stack ends at
/// `KERNEL_STACKS_GPA + (i + 1) * KERNEL_STACK_SIZE`.
pub const KERNEL_STACKS_GPA: u64 = 0x6_0000;
/// Size of one CPL0 stack.
pub const KERNEL_STACK_SIZE: u64 = 0x4000;
/// GPA at which the guest image is linked and loaded.
pub const IMAGE_GPA: u64 = 0x10_0000;
/// End of the guest image area.
pub const IMAGE_END: u64 = 0x20_0000;
/// GPA of the CPL3 stacks; vCPU `i`'s stack ends at
/// `USER_STACKS_GPA + (i + 1) * USER_STACK_SIZE`.
pub const USER_STACKS_GPA: u64 = 0x20_0000;
/// Size of one CPL3 stack.
pub const USER_STACK_SIZE: u64 = 0x1_0000;
/// First byte of the workload heap.
pub const HEAP_GPA: u64 = 0x40_0000;

/// Most vCPUs the memory map has room for.
pub const MAX_VCPUS: u32 = 32;
/// Smallest guest RAM size.
pub const MIN_MEM_SIZE: u64 = 8 << 20;
/// Largest guest RAM size: RAM must end below the MMIO window.
pub const MAX_MEM_SIZE: u64 = MMIO_BASE;

/// GPA of the MMIO window (64 GiB, above any RAM).
pub const MMIO_BASE: u64 = 0x10_0000_0000;
/// Size of the MMIO window (one 2 MiB page in the guest page tables).
pub const MMIO_SIZE: u64 = LARGE_PAGE_SIZE;
/// Base of the console device's registers.
pub const CONSOLE_BASE: u64 = MMIO_BASE;
/// Console: one whole line, `gpa | len << 48` (8-byte write).
pub const CONSOLE_LINE: u64 = CONSOLE_BASE;
/// Console: one byte (1-byte write).
pub const CONSOLE_PUTC: u64 = CONSOLE_BASE + 0x8;
/// Longest console line the VMM accepts.
pub const CONSOLE_MAX_LINE: u64 = 1024;
/// Shift of the length in a [`CONSOLE_LINE`] value.
pub const CONSOLE_LEN_SHIFT: u32 = 48;
/// Base of the system-control device's registers.
pub const SYS_BASE: u64 = MMIO_BASE + 0x1000;
/// System: the workload finished with a status (8-byte write).
pub const SYS_EXIT: u64 = SYS_BASE;
/// System: GPA of an [`ExceptionReport`] (8-byte write).
pub const SYS_EXCEPTION: u64 = SYS_BASE + 0x8;
/// System: host monotonic time in ns (8-byte read).
pub const SYS_TIME_NS: u64 = SYS_BASE + 0x10;
/// System: ignored write (exit round-trip measurement).
pub const SYS_NOP: u64 = SYS_BASE + 0x18;
/// System: idle for up to this many ns (8-byte write). CPL3 cannot `hlt`;
/// this keeps a rate-limited workload from burning a host CPU.
pub const SYS_IDLE: u64 = SYS_BASE + 0x20;
/// Longest idle the VMM grants per [`SYS_IDLE`] write (100 ms).
pub const SYS_IDLE_MAX_NS: u64 = 100_000_000;

// --- net: the paravirtual network device (issue 3) ---

/// Base of the network device's registers.
///
/// # Network device
///
/// The VMM terminates client TCP connections (framing in `proto.rs`) and
/// passes each request message to the guest through a request ring, and
/// takes responses back through a response ring. Both rings live in guest
/// RAM, allocated by the guest in its heap; the registers are at
/// `MMIO_BASE + 0x2000 .. + 0x3000`:
///
/// | address          | width | dir | register |
/// |------------------|-------|-----|----------|
/// | [`NET_SETUP`]    | 8     | W   | GPA of a [`NetRings`] block (64-byte aligned, in the heap); once |
/// | [`NET_NOTIFY`]   | 8     | W   | value ignored: the VMM takes every published response and puts queued requests into the request ring |
/// | [`NET_WAIT`]     | 8     | W   | as [`NET_NOTIFY`], then, if the request ring is still empty, idle the vCPU until a request arrives or this many ns pass (capped at [`NET_WAIT_MAX_NS`]); a pause or stop ends the wait early |
///
/// ## Rings
///
/// Each ring is a power-of-two byte array with free-running 64-bit byte
/// positions `head` (producer) and `tail` (consumer) in [`NetRings`];
/// `head - tail` bytes are in use, `ring[pos % size]` is where position
/// `pos` lives. The VMM produces into the request ring and consumes the
/// response ring; the guest the reverse. The VMM reads and writes guest RAM
/// only while a vCPU is inside a `NET_*` exit (on that vCPU's thread), so the
/// guest sees the rings change only across its own `NET_NOTIFY` /
/// `NET_WAIT` writes, and a paused guest's memory is stable.
///
/// A ring holds records, each a [`NetRecord`] header and `len` bytes of
/// message, padded to [`NET_RECORD_ALIGN`]. A record never wraps: when it
/// does not fit before the end of the array, the producer writes a header
/// of kind [`NET_REC_PAD`] (its other fields 0) and continues at the start.
/// The request ring is at least [`NET_REQ_RING_MIN`] bytes and the
/// response ring at least [`NET_RESP_RING_MIN`], so that the largest record
/// always fits in an empty ring.
///
/// Request records carry the connection id and the per-connection sequence
/// number (0, 1, 2, ...) of the request; the response record for it must
/// carry the same pair, and responses of one connection must come in
/// sequence order. The VMM checks every index, length, kind and sequence
/// the guest gives it; a violation stops the vCPU with a device error.
/// Responses for connections that have closed meanwhile are dropped.
///
/// One exit per batch: the guest handles every request in the ring,
/// publishes `resp_head` and `req_tail`, and writes `NET_WAIT`, which both
/// hands over the responses and brings the next requests.
pub const NET_BASE: u64 = MMIO_BASE + 0x2000;
/// End of the network device's register window.
pub const NET_END: u64 = MMIO_BASE + 0x3000;
/// Network: GPA of the [`NetRings`] block (8-byte write, once).
pub const NET_SETUP: u64 = NET_BASE;
/// Network: hand over responses, take requests (8-byte write).
pub const NET_NOTIFY: u64 = NET_BASE + 0x8;
/// Network: as [`NET_NOTIFY`], then wait up to this many ns for a request
/// (8-byte write).
pub const NET_WAIT: u64 = NET_BASE + 0x10;
/// Longest wait the VMM grants per [`NET_WAIT`] write (100 ms).
pub const NET_WAIT_MAX_NS: u64 = 100_000_000;
/// `"SIMREPNT"` as a little-endian `u64`, in [`NetRings::magic`].
pub const NET_MAGIC: u64 = u64::from_le_bytes(*b"SIMREPNT");
/// Alignment of every record (and of the record sizes).
pub const NET_RECORD_ALIGN: u64 = 16;
/// Bytes of a [`NetRecord`] header.
pub const NET_RECORD_HEADER: u64 = 16;
/// Record kind: a message.
pub const NET_REC_MSG: u32 = 1;
/// Record kind: padding to the end of the ring array.
pub const NET_REC_PAD: u32 = 2;
/// Smallest request ring (twice the largest request record, rounded up).
pub const NET_REQ_RING_MIN: u64 = 256 << 10;
/// Smallest response ring (twice the largest response record, rounded up).
pub const NET_RESP_RING_MIN: u64 = 1 << 20;
/// Largest ring.
pub const NET_RING_MAX: u64 = 64 << 20;

/// The network device's shared block, at the GPA written to [`NET_SETUP`].
/// The VMM copies the ring descriptions once, at setup; the four positions
/// are live for the life of the device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRings {
    /// [`NET_MAGIC`].
    pub magic: u64,
    /// GPA of the request ring's bytes (aligned to [`NET_RECORD_ALIGN`]).
    pub req_gpa: u64,
    /// Size of the request ring: a power of two in
    /// [`NET_REQ_RING_MIN`]`..=`[`NET_RING_MAX`].
    pub req_size: u64,
    /// GPA of the response ring's bytes (aligned to [`NET_RECORD_ALIGN`]).
    pub resp_gpa: u64,
    /// Size of the response ring: a power of two in
    /// [`NET_RESP_RING_MIN`]`..=`[`NET_RING_MAX`].
    pub resp_size: u64,
    /// Zero.
    pub reserved0: [u64; 3],
    /// Request ring: bytes produced (written by the VMM).
    pub req_head: u64,
    /// Request ring: bytes consumed (written by the guest).
    pub req_tail: u64,
    /// Response ring: bytes produced (written by the guest).
    pub resp_head: u64,
    /// Response ring: bytes consumed (written by the VMM).
    pub resp_tail: u64,
    /// Zero.
    pub reserved1: [u64; 4],
}

/// Byte offset of [`NetRings::req_head`].
pub const NET_REQ_HEAD_OFFSET: u64 = 64;
/// Byte offset of [`NetRings::req_tail`].
pub const NET_REQ_TAIL_OFFSET: u64 = 72;
/// Byte offset of [`NetRings::resp_head`].
pub const NET_RESP_HEAD_OFFSET: u64 = 80;
/// Byte offset of [`NetRings::resp_tail`].
pub const NET_RESP_TAIL_OFFSET: u64 = 88;

/// The header of a ring record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetRecord {
    /// Connection id (assigned by the VMM, never reused in a run).
    pub conn: u32,
    /// Sequence number of the request within its connection.
    pub seq: u32,
    /// Bytes of message after the header (no length prefix).
    pub len: u32,
    /// [`NET_REC_MSG`] or [`NET_REC_PAD`].
    pub kind: u32,
}

/// Bytes a record with a `len`-byte message takes in a ring.
pub const fn net_record_size(len: u64) -> u64 {
    (NET_RECORD_HEADER + len + NET_RECORD_ALIGN - 1) & !(NET_RECORD_ALIGN - 1)
}

/// Where a producer at position `head` puts a record of `rec` bytes (a
/// [`net_record_size`]) in a ring of `size` bytes whose consumer is at
/// `tail`: the record's position. When that is not `head`, the record would
/// have wrapped, and a [`NET_REC_PAD`] header goes at `head`. `None` when the
/// ring has not got the room now. Requires `tail <= head <= tail + size`,
/// 16-aligned positions and a power-of-two `size`.
pub const fn net_place_record(head: u64, tail: u64, size: u64, rec: u64) -> Option<u64> {
    let free = size - (head - tail);
    let to_end = size - head % size;
    if rec <= to_end {
        if rec <= free {
            Some(head)
        } else {
            None
        }
    } else if to_end + rec <= free {
        Some(head + to_end)
    } else {
        None
    }
}

// --- end net ---

/// GDT selectors. The VMM writes the GDT; the TSS descriptors point at the
/// per-vCPU TSSes and are marked busy because the VMM loads `TR` directly.
pub mod gdt {
    /// 64-bit kernel code segment.
    pub const KERNEL_CS: u16 = 0x08;
    /// Kernel data segment.
    pub const KERNEL_DS: u16 = 0x10;
    /// User data segment (RPL 3 included).
    pub const USER_DS: u16 = 0x18 | 3;
    /// 64-bit user code segment (RPL 3 included).
    pub const USER_CS: u16 = 0x20 | 3;
    /// Selector of the first TSS descriptor (16 bytes each).
    pub const TSS_BASE: u16 = 0x28;

    /// The TSS selector of vCPU `cpu`.
    pub const fn tss(cpu: u32) -> u16 {
        TSS_BASE + 16 * cpu as u16
    }
}

/// IDT vector of the LAPIC timer.
pub const TIMER_VECTOR: u8 = 0x20;
/// IDT vector of spurious LAPIC interrupts.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Byte offset of [`VcpuStatus::ticks`].
pub const STATUS_TICKS_OFFSET: u64 = 16;

/// `"SIMREPBP"` as a little-endian `u64`.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"SIMREPBP");
/// Version of [`BootParams`]; bumped on any layout change.
pub const BOOT_VERSION: u32 = 2;

/// Workload codes for [`BootParams::workload`].
pub mod workload {
    /// Dirty memory at a given rate with a given content similarity.
    pub const CHURN: u32 = 1;
    /// Exercise the console, measure an MMIO round trip, then fault on
    /// purpose (see [`super::fault`]).
    pub const SELFTEST: u32 = 2;
    /// Write pages chosen by a seeded PRNG and log each one first (see
    /// [`super::TouchParams`]): the dirty-tracking exactness workload.
    pub const TOUCH: u32 = 5;
    /// Incompressible (pseudo-random) writes over a buffer at a rate (see
    /// [`super::RandomParams`]).
    pub const RANDOM: u32 = 6;
    /// Block device test: pattern, append-only log, error probes and
    /// throughput (see [`super::DiskParams`]).
    pub const DISK: u32 = 7;
    // --- net: the network services (issue 3) ---
    /// The key-value service over the network device (see `proto.rs`).
    pub const KV: u32 = 3;
    /// The banking service over the network device (see `proto.rs`).
    pub const BANK: u32 = 4;
    // --- end net ---
}

/// Fault kinds for [`SelftestParams::fault`].
pub mod fault {
    /// No fault: the selftest exits with status 0.
    pub const NONE: u32 = 0;
    /// Write to an unmapped page: `#PF`, vector 14.
    pub const PAGE_FAULT: u32 = 1;
    /// `ud2`: `#UD`, vector 6.
    pub const INVALID_OPCODE: u32 = 2;
    /// `hlt` at CPL3: `#GP(0)`, vector 13.
    pub const GENERAL_PROTECTION: u32 = 3;
    /// Write to an MMIO address no device claims.
    pub const UNKNOWN_MMIO: u32 = 4;
    /// Integer division by zero: `#DE`, vector 0.
    pub const DIVIDE_ERROR: u32 = 5;
}

/// Parameters of the `churn` workload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChurnParams {
    /// Target dirty rate in MiB/s over all vCPUs (0 = as fast as possible).
    pub rate_mib_s: u32,
    /// Share of each rewritten page that keeps its previous content, in %
    /// (0..=100).
    pub similarity_pct: u32,
    /// Bytes of heap the workload churns (split between vCPUs).
    pub buffer_bytes: u64,
    /// Interval between progress lines in ms (0 = no progress lines).
    pub report_ms: u32,
    /// Run time in seconds, then exit with status 0 (0 = forever).
    pub seconds: u32,
}

/// Parameters of the `selftest` workload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SelftestParams {
    /// The deliberate fault at the end (a [`fault`] code).
    pub fault: u32,
    /// MMIO round trips to time.
    pub mmio_round_trips: u32,
}

// --- net: parameters of the kv and bank workloads ---

/// Parameters of the `kv` workload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvParams {
    /// Bytes of heap for keys, values and the index (0 = all of the heap
    /// the network rings leave).
    pub data_bytes: u64,
}

/// Parameters of the `bank` workload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BankParams {
    /// Number of accounts (`0..accounts`).
    pub accounts: u32,
    /// History records kept per account (older ones are overwritten).
    pub history_per_account: u32,
}

// --- end net ---

/// What the VMM tells the guest, at [`BOOT_PARAMS_GPA`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootParams {
    /// [`BOOT_MAGIC`].
    pub magic: u64,
    /// [`BOOT_VERSION`].
    pub version: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Bytes of guest RAM, from GPA 0.
    pub mem_size: u64,
    /// TSC frequency in kHz (`KVM_GET_TSC_KHZ`).
    pub tsc_khz: u64,
    /// The workload (a [`workload`] code).
    pub workload: u32,
    /// LAPIC timer initial count for a periodic tick on vector
    /// [`TIMER_VECTOR`] (x2APIC, divide by 1; KVM's APIC bus runs at
    /// 1 GHz), or 0 for no timer.
    pub lapic_timer_count: u32,
    /// Parameters of `churn`.
    pub churn: ChurnParams,
    /// Parameters of `selftest`.
    pub selftest: SelftestParams,
    /// Parameters of `touch`.
    pub touch: TouchParams,
    /// Parameters of `random`.
    pub random: RandomParams,
    /// Parameters of `disk`.
    pub disk: DiskParams,
    // --- net: appended for the kv and bank services ---
    /// Parameters of `kv`.
    pub kv: KvParams,
    /// Parameters of `bank`.
    pub bank: BankParams,
    // --- end net ---
}

/// Per-vCPU status the guest keeps at `STATUS_GPA + cpu * size_of::<VcpuStatus>()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuStatus {
    /// Monotonic work counter (churn: pages written), updated by CPL3.
    pub progress: u64,
    /// Nonzero once the vCPU reached CPL3.
    pub started: u64,
    /// LAPIC timer interrupts taken (incremented by the CPL0 handler).
    pub ticks: u64,
    /// Padding to 64 bytes (one cache line per vCPU).
    pub reserved: [u64; 5],
}

/// What the CPL0 exception handler records before it stops the vCPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExceptionReport {
    /// Exception vector (0..=31).
    pub vector: u64,
    /// Error code the CPU pushed (0 for vectors without one).
    pub error_code: u64,
    /// Faulting instruction pointer.
    pub rip: u64,
    /// Code segment at the fault (its low 2 bits are the CPL).
    pub cs: u64,
    /// RFLAGS at the fault.
    pub rflags: u64,
    /// Stack pointer at the fault.
    pub rsp: u64,
    /// Stack segment at the fault.
    pub ss: u64,
    /// CR2 (the faulting address of a `#PF`).
    pub cr2: u64,
    /// The vCPU that faulted.
    pub cpu: u64,
}

/// The mnemonic of an exception vector (`"#PF"`), or `"#??"`.
pub const fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        _ => "#??",
    }
}

// ---- dirty-tracking workloads: `touch` and `random` ----

/// Parameters of the `touch` workload.
///
/// Each vCPU `i` writes pages of its share of the region (`region_pages /
/// vcpus` pages from `region_gpa + i * share * PAGE_SIZE`), chosen by an
/// xorshift generator seeded from `seed` and `i`. Before each write it
/// appends the page's frame number to its [`TouchLogHeader`] log at
/// `log_gpa + i * touch_log_stride(log_entries)` and publishes the new
/// count, so at any pause every page it wrote is in the log and only the
/// last logged page may not be written yet. The page's first 8 bytes get
/// the entry's sequence number (1-based).
///
/// With `pages_per_round` > 0 it works in rounds: that many writes, then
/// `rounds_done` is published and the vCPU either waits (SYS_IDLE) until
/// the VMM sets `go` to at least `rounds_done` (`gated` = 1) or idles
/// `idle_us` microseconds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TouchParams {
    /// PRNG seed.
    pub seed: u64,
    /// First byte of the region (page aligned, in the heap).
    pub region_gpa: u64,
    /// Pages of the region over all vCPUs.
    pub region_pages: u64,
    /// GPA of vCPU 0's log; vCPU `i`'s is `touch_log_stride(log_entries)`
    /// bytes further per vCPU.
    pub log_gpa: u64,
    /// Entries in each log (a ring: entry `n` is at index `n % log_entries`).
    pub log_entries: u64,
    /// Writes per round (0 = write continuously, no rounds).
    pub pages_per_round: u32,
    /// 1: after each round wait for the VMM's `go`; 0: idle `idle_us`.
    pub gated: u32,
    /// Idle between rounds when not gated, in microseconds.
    pub idle_us: u32,
    /// Rounds to run, then exit with status 0 (0 = forever).
    pub rounds: u32,
}

/// The head of a `touch` log; `log_entries` `u64` frame numbers follow at
/// offset [`TOUCH_LOG_ENTRIES_OFFSET`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TouchLogHeader {
    /// Entries ever written (published after the entry, before the page).
    pub count: u64,
    /// Rounds completed.
    pub rounds_done: u64,
    /// Written by the VMM: the vCPU may start round `go + 1`.
    pub go: u64,
    /// Padding to 64 bytes.
    pub reserved: [u64; 5],
}

/// Byte offset of the entries in a `touch` log.
pub const TOUCH_LOG_ENTRIES_OFFSET: u64 = 64;
/// Byte offset of [`TouchLogHeader::go`].
pub const TOUCH_LOG_GO_OFFSET: u64 = 16;
/// Byte offset of [`TouchLogHeader::rounds_done`].
pub const TOUCH_LOG_ROUNDS_OFFSET: u64 = 8;

/// Bytes between two vCPUs' `touch` logs of `entries` entries (whole pages).
pub const fn touch_log_stride(entries: u64) -> u64 {
    (TOUCH_LOG_ENTRIES_OFFSET + entries * 8).div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// Parameters of the `random` workload: like `churn` at 0 % similarity,
/// every word of every rewritten page from a wyrand generator.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RandomParams {
    /// Target write rate in MiB/s over all vCPUs (0 = as fast as possible).
    pub rate_mib_s: u32,
    /// Interval between progress lines in ms (0 = none).
    pub report_ms: u32,
    /// Bytes of heap written (split between vCPUs).
    pub buffer_bytes: u64,
    /// Run time in seconds, then exit with status 0 (0 = forever).
    pub seconds: u32,
    /// Padding.
    pub reserved: u32,
}
// ---- block device (begin) -------------------------------------------------

/// Base of the block device's registers (`MMIO_BASE + 0x3000 .. + 0x4000`).
pub const BLOCK_BASE: u64 = MMIO_BASE + 0x3000;
/// End (exclusive) of the block device's register window.
pub const BLOCK_END: u64 = BLOCK_BASE + 0x1000;
/// Block: capacity in sectors (8-byte read).
pub const BLOCK_CAPACITY: u64 = BLOCK_BASE;
/// Block: GPA of a [`BlockRequest`] to execute (8-byte write).
pub const BLOCK_REQUEST: u64 = BLOCK_BASE + 0x8;
/// Block: status of this vCPU's last request (8-byte read).
pub const BLOCK_STATUS: u64 = BLOCK_BASE + 0x10;
/// Bytes in a sector.
pub const SECTOR_SIZE: u64 = 512;
/// Most sectors one READ or WRITE request may move (1 MiB).
pub const BLOCK_MAX_SECTORS: u32 = 2048;

/// Operation codes for [`BlockRequest::op`].
pub mod block_op {
    /// Read `count` sectors into the buffer.
    pub const READ: u32 = 1;
    /// Write `count` sectors from the buffer.
    pub const WRITE: u32 = 2;
    /// Make every write completed before this request durable.
    pub const FLUSH: u32 = 3;
}

/// Status codes the VMM writes into [`BlockRequest::status`].
pub mod block_status {
    /// Done.
    pub const OK: u32 = 0;
    /// No disk is attached (`simrep run` without `--disk`).
    pub const NO_DISK: u32 = 1;
    /// Unknown operation code.
    pub const BAD_OP: u32 = 2;
    /// `count` is 0 or above [`super::BLOCK_MAX_SECTORS`].
    pub const BAD_COUNT: u32 = 3;
    /// `sector + count` is beyond the disk's capacity.
    pub const OUT_OF_RANGE: u32 = 4;
    /// The buffer is not inside guest RAM.
    pub const BAD_BUFFER: u32 = 5;
    /// The host file failed (read, write or sync error).
    pub const IO_ERROR: u32 = 6;
    /// The descriptor itself is not inside guest RAM (only in
    /// [`super::BLOCK_STATUS`]).
    pub const BAD_DESCRIPTOR: u32 = 7;
    /// Set by the guest before it submits; the VMM never writes it.
    pub const PENDING: u32 = 0xffff_ffff;
}

/// A block request descriptor in guest memory (see [`BLOCK_REQUEST`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockRequest {
    /// A [`block_op`] code.
    pub op: u32,
    /// A [`block_status`] code, written by the VMM.
    pub status: u32,
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub count: u32,
    /// Zero.
    pub reserved: u32,
    /// GPA of the data (`count * SECTOR_SIZE` bytes).
    pub buffer: u64,
}

/// Byte offset of [`BlockRequest::status`].
pub const BLOCK_REQUEST_STATUS_OFFSET: u64 = 4;

/// Parameters of the `disk` workload. Disk layout: the log region
/// `log_start..log_start + log_sectors`, the pattern region
/// `pattern_start..pattern_start + pattern_sectors`, and the benchmark
/// region right after the pattern.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskParams {
    /// First sector of the log region.
    pub log_start: u64,
    /// Sectors in the log region (0: skip the log test).
    pub log_sectors: u64,
    /// First sector of the pattern region.
    pub pattern_start: u64,
    /// Sectors of pattern to write, flush, read back and verify (0: skip).
    pub pattern_sectors: u32,
    /// Log records to append in this run (after replaying the old ones).
    pub log_records: u32,
    /// Seed of the pattern ([`disk_pattern_word`]).
    pub seed: u64,
    /// Bytes to move per request size in the throughput measurement
    /// (0: skip it).
    pub bench_bytes: u64,
    /// Single-sector requests to time (0: skip).
    pub bench_requests: u32,
    /// Nonzero: also submit bad requests and check their error statuses.
    pub probe_errors: u32,
}

/// Word `word` (0..64) of sector `sector` of the `disk` workload's pattern:
/// splitmix64 of the three inputs. The e2e tests check the host file with it.
pub const fn disk_pattern_word(seed: u64, sector: u64, word: u64) -> u64 {
    let mut z = seed ^ sector.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (word << 1 | 1);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `"SRLG"`: first word of every record of the guest's append-only log.
pub const LOG_MAGIC: u32 = u32::from_le_bytes(*b"SRLG");
/// Bytes of a log record header: magic u32, payload length u32, sequence
/// number u64 (0, 1, 2... from the region's start), generation u32 (one
/// more than the last valid record's when a writer starts; never
/// decreasing along a valid log), CRC-32 (IEEE) u32 of header bytes 0..20
/// followed by the payload. The payload follows; the record is zero-padded
/// to a whole number of sectors and the next record starts on the next
/// sector.
pub const LOG_HEADER_SIZE: u64 = 24;
/// Longest log record payload.
pub const LOG_MAX_RECORD: u64 = 1 << 20;

// ---- block device (end) ---------------------------------------------------
