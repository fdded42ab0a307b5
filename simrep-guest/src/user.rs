//! The CPL3 half: console, clock and the workloads.
//!
//! This code runs natively under PVM. It reaches the VMM only through MMIO
//! to the window at [`abi::MMIO_BASE`]; every access is one exit (tens of
//! microseconds), so it batches: one exit per console line.

use core::arch::asm;
use core::fmt::{self, Write};
use core::ptr::{read_volatile, write_volatile};

use crate::abi::{self, fault, workload, BootParams, VcpuStatus};

/// One 8-byte MMIO write, as a single `mov` the emulator decodes.
pub(crate) fn mmio_write(addr: u64, value: u64) {
    // SAFETY: `addr` is in the MMIO window (mapped, no memory behind it):
    // the write exits to the VMM. Without `nomem` the asm is a memory
    // clobber, so buffers the value points at are written before it.
    unsafe {
        asm!("mov qword ptr [{0}], {1}", in(reg) addr, in(reg) value, options(nostack, preserves_flags))
    };
}

/// One 8-byte MMIO read.
pub(crate) fn mmio_read(addr: u64) -> u64 {
    let value: u64;
    // SAFETY: as in `mmio_write`; the VMM supplies the value.
    unsafe {
        asm!("mov {1}, qword ptr [{0}]", in(reg) addr, out(reg) value, options(nostack, preserves_flags))
    };
    value
}

/// The time-stamp counter.
pub(crate) fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: `rdtsc` reads the TSC; CR4.TSD is clear, so CPL3 may use it.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    u64::from(hi) << 32 | u64::from(lo)
}

/// A console line, formatted in guest memory and sent with one exit.
struct Line {
    buf: [u8; 240],
    len: usize,
}

impl Line {
    const fn new() -> Self {
        Line {
            buf: [0; 240],
            len: 0,
        }
    }

