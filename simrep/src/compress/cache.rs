//! A bounded LRU cache of page contents keyed by frame: the similarity
//! codec's cache of recently dirtied pages (RDP) and XBZRLE's cache.
//!
//! Compact representation: page contents in one slab (`capacity` pages,
//! grown as it fills), a dense `frame -> slot` map (4 bytes per frame), and
//! an intrusive doubly linked LRU list over slots (`u32` links).

use super::{Page, PAGE_SIZE};

const NONE: u32 = u32::MAX;

/// LRU cache of page contents.
#[derive(Debug, Default)]
pub(crate) struct PageCache {
    capacity: usize,
    data: Vec<u8>,
    slot_of: Vec<u32>,
    frame_of: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    free: Vec<u32>,
    /// Most recently used slot.
    head: u32,
    /// Least recently used slot.
    tail: u32,
    len: usize,
}

impl PageCache {
    /// An empty cache holding at most `capacity` pages.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.min(NONE as usize - 1),
            head: NONE,
            tail: NONE,
            ..Self::default()
        }
    }

    /// Maximum number of pages held.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of pages held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes held: page contents plus the map and list overhead.
    pub(crate) fn bytes(&self) -> usize {
        self.data.capacity()
            + 4 * (self.slot_of.capacity()
                + self.frame_of.capacity()
                + self.prev.capacity()
                + self.next.capacity()
                + self.free.capacity())
    }

    /// Bytes this cache would hold when full, for an image of `frames`
    /// frames.
    pub(crate) fn bytes_when_full(capacity: usize, frames: usize) -> usize {
        capacity * (PAGE_SIZE + 12) + 4 * frames
    }

    /// The cached contents of `frame`.
    #[inline]
    pub(crate) fn get(&self, frame: u32) -> Option<&Page> {
        let slot = *self.slot_of.get(frame as usize)?;
        if slot == NONE {
            return None;
        }
        let at = slot as usize * PAGE_SIZE;
        self.data.get(at..at + PAGE_SIZE)?.try_into().ok()
    }

    /// Whether `frame` is cached.
    #[inline]
    pub(crate) fn contains(&self, frame: u32) -> bool {
        self.slot_of.get(frame as usize).is_some_and(|&s| s != NONE)
    }

    fn unlink(&mut self, s: u32) {
        let (p, n) = (self.prev[s as usize], self.next[s as usize]);
        if p == NONE {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NONE {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
    }

    fn push_front(&mut self, s: u32) {
        self.prev[s as usize] = NONE;
        self.next[s as usize] = self.head;
        if self.head != NONE {
            self.prev[self.head as usize] = s;
        }
        self.head = s;
        if self.tail == NONE {
            self.tail = s;
        }
    }

    /// Drops `frame` from the cache.
    pub(crate) fn remove(&mut self, frame: u32) {
        let Some(&s) = self.slot_of.get(frame as usize) else {
            return;
        };
        if s == NONE {
            return;
        }
        self.unlink(s);
        self.slot_of[frame as usize] = NONE;
        self.frame_of[s as usize] = NONE;
        self.free.push(s);
        self.len -= 1;
    }

    /// Stores `contents` as `frame`'s latest contents and marks it most
    /// recently used, evicting the least recently used page when full.
    /// Returns the evicted frame.
    pub(crate) fn put(&mut self, frame: u32, contents: &Page) -> Option<u32> {
        if self.capacity == 0 {
            return None;
        }
        if self.slot_of.len() <= frame as usize {
            self.slot_of
                .reserve_exact(frame as usize + 1 - self.slot_of.len());
            self.slot_of.resize(frame as usize + 1, NONE);
        }
        let mut evicted = None;
        let s = match self.slot_of[frame as usize] {
            NONE => {
                let s = if let Some(s) = self.free.pop() {
                    s
                } else if self.frame_of.len() < self.capacity {
                    if self.frame_of.is_empty() {
                        // Reserve the whole cache once (no doubling slack).
                        self.frame_of.reserve_exact(self.capacity);
                        self.prev.reserve_exact(self.capacity);
                        self.next.reserve_exact(self.capacity);
                        self.data.reserve_exact(self.capacity * PAGE_SIZE);
                    }
                    let s = self.frame_of.len() as u32;
                    self.frame_of.push(NONE);
                    self.prev.push(NONE);
                    self.next.push(NONE);
                    self.data.resize(self.data.len() + PAGE_SIZE, 0);
                    s
                } else {
                    let s = self.tail;
                    let old = self.frame_of[s as usize];
                    self.unlink(s);
                    self.slot_of[old as usize] = NONE;
                    self.len -= 1;
                    evicted = Some(old);
                    s
                };
                self.frame_of[s as usize] = frame;
                self.slot_of[frame as usize] = s;
                self.len += 1;
                s
            }
            s => {
                self.unlink(s);
                s
            }
        };
        self.push_front(s);
        let at = s as usize * PAGE_SIZE;
        self.data[at..at + PAGE_SIZE].copy_from_slice(contents);
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(v: u8) -> Page {
        [v; PAGE_SIZE]
    }

    #[test]
    fn lru_order_and_eviction() {
        let mut c = PageCache::new(2);
        assert_eq!(c.put(1, &page(1)), None);
        assert_eq!(c.put(7, &page(7)), None);
        assert_eq!(c.get(1).map(|p| p[0]), Some(1));
        // Refresh 1: now 7 is least recent.
        assert_eq!(c.put(1, &page(11)), None);
        assert_eq!(c.put(3, &page(3)), Some(7));
        assert!(!c.contains(7));
        assert_eq!(c.get(1).map(|p| p[0]), Some(11));
        assert_eq!(c.len(), 2);
        c.remove(1);
        assert_eq!(c.len(), 1);
        assert!(c.get(1).is_none());
        assert_eq!(c.put(9, &page(9)), None, "free slot reused");
        assert_eq!(c.put(10, &page(10)), Some(3));
        assert!(c.bytes() >= 2 * PAGE_SIZE);
        c.remove(12345);
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut c = PageCache::new(0);
        assert_eq!(c.put(1, &page(1)), None);
        assert!(c.get(1).is_none());
        assert_eq!(c.capacity(), 0);
    }
}
