//! Checkpoints on disk: `simrep run --checkpoint-dir DIR` writes them,
//! `simrep restore DIR` continues the guest from the newest one.
//!
//! # Directory layout
//!
//! ```text
//! DIR/
//!   latest -> ckpt-0000000007      symlink to the newest complete checkpoint
//!   ckpt-0000000007/
//!     manifest.json                written last; see [`Manifest`]
//!     state.bin                    the encoded VmSnapshot (super::state)
//!     memory.raw                   guest RAM from GPA 0, sparse: zero pages are holes
//!     disk.raw                     with `--disk`: the disk image, sparse (see below)
//! ```
//!
//! `manifest.json` is human-readable: the format name and version, the
//! sequence number, the creation time, the guest's memory size and vCPU
//! count, and for `state.bin` and `memory.raw` their sizes and CRC-32s
//! (of `memory.raw`: over the whole logical image, holes read as zeros),
//! plus how long the guest was paused and the write took.
//!
//! # Atomicity
//!
//! A checkpoint is written into `DIR/.tmp-<seq>-<pid>/`, every file
//! `fsync`ed, the directory `fsync`ed, then renamed to `DIR/ckpt-<seq>`;
//! then `latest` is replaced atomically (a new symlink renamed over it) and
//! `DIR` is `fsync`ed; only then are older checkpoints removed. A crash at
//! any point leaves `latest` pointing at a complete checkpoint (or, before
//! the first one, no `latest` at all). Stale `.tmp-*` directories are
//! removed when the next writer starts.
//!
//! # Reading
//!
//! [`load`] accepts `DIR` (it follows `latest`) or a `ckpt-*` directory,
//! checks the manifest, the state's size and checksum and decodes it;
//! [`load_memory`] reads only the data extents of `memory.raw`
//! (`SEEK_DATA`/`SEEK_HOLE`: fresh guest memory is already zero) and
//! verifies the image's CRC. Anything missing, truncated or corrupt is a
//! [`CheckpointError`] for which [`CheckpointError::is_bad_input`] holds.
//!
//! # The disk
//!
//! A guest with a disk (`simrep run --disk FILE --checkpoint-dir DIR`)
//! gets its disk image into the checkpoint, consistent with memory and
//! vCPU state, without staying paused for the copy. During the pause the
//! block device's open epoch of buffered writes is closed and the device
//! is *held* ([`BlockDevice::hold_for_checkpoint`](super::block::BlockDevice::hold_for_checkpoint)):
//! from then on no write reaches the file. After the guest resumes, the
//! writes buffered before the checkpoint are written to the file and
//! synced ([`DiskHold::settle`]), so the file is exactly the disk as of
//! the checkpoint; it is copied into the checkpoint as `disk.raw`
//! (sparse: `SEEK_DATA`/`SEEK_HOLE`, holes stay holes; see
//! [`super::disk_image`]) with its CRC-32 in the manifest; then the hold
//! ends and buffered writes drain again. Meanwhile the guest runs: its
//! reads see the newest data (the write buffer layers over the file); a
//! guest FLUSH waits for the end of the copy (its promise needs the file).
//! The block device's own state (capacity, flush policy, epoch) travels in
//! `state.bin` as the `block` device blob.
//!
//! `simrep restore DIR --disk FILE` copies `disk.raw` to `FILE` (which must
//! not exist; written as `FILE.restoring` and renamed once its CRC-32
//! matched), attaches the block device on it and continues the guest. The
//! checkpoint's files are never modified, so a checkpoint can be restored
//! any number of times.
//!
//! # Memory
//!
//! The guest is not paused for a copy of its memory either. During the
//! pause (after the state save, before the disk hold) a copy-on-write view
//! over all of guest memory is armed ([`CowMemory::arm_all`]: one
//! `UFFDIO_WRITEPROTECT` over the whole range); after the guest resumes,
//! `memory.raw` is written 2 MiB at a time from the view
//! ([`CowView::read_page`]: the page as of the pause, the saved copy if
//! the guest wrote it since), and each 2 MiB is released once written
//! ([`CowView::release_range`]), so the guest's later writes there run
//! without a fault. Until then, the guest's (and the devices') first write
//! to a page blocks while the fault handler copies the page: the log line
//! gives the number of these faults, their median and longest handling
//! time, and the most memory the copies held. The view is finished when
//! the file is synced.
//!
//! Where userfaultfd is not available, or arming fails, the memory is
//! copied during the pause instead ([`MemoryCopy`]; ~100-230 ms per GiB
//! here), which is logged once; [`Checkpointer::set_copy_during_pause`]
//! chooses that too. The file is the same either way.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::dirty::cow::{self, CowError, CowMemory, CowStats, CowView};

use super::abi::{LARGE_PAGE_SIZE, PAGE_SIZE};
use super::block::DiskHold;
use super::memory::GuestMemory;
use super::run::{supervise, RunOptions, RunSummary};
use super::state::{RestoreTimes, StateError, VmSnapshot, MAX_STATE_BYTES};
use super::vm::Vm;
use super::VmmError;

/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "simrep-checkpoint";
/// Version of the directory format.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The state blob's file name.
pub const STATE_FILE: &str = "state.bin";
/// The memory image's file name.
pub const MEMORY_FILE: &str = "memory.raw";
/// The disk image's file name.
pub const DISK_FILE: &str = "disk.raw";
/// The symlink to the newest checkpoint.
pub const LATEST_LINK: &str = "latest";
/// Largest manifest read.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Errors of writing and reading checkpoints.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file or directory could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// A file or directory could not be written.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The directory holds no checkpoint.
    #[error("{} holds no checkpoint (no {LATEST_LINK} link and no {MANIFEST_FILE})", .0.display())]
    NoCheckpoint(PathBuf),
    /// The manifest is not valid.
    #[error("bad manifest {}: {reason}", .path.display())]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file does not match the manifest (size or checksum).
    #[error("{} is corrupt: {reason}", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },
    /// The state blob is malformed, or restoring it failed.
    #[error("VM state in {}", .path.display())]
    State {
        /// The checkpoint directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: StateError,
    },
    /// Pausing, saving or resuming the running VM failed.
    #[error("checkpointing the running VM")]
    Vm(#[source] StateError),
    /// The checkpoint's disk and the restore's `--disk` do not go together
    /// (exit code 2 in the CLI).
    #[error("{reason}")]
    DiskChoice {
        /// What is wrong and what to do.
        reason: String,
    },
    /// The block device refused a checkpoint hold or its write-out.
    #[error("checkpointing the disk")]
    Disk(#[source] super::block::BlockError),
    /// Reading (or releasing) a page of the copy-on-write view of guest
    /// memory failed while `memory.raw` was written.
    #[error("reading guest frame {gfn:#x} through the copy-on-write view")]
    Cow {
        /// The guest frame.
        gfn: u64,
        /// The error.
        #[source]
        source: CowError,
    },
}

impl CheckpointError {
    /// Whether the error says the checkpoint on disk is missing, malformed
    /// or corrupt (exit code 3 in the CLI).
    pub fn is_bad_input(&self) -> bool {
        match self {
            CheckpointError::Read { .. }
            | CheckpointError::NoCheckpoint(_)
            | CheckpointError::Manifest { .. }
            | CheckpointError::Corrupt { .. } => true,
            CheckpointError::State { source, .. } => source.is_bad_input(),
            CheckpointError::Write { .. }
            | CheckpointError::Vm(_)
            | CheckpointError::DiskChoice { .. }
            | CheckpointError::Disk(_)
            | CheckpointError::Cow { .. } => false,
        }
    }
}

/// One file of a checkpoint in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Its name inside the checkpoint directory.
    pub file: String,
    /// Its logical size in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE) of its logical content.
    pub crc32: u32,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Sequence number, increasing within a checkpoint directory.
    pub sequence: u64,
    /// Creation time, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// The encoded [`VmSnapshot`].
    pub state: FileEntry,
    /// Guest RAM (sparse).
    pub memory: FileEntry,
    /// Pages of guest RAM that are not all zero (the rest are holes).
    pub memory_data_pages: u64,
    /// How long the vCPU and VM state save took, in µs.
    pub save_us: u64,
    /// How long writing the files took, in ms.
    pub write_ms: u64,
    /// The disk image (`disk.raw`, sparse), for guests with a disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<FileEntry>,
    /// Bytes of the disk image that are not in all-zero 4 KiB blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_data_bytes: Option<u64>,
    /// How long the guest's disk was held (settle + copy + sync), in ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_copy_ms: Option<u64>,
}

