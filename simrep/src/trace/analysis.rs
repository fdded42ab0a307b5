//! `simrep analyze`: replays a memory trace through every codec side by side.
//!
//! Each delta epoch `k` of the trace is encoded by every codec from the
//! current image `I(k)` (the encoder never sees `I(k-1)` except through what
//! it kept itself), decoded against `I(k-1)` exactly as a backup would, and
//! the decoded pages are compared with the trace's true contents: any
//! mismatch is an error. Codecs run in parallel, one thread each, and their
//! speed is measured in thread CPU time, so the MB/s figures are per core
//! and do not depend on what else the machine is doing.
//!
//! The paper's Fig. 1 (how similar dirty areas are to what the backup
//! already holds, by area size) is computed alongside: for every non-zero
//! area of a dirty page, the best of the same address's previous contents
//! and up to [`FIG1_BUCKET_CANDIDATES`] areas of `I(k-1)` with the same
//! median bit-density hash, with no memory limit. An exhaustive search over
//! all of memory is out of reach, so the figure is a lower bound of the true
//! best match.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::compress::{
    self, CodecSpec, DecodeError, EncodeError, EpochEncoder, HashThreshold, Image, KindCounts,
    PageView, PAGE_SIZE,
};
use crate::trace::replay::{EpochDelta, Replay};
use crate::trace::TraceError;

/// Candidates kept per hash bucket in the Fig. 1 index.
pub const FIG1_BUCKET_CANDIDATES: usize = 16;

/// Area sizes of the paper's Fig. 1.
pub const FIG1_AREA_SIZES: [usize; 6] = [64, 128, 256, 512, 1024, 2048];

const GIB: f64 = (1u64 << 30) as f64;

