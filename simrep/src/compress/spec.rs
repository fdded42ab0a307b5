//! Codec selection and parameters: [`CodecSpec`] and its textual form.
//!
//! Grammar: `NAME[:KEY=VALUE[,KEY=VALUE...]]`.
//!
//! | spec | codec |
//! |---|---|
//! | `raw` | pages verbatim |
//! | `lz4` | lz4 per page, raw if larger |
//! | `zstd[:level=N]` | zstd (default level 1) over the epoch's concatenated pages |
//! | `xbzrle[:cache=SIZE]` | QEMU-style XBZRLE; without `cache`, the default similarity codec's memory budget for the image |
//! | `similarity[:...]` | the similarity codec, keys below |
//!
//! Similarity keys: `preset=fast|small|paper` (applied first, then the other
//! keys), `area=64..2048` (power of two), `hash=median|fractionP` (P in
//! 1..=99, the paper's is `fraction80`), `table=auto|BITS` (8..=28),
//! `bucket=1..16` (candidates per bucket), `cache=auto|PAGES|SIZE` (SIZE
//! with a `KiB`/`MiB`/`GiB` suffix), `stage=none|lz4|zstd|zstdN`,
//! `depth=1..16` (bucket candidates examined per area), `chunk=1..4096`
//! (dirty frames per chunk), `fp=on|off` (area fingerprints),
//! `search=full|plain` (plain: the paper's bucket-only search).
//!
//! `Display` prints the canonical form, which `FromStr` reads back: only
//! parameters that differ from the defaults are printed.

use std::fmt;
use std::str::FromStr;

use super::baselines::{PageEncoder, XbzrleEncoder, ZstdEpochEncoder};
use super::cache::PageCache;
use super::container::MAX_CHUNK_FRAMES;
use super::similarity::SimilarityEncoder;
use super::{EpochEncoder, PAGE_SIZE};

/// Reference memory the default similarity codec aims for, per byte of
/// image: 64 MiB per GiB (paper Table I: 70 MB for a 1 GB guest).
pub const BUDGET_PER_IMAGE_BYTE: f64 = 64.0 / 1024.0;

/// Size of a fingerprinted block (see [`SimilarityConfig::fingerprints`]).
pub const FP_BLOCK: usize = 256;

/// Which codec, with its parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodecSpec {
    /// Pages verbatim.
    Raw,
    /// lz4 (lz4_flex block) of each page; raw if not smaller.
    Lz4Page,
    /// zstd over the epoch's concatenated pages (in chunks of at most
    /// [`MAX_CHUNK_FRAMES`] pages).
    ZstdEpoch {
        /// zstd compression level.
        level: i32,
    },
    /// Same-address XOR against an LRU cache of previously sent contents,
    /// zero-run/literal-run encoded (QEMU XBZRLE style).
    Xbzrle {
        /// Cache size in bytes of page contents; 0 means the default
        /// similarity codec's memory budget for the image given to `init`.
        cache_bytes: usize,
    },
    /// The similarity codec.
    Similarity(SimilarityConfig),
}

/// How the bit-density hash thresholds a section's popcount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HashThreshold {
    /// Bit set when the section's popcount exceeds the median of the area's
    /// 32 section popcounts.
    Median,
    /// Bit set when the section's popcount exceeds this percentage of the
    /// section's bits (the paper: 80).
    Fraction(u8),
}

/// General-purpose compressor applied to each chunk's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SecondStage {
    /// No second stage.
    None,
    /// lz4_flex block compression.
    Lz4,
    /// zstd at the given level.
    Zstd {
        /// zstd compression level.
        level: i32,
    },
}

/// Size of the cache of recently dirtied pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CachePages {
    /// Whatever fits in the memory budget ([`BUDGET_PER_IMAGE_BYTE`]) of
    /// the image given to `init`, once the tables are accounted for.
    Auto,
    /// A fixed number of pages.
    Pages(usize),
}

