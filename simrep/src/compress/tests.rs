//! Round trips of every codec over several epochs, and decoder robustness.

use proptest::prelude::*;

use super::*;

/// How a test page is made.
#[derive(Clone, Debug)]
enum Recipe {
    Zero,
    Fill(u8),
    Pattern {
        seed: u64,
        period: u16,
    },
    /// A copy of another frame (index taken modulo the frames that exist)
    /// with a few bytes changed.
    Copy {
        src: u32,
        muts: Vec<(u16, u8)>,
    },
    /// Another frame shifted by some bytes (similar, not aligned).
    Shift {
        src: u32,
        by: u16,
    },
    Random(u64),
}

fn xorshift(mut s: u64) -> impl FnMut() -> u64 {
    s |= 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

fn make_page(r: &Recipe, image: &Image) -> Page {
    let mut p = [0u8; PAGE_SIZE];
    let n = image.frame_count().max(1);
    match r {
        Recipe::Zero => {}
        Recipe::Fill(b) => p.fill(*b),
        Recipe::Pattern { seed, period } => {
            let mut rng = xorshift(*seed);
            let unit: Vec<u8> = (0..*period).map(|_| rng() as u8).collect();
            for (i, b) in p.iter_mut().enumerate() {
                *b = unit[i % unit.len()];
            }
        }
        Recipe::Copy { src, muts } => {
            p = *image.page(src % n);
            for &(at, v) in muts {
                p[at as usize % PAGE_SIZE] = v;
            }
        }
        Recipe::Shift { src, by } => {
            let s = image.page(src % n);
            let by = *by as usize % PAGE_SIZE;
            p[by..].copy_from_slice(&s[..PAGE_SIZE - by]);
        }
        Recipe::Random(seed) => {
            let mut rng = xorshift(*seed);
            for w in p.chunks_exact_mut(8) {
                w.copy_from_slice(&rng().to_le_bytes());
            }
        }
    }
    p
}

fn recipe() -> impl Strategy<Value = Recipe> {
    prop_oneof![
        1 => Just(Recipe::Zero),
        1 => any::<u8>().prop_map(Recipe::Fill),
        1 => (any::<u64>(), 1u16..200).prop_map(|(seed, period)| Recipe::Pattern { seed, period }),
        5 => (any::<u32>(), prop::collection::vec((any::<u16>(), any::<u8>()), 0..24))
            .prop_map(|(src, muts)| Recipe::Copy { src, muts }),
        1 => (any::<u32>(), 1u16..600).prop_map(|(src, by)| Recipe::Shift { src, by }),
        1 => any::<u64>().prop_map(Recipe::Random),
    ]
}

#[derive(Clone, Debug)]
struct EpochPlan {
    writes: Vec<(u32, Recipe)>,
    drops: Vec<u32>,
}

#[derive(Clone, Debug)]
struct Scenario {
    initial: Vec<Recipe>,
    epochs: Vec<EpochPlan>,
}

const MAX_TEST_FRAME: u32 = 72;

fn scenario() -> impl Strategy<Value = Scenario> {
    let epoch = (
        prop::collection::vec((0u32..MAX_TEST_FRAME, recipe()), 0..40),
        prop::collection::vec(0u32..MAX_TEST_FRAME, 0..4),
    )
        .prop_map(|(writes, drops)| EpochPlan { writes, drops });
    (
        prop::collection::vec(recipe(), 1..64),
        prop::collection::vec(epoch, 1..5),
    )
        .prop_map(|(initial, epochs)| Scenario { initial, epochs })
}

fn similarity_config() -> impl Strategy<Value = SimilarityConfig> {
    (
        6u32..=11,
        prop_oneof![
            Just(HashThreshold::Median),
            (50u8..95).prop_map(HashThreshold::Fraction)
        ],
        prop_oneof![Just(0u8), 8u8..=10],
        1usize..=8,
        prop_oneof![
            Just(CachePages::Auto),
            (0usize..6).prop_map(CachePages::Pages)
        ],
        prop_oneof![
            Just(SecondStage::None),
            Just(SecondStage::Lz4),
            Just(SecondStage::Zstd { level: 1 })
        ],
        1usize..=8,
        1usize..=9,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(log2, hash, table_bits, bucket, cache, stage, depth, chunk, fingerprints, plain)| {
                SimilarityConfig {
                    area_size: 1 << log2,
                    hash,
                    table_bits,
                    bucket_candidates: bucket,
                    cache_pages: cache,
                    second_stage: stage,
                    search_depth: depth,
                    chunk_frames: chunk,
                    fingerprints,
                    plain,
                }
            },
        )
}

fn codec_spec() -> impl Strategy<Value = CodecSpec> {
    prop_oneof![
        1 => Just(CodecSpec::Raw),
        1 => Just(CodecSpec::Lz4Page),
        1 => (1i32..=3).prop_map(|level| CodecSpec::ZstdEpoch { level }),
        1 => prop_oneof![Just(0usize), (0usize..6).prop_map(|p| p * PAGE_SIZE)]
            .prop_map(|cache_bytes| CodecSpec::Xbzrle { cache_bytes }),
        4 => similarity_config().prop_map(CodecSpec::Similarity),
    ]
}

/// Runs a scenario through `spec`, checking after every epoch that the
/// backup decodes to exactly the primary's image. Returns the encodings.
fn run(spec: &CodecSpec, threads: usize, sc: &Scenario) -> Vec<Vec<u8>> {
    let mut primary = Image::default();
    for r in &sc.initial {
        let p = make_page(r, &primary);
        let f = primary.frame_count();
        primary.set_page(f, &p);
    }
    let mut backup = primary.clone();
    let mut enc = spec.build(threads);
    enc.init(&primary);
    let pool = super::thread_pool(2).unwrap();
    let mut encodings = Vec::new();
    let mut reused = DecodedEpoch::default();
    for plan in &sc.epochs {
        let mut dirty = Vec::new();
        for (f, r) in &plan.writes {
            let p = make_page(r, &primary);
            primary.set_page(*f, &p);
            dirty.push(*f);
        }
        dirty.sort_unstable();
        dirty.dedup();
        let mut dropped: Vec<u32> = plan
            .drops
            .iter()
            .copied()
            .filter(|f| dirty.binary_search(f).is_err())
            .collect();
        dropped.sort_unstable();
        dropped.dedup();
        for &f in &dropped {
            primary.zero_page(f);
        }
        let mut out = Vec::new();
        let stats = enc
            .encode_epoch(&primary, &dirty, &dropped, &mut out)
            .unwrap();
        assert_eq!(stats.out_bytes as usize, out.len());
        assert_eq!(stats.pages as usize, dirty.len());
        let decoded = decode_epoch(&backup, &out, MAX_TEST_FRAME).unwrap();
        let parallel = decode_epoch_parallel(&backup, &out, MAX_TEST_FRAME, &pool).unwrap();
        assert_eq!(decoded, parallel);
        decode_epoch_into(&backup, &out, MAX_TEST_FRAME, &mut reused).unwrap();
        assert_eq!(decoded, reused);
        assert_eq!(decoded.frames, dirty);
        assert_eq!(decoded.dropped, dropped);
        decoded.apply(&mut backup);
        let n = primary.frame_count().max(backup.frame_count());
        for f in 0..n {
            assert!(
                primary.page(f) == backup.page(f),
                "{spec}: frame {f} differs"
            );
        }
        encodings.push(out);
    }
    encodings
}

proptest! {
    // 96 cases by default; PROPTEST_CASES overrides (longer soak runs).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_codec_round_trips(spec in codec_spec(), threads in 1usize..=2, sc in scenario()) {
        run(&spec, threads, &sc);
    }

    /// With a pool, chunks are encoded in parallel and their second stage
    /// overlaps the table update: the bytes are those of one thread.
    #[test]
    fn similarity_writes_the_same_bytes_on_one_and_two_threads(
        cfg in similarity_config(),
        sc in scenario(),
    ) {
        let spec = CodecSpec::Similarity(cfg);
        prop_assert_eq!(run(&spec, 1, &sc), run(&spec, 2, &sc));
    }

    #[test]
    fn decode_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let img = Image::zeroed(4);
        let _ = decode_epoch(&img, &bytes, 16);
        // Also behind a valid header, to reach the chunk parser.
        let mut v = b"SRCE\x01\x05\x09\x01".to_vec();
        v.extend_from_slice(&bytes);
        let _ = decode_epoch(&img, &v, 16);
    }

    #[test]
    fn decode_corrupted_encodings_never_panics(
        spec in codec_spec(),
        sc in scenario(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let encodings = run(&spec, 1, &sc);
        let img = Image::zeroed(8);
        for e in encodings.iter().filter(|e| !e.is_empty()) {
            let mut bad = e.clone();
            for (at, x) in &flips {
                let i = at.index(bad.len());
                bad[i] ^= x | 1;
            }
            let _ = decode_epoch(&img, &bad, MAX_TEST_FRAME);
            let _ = decode_epoch(&img, &e[..cut.index(e.len())], MAX_TEST_FRAME);
        }
    }
}

