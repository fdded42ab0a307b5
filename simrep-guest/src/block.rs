//! The block device driver, an append-only log on top of it, and the `disk`
//! workload.
//!
//! Every request is one MMIO exit: the driver fills a [`BlockRequest`] on
//! its stack, writes its address to [`abi::BLOCK_REQUEST`], and the VMM
//! executes it before the guest resumes, writing the status back. Buffers
//! may be anywhere in guest RAM (it is identity-mapped: a virtual address
//! is the guest-physical one) and need no alignment; lengths are whole
//! 512-byte sectors, and requests longer than [`abi::BLOCK_MAX_SECTORS`]
//! are split.
//!
//! Durability: a completed [`write`] is visible to every later [`read`]; it
//! is on stable storage only after a later [`flush`] returned `Ok` (see
//! `simrep/src/vmm/block.rs` for what the VMM does under replication).
//!
//! # The log
//!
//! [`Log`] keeps records in a region of sectors. Each record starts on a
//! sector boundary with a [`abi::LOG_HEADER_SIZE`]-byte header (magic,
//! payload length, sequence number, generation, CRC-32 of the header's
//! first 20 bytes and the payload) and is zero-padded to whole sectors.
//! Replay stops at the first record with a bad magic, length, sequence
//! number, generation or checksum; a record torn by a crash fails its
//! checksum and ends the log. Sequence numbers start at 0 at the region's
//! start and rise by one per record. A writer appends after the last valid
//! record with a generation one above that record's, and generations never
//! decrease along a valid log, so records that an earlier writer left
//! beyond the new tail (after a torn or corrupted record cut the log
//! short) are never picked up again, even when they would line up with
//! the new records' sequence numbers and positions.

use core::fmt;
use core::ptr::{read_volatile, write_volatile};

use crate::abi::{self, block_op, block_status, BlockRequest, BootParams};
use crate::user::{exit, mmio_read, mmio_write, print};

macro_rules! println {
    ($($arg:tt)*) => { print(format_args!($($arg)*)) };
}

/// Bytes in a sector.
pub const SECTOR: usize = abi::SECTOR_SIZE as usize;

/// What went wrong with a block operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The device failed the request with this [`block_status`] code.
    Status(u32),
    /// A buffer length is not a whole number of sectors.
    Unaligned,
    /// The log region has no room for the record.
    LogFull,
    /// The record is longer than [`abi::LOG_MAX_RECORD`], or than the
    /// replay's scratch buffer.
    TooLarge,
    /// [`Log::append`] before [`Log::replay`].
    NotReplayed,
}

/// The name of a [`block_status`] code.
pub const fn status_name(status: u32) -> &'static str {
    match status {
        block_status::OK => "OK",
        block_status::NO_DISK => "NO_DISK",
        block_status::BAD_OP => "BAD_OP",
        block_status::BAD_COUNT => "BAD_COUNT",
        block_status::OUT_OF_RANGE => "OUT_OF_RANGE",
        block_status::BAD_BUFFER => "BAD_BUFFER",
        block_status::IO_ERROR => "IO_ERROR",
        block_status::BAD_DESCRIPTOR => "BAD_DESCRIPTOR",
        block_status::PENDING => "PENDING",
        _ => "?",
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::Status(s) => write!(f, "device status {s} ({})", status_name(s)),
            Error::Unaligned => f.write_str("length not a multiple of 512"),
            Error::LogFull => f.write_str("log region full"),
            Error::TooLarge => f.write_str("record too large"),
            Error::NotReplayed => f.write_str("log appended to before it was replayed"),
        }
    }
}

/// The disk's capacity in sectors (0: no disk).
pub fn capacity() -> u64 {
    mmio_read(abi::BLOCK_CAPACITY)
}

/// Submits one raw request and returns its status (for probes; the
/// functions below validate and split requests).
pub fn submit(req: &mut BlockRequest) -> u32 {
    let p: *mut BlockRequest = req;
    // SAFETY: `p` comes from a live `&mut`; volatile so the VMM's write
    // of the status is not assumed away.
    unsafe { write_volatile(&raw mut (*p).status, block_status::PENDING) };
    mmio_write(abi::BLOCK_REQUEST, p as u64);
    // SAFETY: as above; the VMM wrote the status during the exit.
    unsafe { read_volatile(&raw const (*p).status) }
}

