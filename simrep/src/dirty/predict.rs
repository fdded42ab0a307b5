//! Write-fault prediction (after Zhu et al., "Optimizing the Performance of
//! Virtual Machine Synchronization for Fault Tolerance", IEEE TC 2011).
//!
//! In bitmap mode every harvest re-protects the pages it returns
//! (`KVM_CLEAR_DIRTY_LOG`), so a page the guest writes again in the next
//! epoch costs one write fault (29-39 us a page here under shadow
//! paging). A page that was dirty in each of the last `k` harvests is
//! *hot*: the harvest leaves its bit set in KVM, so KVM leaves it writable
//! (no fault next epoch), and because its bit stays set every later harvest
//! returns it — the price is that a hot page is sent every epoch whether
//! the guest wrote it or not.
//!
//! **Exactness** holds by construction: a page whose bit is cleared is
//! write-protected and its next write sets the bit again; a page whose bit
//! is not cleared is returned by every harvest. Either way a page written
//! since the previous harvest is in the next one.
//!
//! **Cooling down.** Nothing cheap tells whether a writable page is still
//! being written (its bit is simply always set), so every
//! `recheck_every`-th harvest re-protects *all* pages, hot ones included.
//! The harvest after that sees the truth: a page written again is at once
//! hot again (its history is still all ones, so it costs one fault per
//! `recheck_every` epochs), a page not written drops out of the history and
//! is no longer sent.
//!
//! The history is `k` bit planes of one bit per page (one per harvest,
//! in a ring); a page is hot when its bit is set in all of them. The first
//! harvest (every page, because of `KVM_DIRTY_LOG_INITIALLY_SET`) is not an
//! observation of the guest and does not enter the history.
//!
//! Measuring what it saves: under shadow paging (PVM here) each write
//! fault on a protected page is one write walk of
//! `kvmmmu:kvm_mmu_pagetable_walk`, which [`crate::ebpf::WriteTracer`]
//! counts (`WriteStats::walk_writes`). KVM's own `pf_fixed` counters are in
//! debugfs, which kernel lockdown makes unreadable here.

/// Write-fault prediction settings (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prediction {
    /// A page dirty in each of the last `k` harvests is hot (1..=64).
    pub k: u32,
    /// Every `recheck_every`-th harvest re-protects all hot pages, so that
    /// pages the guest stopped writing cool down (at least 1; 1 re-protects
    /// every harvest, i.e. no prediction at all).
    pub recheck_every: u32,
}

/// The default `recheck_every`: a hot page is re-checked about once a
/// second at 50 ms epochs.
pub const DEFAULT_RECHECK_EVERY: u32 = 20;

/// Largest supported `k`.
pub const MAX_K: u32 = 64;

/// The default `k` (measured on `churn` at 50 ms epochs: k = 2 saves as
/// many write faults as k = 1 on pages rewritten every epoch, and unlike
/// k = 1 sends nothing extra for a buffer rewritten every few epochs,
/// where k = 1 sent 2.8-9x the pages and copied them in the pause).
pub const DEFAULT_K: u32 = 2;

impl Default for Prediction {
    /// `k` = [`DEFAULT_K`], `recheck_every` = [`DEFAULT_RECHECK_EVERY`].
    fn default() -> Self {
        Prediction::with_k(DEFAULT_K)
    }
}

impl Prediction {
    /// `k` with the default re-check period.
    pub fn with_k(k: u32) -> Self {
        Prediction {
            k,
            recheck_every: DEFAULT_RECHECK_EVERY,
        }
    }

    /// Whether KVM and this module accept the settings.
    pub fn is_valid(&self) -> bool {
        (1..=MAX_K).contains(&self.k) && self.recheck_every >= 1
    }
}

