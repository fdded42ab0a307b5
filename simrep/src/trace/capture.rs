//! Capture of running processes into a memory trace (`simrep trace capture`).
//!
//! Each epoch the target (with `tree`, also its descendants) is stopped with
//! `SIGSTOP`; once every thread is really stopped (`T` in
//! `/proc/PID/task/TID/stat`) the capture reads `/proc/PID/maps`, selects
//! pages as `FORMAT.md` ("What is read") says, reads them with batched
//! `process_vm_readv` calls and sends `SIGCONT`. While the target runs
//! again, the pages are compared exactly with the previous epoch's copy and
//! the changed ones written as `PAGE` records; pages no longer present are
//! `DROP`s. Then the capture sleeps for the rest of the epoch.
//!
//! **The target is always resumed**: the stopped processes are held by a
//! guard whose `Drop` sends `SIGCONT`, so an error, a panic, the stop flag
//! (Ctrl-C in the CLI) or the target's exit all leave it running. A target
//! that exits mid-capture ends the capture cleanly (with `END`).
//!
//! Caveat: a target that was already stopped by someone else when the
//! capture starts is resumed by it.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, IoSliceMut, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;

use super::format::{
    make_key, EpochEnd, Record, Region, TraceError, TraceHeader, TraceWriter, MAX_COMM,
    MAX_REGION_NAME, MAX_SLOT, PROT_EXEC, PROT_READ, PROT_SHARED, PROT_WRITE, SHARED_SLOT_BASE,
};
use super::keymap::KeyMap;
use crate::compress::{Page, PAGE_SIZE, ZERO_PAGE};

/// Default run time of the target between two stops.
pub const DEFAULT_EPOCH_MS: u32 = 100;
/// Default zstd level of the trace body.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;
/// Private file-backed mappings up to this size are read whole.
pub const FILE_MAPPING_READ_ALL: u64 = 256 << 20;
/// Remote iovecs per `process_vm_readv` call (the kernel's `IOV_MAX`).
const MAX_IOV: usize = 1024;
/// Pages per `process_vm_readv` call.
const MAX_BATCH_PAGES: usize = 4096;
/// How long to wait for every thread to stop before reading anyway.
const STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// `/proc/PID/pagemap` entries read at once.
const PAGEMAP_CHUNK: usize = 8192;
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

/// What to capture and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureOptions {
    /// The target process.
    pub pid: u32,
    /// Also trace every descendant of the target (found each epoch).
    pub tree: bool,
    /// Run time of the target between two stops, in ms.
    pub epoch_ms: u32,
    /// Number of epochs to capture, including epoch 0; `None`: until the
    /// stop flag is set or the target exits.
    pub epochs: Option<u32>,
    /// zstd level of the body; `None`: plain body.
    pub zstd_level: Option<i32>,
    /// The header's description; `None`: made from the pid and name.
    pub description: Option<String>,
}

impl CaptureOptions {
    /// Defaults for `pid`: no descendants, 100 ms epochs, until stopped,
    /// zstd level 3.
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            tree: false,
            epoch_ms: DEFAULT_EPOCH_MS,
            epochs: None,
            zstd_level: Some(DEFAULT_ZSTD_LEVEL),
            description: None,
        }
    }
}

/// What one epoch captured (passed to the progress callback).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochSummary {
    /// The epoch number.
    pub epoch: u32,
    /// Traced processes alive in the epoch.
    pub processes: u32,
    /// Pages read.
    pub tracked_pages: u64,
    /// Pages that could not be read (skipped).
    pub unreadable_pages: u64,
    /// PAGE records written.
    pub dirty: u32,
    /// DROP records written.
    pub dropped: u32,
    /// Whether the mapping list changed (REGIONS written).
    pub regions_changed: bool,
    /// When SIGSTOP was sent, ns since capture start.
    pub t_stop_ns: u64,
    /// How long the target ran since the previous SIGCONT.
    pub run_ns: u64,
    /// SIGSTOP sent → SIGCONT sent, in ns.
    pub stop_ns: u64,
    /// Time in `process_vm_readv`, in ns.
    pub read_ns: u64,
    /// Time comparing and writing, in ns.
    pub compare_ns: u64,
}

/// Why a capture ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The requested number of epochs was captured.
    EpochLimit,
    /// The stop flag was set.
    StopRequested,
    /// Every traced process exited.
    TargetExited,
}

