//! Copy-on-write fault tracing: the VMM's write faults in guest memory, as
//! events.
//!
//! [`CowTracer`] loads the program `cow_page_fault` on the
//! `exceptions:page_fault_user` tracepoint. The program keeps the *write*
//! faults (error code bit 1) of one thread group (the VMM) whose address
//! lies in one of up to [`COW_RANGES_MAX`] guest-memory mappings, puts one
//! [`CowEventRecord`] per fault into a ring buffer, and counts them in a
//! per-CPU statistics array. While a copy-on-write view
//! ([`crate::dirty::cow::CowMemory::arm`]) write-protects guest memory, each
//! first write by a host thread to a protected page is one such fault, so
//! the events are the epoch's copy-on-write faults, page by page, with the
//! writing thread, CPU and time.
//!
//! What the tracepoint does not see: writes a vCPU makes inside `KVM_RUN`
//! fault through KVM's `get_user_pages`, not through a CPU exception, and
//! faults the kernel takes on a user address (a `read(2)` into guest
//! memory) are `exceptions:page_fault_kernel`. Only host threads writing
//! guest memory from user mode (device emulation, the test writers) show
//! up here. The tracepoint cannot tell a write-protect fault from another
//! write fault either: a write to a page not yet populated is an event too
//! (error code bit 0, "present", clear; [`CowEvent::is_protection`]).
//!
//! Maps (pinned under `/sys/fs/bpf/simrep/<vm>/`, next to those of
//! [`super::WriteTracer`], all BTF-typed):
//!
//! | map | kind | key | value |
//! |---|---|---|---|
//! | `SIMREP_COW_CONFIG` | array, 1 entry | 0 | [`CowConfig`]: `target_tgid`, `nr_ranges`, `ranges[4]` (`host_addr`, `len`, `guest_phys`) |
//! | `SIMREP_COW_EVENTS` | ring buffer, 2 MiB | - | [`CowEventRecord`]: `host_addr`, `gfn`, `ktime_ns`, `error_code`, `cpu`, `tid`, `range` |
//! | `SIMREP_COW_STATS` | per-CPU array | [`CowStat`] index | `u64` cumulative events |
//!
//! The pins are owned through a lock on the directory
//! `/sys/fs/bpf/simrep/<vm>/cow_lock` (bpffs holds no regular files, and
//! no names with a dot), so a
//! [`super::WriteTracer`] of the same VM, which locks the VM directory
//! itself, and a [`CowTracer`] coexist; a second live [`CowTracer`] of the
//! same name is refused, and the pins of a crashed one are replaced.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::{
    maps::{Array, MapData, PerCpuArray, RingBuf},
    programs::{ProgramError, TracePoint},
    Ebpf, EbpfLoader,
};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use simrep_common::{
    CowConfig, CowEventRecord, CowRange, CowStat, COW_CONFIG_MAP, COW_EVENTS_BYTES, COW_EVENTS_MAP,
    COW_FAULT_PROGRAM, COW_RANGES_MAX, COW_STATS_MAP,
};
use simrep_common::{
    PAGE_FAULT_USER_ADDRESS_OFFSET, PAGE_FAULT_USER_CATEGORY, PAGE_FAULT_USER_ERROR_CODE_OFFSET,
    PAGE_FAULT_USER_TRACEPOINT, PF_ERROR_WRITE, RING_PAGES_MAP, WALK_PAGES_MAP,
};

use super::{EbpfError, LogPump, PinDir, PIN_ROOT};
use crate::vmm::memory::GuestMemory;

/// The maps [`CowTracer`] pins, under `/sys/fs/bpf/simrep/<vm>/`.
pub const COW_PINNED_MAPS: [&str; 3] = [COW_CONFIG_MAP, COW_EVENTS_MAP, COW_STATS_MAP];

/// Name of the directory, inside the VM's pin directory, whose `flock`
/// marks the copy-on-write pins as owned by a live process.
pub const COW_LOCK_DIR: &str = "cow_lock";

/// x86 page-fault error code bit: the page was present (a protection
/// fault, as a write-protect fault is).
pub const PF_ERROR_PRESENT: u32 = 1;

