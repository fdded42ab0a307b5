//! The block device: a disk image in a host file, read and written by the
//! guest through one MMIO doorbell per request (registers in [`super::abi`],
//! `BLOCK_*`), with a per-epoch write buffer in front of the file.
//!
//! # The write buffer
//!
//! Guest writes never go straight to the file. They land in a
//! [`WriteBuffer`]: a sector-indexed table per *epoch*, the newest epoch
//! being the open one. Reads consult the buffer first (newest epoch wins),
//! then the file, so the guest always reads its own writes. The buffer is
//! drained to the file only by a **commit** of a closed epoch:
//!
//! * **Replication** ([`FlushPolicy::Replicated`]): at each checkpoint the
//!   primary calls [`BlockDevice::take_epoch_writes`], which closes the open
//!   epoch and returns its writes (merged into runs of consecutive sectors,
//!   newest content per sector) to travel with the checkpoint; the closed
//!   epoch stays in the buffer, still serving reads, until the backup acked
//!   it and the primary calls [`BlockDevice::commit`]. The backup applies an
//!   epoch's writes to its own image with [`DiskFile::apply`] only when it
//!   commits that checkpoint, so its disk only ever holds committed
//!   checkpoints. A guest FLUSH completes at once and does no I/O: what it
//!   promises is delivered by output commit (nothing the guest says after
//!   the flush leaves the host before the backup committed the epoch that
//!   holds the writes).
//! * **`simrep run`** ([`FlushPolicy::WriteBack`], the default): a guest
//!   FLUSH closes the epoch and commits everything buffered: `pwrite` of
//!   every buffered sector, then `fdatasync`. Writes are buffered until then
//!   rather than written at once, so that the plain run exercises the same
//!   path replication uses, and so that sectors rewritten between flushes
//!   (a log's tail sector) reach the file once. When more than
//!   `max_buffered` bytes are buffered the buffer is written to the file
//!   (without a sync) to bound the VMM's memory; at the end of a run what
//!   is buffered is written and synced.
//!
//! * **Checkpoints** (`simrep run --checkpoint-dir`, write-back mode):
//!   during the pause [`BlockDevice::hold_for_checkpoint`] closes the open
//!   epoch and *holds* the device: until the returned [`DiskHold`] ends, no
//!   write made after the checkpoint reaches the file (the buffer may grow
//!   past its bound; a guest FLUSH waits). [`DiskHold::settle`] writes the
//!   epochs closed at the checkpoint to the file outside the device lock,
//!   after which the file is the disk as of the checkpoint and can be
//!   copied while the guest runs. The device's capacity, policy and open
//!   epoch are its [`DeviceState`](super::state::DeviceState) (`block`).
//!
//! # What a completed request guarantees (write-back mode)
//!
//! * A WRITE with status OK is visible to every later READ, from any vCPU.
//! * A FLUSH with status OK means every WRITE completed before it is in the
//!   host file and synced (`fdatasync`): it survives a crash of the VMM and
//!   of the host.
//! * A WRITE not followed by a successful FLUSH survives a clean end of the
//!   VMM (guest exit, Ctrl-C) but may be lost if the VMM process dies.
//!
//! # Validation
//!
//! Every value the guest provides is checked: the descriptor address, the
//! operation, the sector range against the capacity, the count against
//! [`abi::BLOCK_MAX_SECTORS`], the buffer against guest RAM. A bad value
//! fails the request with a [`abi::block_status`] code; the guest keeps
//! running. Only a register accessed with the wrong width stops the vCPU
//! (a [`DeviceError::BadAccess`], as for the other devices).

use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::abi::{self, block_op, block_status, BlockRequest};
use super::devices::{DeviceError, MmioAction};
use super::memory::GuestMemory;

/// Bytes in a sector.
pub const SECTOR: usize = abi::SECTOR_SIZE as usize;

/// Default bound on buffered bytes in write-back mode (64 MiB).
pub const DEFAULT_MAX_BUFFERED: u64 = 64 << 20;

// SAFETY: `#[repr(C)]` structs of `u32`/`u64` fields laid out without
// padding (checked by the size assertions below); every bit pattern is a
// valid value.
unsafe impl vm_memory::ByteValued for abi::BlockRequest {}
// SAFETY: as above.
unsafe impl vm_memory::ByteValued for abi::DiskParams {}

const _: () = assert!(size_of::<abi::BlockRequest>() == 32);
const _: () = assert!(size_of::<abi::DiskParams>() == 56);
const _: () = assert!(
    std::mem::offset_of!(abi::BlockRequest, status) as u64 == abi::BLOCK_REQUEST_STATUS_OFFSET
);

