//! Fuzz target for the backup's receive path: `BackupImage::handle` after
//! a real synchronisation and one committed epoch.
//!
//! The input picks which pages a primary dirties, the primary encodes that
//! epoch with the default codec, and the input then corrupts the epoch's
//! messages (stream bytes, counts, digest, epoch numbers, disk writes).
//! Every outcome must be one of: refused with an error and the committed
//! image, state and epoch untouched; or accepted, and then the committed
//! image is exactly the primary's. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simrep::compress::{CodecSpec, Image, PageView, PAGE_SIZE};
use simrep::replication::apply::{digest_epoch, epoch_messages, sync_messages, BackupImage};
use simrep::replication::protocol::Message;

const FRAMES: u32 = 16;

fn same(a: &Image, b: &Image) -> bool {
    (0..FRAMES).all(|f| a.page(f) == b.page(f))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let mut img = Image::zeroed(FRAMES);
    for f in 1..FRAMES {
        for (i, b) in img.page_mut(f).iter_mut().enumerate() {
            *b = (i as u8) ^ (f as u8);
        }
    }
    let mut enc = "similarity".parse::<CodecSpec>().unwrap().build(1);
    enc.init(&img);
    let mut backup = BackupImage::new(64);
    for m in sync_messages(7, &img, vec![]) {
        backup.handle(m).unwrap();
    }
    // Epoch 1, clean.
    let mut out = Vec::new();
    img.page_mut(3)[10] = 1;
    enc.encode_epoch(&img, &[3], &[], &mut out).unwrap();
    let d = digest_epoch(&img, &[3], &[]);
    for m in epoch_messages(1, &out, vec![], 1, d, b"s1".to_vec()) {
        if let Some(v) = backup.handle(m).unwrap() {
            backup.commit(v);
        }
    }
    assert!(same(&img, backup.image()));
    // Epoch 2: pages from the input, edited by the input.
    let mask = u16::from_le_bytes([data[0], data[1]]);
    let dirty: Vec<u32> = (0..FRAMES).filter(|f| mask & (1 << f) != 0).collect();
    let edits = &data[2..];
    for (k, &f) in dirty.iter().enumerate() {
        let e = edits.get(k).copied().unwrap_or(0);
        let p = img.page_mut(f);
        for i in 0..(usize::from(e) % 64) {
            p[(i * 61 + usize::from(e)) % PAGE_SIZE] ^= e | 1;
        }
    }
    let mut out = Vec::new();
    enc.encode_epoch(&img, &dirty, &[], &mut out).unwrap();
    let d = digest_epoch(&img, &dirty, &[]);
    let mut msgs = epoch_messages(
        2,
        &out,
        vec![(1, vec![2; 512])],
        dirty.len() as u64,
        d,
        b"s2".to_vec(),
    );
    let before = backup.image().clone();
    // Corruptions: (target, position, xor) triples after the page edits.
    for op in edits[dirty.len().min(edits.len())..].chunks(3) {
        let [t, pos, x] = op else { break };
        let pos = usize::from(*pos);
        let n = msgs.len();
        if t % 6 == 5 {
            if n > 1 {
                msgs.remove(pos % n);
            }
            continue;
        }
        match (t % 6, &mut msgs[..]) {
            (0, [Message::EpochData(dd), ..]) if !dd.data.is_empty() => {
                let i = pos * 131 % dd.data.len();
                dd.data[i] ^= x;
            }
            (1, [Message::EpochData(dd), ..]) => {
                let n = dd.data.len().saturating_sub(pos);
                dd.data.truncate(n);
            }
            (2, [.., Message::EpochEnd(e)]) => e.digest[pos % 16] ^= x,
            (3, [.., Message::EpochEnd(e)]) => e.dirty_pages ^= u64::from(*x),
            (4, [.., Message::EpochEnd(e)]) => e.epoch ^= u64::from(*x),
            _ => {}
        }
    }
    let mut result = Ok(None);
    for m in msgs {
        result = backup.handle(m);
        if result.is_err() {
            break;
        }
    }
    match result {
        Ok(Some(v)) => {
            backup.commit(v);
            assert_eq!(backup.committed_epoch(), Some(2));
            assert!(same(&img, backup.image()), "an accepted epoch decoded wrongly");
        }
        Ok(None) | Err(_) => {
            assert_eq!(backup.committed_epoch(), Some(1));
            assert_eq!(backup.state(), b"s1");
            assert!(same(&before, backup.image()), "a refused epoch changed the image");
        }
    }
});