/// Errors of the analysis.
#[derive(Debug, thiserror::Error)]
pub enum AnalysisError {
    /// The trace could not be read.
    #[error("reading the trace")]
    ReadTrace(#[from] TraceError),
    /// The trace holds no epoch at all.
    #[error("the trace holds no epoch")]
    EmptyTrace,
    /// A codec failed to encode an epoch.
    #[error("codec {codec}: encoding epoch {epoch} failed")]
    Encode {
        /// Codec name.
        codec: String,
        /// Trace epoch.
        epoch: u32,
        /// What went wrong.
        #[source]
        source: EncodeError,
    },
    /// A codec's own output failed to decode.
    #[error("codec {codec}: decoding epoch {epoch} failed")]
    Decode {
        /// Codec name.
        codec: String,
        /// Trace epoch.
        epoch: u32,
        /// What went wrong.
        #[source]
        source: DecodeError,
    },
    /// Decoding gave contents other than the trace's.
    #[error("codec {codec}: epoch {epoch} decoded wrongly: {what}")]
    Mismatch {
        /// Codec name.
        codec: String,
        /// Trace epoch.
        epoch: u32,
        /// Which page or set differs.
        what: String,
    },
    /// A plot could not be drawn.
    #[error("drawing {path}: {message}")]
    Plot {
        /// Output file.
        path: PathBuf,
        /// The plotting library's message.
        message: String,
    },
    /// An output directory could not be created.
    #[error("creating {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// One codec to run.
#[derive(Clone, Debug)]
pub struct CodecChoice {
    /// The codec and its parameters.
    pub spec: CodecSpec,
    /// Whether this is the default codec (marked `"default": true`).
    pub default: bool,
}

/// What to analyse.
#[derive(Clone, Debug, Default)]
pub struct AnalyzeOptions {
    /// Codecs to run; empty means [`default_codecs`].
    pub codecs: Vec<CodecChoice>,
    /// Area sizes for Fig. 1; empty skips it.
    pub fig1_sizes: Vec<usize>,
    /// Stop after this many delta epochs.
    pub max_epochs: Option<u32>,
}

/// The codecs `simrep analyze` runs when none are named: the default
/// similarity codec, the paper's own configurations, and the baselines.
///
/// The XBZRLE baseline gets the memory budget of the default codec.
pub fn default_codecs() -> Vec<CodecChoice> {
    let mut v = vec![CodecChoice {
        spec: CodecSpec::Similarity(Default::default()),
        default: true,
    }];
    for s in [
        // The paper's plain codec, with its 80 % threshold and with the
        // median threshold (FORMAT.md's reference rows).
        "similarity:preset=paper,hash=fraction80",
        "similarity:preset=paper",
        // cache=0: the default similarity codec's memory budget.
        "xbzrle",
        "zstd",
        "lz4",
        "raw",
    ] {
        if let Ok(spec) = s.parse() {
            v.push(CodecChoice {
                spec,
                default: false,
            });
        }
    }
    v
}

/// Per-epoch figures of one codec.
#[derive(Clone, Debug, Serialize)]
pub struct EpochRow {
    /// Trace epoch.
    pub epoch: u32,
    /// Dirty pages in the epoch.
    pub dirty_pages: u64,
    /// Encoded bytes.
    pub out_bytes: u64,
}

/// How one codec did over the whole trace.
#[derive(Clone, Debug, Serialize)]
pub struct CodecReport {
    /// Short name.
    pub name: String,
    /// Canonical spec (`simrep analyze --codec` reads it back).
    pub spec: String,
    /// The default codec.
    pub default: bool,
    /// A baseline (raw, lz4, zstd, xbzrle) rather than a similarity codec.
    pub baseline: bool,
    /// Raw dirty bytes of the delta epochs.
    pub raw_bytes: u64,
    /// Bytes the codec produced for them.
    pub out_bytes: u64,
    /// `out_bytes` as a percentage of `raw_bytes`.
    pub percent_of_raw: f64,
    /// Encoding speed, MB/s of dirty input per core (thread CPU time).
    pub encode_mb_s: f64,
    /// Decoding speed, MB/s of dirty output per core (thread CPU time).
    pub decode_mb_s: f64,
    /// Most reference memory the encoder held (tables + cache), bytes.
    pub reference_bytes: u64,
    /// The same per GiB of traced image.
    pub reference_bytes_per_gib: f64,
    /// Areas (or pages) by encoding kind.
    pub kinds: KindCounts,
    /// Per-epoch sizes.
    pub epochs: Vec<EpochRow>,
}

/// One point of the paper's Fig. 1.
#[derive(Clone, Debug, Serialize)]
pub struct Fig1Point {
    /// Area size in bytes.
    pub area_size: usize,
    /// Non-zero dirty areas examined.
    pub areas: u64,
    /// Mean share of identical bytes between a dirty area and its best
    /// match, in percent.
    pub mean_identical_percent: f64,
    /// Share of dirty areas with an identical match, in percent.
    pub identical_match_percent: f64,
}

/// The headline comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// The default codec's name.
    pub default_codec: Option<String>,
    /// The smallest baseline other than raw.
    pub best_baseline: Option<String>,
    /// Default codec bytes / best baseline bytes.
    pub ratio_to_best_baseline: Option<f64>,
}

/// Everything `simrep analyze` found.
#[derive(Clone, Debug, Serialize)]
pub struct AnalysisReport {
    /// The trace's description.
    pub description: String,
    /// Epoch length of the capture, ms.
    pub epoch_ms: u32,
    /// Delta epochs replayed (epoch 0, the full image, is not counted).
    pub delta_epochs: u32,
    /// Largest traced image, bytes.
    pub image_bytes: u64,
    /// Dirty pages over the delta epochs.
    pub dirty_pages: u64,
    /// Raw dirty bytes over the delta epochs.
    pub raw_bytes: u64,
    /// One record per codec.
    pub codecs: Vec<CodecReport>,
    /// Fig. 1.
    pub fig1: Vec<Fig1Point>,
    /// The headline comparison.
    pub summary: Summary,
}

/// Progress of a replay, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Epochs done (including epoch 0).
    pub epochs: u32,
    /// Bytes of the trace file read so far.
    pub bytes_read: u64,
}

