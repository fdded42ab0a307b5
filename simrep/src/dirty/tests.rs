use proptest::prelude::*;

use super::*;

#[test]
fn bitmap_bits_become_frame_numbers() {
    let bitmap = [0b1011, 0, 1 << 63, u64::MAX];
    let p = DirtyPages::from_bitmap(&bitmap, 256);
    let mut want = vec![0, 1, 3, 191];
    want.extend(192..256);
    assert_eq!(p.as_slice(), want.as_slice());
    // Bits past the end of the slot are ignored.
    let p = DirtyPages::from_bitmap(&bitmap, 193);
    assert_eq!(p.as_slice(), &[0, 1, 3, 191, 192]);
    assert!(DirtyPages::from_bitmap(&[0; 4], 256).is_empty());
}

#[test]
fn ranges_merge_consecutive_frames() {
    let p = DirtyPages::from_unsorted(vec![9, 3, 4, 5, 5, 20, 10, 7]);
    assert_eq!(p.as_slice(), &[3, 4, 5, 7, 9, 10, 20]);
    assert_eq!(
        p.ranges().collect::<Vec<_>>(),
        vec![(3, 3), (7, 1), (9, 2), (20, 1)]
    );
    assert!(p.contains(9) && !p.contains(8));
    assert_eq!(DirtyPages::default().ranges().count(), 0);
    let mut all = DirtyPages::default();
    all.set_all(5);
    assert_eq!(all.ranges().collect::<Vec<_>>(), vec![(0, 5)]);
}

#[test]
fn set_unsorted_reuses_and_empties_the_input() {
    let mut p = DirtyPages::from_unsorted(vec![1, 2]);
    let mut scratch = vec![5, 1, 5, 3];
    p.set_unsorted(&mut scratch);
    assert_eq!(p.as_slice(), &[1, 3, 5]);
    assert!(scratch.is_empty());
}

proptest! {
    #[test]
    fn bitmap_and_list_agree(gfns in proptest::collection::vec(0u64..4096, 0..600)) {
        let mut bitmap = vec![0u64; 64];
        for &g in &gfns {
            bitmap[(g / 64) as usize] |= 1 << (g % 64);
        }
        let from_bits = DirtyPages::from_bitmap(&bitmap, 4096);
        let from_list = DirtyPages::from_unsorted(gfns.clone());
        prop_assert_eq!(&from_bits, &from_list);
        let expanded: Vec<u64> = from_list
            .ranges()
            .flat_map(|(first, n)| first..first + n)
            .collect();
        prop_assert_eq!(expanded.as_slice(), from_list.as_slice());
        for w in from_list.as_slice().windows(2) {
            prop_assert!(w[0] < w[1]);
        }
    }
}

#[test]
fn modes_default_to_a_large_ring() {
    assert_eq!(DirtyMode::default(), DirtyMode::Ring { entries: 65536 });
}
