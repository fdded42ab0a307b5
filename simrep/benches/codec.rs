//! Codec throughput on synthetic but realistic epochs, single-threaded.
#![allow(missing_docs)] // criterion_group! generates undocumented items
//!
//! The image (16 MiB) mixes zero pages, pointer/integer-like structures,
//! text and random bytes. Each epoch dirties 1024 pages (4 MiB): most are
//! small modifications of their own previous contents (a few words in one
//! or two areas, as in the sample trace, where the median dirty page
//! changes ~8 bytes), some are copies of other pages with changes, some
//! are zero, new text or random. An encoder is initialised and runs one
//! warm-up epoch in the (untimed) setup; the timed routine encodes the
//! next epoch. Decoding is timed against the backup's image, reusing the
//! output buffers (`decode_epoch_into`, a backup's steady state), and for
//! the default codec also into fresh buffers (`decode_epoch`).
//!
//! `cargo bench -p simrep --bench codec` (criterion; medians in
//! `target/criterion`).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use simrep::compress::{
    decode_epoch, decode_epoch_into, decode_epoch_parallel, CodecSpec, DecodedEpoch, EpochEncoder,
    Image, PageView, PAGE_SIZE,
};

const FRAMES: u32 = 4096;
const DIRTY: u32 = 1024;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "account", "balance", "transfer", "the", "commit", "select", "from", "where", "id", "=",
    "memo", "payment", "rent", "coffee", "salary", "insert", "into", "history", "values", "and",
];

fn fill(kind: u64, rng: &mut Rng, p: &mut [u8]) {
    match kind {
        0 => p.fill(0),
        1 => {
            // Structures: small ints, pointers, zero words.
            for w in p.chunks_exact_mut(8) {
                let v = match rng.below(4) {
                    0 => 0,
                    1 => rng.below(1000),
                    2 => 0x0000_7f3a_0000_0000 | (rng.next() & 0xffff_fff8),
                    _ => rng.below(1 << 20) << 3,
                };
                w.copy_from_slice(&v.to_le_bytes());
            }
        }
        2 => {
            let mut at = 0;
            while at < p.len() {
                let w = WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes();
                let n = w.len().min(p.len() - at);
                p[at..at + n].copy_from_slice(&w[..n]);
                at += n;
                if at < p.len() {
                    p[at] = b' ';
                    at += 1;
                }
            }
        }
        _ => {
            for w in p.chunks_exact_mut(8) {
                w.copy_from_slice(&rng.next().to_le_bytes());
            }
        }
    }
}

fn image(rng: &mut Rng) -> Image {
    let mut img = Image::zeroed(FRAMES);
    for f in 0..FRAMES {
        let kind = match rng.below(10) {
            0 | 1 => 0,
            2..=5 => 1,
            6 | 7 => 2,
            _ => 3,
        };
        fill(kind, rng, img.page_mut(f));
    }
    img
}

/// Dirties `DIRTY` frames of `img` (the same hot set every epoch, as in
/// real workloads); returns the sorted dirty list.
fn epoch(img: &mut Image, rng: &mut Rng) -> Vec<u32> {
    let dirty: Vec<u32> = (0..DIRTY).map(|i| i * (FRAMES / DIRTY)).collect();
    for &f in &dirty {
        let mut p = *img.page(f);
        match rng.below(10) {
            0..=5 => {
                // A few words changed in one or two areas.
                let base = rng.below(PAGE_SIZE as u64 - 1024) as usize & !7;
                for _ in 0..1 + rng.below(4) {
                    let at = base + (rng.below(128) as usize) * 8;
                    let v = u64::from_le_bytes(p[at..at + 8].try_into().unwrap())
                        .wrapping_add(1 + rng.below(300));
                    p[at..at + 8].copy_from_slice(&v.to_le_bytes());
                }
            }
            6 => {
                let src = (rng.below(u64::from(FRAMES)) as u32) | 1; // odd: never dirty
                p = *img.page(src);
                let at = rng.below(PAGE_SIZE as u64) as usize;
                p[at] ^= 0x41;
            }
            7 => p.fill(0),
            8 => fill(2, rng, &mut p),
            _ => fill(3, rng, &mut p),
        }
        img.set_page(f, &p);
    }
    dirty
}

