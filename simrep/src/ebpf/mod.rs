//! Loading, attaching, pinning and reading simrep's eBPF programs.
//!
//! The programs are built from `simrep-ebpf` by `build.rs` and embedded in
//! this library. [`PageFaultCounter`] loads the `page_fault_user` program on
//! the `exceptions:page_fault_user` tracepoint, points it at one thread group
//! (a process), pins its maps under `/sys/fs/bpf/simrep/<name>/` for
//! `bpftool map dump pinned ...`, and reads the per-CPU counters.
//!
//! Loading needs root (`CAP_BPF` and `CAP_PERFMON`), bpffs mounted at
//! `/sys/fs/bpf` and tracefs at `/sys/kernel/tracing`; `cargo xtask setup`
//! mounts both. When something is missing, [`PageFaultCounter::load`] says
//! what with an [`EbpfError`].
//!
//! Log records of the programs (aya-log, only on error paths) go to the
//! [`log`](https://docs.rs/log) facade; the subscriber that `main` installs
//! with `tracing_subscriber::fmt().init()` bridges them into `tracing`.

mod writes;
// ---- copy-on-write fault tracing (issue 5) ----
mod cow;
pub use cow::{
    consecutive_ranges, enable_bpf_run_stats, gfn_of, CowEvent, CowTraceError, CowTraceStats,
    CowTracer, CowTracing, COW_LOCK_DIR, COW_PINNED_MAPS, PF_ERROR_PRESENT,
};
pub use simrep_common::{
    CowConfig, CowRange, CowStat, COW_CONFIG_MAP, COW_EVENTS_BYTES, COW_EVENTS_MAP,
    COW_FAULT_PROGRAM, COW_RANGES_MAX, COW_STATS_MAP,
};
// ---- end of copy-on-write fault tracing ----
pub use simrep_common::{
    WriteStat, DIRTY_RING_PUSH_PROGRAM, PAGETABLE_WALK_PROGRAM, RING_PAGES_MAP, WALK_PAGES_MAP,
    WRITE_STATS_MAP,
};
pub use simrep_common::{FAST_PAGE_FAULT_PROGRAM, FAULT_PAGES_MAP, KVM_PAGE_FAULT_PROGRAM};
pub use writes::{
    CrossCheck, EpochWrites, WriteSource, WriteStats, WriteTracer, WriteTracing, WRITE_PINNED_MAPS,
};

use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
    sync::mpsc::{self, RecvTimeoutError},
    thread::JoinHandle,
    time::Duration,
};

use aya::{
    maps::{Array, MapData, MapError, PerCpuArray},
    pin::PinError,
    programs::{ProgramError, TracePoint},
    Ebpf,
};
use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};
use simrep_common::PAGE_FAULT_USER_ERROR_CODE_OFFSET;
pub use simrep_common::{
    Counter, FaultConfig, CONFIG_MAP, FAULT_COUNTERS_MAP, PAGE_FAULT_USER_CATEGORY,
    PAGE_FAULT_USER_PROGRAM, PAGE_FAULT_USER_TRACEPOINT,
};

/// The eBPF object built from `simrep-ebpf`, aligned for the ELF parser.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/simrep-ebpf"));

/// Where bpffs must be mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Directory under which each [`PageFaultCounter`] pins its maps, in a
/// subdirectory named after it.
pub const PIN_ROOT: &str = "/sys/fs/bpf/simrep";

/// Where tracefs must be mounted.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// The maps that are pinned.
const PINNED_MAPS: [&str; 2] = [CONFIG_MAP, FAULT_COUNTERS_MAP];

/// Loads simrep's eBPF object, telling a missing privilege from other
/// load failures.
pub(crate) fn load_object() -> Result<Ebpf, EbpfError> {
    load_object_with(&mut aya::EbpfLoader::new())
}

/// [`load_object`] through a configured loader (map sizes).
pub(crate) fn load_object_with(loader: &mut aya::EbpfLoader<'_>) -> Result<Ebpf, EbpfError> {
    loader.load(EBPF_OBJECT).map_err(|e| {
        let source = Box::new(e);
        if is_root() {
            EbpfError::LoadObject { source }
        } else {
            EbpfError::NotRoot { source }
        }
    })
}

