//! The one decoder for every codec: [`decode_epoch`].

use super::container::{
    ChunkEncoding, CodecId, Op, CHUNK_HEADER_LEN, HEADER_LEN, MAGIC, MAX_CHUNK_FRAMES,
    MAX_CHUNK_RAW, VERSION,
};
use super::rle::{rle_apply, rle_patch, unzigzag, Reader, RleError};
use super::{Image, Page, PageView, PAGE_SIZE};

/// The decoded contents of one epoch, not yet applied.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecodedEpoch {
    /// Dirty frames, strictly increasing.
    pub frames: Vec<u32>,
    /// Their new contents, `PAGE_SIZE` bytes per frame in `frames` order.
    pub data: Vec<u8>,
    /// Frames that are now all-zero, strictly increasing, disjoint from
    /// `frames`.
    pub dropped: Vec<u32>,
}

impl DecodedEpoch {
    /// Writes the epoch into `image`: dirty frames get their new contents
    /// (growing the image as needed), dropped frames are zeroed.
    pub fn apply(&self, image: &mut Image) {
        for (i, &f) in self.frames.iter().enumerate() {
            image.set_page(f, self.page(i));
        }
        for &f in &self.dropped {
            image.zero_page(f);
        }
    }

    /// The new contents of `self.frames[i]`.
    ///
    /// # Panics
    ///
    /// If `i >= self.frames.len()`.
    pub fn page(&self, i: usize) -> &Page {
        let at = i * PAGE_SIZE;
        match self.data.get(at..at + PAGE_SIZE).map(<&Page>::try_from) {
            Some(Ok(p)) => p,
            _ => panic!("page index {i} out of range ({} frames)", self.frames.len()),
        }
    }
}