/// Errors of [`CowTracer::start`].
#[derive(Debug, thiserror::Error)]
pub enum CowTraceError {
    /// Loading, pinning or the environment (root, bpffs, tracefs, the
    /// tracepoint and its layout, the name): see [`EbpfError`].
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    /// The guest-memory ranges cannot be traced.
    #[error("invalid guest-memory ranges for copy-on-write tracing: {reason}")]
    Ranges {
        /// What is wrong with them.
        reason: String,
    },
    /// Loading the program into the kernel or attaching it failed.
    #[error("cannot {action} program {COW_FAULT_PROGRAM} on {PAGE_FAULT_USER_CATEGORY}:{PAGE_FAULT_USER_TRACEPOINT}")]
    Program {
        /// `"load"` or `"attach"`.
        action: &'static str,
        /// aya's error.
        #[source]
        source: Box<ProgramError>,
    },
    /// The ring buffer map cannot be opened for reading.
    #[error("cannot open the ring buffer {COW_EVENTS_MAP}")]
    RingBuf {
        /// aya's error.
        #[source]
        source: Box<aya::maps::MapError>,
    },
}

/// Result of [`CowTracer::try_start`]: tracing, or why not.
#[derive(Debug)]
pub enum CowTracing {
    /// The program is attached.
    Active(Box<CowTracer>),
    /// Copy-on-write tracing is unavailable; the VMM runs without it.
    Unavailable {
        /// Why.
        reason: CowTraceError,
    },
}

/// One write fault of the VMM in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CowEvent {
    /// Faulting host virtual address (exact).
    pub host_addr: u64,
    /// Guest frame number of the page written.
    pub gfn: u64,
    /// Index of the range (as given to [`CowTracer::start`]).
    pub range: u32,
    /// CPU that took the fault.
    pub cpu: u32,
    /// Thread id (`gettid()`) of the writer.
    pub tid: u32,
    /// x86 page-fault error code (bit 0 present, bit 1 write, bit 2 user).
    pub error_code: u32,
    /// `CLOCK_MONOTONIC` nanoseconds at the fault.
    pub ktime_ns: u64,
}

impl CowEvent {
    /// Decodes one ring-buffer record; `None` if it is too short.
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<CowEventRecord>() {
            return None;
        }
        // SAFETY: `bytes` holds at least `size_of::<CowEventRecord>()`
        // bytes; the record is plain data (`#[repr(C)]`, integers only, no
        // padding), so any bytes are a valid value; `read_unaligned` needs
        // no alignment.
        let r: CowEventRecord = unsafe { bytes.as_ptr().cast::<CowEventRecord>().read_unaligned() };
        Some(CowEvent {
            host_addr: r.host_addr,
            gfn: r.gfn,
            range: r.range,
            cpu: r.cpu,
            tid: r.tid,
            error_code: r.error_code,
            ktime_ns: r.ktime_ns,
        })
    }

    /// Whether the page was present (a protection fault: write-protect or
    /// copy-on-write), not a first touch.
    pub fn is_protection(&self) -> bool {
        self.error_code & PF_ERROR_PRESENT != 0
    }

    /// Whether the fault was a write (always, for recorded events).
    pub fn is_write(&self) -> bool {
        u64::from(self.error_code) & PF_ERROR_WRITE != 0
    }
}

/// Statistics of the program, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CowTraceStats {
    /// Write faults of the VMM in guest memory (events, recorded or not).
    pub cow_faults: u64,
    /// Of those, events dropped because the ring buffer was full.
    pub ring_full: u64,
    /// Read faults of the VMM in guest memory (not recorded).
    pub read_faults: u64,
    /// Faults of the VMM outside guest memory.
    pub outside_ranges: u64,
    /// Faults of other processes (filtered out).
    pub other_tgid: u64,
    /// Tracepoint records the program could not read.
    pub read_errors: u64,
}

