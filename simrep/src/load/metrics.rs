//! Latency and outcome accounting of `simrep load`.
//!
//! Latency is recorded in nanoseconds into an HDR histogram (3 significant
//! digits). In open-loop runs it is measured from the *intended* send time,
//! so a stall delays every request scheduled during it and shows in the
//! percentiles (no coordinated omission).

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency the histograms hold (longer ones are clamped): 1 h.
const MAX_NS: u64 = 3_600_000_000_000;

/// A fresh latency histogram.
pub(crate) fn histogram() -> Histogram<u64> {
    // 1 ns .. 1 h at 3 significant digits: valid bounds, cannot fail.
    Histogram::new_with_bounds(1, MAX_NS, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Outcomes of the measured requests of one connection (or all).
#[derive(Clone)]
pub(crate) struct Stats {
    pub(crate) hist: Histogram<u64>,
    /// Requests sent in the measured window.
    pub(crate) requests: u64,
    /// Responses to them.
    pub(crate) responses: u64,
    /// Responses within the good threshold.
    pub(crate) good: u64,
    /// Responses within the tolerable threshold.
    pub(crate) tolerable: u64,
    /// Failures and non-OK statuses by kind.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Per-operation response counts.
    pub(crate) ops: BTreeMap<&'static str, u64>,
}

impl Stats {
    pub(crate) fn new() -> Stats {
        Stats {
            hist: histogram(),
            requests: 0,
            responses: 0,
            good: 0,
            tolerable: 0,
            errors: BTreeMap::new(),
            ops: BTreeMap::new(),
        }
    }

    /// Records one response of `latency`.
    pub(crate) fn response(
        &mut self,
        op: &'static str,
        latency: Duration,
        good: Duration,
        tolerable: Duration,
    ) {
        self.requests += 1;
        self.responses += 1;
        self.hist
            .saturating_record((latency.as_nanos() as u64).clamp(1, MAX_NS));
        if latency <= good {
            self.good += 1;
        }
        if latency <= tolerable {
            self.tolerable += 1;
        }
        *self.ops.entry(op).or_default() += 1;
    }

    /// Records a request that got no response.
    pub(crate) fn failure(&mut self, kind: &str) {
        self.requests += 1;
        self.error(kind);
    }

    /// Counts an error or status of `kind`.
    pub(crate) fn error(&mut self, kind: &str) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
    }

    /// Adds `o` into `self`.
    pub(crate) fn merge(&mut self, o: &Stats) {
        let _ = self.hist.add(&o.hist);
        self.requests += o.requests;
        self.responses += o.responses;
        self.good += o.good;
        self.tolerable += o.tolerable;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.ops {
            *self.ops.entry(k).or_default() += v;
        }
    }

    /// The latency summary.
    pub(crate) fn latency(&self) -> Latency {
        let ms = |ns: u64| ns as f64 / 1e6;
        if self.hist.is_empty() {
            return Latency::default();
        }
        Latency {
            mean_ms: self.hist.mean() / 1e6,
            p50_ms: ms(self.hist.value_at_quantile(0.50)),
            p99_ms: ms(self.hist.value_at_quantile(0.99)),
            p999_ms: ms(self.hist.value_at_quantile(0.999)),
            max_ms: ms(self.hist.max()),
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

/// Name of a status code, for the error table.
pub(crate) fn status_name(st: u8) -> &'static str {
    use crate::proto::status;
    match st {
        status::OK => "ok",
        status::NOT_FOUND => "not_found",
        status::BAD_REQUEST => "bad_request",
        status::NO_SPACE => "no_space",
        status::INSUFFICIENT_FUNDS => "insufficient_funds",
        status::UNKNOWN_OP => "unknown_op",
        _ => "unknown_status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_and_percentiles() {
        let good = Duration::from_millis(10);
        let tol = Duration::from_millis(50);
        let mut s = Stats::new();
        for i in 1..=1000u64 {
            // 1 ms .. 1000 ms
            s.response("get", Duration::from_millis(i), good, tol);
        }
        s.failure("lost");
        assert_eq!((s.requests, s.responses), (1001, 1000));
        assert_eq!((s.good, s.tolerable), (10, 50));
        let l = s.latency();
        assert!((l.p50_ms - 500.0).abs() < 1.0, "{l:?}");
        assert!((l.p99_ms - 990.0).abs() < 1.0, "{l:?}");
        assert!((l.p999_ms - 999.0).abs() < 1.0, "{l:?}");
        assert!((l.max_ms - 1000.0).abs() < 1.0, "{l:?}");
        let mut t = Stats::new();
        t.merge(&s);
        t.merge(&s);
        assert_eq!((t.requests, t.good, t.errors["lost"]), (2002, 20, 2));
        assert_eq!(t.latency().p50_ms, l.p50_ms);
    }

    #[test]
    fn empty_and_extreme() {
        let s = Stats::new();
        assert_eq!(s.latency(), Latency::default());
        let mut s = Stats::new();
        s.response(
            "get",
            Duration::from_secs(10_000),
            Duration::ZERO,
            Duration::ZERO,
        );
        s.response("get", Duration::ZERO, Duration::ZERO, Duration::ZERO);
        assert_eq!((s.responses, s.good), (2, 1));
        assert!(s.latency().max_ms >= 3_599_000.0);
    }
}