#[test]
fn many_chunks_in_parallel_for_every_codec() {
    // 700 dirty frames: several chunks even at the default chunk size.
    let sc = Scenario {
        initial: (0..300u64)
            .map(|i| {
                if i % 3 == 0 {
                    Recipe::Random(i)
                } else {
                    Recipe::Copy {
                        src: i as u32 / 2,
                        muts: vec![(i as u16 * 7, i as u8)],
                    }
                }
            })
            .collect(),
        epochs: vec![
            EpochPlan {
                writes: (0..700u32)
                    .map(|f| {
                        (
                            f,
                            Recipe::Copy {
                                src: f * 5,
                                muts: vec![(f as u16, 1), (999, f as u8)],
                            },
                        )
                    })
                    .collect(),
                drops: vec![],
            },
            EpochPlan {
                writes: (0..700u32)
                    .step_by(2)
                    .map(|f| {
                        (
                            f,
                            Recipe::Copy {
                                src: f,
                                muts: vec![(3, 3)],
                            },
                        )
                    })
                    .collect(),
                drops: vec![701, 703],
            },
        ],
    };
    for spec in [
        "raw",
        "lz4",
        "zstd",
        "xbzrle",
        "xbzrle:cache=64KiB",
        "similarity",
        "similarity:preset=small",
        "similarity:area=64,cache=3",
    ] {
        let spec: CodecSpec = spec.parse().unwrap();
        for threads in [1, 2] {
            let mut sc = sc.clone();
            // Frames up to 703 must be legal for the decoder.
            sc.epochs[1].drops.retain(|&f| f < 704);
            run_big(&spec, threads, &sc);
        }
    }
}