/// What a whole capture did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureSummary {
    /// Epochs written, including epoch 0.
    pub epochs: u32,
    /// Pages in epoch 0 (the full image).
    pub initial_pages: u64,
    /// PAGE records in the delta epochs.
    pub dirty_pages: u64,
    /// DROP records.
    pub dropped_pages: u64,
    /// Processes traced over the capture.
    pub processes: u32,
    /// Longest stop, in ns.
    pub max_stop_ns: u64,
    /// Sum of the stops, in ns.
    pub total_stop_ns: u64,
    /// Why the capture ended.
    pub end: EndReason,
}

/// Errors of a capture. The target is resumed whatever the error.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The options make no sense.
    #[error("invalid capture options: {reason}")]
    InvalidOptions {
        /// What is wrong.
        reason: &'static str,
    },
    /// The target pid does not exist.
    #[error("no process with pid {pid}")]
    NoSuchProcess {
        /// The pid.
        pid: u32,
    },
    /// The target exited (or is a zombie) before the first epoch completed.
    #[error("process {pid} exited before the first epoch was captured")]
    TargetExited {
        /// The pid.
        pid: u32,
    },
    /// Not allowed to stop or read the process.
    #[error("permission denied to {action} process {pid} (run as root or as its owner, with ptrace allowed)")]
    PermissionDenied {
        /// The pid.
        pid: i32,
        /// What was refused.
        action: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Sending a signal failed.
    #[error("cannot send {signal} to process {pid}")]
    Signal {
        /// The pid.
        pid: i32,
        /// The signal.
        signal: Signal,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Reading a `/proc` file failed.
    #[error("cannot read {path}")]
    ReadProc {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A `/proc` file has an unexpected format.
    #[error("cannot parse {path}: {reason}")]
    ParseProc {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// `process_vm_readv` failed.
    #[error("cannot read the memory of process {pid} in epoch {epoch}")]
    ReadMemory {
        /// The pid.
        pid: i32,
        /// The epoch.
        epoch: u32,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Writing the trace failed.
    #[error("cannot write the trace in epoch {epoch}")]
    WriteTrace {
        /// The epoch.
        epoch: u32,
        /// The cause.
        #[source]
        source: TraceError,
    },
}

/// Holds processes stopped with SIGSTOP; sends SIGCONT to them on
/// [`resume`](Self::resume) or when dropped (error and panic paths).
struct StopGuard {
    pids: Vec<Pid>,
}

impl StopGuard {
    fn new() -> Self {
        Self { pids: Vec::new() }
    }

    /// Sends SIGSTOP to `pid`; it is resumed when the guard is.
    fn stop(&mut self, pid: Pid) -> Result<(), Errno> {
        self.pids.push(pid);
        kill(pid, Signal::SIGSTOP)
    }

    /// Sends SIGCONT to every process stopped; errors (exited) are ignored.
    fn resume(&mut self) {
        for pid in self.pids.drain(..) {
            if let Err(e) = kill(pid, Signal::SIGCONT) {
                tracing::debug!(pid = pid.as_raw(), error = %e, "SIGCONT failed (exited?)");
            }
        }
    }
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.resume();
    }
}

/// A traced process.
#[derive(Debug)]
struct Proc {
    pid: Pid,
    slot: u32,
    comm: String,
    starttime: u64,
    alive: bool,
    announced: bool,
}

/// The fields of `/proc/PID/stat` the capture uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stat {
    state: char,
    ppid: i32,
    starttime: u64,
}

fn proc_path(pid: Pid, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{}/{rest}", pid.as_raw()))
}

fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// Reads a `/proc` file; `None` if the process is gone.
fn read_proc(path: PathBuf) -> Result<Option<String>, CaptureError> {
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if is_gone(&e) => Ok(None),
        Err(source) => Err(CaptureError::ReadProc { path, source }),
    }
}

fn parse_stat(text: &str) -> Option<Stat> {
    // "pid (comm) S ppid …": comm may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    // starttime is field 22; `state` was field 3.
    let starttime = f.nth(22 - 5)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        starttime,
    })
}

fn read_stat_at(path: PathBuf) -> Result<Option<Stat>, CaptureError> {
    match read_proc(path.clone())? {
        None => Ok(None),
        Some(text) => parse_stat(&text).map(Some).ok_or(CaptureError::ParseProc {
            path,
            reason: "unexpected stat line",
        }),
    }
}

fn read_stat(pid: Pid) -> Result<Option<Stat>, CaptureError> {
    read_stat_at(proc_path(pid, "stat"))
}