impl CowTraceStats {
    fn from_array(v: [u64; CowStat::COUNT as usize]) -> Self {
        let at = |s: CowStat| v[s.index() as usize];
        Self {
            cow_faults: at(CowStat::CowFaults),
            ring_full: at(CowStat::RingFull),
            read_faults: at(CowStat::ReadFaults),
            outside_ranges: at(CowStat::OutsideRanges),
            other_tgid: at(CowStat::OtherTgid),
            read_errors: at(CowStat::ReadErrors),
        }
    }
}

/// The guest frame of host address `host_addr`, given the guest-memory
/// `ranges`; `None` outside them.
pub fn gfn_of(ranges: &[CowRange], host_addr: u64) -> Option<u64> {
    ranges.iter().find_map(|r| {
        let off = host_addr.checked_sub(r.host_addr)?;
        (off < r.len).then(|| (r.guest_phys + off) >> 12)
    })
}

/// `(host_addr, len)` mappings laid out one after the other in guest
/// physical memory from address 0 (as [`GuestMemory`]'s one region at 0).
pub fn consecutive_ranges(ranges: &[(u64, u64)]) -> Vec<CowRange> {
    let mut guest_phys = 0u64;
    ranges
        .iter()
        .map(|&(host_addr, len)| {
            let r = CowRange {
                host_addr,
                len,
                guest_phys,
            };
            guest_phys = guest_phys.saturating_add(len);
            r
        })
        .collect()
}

/// Checks that `ranges` fit the program: 1 to [`COW_RANGES_MAX`] ranges,
/// page-aligned, non-empty, not wrapping, not overlapping in the host.
fn check_ranges(ranges: &[CowRange]) -> Result<(), CowTraceError> {
    let bad = |reason: String| Err(CowTraceError::Ranges { reason });
    if ranges.is_empty() || ranges.len() > COW_RANGES_MAX {
        return bad(format!(
            "{} ranges given, 1 to {COW_RANGES_MAX} supported",
            ranges.len()
        ));
    }
    for (i, r) in ranges.iter().enumerate() {
        if r.len == 0 || r.host_addr.checked_add(r.len).is_none() {
            return bad(format!(
                "range {i} ({:#x}, +{:#x}) is empty or wraps",
                r.host_addr, r.len
            ));
        }
        if (r.host_addr | r.len | r.guest_phys) & 0xfff != 0 {
            return bad(format!(
                "range {i} ({:#x}, +{:#x} at guest {:#x}) is not page-aligned",
                r.host_addr, r.len, r.guest_phys
            ));
        }
        for (j, o) in ranges.iter().enumerate().take(i) {
            if r.host_addr < o.host_addr + o.len && o.host_addr < r.host_addr + r.len {
                return bad(format!("ranges {j} and {i} overlap"));
            }
        }
    }
    Ok(())
}

/// The `cow_page_fault` program, loaded, attached and pinned. Dropping it
/// detaches the program and removes its pins.
pub struct CowTracer {
    /// Stops the log reader first.
    _log: Option<LogPump>,
    /// The ring buffer's consumer.
    events: RingBuf<MapData>,
    /// Owns the other maps and the program (and its attachment).
    ebpf: Ebpf,
    /// The pins; `None` once dropped.
    pins: Option<PinDir>,
    /// The lock directory, removed on drop.
    lock_dir: PathBuf,
    /// The traced ranges.
    ranges: Vec<CowRange>,
    /// Cumulative statistics at the previous [`CowTracer::take_epoch_stats`].
    last_stats: [u64; CowStat::COUNT as usize],
}

impl std::fmt::Debug for CowTracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowTracer")
            .field("lock_dir", &self.lock_dir)
            .field("ranges", &self.ranges)
            .finish_non_exhaustive()
    }
}

impl CowTracer {
    /// Loads the program, points it at thread group `tgid` (the VMM
    /// process) and the guest-memory mappings `ranges` (`(host_addr, len)`,
    /// laid out consecutively in guest physical memory from 0, like
    /// [`GuestMemory`]), pins its maps under `/sys/fs/bpf/simrep/<vm>/`
    /// (replacing stale pins of a crashed run) and attaches it to
    /// `exceptions:page_fault_user`.
    ///
    /// # Errors
    ///
    /// Not root, bpffs or tracefs missing, no such tracepoint or an
    /// unexpected record layout, the name in use by a live process, bad
    /// ranges, and any failure of the kernel to load, pin or attach: see
    /// [`CowTraceError`].
    pub fn start(vm: &str, tgid: u32, ranges: &[(u64, u64)]) -> Result<Self, CowTraceError> {
        Self::start_with_ranges(vm, tgid, &consecutive_ranges(ranges))
    }

