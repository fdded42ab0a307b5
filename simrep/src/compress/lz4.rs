//! LZ4 block compression for the second stage: byte for byte what
//! `lz4_flex::block::compress_into` (0.11, the workspace's lz4 crate)
//! writes, in safe Rust with fewer checks on the hot path (the hash table is
//! a fixed array indexed by a 12-bit hash, short literal runs are copied as
//! one 16-byte move into slack at the end of the output).
//!
//! The algorithm is LZ4's greedy fast compressor without a dictionary: a
//! 4096-entry table of the last position of each hash (of 4 bytes when the
//! input is shorter than 65535 bytes, else of 8 bytes with a 5-byte
//! multiplier), a step that grows by one every 32 misses, matches of at
//! least 4 bytes within 65535 bytes extended backwards over the pending
//! literals and forwards up to 6 bytes before the end, the position two
//! bytes before each match's end put back into the table, and the last
//! literals after the last position a match may start (12 bytes before the
//! end). The decoder is lz4_flex's, unchanged; a property test checks the
//! output against lz4_flex's.

use super::rle::le_u64;

const MFLIMIT: usize = 12;
/// Matches end this many bytes before the end of the input.
const END_OFFSET: usize = 6;
const MIN_LENGTH: usize = MFLIMIT + 1;
const MINMATCH: usize = 4;
const MAX_DISTANCE: usize = (1 << 16) - 1;
const SKIP_SHIFT: u32 = 5;
const TABLE: usize = 4096;
/// Bytes [`compress`] may write past the end of its output (short literal
/// runs are copied 16 bytes at a time).
const WILD: usize = 16;

/// Output buffer length [`compress`] needs for `len` input bytes.
pub(crate) const fn max_output(len: usize) -> usize {
    lz4_flex::block::get_maximum_output_size(len) + WILD
}

/// Compresses `input` as one LZ4 block into the start of `out` (at least
/// [`max_output`]`(input.len())` bytes; the bytes after the block are
/// scratch). Returns the block's length.
///
/// # Panics
///
/// When `out` is shorter than [`max_output`]`(input.len())`.
pub(crate) fn compress(input: &[u8], out: &mut [u8]) -> usize {
    assert!(out.len() >= max_output(input.len()), "lz4 output too small");
    // lz4_flex picks its u16 table (positions fit) and the 4-byte hash
    // below 65535 bytes.
    if input.len() < u16::MAX as usize {
        compress_with::<true>(input, out)
    } else {
        compress_with::<false>(input, out)
    }
}

#[inline(always)]
fn read_u32(input: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&input[at..at + 4]);
    u32::from_le_bytes(b)
}

/// Table slot of the bytes at `at`: lz4_flex's `hash` (4 bytes) or `hash5`
/// (8 bytes read, 5 used), shifted to 12 bits.
#[inline(always)]
fn slot<const SMALL: bool>(input: &[u8], at: usize) -> usize {
    slot_and_word::<SMALL>(input, at).0
}

/// [`slot`] and the 4 bytes at `at`.
#[inline(always)]
fn slot_and_word<const SMALL: bool>(input: &[u8], at: usize) -> (usize, u32) {
    if SMALL {
        let w = read_u32(input, at);
        ((w.wrapping_mul(2_654_435_761) >> 20) as usize, w)
    } else {
        let w = le_u64(&input[at..at + 8]);
        (
            ((w << 24).wrapping_mul(889_523_592_379) >> 52) as usize,
            w as u32,
        )
    }
}

#[inline(always)]
fn put_length(out: &mut [u8], mut o: usize, mut n: usize) -> usize {
    while n >= 0xff {
        out[o] = 0xff;
        o += 1;
        n -= 0xff;
    }
    out[o] = n as u8;
    o + 1
}