/// Counters of write-fault prediction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PredictStats {
    /// Harvests observed (the first, full harvest is not counted).
    pub harvests: u64,
    /// Pages hot after the last harvest.
    pub hot: u64,
    /// Pages the last harvest left writable (its hot pages, or 0 on a
    /// re-check harvest).
    pub unprotected: u64,
    /// Whether the last harvest was a re-check (re-protected everything).
    pub rechecked: bool,
    /// Re-check harvests so far.
    pub rechecks: u64,
    /// Pages that were hot before the last re-check and were not written
    /// again since (cooled down), summed over all re-checks.
    pub cooled: u64,
    /// Sum over harvests of the pages left writable: each is a write fault
    /// saved if the guest wrote the page again, or a page sent in vain if
    /// not.
    pub unprotected_total: u64,
}

/// The per-page history of the last `k` harvests and the hot set.
#[derive(Debug, Clone)]
pub struct Predictor {
    cfg: Prediction,
    words: usize,
    /// `k` bit planes, one per harvest, in a ring.
    planes: Vec<Vec<u64>>,
    /// The plane the next harvest goes into.
    next: usize,
    /// Harvests observed since the last re-check: only after `k` of them
    /// can a page be dirty in all planes for real.
    filled: u32,
    /// Harvests since the last re-check.
    since_recheck: u32,
    /// The hot set after the last harvest.
    hot: Vec<u64>,
    /// Pages hot before the last re-check (to count those that cool).
    hot_at_recheck: Vec<u64>,
    stats: PredictStats,
}

impl Predictor {
    /// A predictor for `pages` pages with no history. `cfg` must be valid
    /// ([`Prediction::is_valid`]); the caller checks that.
    pub fn new(cfg: Prediction, pages: u64) -> Self {
        let words = super::kvm::bitmap_words(pages);
        let k = cfg.k.clamp(1, MAX_K) as usize;
        Predictor {
            cfg,
            words,
            planes: vec![vec![0; words]; k],
            next: 0,
            filled: 0,
            since_recheck: 0,
            hot: vec![0; words],
            hot_at_recheck: Vec::new(),
            stats: PredictStats::default(),
        }
    }

    /// The settings.
    pub fn config(&self) -> Prediction {
        self.cfg
    }

    /// The counters.
    pub fn stats(&self) -> PredictStats {
        self.stats
    }

    /// Whether page `gfn` is hot after the last harvest.
    pub fn is_hot(&self, gfn: u64) -> bool {
        let w = (gfn / 64) as usize;
        w < self.words && self.hot[w] & (1 << (gfn % 64)) != 0
    }

    /// The hot set after the last harvest, one bit per page.
    pub fn hot_bitmap(&self) -> &[u64] {
        &self.hot
    }