/// Parameters of the similarity codec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimilarityConfig {
    /// Area size in bytes: a power of two in 64..=2048.
    pub area_size: usize,
    /// Bit-density hash threshold.
    pub hash: HashThreshold,
    /// Content table size as `log2(buckets)`; 0 means derived from the
    /// number of areas of the image given to `init` (one slot per area,
    /// the paper's 18 bits for 1 GiB at 512-byte areas).
    pub table_bits: u8,
    /// Candidates kept per bucket (1..=16; the paper: 8).
    pub bucket_candidates: usize,
    /// Size of the cache of recently dirtied pages.
    pub cache_pages: CachePages,
    /// Second stage over each chunk.
    pub second_stage: SecondStage,
    /// Bucket candidates examined per area at most (1..=16), closest hash
    /// first.
    pub search_depth: usize,
    /// Dirty frames per chunk (1..=4096): the unit of parallel encoding,
    /// of independent decoding and of the second stage.
    pub chunk_frames: usize,
    /// Keep a keyed universal-hash fingerprint (61 bits) of every
    /// [`FP_BLOCK`]-byte block (or smaller area) of the committed image (8
    /// bytes per block: 3.1 % of the image), so that areas of dirty pages
    /// that are not in the cache can still be sent as unchanged, or
    /// patched (unchanged blocks kept, changed blocks sent). A changed
    /// block is wrongly taken as unchanged with probability below 2^-60
    /// (see [`fingerprint`](super::fingerprint)); cached pages are always
    /// compared exactly. Off: only exact comparisons.
    pub fingerprints: bool,
    /// The paper's plain search (`search=plain`): candidates come from the
    /// area's hash bucket only, the best of them (fewest differing bytes)
    /// wins; no own-previous-contents candidate, no next-area prediction,
    /// no hash-distance filter, no early stop short of an identical match,
    /// no sparse op. For reproducing the paper's figures, not for use.
    pub plain: bool,
}

/// The measured default. On the sample trace (CPython + SQLite, 25 MiB,
/// 8 epochs; 1.6 MiB of reference memory) the median threshold and the
/// 80 % fraction give about the same size (the fingerprints and the patch
/// do most of the work there), but on pages copied from elsewhere the
/// median finds the copies and the fraction does not (synthetic bench:
/// 17.8 % vs 22.1 % of raw), so the median is the default. 512-byte
/// areas with 256-byte fingerprint blocks; lz4 second stage.
impl Default for SimilarityConfig {
    fn default() -> Self {
        Self {
            area_size: 512,
            hash: HashThreshold::Median,
            table_bits: 0,
            bucket_candidates: 8,
            cache_pages: CachePages::Auto,
            second_stage: SecondStage::Lz4,
            search_depth: 4,
            chunk_frames: 256,
            fingerprints: true,
            plain: false,
        }
    }
}

impl SimilarityConfig {
    /// The `fast` preset (the default).
    pub fn fast() -> Self {
        Self::default()
    }

    /// The `small` preset: smaller output, slower (zstd second stage,
    /// deeper search).
    pub fn small() -> Self {
        Self {
            second_stage: SecondStage::Zstd { level: 1 },
            search_depth: 8,
            ..Self::default()
        }
    }

    /// The `paper` preset: the plain codec of the paper (section III) as
    /// FORMAT.md's reference rows measure it: 18-bit table, 8 candidates
    /// per bucket, all of them examined, a 5120-page cache, no
    /// fingerprints, no second stage, plain search.
    pub fn paper() -> Self {
        Self {
            table_bits: 18,
            bucket_candidates: 8,
            search_depth: 8,
            cache_pages: CachePages::Pages(5120),
            second_stage: SecondStage::None,
            fingerprints: false,
            plain: true,
            ..Self::default()
        }
    }