/// The status of this vCPU's last request, as the VMM recorded it.
pub fn last_status() -> u32 {
    mmio_read(abi::BLOCK_STATUS) as u32
}

fn io(op: u32, sector: u64, addr: u64, len: usize) -> Result<(), Error> {
    if !len.is_multiple_of(SECTOR) {
        return Err(Error::Unaligned);
    }
    let max = abi::BLOCK_MAX_SECTORS as usize * SECTOR;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(max);
        let mut req = BlockRequest {
            op,
            status: block_status::PENDING,
            sector: sector + (done / SECTOR) as u64,
            count: (n / SECTOR) as u32,
            reserved: 0,
            buffer: addr + done as u64,
        };
        match submit(&mut req) {
            block_status::OK => {}
            s => return Err(Error::Status(s)),
        }
        done += n;
    }
    Ok(())
}

/// Reads whole sectors from `sector` into `buf`.
pub fn read(sector: u64, buf: &mut [u8]) -> Result<(), Error> {
    io(block_op::READ, sector, buf.as_mut_ptr() as u64, buf.len())
}

/// Writes whole sectors from `buf` at `sector`.
pub fn write(sector: u64, buf: &[u8]) -> Result<(), Error> {
    io(block_op::WRITE, sector, buf.as_ptr() as u64, buf.len())
}

/// Makes every completed write durable.
pub fn flush() -> Result<(), Error> {
    let mut req = BlockRequest {
        op: block_op::FLUSH,
        ..BlockRequest::default()
    };
    match submit(&mut req) {
        block_status::OK => Ok(()),
        s => Err(Error::Status(s)),
    }
}

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32 (IEEE), as `crc32fast` computes it on the host.
struct Crc(u32);

impl Crc {
    fn new() -> Self {
        Crc(!0)
    }
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = CRC_TABLE[((self.0 ^ u32::from(b)) & 0xff) as usize] ^ (self.0 >> 8);
        }
    }
    fn finish(&self) -> u32 {
        !self.0
    }
}

const HDR: usize = abi::LOG_HEADER_SIZE as usize;
/// Bytes of a record written with its header in one request.
const CHUNK: usize = 4096;

fn header(len: u32, seq: u64, gen: u32, payload: &[u8]) -> [u8; HDR] {
    let mut h = [0u8; HDR];
    h[0..4].copy_from_slice(&abi::LOG_MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&gen.to_le_bytes());
    let mut crc = Crc::new();
    crc.update(&h[..20]);
    crc.update(payload);
    h[20..24].copy_from_slice(&crc.finish().to_le_bytes());
    h
}

fn sectors_for(bytes: usize) -> u64 {
    bytes.div_ceil(SECTOR) as u64
}

/// An append-only log of checksummed records in the sectors
/// `start..start + sectors`.
pub struct Log {
    start: u64,
    sectors: u64,
    /// Next free sector, relative to `start`.
    next: u64,
    /// Sequence number of the next record.
    seq: u64,
    /// Generation of this writer's records (0 until replayed).
    gen: u32,
    /// Holds the header and the first bytes of a record (one request for
    /// records up to `CHUNK - HDR` bytes), and a padded tail.
    scratch: [u8; CHUNK],
}

impl Log {
    /// A log over `start..start + sectors`. [`Log::replay`] it before
    /// appending (on a fresh region that is one read).
    pub const fn new(start: u64, sectors: u64) -> Self {
        Log {
            start,
            sectors,
            next: 0,
            seq: 0,
            gen: 0,
            scratch: [0; CHUNK],
        }
    }

    /// Records in the log (the next record's sequence number).
    pub fn records(&self) -> u64 {
        self.seq
    }

    /// Sectors in use.
    pub fn used_sectors(&self) -> u64 {
        self.next
    }

