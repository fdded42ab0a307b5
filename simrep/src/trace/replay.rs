//! Replays a trace into a dense memory image, one epoch at a time: what
//! `simrep analyze` feeds to the codecs.
//!
//! Trace keys (`slot << 48 | address`, sparse) are mapped to dense frames in
//! first-seen order. After each complete epoch the [`Image`] holds the memory
//! at the end of that epoch and an [`EpochDelta`] names the frames that
//! changed (`dirty`) and those that disappeared (`dropped`, now zero).

#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::compress::{Image, PageView, PAGE_SIZE};

use super::format::{EpochEnd, Record, Region, TraceError, TraceHeader, TraceReader};

/// What changed in one epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochDelta {
    /// The epoch number.
    pub epoch: u32,
    /// Sorted, unique frames with a PAGE record in the epoch (for epoch 0,
    /// every page read: the full image).
    pub dirty: Vec<u32>,
    /// Sorted, unique frames dropped in the epoch (now all-zero).
    pub dropped: Vec<u32>,
    /// When SIGSTOP was sent, ns since capture start.
    pub t_stop_ns: u64,
    /// How long the target ran since the previous SIGCONT.
    pub run_ns: u64,
    /// SIGSTOP sent → SIGCONT sent, in ns.
    pub stop_ns: u64,
    /// Time the capture spent in `process_vm_readv`, in ns.
    pub read_ns: u64,
    /// Time the capture spent comparing and emitting, in ns.
    pub compare_ns: u64,
    /// Pages the capture read this epoch.
    pub tracked_pages: u64,
    /// The tracked mappings (the current list, whether or not it changed).
    pub regions: Vec<Region>,
}

/// A traced process, from a PROC record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TracedProcess {
    /// Its slot (the high 16 bits of its keys).
    pub slot: u32,
    /// Its pid.
    pub pid: u32,
    /// Its name.
    pub comm: String,
}

type KeyMap = super::keymap::KeyMap<u32>;

/// Keys to dense frames, with per-frame epoch marks.
#[derive(Default)]
struct FrameMap {
    frames: KeyMap,
    keys: Vec<u64>,
    /// Per frame: `seq` of the last epoch whose `dirty` holds it.
    dirty_mark: Vec<u32>,
    /// Per frame: `seq` of the last epoch that saved its old contents.
    undo_mark: Vec<u32>,
}

impl FrameMap {
    /// The frame of `key`, assigning the next one (and growing the image)
    /// on first sight.
    fn frame_for(&mut self, key: u64, image: &mut Image) -> u32 {
        let next = self.keys.len() as u32;
        let frame = *self.frames.entry(key).or_insert(next);
        if frame == next {
            self.keys.push(key);
            self.dirty_mark.push(0);
            self.undo_mark.push(0);
            image.ensure_frame(frame);
        }
        frame
    }
}

/// Old contents of the frames changed by the epoch being read.
#[derive(Default)]
struct Undo {
    frames: Vec<u32>,
    data: Vec<u8>,
    /// Frames from this one on were created in the epoch: nothing to save,
    /// they go back to zero.
    first_new: u32,
}

impl Undo {
    /// Saves the frame's contents before its first change in epoch `seq`.
    fn save(&mut self, frame: u32, seq: u32, map: &mut FrameMap, image: &Image) {
        let f = frame as usize;
        if frame < self.first_new && map.undo_mark[f] != seq {
            map.undo_mark[f] = seq;
            self.frames.push(frame);
            self.data.extend_from_slice(image.page(frame));
        }
    }

    fn clear(&mut self) {
        self.frames.clear();
        self.data.clear();
        self.first_new = u32::MAX;
    }
}

/// Replays a trace epoch by epoch into a dense [`Image`].
pub struct Replay<R: Read> {
    reader: TraceReader<R>,
    image: Image,
    map: FrameMap,
    undo: Undo,
    regions: Vec<Region>,
    procs: Vec<TracedProcess>,
    /// Epochs started, counting from 1 (0 never marks a frame).
    seq: u32,
    finished: bool,
}

impl Replay<BufReader<File>> {
    /// Opens a trace file.
    ///
    /// # Errors
    /// The file cannot be opened; its header is invalid.
    pub fn open(path: &Path) -> Result<Self, TraceError> {
        let file = File::open(path).map_err(|source| TraceError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(BufReader::with_capacity(1 << 20, file))
    }
}

impl<R: Read> Replay<R> {
    /// Reads the header from `reader` (pass a buffered reader).
    ///
    /// # Errors
    /// An invalid header.
    pub fn new(reader: R) -> Result<Self, TraceError> {
        Ok(Self {
            reader: TraceReader::new(reader)?,
            image: Image::default(),
            map: FrameMap::default(),
            undo: Undo::default(),
            regions: Vec::new(),
            procs: Vec::new(),
            seq: 0,
            finished: false,
        })
    }

    /// The trace header.
    pub fn header(&self) -> &TraceHeader {
        self.reader.header()
    }

