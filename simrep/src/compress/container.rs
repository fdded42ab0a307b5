//! The container shared by every codec: epoch header, chunks, area
//! operations, second stage. The format is described in the
//! [module docs](super).

use super::rle::{put_varint, put_varint64, zigzag};
use super::{EncodeError, SecondStage, PAGE_SIZE};

/// Magic at the start of every encoded epoch.
pub const MAGIC: [u8; 4] = *b"SRCE";
/// Container version.
pub const VERSION: u8 = 1;
/// Size of the epoch header in bytes.
pub const HEADER_LEN: usize = 20;
/// Size of a chunk header in bytes.
pub const CHUNK_HEADER_LEN: usize = 17;
/// Most frames in one chunk.
pub const MAX_CHUNK_FRAMES: u32 = 4096;
/// Largest decompressed chunk payload (16 MiB plus room for control bytes).
pub const MAX_CHUNK_RAW: u32 = MAX_CHUNK_FRAMES * (PAGE_SIZE as u32) * 3 / 2;
/// Frames per chunk used by the area-based encoders.
pub const CHUNK_FRAMES: usize = 256;

/// Which codec produced an epoch (informational for the decoder, which
/// handles every operation of every codec; 0 is invalid).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodecId {
    /// Never written.
    Invalid = 0,
    /// Pages verbatim.
    Raw = 1,
    /// lz4 per page.
    Lz4Page = 2,
    /// zstd over the epoch.
    ZstdEpoch = 3,
    /// XBZRLE.
    Xbzrle = 4,
    /// The similarity codec.
    Similarity = 5,
}

impl CodecId {
    /// The id for a header byte, if valid.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Raw,
            2 => Self::Lz4Page,
            3 => Self::ZstdEpoch,
            4 => Self::Xbzrle,
            5 => Self::Similarity,
            _ => return None,
        })
    }
}

/// Per-chunk payload encoding (the second stage actually applied).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkEncoding {
    /// Payload stored as is.
    Stored = 0,
    /// lz4_flex block.
    Lz4 = 1,
    /// zstd frame.
    Zstd = 2,
}

/// Area operation codes (first byte of each area in the control stream).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// All-zero area.
    Zero = 0,
    /// Identical to the same area of the same frame in the reference.
    Unchanged = 1,
    /// `S` literal bytes.
    Raw = 2,
    /// RLE XOR against the same area of the same frame.
    XorSelf = 3,
    /// Identical to the area named by a reference (zigzag delta varint).
    Identical = 4,
    /// RLE XOR against the area named by a reference (zigzag delta varint).
    XorRef = 5,
    /// Identical to the predicted area (previous reference + 1).
    IdenticalNext = 6,
    /// RLE XOR against the predicted area.
    XorNext = 7,
    /// lz4 block of the area: varint length, then that many literal bytes.
    Lz4 = 8,
    /// Runs against the all-zero area (a sparse area's non-zero bytes).
    Sparse = 9,
    /// The same area of the same frame with its literal runs replaced by
    /// the literal bytes (new bytes, not XOR).
    PatchSelf = 10,
}

impl Op {
    /// The op for a control byte, if valid.
    #[inline]
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Zero,
            1 => Self::Unchanged,
            2 => Self::Raw,
            3 => Self::XorSelf,
            4 => Self::Identical,
            5 => Self::XorRef,
            6 => Self::IdenticalNext,
            7 => Self::XorNext,
            8 => Self::Lz4,
            9 => Self::Sparse,
            10 => Self::PatchSelf,
            _ => return None,
        })
    }
}

/// Writes one epoch header.
pub(crate) fn write_header(
    out: &mut Vec<u8>,
    codec: CodecId,
    area_log2: u8,
    stage: SecondStage,
    frames: u32,
    dropped: &[u32],
    chunks: u32,
) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(codec as u8);
    out.push(area_log2);
    out.push(stage_flag(stage));
    out.extend_from_slice(&frames.to_le_bytes());
    out.extend_from_slice(&(dropped.len() as u32).to_le_bytes());
    out.extend_from_slice(&chunks.to_le_bytes());
    for d in dropped {
        out.extend_from_slice(&d.to_le_bytes());
    }
}