fn read_comm(pid: Pid) -> String {
    let mut comm = read_proc(proc_path(pid, "comm"))
        .ok()
        .flatten()
        .map(|s| s.trim_end_matches('\n').to_owned())
        .unwrap_or_default();
    truncate_utf8(&mut comm, MAX_COMM);
    comm
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut at = max;
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
}

fn dead(state: char) -> bool {
    matches!(state, 'Z' | 'X' | 'x')
}

fn stopped(state: char) -> bool {
    matches!(state, 'T' | 't') || dead(state)
}

/// Whether every thread of `pid` is stopped. `None`: the process is gone.
fn all_threads_stopped(pid: Pid) -> Result<Option<bool>, CaptureError> {
    let dir = proc_path(pid, "task");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if is_gone(&e) => return Ok(None),
        Err(source) => return Err(CaptureError::ReadProc { path: dir, source }),
    };
    for entry in entries {
        let entry = entry.map_err(|source| CaptureError::ReadProc {
            path: dir.clone(),
            source,
        })?;
        match read_stat_at(entry.path().join("stat"))? {
            Some(s) if !stopped(s.state) => return Ok(Some(false)),
            _ => {}
        }
    }
    Ok(Some(true))
}

/// Parent → children of every process, from a scan of `/proc` (the kernel
/// may lack `/proc/PID/task/TID/children`).
fn children_map() -> Result<HashMap<i32, Vec<i32>>, CaptureError> {
    let mut map: HashMap<i32, Vec<i32>> = HashMap::new();
    let dir = PathBuf::from("/proc");
    let entries = std::fs::read_dir(&dir).map_err(|source| CaptureError::ReadProc {
        path: dir.clone(),
        source,
    })?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // Processes come and go during the scan: errors mean "gone".
        if let Ok(Some(stat)) = read_stat(Pid::from_raw(pid)) {
            map.entry(stat.ppid).or_default().push(pid);
        }
    }
    Ok(map)
}

/// Children of `pid` from `/proc/PID/task/*/children`; `None` when the
/// kernel does not provide these files.
fn children_from_files(pid: Pid) -> Result<Option<Vec<i32>>, CaptureError> {
    let dir = proc_path(pid, "task");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(Some(Vec::new()));
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        match std::fs::read_to_string(entry.path().join("children")) {
            Ok(s) => out.extend(
                s.split_ascii_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound && entry.path().exists() => {
                return Ok(None)
            }
            Err(_) => {}
        }
    }
    Ok(Some(out))
}

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    prot: u8,
    offset: u64,
    dev: u64,
    inode: u64,
    name: String,
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut f = line.splitn(6, ' ');
    let (range, perms, offset, dev, inode) =
        (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
    let name = f.next().unwrap_or("").trim_start().to_owned();
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    let p = perms.as_bytes();
    if p.len() < 4 {
        return None;
    }
    let mut prot = 0;
    for (i, (c, bit)) in [
        (b'r', PROT_READ),
        (b'w', PROT_WRITE),
        (b'x', PROT_EXEC),
        (b's', PROT_SHARED),
    ]
    .into_iter()
    .enumerate()
    {
        if p[i] == c {
            prot |= bit;
        }
    }
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        prot,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: u64::from_str_radix(major, 16).ok()? << 32 | u64::from_str_radix(minor, 16).ok()?,
        inode: inode.trim().parse().ok()?,
        name,
    })
}

/// How a mapping is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Private anonymous: present or swapped pages.
    PrivateAnon,
    /// Private file-backed: all pages (present pages if huge).
    PrivateFile,
    /// Shared anonymous, SysV/POSIX shm, memfd: all pages, keyed by object.
    SharedObject,
    /// Not read.
    Skip,
}

fn classify(m: &Mapping) -> Kind {
    let name = m.name.as_str();
    if m.prot & PROT_WRITE == 0
        || name.starts_with("[vvar")
        || name == "[vdso]"
        || name == "[vsyscall]"
    {
        return Kind::Skip;
    }
    if m.prot & PROT_SHARED != 0 {
        let object = name.is_empty()
            || name.starts_with("/dev/zero")
            || name.starts_with("/SYSV")
            || name.starts_with("/memfd:")
            || name.starts_with("/dev/shm/");
        return if object {
            Kind::SharedObject
        } else {
            Kind::Skip
        };
    }
    if m.inode == 0 || name.is_empty() || name.starts_with('[') {
        Kind::PrivateAnon
    } else {
        Kind::PrivateFile
    }
}