/// Why an encoded epoch could not be decoded. Offsets are byte offsets in
/// the input for header fields, and in the chunk's control stream for
/// area operations.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The input ended inside the epoch header, the dropped list or a chunk
    /// header.
    #[error("input truncated reading {what} at offset {offset}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Input offset.
        offset: usize,
    },
    /// The input does not start with the container magic `SRCE`.
    #[error("not an encoded epoch (bad magic)")]
    BadMagic,
    /// The container version is not one this decoder knows.
    #[error("unsupported container version {0}")]
    UnsupportedVersion(u8),
    /// The codec id byte is not a known codec.
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    /// The area size (log2) is outside 6..=12.
    #[error("invalid area size 2^{0}")]
    BadAreaSize(u8),
    /// The header flags have unknown bits set.
    #[error("unknown header flags {0:#04x}")]
    UnknownFlags(u8),
    /// A count in the header exceeds its limit.
    #[error("{what} count {count} exceeds the limit {limit}")]
    TooMany {
        /// Which count.
        what: &'static str,
        /// The count found.
        count: u64,
        /// The limit.
        limit: u64,
    },
    /// A frame number (dirty, dropped or referenced) is not below
    /// `max_frames`.
    #[error("frame {frame} out of range (max_frames {max_frames}) in {place}")]
    FrameOutOfRange {
        /// Where the frame was named.
        place: &'static str,
        /// The frame number.
        frame: u64,
        /// The decoder's limit.
        max_frames: u32,
    },
    /// Dirty frames are not strictly increasing (duplicate or unsorted).
    #[error("dirty frame {frame} in chunk {chunk} is not above the previous one")]
    FrameOrder {
        /// Chunk index.
        chunk: u32,
        /// The offending frame.
        frame: u32,
    },
    /// Dropped frames are not strictly increasing.
    #[error("dropped frame {frame} is not above the previous one")]
    DroppedOrder {
        /// The offending frame.
        frame: u32,
    },
    /// A frame is both dirty and dropped.
    #[error("frame {frame} is both dirty and dropped")]
    DirtyAndDropped {
        /// The frame.
        frame: u32,
    },
    /// A chunk header is invalid.
    #[error("chunk {chunk}: {reason}")]
    BadChunkHeader {
        /// Chunk index.
        chunk: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The chunks do not hold the number of frames the header declares.
    #[error("header declares {declared} frames, chunks hold {found}")]
    FrameCountMismatch {
        /// Frames in the epoch header.
        declared: u32,
        /// Frames in the chunks.
        found: u64,
    },
    /// lz4 decompression of a chunk failed.
    #[error("chunk {chunk}: lz4 decompression failed")]
    Lz4 {
        /// Chunk index.
        chunk: u32,
        /// The lz4 error.
        #[source]
        source: lz4_flex::block::DecompressError,
    },
    /// zstd decompression of a chunk failed.
    #[error("chunk {chunk}: zstd decompression failed")]
    Zstd {
        /// Chunk index.
        chunk: u32,
        /// The zstd error.
        #[source]
        source: std::io::Error,
    },
    /// A decompressed chunk (or lz4 area) has the wrong size.
    #[error("chunk {chunk}: decompressed to {got} bytes, expected {expected}")]
    SizeMismatch {
        /// Chunk index.
        chunk: u32,
        /// Declared size.
        expected: usize,
        /// Actual size.
        got: usize,
    },
    /// A chunk's payload ended early (frame list, control or literals).
    #[error("chunk {chunk}, frame {frame}: {stream} stream truncated at offset {offset}")]
    ChunkTruncated {
        /// Chunk index.
        chunk: u32,
        /// Frame being decoded (0 while reading the frame list).
        frame: u32,
        /// Which part of the payload.
        stream: &'static str,
        /// Offset in the control stream (or payload for the frame list).
        offset: usize,
    },
    /// An unknown area operation.
    #[error("chunk {chunk}, frame {frame}: unknown op {op} at offset {offset}")]
    BadOp {
        /// Chunk index.
        chunk: u32,
        /// Frame being decoded.
        frame: u32,
        /// The op byte.
        op: u8,
        /// Offset in the control stream.
        offset: usize,
    },
    /// A reference names an area outside `0..max_frames`.
    #[error("chunk {chunk}, frame {frame}: reference {reference} out of range at offset {offset}")]
    ReferenceOutOfRange {
        /// Chunk index.
        chunk: u32,
        /// Frame being decoded.
        frame: u32,
        /// The area index named.
        reference: i128,
        /// Offset in the control stream.
        offset: usize,
    },
    /// Run lengths do not fill an area exactly, or an lz4 area is invalid.
    #[error("chunk {chunk}, frame {frame}: invalid runs at offset {offset}")]
    BadRun {
        /// Chunk index.
        chunk: u32,
        /// Frame being decoded.
        frame: u32,
        /// Offset in the control stream.
        offset: usize,
    },
    /// Bytes left over after a chunk's areas, or after the last chunk.
    #[error("{what} has {extra} trailing bytes")]
    TrailingBytes {
        /// Which part of the input.
        what: &'static str,
        /// How many bytes are left over.
        extra: usize,
    },
}

/// One chunk located in the input.
struct ChunkRef<'a> {
    index: u32,
    stored: &'a [u8],
    raw_len: usize,
    control_len: usize,
    frames: usize,
    encoding: ChunkEncoding,
}

/// Parsed epoch header and chunk table.
struct Layout<'a> {
    area_log2: u32,
    frames: u32,
    dropped: Vec<u32>,
    chunks: Vec<ChunkRef<'a>>,
}

fn truncated(what: &'static str, offset: usize) -> DecodeError {
    DecodeError::Truncated { what, offset }
}

