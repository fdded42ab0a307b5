//! The similarity encoder (paper section III, plus fingerprints).
//!
//! Per dirty page, per area: zero; unchanged (equal to its own previous
//! contents: compared exactly when the page is in the RDP cache, else by
//! block fingerprints); identical to a candidate; XOR against the best
//! candidate (fewest differing bytes) run-length encoded; a patch of its
//! own previous contents (unchanged fingerprint blocks kept, changed blocks
//! sent as new bytes); sparse (runs against zero); raw when nothing is
//! smaller. Candidates, cheapest first, stopping as soon as one is good
//! enough (at most 1/32 of the area differs):
//!
//! 1. the same area's previous contents, when the page is cached;
//! 2. the patch, when the page is not cached but fingerprints are on; when
//!    at most half the area's blocks changed, the search stops here;
//! 3. the *predicted* area: the one after the area the previous reference of
//!    this page named (pages copied from elsewhere match area after area);
//! 4. the bucket of the area's bit-density hash in the content table,
//!    closest full hash first, at most `search_depth` of them, giving up
//!    when the closest one differs in more than half its bytes;
//! 5. the all-zero area.
//!
//! # Reference bookkeeping
//!
//! Every reference names an area of `I(k-1)`. The encoder reads a
//! candidate's contents from the RDP cache when the frame is cached (the
//! cache holds the latest committed contents), else from `current`, which
//! is right only for frames not dirty in this epoch. So at the start of an
//! epoch the table entries of dirty frames that are not cached, and of
//! dropped frames, are removed; chunks are then encoded (in parallel) with
//! the table, cache and fingerprints read-only; finally, sequentially, each
//! dirty frame's table entries and fingerprints are replaced by those of
//! its new contents, dropped frames get zero fingerprints, and the new
//! contents go into the cache (least recently dirtied evicted; among this
//! epoch's pages, those whose previous contents served as a reference are
//! inserted last, so they are the last to go). With a thread pool the
//! second stage (lz4) of the chunks runs on the other threads while this
//! update runs: it needs the chunks' areas, not their compressed records.
//! Chunk outputs and writers are kept from epoch to epoch (no allocation
//! per epoch once warm).
//!
//! # Memory
//!
//! Per area a 4-byte hash and a presence bit; per 256-byte block an 8-byte
//! fingerprint (3.1 % of the image); the buckets (8 bytes a slot); the
//! cache. The defaults fit 64 MiB per GiB of image: for 1 GiB at 512-byte
//! areas, 8 MiB of hashes, 32 MiB of fingerprints, a 2^17-bucket table
//! (8 MiB) and ~3.7k cached pages.

use rayon::prelude::*;
use rayon::ThreadPool;

use super::cache::PageCache;
use super::container::{write_header, ChunkWriter, CodecId, Op};
use super::fingerprint::Fingerprinter;
use super::hash::bit_density_hash;
use super::rle::{diff_count_bounded, diff_masks, is_zero, rle_encode};
use super::table::{Table, EMPTY};
use super::{
    check_sets, chunk_count, thread_pool, EncodeError, EpochEncoder, EpochStats, HashThreshold,
    KindCounts, PageView, SecondStage, SimilarityConfig, PAGE_SIZE, WRITER, ZERO_PAGE,
};

/// Zero gaps shorter than this inside a literal run are absorbed into it
/// (splitting would cost two varints).
const MIN_GAP: usize = 3;

/// Bucket candidates whose hash differs from the area's in more bits than
/// this are not examined (unrelated areas that share the bucket).
const MAX_DISTANCE: u32 = 8;

/// The similarity codec's encoder.
pub(crate) struct SimilarityEncoder {
    name: String,
    cfg: SimilarityConfig,
    pool: Option<ThreadPool>,
    state: Option<State>,
    /// Per chunk, what its encoder hands to the update, reused epoch after
    /// epoch.
    outs: Vec<ChunkOut>,
    /// Per chunk, with a pool: its writer and its finished record.
    chunks: Vec<(ChunkWriter, Vec<u8>)>,
}