/// The flags byte for a configured second stage.
pub(crate) fn stage_flag(stage: SecondStage) -> u8 {
    match stage {
        SecondStage::None => 0,
        SecondStage::Lz4 => 1,
        SecondStage::Zstd { .. } => 2,
    }
}

/// A position in a [`ChunkWriter`] to roll back to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mark {
    control: usize,
    literals: usize,
    last_ref: u64,
}

/// Accumulates one chunk. The payload buffer starts with the frame list
/// and then receives the literal stream directly; the control stream is
/// kept apart and appended at the end (its length goes into the chunk
/// header), so literals are never copied before the second stage.
#[derive(Debug)]
pub(crate) struct ChunkWriter {
    frames: u32,
    pub(crate) control: Vec<u8>,
    /// Frame list, then literals.
    pub(crate) literals: Vec<u8>,
    /// Last reference written (for delta coding), as in the decoder.
    last_ref: u64,
    /// Length of the control stream, once [`seal`](Self::seal)ed.
    control_len: u32,
}

impl Default for ChunkWriter {
    fn default() -> Self {
        Self {
            frames: 0,
            control: Vec::new(),
            literals: Vec::new(),
            last_ref: u64::MAX, // predicted = last + 1 = 0
            control_len: 0,
        }
    }
}

impl ChunkWriter {
    /// Starts a chunk for `frames` (strictly increasing), reusing buffers.
    pub(crate) fn start(&mut self, frames: &[u32]) {
        self.control.clear();
        self.literals.clear();
        self.frames = frames.len() as u32;
        self.last_ref = u64::MAX;
        let mut prev = 0u32;
        for (i, &f) in frames.iter().enumerate() {
            put_varint(&mut self.literals, if i == 0 { f } else { f - prev });
            prev = f;
        }
    }

    /// Writes an area op.
    #[inline]
    pub(crate) fn op(&mut self, op: Op) {
        self.control.push(op as u8);
    }

    /// Writes an op that names a reference area, choosing the short "next"
    /// form when the reference is the predicted one.
    #[inline]
    pub(crate) fn op_ref(&mut self, identical: bool, reference: u32) {
        let predicted = self.last_ref.wrapping_add(1);
        if u64::from(reference) == predicted {
            self.op(if identical {
                Op::IdenticalNext
            } else {
                Op::XorNext
            });
        } else {
            self.op(if identical { Op::Identical } else { Op::XorRef });
            let delta = i64::from(reference) - predicted as i64;
            put_varint64(&mut self.control, zigzag(delta));
        }
        self.last_ref = u64::from(reference);
    }

    /// Remembers the current end of the streams.
    #[inline]
    pub(crate) fn mark(&self) -> Mark {
        Mark {
            control: self.control.len(),
            literals: self.literals.len(),
            last_ref: self.last_ref,
        }
    }

    /// Drops whatever was written since `mark`.
    #[inline]
    pub(crate) fn rollback(&mut self, mark: Mark) {
        self.control.truncate(mark.control);
        self.literals.truncate(mark.literals);
        self.last_ref = mark.last_ref;
    }

    /// Builds the chunk record (header + payload, second stage applied)
    /// and appends it to `out`. The writer must be restarted afterwards.
    pub(crate) fn finish(
        &mut self,
        stage: SecondStage,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        self.seal()?;
        self.write_sealed(stage, out)
    }

    /// First half of [`finish`](Self::finish): appends the control stream
    /// to the literals, making the chunk's payload, and checks its size.
    /// Nothing may be written to the chunk afterwards.
    pub(crate) fn seal(&mut self) -> Result<(), EncodeError> {
        self.control_len = self.control.len() as u32;
        self.literals.extend_from_slice(&self.control);
        self.control.clear();
        match u32::try_from(self.literals.len()) {
            Ok(l) if l <= MAX_CHUNK_RAW => Ok(()),
            _ => Err(EncodeError::ChunkTooLarge {
                bytes: self.literals.len(),
            }),
        }
    }