fn parse_layout(input: &[u8], max_frames: u32) -> Result<Layout<'_>, DecodeError> {
    let mut r = Reader::new(input);
    let header = r.bytes(HEADER_LEN).ok_or(truncated("epoch header", 0))?;
    if header[0..4] != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if header[4] != VERSION {
        return Err(DecodeError::UnsupportedVersion(header[4]));
    }
    if CodecId::from_u8(header[5]).is_none() {
        return Err(DecodeError::UnknownCodec(header[5]));
    }
    let area_log2 = header[6];
    if !(6..=12).contains(&area_log2) {
        return Err(DecodeError::BadAreaSize(area_log2));
    }
    if header[7] > 2 {
        return Err(DecodeError::UnknownFlags(header[7]));
    }
    let le = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let (frames, n_dropped, n_chunks) = (le(8), le(12), le(16));
    for (what, count) in [("frame", frames), ("dropped frame", n_dropped)] {
        if count > max_frames {
            return Err(DecodeError::TooMany {
                what,
                count: count.into(),
                limit: max_frames.into(),
            });
        }
    }
    // Every chunk holds at least one frame.
    if n_chunks > frames {
        return Err(DecodeError::TooMany {
            what: "chunk",
            count: n_chunks.into(),
            limit: frames.into(),
        });
    }
    if (n_dropped as usize) * 4 > r.remaining() {
        return Err(truncated("dropped list", r.pos()));
    }
    let mut dropped = Vec::with_capacity(n_dropped as usize);
    for _ in 0..n_dropped {
        let f = r.u32_le().ok_or(truncated("dropped list", r.pos()))?;
        if f >= max_frames {
            return Err(DecodeError::FrameOutOfRange {
                place: "dropped list",
                frame: f.into(),
                max_frames,
            });
        }
        if dropped.last().is_some_and(|&p| p >= f) {
            return Err(DecodeError::DroppedOrder { frame: f });
        }
        dropped.push(f);
    }
    let mut chunks = Vec::with_capacity((n_chunks as usize).min(r.remaining() / CHUNK_HEADER_LEN));
    let mut total = 0u64;
    for index in 0..n_chunks {
        let h = r
            .bytes(CHUNK_HEADER_LEN)
            .ok_or(truncated("chunk header", r.pos()))?;
        let le = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let (stored_len, raw_len, n, control_len) = (le(0), le(4), le(8), le(12));
        let bad = |reason| DecodeError::BadChunkHeader {
            chunk: index,
            reason,
        };
        if n == 0 || n > MAX_CHUNK_FRAMES {
            return Err(bad("frame count not in 1..=4096"));
        }
        if raw_len > MAX_CHUNK_RAW {
            return Err(bad("decompressed size over the limit"));
        }
        if control_len > raw_len {
            return Err(bad("control stream longer than the payload"));
        }
        let encoding = match h[16] {
            0 => ChunkEncoding::Stored,
            1 => ChunkEncoding::Lz4,
            2 => ChunkEncoding::Zstd,
            _ => return Err(bad("unknown chunk encoding")),
        };
        if encoding == ChunkEncoding::Stored && stored_len != raw_len {
            return Err(bad("stored chunk with differing sizes"));
        }
        let stored = r
            .bytes(stored_len as usize)
            .ok_or(truncated("chunk payload", r.pos()))?;
        total += u64::from(n);
        if total > u64::from(frames) {
            return Err(DecodeError::FrameCountMismatch {
                declared: frames,
                found: total,
            });
        }
        chunks.push(ChunkRef {
            index,
            stored,
            raw_len: raw_len as usize,
            control_len: control_len as usize,
            frames: n as usize,
            encoding,
        });
    }
    if total != u64::from(frames) {
        return Err(DecodeError::FrameCountMismatch {
            declared: frames,
            found: total,
        });
    }
    if r.remaining() != 0 {
        return Err(DecodeError::TrailingBytes {
            what: "epoch",
            extra: r.remaining(),
        });
    }
    Ok(Layout {
        area_log2: area_log2.into(),
        frames,
        dropped,
        chunks,
    })
}

thread_local! {
    /// Per-thread buffer for decompressed chunk payloads.
    static PAYLOAD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static ZSTD_DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompresses a chunk payload into `buf` (or borrows it when stored).
fn payload<'a>(chunk: &ChunkRef<'a>, buf: &'a mut Vec<u8>) -> Result<&'a [u8], DecodeError> {
    let index = chunk.index;
    let got = match chunk.encoding {
        ChunkEncoding::Stored => return Ok(chunk.stored),
        ChunkEncoding::Lz4 => {
            buf.clear();
            buf.resize(chunk.raw_len, 0);
            lz4_flex::block::decompress_into(chunk.stored, buf).map_err(|source| {
                DecodeError::Lz4 {
                    chunk: index,
                    source,
                }
            })?
        }
        ChunkEncoding::Zstd => {
            buf.clear();
            buf.resize(chunk.raw_len, 0);
            ZSTD_DCTX.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Some(zstd::bulk::Decompressor::new().map_err(|source| {
                        DecodeError::Zstd {
                            chunk: index,
                            source,
                        }
                    })?);
                }
                match slot.as_mut() {
                    Some(d) => {
                        d.decompress_to_buffer(chunk.stored, &mut buf[..])
                            .map_err(|source| DecodeError::Zstd {
                                chunk: index,
                                source,
                            })
                    }
                    None => Ok(0),
                }
            })?
        }
    };
    if got != chunk.raw_len {
        return Err(DecodeError::SizeMismatch {
            chunk: index,
            expected: chunk.raw_len,
            got,
        });
    }
    Ok(&buf[..])
}