struct State {
    log2: u32,
    table: Table,
    cache: PageCache,
    /// Fingerprint of every area of the committed image (empty when
    /// fingerprints are off).
    fps: Vec<u64>,
    fingerprinter: Option<Fingerprinter>,
    /// Scratch for the cache update's order of frames.
    order: Vec<u32>,
}

/// Read-only view shared by the chunk encoders.
struct Ctx<'a> {
    size: usize,
    per_page: usize,
    page_shift: u32,
    hash: HashThreshold,
    depth: usize,
    /// The paper's plain bucket-only search.
    plain: bool,
    stage: SecondStage,
    table: &'a Table,
    cache: &'a PageCache,
    current: &'a dyn PageView,
    fingerprints: Option<(&'a Fingerprinter, &'a [u64])>,
    /// Fingerprint blocks per area.
    fp_blocks: usize,
}

/// What a chunk encoder hands back for the sequential update (kept and
/// reused epoch after epoch).
#[derive(Default)]
struct ChunkOut {
    /// Hash of every area (meaningless for zero areas).
    hashes: Vec<u32>,
    /// Fingerprint of every block of every area (when fingerprints are on).
    fps: Vec<u64>,
    /// Per frame: bit per non-zero area to file in the table.
    nonzero: Vec<u64>,
    /// Per frame: bit per unchanged area.
    unchanged: Vec<u64>,
    /// Per frame: whether its previous contents served as a reference.
    self_used: Vec<bool>,
    kinds: KindCounts,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cand {
    None,
    SelfPrev,
    Ref(u32),
    /// The all-zero area (the area is sparse).
    Zero,
    /// Own blocks whose fingerprint did not change, new bytes elsewhere.
    Patch,
}

impl Ctx<'_> {
    /// Contents of area `gid` of `I(k-1)`.
    #[inline]
    fn area(&self, gid: u32) -> &[u8] {
        let frame = gid >> self.page_shift;
        let at = (gid as usize & (self.per_page - 1)) * self.size;
        let page = match self.cache.get(frame) {
            Some(p) => p,
            None => self.current.page(frame),
        };
        &page[at..at + self.size]
    }

    /// Encodes a chunk into `out` and appends its record to `dest`.
    fn encode_chunk(
        &self,
        frames: &[u32],
        out: &mut ChunkOut,
        dest: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        WRITER.with(|w| {
            let w = &mut w.borrow_mut();
            self.encode_areas(w, frames, out);
            w.finish(self.stage, dest)
        })
    }

