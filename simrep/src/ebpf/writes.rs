//! Guest write tracing from KVM tracepoints, per epoch.
//!
//! [`WriteTracer`] loads the programs `kvm_dirty_ring_push` (on
//! `kvm:kvm_dirty_ring_push`, which fires per page the dirty ring reports,
//! ring mode only) and `kvm_mmu_pagetable_walk` (on
//! `kvmmmu:kvm_mmu_pagetable_walk`, which fires per guest memory access
//! walked by the shadow MMU, as under PVM), and, for hosts with
//! hardware-assisted paging (VMX/SVM; present but silent under PVM),
//! `kvm_page_fault` (on `kvm:kvm_page_fault`) and `fast_page_fault` (on
//! `kvmmmu:fast_page_fault`), which count guest write faults per guest
//! frame. It attaches whichever exist on the host, after checking their
//! record layout against the tracepoint's `format` file, and reports which
//! are active ([`WriteTracer::sources`]) and which are missing, with why
//! ([`WriteTracer::missing`]). All filter by the VMM's thread group inside
//! the program.
//!
//! Maps (pinned under `/sys/fs/bpf/simrep/<vm>/`, all BTF-typed):
//!
//! | map | kind | key | value |
//! |---|---|---|---|
//! | `SIMREP_CONFIG` | array, 1 entry | 0 | [`FaultConfig`]: `target_tgid` |
//! | `SIMREP_RING_PAGES` | per-CPU hash | `slot << 48 \| frame offset in slot` | `u64` ring pushes this epoch |
//! | `SIMREP_WALK_PAGES` | per-CPU hash | guest *virtual* page number | `u64` write walks this epoch |
//! | `SIMREP_FAULT_PAGES` | per-CPU hash | guest frame (`gpa >> 12`) | `u64` write faults this epoch (`kvm_page_fault` and `fast_page_fault` together: a fault that takes both paths counts twice) |
//! | `SIMREP_WRITE_STATS` | per-CPU array | [`WriteStat`] index | `u64` cumulative events |
//!
//! [`WriteTracer::take_epoch`] reads and clears the page maps and returns the
//! statistics since the previous call. Call it while the vCPUs are paused
//! (at the epoch boundary): an event between reading a page and clearing it
//! would be lost.

use std::collections::BTreeMap;

use crate::dirty::DirtyPages;
use std::fs;
use std::path::{Path, PathBuf};

use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap},
    programs::TracePoint,
    Ebpf,
};
use simrep_common::{
    WriteStat, DIRTY_RING_PUSH_OFFSET_OFFSET, DIRTY_RING_PUSH_PROGRAM, DIRTY_RING_PUSH_SLOT_OFFSET,
    PAGETABLE_WALK_ADDR_OFFSET, PAGETABLE_WALK_PFERR_OFFSET, PAGETABLE_WALK_PROGRAM,
    RING_PAGES_MAP, WALK_PAGES_MAP, WRITE_STATS_MAP,
};
use simrep_common::{
    FAST_PAGE_FAULT_ERROR_CODE_OFFSET, FAST_PAGE_FAULT_GPA_OFFSET, FAST_PAGE_FAULT_PROGRAM,
    FAULT_PAGES_MAP, KVM_PAGE_FAULT_ADDRESS_OFFSET, KVM_PAGE_FAULT_ERROR_CODE_OFFSET,
    KVM_PAGE_FAULT_PROGRAM,
};

use super::{field_layout, EbpfError, FaultConfig, LogPump, PinDir, CONFIG_MAP, TRACEFS};
use aya::maps::Array;

/// A source of guest write events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WriteSource {
    /// `kvm:kvm_dirty_ring_push`: exact guest frames, ring mode only.
    DirtyRing,
    /// `kvmmmu:kvm_mmu_pagetable_walk` writes: guest virtual pages (shadow
    /// paging).
    PagetableWalk,
    /// `kvm:kvm_page_fault` write faults: guest frames (hardware-assisted
    /// paging, VMX/SVM).
    KvmPageFault,
    /// `kvmmmu:fast_page_fault` write faults: guest frames (hardware-assisted
    /// paging, VMX/SVM).
    FastPageFault,
}