/// Decodes one chunk into `frames_out` / `data_out` (pre-zeroed, sized for
/// the chunk's frames).
fn decode_chunk(
    reference: &dyn PageView,
    chunk: &ChunkRef<'_>,
    area_log2: u32,
    max_frames: u32,
    frames_out: &mut [u32],
    data_out: &mut [u8],
) -> Result<(), DecodeError> {
    PAYLOAD.with(|buf| {
        let mut buf = buf.borrow_mut();
        let payload = payload(chunk, &mut buf)?;
        decode_payload(
            reference, chunk, payload, area_log2, max_frames, frames_out, data_out,
        )
    })
}

/// Decodes a chunk's (decompressed) payload.
fn decode_payload(
    reference: &dyn PageView,
    chunk: &ChunkRef<'_>,
    payload: &[u8],
    area_log2: u32,
    max_frames: u32,
    frames_out: &mut [u32],
    data_out: &mut [u8],
) -> Result<(), DecodeError> {
    let ci = chunk.index;
    // Payload: frame list, literals, control (its length in the header).
    let split = payload.len() - chunk.control_len.min(payload.len());
    let (head, control) = payload.split_at(split);
    let mut r = Reader::new(head);
    let cut = |stream, frame, offset| DecodeError::ChunkTruncated {
        chunk: ci,
        frame,
        stream,
        offset,
    };
    // Frame list.
    let mut prev = 0u64;
    for (i, slot) in frames_out.iter_mut().enumerate() {
        let v = u64::from(r.varint().ok_or(cut("frame list", 0, r.pos()))?);
        let f = if i == 0 {
            v
        } else {
            if v == 0 {
                return Err(DecodeError::FrameOrder {
                    chunk: ci,
                    frame: prev as u32,
                });
            }
            prev + v
        };
        if f >= u64::from(max_frames) {
            return Err(DecodeError::FrameOutOfRange {
                place: "dirty frames",
                frame: f,
                max_frames,
            });
        }
        *slot = f as u32;
        prev = f;
    }
    let literals = r.bytes(r.remaining()).unwrap_or(&[]);
    let mut c = Reader::new(control);
    let mut l = Reader::new(literals);

    let size = 1usize << area_log2;
    let per_page = PAGE_SIZE >> area_log2;
    let ref_limit = i128::from(max_frames) * per_page as i128;
    let mut last_ref: i128 = -1;
    for (&frame, out_page) in frames_out.iter().zip(data_out.chunks_exact_mut(PAGE_SIZE)) {
        let own = reference.page(frame);
        for (a, out) in out_page.chunks_exact_mut(size).enumerate() {
            let offset = c.pos();
            let op_byte = c.u8().ok_or(cut("control", frame, offset))?;
            let op = Op::from_u8(op_byte).ok_or(DecodeError::BadOp {
                chunk: ci,
                frame,
                op: op_byte,
                offset,
            })?;
            let own_area = &own[a * size..(a + 1) * size];
            let run_err = |e: RleError| match e {
                RleError::Truncated => cut("control or literal", frame, offset),
                RleError::BadRun => DecodeError::BadRun {
                    chunk: ci,
                    frame,
                    offset,
                },
            };
            match op {
                Op::Zero => {}
                Op::Unchanged => out.copy_from_slice(own_area),
                Op::Raw => out.copy_from_slice(l.bytes(size).ok_or(cut("literal", frame, offset))?),
                Op::XorSelf => {
                    out.copy_from_slice(own_area);
                    rle_apply(out, &mut c, &mut l).map_err(run_err)?;
                }
                Op::Identical | Op::XorRef | Op::IdenticalNext | Op::XorNext => {
                    let target = if matches!(op, Op::Identical | Op::XorRef) {
                        let d = c.varint64().ok_or(cut("control", frame, offset))?;
                        last_ref + 1 + i128::from(unzigzag(d))
                    } else {
                        last_ref + 1
                    };
                    if target < 0 || target >= ref_limit {
                        return Err(DecodeError::ReferenceOutOfRange {
                            chunk: ci,
                            frame,
                            reference: target,
                            offset,
                        });
                    }
                    last_ref = target;
                    let t = target as usize;
                    let src = reference.page((t / per_page) as u32);
                    let at = (t % per_page) * size;
                    out.copy_from_slice(&src[at..at + size]);
                    if matches!(op, Op::XorRef | Op::XorNext) {
                        rle_apply(out, &mut c, &mut l).map_err(run_err)?;
                    }
                }
                Op::Sparse => rle_apply(out, &mut c, &mut l).map_err(run_err)?,
                Op::PatchSelf => {
                    out.copy_from_slice(own_area);
                    rle_patch(out, &mut c, &mut l).map_err(run_err)?;
                }
                Op::Lz4 => {
                    let n = c.varint().ok_or(cut("control", frame, offset))? as usize;
                    let src = l.bytes(n).ok_or(cut("literal", frame, offset))?;
                    match lz4_flex::block::decompress_into(src, out) {
                        Ok(got) if got == size => {}
                        _ => {
                            return Err(DecodeError::BadRun {
                                chunk: ci,
                                frame,
                                offset,
                            })
                        }
                    }
                }
            }
        }
    }
    let extra = c.remaining() + l.remaining();
    if extra != 0 {
        return Err(DecodeError::TrailingBytes {
            what: "chunk",
            extra,
        });
    }
    Ok(())
}