    /// [`CowTracer::start`] for all of `mem`.
    ///
    /// # Errors
    ///
    /// As [`CowTracer::start`].
    pub fn for_memory(vm: &str, tgid: u32, mem: &GuestMemory) -> Result<Self, CowTraceError> {
        Self::start(vm, tgid, &[(mem.host_addr(), mem.size())])
    }

    /// Like [`CowTracer::start`], but never fails: on error it logs a
    /// warning and returns [`CowTracing::Unavailable`] with the reason.
    pub fn try_start(vm: &str, tgid: u32, ranges: &[(u64, u64)]) -> CowTracing {
        match Self::start(vm, tgid, ranges) {
            Ok(t) => CowTracing::Active(Box::new(t)),
            Err(reason) => {
                tracing::warn!(reason = %crate::error_chain(&reason), "eBPF copy-on-write tracing unavailable");
                CowTracing::Unavailable { reason }
            }
        }
    }

    /// [`CowTracer::start`] with explicit guest physical addresses.
    ///
    /// # Errors
    ///
    /// As [`CowTracer::start`].
    pub fn start_with_ranges(
        vm: &str,
        tgid: u32,
        ranges: &[CowRange],
    ) -> Result<Self, CowTraceError> {
        Self::start_with(vm, tgid, ranges, COW_EVENTS_BYTES)
    }

    /// [`CowTracer::start_with_ranges`] with a ring buffer of `ring_bytes`
    /// (a power of two, at least the page size; the default is
    /// [`COW_EVENTS_BYTES`], 2 MiB, about 43 000 events). Each event takes
    /// 48 bytes; events that find the ring full are dropped and counted in
    /// [`CowTraceStats::ring_full`].
    ///
    /// # Errors
    ///
    /// As [`CowTracer::start`]; [`CowTraceError::Ranges`] also for a bad
    /// ring size.
    pub fn start_with(
        vm: &str,
        tgid: u32,
        ranges: &[CowRange],
        ring_bytes: u32,
    ) -> Result<Self, CowTraceError> {
        check_ranges(ranges)?;
        if !ring_bytes.is_power_of_two() || ring_bytes < 4096 {
            return Err(CowTraceError::Ranges {
                reason: format!(
                    "ring buffer size {ring_bytes} is not a power of two of at least 4096 bytes"
                ),
            });
        }
        super::preflight(vm)?;
        super::check_page_fault_user(&[
            ("address", PAGE_FAULT_USER_ADDRESS_OFFSET),
            ("error_code", PAGE_FAULT_USER_ERROR_CODE_OFFSET),
        ])?;
        let mut ebpf = load_object(ring_bytes)?;
        let log = LogPump::start(&mut ebpf)?;
        let (pins, lock_dir) = lock_pins(vm)?;
        let mut pins = Some(pins);
        let result = Self::set_up(&mut ebpf, pins.as_mut(), tgid, ranges);
        let events = match result {
            Ok(events) => events,
            Err(e) => {
                release_pins(&mut pins, &lock_dir);
                return Err(e);
            }
        };
        let this = CowTracer {
            _log: log,
            events,
            ebpf,
            pins,
            lock_dir,
            ranges: ranges.to_vec(),
            last_stats: [0; CowStat::COUNT as usize],
        };
        tracing::info!(
            tgid,
            ranges = ranges.len(),
            pins = %this.pin_dir().display(),
            "eBPF copy-on-write tracing on"
        );
        Ok(this)
    }