fn run_big(spec: &CodecSpec, threads: usize, sc: &Scenario) {
    let mut primary = Image::default();
    for r in &sc.initial {
        let p = make_page(r, &primary);
        let f = primary.frame_count();
        primary.set_page(f, &p);
    }
    let mut backup = primary.clone();
    let mut enc = spec.build(threads);
    enc.init(&primary);
    for plan in &sc.epochs {
        let mut dirty: Vec<u32> = plan.writes.iter().map(|w| w.0).collect();
        for (f, r) in &plan.writes {
            let p = make_page(r, &primary);
            primary.set_page(*f, &p);
        }
        dirty.sort_unstable();
        dirty.dedup();
        for &f in &plan.drops {
            primary.zero_page(f);
        }
        let mut out = Vec::new();
        let stats = enc
            .encode_epoch(&primary, &dirty, &plan.drops, &mut out)
            .unwrap();
        assert!(
            stats.out_bytes <= stats.raw_bytes + 64 * stats.pages + 1024,
            "{spec}"
        );
        let d = decode_epoch(&backup, &out, 1024).unwrap();
        d.apply(&mut backup);
        for f in 0..primary.frame_count() {
            assert!(primary.page(f) == backup.page(f), "{spec} frame {f}");
        }
    }
}

#[test]
fn encoder_rejects_bad_frame_sets() {
    let img = Image::zeroed(4);
    for spec in ["raw", "similarity", "xbzrle"] {
        let mut enc = spec.parse::<CodecSpec>().unwrap().build(1);
        enc.init(&img);
        let mut out = Vec::new();
        assert!(matches!(
            enc.encode_epoch(&img, &[2, 1], &[], &mut out),
            Err(EncodeError::NotSorted { list: "dirty", .. })
        ));
        assert!(matches!(
            enc.encode_epoch(&img, &[1], &[1, 1], &mut out),
            Err(EncodeError::NotSorted {
                list: "dropped",
                ..
            })
        ));
        assert!(matches!(
            enc.encode_epoch(&img, &[1], &[1], &mut out),
            Err(EncodeError::DirtyAndDropped { frame: 1 })
        ));
        assert!(matches!(
            enc.encode_epoch(&img, &[MAX_FRAMES], &[], &mut out),
            Err(EncodeError::FrameTooLarge { .. })
        ));
        assert!(out.is_empty());
    }
    let mut enc = CodecSpec::Similarity(SimilarityConfig::default()).build(1);
    assert!(matches!(
        enc.encode_epoch(&img, &[1], &[], &mut Vec::new()),
        Err(EncodeError::NotInitialised)
    ));
}

