//! The similarity codec and the baselines it is judged against.
//!
//! Pure code: no I/O, no unsafe, no dependency on the VMM, tokio or the
//! network, so it stays fast to test, fuzz and benchmark.
//!
//! # Model
//!
//! Memory is a dense array of 4 KiB *frames* numbered from 0 (a guest frame
//! number for a VM; a dense index assigned by the trace replay for a memory
//! trace). Each side holds an image:
//!
//! * the **backup** holds the last committed image `I(k-1)`;
//! * the **primary** runs epoch `k` and at its checkpoint knows the current
//!   image `I(k)` and which frames changed (the dirty set) or were dropped
//!   (now all-zero).
//!
//! An [`EpochEncoder`] turns `(I(k), dirty, dropped)` into bytes; the single
//! [`decode_epoch`] function turns those bytes plus `I(k-1)` back into the new
//! contents of the dirty frames. Every reference in an encoded epoch points
//! into `I(k-1)`: the decoder needs nothing but the previous committed image,
//! and decodes the *whole* epoch before anything is applied.
//!
//! An encoder sees `I(k)` only. Whatever it wants to know of `I(k-1)` for the
//! frames dirtied in epoch `k` it must have kept itself (the similarity
//! codec's cache of recently dirtied pages, XBZRLE's cache); the memory it
//! keeps for that is its [`EpochEncoder::reference_bytes`].
//!
//! # Codecs
//!
//! [`CodecSpec`] names a codec and its parameters (`"similarity"`,
//! `"similarity:area=256,stage=zstd"`, `"xbzrle:cache=64MiB"`, ...; see
//! [`spec`]) and builds its encoder. The similarity codec is described in
//! [`similarity`](self#the-similarity-codec) below; the baselines are raw
//! pages, lz4 per page, zstd over the epoch, and QEMU-style XBZRLE.
//!
//! ## The similarity codec
//!
//! Each dirty page is cut into areas (64..=2048 bytes, default 512). Each
//! area is sent as: zero; unchanged (equal to its own previous contents,
//! known exactly when the page is in the cache of recently dirtied pages,
//! else through [fingerprints](fingerprint) of its 256-byte blocks);
//! identical to another area of `I(k-1)`; the run-length encoded XOR
//! against the most similar such area (fewest differing bytes), found
//! through a content-addressable table keyed by the
//! [bit-density hash](hash); a patch of its own previous contents (changed
//! blocks only); sparse; or raw. A general-purpose second stage (lz4 by
//! default, zstd, none) then compresses each chunk. Chunks of 256 dirty
//! frames are encoded in parallel and decode independently. Reference
//! memory (tables, fingerprints, cache) defaults to 64 MiB per GiB of
//! image.
//!
//! **Fingerprints are probabilistic**: a changed block is taken as
//! unchanged with probability below 2^-60 per changed block (a keyed
//! universal hash; the contents cannot depend on the per-encoder random
//! key). `fp=off` gives exact comparisons only, at a large cost in size
//! when the cache cannot hold the dirty working set. The replication layer
//! should checksum the *decoded* pages of each epoch so that even this
//! event is detected.
//!
//! # Container format (version 1)
//!
//! One format for every codec; all integers little-endian.
//!
//! ```text
//! epoch  := header dropped[n_dropped] chunk[n_chunks]
//! header := "SRCE" version:u8=1 codec:u8 area_log2:u8 flags:u8
//!           n_frames:u32 n_dropped:u32 n_chunks:u32            (20 bytes)
//! dropped:= frame:u32                     strictly increasing, < max_frames
//! chunk  := stored_len:u32 raw_len:u32 frames:u32 control_len:u32
//!           encoding:u8 stored[stored_len]                     (17 + stored_len)
//! ```
//!
//! * `codec`: [`CodecId`](container::CodecId) (1 raw, 2 lz4, 3 zstd,
//!   4 xbzrle, 5 similarity; 0 invalid). `area_log2`: 6..=12 (12 = whole
//!   pages for the page-based baselines). `flags`: the configured second
//!   stage (0 none, 1 lz4, 2 zstd), informational.
//! * `encoding`: how the chunk payload is stored (0 as is, then
//!   `stored_len == raw_len`; 1 lz4 block; 2 zstd frame); decompression
//!   must give exactly `raw_len` bytes, at most 24 MiB
//!   ([`MAX_CHUNK_RAW`](container::MAX_CHUNK_RAW)). A chunk holds 1..=4096
//!   frames; the chunks' frames must add up to `n_frames`
//!   (<= `max_frames`), and nothing may follow the last chunk.
//! * payload (`raw_len` bytes): `varint frame`, then `frames - 1` varint
//!   deltas (>= 1, so the frames of the whole epoch are strictly
//!   increasing), then the literal stream, then the control stream (its
//!   last `control_len` bytes, `control_len <= raw_len`). Varints are
//!   unsigned LEB128.
//! * control stream: per frame, per area, one op byte
//!   ([`Op`](container::Op)) and its operands; literal bytes live in the
//!   literal stream:
//!
//! | op | operands | meaning |
//! |---|---|---|
//! | 0 zero | | all-zero area |
//! | 1 unchanged | | same area of the same frame in `I(k-1)` |
//! | 2 raw | `S` literal bytes | verbatim |
//! | 3 xor-self | runs | XOR against the same area of the same frame |
//! | 4 identical | zigzag varint delta | copy of the named area |
//! | 5 xor-ref | delta, runs | XOR against the named area |
//! | 6 identical-next | | copy of the predicted area |
//! | 7 xor-next | runs | XOR against the predicted area |
//! | 8 lz4 | varint n, n literal bytes | lz4 block decoding to exactly `S` bytes |
//! | 9 sparse | runs | runs against the all-zero area |
//! | 10 patch-self | runs | same area of the same frame, literal runs replaced by the literal bytes |
//!
//! A reference names the area index `frame * (4096 / S) + area` in
//! `I(k-1)`; it is coded as the difference to the *predicted* index (the
//! previous reference of the chunk plus one; -1 + 1 = 0 at the chunk
//! start). It must name a frame below `max_frames`; frames at or past
//! `reference.frame_count()` read as zero. Runs are described in [`rle`]:
//! alternating zero runs and literal runs of XOR bytes that must cover the
//! area exactly. Every stream must be consumed exactly.
//!
//! Decoding builds the whole epoch into fresh buffers ([`DecodedEpoch`]);
//! only [`DecodedEpoch::apply`] writes to the image.

