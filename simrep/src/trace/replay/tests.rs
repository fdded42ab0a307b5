//! Tests of the replay.

use super::*;
use crate::trace::format::tests::{encode, page_of, Rec, SAMPLE};
use crate::trace::format::EpochEnd;

fn epoch(n: u32, body: Vec<Rec>) -> Vec<Rec> {
    let n_dirty = body
        .iter()
        .filter(|r| matches!(r, Rec::Page { .. }))
        .count() as u32;
    let n_drop = body
        .iter()
        .filter(|r| matches!(r, Rec::Drop { .. }))
        .count() as u32;
    let mut v = vec![Rec::Epoch {
        epoch: n,
        t_stop_ns: u64::from(n) * 10,
        run_ns: 5,
    }];
    v.extend(body);
    v.push(Rec::EpochEnd(EpochEnd {
        epoch: n,
        n_dirty,
        n_drop,
        stop_ns: 7,
        read_ns: 1,
        compare_ns: 2,
        tracked_pages: 3,
    }));
    v
}

fn page(key: u64, fill: u8) -> Rec {
    Rec::Page {
        key,
        data: page_of(fill, &[]),
    }
}

#[test]
fn frames_dirty_drop_and_image() {
    let k = |slot: u64, a: u64| slot << 48 | a;
    let mut recs = epoch(
        0,
        vec![
            page(k(0, 0x5000), 1),
            page(k(1, 0x1000), 2),
            page(k(0x8000, 0), 3),
        ],
    );
    recs.extend(epoch(
        1,
        vec![
            page(k(0x8000, 0), 4),
            page(k(0, 0x9000), 5),
            Rec::Drop { key: k(0, 0x5000) },
            Rec::Drop { key: 77 },
        ],
    ));
    recs.extend(epoch(2, vec![]));
    recs.push(Rec::End { epochs: 3 });
    for level in [None, Some(1)] {
        let bytes = encode(&recs, level);
        let mut r = Replay::new(&bytes[..]).expect("header");
        let d0 = r.next_epoch().expect("ok").expect("epoch 0");
        assert_eq!(d0.epoch, 0);
        assert_eq!(d0.dirty, vec![0, 1, 2]);
        assert_eq!(r.frame_count(), 3);
        assert_eq!(r.key_of(1), k(1, 0x1000));
        assert_eq!(r.image().page(2)[0], 3);
        let d1 = r.next_epoch().expect("ok").expect("epoch 1");
        assert_eq!(d1.dirty, vec![2, 3]);
        assert_eq!(d1.dropped, vec![0]);
        assert_eq!(
            (d1.t_stop_ns, d1.run_ns, d1.stop_ns, d1.tracked_pages),
            (10, 5, 7, 3)
        );
        assert_eq!(r.image().page(0), &[0; PAGE_SIZE]);
        assert_eq!(r.image().page(2)[100], 4);
        assert_eq!(r.image().page(3)[4095], 5);
        assert_eq!(r.frame_of(k(0, 0x9000)), Some(3));
        let d2 = r.next_epoch().expect("ok").expect("epoch 2");
        assert!(d2.dirty.is_empty() && d2.dropped.is_empty());
        assert!(r.next_epoch().expect("ok").is_none());
        assert!(r.next_epoch().expect("ok").is_none());
    }
}

#[test]
fn epoch_cut_short_is_dropped_and_undone() {
    let mut recs = epoch(0, vec![page(1 << 12, 1), page(2 << 12, 2)]);
    recs.extend(epoch(
        1,
        vec![
            page(1 << 12, 9),
            page(3 << 12, 9),
            Rec::Drop { key: 2 << 12 },
        ],
    ));
    let mut bytes = encode(&recs, None);
    // Cut in the middle of EPOCH_END of epoch 1.
    bytes.truncate(bytes.len() - 10);
    let mut r = Replay::new(&bytes[..]).expect("header");
    assert!(r.next_epoch().expect("ok").is_some());
    assert!(r.next_epoch().expect("cut epoch is not an error").is_none());
    assert_eq!(r.image().page(0)[0], 1);
    assert_eq!(r.image().page(1)[0], 2);
    assert_eq!(r.image().page(2), &[0; PAGE_SIZE]);
}

#[test]
fn malformed_is_an_error() {
    let mut recs = epoch(0, vec![page(1 << 12, 1)]);
    if let Some(Rec::EpochEnd(e)) = recs.last_mut() {
        e.n_dirty = 5;
    }
    let bytes = encode(&recs, None);
    let mut r = Replay::new(&bytes[..]).expect("header");
    assert!(matches!(
        r.next_epoch(),
        Err(TraceError::CountMismatch { .. })
    ));
}

#[test]
fn sample_trace_replays() {
    let t = std::time::Instant::now();
    let mut r = Replay::open(Path::new(SAMPLE)).expect("sample trace (see FORMAT.md) must exist");
    let mut epochs = 0;
    let mut delta_pages = 0;
    let mut first = 0;
    while let Some(d) = r.next_epoch().expect("valid sample") {
        if d.epoch == 0 {
            first = d.dirty.len();
            assert_eq!(first as u32, r.frame_count());
        } else {
            delta_pages += d.dirty.len();
        }
        assert!(d.dirty.windows(2).all(|w| w[0] < w[1]));
        assert!(!d.regions.is_empty());
        epochs += 1;
    }
    assert_eq!(epochs, 9);
    assert_eq!(delta_pages, 22279);
    // 25 MiB image.
    assert!((6000..8000).contains(&first), "{first} pages in epoch 0");
    assert!(r.compressed_bytes_read() > 27_000_000);
    eprintln!(
        "sample replay: {:?}, {} frames",
        t.elapsed(),
        r.frame_count()
    );
}