struct CodecRun {
    choice: CodecChoice,
    encoder: Box<dyn EpochEncoder>,
    buf: Vec<u8>,
    /// Reused epoch after epoch, as a backup does.
    decoded: compress::DecodedEpoch,
    raw_bytes: u64,
    out_bytes: u64,
    encode_ns: u64,
    decode_ns: u64,
    reference_bytes: u64,
    kinds: KindCounts,
    epochs: Vec<EpochRow>,
}

fn thread_cpu_ns() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    match clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID) {
        Ok(t) => t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64,
        Err(_) => 0,
    }
}

impl CodecRun {
    /// Encodes, decodes and checks one epoch.
    fn epoch(&mut self, prev: &Image, truth: &Image, d: &EpochDelta) -> Result<(), AnalysisError> {
        let name = self.encoder.name();
        self.buf.clear();
        let t0 = thread_cpu_ns();
        let stats = self
            .encoder
            .encode_epoch(truth, &d.dirty, &d.dropped, &mut self.buf)
            .map_err(|source| AnalysisError::Encode {
                codec: name.clone(),
                epoch: d.epoch,
                source,
            })?;
        let t1 = thread_cpu_ns();
        compress::decode_epoch_into(prev, &self.buf, truth.frame_count(), &mut self.decoded)
            .map_err(|source| AnalysisError::Decode {
                codec: name.clone(),
                epoch: d.epoch,
                source,
            })?;
        let decoded = &self.decoded;
        let t2 = thread_cpu_ns();
        let mismatch = |what: String| AnalysisError::Mismatch {
            codec: name.clone(),
            epoch: d.epoch,
            what,
        };
        if decoded.frames != d.dirty {
            return Err(mismatch(format!(
                "{} frames decoded, {} dirty (or another order)",
                decoded.frames.len(),
                d.dirty.len()
            )));
        }
        if decoded.dropped != d.dropped {
            return Err(mismatch("the dropped frames differ".into()));
        }
        for (i, &frame) in decoded.frames.iter().enumerate() {
            if decoded.page(i) != truth.page(frame) {
                return Err(mismatch(format!("frame {frame} differs")));
            }
        }
        let raw = d.dirty.len() as u64 * PAGE_SIZE as u64;
        self.raw_bytes += raw;
        self.out_bytes += self.buf.len() as u64;
        self.encode_ns += t1.saturating_sub(t0);
        self.decode_ns += t2.saturating_sub(t1);
        self.reference_bytes = self
            .reference_bytes
            .max(self.encoder.reference_bytes() as u64);
        self.kinds += &stats.kinds;
        self.epochs.push(EpochRow {
            epoch: d.epoch,
            dirty_pages: d.dirty.len() as u64,
            out_bytes: self.buf.len() as u64,
        });
        Ok(())
    }