    /// Table bits to use for an image of `frames` frames. Auto: at most
    /// one slot per area (the paper's 18 bits for 1 GiB at 512-byte
    /// areas), and at most half of what the memory budget leaves after the
    /// per-area arrays (the other half goes to the cache).
    pub fn resolved_table_bits(&self, frames: usize) -> u32 {
        if self.table_bits != 0 {
            return u32::from(self.table_bits);
        }
        let k = self.bucket_candidates.max(1);
        let areas = frames * (PAGE_SIZE / self.area_size.max(1));
        let one_per_area = (areas / k).max(1).ilog2();
        let spare = budget_bytes(frames).saturating_sub(self.per_area_bytes(frames)) / 2;
        let fits = (spare / (8 * k)).max(1).ilog2();
        one_per_area.min(fits).clamp(8, 24)
    }

    /// Fingerprinted blocks per area: blocks of [`FP_BLOCK`] bytes, or the
    /// whole area when it is smaller.
    pub fn fp_blocks_per_area(&self) -> usize {
        (self.area_size / FP_BLOCK).max(1)
    }

    /// Bytes of the per-area arrays (hash, presence bit, fingerprints).
    fn per_area_bytes(&self, frames: usize) -> usize {
        let areas = frames * (PAGE_SIZE / self.area_size.max(1));
        let fps = if self.fingerprints {
            8 * areas * self.fp_blocks_per_area()
        } else {
            0
        };
        4 * areas + areas.div_ceil(64) * 8 + fps
    }

    /// Bytes of the content table (and fingerprints) for an image of
    /// `frames` frames.
    pub fn table_bytes(&self, frames: usize) -> usize {
        ((8 * self.bucket_candidates.max(1)) << self.resolved_table_bits(frames))
            + self.per_area_bytes(frames)
    }

    /// Cache pages to use for an image of `frames` frames.
    pub fn resolved_cache_pages(&self, frames: usize) -> usize {
        match self.cache_pages {
            CachePages::Pages(n) => n,
            CachePages::Auto => {
                let budget = budget_bytes(frames);
                let fixed = self.table_bytes(frames) + PageCache::bytes_when_full(0, frames);
                budget.saturating_sub(fixed) / (PAGE_SIZE + 12)
            }
        }
    }

    fn check(&self) -> Result<(), ParseSpecError> {
        if !(64..=2048).contains(&self.area_size) || !self.area_size.is_power_of_two() {
            return Err(ParseSpecError::new(format!(
                "area size {} is not a power of two in 64..=2048",
                self.area_size
            )));
        }
        if let HashThreshold::Fraction(p) = self.hash {
            if !(1..=99).contains(&p) {
                return Err(ParseSpecError::new(format!(
                    "hash fraction {p} not in 1..=99"
                )));
            }
        }
        if self.table_bits != 0 && !(8..=28).contains(&self.table_bits) {
            return Err(ParseSpecError::new(format!(
                "table bits {} not in 8..=28",
                self.table_bits
            )));
        }
        if !(1..=16).contains(&self.bucket_candidates) {
            return Err(ParseSpecError::new("bucket candidates not in 1..=16"));
        }
        if !(1..=16).contains(&self.search_depth) {
            return Err(ParseSpecError::new("search depth not in 1..=16"));
        }
        if !(1..=MAX_CHUNK_FRAMES as usize).contains(&self.chunk_frames) {
            return Err(ParseSpecError::new("chunk frames not in 1..=4096"));
        }
        Ok(())
    }
}

/// The default memory budget for an image of `frames` frames.
pub fn budget_bytes(frames: usize) -> usize {
    (frames as f64 * PAGE_SIZE as f64 * BUDGET_PER_IMAGE_BYTE) as usize
}

/// A codec spec that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid codec spec: {0}")]
pub struct ParseSpecError(String);