    /// Records one harvest's bitmap `dirty` (one bit per page: dirty since
    /// the previous harvest, hot pages included since their bits were left
    /// set) and fills `clear` with the bits to clear and re-protect:
    /// `dirty` without the hot pages, or all of `dirty` on a re-check.
    pub fn observe(&mut self, dirty: &[u64], clear: &mut Vec<u64>) {
        let k = self.planes.len();
        let n = self.words.min(dirty.len());
        let plane = &mut self.planes[self.next];
        plane[..n].copy_from_slice(&dirty[..n]);
        plane[n..].fill(0);
        self.next = (self.next + 1) % k;
        self.filled = self.filled.saturating_add(1);
        self.since_recheck += 1;
        let recheck = self.since_recheck >= self.cfg.recheck_every;
        if self.stats.rechecked {
            // The harvest after a re-check: hot pages not written since
            // have dropped out.
            self.stats.cooled += self
                .hot_at_recheck
                .iter()
                .zip(dirty)
                .map(|(h, d)| u64::from((h & !d).count_ones()))
                .sum::<u64>();
        }
        // Hot: dirty in each of the last k harvests.
        let mut hot_pages = 0u64;
        if self.filled as usize >= k {
            for w in 0..self.words {
                let mut h = !0u64;
                for p in &self.planes {
                    h &= p[w];
                }
                self.hot[w] = h;
                hot_pages += u64::from(h.count_ones());
            }
        } else {
            self.hot.fill(0);
        }
        clear.clear();
        if recheck {
            clear.extend_from_slice(&dirty[..n]);
            self.hot_at_recheck.clone_from(&self.hot);
            self.since_recheck = 0;
            self.stats.rechecks += 1;
        } else {
            clear.extend(dirty[..n].iter().zip(&self.hot).map(|(d, h)| d & !h));
        }
        let unprotected = if recheck { 0 } else { hot_pages };
        self.stats.harvests += 1;
        self.stats.hot = hot_pages;
        self.stats.unprotected = unprotected;
        self.stats.rechecked = recheck;
        self.stats.unprotected_total += unprotected;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bitmap of `words` words with the given pages set.
    fn bits(words: usize, pages: &[u64]) -> Vec<u64> {
        let mut b = vec![0; words];
        for &p in pages {
            b[(p / 64) as usize] |= 1 << (p % 64);
        }
        b
    }

    fn set(b: &[u64]) -> Vec<u64> {
        crate::dirty::DirtyPages::from_bitmap(b, b.len() as u64 * 64).into_vec()
    }

    /// Simulates KVM's manual-protect bitmap: `written` pages set their
    /// bits, the harvest reads the bitmap, the predictor decides what to
    /// clear, cleared bits go to 0. Returns (reported, cleared).
    struct Kvm {
        bitmap: Vec<u64>,
        p: Predictor,
        faults: u64,
    }

    impl Kvm {
        fn new(cfg: Prediction, pages: u64) -> Self {
            Kvm {
                bitmap: vec![0; crate::dirty::kvm::bitmap_words(pages)],
                p: Predictor::new(cfg, pages),
                faults: 0,
            }
        }
        fn epoch(&mut self, written: &[u64]) -> (Vec<u64>, Vec<u64>) {
            for &g in written {
                let (w, b) = ((g / 64) as usize, 1u64 << (g % 64));
                if self.bitmap[w] & b == 0 {
                    // Protected page: the write faults.
                    self.faults += 1;
                }
                self.bitmap[w] |= b;
            }
            let reported = set(&self.bitmap);
            let mut clear = Vec::new();
            self.p.observe(&self.bitmap, &mut clear);
            for (b, c) in self.bitmap.iter_mut().zip(&clear) {
                assert_eq!(*c & !*b, 0, "cleared a bit that was not set");
                *b &= !c;
            }
            (reported, set(&clear))
        }
    }

    #[test]
    fn pages_become_hot_after_k_consecutive_harvests() {
        for k in 1..=4u32 {
            let mut kvm = Kvm::new(
                Prediction {
                    k,
                    recheck_every: 1000,
                },
                256,
            );
            for e in 1..=k + 2 {
                let (reported, cleared) = kvm.epoch(&[3, 70, 200]);
                assert_eq!(reported, vec![3, 70, 200], "k={k} epoch {e}");
                if e < k {
                    assert_eq!(cleared, vec![3, 70, 200], "k={k} epoch {e}: hot too early");
                    assert_eq!(kvm.p.stats().hot, 0);
                } else {
                    assert!(cleared.is_empty(), "k={k} epoch {e}: hot pages cleared");
                    assert_eq!(kvm.p.stats().hot, 3);
                    assert_eq!(kvm.p.stats().unprotected, 3);
                    assert!(kvm.p.is_hot(70) && !kvm.p.is_hot(71));
                }
            }
            // Faults only until the pages became hot.
            assert_eq!(kvm.faults, 3 * u64::from(k), "k={k}");
        }
    }

    #[test]
    fn a_gap_resets_the_streak() {
        let mut kvm = Kvm::new(
            Prediction {
                k: 3,
                recheck_every: 1000,
            },
            128,
        );
        kvm.epoch(&[5]);
        kvm.epoch(&[5]);
        kvm.epoch(&[6]);
        let (_, cleared) = kvm.epoch(&[5, 6]);
        assert_eq!(cleared, vec![5, 6], "neither was dirty 3 times in a row");
        kvm.epoch(&[5, 6]);
        let (_, cleared) = kvm.epoch(&[5, 6]);
        assert!(cleared.is_empty());
    }

    #[test]
    fn hot_pages_are_reported_every_epoch_and_nothing_written_is_lost() {
        // Random writes over a small range, many epochs, several settings:
        // every page written in an epoch is reported at the end of it.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for (k, n) in [(1, 1), (1, 5), (2, 3), (4, 7), (8, 2)] {
            let mut kvm = Kvm::new(
                Prediction {
                    k,
                    recheck_every: n,
                },
                200,
            );
            let mut hot_before = Vec::new();
            for e in 0..300 {
                // Half the pages are written every epoch, the rest now and
                // then: some pages go hot, then cool.
                let mut w: Vec<u64> = (0..100).filter(|_| rnd() % 8 != 0).collect();
                w.extend((100..200).filter(|_| rnd() % 4 == 0));
                let (reported, _) = kvm.epoch(&w);
                for g in &w {
                    assert!(
                        reported.binary_search(g).is_ok(),
                        "k={k} n={n} epoch {e}: written page {g} not reported"
                    );
                }
                // Anything reported but not written must have been hot.
                for g in &reported {
                    assert!(
                        w.contains(g) || hot_before.contains(g),
                        "k={k} n={n} epoch {e}: page {g} reported without cause"
                    );
                }
                hot_before = (0..200).filter(|&g| kvm.p.is_hot(g)).collect();
                if n == 1 {
                    assert_eq!(kvm.p.stats().unprotected, 0, "n=1 re-protects all");
                }
            }
        }
    }