/// What [`write()`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The checkpoint's directory (`DIR/ckpt-<seq>`).
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Writing memory (copy, zero check, CRC, write, fsync).
    pub memory_time: Duration,
    /// Settling and copying the disk (the hold's length), if any.
    pub disk_time: Option<Duration>,
    /// The whole write.
    pub total_time: Duration,
}

fn werr(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Write {
        path: path.to_owned(),
        source,
    }
}

fn rerr(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Read {
        path: path.to_owned(),
        source,
    }
}

fn fsync_dir(path: &Path) -> Result<(), CheckpointError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(werr(path))
}

/// CRC-32 of runs of zero pages in O(log n): `ZERO_RUNS[k]` is the hasher
/// state of `2^k` zero pages.
struct ZeroCrc {
    runs: Vec<crc32fast::Hasher>,
}

impl ZeroCrc {
    fn new() -> Self {
        let mut first = crc32fast::Hasher::new();
        first.update(&[0u8; PAGE_SIZE as usize]);
        let mut runs = vec![first];
        for k in 1..40 {
            let mut h = runs[k - 1].clone();
            h.combine(&runs[k - 1]);
            runs.push(h);
        }
        ZeroCrc { runs }
    }

    /// Appends `pages` zero pages to `h`.
    fn extend(&self, h: &mut crc32fast::Hasher, pages: u64) {
        for (k, run) in self.runs.iter().enumerate() {
            if pages & (1 << k) != 0 {
                h.combine(run);
            }
        }
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
}

/// A copy of guest memory taken while the vCPUs are paused, into a
/// pre-faulted arena of the guest's size (kept by the [`Checkpointer`] from
/// one checkpoint to the next, so that the pause does not pay for page
/// faults), with the list of 2 MiB chunks that are not all zero: the
/// [`Checkpointer`]'s fallback when no copy-on-write view can be armed.
/// The guest resumes as soon as it is taken; writing it to disk happens
/// while the guest runs (the disk here writes ~200-300 MB/s: a 1 GiB image
/// would otherwise pause the guest for seconds).
#[derive(Debug)]
pub struct MemoryCopy {
    arena: Arc<GuestMemory>,
    /// GPAs of the chunks with data, in address order.
    chunks: Vec<u64>,
}

impl MemoryCopy {
    /// A pre-faulted arena for copies of guest memory of `size` bytes.
    ///
    /// # Errors
    ///
    /// [`super::memory::MemoryError`] when the host has not got the memory.
    pub fn arena(size: u64) -> Result<Arc<GuestMemory>, super::memory::MemoryError> {
        GuestMemory::new(size).map(Arc::new)
    }

    /// Copies `mem` (the vCPUs must be paused) into a new arena.
    ///
    /// # Errors
    ///
    /// [`super::memory::MemoryError`] if memory cannot be mapped or read.
    pub fn capture(mem: &GuestMemory) -> Result<Self, super::memory::MemoryError> {
        Self::capture_into(mem, Self::arena(mem.size())?)
    }

    /// Copies `mem` (the vCPUs must be paused) into `arena` (from
    /// [`MemoryCopy::arena`], of the same size, not shared with a live copy).
    ///
    /// # Errors
    ///
    /// [`super::memory::MemoryError`] if guest memory cannot be read or the
    /// arena is too small.
    pub fn capture_into(
        mem: &GuestMemory,
        arena: Arc<GuestMemory>,
    ) -> Result<Self, super::memory::MemoryError> {
        let mut chunks = Vec::new();
        let mut buf = vec![0u8; LARGE_PAGE_SIZE as usize];
        let mut gpa = 0u64;
        while gpa < mem.size() {
            let n = (mem.size() - gpa).min(LARGE_PAGE_SIZE) as usize;
            let chunk = &mut buf[..n];
            mem.read(gpa, chunk)?;
            if !is_zero(chunk) {
                arena.write(gpa, chunk)?;
                chunks.push(gpa);
            }
            gpa += n as u64;
        }
        Ok(MemoryCopy { arena, chunks })
    }

    /// Bytes of guest memory copied.
    pub fn size(&self) -> u64 {
        self.arena.size()
    }

    /// Bytes of chunks with data.
    pub fn held_bytes(&self) -> u64 {
        self.chunks.len() as u64 * LARGE_PAGE_SIZE
    }