    /// Writes the config, pins the maps, takes the ring buffer, loads and
    /// attaches the program.
    fn set_up(
        ebpf: &mut Ebpf,
        pins: Option<&mut PinDir>,
        tgid: u32,
        ranges: &[CowRange],
    ) -> Result<RingBuf<MapData>, CowTraceError> {
        let missing_map = |name| EbpfError::MissingInObject { kind: "map", name };
        {
            let map_err = |source| EbpfError::Map {
                action: "write",
                map: COW_CONFIG_MAP,
                source: Box::new(source),
            };
            let map = ebpf
                .map_mut(COW_CONFIG_MAP)
                .ok_or(missing_map(COW_CONFIG_MAP))?;
            let mut config: Array<&mut MapData, CowConfig> =
                Array::try_from(map).map_err(map_err)?;
            let mut value = CowConfig {
                target_tgid: tgid,
                nr_ranges: ranges.len() as u32,
                ..Default::default()
            };
            value.ranges[..ranges.len()].copy_from_slice(ranges);
            config.set(0, value, 0).map_err(map_err)?;
        }
        if let Some(pins) = pins {
            for name in COW_PINNED_MAPS {
                let map = ebpf.map(name).ok_or(missing_map(name))?;
                pins.pin(name, map)?;
            }
        }
        let ring = ebpf
            .take_map(COW_EVENTS_MAP)
            .ok_or(missing_map(COW_EVENTS_MAP))?;
        let events = RingBuf::try_from(ring).map_err(|source| CowTraceError::RingBuf {
            source: Box::new(source),
        })?;
        let program_err = |action| {
            move |source| CowTraceError::Program {
                action,
                source: Box::new(source),
            }
        };
        let program: &mut TracePoint = ebpf
            .program_mut(COW_FAULT_PROGRAM)
            .ok_or(EbpfError::MissingInObject {
                kind: "program",
                name: COW_FAULT_PROGRAM,
            })?
            .try_into()
            .map_err(program_err("load"))?;
        program.load().map_err(program_err("load"))?;
        // The link is owned by the program and detached when it drops.
        program
            .attach(PAGE_FAULT_USER_CATEGORY, PAGE_FAULT_USER_TRACEPOINT)
            .map_err(program_err("attach"))?;
        Ok(events)
    }

    /// Drains the ring buffer: the events since the previous call, oldest
    /// first. Never blocks.
    pub fn poll(&mut self) -> Vec<CowEvent> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            match CowEvent::from_bytes(&item) {
                Some(event) => out.push(event),
                None => tracing::warn!(len = item.len(), "short copy-on-write record skipped"),
            }
        }
        out
    }

    /// The ring buffer's file descriptor, readable (for `epoll`) when events
    /// are waiting.
    pub fn events_fd(&self) -> BorrowedFd<'_> {
        self.events.as_fd()
    }

    /// Cumulative statistics since load, summed over CPUs.
    ///
    /// # Errors
    ///
    /// [`EbpfError::Map`] if the statistics map cannot be read.
    pub fn stats(&self) -> Result<CowTraceStats, CowTraceError> {
        Ok(CowTraceStats::from_array(self.cumulative_stats()?))
    }

    /// Statistics since the previous call (the epoch's), summed over CPUs.
    ///
    /// # Errors
    ///
    /// As [`CowTracer::stats`].
    pub fn take_epoch_stats(&mut self) -> Result<CowTraceStats, CowTraceError> {
        let now = self.cumulative_stats()?;
        let mut delta = [0u64; CowStat::COUNT as usize];
        for (d, (n, l)) in delta.iter_mut().zip(now.iter().zip(self.last_stats)) {
            *d = n.wrapping_sub(l);
        }
        self.last_stats = now;
        Ok(CowTraceStats::from_array(delta))
    }

    fn cumulative_stats(&self) -> Result<[u64; CowStat::COUNT as usize], CowTraceError> {
        let map_err = |source| EbpfError::Map {
            action: "read",
            map: COW_STATS_MAP,
            source: Box::new(source),
        };
        let map = self
            .ebpf
            .map(COW_STATS_MAP)
            .ok_or(EbpfError::MissingInObject {
                kind: "map",
                name: COW_STATS_MAP,
            })?;
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err)?;
        let mut out = [0u64; CowStat::COUNT as usize];
        for s in CowStat::ALL {
            let v = stats.get(&s.index(), 0).map_err(map_err)?;
            out[s.index() as usize] = v.iter().copied().fold(0, u64::wrapping_add);
        }
        Ok(out)
    }

    /// How often the program ran and for how long in total, as the kernel
    /// accounts it while BPF run-time statistics are on
    /// ([`enable_bpf_run_stats`]); zeros otherwise. Every user page fault on
    /// the host runs it, most leave at the thread-group filter.
    ///
    /// # Errors
    ///
    /// [`CowTraceError::Program`] if the kernel does not report it.
    pub fn program_run_stats(&self) -> Result<(u64, Duration), CowTraceError> {
        let program = self
            .ebpf
            .program(COW_FAULT_PROGRAM)
            .ok_or(EbpfError::MissingInObject {
                kind: "program",
                name: COW_FAULT_PROGRAM,
            })?;
        let info = program.info().map_err(|source| CowTraceError::Program {
            action: "query",
            source: Box::new(source),
        })?;
        Ok((info.run_count(), info.run_time()))
    }

    /// The traced ranges.
    pub fn ranges(&self) -> &[CowRange] {
        &self.ranges
    }

    /// The guest frame of host address `host_addr`; `None` outside guest
    /// memory.
    pub fn gfn_of(&self, host_addr: u64) -> Option<u64> {
        gfn_of(&self.ranges, host_addr)
    }

    /// The directory of the pins, `/sys/fs/bpf/simrep/<vm>`.
    pub fn pin_dir(&self) -> &Path {
        self.lock_dir.parent().unwrap_or(&self.lock_dir)
    }

    /// The pin path of `map` (one of [`COW_PINNED_MAPS`]).
    pub fn map_pin_path(&self, map: &str) -> PathBuf {
        self.pin_dir().join(map)
    }
}