/// Errors of loading and using the eBPF programs.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// The instance name cannot be a directory name under [`PIN_ROOT`].
    #[error("invalid eBPF instance name {name:?}: use letters, digits, '-', '_' and '.'")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// bpffs is not mounted at [`BPFFS`].
    #[error(
        "bpffs is not mounted at {BPFFS} (run `cargo xtask setup` or `mount -t bpf bpf {BPFFS}`)"
    )]
    BpffsNotMounted,
    /// tracefs is not mounted at [`TRACEFS`].
    #[error("tracefs is not mounted at {TRACEFS} (run `cargo xtask setup` or `mount -t tracefs tracefs {TRACEFS}`)")]
    TracefsNotMounted,
    /// The kernel has no such tracepoint.
    #[error("the kernel has no tracepoint {category}:{name} ({path} is missing)")]
    NoTracepoint {
        /// Tracepoint category.
        category: &'static str,
        /// Tracepoint name.
        name: &'static str,
        /// The missing tracefs directory.
        path: PathBuf,
    },
    /// Reading a tracefs or procfs file failed.
    #[error("cannot read {path}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The tracepoint record does not have the layout the program reads.
    #[error("{path}: expected field {field} at offset {offset} with size 8; the program would misread it")]
    TracepointFormat {
        /// The format file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// The offset the program uses.
        offset: usize,
    },
    /// The kernel refused the object and we are not root.
    #[error("loading eBPF programs needs root (CAP_BPF and CAP_PERFMON)")]
    NotRoot {
        /// What the kernel said.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// Loading the object (maps, BTF, relocations) failed.
    #[error("cannot load the eBPF object")]
    LoadObject {
        /// aya's error.
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// The embedded object lacks a map or program it should have.
    #[error("the eBPF object has no {kind} {name}")]
    MissingInObject {
        /// `"map"` or `"program"`.
        kind: &'static str,
        /// Its name.
        name: &'static str,
    },
    /// A map operation failed.
    #[error("cannot {action} map {map}")]
    Map {
        /// What was being done.
        action: &'static str,
        /// The map.
        map: &'static str,
        /// aya's error.
        #[source]
        source: Box<MapError>,
    },
    /// Loading the program into the kernel or attaching it failed.
    #[error("cannot {action} program {PAGE_FAULT_USER_PROGRAM}")]
    Program {
        /// `"load"` or `"attach"`.
        action: &'static str,
        /// aya's error.
        #[source]
        source: Box<ProgramError>,
    },
    /// Creating the pin directory failed.
    #[error("cannot create pin directory {path}")]
    CreatePinDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Another live process holds the pin directory.
    #[error("{path} is in use by another running simrep (its lock is held)")]
    PinDirInUse {
        /// The directory.
        path: PathBuf,
    },
    /// Locking the pin directory failed.
    #[error("cannot lock pin directory {path}")]
    LockPinDir {
        /// The directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: Errno,
    },
    /// Removing a stale pin left by a crashed run failed.
    #[error("cannot remove stale pin {path}")]
    RemoveStalePin {
        /// The pin.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Pinning a map failed.
    #[error("cannot pin map at {path}")]
    Pin {
        /// The pin path.
        path: PathBuf,
        /// aya's error.
        #[source]
        source: Box<PinError>,
    },
    /// None of the write-tracing tracepoints could be attached.
    #[error("no eBPF write source could be attached ({missing})")]
    NoWriteSource {
        /// Each source and why it is missing.
        missing: String,
    },
    /// Starting the aya-log reader failed.
    #[error("cannot read the eBPF log")]
    Log {
        /// aya-log's error.
        #[source]
        source: Box<aya_log::Error>,
    },
}

/// User page-fault counts of the target thread group, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FaultCounts {
    /// User page faults of the target (reads and writes).
    pub faults: u64,
    /// User write faults of the target.
    pub write_faults: u64,
    /// User page faults of other processes, seen and not attributed.
    pub other_faults: u64,
    /// Tracepoint records the program could not read.
    pub read_errors: u64,
}

/// The `page_fault_user` program, loaded, attached and pinned.
///
/// Dropping it detaches the program and removes the pins.
pub struct PageFaultCounter {
    /// Stops the log reader first.
    _log: Option<LogPump>,
    /// Owns the maps and the program (and through it the attachment).
    ebpf: Ebpf,
    /// The pins, removed on drop.
    pins: PinDir,
}

impl std::fmt::Debug for PageFaultCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageFaultCounter")
            .field("pin_dir", &self.pins.dir)
            .finish_non_exhaustive()
    }
}

