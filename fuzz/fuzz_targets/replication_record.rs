//! Fuzz target for the backup's receive path at the protocol layer.
//!
//! Mode byte even: the rest is a plaintext message for `Message::decode`
//! (what an authenticated but buggy or hostile primary could send): it must
//! give a message or a typed error, never panic; a decoded message must
//! re-encode to the same bytes. Odd: a real session seals a message built
//! from the input, the input then corrupts the record (bit flips,
//! truncation); opening must fail unless the record is unchanged, and must
//! never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simrep::replication::protocol::{
    ClientHandshake, EpochData, Message, PreSharedKey, ServerHandshake, Session,
};

fn sessions() -> (Session, Session) {
    let key = PreSharedKey::new(b"fuzzing-key-0123456789").unwrap();
    let (c, hello) = ClientHandshake::with_nonce(key.clone(), [1; 32]).unwrap();
    let (s, reply) = ServerHandshake::accept_with_nonce(key, &hello, [2; 32]).unwrap();
    let (proof, primary) = c.finish(&reply).unwrap();
    (primary, s.finish(&proof).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(m) = Message::decode(rest) {
            let mut again = Vec::new();
            m.encode(&mut again);
            assert_eq!(again, rest, "decode/encode is not a bijection");
        }
        return;
    }
    let (mut primary, mut backup) = sessions();
    let split = rest.len() / 2;
    let msg = Message::EpochData(EpochData {
        epoch: 1,
        chunk: 0,
        data: rest[..split].to_vec(),
    });
    let mut rec = Vec::new();
    primary.seal(&msg, &mut rec).unwrap();
    let original = rec.clone();
    let edits = &rest[split..];
    for pair in edits.chunks(2) {
        match pair {
            [pos, bits] => {
                let i = usize::from(*pos) % rec.len();
                rec[i] ^= bits;
            }
            [cut] => rec.truncate(rec.len().saturating_sub(usize::from(*cut))),
            _ => {}
        }
    }
    if rec.len() < 4 {
        return;
    }
    let prefix: [u8; 4] = rec[..4].try_into().unwrap();
    match backup.open(prefix, &rec[4..]) {
        Ok(m) => {
            assert_eq!(rec, original, "a changed record was accepted");
            assert_eq!(m, msg);
        }
        Err(_) => assert_ne!(rec, original, "an intact record was refused"),
    }
});