/// Turns on the kernel's BPF run-time statistics (run count and time of
/// every program, [`CowTracer::program_run_stats`]) until the returned file
/// descriptor is closed. They cost a little on every program run, so only
/// for measurements.
///
/// # Errors
///
/// The `BPF_ENABLE_STATS` syscall failed (not root, or Linux < 5.8).
pub fn enable_bpf_run_stats() -> io::Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| e.io_error)
}

impl Drop for CowTracer {
    fn drop(&mut self) {
        release_pins(&mut self.pins, &self.lock_dir);
    }
}

/// Loads simrep's eBPF object (as [`super::load_object`]) with the page maps
/// of the write tracer, which this program never touches, cut to one entry:
/// at full size they lock 2 x 25 MB of kernel memory (2 CPUs) for nothing.
/// The ring buffer gets `ring_bytes`.
fn load_object(ring_bytes: u32) -> Result<Ebpf, EbpfError> {
    super::load_object_with(
        EbpfLoader::new()
            .map_max_entries(COW_EVENTS_MAP, ring_bytes)
            .map_max_entries(RING_PAGES_MAP, 1)
            .map_max_entries(WALK_PAGES_MAP, 1),
    )
}

/// Removes the pins, then the lock directory while still holding its lock,
/// then releases the lock (and removes the VM directory if it is empty).
/// In this order a newcomer can never own the lock while our pins are
/// still there: it re-checks after locking that the lock directory it
/// locked is still the one at the path.
fn release_pins(pins: &mut Option<PinDir>, lock_dir: &Path) {
    let Some(mut pins) = pins.take() else {
        return;
    };
    for pin in pins.pinned.drain(..) {
        if let Err(error) = fs::remove_file(&pin) {
            tracing::warn!(path = %pin.display(), %error, "cannot remove pin");
        }
    }
    if let Err(error) = fs::remove_dir(lock_dir) {
        tracing::warn!(path = %lock_dir.display(), %error, "cannot remove the pin lock directory");
    }
    // Unlocks, and removes the VM directory unless other pins remain.
    drop(pins);
}

/// Creates `/sys/fs/bpf/simrep/<vm>/cow_lock` and locks it; returns the pin
/// directory (`/sys/fs/bpf/simrep/<vm>`, owning that lock) and the lock
/// directory's path.
fn lock_pins(vm: &str) -> Result<(PinDir, PathBuf), EbpfError> {
    let dir = Path::new(PIN_ROOT).join(vm);
    let result = try_lock_pins(&dir);
    if result.is_err() {
        // Leave no empty directory behind (fails, as it should, if it
        // holds anything).
        let _ = fs::remove_dir(&dir);
    }
    result
}