impl WriteSource {
    /// Every source, in the order they are tried.
    pub const ALL: [WriteSource; 4] = [
        WriteSource::DirtyRing,
        WriteSource::PagetableWalk,
        WriteSource::KvmPageFault,
        WriteSource::FastPageFault,
    ];

    /// `(program, category, tracepoint, fields the program reads)`.
    fn spec(
        self,
    ) -> (
        &'static str,
        &'static str,
        &'static str,
        [(&'static str, usize, usize); 2],
    ) {
        match self {
            WriteSource::DirtyRing => (
                DIRTY_RING_PUSH_PROGRAM,
                "kvm",
                "kvm_dirty_ring_push",
                [
                    ("slot", DIRTY_RING_PUSH_SLOT_OFFSET, 4),
                    ("offset", DIRTY_RING_PUSH_OFFSET_OFFSET, 8),
                ],
            ),
            WriteSource::PagetableWalk => (
                PAGETABLE_WALK_PROGRAM,
                "kvmmmu",
                "kvm_mmu_pagetable_walk",
                [
                    ("addr", PAGETABLE_WALK_ADDR_OFFSET, 8),
                    ("pferr", PAGETABLE_WALK_PFERR_OFFSET, 4),
                ],
            ),
            WriteSource::KvmPageFault => (
                KVM_PAGE_FAULT_PROGRAM,
                "kvm",
                "kvm_page_fault",
                [
                    ("fault_address", KVM_PAGE_FAULT_ADDRESS_OFFSET, 8),
                    ("error_code", KVM_PAGE_FAULT_ERROR_CODE_OFFSET, 8),
                ],
            ),
            WriteSource::FastPageFault => (
                FAST_PAGE_FAULT_PROGRAM,
                "kvmmmu",
                "fast_page_fault",
                [
                    ("cr2_or_gpa", FAST_PAGE_FAULT_GPA_OFFSET, 8),
                    ("error_code", FAST_PAGE_FAULT_ERROR_CODE_OFFSET, 8),
                ],
            ),
        }
    }

    /// `category:name` of the tracepoint.
    pub fn tracepoint(self) -> String {
        let (_, category, name, _) = self.spec();
        format!("{category}:{name}")
    }
}

/// Per-epoch statistics, summed over CPUs (events since the previous
/// [`WriteTracer::take_epoch`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Dirty-ring pushes of the VMM.
    pub ring_events: u64,
    /// Dirty-ring pushes of other processes (filtered out).
    pub ring_filtered: u64,
    /// Page-table walks of the VMM (reads and writes).
    pub walk_events: u64,
    /// Of those, writes.
    pub walk_writes: u64,
    /// Page-table walks of other processes (filtered out).
    pub walk_filtered: u64,
    /// Events lost because a page map was full.
    pub map_full: u64,
    /// Records the programs could not read.
    pub read_errors: u64,
    /// `kvm_page_fault` and `fast_page_fault` events of the VMM (reads and
    /// writes, both tracepoints).
    pub fault_events: u64,
    /// Of those, write faults.
    pub fault_writes: u64,
    /// Guest page faults of other processes (filtered out).
    pub fault_filtered: u64,
}

impl WriteStats {
    fn from_array(v: [u64; WriteStat::COUNT as usize]) -> Self {
        let at = |s: WriteStat| v[s.index() as usize];
        Self {
            ring_events: at(WriteStat::RingEvents),
            ring_filtered: at(WriteStat::RingFiltered),
            walk_events: at(WriteStat::WalkEvents),
            walk_writes: at(WriteStat::WalkWrites),
            walk_filtered: at(WriteStat::WalkFiltered),
            map_full: at(WriteStat::MapFull),
            read_errors: at(WriteStat::ReadErrors),
            fault_events: at(WriteStat::FaultEvents),
            fault_writes: at(WriteStat::FaultWrites),
            fault_filtered: at(WriteStat::FaultFiltered),
        }
    }
}

/// What the programs saw in one epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochWrites {
    /// Guest frames the dirty ring reported (slot 0, which the VMM maps at
    /// guest physical 0, so the slot offset is the frame), with the number
    /// of pushes.
    pub ring_frames: BTreeMap<u64, u64>,
    /// Ring entries of other memory slots, by raw key (`slot << 48 | offset`).
    pub ring_other_slots: BTreeMap<u64, u64>,
    /// Guest virtual pages written, with the number of write walks.
    pub walk_pages: BTreeMap<u64, u64>,
    /// Guest frames written as seen by `kvm_page_fault` and
    /// `fast_page_fault`, with the number of write-fault events.
    pub fault_frames: BTreeMap<u64, u64>,
    /// Statistics of the epoch.
    pub stats: WriteStats,
}

