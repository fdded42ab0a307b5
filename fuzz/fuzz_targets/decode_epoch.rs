//! Fuzz target for `decode_epoch`.
//!
//! Mode byte even: decode the rest as arbitrary bytes against a small fixed
//! reference image. Odd: derive an epoch (dirty pages that are edited
//! copies of reference pages) from the input, encode it with one of the
//! codecs, check that it decodes to exactly the new image, then corrupt the
//! encoding with input bytes and decode again (reaching deep decoder paths
//! random bytes rarely get to). Decoding must never panic; whenever it
//! succeeds its output must be self-consistent and apply cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simrep::compress::{decode_epoch, CodecSpec, Image, PageView, PAGE_SIZE};

const MAX_FRAMES: u32 = 64;

const SPECS: &[&str] = &[
    "raw",
    "lz4",
    "zstd",
    "xbzrle:cache=16KiB",
    "similarity",
    "similarity:area=64,stage=none",
    "similarity:stage=zstd,cache=2",
    "similarity:area=2048,fp=off,hash=fraction80",
];

fn reference() -> Image {
    let mut img = Image::zeroed(8);
    for f in 1..8u32 {
        for (i, b) in img.page_mut(f).iter_mut().enumerate() {
            *b = (i as u32).wrapping_mul(f.wrapping_mul(2654435761)) as u8;
        }
    }
    img
}

fn check_decode(img: &Image, data: &[u8]) {
    if let Ok(d) = decode_epoch(img, data, MAX_FRAMES) {
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
}

fuzz_target!(|data: &[u8]| {
    let img = reference();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check_decode(&img, rest);
        return;
    }
    let spec: CodecSpec = SPECS[(mode >> 1) as usize % SPECS.len()]
        .parse()
        .expect("valid spec");
    // Up to 12 edits: frame, source page, then bytes to scatter.
    let (edits, flips) = rest.split_at(rest.len().min(96));
    let mut current = img.clone();
    let mut dirty = Vec::new();
    for e in edits.chunks(8) {
        let frame = u32::from(e[0]) % 16;
        let mut page = *current.page(u32::from(*e.get(1).unwrap_or(&0)) % 16);
        for (i, &b) in e.iter().enumerate().skip(2) {
            page[(usize::from(b) * 61 + i * 997) % PAGE_SIZE] ^= b;
        }
        current.set_page(frame, &page);
        dirty.push(frame);
    }
    dirty.sort_unstable();
    dirty.dedup();
    let mut enc = spec.build(1);
    enc.init(&img);
    let mut out = Vec::new();
    enc.encode_epoch(&current, &dirty, &[], &mut out)
        .expect("encode");
    let decoded = decode_epoch(&img, &out, MAX_FRAMES).expect("own encoding decodes");
    let mut backup = img.clone();
    decoded.apply(&mut backup);
    for f in 0..16 {
        assert!(backup.page(f) == current.page(f), "{spec}: frame {f}");
    }
    if out.is_empty() {
        return;
    }
    for pair in flips.chunks_exact(2) {
        let at = (usize::from(pair[0]) * 257 + usize::from(pair[1])) % out.len();
        out[at] ^= pair[1] | 1;
    }
    if flips.len() % 2 == 1 {
        out.truncate(usize::from(flips[flips.len() - 1]) % out.len());
    }
    check_decode(&img, &out);
});