    fn report(&self, image_bytes: u64) -> CodecReport {
        let mb_s = |ns: u64| {
            if ns == 0 {
                0.0
            } else {
                self.raw_bytes as f64 / 1e6 / (ns as f64 / 1e9)
            }
        };
        CodecReport {
            name: self.encoder.name(),
            spec: self.choice.spec.to_string(),
            default: self.choice.default,
            baseline: !matches!(self.choice.spec, CodecSpec::Similarity(_)),
            raw_bytes: self.raw_bytes,
            out_bytes: self.out_bytes,
            percent_of_raw: percent(self.out_bytes, self.raw_bytes),
            encode_mb_s: mb_s(self.encode_ns),
            decode_mb_s: mb_s(self.decode_ns),
            reference_bytes: self.reference_bytes,
            reference_bytes_per_gib: if image_bytes == 0 {
                0.0
            } else {
                self.reference_bytes as f64 * GIB / image_bytes as f64
            },
            kinds: self.kinds.clone(),
            epochs: self.epochs.clone(),
        }
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// The Fig. 1 index for one area size: every non-zero area of `I(k-1)` by
/// its median bit-density hash.
struct SimIndex {
    area: usize,
    /// Hash of each indexed area, by global area number (`None`: zero area).
    hashes: Vec<Option<u32>>,
    buckets: HashMap<u32, Vec<u32>>,
    areas: u64,
    identical_bytes: u64,
    identical_areas: u64,
}

impl SimIndex {
    fn new(area: usize, image: &Image) -> Self {
        let mut idx = Self {
            area,
            hashes: Vec::new(),
            buckets: HashMap::new(),
            areas: 0,
            identical_bytes: 0,
            identical_areas: 0,
        };
        for frame in 0..image.frame_count() {
            idx.insert_frame(frame, image.page(frame));
        }
        idx
    }

    fn per_page(&self) -> usize {
        PAGE_SIZE / self.area
    }

    fn insert_frame(&mut self, frame: u32, page: &compress::Page) {
        let per = self.per_page();
        let first = frame as usize * per;
        if self.hashes.len() < first + per {
            self.hashes.resize(first + per, None);
        }
        for (i, area) in page.chunks_exact(self.area).enumerate() {
            let slot = first + i;
            if area.iter().all(|&b| b == 0) {
                self.hashes[slot] = None;
                continue;
            }
            let h = compress::hash::bit_density_hash(area, HashThreshold::Median);
            self.hashes[slot] = Some(h);
            let bucket = self.buckets.entry(h).or_default();
            if bucket.len() >= FIG1_BUCKET_CANDIDATES {
                bucket.remove(0);
            }
            bucket.push(slot as u32);
        }
    }

    fn remove_frame(&mut self, frame: u32) {
        let per = self.per_page();
        let first = frame as usize * per;
        for slot in first..(first + per).min(self.hashes.len()) {
            if let Some(h) = self.hashes[slot].take() {
                if let Some(b) = self.buckets.get_mut(&h) {
                    b.retain(|&s| s as usize != slot);
                    if b.is_empty() {
                        self.buckets.remove(&h);
                    }
                }
            }
        }
    }

    /// Measures the dirty areas of one epoch against `prev`, then indexes
    /// the new contents.
    fn epoch(&mut self, prev: &Image, truth: &Image, d: &EpochDelta) {
        let per = self.per_page();
        for &frame in &d.dirty {
            let page = truth.page(frame);
            let old = prev.page(frame);
            for (i, area) in page.chunks_exact(self.area).enumerate() {
                if area.iter().all(|&b| b == 0) {
                    continue;
                }
                let at = i * self.area;
                let mut best = same_bytes(area, &old[at..at + self.area]);
                if best < self.area {
                    let h = compress::hash::bit_density_hash(area, HashThreshold::Median);
                    if let Some(bucket) = self.buckets.get(&h) {
                        for &slot in bucket {
                            let (f, j) = (slot as usize / per, slot as usize % per);
                            let cand = &prev.page(f as u32)[j * self.area..(j + 1) * self.area];
                            best = best.max(same_bytes(area, cand));
                            if best == self.area {
                                break;
                            }
                        }
                    }
                }
                self.areas += 1;
                self.identical_bytes += best as u64;
                self.identical_areas += u64::from(best == self.area);
            }
        }
        for &frame in d.dirty.iter().chain(&d.dropped) {
            self.remove_frame(frame);
        }
        for &frame in &d.dirty {
            self.insert_frame(frame, truth.page(frame));
        }
    }

    fn point(&self) -> Fig1Point {
        Fig1Point {
            area_size: self.area,
            areas: self.areas,
            mean_identical_percent: if self.areas == 0 {
                0.0
            } else {
                100.0 * self.identical_bytes as f64 / (self.areas as f64 * self.area as f64)
            },
            identical_match_percent: percent(self.identical_areas, self.areas),
        }
    }
}

fn same_bytes(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x == y).count()
}

/// Replays `replay` through the chosen codecs and computes Fig. 1.
///
/// # Errors
/// A trace that cannot be read, a codec that fails, or any decoded page that
/// differs from the trace's contents.
pub fn analyze<R: Read>(
    mut replay: Replay<R>,
    opts: &AnalyzeOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<AnalysisReport, AnalysisError> {
    let first = replay.next_epoch()?.ok_or(AnalysisError::EmptyTrace)?;
    tracing::info!(
        epoch = first.epoch,
        frames = replay.frame_count(),
        "initial image read"
    );
    let mut prev = replay.image().clone();
    let mut image_bytes = prev.len_bytes() as u64;

    let choices = if opts.codecs.is_empty() {
        default_codecs()
    } else {
        opts.codecs.clone()
    };
    let mut runs: Vec<CodecRun> = choices
        .into_iter()
        .map(|choice| {
            let mut encoder = choice.spec.build(1);
            encoder.init(&prev);
            CodecRun {
                choice,
                encoder,
                buf: Vec::new(),
                decoded: compress::DecodedEpoch::default(),
                raw_bytes: 0,
                out_bytes: 0,
                encode_ns: 0,
                decode_ns: 0,
                reference_bytes: 0,
                kinds: KindCounts::default(),
                epochs: Vec::new(),
            }
        })
        .collect();
    let mut fig1: Vec<SimIndex> = opts
        .fig1_sizes
        .par_iter()
        .map(|&s| SimIndex::new(s, &prev))
        .collect();

    let mut epochs = 1;
    let mut delta_epochs = 0;
    let mut dirty_pages = 0u64;
    progress(Progress {
        epochs,
        bytes_read: replay.compressed_bytes_read(),
    });
    while opts.max_epochs.is_none_or(|m| delta_epochs < m) {
        let Some(d) = replay.next_epoch()? else {
            break;
        };
        let truth = replay.image();
        image_bytes = image_bytes.max(truth.len_bytes() as u64);
        let (codec_result, ()) = rayon::join(
            || {
                runs.par_iter_mut()
                    .try_for_each(|run| run.epoch(&prev, truth, &d))
            },
            || {
                fig1.par_iter_mut()
                    .for_each(|ix| ix.epoch(&prev, truth, &d))
            },
        );
        codec_result?;
        for &frame in &d.dirty {
            prev.set_page(frame, truth.page(frame));
        }
        for &frame in &d.dropped {
            prev.zero_page(frame);
        }
        dirty_pages += d.dirty.len() as u64;
        delta_epochs += 1;
        epochs += 1;
        tracing::debug!(
            epoch = d.epoch,
            dirty = d.dirty.len(),
            dropped = d.dropped.len(),
            "epoch replayed"
        );
        progress(Progress {
            epochs,
            bytes_read: replay.compressed_bytes_read(),
        });
    }

    let codecs: Vec<CodecReport> = runs.iter().map(|r| r.report(image_bytes)).collect();
    let summary = summarize(&codecs);
    Ok(AnalysisReport {
        description: replay.header().description.clone(),
        epoch_ms: replay.header().epoch_ms,
        delta_epochs,
        image_bytes,
        dirty_pages,
        raw_bytes: dirty_pages * PAGE_SIZE as u64,
        codecs,
        fig1: fig1.iter().map(SimIndex::point).collect(),
        summary,
    })
}

fn summarize(codecs: &[CodecReport]) -> Summary {
    let default = codecs.iter().find(|c| c.default);
    let best = codecs
        .iter()
        .filter(|c| c.baseline && !c.spec.starts_with("raw"))
        .min_by_key(|c| c.out_bytes);
    Summary {
        default_codec: default.map(|c| c.name.clone()),
        best_baseline: best.map(|c| c.name.clone()),
        ratio_to_best_baseline: match (default, best) {
            (Some(d), Some(b)) if b.out_bytes > 0 => Some(d.out_bytes as f64 / b.out_bytes as f64),
            _ => None,
        },
    }
}

/// The report as a plain-text table.
pub fn render_table(r: &AnalysisReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} delta epochs of {} ms, image {:.1} MiB, {} dirty pages ({:.1} MiB raw)",
        r.delta_epochs,
        r.epoch_ms,
        r.image_bytes as f64 / (1 << 20) as f64,
        r.dirty_pages,
        r.raw_bytes as f64 / (1 << 20) as f64
    );
    let _ = writeln!(
        s,
        "{:<46} {:>12} {:>8} {:>10} {:>10} {:>11} {:>9}",
        "codec", "bytes", "% raw", "enc MB/s", "dec MB/s", "ref MiB", "MiB/GiB"
    );
    for c in &r.codecs {
        let mark = if c.default { " *" } else { "" };
        let _ = writeln!(
            s,
            "{:<46} {:>12} {:>8.1} {:>10.0} {:>10.0} {:>11.2} {:>9.1}",
            format!("{}{}", c.spec, mark),
            c.out_bytes,
            c.percent_of_raw,
            c.encode_mb_s,
            c.decode_mb_s,
            c.reference_bytes as f64 / (1 << 20) as f64,
            c.reference_bytes_per_gib / (1 << 20) as f64,
        );
    }
    if let (Some(d), Some(b), Some(ratio)) = (
        &r.summary.default_codec,
        &r.summary.best_baseline,
        r.summary.ratio_to_best_baseline,
    ) {
        let _ = writeln!(
            s,
            "* default; {d} sends {ratio:.2}x the bytes of the best baseline ({b})"
        );
    }
    if !r.fig1.is_empty() {
        let _ = writeln!(
            s,
            "\nFig. 1: similarity of dirty areas to the backup's memory"
        );
        let _ = writeln!(
            s,
            "{:>10} {:>12} {:>18} {:>16}",
            "area B", "areas", "identical bytes %", "identical area %"
        );
        for p in &r.fig1 {
            let _ = writeln!(
                s,
                "{:>10} {:>12} {:>18.1} {:>16.1}",
                p.area_size, p.areas, p.mean_identical_percent, p.identical_match_percent
            );
        }
    }
    s
}

