//! Fuzz target for `VmSnapshot::decode` (the VM state byte format).
//!
//! Mode byte even: decode the rest as a whole encoded snapshot (header,
//! checksum, payload). Odd: decode it as a bare payload, which skips the
//! checksum and reaches the structural checks. Decoding must never panic;
//! whatever decodes must re-encode to bytes that decode to the same
//! snapshot.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simrep::vmm::state::VmSnapshot;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let decoded = if mode & 1 == 0 {
        VmSnapshot::decode(rest)
    } else {
        VmSnapshot::decode_payload(rest)
    };
    if let Ok(s) = decoded {
        let bytes = s.encode();
        let again = VmSnapshot::decode(&bytes).expect("own encoding decodes");
        assert!(again == s);
    }
});