/// Virtual page addresses of `[start, end)` that pagemap reports present or
/// swapped. `None`: the process is gone.
fn resident_pages(
    pagemap: &File,
    start: u64,
    end: u64,
    out: &mut Vec<u64>,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let mut vpn = start / PAGE_SIZE as u64;
    let end_vpn = end / PAGE_SIZE as u64;
    while vpn < end_vpn {
        let n = ((end_vpn - vpn) as usize).min(PAGEMAP_CHUNK);
        buf.resize(n * 8, 0);
        let got = read_at_full(pagemap, buf, vpn * 8)?;
        let entries = got / 8;
        if entries == 0 {
            break;
        }
        for (i, e) in buf[..entries * 8].chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(e);
            if u64::from_ne_bytes(b) & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) != 0 {
                out.push((vpn + i as u64) * PAGE_SIZE as u64);
            }
        }
        vpn += entries as u64;
    }
    Ok(())
}

fn read_at_full(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Copies of the pages as of the end of the previous epoch.
#[derive(Default)]
struct Store {
    index: KeyMap<u32>,
    pages: Vec<Page>,
    keys: Vec<u64>,
    /// Per slot: the epoch mark of the last epoch that read the page.
    marks: Vec<u32>,
    free: Vec<u32>,
}

impl Store {
    fn insert(&mut self, key: u64, data: &Page, mark: u32) {
        let slot = match self.free.pop() {
            Some(s) => {
                let i = s as usize;
                self.pages[i] = *data;
                self.keys[i] = key;
                self.marks[i] = mark;
                s
            }
            None => {
                self.pages.push(*data);
                self.keys.push(key);
                self.marks.push(mark);
                (self.pages.len() - 1) as u32
            }
        };
        self.index.insert(key, slot);
    }

    /// Keys stored but not marked with `mark`, sorted; removed.
    fn take_unmarked(&mut self, mark: u32) -> Vec<u64> {
        let mut gone: Vec<u64> = self
            .index
            .iter()
            .filter(|(_, &s)| self.marks[s as usize] != mark)
            .map(|(&k, _)| k)
            .collect();
        gone.sort_unstable();
        for k in &gone {
            if let Some(s) = self.index.remove(k) {
                self.free.push(s);
            }
        }
        gone
    }
}

/// Pages read this epoch.
#[derive(Default)]
struct Snapshot {
    pages: Vec<Page>,
    keys: Vec<u64>,
    len: usize,
    unreadable: u64,
    read_ns: u64,
}

/// Result of reading one process's pages.
enum ReadOutcome {
    Done,
    Exited,
}

impl Snapshot {
    fn clear(&mut self) {
        self.keys.clear();
        self.len = 0;
        self.unreadable = 0;
        self.read_ns = 0;
    }

    /// Reads the pages of `plan` (key, address) from `pid` and appends the
    /// readable ones.
    fn read(
        &mut self,
        pid: Pid,
        epoch: u32,
        plan: &[(u64, u64)],
    ) -> Result<ReadOutcome, CaptureError> {
        let base = self.len;
        if self.pages.len() < base + plan.len() {
            self.pages.resize(base + plan.len(), ZERO_PAGE);
        }
        let mut ok = vec![true; plan.len()];
        let mut remote: Vec<RemoteIoVec> = Vec::with_capacity(MAX_IOV);
        let mut outcome = ReadOutcome::Done;
        let (mut i, mut single) = (0, false);
        while i < plan.len() {
            remote.clear();
            let mut j = i;
            while j < plan.len() && j - i < MAX_BATCH_PAGES && !(single && j > i) {
                let va = plan[j].1 as usize;
                let full = remote.len() == MAX_IOV;
                match remote.last_mut() {
                    Some(last) if last.base + last.len == va => last.len += PAGE_SIZE,
                    _ if full => break,
                    _ => remote.push(RemoteIoVec {
                        base: va,
                        len: PAGE_SIZE,
                    }),
                }
                j += 1;
            }
            let local = self.pages[base + i..base + j].as_flattened_mut();
            let t = Instant::now();
            let r = process_vm_readv(pid, &mut [IoSliceMut::new(local)], &remote);
            self.read_ns += t.elapsed().as_nanos() as u64;
            match r {
                Ok(n) if n == (j - i) * PAGE_SIZE => {
                    i = j;
                    single = false;
                }
                Ok(_) if single => {
                    ok[i] = false;
                    i += 1;
                    single = false;
                }
                Ok(n) => {
                    // Stopped at a page that cannot be read: retry it alone.
                    i += n / PAGE_SIZE;
                    single = true;
                }
                Err(Errno::EFAULT | Errno::EIO) if single => {
                    ok[i] = false;
                    i += 1;
                    single = false;
                }
                Err(Errno::EFAULT | Errno::EIO) => single = true,
                Err(Errno::ESRCH) => {
                    ok[i..].fill(false);
                    outcome = ReadOutcome::Exited;
                    break;
                }
                Err(Errno::EPERM) => {
                    return Err(CaptureError::PermissionDenied {
                        pid: pid.as_raw(),
                        action: "read the memory of",
                        source: io::Error::from_raw_os_error(libc::EPERM),
                    })
                }
                Err(source) => {
                    return Err(CaptureError::ReadMemory {
                        pid: pid.as_raw(),
                        epoch,
                        source,
                    })
                }
            }
        }
        // Compact: keep the pages read.
        let mut w = base;
        for (k, &(key, _)) in plan.iter().enumerate() {
            if ok[k] {
                if w != base + k {
                    self.pages[w] = self.pages[base + k];
                }
                self.keys.push(key);
                w += 1;
            } else {
                self.unreadable += 1;
            }
        }
        self.len = w;
        Ok(outcome)
    }
}

/// The capture's state across epochs.
struct Capturer<'a> {
    opts: &'a CaptureOptions,
    procs: Vec<Proc>,
    next_slot: u32,
    shared_slots: HashMap<(u64, u64), u32>,
    next_shared: u32,
    children_files: bool,
    store: Store,
    snap: Snapshot,
    regions: Vec<Region>,
    prev_regions: Option<Vec<Region>>,
    plan: Vec<(u64, u64)>,
    addrs: Vec<u64>,
    pagemap_buf: Vec<u8>,
    shared_seen: KeyMap<()>,
}