    /// The arena, for the next copy.
    pub fn into_arena(self) -> Arc<GuestMemory> {
        self.arena
    }
}

/// The memory image a checkpoint writes: taken at the pause, read while
/// the guest runs.
#[derive(Debug, Clone, Copy)]
pub enum MemoryImage<'a> {
    /// A copy taken during the pause (the fallback without userfaultfd).
    Copy(&'a MemoryCopy),
    /// A copy-on-write view armed during the pause: pages are read (and
    /// released) as they are written to the file.
    View(&'a CowView),
}

impl MemoryImage<'_> {
    /// Bytes of guest memory.
    fn size(&self) -> u64 {
        match self {
            MemoryImage::Copy(c) => c.size(),
            MemoryImage::View(v) => v.armed_pages() * PAGE_SIZE,
        }
    }
}

/// Fills `pages` with the image's content from `gpa` (2 MiB aligned) on;
/// `false` for a chunk known to be all zeros (not read).
fn read_chunk(
    img: &MemoryImage<'_>,
    gpa: u64,
    pages: &mut [[u8; cow::PAGE_SIZE]],
) -> Result<bool, CheckpointError> {
    match img {
        MemoryImage::Copy(c) => {
            if c.chunks.binary_search(&gpa).is_err() {
                return Ok(false);
            }
            c.arena
                .read(gpa, pages.as_flattened_mut())
                .map_err(|e| CheckpointError::Vm(StateError::Memory(e)))?;
        }
        MemoryImage::View(v) => {
            let first = gpa / PAGE_SIZE;
            for (gfn, page) in (first..).zip(pages.iter_mut()) {
                v.read_page(gfn, page)
                    .map_err(|source| CheckpointError::Cow { gfn, source })?;
            }
        }
    }
    Ok(true)
}

/// The image's pages of `chunk` (at `gpa`) are in the file: a view drops
/// their copies or protection, so later guest writes to them run without
/// a copy-on-write fault.
fn release_chunk(img: &MemoryImage<'_>, gpa: u64, len: usize) -> Result<(), CheckpointError> {
    if let MemoryImage::View(v) = img {
        let gfn = gpa / PAGE_SIZE;
        v.release_range(gfn, len as u64 / PAGE_SIZE)
            .map_err(|source| CheckpointError::Cow { gfn, source })?;
    }
    Ok(())
}

/// Writes a memory image to `path` as a sparse image (zero pages are
/// holes); returns its CRC-32 and the number of non-zero pages.
fn write_memory(path: &Path, img: &MemoryImage<'_>) -> Result<(u32, u64), CheckpointError> {
    let file = File::create(path).map_err(werr(path))?;
    let size = img.size();
    file.set_len(size).map_err(werr(path))?;
    let zeros = ZeroCrc::new();
    let mut crc = crc32fast::Hasher::new();
    let mut data_pages = 0u64;
    let page = PAGE_SIZE as usize;
    let mut buf = vec![[0u8; cow::PAGE_SIZE]; (LARGE_PAGE_SIZE / PAGE_SIZE) as usize];
    // Everything below `hashed` is in `crc`.
    let mut hashed = 0u64;
    let mut gpa = 0u64;
    while gpa < size {
        let n = (size - gpa).min(LARGE_PAGE_SIZE) as usize;
        let chunk_gpa = gpa;
        gpa += n as u64;
        let pages = &mut buf[..n / page];
        if !read_chunk(img, chunk_gpa, pages)? {
            continue;
        }
        let chunk = pages.as_flattened();
        zeros.extend(&mut crc, (chunk_gpa - hashed) / PAGE_SIZE);
        // Runs of non-zero pages are written with one pwrite each.
        let mut run_start: Option<usize> = None;
        for (i, p) in chunk.chunks(page).enumerate() {
            if is_zero(p) {
                zeros.extend(&mut crc, 1);
                if let Some(s) = run_start.take() {
                    file.write_all_at(&chunk[s..i * page], chunk_gpa + s as u64)
                        .map_err(werr(path))?;
                }
            } else {
                crc.update(p);
                data_pages += 1;
                run_start.get_or_insert(i * page);
            }
        }
        if let Some(s) = run_start {
            file.write_all_at(&chunk[s..], chunk_gpa + s as u64)
                .map_err(werr(path))?;
        }
        hashed = chunk_gpa + chunk.len() as u64;
        // The data is in the page cache now: the view's pages can go.
        release_chunk(img, chunk_gpa, n)?;
    }
    zeros.extend(&mut crc, (size - hashed) / PAGE_SIZE);
    file.sync_all().map_err(werr(path))?;
    Ok((crc.finalize(), data_pages))
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(werr(path))?;
    f.write_all(bytes).map_err(werr(path))?;
    f.sync_all().map_err(werr(path))
}

fn ckpt_name(seq: u64) -> String {
    format!("ckpt-{seq:010}")
}

fn parse_ckpt_name(name: &str) -> Option<u64> {
    name.strip_prefix("ckpt-")?.parse().ok()
}

/// The highest sequence number in `dir` (0 if none), after removing stale
/// temporary directories.
///
/// # Errors
///
/// [`CheckpointError::Write`] when `dir` cannot be created or listed.
pub fn prepare_dir(dir: &Path) -> Result<u64, CheckpointError> {
    fs::create_dir_all(dir).map_err(werr(dir))?;
    let mut max = 0;
    for entry in fs::read_dir(dir).map_err(werr(dir))? {
        let entry = entry.map_err(werr(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".tmp-") {
            let _ = fs::remove_dir_all(entry.path());
        } else if let Some(seq) = parse_ckpt_name(&name) {
            max = max.max(seq);
        }
    }
    Ok(max)
}

/// Writes a checkpoint of `snapshot` and `mem` (taken at the same pause)
/// as `DIR/ckpt-<seq>` and points `DIR/latest` at it (see the module docs
/// for the atomicity). The guest may run meanwhile. `save_time` goes into
/// the manifest.
///
/// # Errors
///
/// [`CheckpointError::Write`] naming the path that failed; the previous
/// checkpoint stays intact.
pub fn write(
    dir: &Path,
    seq: u64,
    snapshot: &VmSnapshot,
    mem: &MemoryCopy,
    save_time: Duration,
) -> Result<Written, CheckpointError> {
    write_with_disk(dir, seq, snapshot, MemoryImage::Copy(mem), save_time, None)
}

/// Settles the held disk, copies it to `path` (sparse) and syncs; the hold
/// ends when this returns.
fn write_disk(
    path: &Path,
    hold: DiskHold,
) -> Result<(super::disk_image::ImageCopy, Duration), CheckpointError> {
    let t = Instant::now();
    hold.settle().map_err(CheckpointError::Disk)?;
    let disk = hold.disk();
    let dst = File::create(path).map_err(werr(path))?;
    let len = disk.capacity() * super::block::SECTOR as u64;
    let copy = super::disk_image::copy_sparse(disk.file(), Some(&dst), len).map_err(
        |(read, source)| {
            if read {
                CheckpointError::Read {
                    path: disk.path().to_owned(),
                    source,
                }
            } else {
                CheckpointError::Write {
                    path: path.to_owned(),
                    source,
                }
            }
        },
    )?;
    dst.sync_all().map_err(werr(path))?;
    hold.release();
    Ok((copy, t.elapsed()))
}

/// [`write()`] with the disk held at the same pause (see the module docs):
/// `disk.raw` is written first, so the hold is short, and the hold ends
/// once it is synced (also on errors).
///
/// # Errors
///
/// As [`write()`], plus [`CheckpointError::Disk`] and
/// [`CheckpointError::Read`] of the disk image.
pub fn write_with_disk(
    dir: &Path,
    seq: u64,
    snapshot: &VmSnapshot,
    mem: MemoryImage<'_>,
    save_time: Duration,
    disk: Option<DiskHold>,
) -> Result<Written, CheckpointError> {
    let t0 = Instant::now();
    fs::create_dir_all(dir).map_err(werr(dir))?;
    let tmp = dir.join(format!(".tmp-{seq}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(werr(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(werr(&tmp))?;
    let disk = match disk {
        Some(hold) => Some(write_disk(&tmp.join(DISK_FILE), hold)?),
        None => None,
    };
    let state = snapshot.encode();
    write_file(&tmp.join(STATE_FILE), &state)?;
    let t_mem = Instant::now();
    let (mem_crc, data_pages) = write_memory(&tmp.join(MEMORY_FILE), &mem)?;
    let memory_time = t_mem.elapsed();
    let manifest = Manifest {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        sequence: seq,
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        mem_bytes: mem.size(),
        vcpus: snapshot.vcpu_count(),
        state: FileEntry {
            file: STATE_FILE.into(),
            bytes: state.len() as u64,
            crc32: crc32fast::hash(&state),
        },
        memory: FileEntry {
            file: MEMORY_FILE.into(),
            bytes: mem.size(),
            crc32: mem_crc,
        },
        memory_data_pages: data_pages,
        save_us: save_time.as_micros() as u64,
        write_ms: t0.elapsed().as_millis() as u64,
        disk: disk.map(|(c, _)| FileEntry {
            file: DISK_FILE.into(),
            bytes: c.bytes,
            crc32: c.crc32,
        }),
        disk_data_bytes: disk.map(|(c, _)| c.data_bytes),
        disk_copy_ms: disk.map(|(_, t)| t.as_millis() as u64),
    };
    let mut json = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Write {
        path: tmp.join(MANIFEST_FILE),
        source: e.into(),
    })?;
    json.push(b'\n');
    write_file(&tmp.join(MANIFEST_FILE), &json)?;
    fsync_dir(&tmp)?;
    let final_path = dir.join(ckpt_name(seq));
    if final_path.exists() {
        fs::remove_dir_all(&final_path).map_err(werr(&final_path))?;
    }
    fs::rename(&tmp, &final_path).map_err(werr(&final_path))?;
    fsync_dir(dir)?;
    let link_tmp = dir.join(format!(".tmp-link-{}", std::process::id()));
    let _ = fs::remove_file(&link_tmp);
    std::os::unix::fs::symlink(ckpt_name(seq), &link_tmp).map_err(werr(&link_tmp))?;
    let latest = dir.join(LATEST_LINK);
    fs::rename(&link_tmp, &latest).map_err(werr(&latest))?;
    fsync_dir(dir)?;
    // Older checkpoints are now unreachable.
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            if parse_ckpt_name(&name.to_string_lossy()).is_some_and(|s| s != seq) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(Written {
        path: final_path,
        manifest,
        memory_time,
        disk_time: disk.map(|(_, t)| t),
        total_time: t0.elapsed(),
    })
}

/// A checkpoint read from disk, its memory not yet loaded.
#[derive(Debug)]
pub struct Loaded {
    /// The checkpoint directory (`ckpt-*`).
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// The decoded state.
    pub snapshot: VmSnapshot,
}

fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, CheckpointError> {
    let f = File::open(path).map_err(rerr(path))?;
    let mut v = Vec::new();
    f.take(max + 1).read_to_end(&mut v).map_err(rerr(path))?;
    if v.len() as u64 > max {
        return Err(CheckpointError::Corrupt {
            path: path.to_owned(),
            reason: format!("larger than {max} bytes"),
        });
    }
    Ok(v)
}

/// Reads the checkpoint in `dir` (a checkpoint directory, or one holding a
/// `latest` link): the manifest, then the state, checked against the
/// manifest's size and CRC and decoded.
///
/// # Errors
///
/// [`CheckpointError`] with [`CheckpointError::is_bad_input`] for a
/// missing, malformed or corrupt checkpoint.
pub fn load(dir: &Path) -> Result<Loaded, CheckpointError> {
    let path = if dir.join(MANIFEST_FILE).exists() {
        dir.to_owned()
    } else if dir.join(LATEST_LINK).exists() {
        let target = fs::read_link(dir.join(LATEST_LINK)).map_err(rerr(&dir.join(LATEST_LINK)))?;
        dir.join(target)
    } else if !dir.is_dir() {
        return Err(CheckpointError::Read {
            path: dir.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        });
    } else {
        return Err(CheckpointError::NoCheckpoint(dir.to_owned()));
    };
    let mpath = path.join(MANIFEST_FILE);
    let bytes = read_capped(&mpath, MAX_MANIFEST_BYTES)?;
    let bad = |reason: String| CheckpointError::Manifest {
        path: mpath.clone(),
        reason,
    };
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if manifest.format != FORMAT_NAME {
        return Err(bad(format!(
            "format is `{}`, not `{FORMAT_NAME}`",
            manifest.format
        )));
    }
    if manifest.version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {} is not supported (this build reads version {FORMAT_VERSION})",
            manifest.version
        )));
    }
    for (entry, name) in [
        (&manifest.state, STATE_FILE),
        (&manifest.memory, MEMORY_FILE),
    ] {
        if entry.file != name {
            return Err(bad(format!("file `{}` where `{name}` belongs", entry.file)));
        }
    }
    if manifest.memory.bytes != manifest.mem_bytes {
        return Err(bad("memory image size differs from mem_bytes".into()));
    }
    let spath = path.join(STATE_FILE);
    let state = read_capped(&spath, MAX_STATE_BYTES + 64)?;
    let corrupt = |reason: String| CheckpointError::Corrupt {
        path: spath.clone(),
        reason,
    };
    if state.len() as u64 != manifest.state.bytes {
        return Err(corrupt(format!(
            "{} bytes, the manifest says {}",
            state.len(),
            manifest.state.bytes
        )));
    }
    let crc = crc32fast::hash(&state);
    if crc != manifest.state.crc32 {
        return Err(corrupt(format!(
            "CRC-32 {crc:#010x}, the manifest says {:#010x}",
            manifest.state.crc32
        )));
    }
    let snapshot = VmSnapshot::decode(&state).map_err(|source| CheckpointError::State {
        path: path.clone(),
        source,
    })?;
    if snapshot.mem_bytes != manifest.mem_bytes || snapshot.vcpu_count() != manifest.vcpus {
        return Err(bad(
            "memory size or vCPU count differs from the state".into()
        ));
    }
    if let Some(d) = &manifest.disk {
        if d.file != DISK_FILE {
            return Err(bad(format!(
                "file `{}` where `{DISK_FILE}` belongs",
                d.file
            )));
        }
        if d.bytes == 0 || d.bytes % super::block::SECTOR as u64 != 0 {
            return Err(bad(format!("disk image of {} bytes", d.bytes)));
        }
        let dpath = path.join(DISK_FILE);
        let len = fs::metadata(&dpath).map_err(rerr(&dpath))?.len();
        if len != d.bytes {
            return Err(CheckpointError::Corrupt {
                path: dpath,
                reason: format!("{len} bytes, the manifest says {}", d.bytes),
            });
        }
    }
    let mpath = path.join(MEMORY_FILE);
    let len = fs::metadata(&mpath).map_err(rerr(&mpath))?.len();
    if len != manifest.memory.bytes {
        return Err(CheckpointError::Corrupt {
            path: mpath,
            reason: format!("{len} bytes, the manifest says {}", manifest.memory.bytes),
        });
    }
    Ok(Loaded {
        path,
        manifest,
        snapshot,
    })
}