/// Result of [`WriteTracer::try_start`]: tracing, or why not.
#[derive(Debug)]
pub enum WriteTracing {
    /// At least one source is attached.
    Active(Box<WriteTracer>),
    /// eBPF write tracing is unavailable; the VMM runs without it.
    Unavailable {
        /// Why.
        reason: EbpfError,
    },
}

/// The write-tracing programs, loaded, attached to the sources that exist,
/// and pinned. Dropping it detaches them and removes the pins.
pub struct WriteTracer {
    /// Stops the log reader first.
    _log: Option<LogPump>,
    /// Owns the maps and programs.
    ebpf: Ebpf,
    /// The pins, removed on drop.
    pins: PinDir,
    /// Attached sources.
    active: Vec<WriteSource>,
    /// Sources that could not be attached, with the reason.
    missing: Vec<(WriteSource, String)>,
    /// Cumulative statistics at the previous `take_epoch`.
    last_stats: [u64; WriteStat::COUNT as usize],
}

impl std::fmt::Debug for WriteTracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTracer")
            .field("pin_dir", &self.pins.dir)
            .field("active", &self.active)
            .field("missing", &self.missing)
            .finish_non_exhaustive()
    }
}

/// The maps [`WriteTracer`] pins.
pub const WRITE_PINNED_MAPS: [&str; 5] = [
    CONFIG_MAP,
    RING_PAGES_MAP,
    WALK_PAGES_MAP,
    WRITE_STATS_MAP,
    FAULT_PAGES_MAP,
];

impl WriteTracer {
    /// Like [`WriteTracer::start`], but never fails: on error it logs a
    /// warning and returns [`WriteTracing::Unavailable`] with the reason.
    pub fn try_start(vm: &str, tgid: u32) -> WriteTracing {
        Self::try_start_with(vm, tgid, &WriteSource::ALL)
    }

    /// [`WriteTracer::try_start`] with only `sources` tried.
    pub fn try_start_with(vm: &str, tgid: u32, sources: &[WriteSource]) -> WriteTracing {
        match Self::start_with(vm, tgid, sources) {
            Ok(t) => WriteTracing::Active(Box::new(t)),
            Err(reason) => {
                tracing::warn!(reason = %crate::error_chain(&reason), "eBPF write tracing unavailable");
                WriteTracing::Unavailable { reason }
            }
        }
    }

    /// Loads the programs, targets thread group `tgid` (the VMM process),
    /// pins the maps under `/sys/fs/bpf/simrep/<vm>/` (replacing stale pins
    /// of a crashed run) and attaches every source the host has.
    ///
    /// # Errors
    ///
    /// Not root, bpffs or tracefs missing, the name in use, load or pin
    /// failures, or [`EbpfError::NoWriteSource`] if no source attaches.
    pub fn start(vm: &str, tgid: u32) -> Result<Self, EbpfError> {
        Self::start_with(vm, tgid, &WriteSource::ALL)
    }