/// Draws `fig1.svg` and `bytes-per-epoch.svg` into `dir`.
///
/// # Errors
/// The directory cannot be created or a plot cannot be written.
pub fn plot(r: &AnalysisReport, dir: &Path) -> Result<Vec<PathBuf>, AnalysisError> {
    use plotters::prelude::*;
    std::fs::create_dir_all(dir).map_err(|source| AnalysisError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut written = Vec::new();
    let err = |path: &Path| {
        let path = path.to_owned();
        move |e: Box<dyn std::error::Error>| AnalysisError::Plot {
            path: path.clone(),
            message: e.to_string(),
        }
    };

    if !r.fig1.is_empty() {
        let path = dir.join("fig1.svg");
        let draw = || -> Result<(), Box<dyn std::error::Error>> {
            let root = SVGBackend::new(&path, (720, 440)).into_drawing_area();
            root.fill(&WHITE)?;
            let xs: Vec<f64> = r.fig1.iter().map(|p| (p.area_size as f64).log2()).collect();
            let (x0, x1) = (
                xs.iter().cloned().fold(f64::MAX, f64::min) - 0.5,
                xs.iter().cloned().fold(f64::MIN, f64::max) + 0.5,
            );
            // One label per half step; only whole steps (powers of two) are
            // printed.
            let labels = ((x1 - x0) * 2.0).round() as usize + 1;
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    "Similarity of dirty areas to the backup's memory",
                    ("sans-serif", 20),
                )
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(56)
                .build_cartesian_2d(x0..x1, 0.0..100.0)?;
            chart
                .configure_mesh()
                .x_desc("area size (bytes)")
                .y_desc("% identical bytes with best match")
                .x_labels(labels)
                .x_label_formatter(&|x| {
                    if (x - x.round()).abs() < 1e-6 {
                        format!("{}", 2f64.powf(x.round()))
                    } else {
                        String::new()
                    }
                })
                .y_label_formatter(&|y| format!("{y:.0}"))
                .draw()?;
            let pts: Vec<(f64, f64)> = r
                .fig1
                .iter()
                .map(|p| ((p.area_size as f64).log2(), p.mean_identical_percent))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), BLUE.stroke_width(2)))?
                .label("mean identical bytes")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLUE));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))?;
            let ident: Vec<(f64, f64)> = r
                .fig1
                .iter()
                .map(|p| ((p.area_size as f64).log2(), p.identical_match_percent))
                .collect();
            chart
                .draw_series(LineSeries::new(ident, RED.stroke_width(2)))?
                .label("areas with an identical match")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], RED));
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(err(&path))?;
        written.push(path);
    }

    let path = dir.join("bytes-per-epoch.svg");
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(&path, (820, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let max_epoch = r
            .codecs
            .iter()
            .flat_map(|c| c.epochs.iter().map(|e| e.epoch))
            .max()
            .unwrap_or(1);
        const MIB: f64 = (1 << 20) as f64;
        let max_mib = r
            .codecs
            .iter()
            .flat_map(|c| c.epochs.iter().map(|e| e.out_bytes as f64 / MIB))
            .fold(0.01, f64::max);
        let mut chart = ChartBuilder::on(&root)
            .caption("Bytes sent per epoch", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(0u32..max_epoch + 1, 0.0..max_mib * 1.05)?;
        chart
            .configure_mesh()
            .x_desc("epoch")
            .y_desc("MiB sent")
            .y_label_formatter(&|y| format!("{y:.1}"))
            .draw()?;
        for (i, c) in r.codecs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts = c.epochs.iter().map(|e| (e.epoch, e.out_bytes as f64 / MIB));
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
                .label(c.spec.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(err(&path))?;
    written.push(path);
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_codecs_all_parse_and_one_is_default() {
        let v = default_codecs();
        assert_eq!(v.len(), 7, "a built-in spec failed to parse");
        assert_eq!(v.iter().filter(|c| c.default).count(), 1);
    }

    fn report(spec: &str, baseline: bool, default: bool, out: u64) -> CodecReport {
        CodecReport {
            name: spec.into(),
            spec: spec.into(),
            default,
            baseline,
            raw_bytes: 1000,
            out_bytes: out,
            percent_of_raw: 0.0,
            encode_mb_s: 0.0,
            decode_mb_s: 0.0,
            reference_bytes: 0,
            reference_bytes_per_gib: 0.0,
            kinds: KindCounts::default(),
            epochs: Vec::new(),
        }
    }

    #[test]
    fn summary_compares_with_the_smallest_baseline_but_raw() {
        let s = summarize(&[
            report("similarity", false, true, 200),
            report("raw", true, false, 100), // never the reference
            report("zstd", true, false, 400),
            report("lz4", true, false, 500),
        ]);
        assert_eq!(s.best_baseline.as_deref(), Some("zstd"));
        assert_eq!(s.ratio_to_best_baseline, Some(0.5));
    }

    fn delta(epoch: u32, dirty: Vec<u32>) -> EpochDelta {
        EpochDelta {
            epoch,
            dirty,
            ..Default::default()
        }
    }

    #[test]
    fn fig1_finds_copies_and_own_previous_contents() {
        let mut prev = Image::zeroed(4);
        for (i, b) in prev.page_mut(0).iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8 + 1;
        }
        let mut truth = prev.clone();
        // Frame 1 becomes a copy of frame 0; frame 2 is zero and stays out.
        let copy = *prev.page(0);
        truth.set_page(1, &copy);
        let mut idx = SimIndex::new(512, &prev);
        idx.epoch(&prev, &truth, &delta(1, vec![1, 2]));
        let p = idx.point();
        assert_eq!(p.areas, 8, "the 8 non-zero areas of frame 1");
        assert_eq!(p.identical_match_percent, 100.0);
        assert_eq!(p.mean_identical_percent, 100.0);
        // The index now holds frame 1's contents: a one-byte change of
        // them matches all but one byte.
        let prev = truth.clone();
        let mut next = truth.clone();
        next.page_mut(1)[0] ^= 0xff;
        idx.epoch(&prev, &next, &delta(2, vec![1]));
        let p = idx.point();
        assert_eq!(p.areas, 16);
        assert!(p.mean_identical_percent < 100.0 && p.mean_identical_percent > 99.9);
    }
}