/// `lseek(fd, off, whence)`, `None` at ENXIO (no more data / holes).
fn seek(file: &File, off: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(off).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek on a file descriptor this `File` owns; it only moves
    // the file offset.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Loads `memory.raw` of `ckpt` into fresh (zeroed) guest memory: only the
/// file's data extents are read; the CRC-32 of the whole image is checked
/// against the manifest.
///
/// # Errors
///
/// [`CheckpointError::Read`]; [`CheckpointError::Corrupt`] when the
/// checksum does not match.
pub fn load_memory(ckpt: &Loaded, mem: &GuestMemory) -> Result<(), CheckpointError> {
    let path = ckpt.path.join(MEMORY_FILE);
    let expected = &ckpt.manifest.memory;
    if mem.size() != expected.bytes {
        return Err(CheckpointError::Corrupt {
            path,
            reason: format!(
                "image of {} bytes for {} bytes of RAM",
                expected.bytes,
                mem.size()
            ),
        });
    }
    let file = File::open(&path).map_err(rerr(&path))?;
    let zeros = ZeroCrc::new();
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; LARGE_PAGE_SIZE as usize];
    let page = PAGE_SIZE;
    let size = expected.bytes;
    // `pos`: everything below it is loaded and hashed.
    let mut pos = 0u64;
    while pos < size {
        let data = match seek(&file, pos, libc::SEEK_DATA).map_err(rerr(&path))? {
            Some(d) => d.min(size) / page * page,
            None => size,
        };
        if data > pos {
            zeros.extend(&mut crc, (data - pos) / page);
            pos = data;
            continue;
        }
        let hole = seek(&file, pos, libc::SEEK_HOLE)
            .map_err(rerr(&path))?
            .unwrap_or(size)
            .min(size);
        let end = hole.div_ceil(page) * page;
        let end = end.max(pos + page).min(size);
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, pos).map_err(rerr(&path))?;
            for p in chunk.chunks(page as usize) {
                if is_zero(p) {
                    zeros.extend(&mut crc, 1);
                } else {
                    crc.update(p);
                }
            }
            mem.write(pos, chunk)
                .map_err(|e| CheckpointError::Vm(StateError::Memory(e)))?;
            pos += n as u64;
        }
    }
    let found = crc.finalize();
    if found != expected.crc32 {
        return Err(CheckpointError::Corrupt {
            path,
            reason: format!(
                "CRC-32 {found:#010x}, the manifest says {:#010x}",
                expected.crc32
            ),
        });
    }
    Ok(())
}