/// Decodes one encoded epoch (any codec) against the previous committed
/// image `reference`, single-threaded. `max_frames` bounds every frame
/// number the stream may name (dirty, dropped or referenced); references
/// to frames at or past `reference.frame_count()` (but below `max_frames`)
/// read as zero, like [`PageView::page`].
///
/// # Errors
///
/// Any malformed input gives a [`DecodeError`]; this function never
/// panics.
pub fn decode_epoch(
    reference: &dyn PageView,
    input: &[u8],
    max_frames: u32,
) -> Result<DecodedEpoch, DecodeError> {
    let mut out = DecodedEpoch::default();
    decode_impl(reference, input, max_frames, None, &mut out)?;
    Ok(out)
}

/// [`decode_epoch`] into `out`, reusing its buffers (no fresh memory to
/// fault in when decoding epoch after epoch). On error `out` holds no
/// meaningful epoch.
///
/// # Errors
///
/// As [`decode_epoch`].
pub fn decode_epoch_into(
    reference: &dyn PageView,
    input: &[u8],
    max_frames: u32,
    out: &mut DecodedEpoch,
) -> Result<(), DecodeError> {
    decode_impl(reference, input, max_frames, None, out)
}

/// [`decode_epoch`] with the chunks decoded in parallel on `pool`.
///
/// # Errors
///
/// As [`decode_epoch`].
pub fn decode_epoch_parallel(
    reference: &dyn PageView,
    input: &[u8],
    max_frames: u32,
    pool: &rayon::ThreadPool,
) -> Result<DecodedEpoch, DecodeError> {
    let mut out = DecodedEpoch::default();
    decode_impl(reference, input, max_frames, Some(pool), &mut out)?;
    Ok(out)
}

