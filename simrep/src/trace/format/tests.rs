//! Tests of the trace format: round trips, malformed input, the sample.

use super::*;
use proptest::prelude::*;

/// An owned record, for building and comparing traces in tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Rec {
    Proc {
        slot: u32,
        pid: u32,
        comm: String,
    },
    Epoch {
        epoch: u32,
        t_stop_ns: u64,
        run_ns: u64,
    },
    Regions(Vec<Region>),
    Page {
        key: u64,
        data: Box<Page>,
    },
    Drop {
        key: u64,
    },
    EpochEnd(EpochEnd),
    End {
        epochs: u32,
    },
}

impl Rec {
    pub(crate) fn as_record(&self) -> Record<'_> {
        match self {
            Rec::Proc { slot, pid, comm } => Record::Proc {
                slot: *slot,
                pid: *pid,
                comm,
            },
            Rec::Epoch {
                epoch,
                t_stop_ns,
                run_ns,
            } => Record::Epoch {
                epoch: *epoch,
                t_stop_ns: *t_stop_ns,
                run_ns: *run_ns,
            },
            Rec::Regions(r) => Record::Regions(r),
            Rec::Page { key, data } => Record::Page { key: *key, data },
            Rec::Drop { key } => Record::Drop { key: *key },
            Rec::EpochEnd(e) => Record::EpochEnd(*e),
            Rec::End { epochs } => Record::End { epochs: *epochs },
        }
    }

    pub(crate) fn from_record(r: &Record<'_>) -> Self {
        match *r {
            Record::Proc { slot, pid, comm } => Rec::Proc {
                slot,
                pid,
                comm: comm.to_owned(),
            },
            Record::Epoch {
                epoch,
                t_stop_ns,
                run_ns,
            } => Rec::Epoch {
                epoch,
                t_stop_ns,
                run_ns,
            },
            Record::Regions(r) => Rec::Regions(r.to_vec()),
            Record::Page { key, data } => Rec::Page {
                key,
                data: Box::new(*data),
            },
            Record::Drop { key } => Rec::Drop { key },
            Record::EpochEnd(e) => Rec::EpochEnd(e),
            Record::End { epochs } => Rec::End { epochs },
        }
    }
}

pub(crate) fn page_of(fill: u8, poke: &[(u16, u8)]) -> Box<Page> {
    let mut p = Box::new([fill; PAGE_SIZE]);
    for &(at, v) in poke {
        p[at as usize % PAGE_SIZE] = v;
    }
    p
}

/// Encodes records into a trace.
pub(crate) fn encode(recs: &[Rec], zstd: Option<i32>) -> Vec<u8> {
    let header = TraceHeader::new(100, 1234, "test trace");
    let mut w = TraceWriter::new(Vec::new(), &header, zstd).expect("writer");
    for r in recs {
        w.write(&r.as_record()).expect("write");
    }
    w.finish().expect("finish")
}

/// Reads records until the end or an error.
pub(crate) fn decode(bytes: &[u8]) -> (Vec<Rec>, Result<(), TraceError>) {
    let mut out = Vec::new();
    let mut r = match TraceReader::new(bytes) {
        Ok(r) => r,
        Err(e) => return (out, Err(e)),
    };
    loop {
        match r.next_record() {
            Ok(Some(rec)) => out.push(Rec::from_record(&rec)),
            Ok(None) => return (out, Ok(())),
            Err(e) => return (out, Err(e)),
        }
    }
}

/// A page: key, fill byte, bytes poked.
type PageSpec = (u64, u8, Vec<(u16, u8)>);

/// One epoch's content before the counts are filled in.
#[derive(Clone, Debug)]
struct EpochSpec {
    procs: Vec<(u32, u32, String)>,
    regions: Option<Vec<Region>>,
    pages: Vec<PageSpec>,
    drops: Vec<u64>,
    times: [u64; 6],
}

fn region() -> impl Strategy<Value = Region> {
    (
        any::<u16>(),
        any::<u64>(),
        any::<u32>(),
        any::<u8>(),
        "[a-z/\\[\\]._-]{0,24}",
    )
        .prop_map(|(slot, start, len, prot, name)| Region {
            slot: slot.into(),
            start,
            end: start.saturating_add(len.into()),
            prot,
            name,
        })
}