/// Copies the checkpoint's `disk.raw` to `target` (sparse), checking its
/// CRC-32 against the manifest: written as `target.restoring`, synced and
/// renamed only when it matches, so a corrupt image leaves nothing behind.
/// `target` must not exist. The checkpoint's files are not modified.
///
/// # Errors
///
/// [`CheckpointError::DiskChoice`] when the checkpoint has no disk or
/// `target` exists; [`CheckpointError::Corrupt`] for a CRC mismatch;
/// [`CheckpointError::Read`], [`CheckpointError::Write`].
pub fn restore_disk(
    ckpt: &Loaded,
    target: &Path,
) -> Result<super::disk_image::ImageCopy, CheckpointError> {
    let Some(entry) = &ckpt.manifest.disk else {
        return Err(CheckpointError::DiskChoice {
            reason: format!(
                "checkpoint {} holds no disk image; restore it without --disk",
                ckpt.path.display()
            ),
        });
    };
    if target.exists() || target.is_symlink() {
        return Err(CheckpointError::DiskChoice {
            reason: format!(
                "{} exists: --disk names a new file that receives a copy of the checkpoint's disk image",
                target.display()
            ),
        });
    }
    let src_path = ckpt.path.join(DISK_FILE);
    let src = File::open(&src_path).map_err(rerr(&src_path))?;
    let mut tmp_name = target.as_os_str().to_owned();
    tmp_name.push(".restoring");
    let tmp = PathBuf::from(tmp_name);
    let dst = File::create(&tmp).map_err(werr(&tmp))?;
    let copied =
        super::disk_image::copy_sparse(&src, Some(&dst), entry.bytes).map_err(|(read, source)| {
            if read {
                CheckpointError::Read {
                    path: src_path.clone(),
                    source,
                }
            } else {
                CheckpointError::Write {
                    path: tmp.clone(),
                    source,
                }
            }
        });
    let checked = copied.and_then(|c| {
        if c.crc32 != entry.crc32 {
            return Err(CheckpointError::Corrupt {
                path: src_path.clone(),
                reason: format!(
                    "CRC-32 {:#010x}, the manifest says {:#010x}",
                    c.crc32, entry.crc32
                ),
            });
        }
        dst.sync_all().map_err(werr(&tmp))?;
        fs::rename(&tmp, target).map_err(werr(target))?;
        Ok(c)
    });
    if checked.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let c = checked?;
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsync_dir(parent)?;
    }
    Ok(c)
}

/// Restores the checkpoint `ckpt` into a fresh VM, vCPUs Paused (see
/// [`Vm::restore`]).
///
/// # Errors
///
/// [`CheckpointError::State`] for state KVM refuses;
/// [`CheckpointError::Corrupt`] for a bad memory image.
pub fn restore(ckpt: &Loaded) -> Result<(Vm, RestoreTimes), CheckpointError> {
    let mut mem_err = None;
    Vm::restore(&ckpt.snapshot, |mem| {
        load_memory(ckpt, mem).map_err(|e| {
            mem_err = Some(e);
            StateError::LoadMemory("see the checkpoint error".into())
        })
    })
    .map_err(|source| {
        mem_err.take().unwrap_or(CheckpointError::State {
            path: ckpt.path.clone(),
            source,
        })
    })
}

/// When [`Checkpointer`] writes checkpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointOptions {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Also write one this often (`None`: only on request).
    pub every: Option<Duration>,
}

/// What one checkpoint cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointReport {
    /// The checkpoint written.
    pub written: Written,
    /// How long the guest was paused (pause + state save + arm or copy +
    /// disk hold + resume).
    pub paused: Duration,
    /// The state save within it.
    pub save: Duration,
    /// Arming the copy-on-write view within it (zero when memory was
    /// copied instead).
    pub arm: Duration,
    /// The memory copy within it (zero when the copy-on-write view was
    /// armed; see [`Checkpointer::set_copy_during_pause`]).
    pub copy: Duration,
    /// Holding the disk within it.
    pub hold: Duration,
    /// The copy-on-write view's statistics (the guest's write faults while
    /// `memory.raw` was written), when one was used.
    pub cow: Option<CowStats>,
}

/// The memory image taken at a pause.
#[derive(Debug)]
enum Taken {
    /// A copy-on-write view over the live memory.
    View(CowView),
    /// A copy in the arena.
    Copy(MemoryCopy),
}

/// Writes checkpoints of a running VM on request (a flag, set by SIGUSR1
/// in the CLI) or periodically.
///
/// Guest memory is written from a copy-on-write view ([`CowMemory`])
/// armed during the pause, so the pause does not grow with the guest's
/// memory; where userfaultfd is not available (or arming fails) memory is
/// copied during the pause instead, into an arena kept from one
/// checkpoint to the next, and that is logged once.
#[derive(Debug)]
pub struct Checkpointer {
    opts: CheckpointOptions,
    request: Arc<AtomicBool>,
    next_due: Option<Instant>,
    seq: u64,
    /// The VM's memory registered for copy-on-write (created before the
    /// first pause, reused while the VM's memory is the same).
    cow: Option<(Arc<GuestMemory>, CowMemory)>,
    /// Copy during the pause instead (userfaultfd unavailable, or asked).
    copy_only: bool,
    /// Where memory is copied during the pause in the fallback (created
    /// before the first pause, reused).
    arena: Option<Arc<GuestMemory>>,
}

impl Checkpointer {
    /// Prepares `opts.dir` (created if missing, stale temporary files
    /// removed); `request` asks for a checkpoint when set.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Write`] when the directory is not usable.
    pub fn new(opts: CheckpointOptions, request: Arc<AtomicBool>) -> Result<Self, CheckpointError> {
        let seq = prepare_dir(&opts.dir)?;
        let next_due = opts.every.map(|d| Instant::now() + d);
        Ok(Checkpointer {
            opts,
            request,
            next_due,
            seq,
            cow: None,
            copy_only: false,
            arena: None,
        })
    }

    /// With `true`, the following checkpoints copy guest memory during the
    /// pause instead of arming a copy-on-write view (what happens anyway
    /// where userfaultfd is not available); for comparisons and tests.
    pub fn set_copy_during_pause(&mut self, copy: bool) {
        self.copy_only = copy;
        if copy {
            self.cow = None;
        }
    }

    /// Whether the next checkpoint copies memory during the pause.
    pub fn copies_during_pause(&self) -> bool {
        self.copy_only
    }

    /// Writes a checkpoint if one was requested or is due.
    ///
    /// # Errors
    ///
    /// As [`Checkpointer::checkpoint`].
    pub fn poll(&mut self, vm: &Vm) -> Result<Option<CheckpointReport>, CheckpointError> {
        let requested = self.request.swap(false, Ordering::AcqRel);
        let due = self.next_due.is_some_and(|t| Instant::now() >= t);
        if !requested && !due {
            return Ok(None);
        }
        if let Some(every) = self.opts.every {
            self.next_due = Some(Instant::now() + every);
        }
        self.checkpoint(vm).map(Some)
    }