fn decode_impl(
    reference: &dyn PageView,
    input: &[u8],
    max_frames: u32,
    pool: Option<&rayon::ThreadPool>,
    out: &mut DecodedEpoch,
) -> Result<(), DecodeError> {
    let layout = parse_layout(input, max_frames)?;
    let n = layout.frames as usize;
    let DecodedEpoch {
        frames,
        data,
        dropped,
    } = out;
    frames.clear();
    frames.resize(n, 0);
    data.clear();
    data.resize(n * PAGE_SIZE, 0);
    // Split the outputs per chunk.
    let mut jobs = Vec::with_capacity(layout.chunks.len());
    let (mut f_rest, mut d_rest) = (&mut frames[..], &mut data[..]);
    for chunk in &layout.chunks {
        let (f, fr) = std::mem::take(&mut f_rest).split_at_mut(chunk.frames);
        let (d, dr) = std::mem::take(&mut d_rest).split_at_mut(chunk.frames * PAGE_SIZE);
        f_rest = fr;
        d_rest = dr;
        jobs.push((chunk, f, d));
    }
    let run = |(chunk, f, d): (&ChunkRef<'_>, &mut [u32], &mut [u8])| {
        decode_chunk(reference, chunk, layout.area_log2, max_frames, f, d)
    };
    match pool {
        Some(pool) if jobs.len() > 1 => {
            use rayon::prelude::*;
            pool.install(|| {
                jobs.into_par_iter()
                    .map(run)
                    .collect::<Result<Vec<()>, _>>()
            })?;
        }
        _ => {
            for job in jobs {
                run(job)?;
            }
        }
    }
    // Chunk boundaries: strictly increasing overall.
    let mut at = 0usize;
    for chunk in &layout.chunks {
        if at > 0 && frames[at] <= frames[at - 1] {
            return Err(DecodeError::FrameOrder {
                chunk: chunk.index,
                frame: frames[at],
            });
        }
        at += chunk.frames;
    }
    // Disjoint from the dropped frames (both sorted).
    let (mut i, mut j) = (0, 0);
    while i < frames.len() && j < layout.dropped.len() {
        match frames[i].cmp(&layout.dropped[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                return Err(DecodeError::DirtyAndDropped { frame: frames[i] })
            }
        }
    }
    *dropped = layout.dropped;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(frames: u32, dropped: &[u32], chunks: u32) -> Vec<u8> {
        let mut v = Vec::new();
        super::super::container::write_header(
            &mut v,
            CodecId::Raw,
            12,
            super::super::SecondStage::None,
            frames,
            dropped,
            chunks,
        );
        v
    }

    #[test]
    fn empty_epoch() {
        let img = Image::zeroed(4);
        let d = decode_epoch(&img, &header(0, &[1, 3], 0), 10).unwrap();
        assert!(d.frames.is_empty());
        assert_eq!(d.dropped, vec![1, 3]);
    }

    #[test]
    fn header_errors() {
        let img = Image::zeroed(1);
        assert!(matches!(
            decode_epoch(&img, b"", 10),
            Err(DecodeError::Truncated { .. })
        ));
        let mut h = header(0, &[], 0);
        h[0] = b'X';
        assert!(matches!(
            decode_epoch(&img, &h, 10),
            Err(DecodeError::BadMagic)
        ));
        let mut h = header(0, &[], 0);
        h[4] = 9;
        assert!(matches!(
            decode_epoch(&img, &h, 10),
            Err(DecodeError::UnsupportedVersion(9))
        ));
        let mut h = header(0, &[], 0);
        h[5] = 0;
        assert!(matches!(
            decode_epoch(&img, &h, 10),
            Err(DecodeError::UnknownCodec(0))
        ));
        let mut h = header(0, &[], 0);
        h[6] = 13;
        assert!(matches!(
            decode_epoch(&img, &h, 10),
            Err(DecodeError::BadAreaSize(13))
        ));
        let mut h = header(0, &[], 0);
        h[7] = 0x80;
        assert!(matches!(
            decode_epoch(&img, &h, 10),
            Err(DecodeError::UnknownFlags(_))
        ));
        assert!(matches!(
            decode_epoch(&img, &header(11, &[], 0), 10),
            Err(DecodeError::TooMany { .. })
        ));
        assert!(matches!(
            decode_epoch(&img, &header(0, &[3, 3], 0), 10),
            Err(DecodeError::DroppedOrder { frame: 3 })
        ));
        assert!(matches!(
            decode_epoch(&img, &header(0, &[10], 0), 10),
            Err(DecodeError::FrameOutOfRange { .. })
        ));
        assert!(matches!(
            decode_epoch(&img, &header(2, &[], 1), 10),
            Err(DecodeError::Truncated { .. })
        ));
        let mut h = header(0, &[], 0);
        h.push(0);
        assert!(matches!(
            decode_epoch(&img, &h, 10),
            Err(DecodeError::TrailingBytes { .. })
        ));
    }

    fn raw_chunk(frames_payload: &[u8], control: &[u8], literals: &[u8], n: u32) -> Vec<u8> {
        let mut payload = frames_payload.to_vec();
        payload.extend_from_slice(literals);
        payload.extend_from_slice(control);
        let mut v = Vec::new();
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(&(control.len() as u32).to_le_bytes());
        v.push(0);
        v.extend_from_slice(&payload);
        v
    }

    #[test]
    fn chunk_errors() {
        let mut img = Image::zeroed(2);
        img.page_mut(1)[5] = 7;
        // One frame (5), op Unchanged: copies frame 5 of the reference (zero).
        let mut ok = header(1, &[], 1);
        ok.extend(raw_chunk(&[1], &[Op::Unchanged as u8], &[], 1));
        let d = decode_epoch(&img, &ok, 10).unwrap();
        assert_eq!(d.frames, vec![1]);
        assert_eq!(d.page(0)[5], 7);
        // Reference out of range.
        let mut bad = header(1, &[], 1);
        bad.extend(raw_chunk(&[0], &[Op::Identical as u8, 40], &[], 1));
        assert!(matches!(
            decode_epoch(&img, &bad, 10),
            Err(DecodeError::ReferenceOutOfRange { .. })
        ));
        // Bad op.
        let mut bad = header(1, &[], 1);
        bad.extend(raw_chunk(&[0], &[99], &[], 1));
        assert!(matches!(
            decode_epoch(&img, &bad, 10),
            Err(DecodeError::BadOp { op: 99, .. })
        ));
        // Frame beyond max.
        let mut bad = header(1, &[], 1);
        bad.extend(raw_chunk(&[10], &[0], &[], 1));
        assert!(matches!(
            decode_epoch(&img, &bad, 10),
            Err(DecodeError::FrameOutOfRange { .. })
        ));
        // Duplicate frame.
        let mut bad = header(2, &[], 1);
        bad.extend(raw_chunk(&[1, 0], &[0, 0], &[], 2));
        assert!(matches!(
            decode_epoch(&img, &bad, 10),
            Err(DecodeError::FrameOrder { .. })
        ));
        // Dirty and dropped.
        let mut bad = header(1, &[1], 1);
        bad.extend(raw_chunk(&[1], &[0], &[], 1));
        assert!(matches!(
            decode_epoch(&img, &bad, 10),
            Err(DecodeError::DirtyAndDropped { frame: 1 })
        ));
        // Runs overflowing the area.
        let mut bad = header(1, &[], 1);
        bad.extend(raw_chunk(&[0], &[Op::XorSelf as u8, 0x80, 0x40], &[], 1));
        assert!(matches!(
            decode_epoch(&img, &bad, 10),
            Err(DecodeError::BadRun { .. })
        ));
        // Trailing literal bytes.
        let mut bad = header(1, &[], 1);
        bad.extend(raw_chunk(&[0], &[0], &[1], 1));
        assert!(matches!(
            decode_epoch(&img, &bad, 10),
            Err(DecodeError::TrailingBytes { .. })
        ));
        // Raw op without enough literals.
        let mut bad = header(1, &[], 1);
        bad.extend(raw_chunk(&[0], &[Op::Raw as u8], &[1, 2], 1));
        assert!(matches!(
            decode_epoch(&img, &bad, 10),
            Err(DecodeError::ChunkTruncated { .. })
        ));
    }

    #[test]
    fn apply_writes_and_zeroes() {
        let mut img = Image::zeroed(3);
        img.page_mut(2)[0] = 1;
        let mut e = DecodedEpoch {
            frames: vec![4],
            data: vec![9; PAGE_SIZE],
            dropped: vec![2],
        };
        e.apply(&mut img);
        assert_eq!(img.frame_count(), 5);
        assert_eq!(img.page(4)[100], 9);
        assert_eq!(img.page(2)[0], 0);
        e.frames.clear();
        e.data.clear();
        e.apply(&mut img);
    }
}