fn epoch_spec() -> impl Strategy<Value = EpochSpec> {
    (
        prop::collection::vec((0u32..0x8000, any::<u32>(), "[a-zA-Z0-9 ]{0,16}"), 0..3),
        prop::option::of(prop::collection::vec(region(), 0..4)),
        prop::collection::vec(
            (
                any::<u64>(),
                any::<u8>(),
                prop::collection::vec(any::<(u16, u8)>(), 0..4),
            ),
            0..6,
        ),
        prop::collection::vec(any::<u64>(), 0..4),
        any::<[u64; 6]>(),
    )
        .prop_map(|(procs, regions, pages, drops, times)| EpochSpec {
            procs,
            regions,
            pages,
            drops,
            times,
        })
}

/// A valid trace: leading PROCs, epochs, optional END.
fn trace() -> impl Strategy<Value = Vec<Rec>> {
    (
        prop::collection::vec((0u32..0x8000, any::<u32>(), "[a-z]{0,16}"), 0..3),
        prop::collection::vec(epoch_spec(), 0..5),
        any::<bool>(),
    )
        .prop_map(|(lead, epochs, end)| {
            let mut v: Vec<Rec> = lead
                .into_iter()
                .map(|(slot, pid, comm)| Rec::Proc { slot, pid, comm })
                .collect();
            for (i, e) in epochs.iter().enumerate() {
                let epoch = i as u32;
                v.push(Rec::Epoch {
                    epoch,
                    t_stop_ns: e.times[0],
                    run_ns: e.times[1],
                });
                for (slot, pid, comm) in &e.procs {
                    v.push(Rec::Proc {
                        slot: *slot,
                        pid: *pid,
                        comm: comm.clone(),
                    });
                }
                if let Some(r) = &e.regions {
                    v.push(Rec::Regions(r.clone()));
                }
                for (key, fill, poke) in &e.pages {
                    v.push(Rec::Page {
                        key: *key,
                        data: page_of(*fill, poke),
                    });
                }
                for key in &e.drops {
                    v.push(Rec::Drop { key: *key });
                }
                v.push(Rec::EpochEnd(EpochEnd {
                    epoch,
                    n_dirty: e.pages.len() as u32,
                    n_drop: e.drops.len() as u32,
                    stop_ns: e.times[2],
                    read_ns: e.times[3],
                    compare_ns: e.times[4],
                    tracked_pages: e.times[5],
                }));
            }
            if end {
                v.push(Rec::End {
                    epochs: epochs.len() as u32,
                });
            }
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn round_trip(recs in trace(), level in prop::option::of(-3i32..6)) {
        let bytes = encode(&recs, level);
        let (got, res) = decode(&bytes);
        prop_assert!(res.is_ok(), "{:?}", res);
        prop_assert_eq!(got, recs);
    }

    #[test]
    fn truncation_never_panics_and_yields_a_prefix(
        recs in trace(),
        zstd in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let bytes = encode(&recs, zstd.then_some(1));
        let len = cut.index(bytes.len() + 1);
        let (got, res) = decode(&bytes[..len]);
        prop_assert!(got.len() <= recs.len());
        prop_assert_eq!(&got[..], &recs[..got.len()]);
        if let Err(e) = res {
            prop_assert!(
                matches!(
                    e,
                    TraceError::Truncated { .. } | TraceError::UnfinishedEpoch { .. }
                ) || (zstd && matches!(e, TraceError::Read { .. })),
                "{:?}", e
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..20000), flags in 0u32..2) {
        let header = TraceHeader { flags, ..TraceHeader::new(100, 0, "x") };
        let mut bytes = Vec::new();
        header.write_to(&mut bytes).expect("header");
        bytes.extend_from_slice(&body);
        let _ = decode(&bytes);
        let _ = decode(&body);
    }

    #[test]
    fn corrupted_byte_never_panics(recs in trace(), at in any::<prop::sample::Index>(), v in any::<u8>()) {
        let mut bytes = encode(&recs, None);
        let i = at.index(bytes.len());
        bytes[i] = v;
        let _ = decode(&bytes);
    }
}

fn small_trace() -> Vec<Rec> {
    vec![
        Rec::Proc {
            slot: 0,
            pid: 42,
            comm: "target".into(),
        },
        Rec::Epoch {
            epoch: 0,
            t_stop_ns: 1,
            run_ns: 0,
        },
        Rec::Regions(vec![Region {
            slot: 0,
            start: 0x1000,
            end: 0x3000,
            prot: PROT_READ | PROT_WRITE,
            name: "[heap]".into(),
        }]),
        Rec::Page {
            key: 0x1000,
            data: page_of(1, &[]),
        },
        Rec::Page {
            key: 0x2000,
            data: page_of(2, &[]),
        },
        Rec::EpochEnd(EpochEnd {
            epoch: 0,
            n_dirty: 2,
            ..EpochEnd::default()
        }),
        Rec::Epoch {
            epoch: 1,
            t_stop_ns: 2,
            run_ns: 3,
        },
        Rec::Page {
            key: 0x2000,
            data: page_of(3, &[]),
        },
        Rec::Drop { key: 0x1000 },
        Rec::EpochEnd(EpochEnd {
            epoch: 1,
            n_dirty: 1,
            n_drop: 1,
            ..EpochEnd::default()
        }),
        Rec::End { epochs: 2 },
    ]
}

fn decode_err(recs: &[Rec]) -> TraceError {
    match decode(&encode(recs, None)).1 {
        Err(e) => e,
        Ok(()) => panic!("malformed trace accepted"),
    }
}

#[test]
fn small_trace_round_trips() {
    let recs = small_trace();
    for level in [None, Some(3)] {
        let (got, res) = decode(&encode(&recs, level));
        res.expect("valid");
        assert_eq!(got, recs);
    }
}

#[test]
fn header_errors() {
    let good = encode(&small_trace(), None);
    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(decode(&b).1, Err(TraceError::BadMagic { .. })));
    let mut b = good.clone();
    b[8] = 2;
    assert!(matches!(
        decode(&b).1,
        Err(TraceError::UnsupportedVersion { version: 2 })
    ));
    let mut b = good.clone();
    b[12..16].copy_from_slice(&8192u32.to_le_bytes());
    assert!(matches!(
        decode(&b).1,
        Err(TraceError::UnsupportedPageSize { page_size: 8192 })
    ));
    let mut b = good.clone();
    b[16] = 6;
    assert!(matches!(
        decode(&b).1,
        Err(TraceError::UnsupportedFlags { flags: 6 })
    ));
    let mut b = good.clone();
    b[32..36].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode(&b).1, Err(TraceError::TooLong { .. })));
    assert!(matches!(
        decode(&good[..20]).1,
        Err(TraceError::Truncated { .. })
    ));
}