    /// Encodes the areas of a chunk's frames into `w` (restarted first) and
    /// `out` (cleared first); the caller finishes the chunk.
    fn encode_areas(&self, w: &mut ChunkWriter, frames: &[u32], out: &mut ChunkOut) {
        let (size, per_page) = (self.size, self.per_page);
        // The plain search stops only at an identical match.
        let good_enough = if self.plain { 0 } else { size / 32 };
        w.start(frames);
        out.hashes.clear();
        out.fps.clear();
        out.nonzero.clear();
        out.unchanged.clear();
        out.self_used.clear();
        out.kinds = KindCounts::default();
        let mut masks = [0u64; 32];
        let mut ranked: [(u32, u32); 16] = [(0, 0); 16];
        for &f in frames {
            let page = self.current.page(f);
            // The plain search meets the page's own previous contents only
            // through the table.
            let prev = if self.plain { None } else { self.cache.get(f) };
            let base = f << self.page_shift;
            let (mut nz_bits, mut unch_bits, mut self_used) = (0u64, 0u64, false);
            let mut unfiled = 0u64;
            let mut pred: Option<u32> = None;
            for (a, area) in page.chunks_exact(size).enumerate() {
                let gid = base + a as u32;
                // Advance the prediction; it never leaves its frame.
                let this_pred = pred.filter(|p| !self.plain && p & (per_page as u32 - 1) != 0);
                pred = this_pred.map(|p| p + 1);
                if is_zero(area) {
                    w.op(Op::Zero);
                    out.hashes.push(0);
                    if self.fingerprints.is_some() {
                        out.fps.extend(std::iter::repeat_n(0, self.fp_blocks));
                    }
                    out.kinds.zero += 1;
                    continue;
                }
                nz_bits |= 1 << a;
                let mut best = Cand::None;
                let mut best_nz = usize::MAX;
                if let Some(p) = prev {
                    let old = &p[a * size..(a + 1) * size];
                    let nz = diff_count_bounded(area, old, size);
                    if nz == 0 {
                        w.op(Op::Unchanged);
                        out.hashes.push(self.table.stored_hash(gid));
                        if let Some((_, fps)) = self.fingerprints {
                            let at = gid as usize * self.fp_blocks;
                            match fps.get(at..at + self.fp_blocks) {
                                Some(old) => out.fps.extend_from_slice(old),
                                None => out.fps.extend(std::iter::repeat_n(0, self.fp_blocks)),
                            }
                        }
                        unch_bits |= 1 << a;
                        self_used = true;
                        out.kinds.unchanged += 1;
                        continue;
                    }
                    best = Cand::SelfPrev;
                    best_nz = nz;
                }
                // Blocks whose fingerprint changed (all, without fingerprints).
                let mut changed_blocks = u64::MAX;
                if let Some((fingerprinter, fps)) = self.fingerprints {
                    let g = size / self.fp_blocks;
                    let at = gid as usize * self.fp_blocks;
                    changed_blocks = 0;
                    for (j, block) in area.chunks_exact(g).enumerate() {
                        let fp = fingerprinter.fingerprint(block);
                        out.fps.push(fp);
                        if fps.get(at + j) != Some(&fp) {
                            changed_blocks |= 1 << j;
                        }
                    }
                    if prev.is_none() && changed_blocks == 0 {
                        w.op(Op::Unchanged);
                        out.hashes.push(self.table.stored_hash(gid));
                        unch_bits |= 1 << a;
                        out.kinds.unchanged += 1;
                        continue;
                    }
                }
                // Without the old contents, an area whose other blocks are
                // unchanged can be patched: own blocks kept, the changed
                // ones sent as new bytes.
                let patch_cost = if prev.is_none() && changed_blocks != u64::MAX {
                    changed_blocks.count_ones() as usize * (size / self.fp_blocks) + 4
                } else {
                    usize::MAX
                };
                // A cheap patch (at most half the area) is hard to beat:
                // skip the search. Such an area belongs to a hot page that
                // is not cached: it will most likely be dirtied again, and
                // its table entry removed, next epoch, so it is not hashed
                // and not filed either.
                let cheap_patch = patch_cost <= size / 2;
                let h = if cheap_patch {
                    unfiled |= 1 << a;
                    0
                } else {
                    bit_density_hash(area, self.hash)
                };
                out.hashes.push(h);
                let raw_limit = size - size / 8;
                let searching = best_nz > good_enough && !cheap_patch;
                if searching {
                    if let Some(p) = this_pred {
                        let nz = diff_count_bounded(area, self.area(p), best_nz.min(raw_limit));
                        if nz < best_nz {
                            best = Cand::Ref(p);
                            best_nz = nz;
                        }
                    }
                }
                if searching && best_nz > good_enough {
                    // Bucket candidates, closest full hash first.
                    let mut n = 0;
                    for s in self.table.candidates(h) {
                        if s.area == EMPTY {
                            break;
                        }
                        let distance = (s.hash ^ h).count_ones();
                        if !self.plain
                            && (s.area == gid
                                || Some(s.area) == this_pred
                                || distance > MAX_DISTANCE)
                        {
                            continue;
                        }
                        ranked[n] = (distance, s.area);
                        n += 1;
                    }
                    let ranked = &mut ranked[..n];
                    // Stable insertion sort: ties keep recency order.
                    for i in 1..ranked.len() {
                        let mut j = i;
                        while j > 0 && ranked[j - 1].0 > ranked[j].0 {
                            ranked.swap(j - 1, j);
                            j -= 1;
                        }
                    }
                    for &(_, c) in ranked.iter().take(self.depth) {
                        let nz = diff_count_bounded(area, self.area(c), best_nz.min(raw_limit));
                        if nz < best_nz {
                            best = Cand::Ref(c);
                            best_nz = nz;
                            if nz <= good_enough {
                                break;
                            }
                        }
                        if !self.plain && best_nz > size / 2 {
                            break; // even the closest hash is far off
                        }
                    }
                }
                if patch_cost < best_nz.min(raw_limit) {
                    best = Cand::Patch;
                    best_nz = patch_cost;
                }
                if searching && !self.plain && best_nz > good_enough {
                    let zero = &ZERO_PAGE[..size];
                    let nz = diff_count_bounded(area, zero, best_nz.min(raw_limit));
                    if nz < best_nz {
                        best = Cand::Zero;
                        best_nz = nz;
                    }
                }
                // Emit.
                let reference = match best {
                    Cand::None => None,
                    Cand::SelfPrev => prev.map(|p| &p[a * size..(a + 1) * size]),
                    Cand::Ref(c) => Some(self.area(c)),
                    Cand::Zero | Cand::Patch => Some(&ZERO_PAGE[..size]),
                };
                let Some(reference) = reference.filter(|_| best_nz < raw_limit) else {
                    w.op(Op::Raw);
                    w.literals.extend_from_slice(area);
                    out.kinds.raw += 1;
                    continue;
                };
                if best_nz == 0 {
                    if let Cand::Ref(c) = best {
                        w.op_ref(true, c);
                        pred = Some(c + 1);
                        out.kinds.identical += 1;
                        continue;
                    }
                }
                let mark = w.mark();
                match best {
                    Cand::Ref(c) => w.op_ref(false, c),
                    Cand::Zero => w.op(Op::Sparse),
                    Cand::Patch => w.op(Op::PatchSelf),
                    _ => w.op(Op::XorSelf),
                }
                if best == Cand::Patch {
                    // Byte mask of the changed blocks.
                    let words = size / self.fp_blocks / 64;
                    for (wi, m) in masks[..size / 64].iter_mut().enumerate() {
                        *m = if changed_blocks & (1 << (wi / words.max(1))) != 0 {
                            u64::MAX
                        } else {
                            0
                        };
                    }
                } else {
                    diff_masks(area, reference, &mut masks);
                }
                let n = rle_encode(
                    area,
                    reference,
                    &masks,
                    MIN_GAP,
                    &mut w.control,
                    &mut w.literals,
                );
                if n >= size {
                    w.rollback(mark);
                    w.op(Op::Raw);
                    w.literals.extend_from_slice(area);
                    out.kinds.raw += 1;
                    continue;
                }
                match best {
                    Cand::Ref(c) => {
                        pred = Some(c + 1);
                        out.kinds.xor_other += 1;
                    }
                    Cand::Zero | Cand::Patch => out.kinds.raw += 1,
                    _ => {
                        self_used = true;
                        out.kinds.xor_self += 1;
                    }
                }
            }
            out.nonzero.push(nz_bits & !unfiled);
            out.unchanged.push(unch_bits);
            out.self_used.push(self_used);
        }
    }
}