/// [`lock_pins`] without the clean-up on failure.
fn try_lock_pins(dir: &Path) -> Result<(PinDir, PathBuf), EbpfError> {
    let dir = dir.to_path_buf();
    let lock_dir = dir.join(COW_LOCK_DIR);
    let create_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EbpfError::CreatePinDir { path, source }
    };
    // A few attempts: an owner that is going away may remove the lock
    // directory (or the VM directory) between our steps.
    for _ in 0..8 {
        fs::create_dir_all(&dir).map_err(create_err(&dir))?;
        match fs::create_dir(&lock_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(create_err(&lock_dir)(source)),
        }
        let file = match File::open(&lock_dir) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(create_err(&lock_dir)(source)),
        };
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => return Err(EbpfError::PinDirInUse { path: lock_dir }),
            Err((_, source)) => {
                return Err(EbpfError::LockPinDir {
                    path: lock_dir,
                    source,
                })
            }
        };
        // The owner we waited for may have removed the directory we locked.
        let held = lock.metadata().map_err(create_err(&lock_dir))?;
        match fs::metadata(&lock_dir) {
            Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                let pins = PinDir {
                    dir,
                    pinned: Vec::new(),
                    _lock: lock,
                };
                return Ok((pins, lock_dir));
            }
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(create_err(&lock_dir)(source)),
        }
    }
    Err(EbpfError::PinDirInUse { path: lock_dir })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gfn_of_maps_host_addresses_through_the_ranges() {
        let ranges = consecutive_ranges(&[(0x7f00_0000_0000, 0x20_0000), (0x5000_0000, 0x1000)]);
        assert_eq!(ranges[1].guest_phys, 0x20_0000);
        assert_eq!(gfn_of(&ranges, 0x7f00_0000_0000), Some(0));
        assert_eq!(gfn_of(&ranges, 0x7f00_0000_5123), Some(5));
        assert_eq!(gfn_of(&ranges, 0x7f00_001f_ffff), Some(0x1ff));
        assert_eq!(gfn_of(&ranges, 0x7f00_0020_0000), None);
        assert_eq!(gfn_of(&ranges, 0x5000_0fff), Some(0x200));
        assert_eq!(gfn_of(&ranges, 0x4fff_ffff), None);
    }

    #[test]
    fn bad_ranges_are_refused() {
        let r = |host_addr, len, guest_phys| CowRange {
            host_addr,
            len,
            guest_phys,
        };
        assert!(check_ranges(&[r(0x1000, 0x1000, 0)]).is_ok());
        for bad in [
            vec![],
            vec![r(0x1000, 0, 0)],
            vec![r(0x1001, 0x1000, 0)],
            vec![r(0x1000, 0x1000, 0x10)],
            vec![r(!0xfff_u64, 0x2000, 0)],
            vec![r(0x1000, 0x2000, 0), r(0x2000, 0x1000, 0x2000)],
            vec![r(0x1000, 0x1000, 0); COW_RANGES_MAX + 1],
        ] {
            assert!(
                matches!(check_ranges(&bad), Err(CowTraceError::Ranges { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn records_decode() {
        let rec = CowEventRecord {
            host_addr: 0x7f00_0000_1234,
            gfn: 1,
            ktime_ns: 99,
            error_code: 7,
            cpu: 1,
            tid: 42,
            range: 0,
        };
        // SAFETY: the record is plain data of exactly this many bytes.
        let bytes: [u8; 40] = unsafe { std::mem::transmute(rec) };
        let e = CowEvent::from_bytes(&bytes).unwrap();
        assert_eq!(
            (e.host_addr, e.gfn, e.tid, e.ktime_ns),
            (0x7f00_0000_1234, 1, 42, 99)
        );
        assert!(e.is_write() && e.is_protection());
        assert!(CowEvent::from_bytes(&bytes[..39]).is_none());
    }
}
