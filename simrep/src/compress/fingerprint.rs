//! Area fingerprints: a keyed multilinear universal hash modulo the
//! Mersenne prime `p = 2^61 - 1`.
//!
//! The area is read as `m = ceil(S / 7)` little-endian 56-bit elements
//! `x_i` (the last one zero-padded) and hashed as
//! `h = sum(k_i * x_i) mod p` with independent uniformly random keys
//! `k_i` in `[0, p)`. For two *different* areas of the same size, every
//! `x_i - x'_i` is below `2^56 < p` and so invertible mod `p`: the
//! probability over the keys that their fingerprints collide is exactly
//! `1/p` (about `4.3e-19`), whatever the contents, as long as the contents
//! do not depend on the keys (the keys are drawn per encoder from the
//! operating system's randomness and never leave it).
//!
//! The similarity codec keeps one fingerprint per area of the committed
//! image, so that an area of a dirty page that is *not* in the cache can
//! still be recognised as unchanged (see
//! [`SimilarityConfig::fingerprints`](super::SimilarityConfig::fingerprints)).
//! The all-zero area has fingerprint 0.

use std::hash::{BuildHasher, Hasher};

use super::rle::le_u64;

/// The modulus, `2^61 - 1`.
const P: u64 = (1 << 61) - 1;
const MASK56: u64 = (1 << 56) - 1;

/// Computes fingerprints of areas of one size.
#[derive(Clone, Debug)]
pub(crate) struct Fingerprinter {
    keys: Vec<u64>,
}

#[inline]
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Fingerprinter {
    /// A fingerprinter for `area_size`-byte areas with keys derived from
    /// `seed`.
    pub(crate) fn with_seed(area_size: usize, seed: u64) -> Self {
        let mut state = seed;
        let keys = (0..area_size.div_ceil(7))
            .map(|_| loop {
                let k = splitmix64(&mut state) >> 3; // 61 bits
                if k < P {
                    break k;
                }
            })
            .collect();
        Self { keys }
    }

    /// A fingerprinter with fresh random keys.
    pub(crate) fn random(area_size: usize) -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(area_size);
        Self::with_seed(area_size, h.finish())
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.keys.capacity() * 8
    }

    /// The fingerprint of `area` (which must have the configured size).
    #[inline]
    pub(crate) fn fingerprint(&self, area: &[u8]) -> u64 {
        let n = area.len();
        let full = if n >= 8 { (n - 8) / 7 + 1 } else { 0 };
        let full = full.min(self.keys.len());
        // Four independent accumulators (no carried dependency chain).
        let mut acc = [0u128; 4];
        let mut i = 0;
        while i + 4 <= full {
            for (j, a) in acc.iter_mut().enumerate() {
                let at = (i + j) * 7;
                let x = le_u64(&area[at..at + 8]) & MASK56;
                *a += u128::from(self.keys[i + j]) * u128::from(x);
            }
            i += 4;
        }
        let mut sum = acc[0] + acc[1] + acc[2] + acc[3];
        while i < full {
            let at = i * 7;
            let x = le_u64(&area[at..at + 8]) & MASK56;
            sum += u128::from(self.keys[i]) * u128::from(x);
            i += 1;
        }
        // Remaining elements (fewer than 8 bytes left): zero-padded.
        while i * 7 < n && i < self.keys.len() {
            let mut b = [0u8; 8];
            let rest = &area[i * 7..n.min(i * 7 + 7)];
            b[..rest.len()].copy_from_slice(rest);
            sum += u128::from(self.keys[i]) * u128::from(u64::from_le_bytes(b));
            i += 1;
        }
        reduce(sum)
    }
}

/// `x mod p` for `x < 2^127`.
#[inline]
fn reduce(x: u128) -> u64 {
    let p = u128::from(P);
    let x = (x & p) + (x >> 61); // < 2^64 + 2^61
    let x = (x & p) + (x >> 61); // < 2^61 + 8
    let x = x as u64;
    if x >= P {
        x - P
    } else {
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(f: &Fingerprinter, area: &[u8]) -> u64 {
        let mut sum = 0u128;
        for (i, chunk) in area.chunks(7).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            sum = (sum + u128::from(f.keys[i]) * u128::from(u64::from_le_bytes(b))) % u128::from(P);
        }
        sum as u64
    }

    #[test]
    fn matches_naive_definition() {
        for size in [64usize, 128, 256, 512, 1024, 2048] {
            let f = Fingerprinter::with_seed(size, size as u64);
            let area: Vec<u8> = (0..size).map(|i| (i * 37 % 256) as u8 ^ 0xa5).collect();
            assert_eq!(f.fingerprint(&area), naive(&f, &area));
            assert_eq!(
                f.fingerprint(&vec![0xff; size]),
                naive(&f, &vec![0xff; size])
            );
            assert_eq!(f.fingerprint(&vec![0; size]), 0);
        }
    }

    #[test]
    fn single_byte_changes_change_the_fingerprint() {
        let f = Fingerprinter::random(512);
        let area: Vec<u8> = (0..512).map(|i| (i * 7) as u8).collect();
        let h = f.fingerprint(&area);
        for at in 0..512 {
            let mut other = area.clone();
            other[at] ^= 1;
            assert_ne!(f.fingerprint(&other), h, "byte {at}");
        }
    }

    #[test]
    fn reduce_is_mod_p() {
        for x in [
            0u128,
            1,
            u128::from(P),
            u128::from(P) + 1,
            u128::from(u64::MAX),
            (1u128 << 124) + 12345,
        ] {
            assert_eq!(u128::from(reduce(x)), x % u128::from(P));
        }
    }
}
