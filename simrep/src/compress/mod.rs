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

#![forbid(unsafe_code)]

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
#[derive(Clone, Debug, Default, PartialEq, Eq)]
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

// ---------------------------------------------------------------------------
// CONTRACT (to be implemented by the codec work; signatures are fixed because
// `trace::analysis` and later the replication path build on them):
//
// /// Which codec, with its parameters. Parsed from the CLI as e.g.
// /// "similarity", "similarity:area=256,hash=fraction80,stage=zstd",
// /// "raw", "lz4", "zstd", "xbzrle:cache=64MiB". `Display` prints the
// /// canonical form that `FromStr` reads back.
// pub enum CodecSpec { Raw, Lz4Page, ZstdEpoch { level: i32 }, Xbzrle { cache_bytes: usize },
//                      Similarity(SimilarityConfig) }
// impl FromStr for CodecSpec; impl Display for CodecSpec;
// impl CodecSpec { pub fn build(&self, threads: usize) -> Box<dyn EpochEncoder>; }
//
// pub struct SimilarityConfig { pub area_size: usize /* 64..=2048, power of 2 */,
//     pub hash: HashThreshold /* Median | Fraction(percent) */, pub table_bits: u8 /* 18 */,
//     pub bucket_candidates: usize /* 8 */, pub cache_pages: CachePages, pub second_stage: SecondStage, ... }
// impl Default for SimilarityConfig  // the measured default
//
// pub trait EpochEncoder: Send {
//     /// Short name for tables ("similarity", "zstd-1", ...).
//     fn name(&self) -> String;
//     /// Called once with the image the backup holds after initial sync.
//     fn init(&mut self, image: &dyn PageView);
//     /// Encodes one epoch and appends it to `out`. `dirty`: sorted, unique
//     /// frames whose contents changed; `dropped`: sorted frames now all-zero.
//     fn encode_epoch(&mut self, current: &dyn PageView, dirty: &[u32], dropped: &[u32],
//                     out: &mut Vec<u8>) -> Result<EpochStats, EncodeError>;
//     /// Reference memory held: tables + cache, in bytes (paper Table I).
//     fn reference_bytes(&self) -> usize;
// }
//
// /// Decodes one encoded epoch (any codec) against the previous committed
// /// image. `max_frames` bounds the frame numbers the stream may name.
// /// Never panics; any malformed input is a typed error.
// pub fn decode_epoch(reference: &dyn PageView, input: &[u8], max_frames: u32)
//     -> Result<DecodedEpoch, DecodeError>;
// pub struct DecodedEpoch { pub frames: Vec<u32>, pub data: Vec<u8>, pub dropped: Vec<u32> }
// impl DecodedEpoch { pub fn apply(&self, image: &mut Image); pub fn page(&self, i: usize) -> &Page; }
// ---------------------------------------------------------------------------