impl PageFaultCounter {
    /// Loads the program, sets its target to `target_tgid` (0: count
    /// nothing), pins its maps under `/sys/fs/bpf/simrep/<name>/` and
    /// attaches it to `exceptions:page_fault_user`.
    ///
    /// Pins left by a crashed process under the same name are replaced; a
    /// live process holding the name is an error.
    ///
    /// # Errors
    ///
    /// Not root, bpffs or tracefs not mounted, no such tracepoint or an
    /// unexpected record layout, the name in use, and any failure of the
    /// kernel to load, pin or attach: see [`EbpfError`].
    pub fn load(name: &str, target_tgid: u32) -> Result<Self, EbpfError> {
        preflight(name)?;
        check_page_fault_user(&[("error_code", PAGE_FAULT_USER_ERROR_CODE_OFFSET)])?;

        let mut ebpf = load_object()?;
        let log = LogPump::start(&mut ebpf)?;
        let mut this = Self {
            _log: log,
            pins: PinDir::create(name)?,
            ebpf,
        };
        this.set_target(target_tgid)?;
        for map in PINNED_MAPS {
            let map_ref = this.ebpf.map(map).ok_or(EbpfError::MissingInObject {
                kind: "map",
                name: map,
            })?;
            this.pins.pin(map, map_ref)?;
        }
        this.attach()?;
        Ok(this)
    }

    /// Loads and attaches the program.
    fn attach(&mut self) -> Result<(), EbpfError> {
        let program =
            self.ebpf
                .program_mut(PAGE_FAULT_USER_PROGRAM)
                .ok_or(EbpfError::MissingInObject {
                    kind: "program",
                    name: PAGE_FAULT_USER_PROGRAM,
                })?;
        let program: &mut TracePoint = program.try_into().map_err(|e| EbpfError::Program {
            action: "load",
            source: Box::new(e),
        })?;
        program.load().map_err(|e| EbpfError::Program {
            action: "load",
            source: Box::new(e),
        })?;
        // The link is owned by the program and detached when it drops.
        program
            .attach(PAGE_FAULT_USER_CATEGORY, PAGE_FAULT_USER_TRACEPOINT)
            .map_err(|e| EbpfError::Program {
                action: "attach",
                source: Box::new(e),
            })?;
        Ok(())
    }

    /// Counts the faults of thread group `tgid` from now on (0: nothing).
    /// The counters are not reset.
    ///
    /// # Errors
    ///
    /// [`EbpfError::Map`] if the config map cannot be written.
    pub fn set_target(&mut self, tgid: u32) -> Result<(), EbpfError> {
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
        let value = FaultConfig {
            target_tgid: tgid,
            reserved: 0,
        };
        config.set(0, value, 0).map_err(map_err)
    }