impl<'a> Capturer<'a> {
    fn add_proc(&mut self, pid: Pid, stat: Stat) -> bool {
        if self.next_slot >= SHARED_SLOT_BASE {
            tracing::warn!(pid = pid.as_raw(), "out of process slots; not traced");
            return false;
        }
        let comm = read_comm(pid);
        tracing::debug!(pid = pid.as_raw(), slot = self.next_slot, %comm, "tracing process");
        self.procs.push(Proc {
            pid,
            slot: self.next_slot,
            comm,
            starttime: stat.starttime,
            alive: true,
            announced: false,
        });
        self.next_slot += 1;
        true
    }

    /// Waits until every process in `idx` is stopped (or gone).
    fn wait_stopped(&mut self, idx: &[usize]) -> Result<(), CaptureError> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut pause = Duration::from_micros(20);
        loop {
            let mut all = true;
            for &i in idx {
                let p = &mut self.procs[i];
                if !p.alive {
                    continue;
                }
                match read_stat(p.pid)? {
                    Some(s) if s.starttime == p.starttime && !dead(s.state) => {}
                    _ => {
                        p.alive = false;
                        continue;
                    }
                }
                match all_threads_stopped(p.pid)? {
                    None => p.alive = false,
                    Some(false) => all = false,
                    Some(true) => {}
                }
            }
            if all {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    "some traced threads did not stop within {STOP_TIMEOUT:?}; reading anyway"
                );
                return Ok(());
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }

    fn signal_stop(&mut self, guard: &mut StopGuard, i: usize) -> Result<(), CaptureError> {
        let pid = self.procs[i].pid;
        match guard.stop(pid) {
            Ok(()) => Ok(()),
            Err(Errno::ESRCH) => {
                self.procs[i].alive = false;
                Ok(())
            }
            Err(Errno::EPERM) => Err(CaptureError::PermissionDenied {
                pid: pid.as_raw(),
                action: "stop",
                source: io::Error::from_raw_os_error(libc::EPERM),
            }),
            Err(source) => Err(CaptureError::Signal {
                pid: pid.as_raw(),
                signal: Signal::SIGSTOP,
                source,
            }),
        }
    }