#![forbid(unsafe_code)]

mod baselines;
mod cache;
pub mod container;
mod decode;
pub mod fingerprint;
pub mod hash;
pub mod rle;
mod similarity;
pub mod spec;
mod table;
#[cfg(test)]
mod tests;

pub use decode::{
    decode_epoch, decode_epoch_into, decode_epoch_parallel, DecodeError, DecodedEpoch,
};
pub use hash::bit_density_hash;
pub use spec::{
    CachePages, CodecSpec, HashThreshold, ParseSpecError, SecondStage, SimilarityConfig, FP_BLOCK,
};

/// Bytes in a page (frame).
pub const PAGE_SIZE: usize = 4096;

/// The contents of one frame.
pub type Page = [u8; PAGE_SIZE];

/// An all-zero page, what absent frames read as.
pub static ZERO_PAGE: Page = [0; PAGE_SIZE];

/// Read access to a memory image.
pub trait PageView: Sync {
    /// Number of frames; frames `0..frame_count()` exist.
    fn frame_count(&self) -> u32;
    /// The contents of `frame`. Frames at or past `frame_count()` read as
    /// [`ZERO_PAGE`].
    fn page(&self, frame: u32) -> &Page;
}

/// A memory image held in one contiguous buffer, growable.
#[derive(Clone, Default)]
pub struct Image {
    bytes: Vec<u8>,
}

impl Image {
    /// An image of `frames` all-zero frames.
    pub fn zeroed(frames: u32) -> Self {
        Self {
            bytes: vec![0; frames as usize * PAGE_SIZE],
        }
    }

    /// Grows the image with zero frames so that `frame` exists.
    pub fn ensure_frame(&mut self, frame: u32) {
        let need = (frame as usize + 1) * PAGE_SIZE;
        if self.bytes.len() < need {
            self.bytes.resize(need, 0);
        }
    }

    /// Mutable access to a frame, growing the image if needed.
    pub fn page_mut(&mut self, frame: u32) -> &mut Page {
        self.ensure_frame(frame);
        let at = frame as usize * PAGE_SIZE;
        let slice = &mut self.bytes[at..at + PAGE_SIZE];
        slice.try_into().expect("slice is exactly one page")
    }