/// Sizes the sequential update needs.
struct Geometry {
    page_shift: u32,
    per_page: usize,
    fp_per_page: usize,
    per_chunk: usize,
}

impl State {
    /// The sequential update after an epoch's chunks are encoded: the
    /// fingerprints and table entries of the new contents, then the cache
    /// (frames whose previous contents proved useful last, so they are the
    /// last to be evicted).
    fn commit(
        &mut self,
        current: &dyn PageView,
        dirty: &[u32],
        dropped: &[u32],
        chunks: &[ChunkOut],
        g: &Geometry,
    ) {
        if self.fingerprinter.is_some() {
            for &f in dropped {
                let at = f as usize * g.fp_per_page;
                if let Some(s) = self.fps.get_mut(at..at + g.fp_per_page) {
                    s.fill(0);
                }
            }
            for (frames, c) in dirty.chunks(g.per_chunk).zip(chunks) {
                for (i, &f) in frames.iter().enumerate() {
                    let at = f as usize * g.fp_per_page;
                    let new = &c.fps[i * g.fp_per_page..(i + 1) * g.fp_per_page];
                    if let Some(s) = self.fps.get_mut(at..at + g.fp_per_page) {
                        s.copy_from_slice(new);
                    }
                }
            }
        }
        for (frames, c) in dirty.chunks(g.per_chunk).zip(chunks) {
            for (i, &f) in frames.iter().enumerate() {
                let base = f << g.page_shift;
                for a in 0..g.per_page {
                    let gid = base + a as u32;
                    if c.nonzero[i] & (1 << a) == 0 {
                        self.table.remove(gid);
                    } else if c.unchanged[i] & (1 << a) == 0 || !self.table.is_present(gid) {
                        self.table.insert(gid, c.hashes[i * g.per_page + a]);
                    }
                }
            }
        }
        let mut order = std::mem::take(&mut self.order);
        order.clear();
        for pass in [false, true] {
            for (frames, c) in dirty.chunks(g.per_chunk).zip(chunks) {
                for (i, &f) in frames.iter().enumerate() {
                    if c.self_used[i] == pass {
                        order.push(f);
                    }
                }
            }
        }
        // Putting pages in `order` leaves exactly the last `capacity` of
        // them when there are more: skip copying the others (but drop their
        // stale copies).
        let keep_from = order.len().saturating_sub(self.cache.capacity());
        for &f in &order[..keep_from] {
            self.cache.remove(f);
        }
        for &f in &order[keep_from..] {
            self.cache.put(f, current.page(f));
        }
        self.order = order;
    }
}