    /// [`WriteTracer::start`] with only `sources` tried (the others are
    /// reported missing as "not requested").
    ///
    /// # Errors
    ///
    /// As [`WriteTracer::start`].
    pub fn start_with(vm: &str, tgid: u32, sources: &[WriteSource]) -> Result<Self, EbpfError> {
        super::preflight(vm)?;
        let mut ebpf = super::load_object()?;
        let log = LogPump::start(&mut ebpf)?;
        let mut this = Self {
            _log: log,
            pins: PinDir::create(vm)?,
            ebpf,
            active: Vec::new(),
            missing: Vec::new(),
            last_stats: [0; WriteStat::COUNT as usize],
        };
        this.set_target(tgid)?;
        for map in WRITE_PINNED_MAPS {
            let map_ref = this.ebpf.map(map).ok_or(EbpfError::MissingInObject {
                kind: "map",
                name: map,
            })?;
            this.pins.pin(map, map_ref)?;
        }
        for source in WriteSource::ALL {
            if !sources.contains(&source) {
                this.missing.push((source, "not requested".into()));
                continue;
            }
            match this.attach(source) {
                Ok(()) => this.active.push(source),
                Err(reason) => this.missing.push((source, reason)),
            }
        }
        if this.active.is_empty() {
            let missing = this
                .missing
                .iter()
                .map(|(s, r)| format!("{}: {r}", s.tracepoint()))
                .collect::<Vec<_>>()
                .join("; ");
            return Err(EbpfError::NoWriteSource { missing });
        }
        for (source, reason) in &this.missing {
            tracing::info!(tracepoint = %source.tracepoint(), %reason, "eBPF write source missing");
        }
        tracing::info!(active = ?this.active, pins = %this.pins.dir.display(), "eBPF write tracing on");
        Ok(this)
    }

    /// Checks the tracepoint's record layout, loads and attaches `source`.
    fn attach(&mut self, source: WriteSource) -> Result<(), String> {
        let (program, category, name, fields) = source.spec();
        let dir = Path::new(TRACEFS).join("events").join(category).join(name);
        let format_path = dir.join("format");
        let format = fs::read_to_string(&format_path)
            .map_err(|e| format!("no tracepoint ({}: {e})", format_path.display()))?;
        for (field, offset, size) in fields {
            if field_layout(&format, field) != Some((offset, size)) {
                return Err(format!(
                    "{}: field {field} is not at offset {offset} with size {size}",
                    format_path.display()
                ));
            }
        }
        let prog: &mut TracePoint = self
            .ebpf
            .program_mut(program)
            .ok_or_else(|| format!("the object has no program {program}"))?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        prog.load()
            .map_err(|e| format!("load: {}", crate::error_chain(&e)))?;
        prog.attach(category, name)
            .map_err(|e| format!("attach: {}", crate::error_chain(&e)))?;
        Ok(())
    }

    /// Writes the target thread group.
    fn set_target(&mut self, tgid: u32) -> Result<(), EbpfError> {
        let map_err = |source| EbpfError::Map {
            action: "write",
            map: CONFIG_MAP,
            source: Box::new(source),
        };
        let map = self
            .ebpf
            .map_mut(CONFIG_MAP)
            .ok_or(EbpfError::MissingInObject {
                kind: "map",
                name: CONFIG_MAP,
            })?;
        let mut config: Array<&mut MapData, FaultConfig> = Array::try_from(map).map_err(map_err)?;
        config
            .set(
                0,
                FaultConfig {
                    target_tgid: tgid,
                    reserved: 0,
                },
                0,
            )
            .map_err(map_err)
    }

    /// The attached sources.
    pub fn sources(&self) -> &[WriteSource] {
        &self.active
    }

    /// The sources that could not be attached, with the reason.
    pub fn missing(&self) -> &[(WriteSource, String)] {
        &self.missing
    }

    /// The directory of the pins, `/sys/fs/bpf/simrep/<vm>`.
    pub fn pin_dir(&self) -> &Path {
        &self.pins.dir
    }