    /// Reads the counters, summed over CPUs.
    ///
    /// # Errors
    ///
    /// [`EbpfError::Map`] if the counter map cannot be read.
    pub fn counts(&self) -> Result<FaultCounts, EbpfError> {
        let map_err = |source| EbpfError::Map {
            action: "read",
            map: FAULT_COUNTERS_MAP,
            source: Box::new(source),
        };
        let map = self
            .ebpf
            .map(FAULT_COUNTERS_MAP)
            .ok_or(EbpfError::MissingInObject {
                kind: "map",
                name: FAULT_COUNTERS_MAP,
            })?;
        let counters: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err)?;
        let read = |c: Counter| -> Result<u64, EbpfError> {
            let per_cpu = counters.get(&c.index(), 0).map_err(map_err)?;
            Ok(per_cpu.iter().copied().fold(0u64, u64::wrapping_add))
        };
        Ok(FaultCounts {
            faults: read(Counter::Faults)?,
            write_faults: read(Counter::WriteFaults)?,
            other_faults: read(Counter::OtherFaults)?,
            read_errors: read(Counter::ReadErrors)?,
        })
    }

    /// The directory holding this instance's pins,
    /// `/sys/fs/bpf/simrep/<name>`.
    pub fn pin_dir(&self) -> &Path {
        &self.pins.dir
    }

    /// The pin path of map `map` (e.g. [`FAULT_COUNTERS_MAP`]).
    pub fn map_pin_path(&self, map: &str) -> PathBuf {
        self.pins.dir.join(map)
    }
}

/// A pin directory, locked for the lifetime of its owner; its pins are
/// removed on drop.
struct PinDir {
    /// `/sys/fs/bpf/simrep/<name>`.
    dir: PathBuf,
    /// Pins created so far.
    pinned: Vec<PathBuf>,
    /// Exclusive `flock` on the directory: a crashed owner's lock is gone,
    /// a live owner's is not, which tells stale pins from live ones.
    _lock: Flock<File>,
}

impl PinDir {
    /// Creates and locks `/sys/fs/bpf/simrep/<name>`.
    fn create(name: &str) -> Result<Self, EbpfError> {
        let dir = Path::new(PIN_ROOT).join(name);
        fs::create_dir_all(&dir).map_err(|source| EbpfError::CreatePinDir {
            path: dir.clone(),
            source,
        })?;
        let file = File::open(&dir).map_err(|source| EbpfError::CreatePinDir {
            path: dir.clone(),
            source,
        })?;
        let lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) => return Err(EbpfError::PinDirInUse { path: dir }),
            Err((_, source)) => return Err(EbpfError::LockPinDir { path: dir, source }),
        };
        Ok(Self {
            dir,
            pinned: Vec::new(),
            _lock: lock,
        })
    }

    /// Pins `map` as `<dir>/<name>`, replacing a stale pin (we hold the
    /// lock, so no live process owns one).
    fn pin(&mut self, name: &str, map: &aya::maps::Map) -> Result<(), EbpfError> {
        let path = self.dir.join(name);
        match fs::remove_file(&path) {
            Ok(()) => tracing::info!(path = %path.display(), "removed stale pin"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(EbpfError::RemoveStalePin { path, source }),
        }
        map.pin(&path).map_err(|source| EbpfError::Pin {
            path: path.clone(),
            source: Box::new(source),
        })?;
        self.pinned.push(path);
        Ok(())
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        for pin in &self.pinned {
            if let Err(error) = fs::remove_file(pin) {
                tracing::warn!(path = %pin.display(), %error, "cannot remove pin");
            }
        }
        // Fails if someone put other files there; leave them.
        if let Err(error) = fs::remove_dir(&self.dir) {
            tracing::debug!(path = %self.dir.display(), %error, "pin directory kept");
        }
    }
}

/// A thread forwarding aya-log records of the programs to the `log` facade.
struct LogPump {
    /// Dropped to stop the thread.
    stop: Option<mpsc::Sender<()>>,
    /// The thread.
    thread: Option<JoinHandle<()>>,
}

impl LogPump {
    /// How often the log ring buffer is drained.
    const PERIOD: Duration = Duration::from_millis(200);