impl ParseSpecError {
    fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

fn parse_size(v: &str) -> Result<usize, ParseSpecError> {
    let bad = || ParseSpecError::new(format!("bad size {v:?}"));
    let (num, mult) = if let Some(n) = v.strip_suffix("GiB") {
        (n, 1usize << 30)
    } else if let Some(n) = v.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = v.strip_suffix("KiB") {
        (n, 1 << 10)
    } else {
        (v, 1)
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(bad)
}

fn fmt_size(bytes: usize) -> String {
    for (suffix, unit) in [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

fn parse_stage(v: &str) -> Result<SecondStage, ParseSpecError> {
    match v {
        "none" => Ok(SecondStage::None),
        "lz4" => Ok(SecondStage::Lz4),
        "zstd" => Ok(SecondStage::Zstd { level: 1 }),
        _ => v
            .strip_prefix("zstd")
            .and_then(|l| l.parse::<i32>().ok())
            .filter(|l| (-7..=22).contains(l))
            .map(|level| SecondStage::Zstd { level })
            .ok_or_else(|| ParseSpecError::new(format!("unknown stage {v:?}"))),
    }
}

impl fmt::Display for SecondStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecondStage::None => f.write_str("none"),
            SecondStage::Lz4 => f.write_str("lz4"),
            SecondStage::Zstd { level: 1 } => f.write_str("zstd"),
            SecondStage::Zstd { level } => write!(f, "zstd{level}"),
        }
    }
}

impl fmt::Display for HashThreshold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashThreshold::Median => f.write_str("median"),
            HashThreshold::Fraction(p) => write!(f, "fraction{p}"),
        }
    }
}

fn parse_similarity(params: &[(&str, &str)]) -> Result<SimilarityConfig, ParseSpecError> {
    let mut cfg = SimilarityConfig::default();
    for &(k, v) in params {
        if k == "preset" {
            cfg = match v {
                "fast" => SimilarityConfig::fast(),
                "small" => SimilarityConfig::small(),
                "paper" => SimilarityConfig::paper(),
                _ => return Err(ParseSpecError::new(format!("unknown preset {v:?}"))),
            };
        }
    }
    let num = |v: &str| {
        v.parse::<usize>()
            .map_err(|_| ParseSpecError::new(format!("bad number {v:?}")))
    };
    for &(k, v) in params {
        match k {
            "preset" => {}
            "area" => cfg.area_size = num(v)?,
            "hash" => {
                cfg.hash = if v == "median" {
                    HashThreshold::Median
                } else if let Some(p) = v.strip_prefix("fraction") {
                    HashThreshold::Fraction(
                        p.parse()
                            .map_err(|_| ParseSpecError::new(format!("bad hash {v:?}")))?,
                    )
                } else {
                    return Err(ParseSpecError::new(format!("unknown hash {v:?}")));
                }
            }
            "table" => {
                cfg.table_bits = if v == "auto" {
                    0
                } else {
                    u8::try_from(num(v)?).map_err(|_| ParseSpecError::new("table bits too big"))?
                }
            }
            "bucket" => cfg.bucket_candidates = num(v)?,
            "depth" => cfg.search_depth = num(v)?,
            "chunk" => cfg.chunk_frames = num(v)?,
            "fp" => {
                cfg.fingerprints = match v {
                    "on" => true,
                    "off" => false,
                    _ => {
                        return Err(ParseSpecError::new(format!(
                            "fp must be on or off, got {v:?}"
                        )))
                    }
                }
            }
            "cache" => {
                cfg.cache_pages = if v == "auto" {
                    CachePages::Auto
                } else if v.ends_with("iB") {
                    CachePages::Pages(parse_size(v)? / PAGE_SIZE)
                } else {
                    CachePages::Pages(num(v)?)
                }
            }
            "stage" => cfg.second_stage = parse_stage(v)?,
            "search" => {
                cfg.plain = match v {
                    "plain" => true,
                    "full" => false,
                    _ => {
                        return Err(ParseSpecError::new(format!(
                            "search must be plain or full, got {v:?}"
                        )))
                    }
                }
            }
            _ => return Err(ParseSpecError::new(format!("unknown similarity key {k:?}"))),
        }
    }
    cfg.check()?;
    Ok(cfg)
}