    /// The pin path of `map`.
    pub fn map_pin_path(&self, map: &str) -> PathBuf {
        self.pins.dir.join(map)
    }

    /// Reads and clears the page maps; returns them with the statistics
    /// since the previous call. Call it with the vCPUs paused.
    ///
    /// # Errors
    ///
    /// [`EbpfError::Map`] if a map cannot be read or cleared.
    pub fn take_epoch(&mut self) -> Result<EpochWrites, EbpfError> {
        let ring = self.drain(RING_PAGES_MAP)?;
        let walk_pages = self.drain(WALK_PAGES_MAP)?;
        let fault_frames = self.drain(FAULT_PAGES_MAP)?;
        let mut ring_frames = BTreeMap::new();
        let mut ring_other_slots = BTreeMap::new();
        for (key, n) in ring {
            if key >> 48 == 0 {
                ring_frames.insert(key, n);
            } else {
                ring_other_slots.insert(key, n);
            }
        }
        let now = self.cumulative_stats()?;
        let mut delta = [0u64; WriteStat::COUNT as usize];
        for (d, (n, l)) in delta.iter_mut().zip(now.iter().zip(self.last_stats)) {
            *d = n.wrapping_sub(l);
        }
        self.last_stats = now;
        Ok(EpochWrites {
            ring_frames,
            ring_other_slots,
            walk_pages,
            fault_frames,
            stats: WriteStats::from_array(delta),
        })
    }

    /// Cumulative statistics since load, summed over CPUs.
    ///
    /// # Errors
    ///
    /// [`EbpfError::Map`] if the map cannot be read.
    pub fn total_stats(&self) -> Result<WriteStats, EbpfError> {
        Ok(WriteStats::from_array(self.cumulative_stats()?))
    }

    fn cumulative_stats(&self) -> Result<[u64; WriteStat::COUNT as usize], EbpfError> {
        let map_err = |source| EbpfError::Map {
            action: "read",
            map: WRITE_STATS_MAP,
            source: Box::new(source),
        };
        let map = self
            .ebpf
            .map(WRITE_STATS_MAP)
            .ok_or(EbpfError::MissingInObject {
                kind: "map",
                name: WRITE_STATS_MAP,
            })?;
        let stats: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err)?;
        let mut out = [0u64; WriteStat::COUNT as usize];
        for s in WriteStat::ALL {
            let v = stats.get(&s.index(), 0).map_err(map_err)?;
            out[s.index() as usize] = v.iter().copied().fold(0, u64::wrapping_add);
        }
        Ok(out)
    }

    /// Reads every entry of a per-CPU page map (summed over CPUs) and
    /// removes it: in batches (`BPF_MAP_LOOKUP_AND_DELETE_BATCH`, a few
    /// syscalls per epoch), or key by key where the kernel lacks batches.
    fn drain(&mut self, name: &'static str) -> Result<BTreeMap<u64, u64>, EbpfError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(EbpfError::MissingInObject { kind: "map", name })?;
        if let aya::maps::Map::PerCpuHashMap(data) = &*map {
            match drain_batched(data) {
                Ok(out) => return Ok(out),
                Err(error) => {
                    tracing::debug!(map = name, %error, "batched drain failed; key by key");
                }
            }
        }
        let map_err = |action| {
            move |source| EbpfError::Map {
                action,
                map: name,
                source: Box::new(source),
            }
        };
        let mut pages: PerCpuHashMap<&mut MapData, u64, u64> =
            PerCpuHashMap::try_from(map).map_err(map_err("open"))?;
        let mut out = BTreeMap::new();
        for entry in pages.iter() {
            let (key, values) = entry.map_err(map_err("read"))?;
            out.insert(key, values.iter().copied().fold(0, u64::wrapping_add));
        }
        for key in out.keys() {
            pages.remove(key).map_err(map_err("clear"))?;
        }
        Ok(out)
    }
}