    /// Starts the reader; `None` if the object logs nothing.
    fn start(ebpf: &mut Ebpf) -> Result<Option<Self>, EbpfError> {
        let mut logger = match aya_log::EbpfLogger::init(ebpf) {
            Ok(logger) => logger,
            Err(aya_log::Error::MapNotFound) => return Ok(None),
            Err(e) => {
                return Err(EbpfError::Log {
                    source: Box::new(e),
                })
            }
        };
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("ebpf-log".into())
            .spawn(move || loop {
                logger.flush();
                match stopped.recv_timeout(Self::PERIOD) {
                    Err(RecvTimeoutError::Timeout) => {}
                    Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                        logger.flush();
                        break;
                    }
                }
            });
        match thread {
            Ok(thread) => Ok(Some(Self {
                stop: Some(stop),
                thread: Some(thread),
            })),
            Err(error) => {
                // Logs are a diagnostic aid; run without them.
                tracing::warn!(%error, "cannot start the eBPF log thread");
                Ok(None)
            }
        }
    }
}

impl Drop for LogPump {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the eBPF log thread panicked");
            }
        }
    }
}

/// Instance names become a directory under [`PIN_ROOT`].
fn check_name(name: &str) -> Result<(), EbpfError> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(EbpfError::InvalidName { name: name.into() })
    }
}

/// The checks every tracer makes before it loads anything: a usable
/// instance name, bpffs mounted at [`BPFFS`] and tracefs at [`TRACEFS`].
pub(crate) fn preflight(name: &str) -> Result<(), EbpfError> {
    check_name(name)?;
    if !is_mounted(BPFFS, "bpf")? {
        return Err(EbpfError::BpffsNotMounted);
    }
    if !Path::new(TRACEFS).join("events").is_dir() {
        return Err(EbpfError::TracefsNotMounted);
    }
    Ok(())
}

/// Whether a file system of type `fstype` is mounted at `target`.
fn is_mounted(target: &str, fstype: &str) -> Result<bool, EbpfError> {
    let path = Path::new("/proc/self/mounts");
    let mounts = fs::read_to_string(path).map_err(|source| EbpfError::ReadFile {
        path: path.into(),
        source,
    })?;
    Ok(mounts.lines().any(|l| {
        let mut fields = l.split_whitespace().skip(1);
        fields.next() == Some(target) && fields.next() == Some(fstype)
    }))
}

/// Checks that `exceptions:page_fault_user` exists and its record has each
/// of `fields` (name, offset; 8 bytes each) where the programs read them
/// (after [`preflight`]).
pub(crate) fn check_page_fault_user(fields: &[(&'static str, usize)]) -> Result<(), EbpfError> {
    let dir = Path::new(TRACEFS)
        .join("events")
        .join(PAGE_FAULT_USER_CATEGORY)
        .join(PAGE_FAULT_USER_TRACEPOINT);
    if !dir.is_dir() {
        return Err(EbpfError::NoTracepoint {
            category: PAGE_FAULT_USER_CATEGORY,
            name: PAGE_FAULT_USER_TRACEPOINT,
            path: dir,
        });
    }
    let path = dir.join("format");
    let format = fs::read_to_string(&path).map_err(|source| EbpfError::ReadFile {
        path: path.clone(),
        source,
    })?;
    for &(field, offset) in fields {
        if field_layout(&format, field) != Some((offset, 8)) {
            return Err(EbpfError::TracepointFormat {
                path,
                field,
                offset,
            });
        }
    }
    Ok(())
}

/// Offset and size of `field` in a tracefs `format` file, from a line like
/// `field:unsigned long error_code;<TAB>offset:24;<TAB>size:8;<TAB>signed:0;`.
fn field_layout(format: &str, field: &str) -> Option<(usize, usize)> {
    format.lines().find_map(|line| {
        let mut parts = line.trim().split(';').map(str::trim);
        let decl = parts.next()?.strip_prefix("field:")?;
        if decl
            .rsplit(|c: char| c.is_whitespace() || c == '*')
            .next()?
            != field
        {
            return None;
        }
        let offset = parts.next()?.strip_prefix("offset:")?.parse().ok()?;
        let size = parts.next()?.strip_prefix("size:")?.parse().ok()?;
        Some((offset, size))
    })
}

/// Whether the effective user is root.
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    euid == 0
}

#[cfg(test)]
mod tests;