    /// Outside the pause: registers `vm`'s memory for copy-on-write, or
    /// (without userfaultfd) allocates the arena for the copy.
    fn prepare(&mut self, vm: &Vm) -> Result<(), CheckpointError> {
        let mem = vm.memory();
        if !self.copy_only && !self.cow.as_ref().is_some_and(|(m, _)| Arc::ptr_eq(m, mem)) {
            self.cow = None;
            match CowMemory::new(Arc::clone(mem)) {
                Ok(c) => self.cow = Some((Arc::clone(mem), c)),
                Err(e) => {
                    tracing::warn!(
                        error = %crate::error_chain(&e),
                        "checkpoint: no copy-on-write view of guest memory; checkpoints copy memory while the guest is paused"
                    );
                    self.copy_only = true;
                }
            }
        }
        if self.copy_only && self.arena.as_ref().is_none_or(|a| a.size() != mem.size()) {
            let t = Instant::now();
            let a = MemoryCopy::arena(mem.size())
                .map_err(|e| CheckpointError::Vm(StateError::Memory(e)))?;
            tracing::info!(mib = a.size() >> 20, elapsed = ?t.elapsed(), "checkpoint memory arena allocated");
            self.arena = Some(a);
        }
        Ok(())
    }

    /// During the pause: arms the view over all of memory (nothing writes
    /// guest memory: the vCPUs are paused), or copies memory.
    fn take_memory(&mut self, vm: &Vm) -> Result<Taken, CheckpointError> {
        if let Some((_, cow)) = &self.cow {
            match cow.arm_all() {
                Ok(v) => return Ok(Taken::View(v)),
                Err(e) => {
                    tracing::error!(
                        error = %crate::error_chain(&e),
                        "checkpoint: arming copy-on-write failed; this and later checkpoints copy memory while the guest is paused"
                    );
                    self.cow = None;
                    self.copy_only = true;
                }
            }
        }
        let mem = vm.memory();
        let arena = match self.arena.take() {
            Some(a) if a.size() == mem.size() => a,
            _ => MemoryCopy::arena(mem.size())
                .map_err(|e| CheckpointError::Vm(StateError::Memory(e)))?,
        };
        MemoryCopy::capture_into(mem, arena)
            .map(Taken::Copy)
            .map_err(|e| CheckpointError::Vm(StateError::Memory(e)))
    }

    /// Pauses the VM, saves its state, arms a copy-on-write view of its
    /// memory (or copies it, see [`Checkpointer`]), holds its disk,
    /// resumes it, then writes the checkpoint while the guest runs. The VM
    /// is resumed on errors too.
    ///
    /// # Errors
    ///
    /// [`CheckpointError::Vm`] when the VM cannot be paused or saved;
    /// [`CheckpointError::Write`]; [`CheckpointError::Cow`] when the view
    /// cannot be read.
    pub fn checkpoint(&mut self, vm: &Vm) -> Result<CheckpointReport, CheckpointError> {
        self.checkpoint_with(vm, &mut |_| {})
    }

    /// [`Self::checkpoint`] with `during_pause` run at the end of the pause
    /// (memory taken, disk held, vCPUs not yet resumed): tests compare the
    /// checkpoint against the guest as it was then.
    ///
    /// # Errors
    ///
    /// As [`Self::checkpoint`].
    pub fn checkpoint_with(
        &mut self,
        vm: &Vm,
        during_pause: &mut dyn FnMut(&Vm),
    ) -> Result<CheckpointReport, CheckpointError> {
        self.prepare(vm)?;
        let block = vm.bus().block();
        let t0 = Instant::now();
        vm.pause_all()
            .map_err(|e| CheckpointError::Vm(StateError::Vm(e)))?;
        let t_paused = Instant::now();
        let (mut take_time, mut hold_time) = (Duration::ZERO, Duration::ZERO);
        let captured =
            vm.save_state_timed()
                .map_err(CheckpointError::Vm)
                .and_then(|(snap, times)| {
                    let t = Instant::now();
                    let taken = self.take_memory(vm)?;
                    take_time = t.elapsed();
                    // The disk as of this pause (see the module docs).
                    let t = Instant::now();
                    let hold = block.hold_for_checkpoint().map_err(CheckpointError::Disk)?;
                    hold_time = t.elapsed();
                    during_pause(vm);
                    Ok((snap, times, taken, hold))
                });
        let t_resume = Instant::now();
        let resumed = vm.resume_all();
        let paused = t0.elapsed();
        let pausing = t_paused - t0;
        let resuming = t_resume.elapsed();
        resumed.map_err(|e| CheckpointError::Vm(StateError::Vm(e)))?;
        let (snap, times, taken, hold) = captured?;
        let seq = self.seq + 1;
        let (written, cow, arm, copy) = match taken {
            Taken::View(v) => {
                let w = write_with_disk(
                    &self.opts.dir,
                    seq,
                    &snap,
                    MemoryImage::View(&v),
                    times.total,
                    hold,
                );
                (w, Some(v.finish()), take_time, Duration::ZERO)
            }
            Taken::Copy(c) => {
                let w = write_with_disk(
                    &self.opts.dir,
                    seq,
                    &snap,
                    MemoryImage::Copy(&c),
                    times.total,
                    hold,
                );
                self.arena = Some(c.into_arena());
                (w, None, Duration::ZERO, take_time)
            }
        };
        let written = written?;
        self.seq = seq;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::info!(
            path = %written.path.display(),
            paused_ms = ms(paused),
            pause_ms = ms(pausing),
            save_us = times.total.as_micros() as u64,
            arm_ms = ms(arm),
            copy_ms = ms(copy),
            disk_hold_us = hold_time.as_micros() as u64,
            resume_ms = ms(resuming),
            write_ms = ms(written.total_time),
            memory_write_ms = ms(written.memory_time),
            data_pages = written.manifest.memory_data_pages,
            cow_faults = cow.as_ref().map(|c| c.faults),
            cow_pages_copied = cow.as_ref().map(|c| c.pages_copied),
            cow_peak_mib = cow.as_ref().map(|c| c.peak_copy_bytes as f64 / (1u64 << 20) as f64),
            cow_fault_median_us = cow.as_ref().map(|c| c.fault_median.as_secs_f64() * 1e6),
            cow_fault_max_us = cow.as_ref().map(|c| c.fault_max.as_secs_f64() * 1e6),
            disk_copy_ms = written.disk_time.map(ms),
            disk_data_bytes = written.manifest.disk_data_bytes,
            "checkpoint written"
        );
        Ok(CheckpointReport {
            written,
            paused,
            save: times.total,
            arm,
            copy,
            hold: hold_time,
            cow,
        })
    }
}

/// A [`supervise`] tick that writes checkpoints with `c`. A checkpoint
/// that cannot be written is logged as an error and the guest keeps
/// running (the previous checkpoint stays intact); a VM that cannot be
/// paused, saved or resumed ends the run.
pub fn tick(c: &mut Checkpointer) -> impl FnMut(&Vm) -> Result<(), VmmError> + '_ {
    move |vm| match c.poll(vm) {
        Ok(_) => Ok(()),
        Err(e @ CheckpointError::Vm(_)) => Err(e.into()),
        Err(e) => {
            tracing::error!(error = %crate::error_chain(&e), "checkpoint failed; the previous one stays intact");
            Ok(())
        }
    }
}

/// Boots the bundled guest with `opts` and runs it like [`super::run()`],
/// writing checkpoints with `checkpointer` (if any).
///
/// # Errors
///
/// As [`super::run()`].
pub fn run_with_checkpoints(
    opts: &RunOptions,
    stop: &AtomicBool,
    checkpointer: Option<&mut Checkpointer>,
) -> Result<RunSummary, VmmError> {
    let (vm, net) = super::run::boot_service(opts, None)?;
    match checkpointer {
        Some(c) => supervise(vm, net, opts, stop, &mut tick(c)),
        None => supervise(vm, net, opts, stop, &mut |_| Ok(())),
    }
}