impl SimilarityEncoder {
    pub(crate) fn new(name: String, cfg: SimilarityConfig, threads: usize) -> Self {
        Self {
            name,
            cfg,
            pool: thread_pool(threads),
            state: None,
            outs: Vec::new(),
            chunks: Vec::new(),
        }
    }
}

impl EpochEncoder for SimilarityEncoder {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn init(&mut self, image: &dyn PageView) {
        let frames = image.frame_count() as usize;
        let size = self.cfg.area_size;
        let log2 = size.trailing_zeros();
        let per_page = PAGE_SIZE / size;
        let page_shift = (PAGE_SIZE / size).trailing_zeros();
        let mut table = Table::new(
            self.cfg.resolved_table_bits(frames),
            self.cfg.bucket_candidates,
            frames * per_page,
        );
        let fp_blocks = self.cfg.fp_blocks_per_area();
        let g = size / fp_blocks;
        let fingerprinter = self.cfg.fingerprints.then(|| Fingerprinter::random(g));
        let mut fps = Vec::new();
        if fingerprinter.is_some() {
            fps.reserve_exact(frames * per_page * fp_blocks);
        }
        for f in 0..image.frame_count() {
            for (a, area) in image.page(f).chunks_exact(size).enumerate() {
                let zero = is_zero(area);
                if !zero {
                    table.insert(
                        (f << page_shift) + a as u32,
                        bit_density_hash(area, self.cfg.hash),
                    );
                }
                if let Some(fp) = &fingerprinter {
                    for block in area.chunks_exact(g) {
                        fps.push(if zero { 0 } else { fp.fingerprint(block) });
                    }
                }
            }
        }
        self.state = Some(State {
            log2,
            table,
            cache: PageCache::new(self.cfg.resolved_cache_pages(frames)),
            fps,
            fingerprinter,
            order: Vec::new(),
        });
    }

