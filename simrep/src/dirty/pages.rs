//! [`DirtyPages`]: the result of a harvest, a sorted list of guest frame
//! numbers without duplicates.

/// Guest frame numbers (guest-physical address / 4096), sorted ascending,
/// without duplicates. Walk them with [`DirtyPages::iter`] or, for batched
/// copies, as runs of consecutive frames with [`DirtyPages::ranges`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyPages {
    gfns: Vec<u64>,
}

impl DirtyPages {
    /// From any list of frame numbers (sorted and de-duplicated here).
    pub fn from_unsorted(mut gfns: Vec<u64>) -> Self {
        gfns.sort_unstable();
        gfns.dedup();
        DirtyPages { gfns }
    }

    /// The set bits of a bitmap with one bit per page (bit `i % 64` of
    /// word `i / 64` is page `i`), ignoring bits at or beyond `pages`.
    pub fn from_bitmap(bitmap: &[u64], pages: u64) -> Self {
        let mut p = DirtyPages::default();
        p.set_from_bitmap(bitmap, pages);
        p
    }

    /// Replaces the contents with the set bits of `bitmap` (as
    /// [`DirtyPages::from_bitmap`]), reusing the allocation.
    pub fn set_from_bitmap(&mut self, bitmap: &[u64], pages: u64) {
        self.gfns.clear();
        for (i, &word) in bitmap.iter().enumerate() {
            let mut w = word;
            while w != 0 {
                let gfn = i as u64 * 64 + u64::from(w.trailing_zeros());
                if gfn >= pages {
                    return;
                }
                self.gfns.push(gfn);
                w &= w - 1;
            }
        }
    }

    /// Replaces the contents with `gfns` (sorted and de-duplicated here),
    /// leaving `gfns` empty; reuses both allocations.
    pub fn set_unsorted(&mut self, gfns: &mut Vec<u64>) {
        gfns.sort_unstable();
        gfns.dedup();
        std::mem::swap(&mut self.gfns, gfns);
        gfns.clear();
    }

    /// Replaces the contents with every page `0..pages`.
    pub fn set_all(&mut self, pages: u64) {
        self.gfns.clear();
        self.gfns.extend(0..pages);
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.gfns.len()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.gfns.is_empty()
    }

    /// The frame numbers, ascending.
    pub fn as_slice(&self) -> &[u64] {
        &self.gfns
    }

    /// The frame numbers, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.gfns.iter().copied()
    }

    /// Whether frame `gfn` is dirty (binary search).
    pub fn contains(&self, gfn: u64) -> bool {
        self.gfns.binary_search(&gfn).is_ok()
    }

    /// Runs of consecutive frames as `(first frame, count)`, ascending.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut i = 0;
        std::iter::from_fn(move || {
            let first = *self.gfns.get(i)?;
            let mut n = 1;
            while self.gfns.get(i + n as usize) == Some(&(first + n)) {
                n += 1;
            }
            i += n as usize;
            Some((first, n))
        })
    }

    /// The list, for callers that keep it.
    pub fn into_vec(self) -> Vec<u64> {
        self.gfns
    }
}

impl<'a> IntoIterator for &'a DirtyPages {
    type Item = &'a u64;
    type IntoIter = std::slice::Iter<'a, u64>;
    fn into_iter(self) -> Self::IntoIter {
        self.gfns.iter()
    }
}
