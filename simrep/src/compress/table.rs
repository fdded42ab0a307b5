//! The content-addressable table (CAT) of the similarity codec.
//!
//! Two dimensions, as in the paper:
//!
//! * **by content**: `2^bits` buckets of `k` slots; a slot holds an area
//!   index (`frame * areas_per_page + area`, a `u32`) and that area's full
//!   32-bit hash, so that the candidates of a bucket can be ranked by hash
//!   distance without touching their contents. A bucket is ordered most
//!   recently inserted first; inserting into a full bucket evicts its last
//!   (oldest) slot.
//! * **by address**: per area, the hash it was filed under and a presence
//!   bit, so that the entry of a dirtied area can be found and removed.
//!
//! Memory: `8 * k * 2^bits` bytes for the buckets (and up to 56 bytes to
//! start them on a cache line) plus `4` bytes and one bit
//! per area of the image.

/// An empty slot's area index.
pub(crate) const EMPTY: u32 = u32::MAX;

/// One bucket slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    /// Area index, or [`EMPTY`].
    pub(crate) area: u32,
    /// The area's full hash.
    pub(crate) hash: u32,
}

const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

/// Slots per 64-byte cache line.
const LINE_SLOTS: usize = 64 / SLOT_BYTES;

const EMPTY_SLOT: Slot = Slot {
    area: EMPTY,
    hash: 0,
};

/// The content-addressable table.
#[derive(Debug)]
pub(crate) struct Table {
    bits: u32,
    k: usize,
    /// The buckets, starting at slot `first` (see [`Table::new`]).
    slots: Vec<Slot>,
    first: usize,
    area_hash: Vec<u32>,
    present: Vec<u64>,
}

impl Table {
    /// A table of `2^bits` buckets of `k` slots, with room for `areas`
    /// areas in the address dimension (grown on demand).
    pub(crate) fn new(bits: u32, k: usize, areas: usize) -> Self {
        let bits = bits.clamp(1, 30);
        let k = k.max(1);
        // The buckets start on a cache line (a 64-byte line holds a whole
        // bucket of the default 8 slots, which a lookup then reads with one
        // miss instead of two): up to 7 slots of slack in front.
        let slots = vec![EMPTY_SLOT; (k << bits) + LINE_SLOTS - 1];
        let misalign = slots.as_ptr() as usize % 64;
        let first = if misalign.is_multiple_of(SLOT_BYTES) {
            (64 - misalign) % 64 / SLOT_BYTES
        } else {
            0
        };
        Self {
            bits,
            k,
            slots,
            first,
            area_hash: vec![0; areas],
            present: vec![0; areas.div_ceil(64)],
        }
    }

    /// Makes room in the address dimension for areas `0..areas`.
    pub(crate) fn ensure_areas(&mut self, areas: usize) {
        if self.area_hash.len() < areas {
            // Exact growth: these arrays count against the memory budget.
            self.area_hash.reserve_exact(areas - self.area_hash.len());
            self.area_hash.resize(areas, 0);
            let words = areas.div_ceil(64);
            self.present
                .reserve_exact(words.saturating_sub(self.present.len()));
            self.present.resize(words, 0);
        }
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.area_hash.capacity() * 4
            + self.present.capacity() * 8
    }

    #[inline]
    fn bucket(&self, hash: u32) -> usize {
        let mixed = hash.wrapping_mul(0x9e37_79b1) ^ (hash >> 15).wrapping_mul(0x85eb_ca6b);
        self.first + (mixed >> (32 - self.bits)) as usize * self.k
    }

    /// The slots of the bucket for `hash` (most recent first; empty slots,
    /// if any, at the end).
    #[inline]
    pub(crate) fn candidates(&self, hash: u32) -> &[Slot] {
        let b = self.bucket(hash);
        &self.slots[b..b + self.k]
    }

    /// Whether `area` has an entry.
    #[inline]
    pub(crate) fn is_present(&self, area: u32) -> bool {
        let a = area as usize;
        self.present
            .get(a / 64)
            .is_some_and(|w| w & (1 << (a % 64)) != 0)
    }