    /// Second half of [`finish`](Self::finish): appends the chunk record of
    /// the sealed payload (header, then the payload through the second
    /// stage, or stored when that does not make it smaller) to `out`.
    pub(crate) fn write_sealed(
        &self,
        stage: SecondStage,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let payload = &self.literals;
        let raw_len = payload.len() as u32; // checked by `seal`
        let header_at = out.len();
        out.extend_from_slice(&[0; CHUNK_HEADER_LEN]);
        let body_at = out.len();
        let encoding = match stage {
            SecondStage::None => ChunkEncoding::Stored,
            SecondStage::Lz4 => LZ4_OUT.with(|scratch| {
                // Compressed into a scratch buffer that keeps its size, so
                // that the worst-case bound is not zeroed for every chunk.
                let mut scratch = scratch.borrow_mut();
                let max = lz4_flex::block::get_maximum_output_size(payload.len());
                if scratch.len() < max {
                    scratch.resize(max, 0);
                }
                let n = lz4_flex::block::compress_into(payload, &mut scratch[..max])
                    .expect("the buffer holds the worst case");
                if n < payload.len() {
                    out.extend_from_slice(&scratch[..n]);
                    ChunkEncoding::Lz4
                } else {
                    ChunkEncoding::Stored
                }
            }),
            SecondStage::Zstd { level } => {
                out.resize(body_at + zstd::zstd_safe::compress_bound(payload.len()), 0);
                match zstd_compress(payload, level, &mut out[body_at..])? {
                    n if n < payload.len() => {
                        out.truncate(body_at + n);
                        ChunkEncoding::Zstd
                    }
                    _ => {
                        out.truncate(body_at);
                        ChunkEncoding::Stored
                    }
                }
            }
        };
        if encoding == ChunkEncoding::Stored {
            out.extend_from_slice(payload);
        }
        let stored = (out.len() - body_at) as u32;
        let h = &mut out[header_at..body_at];
        h[0..4].copy_from_slice(&stored.to_le_bytes());
        h[4..8].copy_from_slice(&raw_len.to_le_bytes());
        h[8..12].copy_from_slice(&self.frames.to_le_bytes());
        h[12..16].copy_from_slice(&self.control_len.to_le_bytes());
        h[16] = encoding as u8;
        Ok(())
    }
}

thread_local! {
    /// Per-thread lz4 output buffer (see [`ChunkWriter::write_sealed`]).
    static LZ4_OUT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static ZSTD_CCTX: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd-compresses `data` into `dest` with a per-thread reusable context;
/// returns the compressed size.
fn zstd_compress(data: &[u8], level: i32, dest: &mut [u8]) -> Result<usize, EncodeError> {
    ZSTD_CCTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().map(|(l, _)| *l) != Some(level) {
            let c = zstd::bulk::Compressor::new(level).map_err(EncodeError::Compress)?;
            *slot = Some((level, c));
        }
        match slot.as_mut() {
            Some((_, c)) => c
                .compress_to_buffer(data, dest)
                .map_err(EncodeError::Compress),
            None => Err(EncodeError::Compress(std::io::Error::other(
                "no zstd context",
            ))),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for v in 0..=255u8 {
            if let Some(id) = CodecId::from_u8(v) {
                assert_eq!(id as u8, v);
                assert_ne!(id, CodecId::Invalid);
            }
            if let Some(op) = Op::from_u8(v) {
                assert_eq!(op as u8, v);
            }
        }
        assert_eq!(CodecId::from_u8(0), None);
    }

    #[test]
    fn ref_ops_use_next_form() {
        let mut w = ChunkWriter::default();
        w.start(&[]);
        w.op_ref(true, 0);
        w.op_ref(false, 1);
        w.op_ref(true, 10);
        assert_eq!(
            w.control,
            vec![
                Op::IdenticalNext as u8,
                Op::XorNext as u8,
                Op::Identical as u8,
                16
            ]
        );
    }

    #[test]
    fn finish_falls_back_to_stored() {
        let mut w = ChunkWriter::default();
        w.start(&[3]);
        w.op(Op::Zero);
        let mut out = Vec::new();
        w.finish(SecondStage::Lz4, &mut out).unwrap();
        assert_eq!(out[16], ChunkEncoding::Stored as u8);
        assert_eq!(&out[12..16], &1u32.to_le_bytes());
        assert_eq!(&out[CHUNK_HEADER_LEN..], &[3, 0]);
    }
}