/// `BPF_MAP_LOOKUP_AND_DELETE_BATCH` of `enum bpf_cmd`.
const BPF_MAP_LOOKUP_AND_DELETE_BATCH: libc::c_long = 25;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Reads and deletes every entry of a per-CPU hash map of `u64 -> u64` in
/// batches, summing the values over CPUs. An error before anything was
/// deleted leaves the map as it was (the caller falls back to single keys);
/// one after loses nothing that was returned, since deleted entries are in
/// the output of the call that deleted them.
fn drain_batched(data: &MapData) -> std::io::Result<BTreeMap<u64, u64>> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const CHUNK: usize = 4096;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    let fd = data.fd().as_fd().as_raw_fd();
    let mut keys = vec![0u64; CHUNK];
    let mut values = vec![0u64; CHUNK * cpus];
    let mut token = [0u64; 2];
    let mut out = BTreeMap::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: token[1..].as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: u32::try_from(fd).map_err(|_| std::io::ErrorKind::InvalidInput)?,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` whose pointers name
        // buffers that live across the call: `keys` holds `count` keys,
        // `values` `count` per-CPU values (8 bytes per possible CPU each),
        // the tokens 8 bytes each. The kernel writes at most that.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        let n = attr.count as usize;
        for (i, &key) in keys.iter().enumerate().take(n) {
            let sum = values[i * cpus..(i + 1) * cpus]
                .iter()
                .copied()
                .fold(0, u64::wrapping_add);
            *out.entry(key).or_insert(0) += sum;
        }
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) if out.is_empty() && first => return Err(e),
            Some(e) => {
                tracing::warn!(error = %e, "batched drain stopped; the rest stays for the next epoch");
                return Ok(out);
            }
        }
        token[0] = token[1];
        first = false;
    }
}
/// The pages eBPF saw written in an epoch against the dirty harvest of the
/// same epoch ([`EpochWrites::cross_check`]). The harvest stays the source
/// of truth; differences are for reporting.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CrossCheck {
    /// The source compared.
    pub source: Option<WriteSource>,
    /// Pages in both.
    pub both: usize,
    /// Pages eBPF saw written that the harvest lacks.
    pub only_ebpf: Vec<u64>,
    /// Harvested pages eBPF did not see (for the ring source: pages the VMM
    /// itself wrote, which KVM never pushes; for page-table walks also
    /// pages whose writable mapping survived the epoch boundary).
    pub only_harvest: Vec<u64>,
}

impl CrossCheck {
    /// Whether both sides agree exactly.
    pub fn is_exact(&self) -> bool {
        self.only_ebpf.is_empty() && self.only_harvest.is_empty()
    }
}

impl std::fmt::Display for CrossCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let head = |v: &[u64]| {
            v.iter()
                .take(8)
                .map(|g| format!("{g:#x}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        write!(
            f,
            "{:?}: {} pages in both, {} only eBPF [{}], {} only harvest [{}]",
            self.source,
            self.both,
            self.only_ebpf.len(),
            head(&self.only_ebpf),
            self.only_harvest.len(),
            head(&self.only_harvest)
        )
    }
}

impl EpochWrites {
    /// Compares the pages `source` saw with the epoch's dirty `harvest`
    /// (guest frames). For [`WriteSource::PagetableWalk`] the pages are
    /// guest *virtual* pages, comparable only in an identity-mapped guest
    /// like the bundled one. [`WriteSource::KvmPageFault`] and
    /// [`WriteSource::FastPageFault`] share one map, so both compare
    /// [`EpochWrites::fault_frames`] (guest frames).
    pub fn cross_check(&self, source: WriteSource, harvest: &DirtyPages) -> CrossCheck {
        let seen = match source {
            WriteSource::DirtyRing => &self.ring_frames,
            WriteSource::PagetableWalk => &self.walk_pages,
            WriteSource::KvmPageFault | WriteSource::FastPageFault => &self.fault_frames,
        };
        let mut out = CrossCheck {
            source: Some(source),
            ..Default::default()
        };
        for &g in seen.keys() {
            if harvest.contains(g) {
                out.both += 1;
            } else {
                out.only_ebpf.push(g);
            }
        }
        out.only_harvest = harvest.iter().filter(|g| !seen.contains_key(g)).collect();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cross_check_reports_both_sides() {
        let w = EpochWrites {
            ring_frames: [(1, 1), (2, 3), (9, 1)].into_iter().collect(),
            walk_pages: [(2, 1)].into_iter().collect(),
            ..Default::default()
        };
        let harvest = DirtyPages::from_unsorted(vec![5, 2, 1]);
        let c = w.cross_check(WriteSource::DirtyRing, &harvest);
        assert_eq!(c.both, 2);
        assert_eq!(c.only_ebpf, vec![9]);
        assert_eq!(c.only_harvest, vec![5]);
        assert!(!c.is_exact());
        let c = w.cross_check(WriteSource::PagetableWalk, &harvest);
        assert_eq!((c.both, c.only_ebpf.len()), (1, 0));
        assert_eq!(c.only_harvest, vec![1, 5]);
        let exact = w.cross_check(
            WriteSource::DirtyRing,
            &DirtyPages::from_unsorted(vec![1, 2, 9]),
        );
        assert!(exact.is_exact(), "{exact}");
    }

    #[test]
    fn cross_check_of_fault_sources_compares_fault_frames() {
        let w = EpochWrites {
            ring_frames: [(7, 1)].into_iter().collect(),
            walk_pages: [(8, 1)].into_iter().collect(),
            fault_frames: [(3, 2), (4, 1), (0x1_0000, 1)].into_iter().collect(),
            ..Default::default()
        };
        let harvest = DirtyPages::from_unsorted(vec![4, 3, 6]);
        for source in [WriteSource::KvmPageFault, WriteSource::FastPageFault] {
            let c = w.cross_check(source, &harvest);
            assert_eq!(c.source, Some(source));
            assert_eq!(c.both, 2, "{c}");
            assert_eq!(c.only_ebpf, vec![0x1_0000]);
            assert_eq!(c.only_harvest, vec![6]);
        }
        let exact = w.cross_check(
            WriteSource::KvmPageFault,
            &DirtyPages::from_unsorted(vec![0x1_0000, 4, 3]),
        );
        assert!(exact.is_exact(), "{exact}");
        // The other maps are not mixed in.
        let none = EpochWrites::default().cross_check(WriteSource::FastPageFault, &harvest);
        assert_eq!((none.both, none.only_harvest.len()), (0, 3));
    }

    #[test]
    fn every_source_has_a_distinct_program_and_tracepoint() {
        let mut programs = std::collections::BTreeSet::new();
        let mut tracepoints = std::collections::BTreeSet::new();
        for s in WriteSource::ALL {
            let (program, _, _, fields) = s.spec();
            assert!(programs.insert(program), "{program} twice");
            assert!(tracepoints.insert(s.tracepoint()), "{s:?}");
            // Past the common header, and the sizes the programs read.
            assert!(fields
                .iter()
                .all(|&(_, offset, size)| offset >= 8 && (size == 4 || size == 8)));
        }
        assert_eq!(WriteSource::KvmPageFault.tracepoint(), "kvm:kvm_page_fault");
        assert_eq!(
            WriteSource::FastPageFault.tracepoint(),
            "kvmmmu:fast_page_fault"
        );
    }

    #[test]
    fn stats_read_the_appended_indexes() {
        let mut v = [0u64; WriteStat::COUNT as usize];
        for s in WriteStat::ALL {
            v[s.index() as usize] = u64::from(s.index()) + 100;
        }
        let st = WriteStats::from_array(v);
        assert_eq!(st.read_errors, 106);
        assert_eq!(
            (st.fault_events, st.fault_writes, st.fault_filtered),
            (107, 108, 109)
        );
    }
}
