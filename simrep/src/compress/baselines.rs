//! The baselines, in the same container so that one decoder handles them:
//! raw pages, lz4 per page, zstd over the epoch, and XBZRLE.

use rayon::ThreadPool;

use super::cache::PageCache;
use super::container::{write_header, ChunkWriter, CodecId, Op, CHUNK_FRAMES, MAX_CHUNK_FRAMES};
use super::rle::{diff_masks, is_zero, rle_encode, varint_len};
use super::spec::budget_bytes;
use super::{
    check_sets, chunk_count, encode_chunks, thread_pool, EncodeError, EpochEncoder, EpochStats,
    KindCounts, PageView, SecondStage, PAGE_SIZE, WRITER,
};

/// Page-granular area size (log2).
const PAGE_LOG2: u8 = 12;

/// Encodes `dirty` in chunks of `per_chunk` frames with `page_op` choosing
/// each page's encoding, and writes the epoch to `out`.
#[allow(clippy::too_many_arguments)]
fn encode_pages<F>(
    pool: Option<&ThreadPool>,
    codec: CodecId,
    stage: SecondStage,
    per_chunk: usize,
    dirty: &[u32],
    dropped: &[u32],
    out: &mut Vec<u8>,
    page_op: F,
) -> Result<EpochStats, EncodeError>
where
    F: Fn(u32, &mut ChunkWriter, &mut KindCounts) + Sync,
{
    check_sets(dirty, dropped)?;
    let start = out.len();
    write_header(
        out,
        codec,
        PAGE_LOG2,
        stage,
        dirty.len() as u32,
        dropped,
        chunk_count(dirty.len(), per_chunk),
    );
    let chunks = encode_chunks(pool, dirty, per_chunk, out, |frames, dest| {
        WRITER.with(|w| {
            let mut w = w.borrow_mut();
            w.start(frames);
            let mut kinds = KindCounts::default();
            for &f in frames {
                page_op(f, &mut w, &mut kinds);
            }
            w.finish(stage, dest)?;
            Ok(kinds)
        })
    });
    let chunks = chunks.inspect_err(|_| out.truncate(start))?;
    let mut kinds = KindCounts::default();
    for k in &chunks {
        kinds += k;
    }
    Ok(EpochStats {
        pages: dirty.len() as u64,
        dropped: dropped.len() as u64,
        raw_bytes: (dirty.len() * PAGE_SIZE) as u64,
        out_bytes: (out.len() - start) as u64,
        kinds,
    })
}

/// The stateless page baselines: raw pages, or lz4 of each page (raw if
/// not smaller).
pub(crate) struct PageEncoder {
    name: String,
    pool: Option<ThreadPool>,
    /// lz4 each page; otherwise send it raw.
    lz4: bool,
}

impl PageEncoder {
    pub(crate) fn new(name: String, threads: usize, lz4: bool) -> Self {
        Self {
            name,
            pool: thread_pool(threads),
            lz4,
        }
    }
}

impl EpochEncoder for PageEncoder {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn init(&mut self, _image: &dyn PageView) {}

    fn encode_epoch(
        &mut self,
        current: &dyn PageView,
        dirty: &[u32],
        dropped: &[u32],
        out: &mut Vec<u8>,
    ) -> Result<EpochStats, EncodeError> {
        let lz4 = self.lz4;
        encode_pages(
            self.pool.as_ref(),
            if lz4 { CodecId::Lz4Page } else { CodecId::Raw },
            SecondStage::None,
            CHUNK_FRAMES,
            dirty,
            dropped,
            out,
            |f, w, k| {
                let page = current.page(f);
                k.raw += 1;
                if lz4 {
                    let at = w.literals.len();
                    w.literals
                        .resize(at + lz4_flex::block::get_maximum_output_size(PAGE_SIZE), 0);
                    match lz4_flex::block::compress_into(page, &mut w.literals[at..]) {
                        Ok(n) if n + varint_len(n as u32) < PAGE_SIZE => {
                            w.literals.truncate(at + n);
                            w.op(Op::Lz4);
                            super::rle::put_varint(&mut w.control, n as u32);
                            return;
                        }
                        _ => w.literals.truncate(at),
                    }
                }
                w.op(Op::Raw);
                w.literals.extend_from_slice(page);
            },
        )
    }

    fn reference_bytes(&self) -> usize {
        0
    }
}

/// zstd over the epoch's concatenated pages (chunks of up to 4096 pages,
/// i.e. 16 MiB, far beyond zstd level 1's window).
pub(crate) struct ZstdEpochEncoder {
    name: String,
    level: i32,
    pool: Option<ThreadPool>,
}

impl ZstdEpochEncoder {
    pub(crate) fn new(name: String, level: i32, threads: usize) -> Self {
        Self {
            name,
            level,
            pool: thread_pool(threads),
        }
    }
}

impl EpochEncoder for ZstdEpochEncoder {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn init(&mut self, _image: &dyn PageView) {}

    fn encode_epoch(
        &mut self,
        current: &dyn PageView,
        dirty: &[u32],
        dropped: &[u32],
        out: &mut Vec<u8>,
    ) -> Result<EpochStats, EncodeError> {
        encode_pages(
            self.pool.as_ref(),
            CodecId::ZstdEpoch,
            SecondStage::Zstd { level: self.level },
            MAX_CHUNK_FRAMES as usize,
            dirty,
            dropped,
            out,
            |f, w, k| {
                w.op(Op::Raw);
                w.literals.extend_from_slice(current.page(f));
                k.raw += 1;
            },
        )
    }

