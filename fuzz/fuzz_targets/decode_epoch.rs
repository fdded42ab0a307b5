//! Fuzz target: `decode_epoch` on arbitrary bytes against a small fixed
//! reference image. It must never panic; when it succeeds, its output must
//! be self-consistent and apply cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simrep::compress::{decode_epoch, Image, PageView, PAGE_SIZE};

const MAX_FRAMES: u32 = 64;

fn reference() -> Image {
    let mut img = Image::zeroed(8);
    for f in 1..8u32 {
        for (i, b) in img.page_mut(f).iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(f * 2654435761) as u8;
        }
    }
    img
}

fuzz_target!(|data: &[u8]| {
    let img = reference();
    if let Ok(d) = decode_epoch(&img, data, MAX_FRAMES) {
        assert_eq!(d.data.len(), d.frames.len() * PAGE_SIZE);
        assert!(d.frames.windows(2).all(|w| w[0] < w[1]));
        assert!(d.dropped.windows(2).all(|w| w[0] < w[1]));
        assert!(d.frames.iter().chain(&d.dropped).all(|&f| f < MAX_FRAMES));
        assert!(d.frames.iter().all(|f| d.dropped.binary_search(f).is_err()));
        let mut applied = img.clone();
        d.apply(&mut applied);
        for (i, &f) in d.frames.iter().enumerate() {
            assert!(applied.page(f) == d.page(i));
        }
        for &f in &d.dropped {
            assert!(applied.page(f).iter().all(|&b| b == 0));
        }
    }
});