    /// Replaces a frame's contents, growing the image if needed.
    pub fn set_page(&mut self, frame: u32, contents: &Page) {
        self.page_mut(frame).copy_from_slice(contents);
    }

    /// Sets a frame to all-zero (if it exists).
    pub fn zero_page(&mut self, frame: u32) {
        if frame < self.frame_count() {
            self.page_mut(frame).fill(0);
        }
    }

    /// Size of the image in bytes.
    pub fn len_bytes(&self) -> usize {
        self.bytes.len()
    }

    /// The whole image, frame after frame.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl PageView for Image {
    fn frame_count(&self) -> u32 {
        (self.bytes.len() / PAGE_SIZE) as u32
    }

    fn page(&self, frame: u32) -> &Page {
        let at = frame as usize * PAGE_SIZE;
        match self.bytes.get(at..at + PAGE_SIZE) {
            Some(slice) => slice.try_into().expect("slice is exactly one page"),
            None => &ZERO_PAGE,
        }
    }
}

/// What an encoder did with one epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EpochStats {
    /// Dirty frames encoded.
    pub pages: u64,
    /// Frames dropped (sent as zero).
    pub dropped: u64,
    /// Raw dirty bytes (`pages * PAGE_SIZE`).
    pub raw_bytes: u64,
    /// Bytes written to the output for this epoch.
    pub out_bytes: u64,
    /// Areas (or pages, for page-based codecs) by how they were encoded.
    pub kinds: KindCounts,
}

/// Counts of areas by encoding kind.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct KindCounts {
    /// All-zero areas.
    pub zero: u64,
    /// Areas identical to their own previous contents.
    pub unchanged: u64,
    /// Areas identical to another area of the reference image.
    pub identical: u64,
    /// XOR against the same address's previous contents.
    pub xor_self: u64,
    /// XOR against another area found through the content table.
    pub xor_other: u64,
    /// Areas sent raw (or compressed by a general-purpose compressor only).
    pub raw: u64,
}

impl std::ops::AddAssign<&KindCounts> for KindCounts {
    fn add_assign(&mut self, k: &KindCounts) {
        self.zero += k.zero;
        self.unchanged += k.unchanged;
        self.identical += k.identical;
        self.xor_self += k.xor_self;
        self.xor_other += k.xor_other;
        self.raw += k.raw;
    }
}

/// Encodes epochs for one codec. An encoder keeps whatever state its
/// codec needs between epochs (tables, caches).
pub trait EpochEncoder: Send {
    /// Short name for tables (`"similarity"`, `"zstd-1"`, ...).
    fn name(&self) -> String;

    /// Called once with the image the backup holds after initial sync.
    fn init(&mut self, image: &dyn PageView);

    /// Encodes one epoch and appends it to `out`. `dirty`: sorted, unique
    /// frames whose contents changed; `dropped`: sorted, unique frames now
    /// all-zero, disjoint from `dirty`.
    ///
    /// # Errors
    ///
    /// [`EncodeError`] when the frame sets are not sorted, unique and
    /// disjoint, a frame is too large, the encoder was not initialised, or
    /// the second stage failed. Nothing is appended and the encoder's
    /// state is unchanged when the frame sets are rejected.
    fn encode_epoch(
        &mut self,
        current: &dyn PageView,
        dirty: &[u32],
        dropped: &[u32],
        out: &mut Vec<u8>,
    ) -> Result<EpochStats, EncodeError>;

    /// Reference memory held: tables + cache, in bytes (paper Table I).
    fn reference_bytes(&self) -> usize;
}

/// Frames must be below this (area indices stay below `u32::MAX` at 64
/// areas per page): 256 GiB of memory.
pub const MAX_FRAMES: u32 = (1 << 26) - 1;