/// Errors of the block device and of disk images.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk image cannot be opened for reading and writing.
    #[error("cannot open disk image {path} for reading and writing")]
    Open {
        /// The image.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The path is not a regular file.
    #[error("disk image {path} is not a regular file")]
    NotAFile {
        /// The image.
        path: PathBuf,
    },
    /// The image's size is zero or not a multiple of 512 bytes.
    #[error("disk image {path} is {len} bytes: not a positive multiple of 512 (create one with `truncate -s 64M FILE`)")]
    BadSize {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        len: u64,
    },
    /// Reading the image failed.
    #[error("cannot read sectors {sector}..+{count} of the disk image")]
    Read {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Writing the image failed.
    #[error("cannot write sectors {sector}..+{count} of the disk image")]
    Write {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// `fdatasync` of the image failed.
    #[error("cannot sync the disk image")]
    Sync(#[source] std::io::Error),
    /// A sector range is beyond the disk.
    #[error("sectors {sector}..+{count} are beyond the disk's {capacity} sectors")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// The disk's capacity in sectors.
        capacity: u64,
    },
    /// A buffer length is not a whole number of sectors.
    #[error("a buffer of {len} bytes is not a whole number of 512-byte sectors")]
    Unaligned {
        /// The length.
        len: usize,
    },
    /// Only closed epochs can be committed.
    #[error("epoch {epoch} cannot be committed: it is not closed (the open epoch is {open})")]
    CommitOpenEpoch {
        /// The epoch asked for.
        epoch: u64,
        /// The open epoch.
        open: u64,
    },
    /// The device has no disk attached.
    #[error("no disk attached")]
    NoDisk,
    /// Checkpoint holds need write-back mode.
    #[error("a checkpoint cannot hold the disk under the replicated flush policy")]
    HoldReplicated,
    /// A checkpoint hold is already in progress.
    #[error("a checkpoint of the disk is already in progress")]
    AlreadyHeld,
}

/// A disk image: a host file of whole 512-byte sectors.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    path: PathBuf,
    sectors: u64,
}

impl DiskFile {
    /// Opens an existing image for reading and writing.
    ///
    /// # Errors
    ///
    /// [`BlockError::Open`] (missing, no permission, read-only file system),
    /// [`BlockError::NotAFile`], [`BlockError::BadSize`] (empty or not a
    /// multiple of 512 bytes).
    pub fn open(path: &Path) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(open_err)?;
        if !meta.is_file() {
            return Err(BlockError::NotAFile {
                path: path.to_owned(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        if len == 0 || !len.is_multiple_of(abi::SECTOR_SIZE) {
            return Err(BlockError::BadSize {
                path: path.to_owned(),
                len,
            });
        }
        Ok(DiskFile {
            file,
            path: path.to_owned(),
            sectors: len / abi::SECTOR_SIZE,
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.sectors
    }

    fn check(&self, sector: u64, len: usize) -> Result<u64, BlockError> {
        if !len.is_multiple_of(SECTOR) {
            return Err(BlockError::Unaligned { len });
        }
        let count = (len / SECTOR) as u64;
        match sector.checked_add(count) {
            Some(end) if end <= self.sectors => Ok(count),
            _ => Err(BlockError::OutOfRange {
                sector,
                count,
                capacity: self.sectors,
            }),
        }
    }

    /// Reads whole sectors from `sector` into `buf` (`pread`).
    ///
    /// # Errors
    ///
    /// [`BlockError::Unaligned`], [`BlockError::OutOfRange`],
    /// [`BlockError::Read`].
    pub fn read_sectors(&self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let count = self.check(sector, buf.len())?;
        self.file
            .read_exact_at(buf, sector * abi::SECTOR_SIZE)
            .map_err(|source| BlockError::Read {
                sector,
                count,
                source,
            })
    }

    /// Writes whole sectors from `data` at `sector` (`pwrite`, no sync).
    ///
    /// # Errors
    ///
    /// [`BlockError::Unaligned`], [`BlockError::OutOfRange`],
    /// [`BlockError::Write`].
    pub fn write_sectors(&self, sector: u64, data: &[u8]) -> Result<(), BlockError> {
        let count = self.check(sector, data.len())?;
        self.file
            .write_all_at(data, sector * abi::SECTOR_SIZE)
            .map_err(|source| BlockError::Write {
                sector,
                count,
                source,
            })
    }

    /// `fdatasync`: written data reaches stable storage.
    ///
    /// # Errors
    ///
    /// [`BlockError::Sync`].
    pub fn sync(&self) -> Result<(), BlockError> {
        self.file.sync_data().map_err(BlockError::Sync)
    }

    /// Writes runs of sectors, without a sync.
    fn write_runs(&self, runs: &[SectorRun]) -> Result<(), BlockError> {
        for run in runs {
            self.write_sectors(run.sector, &run.data)?;
        }
        Ok(())
    }

    /// Applies an epoch's writes and syncs: the backup's commit of the disk
    /// part of a checkpoint. Applying the same epoch twice gives the same
    /// image, so a backup that died half-way may apply it again.
    ///
    /// # Errors
    ///
    /// [`BlockError::OutOfRange`] for a run beyond this image (a backup
    /// image smaller than the primary's), [`BlockError::Write`],
    /// [`BlockError::Sync`].
    pub fn apply(&self, writes: &EpochWrites) -> Result<(), BlockError> {
        for run in &writes.runs {
            self.check(run.sector, run.data.len())?;
        }
        self.write_runs(&writes.runs)?;
        self.sync()
    }
}

/// Consecutive sectors written in one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectorRun {
    /// First sector.
    pub sector: u64,
    /// The data: a whole number of sectors.
    pub data: Vec<u8>,
}

impl SectorRun {
    /// Number of sectors.
    pub fn sectors(&self) -> u64 {
        (self.data.len() / SECTOR) as u64
    }
}

/// The writes of one closed epoch: each sector written in it once, with
/// its newest content, as runs of consecutive sectors sorted by sector.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EpochWrites {
    /// The epoch.
    pub epoch: u64,
    /// The runs, sorted, not overlapping.
    pub runs: Vec<SectorRun>,
}

impl EpochWrites {
    /// Number of sectors.
    pub fn sectors(&self) -> u64 {
        self.runs.iter().map(SectorRun::sectors).sum()
    }

    /// Whether the epoch wrote nothing.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

type Sector = Box<[u8; SECTOR]>;
type Table = BTreeMap<u64, Sector>;

/// Merges a sector table into runs of consecutive sectors.
fn runs_of(table: &Table) -> Vec<SectorRun> {
    // First the runs' extents, so each run's buffer is allocated once.
    let mut extents: Vec<(u64, usize)> = Vec::new();
    for &s in table.keys() {
        match extents.last_mut() {
            Some((start, n)) if *start + *n as u64 == s => *n += 1,
            _ => extents.push((s, 1)),
        }
    }
    let mut sectors = table.values();
    extents
        .into_iter()
        .map(|(sector, n)| {
            let mut data = Vec::with_capacity(n * SECTOR);
            for d in sectors.by_ref().take(n) {
                data.extend_from_slice(&d[..]);
            }
            SectorRun { sector, data }
        })
        .collect()
}

#[derive(Debug)]
struct EpochTable {
    epoch: u64,
    /// Shared with [`ClosedEpoch`]s once closed; the open epoch's is never
    /// shared, so writing to it never copies.
    sectors: Arc<Table>,
}

/// A closed epoch's writes, shared with the write buffer: taking one costs
/// no copy (the vCPUs are paused then); [`ClosedEpoch::writes`] copies
/// them into runs afterwards, while the guest runs.
#[derive(Debug, Clone)]
pub struct ClosedEpoch {
    epoch: u64,
    sectors: Arc<Table>,
}

impl ClosedEpoch {
    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Number of sectors written in it.
    pub fn sectors(&self) -> usize {
        self.sectors.len()
    }

    /// Its writes as runs of consecutive sectors (a copy).
    pub fn writes(&self) -> EpochWrites {
        EpochWrites {
            epoch: self.epoch,
            runs: runs_of(&self.sectors),
        }
    }
}

/// The per-epoch, sector-indexed table of writes not yet in the file.
///
/// Pure bookkeeping, no I/O. Epochs are numbered from the first one given
/// to [`WriteBuffer::new`]; the newest is open (it takes writes), the older
/// ones are closed and wait for a commit.
#[derive(Debug)]
pub struct WriteBuffer {
    /// Oldest first; the last one is the open epoch.
    epochs: VecDeque<EpochTable>,
    sectors: usize,
}

impl WriteBuffer {
    /// An empty buffer whose open epoch is `first_epoch`.
    pub fn new(first_epoch: u64) -> Self {
        WriteBuffer {
            epochs: VecDeque::from([EpochTable {
                epoch: first_epoch,
                sectors: Arc::default(),
            }]),
            sectors: 0,
        }
    }

    fn open(&self) -> &EpochTable {
        self.epochs.back().expect("the open epoch always exists")
    }

    /// The open epoch.
    pub fn open_epoch(&self) -> u64 {
        self.open().epoch
    }

    /// Sector entries held, over all epochs (a sector written in two
    /// epochs counts twice).
    pub fn buffered_sectors(&self) -> usize {
        self.sectors
    }

    /// Bytes held.
    pub fn buffered_bytes(&self) -> u64 {
        (self.sectors * SECTOR) as u64
    }

    /// Records a write of whole sectors in the open epoch.
    ///
    /// # Errors
    ///
    /// [`BlockError::Unaligned`].
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), BlockError> {
        if !data.len().is_multiple_of(SECTOR) {
            return Err(BlockError::Unaligned { len: data.len() });
        }
        let open = self
            .epochs
            .back_mut()
            .expect("the open epoch always exists");
        for (s, chunk) in (sector..).zip(data.chunks_exact(SECTOR)) {
            let mut b: Sector = Box::new([0; SECTOR]);
            b.copy_from_slice(chunk);
            if Arc::make_mut(&mut open.sectors).insert(s, b).is_none() {
                self.sectors += 1;
            }
        }
        Ok(())
    }

    /// Copies the buffered sectors of `sector..sector + buf.len() / 512`
    /// over `buf` (which holds the file's content), newest epoch last.
    pub fn overlay(&self, sector: u64, buf: &mut [u8]) {
        let end = sector + (buf.len() / SECTOR) as u64;
        for t in &self.epochs {
            for (&s, data) in t.sectors.range(sector..end) {
                let off = (s - sector) as usize * SECTOR;
                buf[off..off + SECTOR].copy_from_slice(&data[..]);
            }
        }
    }

    /// Closes the open epoch and opens the next; returns the closed epoch.
    pub fn close_epoch(&mut self) -> u64 {
        let epoch = self.open_epoch();
        self.epochs.push_back(EpochTable {
            epoch: epoch + 1,
            sectors: Arc::default(),
        });
        epoch
    }

    /// Closes the open epoch and returns its writes, shared with the buffer
    /// (no copy); they stay in the buffer (serving reads) until
    /// [`WriteBuffer::commit`].
    pub fn take(&mut self) -> ClosedEpoch {
        let sectors = Arc::clone(&self.open().sectors);
        let epoch = self.close_epoch();
        ClosedEpoch { epoch, sectors }
    }

    /// Removes every closed epoch up to and including `epoch` and returns
    /// their writes merged (newest content per sector), for the file.
    /// Committing an epoch already committed returns nothing.
    ///
    /// # Errors
    ///
    /// [`BlockError::CommitOpenEpoch`] if `epoch` is the open epoch or later.
    pub fn commit(&mut self, epoch: u64) -> Result<Vec<SectorRun>, BlockError> {
        let open = self.open_epoch();
        if epoch >= open {
            return Err(BlockError::CommitOpenEpoch { epoch, open });
        }
        let mut merged = Table::new();
        while self.epochs.front().is_some_and(|t| t.epoch <= epoch) {
            let t = self.epochs.pop_front().expect("checked");
            self.sectors -= t.sectors.len();
            // Moves the sectors when no `ClosedEpoch` shares them.
            merged.extend(Arc::unwrap_or_clone(t.sectors));
        }
        Ok(runs_of(&merged))
    }
}

// --- checkpoints of the disk: buffer pieces (begin) ---

impl WriteBuffer {
    /// The sector tables of the closed epochs up to `epoch`, oldest first,
    /// shared (no copy): a checkpoint writes them to the file outside the
    /// device lock, then calls [`WriteBuffer::drop_upto`].
    fn closed_upto(&self, epoch: u64) -> Vec<Arc<Table>> {
        let open = self.open_epoch();
        self.epochs
            .iter()
            .filter(|t| t.epoch <= epoch && t.epoch < open)
            .map(|t| Arc::clone(&t.sectors))
            .collect()
    }

    /// Drops the closed epochs up to `epoch` (their writes are in the
    /// file).
    fn drop_upto(&mut self, epoch: u64) {
        let open = self.open_epoch();
        while self
            .epochs
            .front()
            .is_some_and(|t| t.epoch <= epoch && t.epoch < open)
        {
            let t = self.epochs.pop_front().expect("checked");
            self.sectors -= t.sectors.len();
        }
    }
}

/// Merges shared sector tables (oldest first; newest content per sector)
/// into runs of consecutive sectors.
fn runs_of_tables(tables: &[Arc<Table>]) -> Vec<SectorRun> {
    let mut merged: BTreeMap<u64, &Sector> = BTreeMap::new();
    for t in tables {
        for (&s, d) in t.iter() {
            merged.insert(s, d);
        }
    }
    let mut runs: Vec<SectorRun> = Vec::new();
    for (s, d) in merged {
        match runs.last_mut() {
            Some(r) if r.sector + r.sectors() == s => r.data.extend_from_slice(&d[..]),
            _ => runs.push(SectorRun {
                sector: s,
                data: d.to_vec(),
            }),
        }
    }
    runs
}

// --- checkpoints of the disk: buffer pieces (end) ---

/// When buffered writes reach the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// `simrep run`: a guest FLUSH writes everything buffered and syncs;
    /// more than `max_buffered` bytes are written out without a sync.
    WriteBack {
        /// Bound on buffered bytes.
        max_buffered: u64,
    },
    /// Replication: only [`BlockDevice::commit`] writes to the file; a
    /// guest FLUSH does no I/O (output commit provides its guarantee).
    Replicated,
}

impl Default for FlushPolicy {
    fn default() -> Self {
        FlushPolicy::WriteBack {
            max_buffered: DEFAULT_MAX_BUFFERED,
        }
    }
}

/// Counters of a block device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Guest requests submitted (including failed ones).
    pub requests: u64,
    /// Requests that failed with a status other than OK.
    pub failed: u64,
    /// Sectors the guest read.
    pub sectors_read: u64,
    /// Sectors the guest wrote.
    pub sectors_written: u64,
    /// Guest FLUSH requests.
    pub flushes: u64,
    /// Sectors written to the file (by flushes, commits and overflow).
    pub sectors_to_file: u64,
    /// `fdatasync` calls.
    pub syncs: u64,
}

#[derive(Debug)]
struct State {
    buffer: WriteBuffer,
    policy: FlushPolicy,
    stats: BlockStats,
    /// A checkpoint's disk copy is in progress: no write may reach the
    /// file (see [`BlockDevice::hold_for_checkpoint`]).
    held: bool,
}

/// The guest's block device: an optional [`DiskFile`] behind a
/// [`WriteBuffer`]. Shared by the vCPU threads (MMIO) and by replication
/// (epochs); all operations take one lock.
#[derive(Debug)]
pub struct BlockDevice {
    disk: Option<DiskFile>,
    state: Mutex<State>,
    /// Signalled when a checkpoint hold ends.
    released: Condvar,
    last_status: [AtomicU32; abi::MAX_VCPUS as usize],
}

impl BlockDevice {
    /// A device with no disk: capacity 0, every request fails with
    /// `NO_DISK`.
    pub fn detached() -> Self {
        Self::with_disk(None, FlushPolicy::default())
    }

    /// A device on `disk` with `policy`.
    pub fn new(disk: DiskFile, policy: FlushPolicy) -> Self {
        Self::with_disk(Some(disk), policy)
    }

    /// Opens the image at `path` (see [`DiskFile::open`]).
    ///
    /// # Errors
    ///
    /// As [`DiskFile::open`].
    pub fn open(path: &Path, policy: FlushPolicy) -> Result<Self, BlockError> {
        Ok(Self::new(DiskFile::open(path)?, policy))
    }

    fn with_disk(disk: Option<DiskFile>, policy: FlushPolicy) -> Self {
        BlockDevice {
            disk,
            state: Mutex::new(State {
                buffer: WriteBuffer::new(0),
                policy,
                stats: BlockStats::default(),
                held: false,
            }),
            released: Condvar::new(),
            last_status: std::array::from_fn(|_| AtomicU32::new(block_status::OK)),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, once no checkpoint hold is in progress (for operations
    /// that write to the file).
    fn state_unheld(&self) -> MutexGuard<'_, State> {
        let mut st = self.state();
        while st.held {
            st = self.released.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st
    }

    fn disk(&self) -> Result<&DiskFile, BlockError> {
        self.disk.as_ref().ok_or(BlockError::NoDisk)
    }

    /// The image, if one is attached.
    pub fn disk_file(&self) -> Option<&DiskFile> {
        self.disk.as_ref()
    }

    /// Capacity in sectors (0 without a disk).
    pub fn capacity(&self) -> u64 {
        self.disk.as_ref().map_or(0, DiskFile::capacity)
    }

    /// The flush policy.
    pub fn policy(&self) -> FlushPolicy {
        self.state().policy
    }

    /// Changes the flush policy (replication switches to
    /// [`FlushPolicy::Replicated`] before its first checkpoint).
    pub fn set_policy(&self, policy: FlushPolicy) {
        self.state().policy = policy;
    }

    /// The counters.
    pub fn stats(&self) -> BlockStats {
        self.state().stats
    }

    /// Bytes held in the write buffer.
    pub fn buffered_bytes(&self) -> u64 {
        self.state().buffer.buffered_bytes()
    }

    /// The open epoch.
    pub fn open_epoch(&self) -> u64 {
        self.state().buffer.open_epoch()
    }

    /// Reads sectors as the guest sees them: buffered writes over the file.
    ///
    /// # Errors
    ///
    /// [`BlockError::NoDisk`], [`BlockError::Unaligned`],
    /// [`BlockError::OutOfRange`], [`BlockError::Read`].
    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let disk = self.disk()?;
        let st = self.state();
        disk.read_sectors(sector, buf)?;
        st.buffer.overlay(sector, buf);
        Ok(())
    }

    /// Writes sectors into the open epoch of the write buffer. In
    /// write-back mode, a buffer above its bound is then written to the
    /// file (without a sync).
    ///
    /// # Errors
    ///
    /// [`BlockError::NoDisk`], [`BlockError::Unaligned`],
    /// [`BlockError::OutOfRange`], [`BlockError::Write`] (overflow).
    pub fn write(&self, sector: u64, data: &[u8]) -> Result<(), BlockError> {
        let disk = self.disk()?;
        disk.check(sector, data.len())?;
        let mut st = self.state();
        st.buffer.write(sector, data)?;
        if let FlushPolicy::WriteBack { max_buffered } = st.policy {
            // While a checkpoint's disk copy runs the buffer may grow past
            // its bound: nothing may reach the file then.
            if !st.held && st.buffer.buffered_bytes() > max_buffered {
                Self::drain(disk, &mut st, false)?;
            }
        }
        Ok(())
    }

    /// Closes the epoch and writes everything buffered to the file,
    /// with a sync if `sync`.
    fn drain(disk: &DiskFile, st: &mut State, sync: bool) -> Result<(), BlockError> {
        let epoch = st.buffer.close_epoch();
        let runs = st.buffer.commit(epoch)?;
        disk.write_runs(&runs)?;
        st.stats.sectors_to_file += runs.iter().map(SectorRun::sectors).sum::<u64>();
        if sync {
            disk.sync()?;
            st.stats.syncs += 1;
        }
        Ok(())
    }

    /// The guest's FLUSH. Write-back: every buffered write reaches the file
    /// and is synced (after a checkpoint's hold, if one is in progress: see
    /// [`BlockDevice::hold_for_checkpoint`]). Replicated: nothing to do.
    ///
    /// # Errors
    ///
    /// [`BlockError::NoDisk`], [`BlockError::Write`], [`BlockError::Sync`].
    pub fn flush(&self) -> Result<(), BlockError> {
        let disk = self.disk()?;
        let mut st = self.state_unheld();
        st.stats.flushes += 1;
        match st.policy {
            FlushPolicy::WriteBack { .. } => Self::drain(disk, &mut st, true),
            FlushPolicy::Replicated => Ok(()),
        }
    }

    /// Writes and syncs everything buffered, whatever the policy: the end
    /// of a `simrep run`. Under replication call [`BlockDevice::commit`]
    /// instead (uncommitted writes must not reach the file). Waits for a
    /// checkpoint's hold to end.
    ///
    /// # Errors
    ///
    /// [`BlockError::Write`], [`BlockError::Sync`]; `Ok` without a disk.
    pub fn flush_all(&self) -> Result<(), BlockError> {
        let Some(disk) = self.disk.as_ref() else {
            return Ok(());
        };
        let mut st = self.state_unheld();
        if st.buffer.buffered_sectors() == 0 {
            return Ok(());
        }
        Self::drain(disk, &mut st, true)
    }

    /// Replication, at a checkpoint (vCPUs paused): closes the open epoch
    /// and returns its writes without copying them (a reference count);
    /// call [`ClosedEpoch::writes`] after resuming the guest. They stay
    /// buffered, and keep serving reads, until [`BlockDevice::commit`] of
    /// this epoch.
    pub fn take_epoch(&self) -> ClosedEpoch {
        self.state().buffer.take()
    }

    /// [`BlockDevice::take_epoch`] and [`ClosedEpoch::writes`] in one (the
    /// copy into runs happens at once).
    pub fn take_epoch_writes(&self) -> EpochWrites {
        self.take_epoch().writes()
    }

    /// Replication, when the backup acked `epoch`: writes every closed
    /// epoch up to `epoch` to the file (newest content per sector), syncs,
    /// and drops them from the buffer (after a checkpoint's hold ends). Returns the sectors written. An
    /// epoch already committed is a no-op.
    ///
    /// # Errors
    ///
    /// [`BlockError::CommitOpenEpoch`], [`BlockError::Write`],
    /// [`BlockError::Sync`]. Without a disk nothing was ever buffered, and
    /// this returns `Ok(0)`.
    pub fn commit(&self, epoch: u64) -> Result<u64, BlockError> {
        let st = self.state_unheld();
        self.commit_locked(st, epoch)
    }

    fn commit_locked(&self, mut st: MutexGuard<'_, State>, epoch: u64) -> Result<u64, BlockError> {
        let runs = st.buffer.commit(epoch)?;
        let Some(disk) = self.disk.as_ref() else {
            return Ok(0);
        };
        if runs.is_empty() {
            return Ok(0);
        }
        disk.write_runs(&runs)?;
        disk.sync()?;
        let n: u64 = runs.iter().map(SectorRun::sectors).sum();
        st.stats.sectors_to_file += n;
        st.stats.syncs += 1;
        Ok(n)
    }

    /// Executes one guest request; returns its status.
    fn execute(&self, req: &BlockRequest, mem: &GuestMemory) -> u32 {
        let status = self.execute_inner(req, mem);
        let mut st = self.state();
        st.stats.requests += 1;
        if status != block_status::OK {
            st.stats.failed += 1;
            tracing::debug!(
                op = req.op,
                sector = req.sector,
                count = req.count,
                buffer = format_args!("{:#x}", req.buffer),
                status,
                "block request failed"
            );
        } else if req.op == block_op::READ {
            st.stats.sectors_read += u64::from(req.count);
        } else if req.op == block_op::WRITE {
            st.stats.sectors_written += u64::from(req.count);
        }
        status
    }

    fn execute_inner(&self, req: &BlockRequest, mem: &GuestMemory) -> u32 {
        let io_status = |e: BlockError| {
            tracing::warn!(error = %e, "block request failed on the host");
            match e {
                BlockError::OutOfRange { .. } => block_status::OUT_OF_RANGE,
                BlockError::NoDisk => block_status::NO_DISK,
                _ => block_status::IO_ERROR,
            }
        };
        match req.op {
            block_op::FLUSH => {
                if self.disk.is_none() {
                    return block_status::NO_DISK;
                }
                return match self.flush() {
                    Ok(()) => block_status::OK,
                    Err(e) => io_status(e),
                };
            }
            block_op::READ | block_op::WRITE => {}
            _ => return block_status::BAD_OP,
        }
        if self.disk.is_none() {
            return block_status::NO_DISK;
        }
        if req.count == 0 || req.count > abi::BLOCK_MAX_SECTORS {
            return block_status::BAD_COUNT;
        }
        let count = u64::from(req.count);
        if req
            .sector
            .checked_add(count)
            .is_none_or(|end| end > self.capacity())
        {
            return block_status::OUT_OF_RANGE;
        }
        let len = count * abi::SECTOR_SIZE;
        if !mem.contains(req.buffer, len) {
            return block_status::BAD_BUFFER;
        }
        let mut data = vec![0u8; len as usize];
        if req.op == block_op::READ {
            if let Err(e) = self.read(req.sector, &mut data) {
                return io_status(e);
            }
            if mem.write(req.buffer, &data).is_err() {
                return block_status::BAD_BUFFER;
            }
        } else {
            if mem.read(req.buffer, &mut data).is_err() {
                return block_status::BAD_BUFFER;
            }
            if let Err(e) = self.write(req.sector, &data) {
                return io_status(e);
            }
        }
        block_status::OK
    }

    fn set_last_status(&self, vcpu: u32, status: u32) {
        if let Some(s) = self.last_status.get(vcpu as usize) {
            s.store(status, Ordering::Relaxed);
        }
    }

    /// Handles a guest write in the block register window.
    ///
    /// # Errors
    ///
    /// [`DeviceError::BadAccess`] for a wrong width or a read-only
    /// register, [`DeviceError::UnknownAddress`] for an unused address.
    pub fn mmio_write(
        &self,
        vcpu: u32,
        gpa: u64,
        data: &[u8],
        mem: &GuestMemory,
    ) -> Result<MmioAction, DeviceError> {
        let len = data.len();
        match gpa {
            abi::BLOCK_REQUEST if len == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(data);
                let desc = u64::from_le_bytes(b);
                let status = match mem.read_obj::<BlockRequest>(desc) {
                    Ok(req) => {
                        let status = self.execute(&req, mem);
                        let at = desc + abi::BLOCK_REQUEST_STATUS_OFFSET;
                        if mem.write(at, &status.to_le_bytes()).is_err() {
                            block_status::BAD_DESCRIPTOR
                        } else {
                            status
                        }
                    }
                    Err(_) => {
                        self.state().stats.failed += 1;
                        block_status::BAD_DESCRIPTOR
                    }
                };
                self.set_last_status(vcpu, status);
                Ok(MmioAction::Continue)
            }
            abi::BLOCK_REQUEST => Err(DeviceError::BadAccess {
                register: "BLOCK_REQUEST",
                gpa,
                len,
                write: true,
            }),
            abi::BLOCK_CAPACITY | abi::BLOCK_STATUS => Err(DeviceError::BadAccess {
                register: if gpa == abi::BLOCK_CAPACITY {
                    "BLOCK_CAPACITY"
                } else {
                    "BLOCK_STATUS"
                },
                gpa,
                len,
                write: true,
            }),
            _ => Err(DeviceError::UnknownAddress {
                gpa,
                len,
                write: true,
            }),
        }
    }

    /// Handles a guest read in the block register window.
    ///
    /// # Errors
    ///
    /// As [`BlockDevice::mmio_write`].
    pub fn mmio_read(&self, vcpu: u32, gpa: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let len = data.len();
        let value = match gpa {
            abi::BLOCK_CAPACITY if len == 8 => self.capacity(),
            abi::BLOCK_STATUS if len == 8 => u64::from(
                self.last_status
                    .get(vcpu as usize)
                    .map_or(block_status::OK, |s| s.load(Ordering::Relaxed)),
            ),
            abi::BLOCK_CAPACITY | abi::BLOCK_STATUS | abi::BLOCK_REQUEST => {
                return Err(DeviceError::BadAccess {
                    register: match gpa {
                        abi::BLOCK_CAPACITY => "BLOCK_CAPACITY",
                        abi::BLOCK_STATUS => "BLOCK_STATUS",
                        _ => "BLOCK_REQUEST",
                    },
                    gpa,
                    len,
                    write: false,
                })
            }
            _ => {
                return Err(DeviceError::UnknownAddress {
                    gpa,
                    len,
                    write: false,
                })
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
}

// --- checkpoints of the disk (begin) ---

/// Name of the block device's state blob in a snapshot.
pub const BLOCK_STATE: &str = "block";
/// Version byte of the block device's state blob.
const BLOCK_STATE_VERSION: u8 = 1;
/// Size of the block device's state blob.
const BLOCK_STATE_BYTES: usize = 1 + 8 + 1 + 8 + 8;

/// A checkpoint's hold on a block device, from [`BlockDevice::hold_for_checkpoint`]:
/// while it lives no write reaches the disk file except the ones made
/// before the checkpoint ([`DiskHold::settle`]), so the file can be copied
/// while the guest runs. Dropping it (or [`DiskHold::release`]) lets
/// buffered writes drain again.
#[derive(Debug)]
pub struct DiskHold {
    dev: Arc<BlockDevice>,
    epoch: u64,
}

impl BlockDevice {
    /// At a checkpoint (the vCPUs paused): closes the open epoch, so that
    /// the disk as of the checkpoint is the file with the buffered epochs
    /// up to the closed one over it, and holds every later write in the
    /// write buffer until the returned hold ends. Meanwhile reads keep
    /// seeing the newest data (the buffer layers over the file), the
    /// buffer may grow past its bound, and a guest FLUSH,
    /// [`BlockDevice::commit`] and [`BlockDevice::flush_all`] wait for the
    /// release (a FLUSH's promise needs the file). `Ok(None)` without a
    /// disk.
    ///
    /// # Errors
    ///
    /// [`BlockError::HoldReplicated`] under [`FlushPolicy::Replicated`]
    /// (writes of uncommitted epochs must not reach the file);
    /// [`BlockError::AlreadyHeld`] when a hold is in progress.
    pub fn hold_for_checkpoint(self: &Arc<Self>) -> Result<Option<DiskHold>, BlockError> {
        if self.disk.is_none() {
            return Ok(None);
        }
        let mut st = self.state();
        if st.policy == FlushPolicy::Replicated {
            return Err(BlockError::HoldReplicated);
        }
        if st.held {
            return Err(BlockError::AlreadyHeld);
        }
        st.held = true;
        let epoch = st.buffer.close_epoch();
        Ok(Some(DiskHold {
            dev: Arc::clone(self),
            epoch,
        }))
    }

    /// Whether a checkpoint hold is in progress.
    pub fn is_held(&self) -> bool {
        self.state().held
    }
}

impl DiskHold {
    /// The epoch closed at the checkpoint: its writes and older ones
    /// belong to the checkpoint, later ones do not.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Writes the checkpoint's buffered writes (epochs up to
    /// [`DiskHold::epoch`]) to the file and syncs; returns the sectors
    /// written. Afterwards, until the hold ends, the file is exactly the
    /// disk as of the checkpoint. Call it after resuming the guest.
    ///
    /// # Errors
    ///
    /// [`BlockError::Write`], [`BlockError::Sync`].
    pub fn settle(&self) -> Result<u64, BlockError> {
        // The closed epochs are immutable and, while the hold lives, the
        // only writes to the file: they are written outside the device
        // lock, so the guest's requests do not wait for this I/O. Reads
        // meanwhile see the same data in the buffer and in the file.
        let tables = self.dev.state().buffer.closed_upto(self.epoch);
        let runs = runs_of_tables(&tables);
        drop(tables);
        let disk = self.disk();
        let n: u64 = runs.iter().map(SectorRun::sectors).sum();
        if n > 0 {
            disk.write_runs(&runs)?;
            disk.sync()?;
        }
        let mut st = self.dev.state();
        st.buffer.drop_upto(self.epoch);
        if n > 0 {
            st.stats.sectors_to_file += n;
            st.stats.syncs += 1;
        }
        Ok(n)
    }

    /// The disk file (frozen at the checkpoint once [`DiskHold::settle`]d).
    pub fn disk(&self) -> &DiskFile {
        self.dev
            .disk
            .as_ref()
            .expect("a hold exists only for a device with a disk")
    }

    /// Ends the hold: buffered writes may reach the file again (at the next
    /// guest FLUSH, or at once if the buffer is over its bound).
    pub fn release(self) {}
}

impl Drop for DiskHold {
    fn drop(&mut self) {
        let mut st = self.dev.state();
        st.held = false;
        if let (Some(disk), FlushPolicy::WriteBack { max_buffered }) =
            (self.dev.disk.as_ref(), st.policy)
        {
            if st.buffer.buffered_bytes() > max_buffered {
                if let Err(e) = BlockDevice::drain(disk, &mut st, false) {
                    tracing::error!(error = %e, "cannot write buffered disk writes after a checkpoint");
                }
            }
        }
        drop(st);
        self.dev.released.notify_all();
    }
}

impl DiskFile {
    /// The open file (for copying the image).
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl super::state::DeviceState for BlockDevice {
    fn state_name(&self) -> &str {
        BLOCK_STATE
    }

    /// Version, capacity in sectors, the flush policy (tag and bound) and
    /// the open epoch. Buffered writes are not in it: a checkpoint holds
    /// them in its disk image.
    fn save_state(&self) -> Vec<u8> {
        let st = self.state();
        let (tag, bound) = match st.policy {
            FlushPolicy::WriteBack { max_buffered } => (0u8, max_buffered),
            FlushPolicy::Replicated => (1u8, 0),
        };
        let mut v = Vec::with_capacity(BLOCK_STATE_BYTES);
        v.push(BLOCK_STATE_VERSION);
        v.extend_from_slice(&self.capacity().to_le_bytes());
        v.push(tag);
        v.extend_from_slice(&bound.to_le_bytes());
        v.extend_from_slice(&st.buffer.open_epoch().to_le_bytes());
        v
    }

    fn restore_state(&self, bytes: &[u8]) -> Result<(), String> {
        if bytes.len() != BLOCK_STATE_BYTES {
            return Err(format!(
                "{} bytes of block device state, expected {BLOCK_STATE_BYTES}",
                bytes.len()
            ));
        }
        if bytes[0] != BLOCK_STATE_VERSION {
            return Err(format!(
                "block device state version {} is not supported",
                bytes[0]
            ));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let capacity = u64_at(1);
        let policy = match (bytes[9], u64_at(10)) {
            (0, max_buffered) if max_buffered > 0 => FlushPolicy::WriteBack { max_buffered },
            (1, 0) => FlushPolicy::Replicated,
            (tag, bound) => return Err(format!("bad flush policy {tag} (bound {bound})")),
        };
        let epoch = u64_at(18);
        if capacity != self.capacity() {
            return Err(format!(
                "the saved disk has {capacity} sectors, the attached one {}",
                self.capacity()
            ));
        }
        let mut st = self.state();
        if st.buffer.buffered_sectors() != 0 {
            return Err("the device already holds buffered writes".into());
        }
        st.buffer = WriteBuffer::new(epoch);
        st.policy = policy;
        Ok(())
    }
}

// --- checkpoints of the disk (end) ---

impl Drop for BlockDevice {
    /// A safety net for runs that end on an error path: in write-back mode
    /// buffered writes are written and synced (errors are logged). Under
    /// replication nothing is written: uncommitted writes never reach the
    /// file.
    fn drop(&mut self) {
        if matches!(self.policy(), FlushPolicy::WriteBack { .. }) {
            if let Err(e) = self.flush_all() {
                tracing::error!(error = %e, "cannot write buffered disk writes at exit");
            }
        }
    }
}

#[cfg(test)]
mod tests;
