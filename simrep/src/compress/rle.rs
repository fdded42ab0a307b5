//! Byte-level building blocks: LEB128 varints, a bounds-checked reader,
//! area comparison (auto-vectorised) and the zero-run / literal-run encoding
//! of an XOR difference.
//!
//! # Run-length encoding of one area
//!
//! The difference between an area and its reference is described by
//! alternating runs over the area's `S` bytes, written as varints to the
//! control stream; the bytes of literal runs (`new ^ reference`) go to the
//! literal stream:
//!
//! ```text
//! zrun lrun zrun lrun ... zrun            (zero run reaches the end)
//! zrun lrun zrun lrun ... zrun lrun       (literal run reaches the end)
//! ```
//!
//! A zero run (`zrun`, may be 0) is followed by a literal run (`lrun` >= 1)
//! unless the zero run reached the end of the area; the area ends exactly
//! when the runs cover `S` bytes, and a run past the end is an error.

/// Appends `v` as an unsigned LEB128 varint.
#[inline]
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Number of bytes [`put_varint`] writes for `v`.
#[inline]
pub(crate) fn varint_len(v: u32) -> usize {
    match v {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0xfff_ffff => 4,
        _ => 5,
    }
}

/// Zigzag mapping of a signed delta onto an unsigned varint value.
#[inline]
pub(crate) fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// Inverse of [`zigzag`].
#[inline]
pub(crate) fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends `v` as an unsigned LEB128 varint (64-bit).
#[inline]
pub(crate) fn put_varint64(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A bounds-checked cursor over a byte slice. Every read returns `None`
/// when the input is too short or a varint is malformed.
#[derive(Clone, Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Current offset from the start of the buffer.
    #[inline]
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes not yet read.
    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Reads one byte.
    #[inline]
    pub(crate) fn u8(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    /// Reads a little-endian `u32`.
    #[inline]
    pub(crate) fn u32_le(&mut self) -> Option<u32> {
        let b = self.bytes(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Reads `n` bytes.
    #[inline]
    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    /// Reads an unsigned LEB128 varint of at most 32 bits.
    #[inline]
    pub(crate) fn varint(&mut self) -> Option<u32> {
        let first = self.u8()?;
        if first < 0x80 {
            return Some(u32::from(first));
        }
        let mut v = u32::from(first & 0x7f);
        let mut shift = 7;
        loop {
            let b = self.u8()?;
            if shift == 28 && b > 0x0f {
                return None; // more than 32 bits
            }
            v |= u32::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
            shift += 7;
        }
    }

    /// Reads an unsigned LEB128 varint of at most 64 bits.
    #[inline]
    pub(crate) fn varint64(&mut self) -> Option<u64> {
        let mut v = 0u64;
        let mut shift = 0;
        loop {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                return None;
            }
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
            shift += 7;
        }
    }
}

/// Reads 8 bytes as a little-endian `u64` (`w.len()` must be 8).
#[inline(always)]
pub(crate) fn le_u64(w: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(w);
    u64::from_le_bytes(b)
}

/// True when every byte of `area` is zero.
#[inline]
pub(crate) fn is_zero(area: &[u8]) -> bool {
    // OR-reduce 64-byte blocks (vectorises), with an early exit per block.
    let mut blocks = area.chunks_exact(64);
    for block in &mut blocks {
        let mut acc = 0u64;
        for w in block.chunks_exact(8) {
            acc |= le_u64(w);
        }
        if acc != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Number of byte positions where `a` and `b` differ, stopping early (and
/// returning a value `> bound`) once the count exceeds `bound`. Both slices
/// must have the same length, a multiple of 64.
#[inline]
pub(crate) fn diff_count_bounded(a: &[u8], b: &[u8], bound: usize) -> usize {
    let mut n = 0usize;
    for (ca, cb) in a.chunks_exact(256).zip(b.chunks_exact(256)) {
        n += diff_count_block(ca, cb);
        if n > bound {
            return n;
        }
    }
    let tail = a.len() / 256 * 256;
    if tail < a.len() {
        n += diff_count_block(&a[tail..], &b[tail..]);
    }
    n
}

#[inline(always)]
fn diff_count_block(a: &[u8], b: &[u8]) -> usize {
    // Byte compare + count in u8 lanes: LLVM turns this into vpcmpeqb/vpsubb.
    let mut n = 0usize;
    for (ca, cb) in a.chunks_exact(64).zip(b.chunks_exact(64)) {
        let mut c = 0u8;
        for i in 0..64 {
            c += u8::from(ca[i] != cb[i]);
        }
        n += usize::from(c);
    }
    n
}

/// Bitmap of differing bytes: bit `j` of `masks[j / 64]` is set when
/// `a[j] != b[j]`. `a.len()` must be a multiple of 64 and at most
/// `64 * masks.len()`. Returns the number of differing bytes.
#[inline]
pub(crate) fn diff_masks(a: &[u8], b: &[u8], masks: &mut [u64]) -> usize {
    let mut n = 0usize;
    for ((ca, cb), m) in a
        .chunks_exact(64)
        .zip(b.chunks_exact(64))
        .zip(masks.iter_mut())
    {
        let mut w = 0u64;
        for k in 0..8 {
            let x = le_u64(&ca[k * 8..k * 8 + 8]) ^ le_u64(&cb[k * 8..k * 8 + 8]);
            w |= u64::from(nonzero_byte_bits(x)) << (k * 8);
        }
        *m = w;
        n += w.count_ones() as usize;
    }
    n
}

/// 8-bit mask of the non-zero bytes of `x` (bit `i` for byte `i`).
#[inline(always)]
fn nonzero_byte_bits(x: u64) -> u8 {
    const LO7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    // High bit of each byte set when the byte is non-zero.
    let t = ((x & LO7).wrapping_add(LO7) | x) & !LO7;
    // Gather the 8 high bits into one byte.
    ((t >> 7).wrapping_mul(0x0102_0408_1020_4080) >> 56) as u8
}

/// Position of the first set bit at or after `pos` in the `len`-bit
/// bitmap, or `len`.
#[inline]
fn next_one(masks: &[u64], pos: usize, len: usize) -> usize {
    let mut w = pos / 64;
    if w >= masks.len() {
        return len;
    }
    let mut cur = masks[w] & (u64::MAX << (pos % 64));
    loop {
        if cur != 0 {
            return (w * 64 + cur.trailing_zeros() as usize).min(len);
        }
        w += 1;
        if w * 64 >= len {
            return len;
        }
        cur = masks[w];
    }
}

/// Position of the first clear bit at or after `pos`, or `len`.
#[inline]
fn next_zero(masks: &[u64], pos: usize, len: usize) -> usize {
    let mut w = pos / 64;
    if w >= masks.len() {
        return len;
    }
    let mut cur = !masks[w] & (u64::MAX << (pos % 64));
    loop {
        if cur != 0 {
            return (w * 64 + cur.trailing_zeros() as usize).min(len);
        }
        w += 1;
        if w * 64 >= len {
            return len;
        }
        cur = !masks[w];
    }
}

/// Longest bitmap [`rle_encode`] closes word-parallel (4096 bytes).
const MAX_MASK_WORDS: usize = 64;

/// Encodes `new ^ reference` as zero runs and literal runs (see the module
/// docs), appending run lengths to `control` and literal XOR bytes to
/// `literals`. `masks` is the difference bitmap from [`diff_masks`]. Zero
/// gaps shorter than `min_gap` inside a literal are absorbed into it
/// (`min_gap` <= 1 splits at every equal byte, as QEMU's XBZRLE does).
/// Returns the number of bytes appended (control + literals).
///
/// The short gaps are first filled in a copy of the bitmap, a word at a
/// time (a gap is absorbed exactly when it lies between two differing
/// bytes and is shorter than `min_gap`); the runs of the filled bitmap are
/// then the runs to send.
pub(crate) fn rle_encode(
    new: &[u8],
    reference: &[u8],
    masks: &[u64],
    min_gap: usize,
    control: &mut Vec<u8>,
    literals: &mut Vec<u8>,
) -> usize {
    let len = new.len();
    let words = len / 64;
    if !len.is_multiple_of(64) || masks.len() < words || min_gap > 64 {
        return rle_encode_runs(new, reference, masks, min_gap, control, literals);
    }
    // The bitmap with its short gaps filled, on the stack (areas up to
    // 512 bytes in a small array: it is set up for every area).
    if words <= 8 {
        let mut m = [0u64; 8];
        close_gaps(&masks[..words], &mut m[..words], min_gap);
        emit_runs(new, reference, &m[..words], control, literals)
    } else if words <= MAX_MASK_WORDS {
        let mut m = [0u64; MAX_MASK_WORDS];
        close_gaps(&masks[..words], &mut m[..words], min_gap);
        emit_runs(new, reference, &m[..words], control, literals)
    } else {
        rle_encode_runs(new, reference, masks, min_gap, control, literals)
    }
}

/// Copies `masks` into `m` with every gap of fewer than `min_gap` clear
/// bits between two set bits filled.
#[inline(always)]
fn close_gaps(masks: &[u64], m: &mut [u64], min_gap: usize) {
    if min_gap == 3 {
        // The similarity codec's threshold, in one pass: clear bit i is
        // filled when set bits lie on both sides of a gap of at most 2
        // (at i-1 and at i+1 or i+2, or at i-2 and i+1).
        for (w, out) in m.iter_mut().enumerate() {
            let x = masks[w];
            let p = if w == 0 { 0 } else { masks[w - 1] };
            let n = masks.get(w + 1).copied().unwrap_or(0);
            let b1 = (x << 1) | (p >> 63);
            let b2 = (x << 2) | (p >> 62);
            let a1 = (x >> 1) | (n << 63);
            let a2 = (x >> 2) | (n << 62);
            *out = x | (!x & ((b1 & (a1 | a2)) | (b2 & a1)));
        }
        return;
    }
    m.copy_from_slice(masks);
    for n in 1..min_gap {
        fill_gaps(m, n);
    }
}

/// Writes the runs of the filled bitmap `m` (see [`rle_encode`]).
#[inline(always)]
fn emit_runs(
    new: &[u8],
    reference: &[u8],
    m: &[u64],
    control: &mut Vec<u8>,
    literals: &mut Vec<u8>,
) -> usize {
    let len = new.len();
    let (c0, l0) = (control.len(), literals.len());
    literals.reserve(len);
    let mut pos = 0usize;
    loop {
        let lit_start = next_set(m, pos, false);
        put_varint(control, (lit_start - pos) as u32);
        if lit_start == len {
            break;
        }
        let lit_end = next_set(m, lit_start, true);
        put_varint(control, (lit_end - lit_start) as u32);
        let at = literals.len();
        literals.extend_from_slice(&new[lit_start..lit_end]);
        for (l, r) in literals[at..]
            .iter_mut()
            .zip(&reference[lit_start..lit_end])
        {
            *l ^= r;
        }
        pos = lit_end;
        if pos == len {
            break;
        }
    }
    (control.len() - c0) + (literals.len() - l0)
}

/// Position of the first bit at or after `pos` that differs from
/// `inverted` (the first one when false, the first zero when true), or the
/// bitmap's length in bits.
#[inline(always)]
fn next_set(m: &[u64], pos: usize, inverted: bool) -> usize {
    let flip = if inverted { u64::MAX } else { 0 };
    let mut w = pos / 64;
    if w >= m.len() {
        return m.len() * 64;
    }
    let mut cur = (m[w] ^ flip) & (u64::MAX << (pos % 64));
    loop {
        if cur != 0 {
            return w * 64 + cur.trailing_zeros() as usize;
        }
        w += 1;
        match m.get(w) {
            Some(&x) => cur = x ^ flip,
            None => return m.len() * 64,
        }
    }
}

/// Bit `i` of the result is bit `i + k` of `m` (0 past the end), for
/// `k < 64`.
#[inline(always)]
fn ahead(m: &[u64], w: usize, k: u32) -> u64 {
    if k == 0 {
        return m[w];
    }
    let hi = m.get(w + 1).copied().unwrap_or(0);
    (m[w] >> k) | (hi << (64 - k))
}

/// Bit `i` of the result is bit `i - k` of `m` (0 before the start), for
/// `k < 64`.
#[inline(always)]
fn behind(m: &[u64], w: usize, k: u32) -> u64 {
    if k == 0 {
        return m[w];
    }
    let lo = if w == 0 { 0 } else { m[w - 1] };
    (m[w] << k) | (lo >> (64 - k))
}

/// Sets the bits of every gap of exactly `n` (1..64) clear bits that has a
/// set bit on both sides. Gaps are separated by set bits, so filling them
/// in any order of `n` gives the same bitmap.
fn fill_gaps(m: &mut [u64], n: usize) {
    let n = n as u32;
    let mut starts = [0u64; MAX_MASK_WORDS];
    for (w, s) in starts.iter_mut().enumerate().take(m.len()) {
        // A gap starts at i: bit i-1 set, bits i..i+n clear, bit i+n set.
        let mut x = behind(m, w, 1) & ahead(m, w, n);
        for k in 0..n {
            x &= !ahead(m, w, k);
        }
        *s = x;
    }
    let starts = &starts[..m.len()];
    for (w, word) in m.iter_mut().enumerate() {
        let mut fill = 0u64;
        for k in 0..n {
            fill |= behind(starts, w, k);
        }
        *word |= fill;
    }
}

/// [`rle_encode`] run by run, merging gaps as it goes: the straightforward
/// version, for bitmaps the fast path does not take (and to test it
/// against). Encodes `new ^ reference` as zero runs and literal runs,
/// appending run lengths to `control` and literal XOR bytes to
/// `literals`. `masks` is the difference bitmap from [`diff_masks`]. Zero
/// gaps shorter than `min_gap` inside a literal are absorbed into it
/// (`min_gap` <= 1 splits at every equal byte, as QEMU's XBZRLE does).
/// Returns the number of bytes appended (control + literals).
fn rle_encode_runs(
    new: &[u8],
    reference: &[u8],
    masks: &[u64],
    min_gap: usize,
    control: &mut Vec<u8>,
    literals: &mut Vec<u8>,
) -> usize {
    let len = new.len();
    let (c0, l0) = (control.len(), literals.len());
    let mut pos = 0usize;
    loop {
        let lit_start = next_one(masks, pos, len);
        put_varint(control, (lit_start - pos) as u32);
        if lit_start == len {
            break;
        }
        // Extend the literal over short zero gaps.
        let mut lit_end = next_zero(masks, lit_start, len);
        while lit_end < len {
            let next = next_one(masks, lit_end, len);
            if next == len || next - lit_end >= min_gap {
                break;
            }
            lit_end = next_zero(masks, next, len);
        }
        put_varint(control, (lit_end - lit_start) as u32);
        literals.extend(
            new[lit_start..lit_end]
                .iter()
                .zip(&reference[lit_start..lit_end])
                .map(|(a, b)| a ^ b),
        );
        pos = lit_end;
        if pos == len {
            break;
        }
    }
    (control.len() - c0) + (literals.len() - l0)
}

/// Why a run-length encoded area could not be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RleError {
    /// The control or literal stream ended inside the area.
    Truncated,
    /// A run goes past the end of the area, or a literal run is empty.
    BadRun,
}

/// Applies a run-length encoded XOR difference to `out`, which must already
/// hold the reference area.
#[inline]
pub(crate) fn rle_apply(
    out: &mut [u8],
    control: &mut Reader<'_>,
    literals: &mut Reader<'_>,
) -> Result<(), RleError> {
    rle_runs::<true>(out, control, literals)
}

/// Applies runs whose literal bytes *replace* the bytes of `out` (a patch).
#[inline]
pub(crate) fn rle_patch(
    out: &mut [u8],
    control: &mut Reader<'_>,
    literals: &mut Reader<'_>,
) -> Result<(), RleError> {
    rle_runs::<false>(out, control, literals)
}

#[inline]
fn rle_runs<const XOR: bool>(
    out: &mut [u8],
    control: &mut Reader<'_>,
    literals: &mut Reader<'_>,
) -> Result<(), RleError> {
    let len = out.len();
    let mut pos = 0usize;
    loop {
        let z = control.varint().ok_or(RleError::Truncated)? as usize;
        pos += z;
        if pos > len {
            return Err(RleError::BadRun);
        }
        if pos == len {
            return Ok(());
        }
        let l = control.varint().ok_or(RleError::Truncated)? as usize;
        if l == 0 || l > len - pos {
            return Err(RleError::BadRun);
        }
        let lit = literals.bytes(l).ok_or(RleError::Truncated)?;
        if XOR {
            for (o, x) in out[pos..pos + l].iter_mut().zip(lit) {
                *o ^= x;
            }
        } else {
            out[pos..pos + l].copy_from_slice(lit);
        }
        pos += l;
        if pos == len {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip() {
        let values = [
            0u32,
            1,
            127,
            128,
            300,
            16383,
            16384,
            1 << 21,
            1 << 28,
            u32::MAX,
        ];
        let mut buf = Vec::new();
        for &v in &values {
            let before = buf.len();
            put_varint(&mut buf, v);
            assert_eq!(buf.len() - before, varint_len(v));
        }
        let mut r = Reader::new(&buf);
        for &v in &values {
            assert_eq!(r.varint(), Some(v));
        }
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.varint(), None);
    }

    #[test]
    fn varint_rejects_overlong() {
        assert_eq!(Reader::new(&[0xff, 0xff, 0xff, 0xff, 0x1f]).varint(), None);
        assert_eq!(Reader::new(&[0x80, 0x80]).varint(), None);
        let mut buf = Vec::new();
        put_varint64(&mut buf, u64::MAX);
        assert_eq!(Reader::new(&buf).varint64(), Some(u64::MAX));
        assert_eq!(Reader::new(&[0xff; 11]).varint64(), None);
    }

    #[test]
    fn zigzag_round_trip() {
        for v in [0i64, 1, -1, 2, -2, i64::from(i32::MAX), -(1 << 40)] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn nonzero_bits() {
        assert_eq!(nonzero_byte_bits(0), 0);
        assert_eq!(nonzero_byte_bits(0x80), 1);
        assert_eq!(nonzero_byte_bits(0x0100_0000_0000_0001), 0b1000_0001);
        assert_eq!(nonzero_byte_bits(u64::MAX), 0xff);
    }

    #[test]
    fn diff_functions_agree() {
        let a: Vec<u8> = (0..512u32).map(|i| (i * 7) as u8).collect();
        let mut b = a.clone();
        for i in [0usize, 1, 63, 64, 200, 201, 511] {
            b[i] ^= 0x10;
        }
        let mut masks = [0u64; 8];
        assert_eq!(diff_masks(&a, &b, &mut masks), 7);
        assert_eq!(diff_count_bounded(&a, &b, 1000), 7);
        assert!(diff_count_bounded(&a, &b, 0) > 0);
        assert!(is_zero(&[0u8; 128]));
        assert!(!is_zero(&b));
    }

    fn rle_round_trip(a: &[u8], b: &[u8], gap: usize) {
        let mut masks = [0u64; 64];
        diff_masks(a, b, &mut masks);
        let (mut c, mut l) = (Vec::new(), Vec::new());
        let n = rle_encode(a, b, &masks, gap, &mut c, &mut l);
        assert_eq!(n, c.len() + l.len());
        let mut out = b.to_vec();
        let (mut cr, mut lr) = (Reader::new(&c), Reader::new(&l));
        rle_apply(&mut out, &mut cr, &mut lr).unwrap();
        assert_eq!(out, a);
        assert_eq!(cr.remaining(), 0);
        assert_eq!(lr.remaining(), 0);
    }

    #[test]
    fn rle_cases() {
        let base: Vec<u8> = (0..256u32).map(|i| (i * 13 + 5) as u8).collect();
        for gap in [1, 3, 8] {
            rle_round_trip(&base, &base, gap);
            let mut x = base.clone();
            x[0] ^= 1;
            rle_round_trip(&x, &base, gap);
            x[255] ^= 1;
            x[100] ^= 1;
            x[102] ^= 1;
            rle_round_trip(&x, &base, gap);
            let y: Vec<u8> = base.iter().map(|v| v ^ 0x55).collect();
            rle_round_trip(&y, &base, gap);
        }
    }

    proptest::proptest! {
        /// The word-parallel encoder writes exactly what the run-by-run one
        /// writes, whatever the bitmap (runs, gaps at either end, word
        /// boundaries) and the gap threshold.
        #[test]
        fn fast_rle_matches_the_run_by_run_one(
            log2 in 6u32..=12,
            seed: u64,
            density in 0u32..=64,
            runs in 0u32..=64,
            min_gap in proptest::prop_oneof![proptest::strategy::Just(3usize), 0usize..=12],
        ) {
            let len = 1usize << log2;
            let mut s = seed | 1;
            let mut rng = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let reference: Vec<u8> = (0..len).map(|_| rng() as u8).collect();
            let mut new = reference.clone();
            // Scattered bytes plus a few longer runs.
            for b in &mut new {
                if (rng() % 64) < u64::from(density) {
                    *b ^= 1 | rng() as u8;
                }
            }
            for _ in 0..runs % 8 {
                let at = rng() as usize % len;
                let n = (rng() as usize % 40).min(len - at);
                for b in &mut new[at..at + n] {
                    *b ^= 0x80;
                }
            }
            let mut masks = [u64::MAX; 64];
            diff_masks(&new, &reference, &mut masks);
            let (mut c1, mut l1) = (vec![7u8], vec![9u8]);
            let (mut c2, mut l2) = (vec![7u8], vec![9u8]);
            let n1 = rle_encode(&new, &reference, &masks, min_gap, &mut c1, &mut l1);
            let n2 = rle_encode_runs(&new, &reference, &masks, min_gap, &mut c2, &mut l2);
            proptest::prop_assert_eq!(n1, n2);
            proptest::prop_assert_eq!(c1, c2);
            proptest::prop_assert_eq!(l1, l2);
        }
    }

    #[test]
    fn rle_rejects_overrun() {
        let mut out = [0u8; 64];
        let mut c = Reader::new(&[65]);
        let mut l = Reader::new(&[]);
        assert_eq!(rle_apply(&mut out, &mut c, &mut l), Err(RleError::BadRun));
        let mut c = Reader::new(&[0, 0]);
        assert_eq!(rle_apply(&mut out, &mut c, &mut l), Err(RleError::BadRun));
        let mut c = Reader::new(&[0, 4]);
        assert_eq!(
            rle_apply(&mut out, &mut c, &mut l),
            Err(RleError::Truncated)
        );
        let mut c = Reader::new(&[10, 4]);
        let lits = [1u8; 4];
        let mut l = Reader::new(&lits);
        assert_eq!(
            rle_apply(&mut out, &mut c, &mut l),
            Err(RleError::Truncated)
        );
    }
}