    fn send(&self) {
        let gpa = self.buf.as_ptr() as u64; // identity-mapped
        mmio_write(
            abi::CONSOLE_LINE,
            gpa | (self.len as u64) << abi::CONSOLE_LEN_SHIFT,
        );
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// Sends one formatted console line.
pub(crate) fn print(args: fmt::Arguments<'_>) {
    let mut line = Line::new();
    let _ = line.write_fmt(args);
    line.send();
}

macro_rules! println {
    ($($arg:tt)*) => { $crate::user::print(format_args!($($arg)*)) };
}
pub(crate) use println;

/// Rate limiting of `churn` and `random`: idles (one exit) until 64 more
/// pages are due at `pages_per_s`, or the next report, or the end, when
/// that is more than 20 us away; spins otherwise.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pace(
    written: u64,
    pages_per_s: u64,
    tsc_hz: u64,
    tsc_khz: u64,
    now: u64,
    next_report: u64,
    report_ticks: u64,
    end_ticks: u64,
) {
    let due = (u128::from(written + 64) * u128::from(tsc_hz) / u128::from(pages_per_s)) as u64;
    let mut wake = due;
    if report_ticks != 0 {
        wake = wake.min(next_report);
    }
    if end_ticks != 0 {
        wake = wake.min(end_ticks);
    }
    let ns = (u128::from(wake.saturating_sub(now)) * 1_000_000 / u128::from(tsc_khz)) as u64;
    if ns > 20_000 {
        mmio_write(abi::SYS_IDLE, ns);
    } else {
        core::hint::spin_loop();
    }
}

/// Stops this vCPU with `status` (0 = success).
pub(crate) fn exit(status: u64) -> ! {
    mmio_write(abi::SYS_EXIT, status);
    // The VMM does not run this vCPU again; spin if it ever does.
    loop {
        core::hint::spin_loop();
    }
}

/// The boot parameters the VMM wrote.
fn boot_params() -> BootParams {
    // SAFETY: the boot-parameters page is mapped readable at CPL3 and the
    // VMM wrote a `BootParams` there before the first vCPU ran.
    unsafe { read_volatile(abi::BOOT_PARAMS_GPA as *const BootParams) }
}

/// This vCPU's status slot.
pub(crate) fn status(cpu: u64) -> *mut VcpuStatus {
    (abi::STATUS_GPA + cpu * core::mem::size_of::<VcpuStatus>() as u64) as *mut VcpuStatus
}

/// Publishes `progress` in this vCPU's status slot.
pub(crate) fn set_progress(status: *mut VcpuStatus, progress: u64) {
    // SAFETY: `status` is this vCPU's slot in the status page, mapped
    // writable at CPL3; only this vCPU writes it (the VMM reads it).
    unsafe { write_volatile(&raw mut (*status).progress, progress) };
}

/// CPL3 entry, reached by `iretq` from the stub with the vCPU index.
pub extern "C" fn user_main(cpu: u64) -> ! {
    let bp = boot_params();
    let st = status(cpu);
    // SAFETY: as in `set_progress`.
    unsafe { write_volatile(&raw mut (*st).started, 1) };
    if bp.magic != abi::BOOT_MAGIC || bp.version != abi::BOOT_VERSION {
        println!(
            "cpu{cpu}: bad boot parameters (magic {:#x}, version {})",
            bp.magic, bp.version
        );
        exit(3);
    }
    if bp.tsc_khz == 0 {
        println!("cpu{cpu}: no TSC frequency in the boot parameters");
        exit(3);
    }
    match bp.workload {
        workload::CHURN => churn(cpu, &bp, st),
        workload::SELFTEST => selftest(cpu, &bp),
        workload::TOUCH => crate::workloads2::touch(cpu, &bp),
        workload::RANDOM => crate::workloads2::random(cpu, &bp),
        workload::DISK => crate::block::disk_workload(cpu, &bp),
        workload::KV => crate::kv::main(cpu, &bp, st),
        workload::BANK => crate::bank::main(cpu, &bp, st),
        w => {
            println!("cpu{cpu}: unknown workload {w}");
            exit(3)
        }
    }
}

/// xorshift64*: cheap, good enough for content and choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Milliseconds from TSC ticks.
fn ticks_to_ms(ticks: u64, tsc_khz: u64) -> u64 {
    ticks / tsc_khz
}

/// The `churn` workload: rewrites pages of its share of the heap at
/// `rate_mib_s`, keeping `similarity_pct` % of each page's 8-byte words and
/// replacing the others with pseudo-random data.
fn churn(cpu: u64, bp: &BootParams, st: *mut VcpuStatus) -> ! {
    let p = bp.churn;
    let vcpus = u64::from(bp.vcpus.max(1));
    let heap = bp.mem_size.saturating_sub(abi::HEAP_GPA);
    let buffer = p.buffer_bytes.min(heap) / vcpus / abi::PAGE_SIZE * abi::PAGE_SIZE;
    let pages = buffer / abi::PAGE_SIZE;
    if pages == 0 {
        println!("churn cpu{cpu}: no memory to churn (heap {heap} bytes)");
        exit(4);
    }
    let base = abi::HEAP_GPA + cpu * buffer;
    let sim = u64::from(p.similarity_pct.min(100));
    // Pages a second for this vCPU (0 = unlimited).
    let pages_per_s = u64::from(p.rate_mib_s) * 256 / vcpus;
    let tsc_hz = bp.tsc_khz * 1000;
    if cpu == 0 {
        println!(
            "churn: {} vCPU(s), {} MiB at {:#x} each, {} MiB/s, similarity {}%, {} s",
            vcpus,
            buffer >> 20,
            abi::HEAP_GPA,
            p.rate_mib_s,
            sim,
            p.seconds
        );
    }

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (cpu + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    // Fill the buffer once so "similar" has something to keep.
    for page in 0..pages {
        write_page(base + page * abi::PAGE_SIZE, 0, &mut rng);
    }

    let start = rdtsc();
    let report_ticks = u64::from(p.report_ms) * bp.tsc_khz;
    let end_ticks = u64::from(p.seconds) * tsc_hz;
    let mut next_report = report_ticks;
    let mut written: u64 = 0;
    let mut reported_pages: u64 = 0;
    let mut last_report_at: u64 = 0;
    let mut next_page: u64 = 0;
    loop {
        let now = rdtsc().wrapping_sub(start);
        let target = if pages_per_s == 0 {
            written + 256
        } else {
            (u128::from(now) * u128::from(pages_per_s) / u128::from(tsc_hz)) as u64
        };
        // Write in bursts of at most 64 pages between clock reads.
        let burst = target.saturating_sub(written).min(64);
        for _ in 0..burst {
            write_page(base + next_page * abi::PAGE_SIZE, sim, &mut rng);
            next_page += 1;
            if next_page == pages {
                next_page = 0;
            }
            written += 1;
            set_progress(st, written);
        }
        if report_ticks != 0 && now >= next_report {
            let ms = ticks_to_ms(now, bp.tsc_khz).max(1);
            let span = ticks_to_ms(now - last_report_at, bp.tsc_khz).max(1);
            let recent = written - reported_pages;
            println!(
                "churn cpu{cpu}: t={}.{:03}s pages={} written={} MiB rate={} MiB/s (avg {} MiB/s)",
                ms / 1000,
                ms % 1000,
                written,
                written >> 8,
                (recent * 1000 / span) >> 8,
                (written * 1000 / ms) >> 8,
            );
            reported_pages = written;
            last_report_at = now;
            next_report = now + report_ticks;
        }
        if end_ticks != 0 && now >= end_ticks {
            println!(
                "churn cpu{cpu}: done, {} pages ({} MiB) written",
                written,
                written >> 8
            );
            exit(0);
        }
        if burst == 0 && pages_per_s != 0 {
            // Ahead of schedule: idle until 64 more pages are due, or the
            // next report, or the end (one exit instead of spinning).
            pace(
                written,
                pages_per_s,
                tsc_hz,
                bp.tsc_khz,
                now,
                next_report,
                report_ticks,
                end_ticks,
            );
        }
    }
}

/// Rewrites one page: each 8-byte word is kept with probability
/// `sim` % and otherwise replaced by random data. The first word is always
/// stored, so the page is dirty even at 100 %.
fn write_page(addr: u64, sim: u64, rng: &mut Rng) {
    let words = addr as *mut u64;
    // Keep a word when the top 32 bits of a draw, scaled to 0..100, fall
    // below `sim`.
    for i in 0..(abi::PAGE_SIZE / 8) as usize {
        let r = rng.next();
        if ((r >> 32) * 100) >> 32 < sim {
            continue;
        }
        // SAFETY: `addr` is a page of this vCPU's share of the heap, mapped
        // writable at CPL3; nothing else in the guest touches it.
        unsafe { words.add(i).write(rng.next()) };
    }
    // SAFETY: as above; rewriting the first word keeps the page dirty.
    unsafe { write_volatile(words, read_volatile(words)) };
}

/// The `selftest` workload: console, CPL, memory, clock and MMIO checks,
/// then the deliberate fault chosen in the boot parameters.
fn selftest(cpu: u64, bp: &BootParams) -> ! {
    let cs: u64;
    // SAFETY: reads the CS selector only.
    unsafe { asm!("mov {0:r}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    println!(
        "selftest cpu{cpu}: running at CPL{} with {} MiB, {} vCPU(s), TSC {} kHz",
        cs & 3,
        bp.mem_size >> 20,
        bp.vcpus,
        bp.tsc_khz
    );

    // Memory: write a pattern over a few heap pages and read it back.
    let base = abi::HEAP_GPA + cpu * 16 * abi::PAGE_SIZE;
    let words = (16 * abi::PAGE_SIZE / 8) as usize;
    for i in 0..words {
        // SAFETY: heap pages of this vCPU, mapped writable at CPL3.
        unsafe { write_volatile((base as *mut u64).add(i), i as u64 ^ 0x5a5a_5a5a) };
    }
    let read = |i: usize| {
        // SAFETY: as above.
        unsafe { read_volatile((base as *const u64).add(i)) }
    };
    let bad = (0..words)
        .filter(|&i| read(i) != i as u64 ^ 0x5a5a_5a5a)
        .count();
    println!("selftest cpu{cpu}: memory check: {bad} bad words of {words}");

    // MMIO round trips, timed with the TSC.
    let n = u64::from(bp.selftest.mmio_round_trips.max(1));
    let t0 = rdtsc();
    for i in 0..n {
        mmio_write(abi::SYS_NOP, i);
    }
    let t1 = rdtsc();
    let ns = (t1 - t0) * 1_000_000 / bp.tsc_khz / n;
    println!(
        "selftest cpu{cpu}: mmio write round trip {}.{:03} us (mean of {n})",
        ns / 1000,
        ns % 1000
    );

    // The TSC against the host clock over about 20 ms.
    let h0 = mmio_read(abi::SYS_TIME_NS);
    let c0 = rdtsc();
    while rdtsc() - c0 < 20 * bp.tsc_khz {
        core::hint::spin_loop();
    }
    let c1 = rdtsc();
    let h1 = mmio_read(abi::SYS_TIME_NS);
    println!(
        "selftest cpu{cpu}: clock check: tsc {} us, host {} us",
        (c1 - c0) * 1000 / bp.tsc_khz,
        (h1 - h0) / 1000
    );

    if bp.lapic_timer_count != 0 {
        // SAFETY: this vCPU's status slot, mapped readable at CPL3.
        let ticks = unsafe { read_volatile(&raw const (*status(cpu)).ticks) };
        println!("selftest cpu{cpu}: LAPIC timer ticks so far: {ticks}");
    }

    match bp.selftest.fault {
        fault::NONE => {
            println!("selftest cpu{cpu}: ok");
            exit(0)
        }
        fault::PAGE_FAULT => {
            println!("selftest cpu{cpu}: faulting on purpose: write to unmapped 0x8 (#PF)");
            // SAFETY: deliberately faults; the handler never returns here.
            unsafe { asm!("mov qword ptr [{0}], 1", in(reg) 8u64, options(nostack)) };
        }
        fault::INVALID_OPCODE => {
            println!("selftest cpu{cpu}: faulting on purpose: ud2 (#UD)");
            // SAFETY: deliberately faults; the handler never returns here.
            unsafe { asm!("ud2", options(nostack)) };
        }
        fault::GENERAL_PROTECTION => {
            println!("selftest cpu{cpu}: faulting on purpose: hlt at CPL3 (#GP)");
            // SAFETY: deliberately faults; the handler never returns here.
            unsafe { asm!("hlt", options(nostack)) };
        }
        fault::DIVIDE_ERROR => {
            println!("selftest cpu{cpu}: faulting on purpose: divide by zero (#DE)");
            // SAFETY: deliberately faults; the handler never returns here.
            unsafe {
                asm!("xor edx, edx", "div {0}", in(reg) 0u64, inout("rax") 1u64 => _, out("rdx") _, options(nostack))
            };
        }
        fault::UNKNOWN_MMIO => {
            println!("selftest cpu{cpu}: writing to an unclaimed MMIO address on purpose");
            mmio_write(abi::MMIO_BASE + 0x10_0000, 1);
        }
        f => println!("selftest cpu{cpu}: unknown fault kind {f}"),
    }
    println!("selftest cpu{cpu}: still running after the fault");
    exit(5)
}