#[test]
fn similar_pages_compress_and_reference_memory_is_bounded() {
    // Copies of other pages with one byte changed: found through the
    // content table. 16 MiB image: budget 1 MiB.
    let ratio = |spec: &str| {
        let frames = 4096u32;
        let mut img = Image::zeroed(frames);
        let mut rng = xorshift(7);
        for f in 0..frames / 2 {
            for w in img.page_mut(f).chunks_exact_mut(8) {
                w.copy_from_slice(&(rng() & 0x0f0f_0f0f_00ff_00ff).to_le_bytes());
            }
        }
        let spec: CodecSpec = spec.parse().unwrap();
        let mut enc = spec.build(1);
        enc.init(&img);
        let mut backup = img.clone();
        let (mut raw, mut sent) = (0u64, 0u64);
        for epoch in 0..4u32 {
            let dirty: Vec<u32> = (0..1024u32)
                .map(|i| 2048 + (i * 7 + epoch) % 2048)
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            for &f in &dirty {
                let mut p = *img.page(f - 2048 + epoch);
                p[(f as usize * 13) % PAGE_SIZE] ^= 0x5a;
                img.set_page(f, &p);
            }
            let mut out = Vec::new();
            let s = enc.encode_epoch(&img, &dirty, &[], &mut out).unwrap();
            raw += s.raw_bytes;
            sent += s.out_bytes;
            decode_epoch(&backup, &out, frames)
                .unwrap()
                .apply(&mut backup);
            for &f in &dirty {
                assert!(backup.page(f) == img.page(f));
            }
            if spec == CodecSpec::Similarity(SimilarityConfig::default()) {
                let budget = (frames as usize * PAGE_SIZE) / 16;
                assert!(enc.reference_bytes() <= budget, "{}", enc.reference_bytes());
            }
        }
        sent as f64 / raw as f64
    };
    let default = ratio("similarity");
    assert!(default < 0.15, "{default}");
    // A table with room for every area finds (nearly) every copy.
    let big_table = ratio("similarity:table=14");
    assert!(big_table < 0.05, "{big_table}");
}

/// Byte-for-byte check of the default codec on a real trace: prints a
/// digest of every encoded epoch (1 and 2 encoder threads), the total size
/// and the encode speed, to compare before and after a change of the
/// encoder. `SIMREP_TRACE=path cargo test --release -p simrep
/// trace_digest -- --ignored --nocapture`.
#[test]
#[ignore = "needs a trace: SIMREP_TRACE=path"]
fn trace_digest() {
    use std::hash::Hasher;
    let path = std::env::var("SIMREP_TRACE").expect("set SIMREP_TRACE to a trace file");
    let spec = match std::env::var("SIMREP_SPEC") {
        Ok(s) => s.parse::<CodecSpec>().expect("SIMREP_SPEC: a codec spec"),
        Err(_) => CodecSpec::Similarity(SimilarityConfig::default()),
    };
    for threads in [1usize, 2] {
        let mut replay = crate::trace::Replay::open(std::path::Path::new(&path)).unwrap();
        replay.next_epoch().unwrap().expect("an initial image");
        let mut enc = spec.build(threads);
        enc.init(replay.image());
        let mut digest = std::collections::hash_map::DefaultHasher::new();
        let (mut out_bytes, mut raw_bytes, mut ns) = (0u64, 0u64, 0u128);
        let mut buf = Vec::new();
        while let Some(d) = replay.next_epoch().unwrap() {
            buf.clear();
            let t = std::time::Instant::now();
            enc.encode_epoch(replay.image(), &d.dirty, &d.dropped, &mut buf)
                .unwrap();
            let took = t.elapsed().as_nanos();
            ns += took;
            if std::env::var_os("SIMREP_EPOCHS").is_some() {
                println!(
                    "  epoch {}: {} pages, {:.2} ms",
                    d.epoch,
                    d.dirty.len(),
                    took as f64 / 1e6
                );
            }
            digest.write(&buf);
            out_bytes += buf.len() as u64;
            raw_bytes += (d.dirty.len() * PAGE_SIZE) as u64;
        }
        println!(
            "threads {threads}: digest {:016x} out_bytes {out_bytes} raw {raw_bytes} \
             encode {:.0} MB/s wall",
            digest.finish(),
            raw_bytes as f64 * 1e3 / ns.max(1) as f64
        );
    }
}

/// The pool's threads are spread one per CPU over the CPUs the process may
/// use (see [`super::thread_pool`]).
#[test]
fn pool_threads_are_pinned_one_per_allowed_cpu() {
    use nix::sched::{sched_getaffinity, CpuSet};
    use nix::unistd::Pid;
    let cpus_of = |set: &CpuSet| -> Vec<usize> {
        (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap())
            .collect()
    };
    let allowed = cpus_of(&sched_getaffinity(Pid::from_raw(0)).unwrap());
    assert!(!allowed.is_empty());
    let threads = allowed.len().clamp(2, 4);
    let pool = super::thread_pool(threads).expect("a pool");
    let mut seen = pool.broadcast(|ctx| {
        let set = sched_getaffinity(Pid::from_raw(0)).unwrap();
        (ctx.index(), cpus_of(&set))
    });
    seen.sort();
    for (i, cpus) in &seen {
        assert_eq!(cpus, &vec![allowed[i % allowed.len()]], "thread {i}");
    }
    assert_eq!(seen.len(), threads);
    assert!(super::thread_pool(1).is_none());
}