/// Options of `simrep restore` beyond the checkpoint itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// Stop when no vCPU's progress counter moves for this long.
    pub watchdog: Option<Duration>,
    /// `kv` / `bank` guests: where the restored service listens (`None`:
    /// 0.0.0.0:7000).
    pub listen: Option<std::net::SocketAddr>,
    /// A checkpoint with a disk: the new file that receives a copy of its
    /// `disk.raw` and becomes the restored guest's disk (required then,
    /// refused otherwise; see [`restore_disk`]).
    pub disk: Option<PathBuf>,
}

/// `simrep restore`: loads the checkpoint in `dir`, restores it into a
/// fresh VM, resumes the guest and runs it like [`super::run()`] (writing
/// further checkpoints with `checkpointer`, which may use the same
/// directory).
///
/// # Errors
///
/// [`VmmError::Checkpoint`] for a missing or corrupt checkpoint (see
/// [`CheckpointError::is_bad_input`]) or a restore KVM refuses; then as
/// [`super::run()`].
pub fn restore_and_run(
    dir: &Path,
    ropts: &RestoreOptions,
    stop: &AtomicBool,
    checkpointer: Option<&mut Checkpointer>,
) -> Result<RunSummary, VmmError> {
    let t0 = Instant::now();
    let ckpt = load(dir)?;
    let disk = match (&ckpt.manifest.disk, &ropts.disk) {
        (Some(_), None) => {
            return Err(CheckpointError::DiskChoice {
                reason: format!(
                    "checkpoint {} holds a disk image: give --disk FILE (a new file that receives a copy of it)",
                    ckpt.path.display()
                ),
            }
            .into())
        }
        (None, Some(_)) => {
            return Err(CheckpointError::DiskChoice {
                reason: format!(
                    "checkpoint {} holds no disk image; restore it without --disk",
                    ckpt.path.display()
                ),
            }
            .into())
        }
        (None, None) => None,
        (Some(_), Some(target)) => {
            let t = Instant::now();
            let c = restore_disk(&ckpt, target)?;
            tracing::info!(
                path = %target.display(),
                mib = c.bytes >> 20,
                data_mib = c.data_bytes as f64 / (1u64 << 20) as f64,
                elapsed = ?t.elapsed(),
                "disk image restored"
            );
            Some(target.clone())
        }
    };
    let t_load = t0.elapsed();
    let (vm, times) = restore(&ckpt)?;
    if let Some(path) = &disk {
        let dev = Arc::new(super::block::BlockDevice::open(
            path,
            super::block::FlushPolicy::default(),
        )?);
        vm.bus().attach_block(Arc::clone(&dev));
        // Claims the `block` blob: capacity check, policy, epoch.
        vm.bus().register_device_state(dev)?;
    }
    let workload = ckpt.snapshot.boot_params().map(|bp| bp.workload);
    let net = if matches!(
        workload,
        Some(super::abi::workload::KV | super::abi::workload::BANK)
    ) {
        Some(attach_restored_net(&vm, ropts.listen)?)
    } else {
        None
    };
    let t_restore = t0.elapsed();
    vm.resume_all_and_wait()
        .map_err(|e| CheckpointError::Vm(StateError::Vm(e)))?;
    let unclaimed = vm.bus().unclaimed_device_states();
    if !unclaimed.is_empty() {
        tracing::warn!(devices = ?unclaimed, "saved state of devices this VM does not have was ignored");
    }
    tracing::info!(
        path = %ckpt.path.display(),
        sequence = ckpt.manifest.sequence,
        mem_mib = ckpt.manifest.mem_bytes >> 20,
        vcpus = ckpt.manifest.vcpus,
        load_state_ms = t_load.as_secs_f64() * 1e3,
        create_vm_ms = times.create.as_secs_f64() * 1e3,
        memory_ms = times.memory.as_secs_f64() * 1e3,
        kvm_state_ms = times.kvm_state.as_secs_f64() * 1e3,
        resume_ms = (t0.elapsed() - t_restore).as_secs_f64() * 1e3,
        total_ms = t0.elapsed().as_secs_f64() * 1e3,
        "guest restored and running"
    );
    let opts = RunOptions {
        mem_bytes: ckpt.manifest.mem_bytes,
        vcpus: ckpt.manifest.vcpus,
        watchdog: ropts.watchdog,
        ..Default::default()
    };
    match checkpointer {
        Some(c) => supervise(vm, net, &opts, stop, &mut tick(c)),
        None => supervise(vm, net, &opts, stop, &mut |_| Ok(())),
    }
}