    /// Appends one record (at most 3 requests; one for records up to
    /// 4072 bytes). Not durable until [`flush`].
    pub fn append(&mut self, record: &[u8]) -> Result<(), Error> {
        if self.gen == 0 {
            return Err(Error::NotReplayed);
        }
        let len = record.len();
        if len as u64 > abi::LOG_MAX_RECORD {
            return Err(Error::TooLarge);
        }
        let total = sectors_for(HDR + len);
        if self.next + total > self.sectors {
            return Err(Error::LogFull);
        }
        let at = self.start + self.next;
        let first = len.min(CHUNK - HDR);
        let first_bytes = (sectors_for(HDR + first) as usize) * SECTOR;
        self.scratch[..HDR].copy_from_slice(&header(len as u32, self.seq, self.gen, record));
        self.scratch[HDR..HDR + first].copy_from_slice(&record[..first]);
        self.scratch[HDR + first..first_bytes].fill(0);
        write(at, &self.scratch[..first_bytes])?;
        if first < len {
            // The first chunk was exactly CHUNK bytes: the rest starts on a
            // sector boundary.
            let rest = &record[first..];
            let whole = rest.len() / SECTOR * SECTOR;
            let mut sector = at + (CHUNK / SECTOR) as u64;
            if whole > 0 {
                write(sector, &rest[..whole])?;
                sector += (whole / SECTOR) as u64;
            }
            let tail = &rest[whole..];
            if !tail.is_empty() {
                self.scratch[..tail.len()].copy_from_slice(tail);
                self.scratch[tail.len()..SECTOR].fill(0);
                write(sector, &self.scratch[..SECTOR])?;
            }
        }
        self.next += total;
        self.seq += 1;
        Ok(())
    }

    /// Reads the log from its start and calls `f(seq, payload)` for every
    /// valid record, stopping at the first invalid one; afterwards
    /// [`Log::append`] continues after the last valid record. `scratch`
    /// must hold the longest record plus its header (rounded up to whole
    /// sectors); big reads through it keep replay at few requests. Returns
    /// the number of records.
    pub fn replay(
        &mut self,
        scratch: &mut [u8],
        mut f: impl FnMut(u64, &[u8]),
    ) -> Result<u64, Error> {
        self.next = 0;
        self.seq = 0;
        self.gen = 0;
        let mut last_gen = 0u32;
        let cap = (scratch.len() / SECTOR) as u64;
        if cap == 0 {
            return Err(Error::TooLarge);
        }
        let (start, sectors) = (self.start, self.sectors);
        let (mut win_start, mut win_len) = (0u64, 0u64);
        let load = |at: u64, scratch: &mut [u8]| -> Result<(u64, u64), Error> {
            let n = cap.min(sectors - at);
            read(start + at, &mut scratch[..n as usize * SECTOR])?;
            Ok((at, n))
        };
        while self.next < self.sectors {
            let next = self.next;
            if !(win_start <= next && next < win_start + win_len) {
                (win_start, win_len) = load(next, scratch)?;
            }
            let off = (next - win_start) as usize * SECTOR;
            let h = &scratch[off..off + HDR];
            let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
            let magic = word(0);
            let len = word(4) as usize;
            let seq = u64::from(word(8)) | u64::from(word(12)) << 32;
            let gen = word(16);
            let crc = word(20);
            if magic != abi::LOG_MAGIC
                || seq != self.seq
                || gen < last_gen
                || len as u64 > abi::LOG_MAX_RECORD
            {
                break;
            }
            let total = sectors_for(HDR + len);
            if next + total > self.sectors {
                break;
            }
            if total > cap {
                return Err(Error::TooLarge);
            }
            if next + total > win_start + win_len {
                (win_start, win_len) = load(next, scratch)?;
            }
            let off = (next - win_start) as usize * SECTOR;
            let payload = &scratch[off + HDR..off + HDR + len];
            let mut c = Crc::new();
            c.update(&scratch[off..off + 20]);
            c.update(payload);
            if c.finish() != crc {
                break;
            }
            f(seq, payload);
            last_gen = gen;
            self.next += total;
            self.seq += 1;
        }
        self.gen = last_gen.saturating_add(1);
        Ok(self.seq)
    }
}