    fn encode_epoch(
        &mut self,
        current: &dyn PageView,
        dirty: &[u32],
        dropped: &[u32],
        out: &mut Vec<u8>,
    ) -> Result<EpochStats, EncodeError> {
        check_sets(dirty, dropped)?;
        let state = self.state.as_mut().ok_or(EncodeError::NotInitialised)?;
        let size = self.cfg.area_size;
        let per_page = PAGE_SIZE / size;
        let page_shift = per_page.trailing_zeros();
        let max_frame = dirty
            .iter()
            .chain(dropped)
            .max()
            .map_or(0, |&m| m as usize + 1);
        state.table.ensure_areas(max_frame * per_page);
        let fp_blocks = self.cfg.fp_blocks_per_area();
        let fp_per_page = per_page * fp_blocks;
        if state.fingerprinter.is_some() && state.fps.len() < max_frame * fp_per_page {
            // Frames beyond the image read as zero: fingerprint 0. Exact
            // growth: the fingerprints count against the memory budget.
            let want = max_frame * fp_per_page;
            state.fps.reserve_exact(want - state.fps.len());
            state.fps.resize(want, 0);
        }

        // Forget what the encoder can no longer read as I(k-1).
        for &f in dropped {
            state.table.remove_range(f << page_shift, per_page as u32);
            state.cache.remove(f);
        }
        for &f in dirty {
            if !state.cache.contains(f) {
                state.table.remove_range(f << page_shift, per_page as u32);
            }
        }

        let ctx = Ctx {
            size,
            per_page,
            page_shift,
            hash: self.cfg.hash,
            depth: self.cfg.search_depth,
            plain: self.cfg.plain,
            stage: self.cfg.second_stage,
            table: &state.table,
            cache: &state.cache,
            current,
            fingerprints: state
                .fingerprinter
                .as_ref()
                .map(|f| (f, state.fps.as_slice())),
            fp_blocks,
        };
        let per_chunk = self.cfg.chunk_frames.max(1);
        let start = out.len();
        write_header(
            out,
            CodecId::Similarity,
            state.log2 as u8,
            self.cfg.second_stage,
            dirty.len() as u32,
            dropped,
            chunk_count(dirty.len(), per_chunk),
        );
        let geometry = Geometry {
            page_shift,
            per_page,
            fp_per_page,
            per_chunk,
        };
        let n = chunk_count(dirty.len(), per_chunk) as usize;
        if self.outs.len() < n {
            self.outs.resize_with(n, ChunkOut::default);
        }
        let outs = &mut self.outs[..n];
        match self.pool.as_ref() {
            Some(pool) if n > 1 => {
                // Two phases: the chunks' areas in parallel; then, while
                // the update (which needs every chunk's areas but none of
                // their second stage) runs on one thread, the second stage
                // of the chunks on the others.
                if self.chunks.len() < n {
                    self.chunks.resize_with(n, Default::default);
                }
                let chunks = &mut self.chunks[..n];
                let encoded: Result<(), EncodeError> = pool.install(|| {
                    dirty
                        .par_chunks(per_chunk)
                        .zip(chunks.par_iter_mut())
                        .zip(outs.par_iter_mut())
                        .try_for_each(|((frames, (w, _)), o)| {
                            ctx.encode_areas(w, frames, o);
                            w.seal()
                        })
                });
                encoded.inspect_err(|_| out.truncate(start))?;
                let stage = self.cfg.second_stage;
                let outs = &*outs;
                let ((), written) = pool.join(
                    || state.commit(current, dirty, dropped, outs, &geometry),
                    || {
                        chunks.par_iter_mut().try_for_each(|(w, record)| {
                            record.clear();
                            w.write_sealed(stage, record)
                        })
                    },
                );
                written.inspect_err(|_| out.truncate(start))?;
                out.reserve(chunks.iter().map(|(_, record)| record.len()).sum());
                for (_, record) in chunks.iter() {
                    out.extend_from_slice(record);
                }
            }
            _ => {
                for (frames, o) in dirty.chunks(per_chunk).zip(outs.iter_mut()) {
                    ctx.encode_chunk(frames, o, out)
                        .inspect_err(|_| out.truncate(start))?;
                }
                state.commit(current, dirty, dropped, outs, &geometry);
            }
        }
        let mut kinds = KindCounts::default();
        for o in &self.outs[..n] {
            kinds += &o.kinds;
        }

        Ok(EpochStats {
            pages: dirty.len() as u64,
            dropped: dropped.len() as u64,
            raw_bytes: (dirty.len() * PAGE_SIZE) as u64,
            out_bytes: (out.len() - start) as u64,
            kinds,
        })
    }