impl FromStr for CodecSpec {
    type Err = ParseSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, rest) = s.split_once(':').unwrap_or((s, ""));
        let mut params = Vec::new();
        for kv in rest.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| ParseSpecError::new(format!("expected key=value, got {kv:?}")))?;
            params.push((k.trim(), v.trim()));
        }
        let no_params = |spec: CodecSpec| {
            if params.is_empty() {
                Ok(spec)
            } else {
                Err(ParseSpecError::new(format!("{name} takes no parameters")))
            }
        };
        match name.trim() {
            "raw" => no_params(CodecSpec::Raw),
            "lz4" => no_params(CodecSpec::Lz4Page),
            "zstd" => {
                let mut level = 1;
                for (k, v) in &params {
                    match *k {
                        "level" => {
                            level = v
                                .parse::<i32>()
                                .ok()
                                .filter(|l| (-7..=22).contains(l))
                                .ok_or_else(|| ParseSpecError::new(format!("bad level {v:?}")))?
                        }
                        _ => return Err(ParseSpecError::new(format!("unknown zstd key {k:?}"))),
                    }
                }
                Ok(CodecSpec::ZstdEpoch { level })
            }
            "xbzrle" => {
                let mut cache_bytes = 0;
                for (k, v) in &params {
                    match *k {
                        "cache" => cache_bytes = if *v == "auto" { 0 } else { parse_size(v)? },
                        _ => return Err(ParseSpecError::new(format!("unknown xbzrle key {k:?}"))),
                    }
                }
                Ok(CodecSpec::Xbzrle { cache_bytes })
            }
            "similarity" => Ok(CodecSpec::Similarity(parse_similarity(&params)?)),
            other => Err(ParseSpecError::new(format!("unknown codec {other:?}"))),
        }
    }
}

impl fmt::Display for CodecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecSpec::Raw => f.write_str("raw"),
            CodecSpec::Lz4Page => f.write_str("lz4"),
            CodecSpec::ZstdEpoch { level: 1 } => f.write_str("zstd"),
            CodecSpec::ZstdEpoch { level } => write!(f, "zstd:level={level}"),
            CodecSpec::Xbzrle { cache_bytes: 0 } => f.write_str("xbzrle"),
            CodecSpec::Xbzrle { cache_bytes } => {
                write!(f, "xbzrle:cache={}", fmt_size(*cache_bytes))
            }
            CodecSpec::Similarity(c) => {
                let d = SimilarityConfig::default();
                let mut parts = Vec::new();
                if c.area_size != d.area_size {
                    parts.push(format!("area={}", c.area_size));
                }
                if c.hash != d.hash {
                    parts.push(format!("hash={}", c.hash));
                }
                if c.table_bits != d.table_bits {
                    parts.push(format!("table={}", c.table_bits));
                }
                if c.bucket_candidates != d.bucket_candidates {
                    parts.push(format!("bucket={}", c.bucket_candidates));
                }
                if c.cache_pages != d.cache_pages {
                    match c.cache_pages {
                        CachePages::Auto => parts.push("cache=auto".into()),
                        CachePages::Pages(n) => parts.push(format!("cache={n}")),
                    }
                }
                if c.second_stage != d.second_stage {
                    parts.push(format!("stage={}", c.second_stage));
                }
                if c.search_depth != d.search_depth {
                    parts.push(format!("depth={}", c.search_depth));
                }
                if c.chunk_frames != d.chunk_frames {
                    parts.push(format!("chunk={}", c.chunk_frames));
                }
                if c.fingerprints != d.fingerprints {
                    parts.push(format!("fp={}", if c.fingerprints { "on" } else { "off" }));
                }
                if c.plain != d.plain {
                    parts.push(format!("search={}", if c.plain { "plain" } else { "full" }));
                }
                if parts.is_empty() {
                    f.write_str("similarity")
                } else {
                    write!(f, "similarity:{}", parts.join(","))
                }
            }
        }
    }
}

