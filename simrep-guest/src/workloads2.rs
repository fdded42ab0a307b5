//! The dirty-tracking workloads (CPL3): `touch`, which logs every page it
//! is about to write so the VMM can check its dirty harvest exactly, and
//! `random`, incompressible writes at a rate.
//!
//! They use the console and MMIO helpers of [`crate::user`].

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

use crate::abi::{self, BootParams, TouchLogHeader};
use crate::user::{exit, mmio_write, println, rdtsc, status};

fn set_progress(cpu: u64, progress: u64) {
    crate::user::set_progress(status(cpu), progress);
}

/// xorshift64 (the choice of pages).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// wyrand (the content of `random`'s pages).
struct WyRand(u64);

impl WyRand {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    }
}

/// The `touch` workload (see [`abi::TouchParams`]).
pub fn touch(cpu: u64, bp: &BootParams) -> ! {
    let p = bp.touch;
    let vcpus = u64::from(bp.vcpus.max(1));
    let share = p.region_pages / vcpus;
    let base = p.region_gpa + cpu * share * abi::PAGE_SIZE;
    let log = p.log_gpa + cpu * abi::touch_log_stride(p.log_entries);
    let region_end = p.region_gpa + p.region_pages * abi::PAGE_SIZE;
    if share == 0
        || p.log_entries == 0
        || p.region_gpa < abi::HEAP_GPA
        || region_end > bp.mem_size
        || log < abi::HEAP_GPA
        || log + abi::touch_log_stride(p.log_entries) > bp.mem_size
    {
        println!(
            "touch cpu{cpu}: bad parameters: region {:#x} + {} pages, log {:#x} x {}",
            p.region_gpa, p.region_pages, p.log_gpa, p.log_entries
        );
        exit(4);
    }
    if cpu == 0 {
        println!(
            "touch: {} vCPU(s), {} pages each from {:#x}, logs at {:#x}, {} per round",
            vcpus, share, p.region_gpa, p.log_gpa, p.pages_per_round
        );
    }
    let head = log as *mut TouchLogHeader;
    let entries = (log + abi::TOUCH_LOG_ENTRIES_OFFSET) as *mut u64;
    let mut rng = XorShift((p.seed ^ (cpu + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
    let mut count: u64 = 0;
    let mut round: u64 = 0;
    loop {
        let n = if p.pages_per_round == 0 {
            64
        } else {
            p.pages_per_round
        };
        for _ in 0..n {
            let gfn = base / abi::PAGE_SIZE + rng.next() % share;
            // SAFETY: the log lies in the heap, inside guest RAM (checked
            // above), mapped writable at CPL3; only this vCPU writes it.
            unsafe {
                write_volatile(entries.add((count % p.log_entries) as usize), gfn);
                write_volatile(&raw mut (*head).count, count + 1);
            }
            // The log entry and count are stored before the page (x86
            // keeps stores in order; this keeps the compiler from
            // reordering them).
            compiler_fence(Ordering::SeqCst);
            count += 1;
            // SAFETY: the page lies in this vCPU's share of the region,
            // inside guest RAM, mapped writable at CPL3.
            unsafe { write_volatile((gfn * abi::PAGE_SIZE) as *mut u64, count) };
            compiler_fence(Ordering::SeqCst);
        }
        set_progress(cpu, count);
        if p.pages_per_round == 0 {
            continue;
        }
        round += 1;
        // SAFETY: as above.
        unsafe { write_volatile(&raw mut (*head).rounds_done, round) };
        if p.rounds != 0 && round >= u64::from(p.rounds) {
            exit(0);
        }
        if p.gated != 0 {
            // SAFETY: as above; the VMM writes `go`.
            while unsafe { read_volatile(&raw const (*head).go) } < round {
                mmio_write(abi::SYS_IDLE, 200_000);
            }
        } else if p.idle_us != 0 {
            mmio_write(abi::SYS_IDLE, u64::from(p.idle_us) * 1000);
        }
    }
}

/// The `random` workload: rewrites pages of its share of the heap with
/// wyrand output at `rate_mib_s` (see [`abi::RandomParams`]).
pub fn random(cpu: u64, bp: &BootParams) -> ! {
    let p = bp.random;
    let vcpus = u64::from(bp.vcpus.max(1));
    let heap = bp.mem_size.saturating_sub(abi::HEAP_GPA);
    let buffer = p.buffer_bytes.min(heap) / vcpus / abi::PAGE_SIZE * abi::PAGE_SIZE;
    let pages = buffer / abi::PAGE_SIZE;
    if pages == 0 {
        println!("random cpu{cpu}: no memory to write (heap {heap} bytes)");
        exit(4);
    }
    let base = abi::HEAP_GPA + cpu * buffer;
    let pages_per_s = u64::from(p.rate_mib_s) * 256 / vcpus;
    let tsc_hz = bp.tsc_khz * 1000;
    if cpu == 0 {
        println!(
            "random: {} vCPU(s), {} MiB each, {} MiB/s, {} s",
            vcpus,
            buffer >> 20,
            p.rate_mib_s,
            p.seconds
        );
    }
    let mut rng = WyRand(0x243f_6a88_85a3_08d3 ^ (cpu + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9));
    let start = rdtsc();
    let report_ticks = u64::from(p.report_ms) * bp.tsc_khz;
    let end_ticks = u64::from(p.seconds) * tsc_hz;
    let mut next_report = report_ticks;
    let (mut written, mut reported, mut last_report_at, mut next_page) = (0u64, 0u64, 0u64, 0u64);
    loop {
        let now = rdtsc().wrapping_sub(start);
        let target = if pages_per_s == 0 {
            written + 64
        } else {
            (u128::from(now) * u128::from(pages_per_s) / u128::from(tsc_hz)) as u64
        };
        let burst = target.saturating_sub(written).min(64);
        for _ in 0..burst {
            let words = (base + next_page * abi::PAGE_SIZE) as *mut u64;
            for i in 0..(abi::PAGE_SIZE / 8) as usize {
                // SAFETY: a page of this vCPU's share of the heap, mapped
                // writable at CPL3; nothing else in the guest touches it.
                unsafe { write_volatile(words.add(i), rng.next()) };
            }
            next_page = (next_page + 1) % pages;
            written += 1;
        }
        set_progress(cpu, written);
        if report_ticks != 0 && now >= next_report {
            let ms = (now / bp.tsc_khz).max(1);
            let span = ((now - last_report_at) / bp.tsc_khz).max(1);
            println!(
                "random cpu{cpu}: t={}.{:03}s pages={} rate={} MiB/s (avg {} MiB/s)",
                ms / 1000,
                ms % 1000,
                written,
                ((written - reported) * 1000 / span) >> 8,
                (written * 1000 / ms) >> 8,
            );
            reported = written;
            last_report_at = now;
            next_report = now + report_ticks;
        }
        if end_ticks != 0 && now >= end_ticks {
            println!(
                "random cpu{cpu}: done, {} pages ({} MiB) written",
                written,
                written >> 8
            );
            exit(0);
        }
        if burst == 0 && pages_per_s != 0 {
            crate::user::pace(
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