    fn reference_bytes(&self) -> usize {
        0
    }
}

/// QEMU-style XBZRLE: zero pages flagged; a cached page is sent as the
/// zero-run / literal-run encoding of its XOR with the cached previous
/// contents (runs split at every equal byte, as QEMU does; the encoded
/// size equals QEMU's, whose literal runs carry the new bytes rather than
/// the XOR), or raw when that is not smaller or the page is not cached.
/// After sending, the cache holds the page's new contents (inserted on a
/// miss, refreshed on a hit), LRU-evicted.
pub(crate) struct XbzrleEncoder {
    name: String,
    cache_bytes: usize,
    pool: Option<ThreadPool>,
    cache: PageCache,
}

impl XbzrleEncoder {
    pub(crate) fn new(name: String, cache_bytes: usize, threads: usize) -> Self {
        Self {
            name,
            cache_bytes,
            pool: thread_pool(threads),
            cache: PageCache::new(cache_bytes / PAGE_SIZE),
        }
    }
}

impl EpochEncoder for XbzrleEncoder {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn init(&mut self, image: &dyn PageView) {
        let pages = if self.cache_bytes == 0 {
            let frames = image.frame_count() as usize;
            budget_bytes(frames).saturating_sub(PageCache::bytes_when_full(0, frames))
                / (PAGE_SIZE + 12)
        } else {
            self.cache_bytes / PAGE_SIZE
        };
        self.cache = PageCache::new(pages);
    }

    fn encode_epoch(
        &mut self,
        current: &dyn PageView,
        dirty: &[u32],
        dropped: &[u32],
        out: &mut Vec<u8>,
    ) -> Result<EpochStats, EncodeError> {
        check_sets(dirty, dropped)?;
        for &f in dropped {
            self.cache.remove(f);
        }
        let cache = &self.cache;
        let stats = encode_pages(
            self.pool.as_ref(),
            CodecId::Xbzrle,
            SecondStage::None,
            CHUNK_FRAMES,
            dirty,
            dropped,
            out,
            |f, w, k| {
                let page = current.page(f);
                if is_zero(page) {
                    w.op(Op::Zero);
                    k.zero += 1;
                    return;
                }
                if let Some(prev) = cache.get(f) {
                    let mut masks = [0u64; PAGE_SIZE / 64];
                    if diff_masks(page, prev, &mut masks) == 0 {
                        w.op(Op::Unchanged);
                        k.unchanged += 1;
                        return;
                    }
                    let mark = w.mark();
                    w.op(Op::XorSelf);
                    if rle_encode(page, prev, &masks, 1, &mut w.control, &mut w.literals)
                        < PAGE_SIZE
                    {
                        k.xor_self += 1;
                        return;
                    }
                    w.rollback(mark);
                }
                w.op(Op::Raw);
                w.literals.extend_from_slice(page);
                k.raw += 1;
            },
        )?;
        for &f in dirty {
            self.cache.put(f, current.page(f));
        }
        Ok(stats)
    }

    fn reference_bytes(&self) -> usize {
        self.cache.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decode_epoch, CodecSpec, Image};
    use super::*;

    #[test]
    fn xbzrle_sends_raw_on_a_miss_then_xor_from_its_cache() {
        let img = Image::zeroed(4);
        let mut enc = "xbzrle:cache=8KiB".parse::<CodecSpec>().unwrap().build(1);
        enc.init(&img);
        let mut cur = img.clone();
        let mut backup = img.clone();
        let mut kinds = Vec::new();
        for (epoch, frame) in [(1u8, 0u32), (2, 0), (3, 1), (4, 2), (5, 0)] {
            cur.page_mut(frame)[100] = epoch;
            cur.page_mut(frame)[200] = epoch;
            let mut out = Vec::new();
            let s = enc.encode_epoch(&cur, &[frame], &[], &mut out).unwrap();
            decode_epoch(&backup, &out, 4).unwrap().apply(&mut backup);
            assert!(backup.page(frame) == cur.page(frame));
            kinds.push((s.kinds.raw, s.kinds.xor_self));
        }
        // Miss, hit, miss, miss (evicts frame 0: 2 pages), miss again.
        assert_eq!(kinds, vec![(1, 0), (0, 1), (1, 0), (1, 0), (1, 0)]);
        assert!(enc.reference_bytes() >= 2 * PAGE_SIZE);
    }

    #[test]
    fn lz4_and_zstd_fall_back_to_raw_on_incompressible_pages() {
        let mut img = Image::zeroed(2);
        let mut s = 1u64;
        for b in img.page_mut(1).iter_mut() {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (s >> 56) as u8;
        }
        for spec in ["lz4", "zstd"] {
            let mut enc = spec.parse::<CodecSpec>().unwrap().build(1);
            enc.init(&img);
            let mut out = Vec::new();
            let st = enc.encode_epoch(&img, &[0, 1], &[], &mut out).unwrap();
            assert!(st.out_bytes < (PAGE_SIZE + 200) as u64, "{spec}: {st:?}");
            let d = decode_epoch(&Image::zeroed(2), &out, 2).unwrap();
            assert!(d.page(1) == img.page(1));
        }
    }
}