    #[test]
    fn recheck_reprotects_hot_pages_and_idle_ones_cool_down() {
        let mut kvm = Kvm::new(
            Prediction {
                k: 2,
                recheck_every: 4,
            },
            128,
        );
        // Harvests 1..=3: 10 and 11 are written, hot from harvest 2.
        for _ in 0..3 {
            kvm.epoch(&[10, 11]);
        }
        assert_eq!(kvm.p.stats().hot, 2);
        assert_eq!(kvm.faults, 4);
        // Harvest 4 is a re-check: everything is re-protected.
        let (reported, cleared) = kvm.epoch(&[10]);
        assert_eq!(reported, vec![10, 11], "11 is still reported (hot)");
        assert_eq!(cleared, vec![10, 11]);
        let st = kvm.p.stats();
        assert!(st.rechecked && st.unprotected == 0 && st.rechecks == 1);
        // Harvest 5: 10 is written again (one fault) and is hot at once;
        // 11 was not and is no longer reported.
        let (reported, cleared) = kvm.epoch(&[10]);
        assert_eq!(reported, vec![10]);
        assert!(cleared.is_empty());
        assert!(kvm.p.is_hot(10) && !kvm.p.is_hot(11));
        assert_eq!(kvm.p.stats().cooled, 1);
        assert_eq!(kvm.faults, 5);
        let (reported, _) = kvm.epoch(&[]);
        assert_eq!(reported, vec![10], "hot and unwritten: still sent");
    }

    #[test]
    fn validity() {
        assert!(Prediction::default().is_valid());
        assert!(Prediction::with_k(1).is_valid());
        assert!(Prediction::with_k(MAX_K).is_valid());
        assert!(!Prediction::with_k(0).is_valid());
        assert!(!Prediction::with_k(MAX_K + 1).is_valid());
        assert!(!Prediction {
            k: 2,
            recheck_every: 0
        }
        .is_valid());
    }

    #[test]
    fn k1_makes_every_dirty_page_hot_at_once() {
        let mut p = Predictor::new(Prediction::with_k(1), 100);
        let mut clear = Vec::new();
        p.observe(&bits(2, &[1, 99]), &mut clear);
        assert_eq!(set(&clear), Vec::<u64>::new(), "k=1: hot at once");
        assert_eq!(p.stats().hot, 2);
    }
}