/// Length of the common prefix of `a` and `b`.
#[inline(always)]
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut i = 0;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let d = le_u64(x) ^ le_u64(y);
        if d != 0 {
            return i + (d.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
    i + a[i..]
        .iter()
        .zip(&b[i..])
        .take_while(|(x, y)| x == y)
        .count()
}

/// Appends the last literals `input[start..]`; returns the block length.
fn last_literals(input: &[u8], start: usize, out: &mut [u8], o: usize) -> usize {
    let n = input.len() - start;
    out[o] = if n < 0xf { (n as u8) << 4 } else { 0xf0 };
    let mut o = o + 1;
    if n >= 0xf {
        o = put_length(out, o, n - 0xf);
    }
    out[o..o + n].copy_from_slice(&input[start..]);
    o + n
}

fn compress_with<const SMALL: bool>(input: &[u8], out: &mut [u8]) -> usize {
    let len = input.len();
    if len < MIN_LENGTH {
        return last_literals(input, 0, out, 0);
    }
    let mut table = [0u32; TABLE];
    let end_check = len - MFLIMIT;
    let match_end = len - END_OFFSET;
    let mut o = 0usize;
    let mut lit_start = 0usize;
    table[slot::<SMALL>(input, 0)] = 0;
    let mut cur = 1usize;
    loop {
        // Find a match, stepping faster the longer none is found.
        let mut misses = 1u32 << SKIP_SHIFT;
        let mut next = cur;
        let mut candidate;
        loop {
            let step = (misses >> SKIP_SHIFT) as usize;
            misses += 1;
            cur = next;
            next += step;
            if cur > end_check {
                return last_literals(input, lit_start, out, o);
            }
            let (h, word) = slot_and_word::<SMALL>(input, cur);
            candidate = table[h] as usize;
            table[h] = cur as u32;
            if cur - candidate <= MAX_DISTANCE && read_u32(input, candidate) == word {
                break;
            }
        }
        let offset = (cur - candidate) as u16;
        while candidate > 0 && cur > lit_start && input[cur - 1] == input[candidate - 1] {
            cur -= 1;
            candidate -= 1;
        }
        let lit_len = cur - lit_start;
        cur += MINMATCH;
        candidate += MINMATCH;
        let dup = common_prefix(&input[cur..match_end], &input[candidate..]);
        cur += dup;
        table[slot::<SMALL>(input, cur - 2)] = (cur - 2) as u32;

        let token = if lit_len < 0xf {
            (lit_len as u8) << 4
        } else {
            0xf0
        } | if dup < 0xf { dup as u8 } else { 0xf };
        out[o] = token;
        o += 1;
        if lit_len >= 0xf {
            o = put_length(out, o, lit_len - 0xf);
        }
        if lit_len <= WILD && lit_start + WILD <= len {
            // One 16-byte move; the bytes past the run are overwritten next.
            out[o..o + WILD].copy_from_slice(&input[lit_start..lit_start + WILD]);
        } else {
            out[o..o + lit_len].copy_from_slice(&input[lit_start..lit_start + lit_len]);
        }
        o += lit_len;
        out[o..o + 2].copy_from_slice(&offset.to_le_bytes());
        o += 2;
        if dup >= 0xf {
            o = put_length(out, o, dup - 0xf);
        }
        lit_start = cur;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lz4_flex(input: &[u8]) -> Vec<u8> {
        let mut out = vec![0; lz4_flex::block::get_maximum_output_size(input.len())];
        let n = lz4_flex::block::compress_into(input, &mut out).unwrap();
        out.truncate(n);
        out
    }

    fn ours(input: &[u8]) -> Vec<u8> {
        let mut out = vec![0xa5; max_output(input.len())];
        let n = compress(input, &mut out);
        out.truncate(n);
        out
    }

    /// Inputs with matches near and far, runs, noise, and text-like parts.
    fn input(seed: u64, len: usize, mix: u8) -> Vec<u8> {
        let mut s = seed | 1;
        let mut rng = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut v: Vec<u8> = Vec::with_capacity(len);
        while v.len() < len {
            let n = (rng() % 300) as usize + 1;
            match (rng() % 8) as u8 % (mix % 8 + 1) {
                0 => v.extend((0..n).map(|_| rng() as u8)),
                1 => v.extend(std::iter::repeat_n(rng() as u8, n)),
                2 if v.len() > 8 => {
                    // A copy from up to ~100 KiB back, maybe with a change.
                    let back = (rng() as usize % v.len().min(100_000)).max(1);
                    let from = v.len() - back;
                    for i in 0..n {
                        let b = v[from + i % back];
                        v.push(b);
                    }
                    if rng() % 2 == 0 {
                        let at = v.len() - 1 - rng() as usize % n;
                        v[at] ^= 1;
                    }
                }
                3 => v.extend((0..n).map(|_| (rng() % 4) as u8)),
                _ => v.extend((0..n).map(|i| (i % 7) as u8 * 3)),
            }
        }
        v.truncate(len);
        v
    }

    #[test]
    fn matches_lz4_flex_at_the_edges() {
        for len in (0..40).chain([
            65_533, 65_534, 65_535, 65_536, 65_537, 70_000, 131_072, 200_000,
        ]) {
            for (seed, mix) in [(1, 0), (2, 1), (3, 2), (4, 7), (5, 3)] {
                let v = input(seed, len, mix);
                assert_eq!(ours(&v), lz4_flex(&v), "len {len} seed {seed}");
            }
            let zeros = vec![0u8; len];
            assert_eq!(ours(&zeros), lz4_flex(&zeros), "zeros, len {len}");
        }
    }

    proptest! {
        #[test]
        fn matches_lz4_flex(seed: u64, len in 0usize..140_000, mix: u8) {
            let v = input(seed, len, mix);
            prop_assert_eq!(ours(&v), lz4_flex(&v));
        }
    }
}