#[test]
fn record_errors() {
    let base = small_trace();
    // Unknown tag: patch the first record's tag.
    let mut b = encode(&base, None);
    let at = TraceHeader::new(100, 1234, "test trace").encoded_len() as usize;
    b[at] = 0x42;
    match decode(&b).1 {
        Err(TraceError::UnknownTag { tag: 0x42, offset }) => assert_eq!(offset, at as u64),
        other => panic!("{other:?}"),
    }
    // PAGE outside an epoch.
    let mut v = base.clone();
    v.insert(0, base[3].clone());
    assert!(matches!(
        decode_err(&v),
        TraceError::Misplaced { record: "PAGE", .. }
    ));
    // DROP before PAGE.
    let mut v = base.clone();
    v.swap(7, 8);
    assert!(matches!(
        decode_err(&v),
        TraceError::Misplaced { record: "PAGE", .. }
    ));
    // REGIONS after PAGE.
    let mut v = base.clone();
    v.swap(2, 3);
    assert!(matches!(
        decode_err(&v),
        TraceError::Misplaced {
            record: "REGIONS",
            ..
        }
    ));
    // Epoch out of sequence.
    let mut v = base.clone();
    v[6] = Rec::Epoch {
        epoch: 5,
        t_stop_ns: 0,
        run_ns: 0,
    };
    assert!(matches!(
        decode_err(&v),
        TraceError::EpochSequence {
            expected: 1,
            found: 5,
            ..
        }
    ));
    // EPOCH_END counts disagree.
    let mut v = base.clone();
    v.remove(4);
    assert!(matches!(
        decode_err(&v),
        TraceError::CountMismatch {
            epoch: 0,
            what: "PAGE",
            declared: 2,
            seen: 1
        }
    ));
    // END count wrong.
    let mut v = base.clone();
    v[10] = Rec::End { epochs: 3 };
    assert!(matches!(
        decode_err(&v),
        TraceError::EndCount {
            declared: 3,
            seen: 2
        }
    ));
    // Nested EPOCH.
    let mut v = base.clone();
    v.remove(5);
    assert!(matches!(
        decode_err(&v),
        TraceError::Misplaced {
            record: "EPOCH",
            ..
        }
    ));
    // Missing END is fine; a missing EPOCH_END is not.
    let (got, res) = decode(&encode(&base[..10], None));
    res.expect("missing END is the end of the trace");
    assert_eq!(got.len(), 10);
    assert!(matches!(
        decode(&encode(&base[..9], None)).1,
        Err(TraceError::UnfinishedEpoch { epoch: 1 })
    ));
}

