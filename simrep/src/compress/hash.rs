//! The bit-density hash (paper section III-A).
//!
//! An area is cut into 32 equal sections; bit `i` of the 32-bit hash is set
//! when section `i`'s population count (number of one bits) exceeds a
//! threshold:
//!
//! * [`HashThreshold::Fraction`]`(p)`: `p` percent of the section's bits (the
//!   paper uses 80 %);
//! * [`HashThreshold::Median`]: the median of the area's 32 section
//!   popcounts. With an even count the *lower* median (the 16th smallest) is
//!   used, so bit `i` is set exactly when at least 16 sections have a
//!   strictly smaller popcount than section `i`; at most 16 bits are set.
//!
//! Similar areas (a few bytes changed) have similar popcounts per section
//! and so tend to get the same hash.

use super::rle::le_u64;
use super::HashThreshold;

/// Number of sections (hash bits).
pub const SECTIONS: usize = 32;

/// Population count of each of the 32 sections of `area`. Bytes past the
/// last whole section (when `area.len()` is not a multiple of 32) are
/// ignored.
#[inline]
pub fn section_popcounts(area: &[u8]) -> [u16; SECTIONS] {
    let sec = area.len() / SECTIONS;
    let mut pops = [0u16; SECTIONS];
    if sec == 0 {
        return pops;
    }
    if sec.is_multiple_of(8) {
        for (p, s) in pops.iter_mut().zip(area.chunks_exact(sec)) {
            let mut n = 0u32;
            for w in s.chunks_exact(8) {
                n += le_u64(w).count_ones();
            }
            *p = n as u16;
        }
    } else {
        for (p, s) in pops.iter_mut().zip(area.chunks_exact(sec)) {
            *p = s.iter().map(|b| b.count_ones() as u16).sum();
        }
    }
    pops
}

/// The 32-bit bit-density hash of `area` (see the module docs). Intended
/// for areas whose length is a multiple of 32 bytes (64..=4096 in this
/// codebase); bytes past the last whole section are ignored.
#[inline]
pub fn bit_density_hash(area: &[u8], threshold: HashThreshold) -> u32 {
    let pops = section_popcounts(area);
    match threshold {
        // Sections of at most 31 bytes: popcounts fit in u8 lanes (one
        // 32-lane vector instead of two).
        HashThreshold::Median if area.len() / SECTIONS < 32 => {
            let mut narrow = [0u8; SECTIONS];
            for (n, &p) in narrow.iter_mut().zip(&pops) {
                *n = p as u8;
            }
            median_bits_u8(&narrow)
        }
        HashThreshold::Median => median_bits(&pops),
        HashThreshold::Fraction(percent) => {
            let bits = (area.len() / SECTIONS * 8) as u32;
            let limit = (bits * u32::from(percent.min(100)) / 100) as u16;
            let mut h = 0u32;
            for (i, &p) in pops.iter().enumerate() {
                h |= u32::from(p > limit) << i;
            }
            h
        }
    }
}

/// Bit `i` set when section `i`'s popcount exceeds the lower median.
#[inline]
fn median_bits(pops: &[u16; SECTIONS]) -> u32 {
    // below[i] = how many sections are strictly sparser than section i;
    // the inner loop runs over all 32 sections at once (two AVX2 vectors).
    let mut below = [0u16; SECTIONS];
    for &q in pops {
        for (b, &p) in below.iter_mut().zip(pops) {
            *b += u16::from(q < p);
        }
    }
    let mut h = 0u32;
    for (i, &b) in below.iter().enumerate() {
        h |= u32::from(b >= 16) << i;
    }
    h
}

/// [`median_bits`] on u8 popcounts.
#[inline]
fn median_bits_u8(pops: &[u8; SECTIONS]) -> u32 {
    let mut below = [0u8; SECTIONS];
    for &q in pops {
        for (b, &p) in below.iter_mut().zip(pops) {
            *b += u8::from(q < p);
        }
    }
    let mut h = 0u32;
    for (i, &b) in below.iter().enumerate() {
        h |= u32::from(b >= 16) << i;
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference_median_hash(area: &[u8]) -> u32 {
        let pops = section_popcounts(area);
        let mut sorted = pops;
        sorted.sort_unstable();
        let median = sorted[15];
        pops.iter()
            .enumerate()
            .fold(0, |h, (i, &p)| h | (u32::from(p > median) << i))
    }

    #[test]
    fn popcounts_match_naive() {
        for size in [64usize, 128, 256, 512, 1024, 2048, 4096] {
            let area: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
            let pops = section_popcounts(&area);
            let sec = size / 32;
            for (i, p) in pops.iter().enumerate() {
                let naive: u32 = area[i * sec..(i + 1) * sec]
                    .iter()
                    .map(|b| b.count_ones())
                    .sum();
                assert_eq!(u32::from(*p), naive);
            }
            assert_eq!(
                bit_density_hash(&area, HashThreshold::Median),
                reference_median_hash(&area)
            );
        }
    }

    #[test]
    fn fraction_threshold() {
        // Sections alternate all-ones and all-zeros.
        let area: Vec<u8> = (0..512)
            .map(|i| if (i / 16) % 2 == 0 { 0xff } else { 0 })
            .collect();
        assert_eq!(
            bit_density_hash(&area, HashThreshold::Fraction(80)),
            0x5555_5555
        );
        assert_eq!(bit_density_hash(&area, HashThreshold::Median), 0x5555_5555);
        // 80 % of a 128-bit section is 102 bits: 0x0f bytes (64 bits) stay below.
        assert_eq!(
            bit_density_hash(&[0x0f; 512], HashThreshold::Fraction(80)),
            0
        );
        assert_eq!(
            bit_density_hash(&[0x0f; 512], HashThreshold::Fraction(40)),
            u32::MAX
        );
        assert_eq!(bit_density_hash(&[0; 512], HashThreshold::Median), 0);
        assert_eq!(bit_density_hash(&[], HashThreshold::Median), 0);
    }

    #[test]
    fn similar_areas_hash_alike() {
        let area: Vec<u8> = (0..512u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut other = area.clone();
        other[100] = other[100].wrapping_add(0); // unchanged
        assert_eq!(
            bit_density_hash(&area, HashThreshold::Median),
            bit_density_hash(&other, HashThreshold::Median)
        );
        assert!(bit_density_hash(&area, HashThreshold::Median).count_ones() <= 16);
    }
}