    /// Stops every traced process and, with `tree`, every descendant.
    fn stop_all(&mut self, guard: &mut StopGuard) -> Result<(), CaptureError> {
        let idx: Vec<usize> = (0..self.procs.len())
            .filter(|&i| self.procs[i].alive)
            .collect();
        for &i in &idx {
            self.signal_stop(guard, i)?;
        }
        self.wait_stopped(&idx)?;
        if !self.opts.tree {
            return Ok(());
        }
        // Stopped parents cannot fork: repeat until no new descendant.
        loop {
            let live: Vec<i32> = self
                .procs
                .iter()
                .filter(|p| p.alive)
                .map(|p| p.pid.as_raw())
                .collect();
            let mut found = Vec::new();
            let mut scan = None;
            for &pid in &live {
                let kids = match self.children_files {
                    true => children_from_files(Pid::from_raw(pid))?,
                    false => None,
                };
                let kids = match kids {
                    Some(k) => k,
                    None => {
                        self.children_files = false;
                        if scan.is_none() {
                            scan = Some(children_map()?);
                        }
                        scan.as_ref()
                            .and_then(|m| m.get(&pid))
                            .cloned()
                            .unwrap_or_default()
                    }
                };
                for kid in kids {
                    let known = self.procs.iter().any(|p| p.alive && p.pid.as_raw() == kid);
                    if !known && !found.contains(&kid) {
                        found.push(kid);
                    }
                }
            }
            if found.is_empty() {
                return Ok(());
            }
            let mut new_idx = Vec::new();
            for kid in found {
                let pid = Pid::from_raw(kid);
                let Some(stat) = read_stat(pid)? else {
                    continue;
                };
                if dead(stat.state) || !self.add_proc(pid, stat) {
                    continue;
                }
                let i = self.procs.len() - 1;
                self.signal_stop(guard, i)?;
                new_idx.push(i);
            }
            if new_idx.is_empty() {
                return Ok(());
            }
            self.wait_stopped(&new_idx)?;
        }
    }

    fn shared_slot(&mut self, m: &Mapping) -> Option<u32> {
        if let Some(&s) = self.shared_slots.get(&(m.dev, m.inode)) {
            return Some(s);
        }
        if self.next_shared > MAX_SLOT {
            tracing::warn!(name = %m.name, "out of shared-object slots; mapping skipped");
            return None;
        }
        let s = self.next_shared;
        self.next_shared += 1;
        self.shared_slots.insert((m.dev, m.inode), s);
        Some(s)
    }

    /// Reads the tracked pages of process `i` into the snapshot.
    fn read_process(&mut self, i: usize, epoch: u32) -> Result<(), CaptureError> {
        let (pid, slot) = (self.procs[i].pid, self.procs[i].slot);
        let maps_path = proc_path(pid, "maps");
        let Some(maps) = read_proc(maps_path.clone())? else {
            self.procs[i].alive = false;
            return Ok(());
        };
        let pm_path = proc_path(pid, "pagemap");
        let pagemap = match File::open(&pm_path) {
            Ok(f) => f,
            Err(e) if is_gone(&e) => {
                self.procs[i].alive = false;
                return Ok(());
            }
            Err(source) if source.kind() == io::ErrorKind::PermissionDenied => {
                return Err(CaptureError::PermissionDenied {
                    pid: pid.as_raw(),
                    action: "read the pagemap of",
                    source,
                })
            }
            Err(source) => {
                return Err(CaptureError::ReadProc {
                    path: pm_path,
                    source,
                })
            }
        };
        self.plan.clear();
        for line in maps.lines() {
            let m = parse_maps_line(line).ok_or_else(|| CaptureError::ParseProc {
                path: maps_path.clone(),
                reason: "unexpected maps line",
            })?;
            let kind = classify(&m);
            if kind == Kind::Skip || m.end <= m.start {
                continue;
            }
            let mut name = m.name.clone();
            truncate_utf8(&mut name, MAX_REGION_NAME);
            let resident_only = kind == Kind::PrivateAnon
                || (kind == Kind::PrivateFile && m.end - m.start > FILE_MAPPING_READ_ALL);
            self.addrs.clear();
            if resident_only {
                if let Err(e) = resident_pages(
                    &pagemap,
                    m.start,
                    m.end,
                    &mut self.addrs,
                    &mut self.pagemap_buf,
                ) {
                    if is_gone(&e) {
                        self.procs[i].alive = false;
                        return Ok(());
                    }
                    return Err(CaptureError::ReadProc {
                        path: pm_path,
                        source: e,
                    });
                }
            } else {
                self.addrs.extend((m.start..m.end).step_by(PAGE_SIZE));
            }
            if kind == Kind::SharedObject {
                let Some(obj) = self.shared_slot(&m) else {
                    continue;
                };
                self.regions.push(Region {
                    slot: obj,
                    start: m.offset,
                    end: m.offset + (m.end - m.start),
                    prot: m.prot,
                    name,
                });
                for &va in &self.addrs {
                    let key = make_key(obj, m.offset + (va - m.start));
                    if self.shared_seen.insert(key, ()).is_none() {
                        self.plan.push((key, va));
                    }
                }
            } else {
                self.regions.push(Region {
                    slot,
                    start: m.start,
                    end: m.end,
                    prot: m.prot,
                    name,
                });
                self.plan
                    .extend(self.addrs.iter().map(|&va| (make_key(slot, va), va)));
            }
        }
        let plan = std::mem::take(&mut self.plan);
        let r = self.snap.read(pid, epoch, &plan);
        self.plan = plan;
        if let ReadOutcome::Exited = r? {
            self.procs[i].alive = false;
        }
        Ok(())
    }
}

