//! Fuzz target: arbitrary bytes read as a memory trace, both as a whole
//! file and as a body behind a valid plain or zstd header, through the
//! record reader and the replay. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simrep::trace::{Replay, TraceHeader, TraceReader};

fn read_all(bytes: &[u8]) {
    if let Ok(mut r) = TraceReader::new(bytes) {
        let mut n = 0u32;
        while let Ok(Some(_)) = r.next_record() {
            n += 1;
            if n > 1_000_000 {
                break;
            }
        }
    }
    if let Ok(mut r) = Replay::new(bytes) {
        while let Ok(Some(_)) = r.next_epoch() {}
    }
}

fuzz_target!(|data: &[u8]| {
    read_all(data);
    if let Some((&flag, body)) = data.split_first() {
        let mut header = TraceHeader::new(100, 0, "fuzz");
        header.flags = u32::from(flag & 1);
        let mut bytes = Vec::with_capacity(64 + body.len());
        if header.write_to(&mut bytes).is_ok() {
            bytes.extend_from_slice(body);
            read_all(&bytes);
        }
    }
});