fn time_ns() -> u64 {
    mmio_read(abi::SYS_TIME_NS)
}

/// A heap buffer of `len` bytes at `gpa`.
fn heap(gpa: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: the `disk` workload runs on vCPU 0 only and hands out
    // disjoint ranges of the heap (checked against RAM by the caller),
    // which is mapped writable at CPL3 and used by nothing else.
    unsafe { core::slice::from_raw_parts_mut(gpa as *mut u8, len) }
}

fn fill_pattern(seed: u64, sector: u64, buf: &mut [u8]) {
    for (i, s) in buf.chunks_exact_mut(SECTOR).enumerate() {
        for (w, word) in s.chunks_exact_mut(8).enumerate() {
            let v = abi::disk_pattern_word(seed, sector + i as u64, w as u64);
            word.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Length of the `disk` workload's record `seq`: 1..=6000 bytes, so
/// records of one request and of three are both exercised.
fn record_len(seq: u64) -> usize {
    1 + (seq.wrapping_mul(2_654_435_761) % 6000) as usize
}

/// Byte `j` of the `disk` workload's record `seq`.
fn record_byte(seq: u64, j: usize) -> u8 {
    (seq as u8).wrapping_mul(31) ^ (j as u8).wrapping_mul(7) ^ (j >> 8) as u8
}

fn fail(failures: &mut u64, what: &str, e: Error) {
    println!("disk: FAIL: {what}: {e}");
    *failures += 1;
}

/// Tenths of MB/s for `bytes` moved in `ns`.
fn mbps10(bytes: u64, ns: u64) -> u64 {
    bytes * 10_000 / ns.max(1)
}

/// The `disk` workload (vCPU 0; the others exit at once).
pub fn disk_workload(cpu: u64, bp: &BootParams) -> ! {
    if cpu != 0 {
        exit(0);
    }
    let p = bp.disk;
    let cap = capacity();
    println!("disk: capacity {cap} sectors ({} MiB)", cap >> 11);
    if cap == 0 {
        let mut b = [0u8; SECTOR];
        let r = read(0, &mut b);
        let f = flush();
        let name = |r: Result<(), Error>| match r {
            Ok(()) => "OK",
            Err(Error::Status(s)) => status_name(s),
            Err(_) => "?",
        };
        println!(
            "disk: no disk attached: read -> {}, flush -> {} (run with --disk FILE)",
            name(r),
            name(f)
        );
        exit(2);
    }
    let heap_bytes = bp.mem_size.saturating_sub(abi::HEAP_GPA);
    // Heap layout: two 256 KiB pattern buffers, 16 KiB for a record, then
    // the replay scratch (a maximal record) and the benchmark buffer.
    const PAT: usize = 256 << 10;
    const REC: usize = 16 << 10;
    const SCRATCH: usize = abi::LOG_MAX_RECORD as usize + CHUNK;
    const BENCH: usize = 64 << 10;
    let need = (2 * PAT + REC + SCRATCH + BENCH) as u64;
    if heap_bytes < need {
        println!("disk: needs {need} bytes of heap, has {heap_bytes}");
        exit(3);
    }
    let mut at = abi::HEAP_GPA;
    let mut take = |len: usize| {
        let b = heap(at, len);
        at += len as u64;
        b
    };
    let (a, b, rec, scratch, bench) = (take(PAT), take(PAT), take(REC), take(SCRATCH), take(BENCH));
    let mut failures = 0u64;

    // 1. Pattern: write, read back before the flush (from the VMM's write
    // buffer), flush, read back again (from the file).
    let pattern_end = p.pattern_start + u64::from(p.pattern_sectors);
    if p.pattern_sectors > 0 && pattern_end > cap {
        println!(
            "disk: pattern region {}..{pattern_end} beyond the disk",
            p.pattern_start
        );
        exit(3);
    }
    if p.pattern_sectors > 0 {
        let chunk = (PAT / SECTOR) as u64;
        let mut s = p.pattern_start;
        while s < pattern_end {
            let n = chunk.min(pattern_end - s) as usize * SECTOR;
            fill_pattern(p.seed, s, &mut a[..n]);
            if let Err(e) = write(s, &a[..n]) {
                fail(&mut failures, "pattern write", e);
            }
            s += chunk;
        }
        let verify = |b: &mut [u8], a: &mut [u8]| -> Result<u64, Error> {
            let mut bad = 0;
            let mut s = p.pattern_start;
            while s < pattern_end {
                let n = chunk.min(pattern_end - s) as usize * SECTOR;
                read(s, &mut b[..n])?;
                fill_pattern(p.seed, s, &mut a[..n]);
                bad += (0..n / SECTOR)
                    .filter(|&i| b[i * SECTOR..(i + 1) * SECTOR] != a[i * SECTOR..(i + 1) * SECTOR])
                    .count() as u64;
                s += chunk;
            }
            Ok(bad)
        };
        let before = verify(b, a);
        let fl = flush();
        let after = verify(b, a);
        match (before, fl, after) {
            (Ok(0), Ok(()), Ok(0)) => println!(
                "disk: pattern: {} sectors written, read back before and after the flush: ok",
                p.pattern_sectors
            ),
            (Ok(x), Ok(()), Ok(y)) => {
                println!("disk: FAIL: pattern: {x} bad sectors before the flush, {y} after");
                failures += 1;
            }
            (before, fl, after) => {
                for e in [before.err(), fl.err(), after.err()].into_iter().flatten() {
                    fail(&mut failures, "pattern", e);
                }
            }
        }
    }

    // 2. The log: replay what earlier runs appended, append more, flush,
    // replay again.
    if p.log_sectors > 0 {
        if p.log_start + p.log_sectors > cap {
            println!("disk: log region beyond the disk");
            exit(3);
        }
        let mut bad = 0u64;
        let mut check = |seq: u64, payload: &[u8]| {
            let ok = payload.len() == record_len(seq)
                && payload
                    .iter()
                    .enumerate()
                    .all(|(j, &b)| b == record_byte(seq, j));
            if !ok {
                bad += 1;
            }
        };
        let mut log = Log::new(p.log_start, p.log_sectors);
        let replayed = log.replay(scratch, &mut check);
        match replayed {
            Ok(n) => println!(
                "disk: log: replayed {n} records ({} sectors)",
                log.used_sectors()
            ),
            Err(e) => fail(&mut failures, "log replay", e),
        }
        let mut appended = 0u64;
        for _ in 0..p.log_records {
            let seq = log.records();
            let len = record_len(seq);
            for (j, b) in rec[..len].iter_mut().enumerate() {
                *b = record_byte(seq, j);
            }
            match log.append(&rec[..len]) {
                Ok(()) => appended += 1,
                Err(Error::LogFull) => {
                    println!("disk: log: region full after {} records", log.records());
                    break;
                }
                Err(e) => {
                    fail(&mut failures, "log append", e);
                    break;
                }
            }
        }
        if let Err(e) = flush() {
            fail(&mut failures, "log flush", e);
        }
        let total = log.records();
        let mut again = Log::new(p.log_start, p.log_sectors);
        match again.replay(scratch, &mut check) {
            Ok(n) if n == total && bad == 0 => println!(
                "disk: log: appended {appended} records, flushed; replay: {n} records, all valid"
            ),
            Ok(n) => {
                println!("disk: FAIL: log: {n} records replayed, {total} expected, {bad} bad");
                failures += 1;
            }
            Err(e) => fail(&mut failures, "log replay after append", e),
        }
    }

    // 3. Bad requests get error statuses and the guest keeps running.
    if p.probe_errors != 0 {
        let buf = a.as_mut_ptr() as u64;
        let probes: [(&str, u32, u64, u32, u64, u32); 5] = [
            (
                "out-of-range sector",
                block_op::READ,
                cap,
                1,
                buf,
                block_status::OUT_OF_RANGE,
            ),
            (
                "zero count",
                block_op::READ,
                0,
                0,
                buf,
                block_status::BAD_COUNT,
            ),
            (
                "oversized count",
                block_op::WRITE,
                0,
                abi::BLOCK_MAX_SECTORS + 1,
                buf,
                block_status::BAD_COUNT,
            ),
            ("unknown op", 99, 0, 1, buf, block_status::BAD_OP),
            (
                "buffer outside RAM",
                block_op::READ,
                0,
                1,
                bp.mem_size,
                block_status::BAD_BUFFER,
            ),
        ];
        for (what, op, sector, count, buffer, want) in probes {
            let mut req = BlockRequest {
                op,
                status: 0,
                sector,
                count,
                reserved: 0,
                buffer,
            };
            let got = submit(&mut req);
            if got == want {
                println!(
                    "disk: probe {what}: status {} as expected",
                    status_name(got)
                );
            } else {
                println!(
                    "disk: FAIL: probe {what}: status {got} ({}), expected {}",
                    status_name(got),
                    status_name(want)
                );
                failures += 1;
            }
        }
        mmio_write(abi::BLOCK_REQUEST, bp.mem_size);
        let got = last_status();
        if got == block_status::BAD_DESCRIPTOR {
            println!("disk: probe descriptor outside RAM: status BAD_DESCRIPTOR as expected");
        } else {
            println!("disk: FAIL: probe descriptor outside RAM: status {got}");
            failures += 1;
        }
    }

    // 4. Throughput and per-request cost.
    let region = pattern_end.max(p.log_start + p.log_sectors);
    if p.bench_bytes > 0 {
        let sectors = p.bench_bytes / abi::SECTOR_SIZE;
        if region + sectors > cap {
            println!(
                "disk: bench: needs sectors {region}..{}, the disk has {cap}: skipped",
                region + sectors
            );
        } else {
            for (i, w) in bench.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
            }
            for req_kib in [4u64, 64] {
                let per = (req_kib * 2) as usize; // sectors per request
                let n = sectors / per as u64;
                let bytes = n * per as u64 * abi::SECTOR_SIZE;
                let t0 = time_ns();
                for k in 0..n {
                    if let Err(e) = write(region + k * per as u64, &bench[..per * SECTOR]) {
                        fail(&mut failures, "bench write", e);
                        break;
                    }
                }
                let t1 = time_ns();
                if let Err(e) = flush() {
                    fail(&mut failures, "bench flush", e);
                }
                let t2 = time_ns();
                for k in 0..n {
                    if let Err(e) = read(region + k * per as u64, &mut bench[..per * SECTOR]) {
                        fail(&mut failures, "bench read", e);
                        break;
                    }
                }
                let t3 = time_ns();
                let (w, r) = (mbps10(bytes, t1 - t0), mbps10(bytes, t3 - t2));
                println!(
                    "disk: bench {req_kib} KiB requests: write {}.{} MB/s, flush of {} MiB {} ms, read {}.{} MB/s ({n} requests each way)",
                    w / 10,
                    w % 10,
                    bytes >> 20,
                    (t2 - t1) / 1_000_000,
                    r / 10,
                    r % 10
                );
            }
        }
    }
    if p.bench_requests > 0 && region < cap {
        let n = u64::from(p.bench_requests);
        let one = &mut bench[..SECTOR];
        let t0 = time_ns();
        for _ in 0..n {
            mmio_write(abi::SYS_NOP, 0);
        }
        let t1 = time_ns();
        for _ in 0..n {
            let _ = read(region, one);
        }
        let t2 = time_ns();
        for _ in 0..n {
            let _ = write(region, one);
        }
        let t3 = time_ns();
        let flushes = n.min(100);
        for _ in 0..flushes {
            let _ = write(region, one);
            let _ = flush();
        }
        let t4 = time_ns();
        println!(
            "disk: one request (mean of {n}): empty MMIO exit {} ns, 512 B read {} ns, 512 B write {} ns, write+flush {} ns",
            (t1 - t0) / n,
            (t2 - t1) / n,
            (t3 - t2) / n,
            (t4 - t3) / flushes
        );
    }

    if failures == 0 {
        println!("disk: ok");
        exit(0);
    }
    println!("disk: {failures} failures");
    exit(1)
}