fn write(w: &mut TraceWriter<impl Write>, epoch: u32, r: &Record<'_>) -> Result<(), CaptureError> {
    w.write(r)
        .map_err(|source| CaptureError::WriteTrace { epoch, source })
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Sleeps until `deadline`, returning early when `stop` is set.
fn sleep_until(deadline: Instant, stop: &AtomicBool) {
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

/// Captures a trace of `opts.pid` (and with `opts.tree` its descendants)
/// into `out`, epoch after epoch, until `opts.epochs` epochs were written,
/// `stop` is set or every traced process exited; then writes `END`.
/// `progress` is called after each epoch.
///
/// # Errors
/// [`CaptureError::NoSuchProcess`], [`CaptureError::PermissionDenied`],
/// [`CaptureError::TargetExited`] (before epoch 0 completed), `/proc` and
/// memory read failures, trace write failures. Whatever happens, the traced
/// processes are resumed; epochs already written stay readable.
pub fn capture<W: Write>(
    opts: &CaptureOptions,
    out: W,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(&EpochSummary),
) -> Result<CaptureSummary, CaptureError> {
    if opts.epochs == Some(0) {
        return Err(CaptureError::InvalidOptions {
            reason: "at least one epoch is needed",
        });
    }
    let raw_pid = i32::try_from(opts.pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or(CaptureError::NoSuchProcess { pid: opts.pid })?;
    let pid = Pid::from_raw(raw_pid);
    let span = tracing::info_span!("capture", pid = opts.pid, tree = opts.tree);
    let _enter = span.enter();

    let stat = read_stat(pid)?.ok_or(CaptureError::NoSuchProcess { pid: opts.pid })?;
    if dead(stat.state) {
        return Err(CaptureError::TargetExited { pid: opts.pid });
    }
    let mut cap = Capturer {
        opts,
        procs: Vec::new(),
        next_slot: 0,
        shared_slots: HashMap::new(),
        next_shared: SHARED_SLOT_BASE,
        children_files: true,
        store: Store::default(),
        snap: Snapshot::default(),
        regions: Vec::new(),
        prev_regions: None,
        plan: Vec::new(),
        addrs: Vec::new(),
        pagemap_buf: Vec::new(),
        shared_seen: KeyMap::default(),
    };
    cap.add_proc(pid, stat);
    let comm = cap.procs[0].comm.clone();
    let description = opts.description.clone().unwrap_or_else(|| {
        format!(
            "pid {} ({comm}){}, epochs of {} ms, captured by simrep",
            opts.pid,
            if opts.tree {
                " and its descendants"
            } else {
                ""
            },
            opts.epoch_ms
        )
    });
    let start_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(nanos)
        .unwrap_or(0);
    let header = TraceHeader::new(opts.epoch_ms, start_unix_ns, description);
    let mut writer = TraceWriter::new(out, &header, opts.zstd_level)
        .map_err(|source| CaptureError::WriteTrace { epoch: 0, source })?;

    let start = Instant::now();
    let mut last_cont: Option<Instant> = None;
    let mut summary = CaptureSummary {
        epochs: 0,
        initial_pages: 0,
        dirty_pages: 0,
        dropped_pages: 0,
        processes: 0,
        max_stop_ns: 0,
        total_stop_ns: 0,
        end: EndReason::EpochLimit,
    };
    let mut epoch: u32 = 0;
    let end = loop {
        // ---- Stop and read.
        let mut guard = StopGuard::new();
        let t_stop = Instant::now();
        cap.stop_all(&mut guard)?;
        if !cap.procs.iter().any(|p| p.alive) {
            drop(guard);
            if epoch == 0 {
                return Err(CaptureError::TargetExited { pid: opts.pid });
            }
            break EndReason::TargetExited;
        }
        cap.snap.clear();
        cap.regions.clear();
        cap.shared_seen.clear();
        for i in 0..cap.procs.len() {
            if cap.procs[i].alive {
                cap.read_process(i, epoch)?;
            }
        }
        guard.resume();
        let t_cont = Instant::now();
        drop(guard);
        let stop_ns = nanos(t_cont - t_stop);
        let run_ns = last_cont.map_or(0, |c| nanos(t_stop.saturating_duration_since(c)));
        last_cont = Some(t_cont);

        // ---- Compare and write, while the target runs.
        let mark = epoch.wrapping_add(1);
        let t_stop_ns = nanos(t_stop - start);
        write(
            &mut writer,
            epoch,
            &Record::Epoch {
                epoch,
                t_stop_ns,
                run_ns,
            },
        )?;
        for p in cap.procs.iter_mut().filter(|p| !p.announced) {
            p.announced = true;
            write(
                &mut writer,
                epoch,
                &Record::Proc {
                    slot: p.slot,
                    pid: p.pid.as_raw() as u32,
                    comm: &p.comm,
                },
            )?;
        }
        cap.regions.sort_by_key(|r| (r.slot, r.start, r.end));
        cap.regions.dedup();
        let regions_changed = cap.prev_regions.as_ref() != Some(&cap.regions);
        if regions_changed {
            write(&mut writer, epoch, &Record::Regions(&cap.regions))?;
            cap.prev_regions = Some(cap.regions.clone());
        }
        let mut dirty: u32 = 0;
        for k in 0..cap.snap.len {
            let key = cap.snap.keys[k];
            let data = &cap.snap.pages[k];
            let changed = match cap.store.index.get(&key) {
                Some(&s) => {
                    let s = s as usize;
                    if cap.store.marks[s] == mark {
                        continue; // Read twice this epoch.
                    }
                    cap.store.marks[s] = mark;
                    let differs = epoch == 0 || cap.store.pages[s] != *data;
                    if differs {
                        cap.store.pages[s] = *data;
                    }
                    differs
                }
                None if epoch == 0 || *data != ZERO_PAGE => {
                    cap.store.insert(key, data, mark);
                    true
                }
                None => false,
            };
            if changed {
                write(&mut writer, epoch, &Record::Page { key, data })?;
                dirty += 1;
            }
        }
        let drops = cap.store.take_unmarked(mark);
        for &key in &drops {
            write(&mut writer, epoch, &Record::Drop { key })?;
        }
        let compare_ns = nanos(t_cont.elapsed());
        let end_rec = EpochEnd {
            epoch,
            n_dirty: dirty,
            n_drop: drops.len() as u32,
            stop_ns,
            read_ns: cap.snap.read_ns,
            compare_ns,
            tracked_pages: cap.snap.len as u64,
        };
        write(&mut writer, epoch, &Record::EpochEnd(end_rec))?;

        let es = EpochSummary {
            epoch,
            processes: cap.procs.iter().filter(|p| p.alive).count() as u32,
            tracked_pages: cap.snap.len as u64,
            unreadable_pages: cap.snap.unreadable,
            dirty,
            dropped: drops.len() as u32,
            regions_changed,
            t_stop_ns,
            run_ns,
            stop_ns,
            read_ns: cap.snap.read_ns,
            compare_ns,
        };
        tracing::debug!(?es, "epoch captured");
        progress(&es);
        summary.epochs = epoch + 1;
        if epoch == 0 {
            summary.initial_pages = u64::from(dirty);
        } else {
            summary.dirty_pages += u64::from(dirty);
        }
        summary.dropped_pages += drops.len() as u64;
        summary.max_stop_ns = summary.max_stop_ns.max(stop_ns);
        summary.total_stop_ns += stop_ns;

        // ---- Next epoch?
        if opts.epochs.is_some_and(|n| epoch + 1 >= n) {
            break EndReason::EpochLimit;
        }
        if !cap.procs.iter().any(|p| p.alive) {
            break EndReason::TargetExited;
        }
        sleep_until(t_cont + Duration::from_millis(opts.epoch_ms.into()), stop);
        if stop.load(Ordering::Relaxed) {
            break EndReason::StopRequested;
        }
        epoch += 1;
    };
    write(
        &mut writer,
        epoch,
        &Record::End {
            epochs: summary.epochs,
        },
    )?;
    writer
        .finish()
        .map_err(|source| CaptureError::WriteTrace { epoch, source })?;
    summary.end = end;
    summary.processes = cap.procs.len() as u32;
    tracing::info!(epochs = summary.epochs, ?end, "capture finished");
    Ok(summary)
}

#[cfg(test)]
mod tests;