    /// Advances to the next complete epoch (EPOCH … EPOCH_END). After
    /// `Ok(Some(d))`, [`image`](Self::image) holds memory at the end of that
    /// epoch.
    ///
    /// `Ok(None)` at END or at a clean end of file. A final epoch cut short
    /// (the capture was killed) is dropped with a warning and its changes
    /// are undone, so the image stays that of the last complete epoch
    /// (frames first seen in the dropped epoch remain, all-zero).
    ///
    /// # Errors
    /// Malformed input (see [`TraceError`]).
    pub fn next_epoch(&mut self) -> Result<Option<EpochDelta>, TraceError> {
        if self.finished {
            return Ok(None);
        }
        match self.read_epoch() {
            Ok(r) => {
                if r.is_none() {
                    self.finished = true;
                }
                Ok(r)
            }
            Err(e @ (TraceError::Truncated { .. } | TraceError::UnfinishedEpoch { .. })) => {
                self.finished = true;
                let epoch = self.reader.current_epoch();
                self.rollback();
                tracing::warn!(
                    ?epoch,
                    complete_epochs = self.reader.epochs_done(),
                    error = %e,
                    "trace cut short; the unfinished part is dropped"
                );
                Ok(None)
            }
            Err(e) => {
                self.finished = true;
                Err(e)
            }
        }
    }

    /// The memory image at the end of the last epoch returned.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// The trace key of `frame`; `u64::MAX` if there is no such frame.
    pub fn key_of(&self, frame: u32) -> u64 {
        self.try_key_of(frame).unwrap_or(u64::MAX)
    }

    /// The trace key of `frame`, if it exists.
    pub fn try_key_of(&self, frame: u32) -> Option<u64> {
        self.map.keys.get(frame as usize).copied()
    }

    /// The frame of a trace key, if it was seen.
    pub fn frame_of(&self, key: u64) -> Option<u32> {
        self.map.frames.get(&key).copied()
    }

    /// Number of frames assigned so far.
    pub fn frame_count(&self) -> u32 {
        self.map.keys.len() as u32
    }

    /// Bytes read from the file so far, for a progress bar.
    pub fn compressed_bytes_read(&self) -> u64 {
        self.reader.compressed_bytes_read()
    }

    /// The tracked mappings as of the last epoch returned.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The traced processes seen so far (PROC records).
    pub fn processes(&self) -> &[TracedProcess] {
        &self.procs
    }

    /// Undoes the changes of the unfinished epoch.
    fn rollback(&mut self) {
        for frame in self.undo.first_new..self.frame_count() {
            self.image.zero_page(frame);
        }
        for (i, &frame) in self.undo.frames.iter().enumerate() {
            let old = &self.undo.data[i * PAGE_SIZE..(i + 1) * PAGE_SIZE];
            self.image.page_mut(frame).copy_from_slice(old);
        }
        self.undo.clear();
    }

    fn read_epoch(&mut self) -> Result<Option<EpochDelta>, TraceError> {
        let mut delta = EpochDelta::default();
        let mut regions: Option<Vec<Region>> = None;
        let mut end: Option<EpochEnd> = None;
        self.undo.clear();
        self.undo.first_new = self.frame_count();
        while end.is_none() {
            let Some(rec) = self.reader.next_record()? else {
                return Ok(None);
            };
            match rec {
                Record::Proc { slot, pid, comm } => {
                    let p = TracedProcess {
                        slot,
                        pid,
                        comm: comm.to_owned(),
                    };
                    match self.procs.iter_mut().find(|q| q.slot == slot) {
                        Some(q) => *q = p,
                        None => self.procs.push(p),
                    }
                }
                Record::Epoch {
                    epoch,
                    t_stop_ns,
                    run_ns,
                } => {
                    self.seq = self.seq.wrapping_add(1).max(1);
                    self.undo.first_new = self.frame_count();
                    delta.epoch = epoch;
                    delta.t_stop_ns = t_stop_ns;
                    delta.run_ns = run_ns;
                }
                Record::Regions(r) => regions = Some(r.to_vec()),
                Record::Page { key, data } => {
                    let frame = self.map.frame_for(key, &mut self.image);
                    let f = frame as usize;
                    self.undo.save(frame, self.seq, &mut self.map, &self.image);
                    if self.map.dirty_mark[f] != self.seq {
                        self.map.dirty_mark[f] = self.seq;
                        delta.dirty.push(frame);
                    }
                    self.image.set_page(frame, data);
                }
                Record::Drop { key } => {
                    if let Some(&frame) = self.map.frames.get(&key) {
                        self.undo.save(frame, self.seq, &mut self.map, &self.image);
                        self.image.zero_page(frame);
                        delta.dropped.push(frame);
                    }
                }
                Record::EpochEnd(e) => end = Some(e),
                Record::End { .. } => return Ok(None),
            }
        }
        let Some(e) = end else {
            return Ok(None);
        };
        delta.stop_ns = e.stop_ns;
        delta.read_ns = e.read_ns;
        delta.compare_ns = e.compare_ns;
        delta.tracked_pages = e.tracked_pages;
        if let Some(r) = regions {
            self.regions = r;
        }
        delta.regions = self.regions.clone();
        delta.dirty.sort_unstable();
        delta.dropped.sort_unstable();
        delta.dropped.dedup();
        if !delta.dropped.is_empty() {
            let dropped = &delta.dropped;
            delta.dirty.retain(|f| dropped.binary_search(f).is_err());
        }
        self.undo.clear();
        Ok(Some(delta))
    }
}

#[cfg(test)]
mod tests;