#[test]
fn absurd_lengths_rejected() {
    let mut b = encode(&small_trace()[..1], None);
    let at = b.len() - "target".len() - 2;
    b[at..at + 2].copy_from_slice(&u16::MAX.to_le_bytes());
    assert!(matches!(decode(&b).1, Err(TraceError::TooLong { .. })));
    let mut v = small_trace();
    v[2] = Rec::Regions(Vec::new());
    let mut b = encode(&v[..3], None);
    let n = b.len() - 4;
    b[n..].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode(&b).1, Err(TraceError::TooLong { .. })));
}

#[test]
fn reader_fails_once_then_stays_failed() {
    let mut b = encode(&small_trace(), None);
    let at = TraceHeader::new(100, 1234, "test trace").encoded_len() as usize;
    b[at] = 0x42;
    let mut r = TraceReader::new(&b[..]).expect("header");
    assert!(matches!(
        r.next_record(),
        Err(TraceError::UnknownTag { .. })
    ));
    assert!(matches!(r.next_record(), Err(TraceError::Failed)));
}

#[test]
fn zstd_prefix_of_killed_capture_is_readable() {
    // A capture killed after epoch 0: the frame of epoch 0 is complete.
    let recs = small_trace();
    let header = TraceHeader::new(100, 1234, "test trace");
    let mut w = TraceWriter::new(Vec::new(), &header, Some(3)).expect("writer");
    for r in &recs[..7] {
        w.write(&r.as_record()).expect("write");
    }
    // No finish(): take the bytes as a killed process would leave them.
    let bytes = match &w.sink {
        Sink::Zstd(enc) => enc.get_ref().clone(),
        _ => panic!("zstd sink"),
    };
    let (got, res) = decode(&bytes);
    assert_eq!(&got[..], &recs[..6]);
    assert!(res.is_ok() || matches!(res, Err(TraceError::UnfinishedEpoch { epoch: 1 })));
}

/// The shared sample capture.
pub(crate) const SAMPLE: &str = "/work/shared/memtrace/sqlite-bank-sample.trace";

#[test]
fn sample_trace_reads_fully() {
    let file = std::fs::File::open(SAMPLE).expect("sample trace (see FORMAT.md) must exist");
    let mut r = TraceReader::new(std::io::BufReader::new(file)).expect("header");
    assert!(r.header().is_zstd());
    assert_eq!(r.header().epoch_ms, 100);
    let (mut epochs, mut delta_pages, mut end) = (0u32, 0u64, None);
    while let Some(rec) = r.next_record().expect("valid sample") {
        match rec {
            Record::EpochEnd(e) => {
                epochs += 1;
                if e.epoch > 0 {
                    delta_pages += u64::from(e.n_dirty);
                }
            }
            Record::End { epochs } => end = Some(epochs),
            _ => {}
        }
    }
    assert_eq!(epochs, 9);
    assert_eq!(end, Some(9));
    assert_eq!(delta_pages, 22279);
}
