//! Block fingerprints: a keyed universal hash with a provable collision
//! bound, built for speed (it auto-vectorises).
//!
//! Two levels, as in UMAC/VHASH:
//!
//! 1. **NH**, twice (Toeplitz): the block is read as 32-bit words `m_i` and
//!    `NH_t = sum over pairs ((m_2i + K_2i+2t) * (m_2i+1 + K_2i+1+2t))
//!    mod 2^64` (additions mod 2^32) for `t = 0, 1` with random 32-bit
//!    keys `K`. For two different blocks of the same length the pair
//!    `(NH_0, NH_1)` collides with probability at most `2^-64` (Black et
//!    al., UMAC, 1999).
//! 2. The 128-bit pair, as four 32-bit pieces `x_j`, goes through the
//!    multilinear hash `sum(c_j * x_j) mod p` with `p = 2^61 - 1` and
//!    random `c_j` in `[0, p)`: different inputs collide with probability
//!    exactly `1/p`.
//!
//! So two different blocks get the same fingerprint with probability at
//! most `2^-64 + 2^-61 < 2^-60`, whatever their contents, as long as the
//! contents do not depend on the keys (drawn per encoder from the operating
//! system's randomness; they never leave the encoder). The result is
//! shifted so that the all-zero block has fingerprint 0, which changes no
//! equality.
//!
//! The similarity codec keeps one fingerprint per block of the committed
//! image, so that blocks of dirty pages that are not in the cache can
//! still be recognised as unchanged (see
//! [`SimilarityConfig::fingerprints`](super::SimilarityConfig::fingerprints)).

use std::hash::{BuildHasher, Hasher};

use super::rle::le_u64;

/// The modulus, `2^61 - 1`.
const P: u64 = (1 << 61) - 1;

/// Computes fingerprints of blocks of one size.
#[derive(Clone, Debug)]
pub(crate) struct Fingerprinter {
    /// NH keys as pairs of 32-bit words packed in u64 (low = even word),
    /// one more pair than the block has (for the shifted instance).
    nh: Vec<u64>,
    /// Multilinear keys for the four 32-bit pieces.
    ml: [u64; 4],
    /// Raw fingerprint of the all-zero block.
    zero: u64,
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
    /// A fingerprinter for `block_size`-byte blocks (a multiple of 8) with
    /// keys derived from `seed`.
    pub(crate) fn with_seed(block_size: usize, seed: u64) -> Self {
        let mut state = seed;
        let nh = (0..block_size / 8 + 1)
            .map(|_| splitmix64(&mut state))
            .collect();
        let mut ml = [0u64; 4];
        for k in &mut ml {
            *k = loop {
                let k = splitmix64(&mut state) >> 3; // 61 bits
                if k < P {
                    break k;
                }
            };
        }
        let mut f = Self { nh, ml, zero: 0 };
        f.zero = f.raw(&vec![0; block_size]);
        f
    }

    /// A fingerprinter with fresh random keys.
    pub(crate) fn random(block_size: usize) -> Self {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_usize(block_size);
        Self::with_seed(block_size, h.finish())
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.nh.capacity() * 8 + std::mem::size_of::<Self>()
    }

    /// The fingerprint of `block` (which must have the configured size).
    #[inline]
    pub(crate) fn fingerprint(&self, block: &[u8]) -> u64 {
        let r = self.raw(block);
        if r >= self.zero {
            r - self.zero
        } else {
            r + P - self.zero
        }
    }

    #[inline]
    fn raw(&self, block: &[u8]) -> u64 {
        let (k0, k1) = (&self.nh[..self.nh.len() - 1], &self.nh[1..]);
        let (mut a, mut b) = (0u64, 0u64);
        for ((w, &ka), &kb) in block.chunks_exact(8).zip(k0).zip(k1) {
            let m = le_u64(w);
            a = a.wrapping_add(nh_pair(m, ka));
            b = b.wrapping_add(nh_pair(m, kb));
        }
        let pieces = [a & 0xffff_ffff, a >> 32, b & 0xffff_ffff, b >> 32];
        let mut sum = 0u128;
        for (x, c) in pieces.iter().zip(&self.ml) {
            sum += u128::from(*x) * u128::from(*c);
        }
        reduce(sum)
    }
}

/// One NH term: `(lo(m) + lo(k)) * (hi(m) + hi(k))`, additions mod 2^32.
#[inline(always)]
fn nh_pair(m: u64, k: u64) -> u64 {
    let lo = (m as u32).wrapping_add(k as u32);
    let hi = ((m >> 32) as u32).wrapping_add((k >> 32) as u32);
    u64::from(lo) * u64::from(hi)
}

/// `x mod p` for `x < 2^127`.
#[inline]
fn reduce(x: u128) -> u64 {
    let p = u128::from(P);
    let x = (x & p) + (x >> 61);
    let x = (x & p) + (x >> 61);
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

    #[test]
    fn zero_block_is_zero_and_equal_blocks_agree() {
        for size in [64usize, 128, 256, 512, 1024, 2048] {
            let f = Fingerprinter::with_seed(size, size as u64);
            assert_eq!(f.fingerprint(&vec![0; size]), 0);
            let a: Vec<u8> = (0..size).map(|i| (i * 37 % 256) as u8 ^ 0xa5).collect();
            assert_eq!(f.fingerprint(&a), f.fingerprint(&a.clone()));
            assert!(f.fingerprint(&a) < P);
        }
    }

    #[test]
    fn single_bit_changes_change_the_fingerprint() {
        let f = Fingerprinter::random(256);
        let block: Vec<u8> = (0..256).map(|i| (i * 7) as u8).collect();
        let h = f.fingerprint(&block);
        for at in 0..256 {
            for bit in 0..8 {
                let mut other = block.clone();
                other[at] ^= 1 << bit;
                assert_ne!(f.fingerprint(&other), h, "byte {at} bit {bit}");
            }
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