/// Why an epoch could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// `encode_epoch` was called before `init`.
    #[error("encoder not initialised: call init first")]
    NotInitialised,
    /// A frame list is not strictly increasing.
    #[error("{list} frames not strictly increasing at index {index} (frame {frame})")]
    NotSorted {
        /// `"dirty"` or `"dropped"`.
        list: &'static str,
        /// Position in the list.
        index: usize,
        /// The offending frame.
        frame: u32,
    },
    /// A frame is both dirty and dropped.
    #[error("frame {frame} is both dirty and dropped")]
    DirtyAndDropped {
        /// The frame.
        frame: u32,
    },
    /// A frame number is too large.
    #[error("frame {frame} is not below the limit {limit}")]
    FrameTooLarge {
        /// The frame.
        frame: u32,
        /// [`MAX_FRAMES`].
        limit: u32,
    },
    /// A chunk payload exceeds the container's size limit.
    #[error("chunk payload of {bytes} bytes exceeds the container limit")]
    ChunkTooLarge {
        /// Payload size.
        bytes: usize,
    },
    /// The zstd second stage failed.
    #[error("zstd compression failed")]
    Compress(#[source] std::io::Error),
}

/// Checks that `dirty` and `dropped` are strictly increasing, disjoint and
/// below [`MAX_FRAMES`].
pub(crate) fn check_sets(dirty: &[u32], dropped: &[u32]) -> Result<(), EncodeError> {
    for (list, frames) in [("dirty", dirty), ("dropped", dropped)] {
        for (index, w) in frames.windows(2).enumerate() {
            if w[1] <= w[0] {
                return Err(EncodeError::NotSorted {
                    list,
                    index: index + 1,
                    frame: w[1],
                });
            }
        }
        if let Some(&frame) = frames.last().filter(|&&f| f >= MAX_FRAMES) {
            return Err(EncodeError::FrameTooLarge {
                frame,
                limit: MAX_FRAMES,
            });
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < dirty.len() && j < dropped.len() {
        match dirty[i].cmp(&dropped[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                return Err(EncodeError::DirtyAndDropped { frame: dirty[i] })
            }
        }
    }
    Ok(())
}

/// A pool of `threads` threads for the encoders (each builds its own) and
/// [`decode_epoch_parallel`], or `None` for single-threaded work (also when
/// the pool cannot be created).
///
/// Thread `i` is pinned to the `i`-th CPU (round robin) of those the
/// process may run on (see the crate's `affinity` module): an epoch is a few
/// milliseconds of work after an idle gap, and unpinned, on this project's
/// machines, two threads encoded one after the other.
pub fn thread_pool(threads: usize) -> Option<rayon::ThreadPool> {
    if threads <= 1 {
        return None;
    }
    let cpus = crate::affinity::allowed_cpus();
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("simrep-codec-{i}"))
        .start_handler(move |i| {
            if let Some(&cpu) = cpus.get(i % cpus.len().max(1)) {
                crate::affinity::pin_current_thread(&[cpu]);
            }
        })
        .build()
        .ok()
}

/// Runs `f` on consecutive chunks of `frames` (in parallel on `pool` when
/// given), each writing its chunk record to the buffer it is handed;
/// the records end up in `out` in order, and the per-chunk results are
/// returned in order. Single-threaded, records go straight into `out`.
pub(crate) fn encode_chunks<T, F>(
    pool: Option<&rayon::ThreadPool>,
    frames: &[u32],
    per_chunk: usize,
    out: &mut Vec<u8>,
    f: F,
) -> Result<Vec<T>, EncodeError>
where
    T: Send,
    F: Fn(&[u32], &mut Vec<u8>) -> Result<T, EncodeError> + Sync,
{
    match pool {
        Some(pool) if frames.len() > per_chunk => {
            use rayon::prelude::*;
            let parts: Vec<(Vec<u8>, T)> = pool.install(|| {
                frames
                    .par_chunks(per_chunk)
                    .map(|c| {
                        let mut bytes = Vec::new();
                        f(c, &mut bytes).map(|t| (bytes, t))
                    })
                    .collect::<Result<_, _>>()
            })?;
            out.reserve(parts.iter().map(|p| p.0.len()).sum());
            Ok(parts
                .into_iter()
                .map(|(bytes, t)| {
                    out.extend_from_slice(&bytes);
                    t
                })
                .collect())
        }
        _ => frames.chunks(per_chunk).map(|c| f(c, out)).collect(),
    }
}

/// Number of chunks [`encode_chunks`] makes.
pub(crate) fn chunk_count(frames: usize, per_chunk: usize) -> u32 {
    frames.div_ceil(per_chunk.max(1)) as u32
}

thread_local! {
    /// Per-thread chunk writer, reused across chunks and epochs.
    pub(crate) static WRITER: std::cell::RefCell<container::ChunkWriter> =
        std::cell::RefCell::new(container::ChunkWriter::default());
}