    /// The hash `area` was last filed under (meaningful if it was ever
    /// inserted).
    #[inline]
    pub(crate) fn stored_hash(&self, area: u32) -> u32 {
        self.area_hash.get(area as usize).copied().unwrap_or(0)
    }

    #[inline]
    fn set_present(&mut self, area: u32, on: bool) {
        let a = area as usize;
        if let Some(w) = self.present.get_mut(a / 64) {
            if on {
                *w |= 1 << (a % 64);
            } else {
                *w &= !(1 << (a % 64));
            }
        }
    }

    /// Removes `area`'s entry, if any.
    #[inline]
    pub(crate) fn remove(&mut self, area: u32) {
        if !self.is_present(area) {
            return;
        }
        let b = self.bucket(self.area_hash[area as usize]);
        let bucket = &mut self.slots[b..b + self.k];
        if let Some(i) = bucket.iter().position(|s| s.area == area) {
            bucket.copy_within(i + 1.., i);
            bucket[self.k - 1] = EMPTY_SLOT;
        }
        self.set_present(area, false);
    }

    /// Removes the entries of `count` consecutive areas starting at `first`.
    pub(crate) fn remove_range(&mut self, first: u32, count: u32) {
        for a in first..first + count {
            self.remove(a);
        }
    }

    /// Files `area` under `hash` (replacing its previous entry).
    #[inline]
    pub(crate) fn insert(&mut self, area: u32, hash: u32) {
        if area as usize >= self.area_hash.len() {
            return; // callers size the table first; ignore rather than panic
        }
        self.remove(area);
        let b = self.bucket(hash);
        let k = self.k;
        let bucket = &mut self.slots[b..b + k];
        // Into the first empty slot; in a full bucket, into the middle,
        // evicting the last: the older half (areas that stayed unchanged
        // the longest, the most dependable references) is protected from
        // the churn of recently dirtied areas.
        let at = bucket.iter().position(|s| s.area == EMPTY).unwrap_or(k / 2);
        let evicted = bucket[k - 1].area;
        bucket.copy_within(at..k - 1, at + 1);
        bucket[at] = Slot { area, hash };
        if evicted != EMPTY {
            self.set_present(evicted, false);
        }
        self.area_hash[area as usize] = hash;
        self.set_present(area, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_remove() {
        let mut t = Table::new(4, 4, 100);
        t.insert(5, 0xabcd);
        t.insert(6, 0x1234);
        assert!(t.candidates(0xabcd).iter().any(|s| s.area == 5));
        assert!(t.is_present(5));
        t.remove(5);
        assert!(!t.is_present(5));
        assert!(!t.candidates(0xabcd).iter().any(|s| s.area == 5));
        // Re-insert under another hash moves it.
        t.insert(6, 0xabcd);
        assert!(t.candidates(0xabcd).iter().any(|s| s.area == 6));
        assert_eq!(t.stored_hash(6), 0xabcd);
    }

    #[test]
    fn full_bucket_protects_its_older_half() {
        let mut t = Table::new(1, 4, 100);
        // With one bit there are two buckets; find hashes in one bucket.
        let hashes: Vec<u32> = (0..1000u32)
            .filter(|&h| t.bucket(h) == t.first)
            .take(6)
            .collect();
        for (i, &h) in hashes.iter().take(4).enumerate() {
            t.insert(i as u32, h);
        }
        let areas =
            |t: &Table| -> Vec<u32> { t.candidates(hashes[0]).iter().map(|s| s.area).collect() };
        assert_eq!(areas(&t), vec![0, 1, 2, 3], "empty slots filled in order");
        t.insert(10, hashes[4]);
        assert!(!t.is_present(3), "last slot evicted");
        assert_eq!(areas(&t), vec![0, 1, 10, 2]);
        t.insert(11, hashes[5]);
        assert_eq!(areas(&t), vec![0, 1, 11, 10]);
        assert!(t.is_present(0) && t.is_present(1));
        t.remove_range(10, 2);
        assert_eq!(areas(&t), vec![0, 1, EMPTY, EMPTY]);
        // Out-of-range inserts are ignored.
        t.insert(1000, 1);
        assert!(!t.is_present(1000));
    }
}