/// An encoder that has encoded `img1` after `img0` (so its tables and cache
/// are warm) and an output buffer pre-faulted outside the timing, as a
/// sender reuses its buffer.
fn warm_encoder(
    spec: &CodecSpec,
    threads: usize,
    img0: &Image,
    img1: &Image,
    dirty1: &[u32],
    bytes: u64,
) -> (Box<dyn EpochEncoder>, Vec<u8>) {
    let mut enc = spec.build(threads);
    enc.init(img0);
    let mut out = Vec::new();
    enc.encode_epoch(img1, dirty1, &[], &mut out)
        .expect("encode");
    let mut out = vec![0u8; 2 * bytes as usize];
    out.clear();
    (enc, out)
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let img0 = image(&mut rng);
    let mut img1 = img0.clone();
    let dirty1 = epoch(&mut img1, &mut rng);
    let mut img2 = img1.clone();
    let dirty2 = epoch(&mut img2, &mut rng);
    let bytes = u64::from(DIRTY) * PAGE_SIZE as u64;

    let specs = [
        "raw",
        "lz4",
        "zstd",
        "xbzrle",
        "similarity",
        "similarity:stage=none",
        "similarity:preset=small",
        "similarity:area=128",
        "similarity:area=2048",
        "similarity:fp=off",
        "similarity:hash=fraction80",
        "similarity:fp=off,hash=fraction80",
    ];
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(20);
    group.measurement_time(std::time::Duration::from_secs(3));
    group.warm_up_time(std::time::Duration::from_secs(1));
    for spec in specs {
        let spec: CodecSpec = spec.parse().expect("valid spec");
        let setup = || warm_encoder(&spec, 1, &img0, &img1, &dirty1, bytes);
        group.bench_function(format!("encode/{spec}"), |b| {
            b.iter_batched(
                setup,
                |(mut enc, mut out)| {
                    enc.encode_epoch(&img2, &dirty2, &[], &mut out)
                        .expect("encode");
                    (enc, out)
                },
                BatchSize::PerIteration,
            )
        });
        let (mut enc, mut out) = setup();
        let stats = enc
            .encode_epoch(&img2, &dirty2, &[], &mut out)
            .expect("encode");
        eprintln!(
            "{spec}: {:.2}% of raw, reference memory {} KiB",
            100.0 * stats.out_bytes as f64 / stats.raw_bytes as f64,
            enc.reference_bytes() / 1024
        );
        // Steady state of a backup: output buffers reused epoch after epoch.
        let mut decoded = DecodedEpoch::default();
        group.bench_function(format!("decode/{spec}"), |b| {
            b.iter(|| {
                decode_epoch_into(&img1, &out, img2.frame_count(), &mut decoded).expect("decode")
            })
        });
        if spec == CodecSpec::Similarity(Default::default()) {
            // Fresh output buffers every time (first-touch page faults).
            group.bench_function(format!("decode-fresh/{spec}"), |b| {
                b.iter(|| decode_epoch(&img1, &out, img2.frame_count()).expect("decode"))
            });
        }
    }
    group.finish();

    // Scaling across cores: the default codec on 1 and 2 threads, wall
    // clock. Compare the two medians of one run (the machine is shared).
    let mut group = c.benchmark_group("scaling");
    group.throughput(Throughput::Bytes(bytes));
    group.sample_size(20);
    group.measurement_time(std::time::Duration::from_secs(3));
    group.warm_up_time(std::time::Duration::from_secs(1));
    let spec = CodecSpec::Similarity(Default::default());
    let mut encoded = Vec::new();
    for threads in [1usize, 2] {
        let setup = || warm_encoder(&spec, threads, &img0, &img1, &dirty1, bytes);
        group.bench_function(format!("encode/{threads}-threads"), |b| {
            b.iter_batched(
                setup,
                |(mut enc, mut out)| {
                    enc.encode_epoch(&img2, &dirty2, &[], &mut out)
                        .expect("encode");
                    (enc, out)
                },
                BatchSize::PerIteration,
            )
        });
        if encoded.is_empty() {
            let (mut enc, mut out) = setup();
            enc.encode_epoch(&img2, &dirty2, &[], &mut out)
                .expect("encode");
            encoded = out;
        }
    }
    let pool = simrep::compress::thread_pool(2).expect("thread pool");
    // Both with fresh output buffers, so that they compare.
    group.bench_function("decode/1-thread", |b| {
        b.iter(|| decode_epoch(&img1, &encoded, img2.frame_count()).expect("decode"))
    });
    group.bench_function("decode/2-threads", |b| {
        b.iter(|| {
            decode_epoch_parallel(&img1, &encoded, img2.frame_count(), &pool).expect("decode")
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