/// Gives a restored `kv`/`bank` guest its network device back (its ring
/// positions come from the snapshot) and a listening service.
pub fn attach_restored_net(
    vm: &Vm,
    listen: Option<std::net::SocketAddr>,
) -> Result<super::net::NetService, VmmError> {
    use super::net::{ImmediateGate, NetDevice, NetError, NetService, OutputGate};
    let addr = listen.unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 7000)));
    let listener = std::net::TcpListener::bind(addr).map_err(|source| NetError::Listen {
        addr: addr.to_string(),
        source,
    })?;
    let dev = NetDevice::new(vm.bus().wakers().clone(), |d| {
        std::sync::Arc::new(ImmediateGate::new(d)) as std::sync::Arc<dyn OutputGate>
    });
    vm.bus().attach_net(dev.clone());
    vm.bus().register_device_state(dev.clone())?;
    let service = NetService::start(listener, dev)?;
    let addr = service.local_addr();
    tracing::info!(%addr, "net: listening on {addr}");
    Ok(service)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_crc_matches_hashing_zeros() {
        let z = ZeroCrc::new();
        for pages in [0u64, 1, 2, 3, 7, 64, 100] {
            let mut a = crc32fast::Hasher::new();
            a.update(b"x");
            let mut b = a.clone();
            z.extend(&mut a, pages);
            b.update(&vec![0u8; (pages * PAGE_SIZE) as usize]);
            assert_eq!(a.finalize(), b.finalize(), "{pages} pages");
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_ckpt_name(&ckpt_name(42)), Some(42));
        assert_eq!(parse_ckpt_name("ckpt-x"), None);
        assert_eq!(parse_ckpt_name("latest"), None);
    }

    fn manifest_for_tests(mem_bytes: u64, mem_crc: u32, disk: Option<FileEntry>) -> Manifest {
        Manifest {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            sequence: 1,
            created_unix_ms: 0,
            mem_bytes,
            vcpus: 1,
            state: FileEntry {
                file: STATE_FILE.into(),
                bytes: 0,
                crc32: 0,
            },
            memory: FileEntry {
                file: MEMORY_FILE.into(),
                bytes: mem_bytes,
                crc32: mem_crc,
            },
            memory_data_pages: 0,
            save_us: 0,
            write_ms: 0,
            disk,
            disk_data_bytes: None,
            disk_copy_ms: None,
        }
    }

    #[test]
    fn a_held_disk_is_copied_as_of_the_checkpoint_and_restores_to_new_files_only() {
        use super::super::block::{BlockDevice, FlushPolicy, SECTOR};
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("guest.img");
        File::create(&img).unwrap().set_len(1 << 20).unwrap();
        let dev = Arc::new(BlockDevice::open(&img, FlushPolicy::default()).unwrap());
        dev.write(3, &[0xaa; SECTOR]).unwrap();
        let hold = dev.hold_for_checkpoint().unwrap().unwrap();
        dev.write(3, &[0xbb; SECTOR]).unwrap();
        dev.write(100, &[0xcc; SECTOR]).unwrap();
        let ck = dir.path().join("ckpt");
        fs::create_dir(&ck).unwrap();
        let (copy, _) = write_disk(&ck.join(DISK_FILE), hold).unwrap();
        assert!(!dev.is_held(), "the hold ends with the copy");
        let mut expected = vec![0u8; 1 << 20];
        expected[3 * SECTOR..4 * SECTOR].fill(0xaa);
        assert_eq!(fs::read(ck.join(DISK_FILE)).unwrap(), expected);
        assert_eq!(copy.crc32, crc32fast::hash(&expected));
        let loaded = Loaded {
            path: ck.clone(),
            manifest: manifest_for_tests(
                4 << 20,
                0,
                Some(FileEntry {
                    file: DISK_FILE.into(),
                    bytes: copy.bytes,
                    crc32: copy.crc32,
                }),
            ),
            snapshot: crate::vmm::state::tests::sample_snapshot(1),
        };
        let target = dir.path().join("restored.img");
        restore_disk(&loaded, &target).unwrap();
        assert_eq!(fs::read(&target).unwrap(), expected);
        // An existing target is refused and left alone.
        assert!(matches!(
            restore_disk(&loaded, &target),
            Err(CheckpointError::DiskChoice { .. })
        ));
        assert!(matches!(
            restore_disk(&loaded, &img),
            Err(CheckpointError::DiskChoice { .. })
        ));
        // A corrupt image: refused, nothing left behind, the checkpoint untouched.
        let f = fs::OpenOptions::new()
            .write(true)
            .open(ck.join(DISK_FILE))
            .unwrap();
        f.write_all_at(&[0xab], 3 * SECTOR as u64 + 7).unwrap();
        let other = dir.path().join("other.img");
        let e = restore_disk(&loaded, &other).unwrap_err();
        assert!(matches!(e, CheckpointError::Corrupt { .. }), "{e}");
        assert!(e.is_bad_input());
        assert!(!other.exists());
        assert!(!dir.path().join("other.img.restoring").exists());
        // A checkpoint without a disk has nothing to restore.
        let no_disk = Loaded {
            manifest: manifest_for_tests(4 << 20, 0, None),
            ..loaded
        };
        assert!(matches!(
            restore_disk(&no_disk, &other),
            Err(CheckpointError::DiskChoice { .. })
        ));
    }

    #[test]
    fn memory_image_round_trips_sparse_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mem = GuestMemory::new(4 << 20).unwrap();
        mem.write(0x1234, b"hello").unwrap();
        mem.write((3 << 20) + 5, &[0xff; 9000]).unwrap();
        mem.write((4 << 20) - 1, &[7]).unwrap();
        let path = dir.path().join(MEMORY_FILE);
        let (crc, pages) = write_memory(
            &path,
            &MemoryImage::Copy(&MemoryCopy::capture(&mem).unwrap()),
        )
        .unwrap();
        assert_eq!(pages, 1 + 3 + 1);
        let mut all = vec![0u8; 4 << 20];
        mem.read(0, &mut all).unwrap();
        assert_eq!(crc, crc32fast::hash(&all));
        let ckpt = Loaded {
            path: dir.path().to_owned(),
            manifest: Manifest {
                format: FORMAT_NAME.into(),
                version: FORMAT_VERSION,
                sequence: 1,
                created_unix_ms: 0,
                mem_bytes: 4 << 20,
                vcpus: 1,
                state: FileEntry {
                    file: STATE_FILE.into(),
                    bytes: 0,
                    crc32: 0,
                },
                memory: FileEntry {
                    file: MEMORY_FILE.into(),
                    bytes: 4 << 20,
                    crc32: crc,
                },
                memory_data_pages: pages,
                save_us: 0,
                write_ms: 0,
                disk: None,
                disk_data_bytes: None,
                disk_copy_ms: None,
            },
            snapshot: crate::vmm::state::tests::sample_snapshot(1),
        };
        let fresh = GuestMemory::new(4 << 20).unwrap();
        load_memory(&ckpt, &fresh).unwrap();
        let mut back = vec![0u8; 4 << 20];
        fresh.read(0, &mut back).unwrap();
        assert!(back == all);
        // One flipped bit in the image is caught.
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xfe], (3 << 20) + 5).unwrap();
        let again = GuestMemory::new(4 << 20).unwrap();
        assert!(matches!(
            load_memory(&ckpt, &again),
            Err(CheckpointError::Corrupt { .. })
        ));
    }

    /// A writer thread rewrites pages (and zeroes some, and fills zero
    /// ones) while `memory.raw` is written from a copy-on-write view: the
    /// file, its CRC and its data-page count are those of memory as it was
    /// when the view was armed, and the file loads back to that image.
    #[test]
    fn the_memory_image_written_from_a_view_is_memory_at_the_arm() {
        const MEM: u64 = 16 << 20;
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(GuestMemory::new(MEM).unwrap());
        // Data in the first half of each 2 MiB chunk, zeros in the rest.
        let pages = MEM / PAGE_SIZE;
        for gfn in 0..pages {
            if gfn % 512 < 256 {
                mem.write(
                    gfn * PAGE_SIZE,
                    &[(gfn % 251) as u8 + 1; PAGE_SIZE as usize],
                )
                .unwrap();
            }
        }
        let cow = CowMemory::new(Arc::clone(&mem)).unwrap();
        let view = cow.arm_all().unwrap();
        let mut at_arm = vec![0u8; MEM as usize];
        mem.read(0, &mut at_arm).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (mem, stop) = (Arc::clone(&mem), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut rounds = 0u64;
                while !stop.load(Ordering::Relaxed) || rounds == 0 {
                    // Backwards, so that pages not yet written to the file
                    // change too.
                    for gfn in (0..pages).rev().step_by(3) {
                        let fill = match gfn % 4 {
                            0 => 0,
                            _ => 0xee ^ rounds as u8,
                        };
                        mem.write(gfn * PAGE_SIZE + 8, &[fill; 64]).unwrap();
                    }
                    rounds += 1;
                }
                rounds
            })
        };
        // Let the writer get going before the image is written.
        while cow.faults_total() < 100 {
            std::thread::yield_now();
        }
        let path = dir.path().join(MEMORY_FILE);
        let (crc, data_pages) = write_memory(&path, &MemoryImage::View(&view)).unwrap();
        stop.store(true, Ordering::Relaxed);
        let rounds = writer.join().unwrap();
        let stats = view.finish();
        assert!(
            stats.pages_copied > 0,
            "no page was copied on write: {stats:?}"
        );
        assert!(rounds > 0);
        let mut live = vec![0u8; MEM as usize];
        mem.read(0, &mut live).unwrap();
        assert!(live != at_arm, "the writer changed nothing");
        let file = fs::read(&path).unwrap();
        assert!(file == at_arm, "memory.raw differs from memory at the arm");
        assert_eq!(crc, crc32fast::hash(&at_arm));
        assert_eq!(data_pages, pages / 2);
        // Zero pages are holes.
        let allocated = fs::metadata(&path).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        assert!(allocated.unwrap() < MEM, "the image is not sparse");
        let mut manifest = manifest_for_tests(MEM, crc, None);
        manifest.memory_data_pages = data_pages;
        let loaded = Loaded {
            path: dir.path().to_owned(),
            manifest,
            snapshot: crate::vmm::state::tests::sample_snapshot(1),
        };
        let fresh = GuestMemory::new(MEM).unwrap();
        load_memory(&loaded, &fresh).unwrap();
        let mut back = vec![0u8; MEM as usize];
        fresh.read(0, &mut back).unwrap();
        assert!(back == at_arm);
    }
}