    fn reference_bytes(&self) -> usize {
        self.state.as_ref().map_or(0, |s| {
            s.table.bytes()
                + s.cache.bytes()
                + s.fps.capacity() * 8
                + s.fingerprinter.as_ref().map_or(0, Fingerprinter::bytes)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decode_epoch, CachePages, CodecSpec, Image, KindCounts};
    use super::*;

    fn noisy_image(frames: u32) -> Image {
        let mut img = Image::zeroed(frames);
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for f in 0..frames {
            for w in img.page_mut(f).chunks_exact_mut(8) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                w.copy_from_slice(&s.to_le_bytes());
            }
        }
        img
    }

    /// Encodes one epoch, checks the round trip, returns the kinds.
    fn epoch(cfg: &SimilarityConfig, edit: impl Fn(&mut Image)) -> (KindCounts, usize) {
        let img = noisy_image(64);
        let mut enc = CodecSpec::Similarity(cfg.clone()).build(1);
        enc.init(&img);
        let mut cur = img.clone();
        edit(&mut cur);
        let dirty: Vec<u32> = (0..64).filter(|&f| cur.page(f) != img.page(f)).collect();
        let mut out = Vec::new();
        let stats = enc.encode_epoch(&cur, &dirty, &[], &mut out).unwrap();
        let mut backup = img.clone();
        decode_epoch(&img, &out, 64).unwrap().apply(&mut backup);
        for f in 0..64 {
            assert!(backup.page(f) == cur.page(f));
        }
        (stats.kinds, out.len())
    }

    fn exact(cache: usize) -> SimilarityConfig {
        SimilarityConfig {
            cache_pages: CachePages::Pages(cache),
            second_stage: SecondStage::None,
            ..SimilarityConfig::default()
        }
    }

    #[test]
    fn uncached_page_with_one_changed_block_is_patched() {
        let (k, len) = epoch(&exact(0), |img| img.page_mut(5)[1000] ^= 1);
        assert_eq!(k.unchanged, 7, "{k:?}");
        assert_eq!(k.raw, 1, "the patch");
        assert!(len < 400, "{len}: one 256-byte block and a few op bytes");
    }

    #[test]
    fn without_fingerprints_an_uncached_change_costs_the_page() {
        let cfg = SimilarityConfig {
            fingerprints: false,
            ..exact(0)
        };
        let (k, len) = epoch(&cfg, |img| img.page_mut(5)[1000] ^= 1);
        assert_eq!(k.unchanged, 0, "{k:?}");
        assert!(len > PAGE_SIZE, "{len}");
    }

    #[test]
    fn copies_are_identical_areas() {
        let (k, len) = epoch(&exact(0), |img| {
            let src = *img.page(7);
            img.set_page(40, &src);
        });
        assert_eq!(k.identical, 8, "{k:?}");
        assert!(len < 100, "{len}: one reference and seven 'next' ops");
    }

    #[test]
    fn copies_with_a_change_are_xor_against_the_copy() {
        let (k, _) = epoch(&exact(0), |img| {
            let mut src = *img.page(7);
            src[100] ^= 0xff;
            img.set_page(40, &src);
        });
        assert_eq!((k.identical, k.xor_other), (7, 1), "{k:?}");
    }

    #[test]
    fn zero_and_sparse_areas() {
        let (k, _) = epoch(&exact(0), |img| {
            let p = img.page_mut(9);
            p.fill(0);
            p[3000] = 7;
        });
        assert_eq!(k.zero, 7, "{k:?}");
        assert_eq!(k.raw, 1, "the sparse area");
    }

    #[test]
    fn cached_pages_are_compared_exactly_and_xored() {
        // Epoch 1 dirties page 5 (cached afterwards); epoch 2 changes a byte.
        let img = noisy_image(64);
        let mut enc = CodecSpec::Similarity(exact(4)).build(1);
        enc.init(&img);
        let mut cur = img.clone();
        let mut backup = img.clone();
        let mut kinds = Vec::new();
        for byte in [1000usize, 2000] {
            cur.page_mut(5)[byte] ^= 1;
            let mut out = Vec::new();
            let s = enc.encode_epoch(&cur, &[5], &[], &mut out).unwrap();
            decode_epoch(&backup, &out, 64).unwrap().apply(&mut backup);
            assert!(backup.page(5) == cur.page(5));
            kinds.push(s.kinds);
        }
        assert_eq!(kinds[1].unchanged, 7, "{:?}", kinds[1]);
        assert_eq!(kinds[1].xor_self, 1, "{:?}", kinds[1]);
    }
}