impl CodecSpec {
    /// Builds an encoder. `threads` is the number of threads it may use to
    /// encode chunks in parallel (1 = single-threaded, in the caller's
    /// thread; more = a private rayon pool of that size).
    pub fn build(&self, threads: usize) -> Box<dyn EpochEncoder> {
        let name = match self {
            CodecSpec::ZstdEpoch { level } => format!("zstd-{level}"),
            other => other.to_string(),
        };
        match self {
            CodecSpec::Raw => Box::new(PageEncoder::new(name, threads, false)),
            CodecSpec::Lz4Page => Box::new(PageEncoder::new(name, threads, true)),
            CodecSpec::ZstdEpoch { level } => {
                Box::new(ZstdEpochEncoder::new(name, *level, threads))
            }
            CodecSpec::Xbzrle { cache_bytes } => {
                Box::new(XbzrleEncoder::new(name, *cache_bytes, threads))
            }
            CodecSpec::Similarity(cfg) => {
                Box::new(SimilarityEncoder::new(name, cfg.clone(), threads))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display_round_trip() {
        for s in [
            "raw",
            "lz4",
            "zstd",
            "zstd:level=3",
            "xbzrle",
            "xbzrle:cache=64MiB",
            "similarity",
            "similarity:area=256,hash=fraction80,stage=zstd",
            "similarity:table=12,bucket=4,cache=100,stage=none,depth=2,chunk=64,fp=off",
            "similarity:stage=zstd-3",
        ] {
            let spec: CodecSpec = s.parse().unwrap();
            assert_eq!(spec.to_string(), s);
            assert_eq!(spec.to_string().parse::<CodecSpec>().unwrap(), spec);
        }
    }

    #[test]
    fn presets_and_sizes() {
        let spec: CodecSpec = "similarity:preset=small,depth=2".parse().unwrap();
        let CodecSpec::Similarity(c) = &spec else {
            panic!()
        };
        assert_eq!(c.second_stage, SecondStage::Zstd { level: 1 });
        assert_eq!(c.search_depth, 2);
        let spec: CodecSpec = "similarity:cache=4MiB".parse().unwrap();
        assert_eq!(spec.to_string(), "similarity:cache=1024");
        let spec: CodecSpec = "xbzrle:cache=65536".parse().unwrap();
        assert_eq!(spec.to_string(), "xbzrle:cache=64KiB");
    }

    #[test]
    fn parse_errors() {
        for s in [
            "nope",
            "raw:x=1",
            "similarity:area=100",
            "similarity:area=4096",
            "similarity:hash=fraction0",
            "similarity:hash=mean",
            "similarity:table=3",
            "similarity:bucket=0",
            "similarity:stage=gzip",
            "similarity:frob=1",
            "similarity:area",
            "zstd:level=99",
            "xbzrle:cache=lots",
        ] {
            assert!(s.parse::<CodecSpec>().is_err(), "{s}");
        }
    }

    #[test]
    fn defaults_scale_with_the_image() {
        let c = SimilarityConfig::default();
        let gib = 1 << 18; // frames in 1 GiB
                           // One slot per area would be the paper's 18 bits; the fingerprints
                           // leave room for 17 within the budget.
        assert_eq!(c.resolved_table_bits(gib), 17);
        let no_fp = SimilarityConfig {
            fingerprints: false,
            ..c.clone()
        };
        assert_eq!(no_fp.resolved_table_bits(gib), 18);
        let budget = budget_bytes(gib);
        assert_eq!(budget, 64 << 20);
        let cache = c.resolved_cache_pages(gib);
        // Fingerprints (32 MiB/GiB) leave room for ~3.7k cached pages per GiB.
        assert!(cache >= 3000, "{cache}");
        assert!(c.table_bytes(gib) + PageCache::bytes_when_full(cache, gib) <= budget);
        // Explicit values override.
        let c = SimilarityConfig {
            table_bits: 12,
            cache_pages: CachePages::Pages(7),
            ..c
        };
        assert_eq!(c.resolved_table_bits(gib), 12);
        assert_eq!(c.resolved_cache_pages(gib), 7);
    }
}
