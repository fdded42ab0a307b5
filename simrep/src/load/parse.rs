//! Parsing of `simrep load` flag values: durations, value-size ranges and
//! operation mixes. Pure functions, usable by clap's `value_parser`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::proto::MAX_VALUE;
use crate::vmm::run::parse_size;

/// Parses a duration: a number with a unit `ms`, `s`, `m` or `h` (`500ms`,
/// `30s`, `1.5s`, `2m`, `1h`); a bare number is seconds.
///
/// # Errors
///
/// A message naming the bad value.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("bad duration `{s}` (examples: 500ms, 30s, 2m)"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        u => {
            return Err(format!(
                "bad duration `{s}`: unknown unit `{u}` (ms, s, m, h)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("bad duration `{s}`: out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Value sizes of `PUT`s: one size or an inclusive range, each at most
/// [`MAX_VALUE`] bytes (`128`, `1K`, `64-4096`, `1K-64K`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SizeRange {
    /// Smallest value in bytes.
    pub min: u32,
    /// Largest value in bytes.
    pub max: u32,
}

impl FromStr for SizeRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let one = |p: &str| -> Result<u32, String> {
            let v = parse_size(p)?;
            if v > MAX_VALUE as u64 {
                return Err(format!(
                    "value size `{p}` is over the protocol's limit of {MAX_VALUE} bytes"
                ));
            }
            Ok(v as u32)
        };
        let (min, max) = match s.split_once('-') {
            Some((a, b)) => (one(a)?, one(b)?),
            None => {
                let v = one(s)?;
                (v, v)
            }
        };
        if min > max {
            return Err(format!("bad value size range `{s}`: {min} > {max}"));
        }
        Ok(SizeRange { min, max })
    }
}

impl fmt::Display for SizeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

/// Relative weights of a workload's operations, as `name=weight,...`
/// (`get=80,put=15,del=3,scan=2`). Names not given weigh 0.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Mix {
    /// `(operation, weight)` in the order of the workload's operation list.
    pub weights: Vec<(&'static str, u32)>,
}

impl Mix {
    /// Parses `s` for a workload whose operations are `names`.
    ///
    /// # Errors
    ///
    /// Unknown names, bad numbers, repeated names or all weights 0.
    pub fn parse(s: &str, names: &[&'static str]) -> Result<Mix, String> {
        let mut weights: Vec<(&'static str, u32)> = names.iter().map(|n| (*n, 0)).collect();
        let mut seen = vec![false; names.len()];
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, w) = part
                .split_once('=')
                .ok_or_else(|| format!("bad mix entry `{part}`: expected name=weight"))?;
            let i = names
                .iter()
                .position(|n| *n == name.trim())
                .ok_or_else(|| {
                    format!(
                        "unknown operation `{}` in mix (expected {})",
                        name.trim(),
                        names.join(", ")
                    )
                })?;
            if std::mem::replace(&mut seen[i], true) {
                return Err(format!("operation `{}` given twice in mix", names[i]));
            }
            weights[i].1 = w
                .trim()
                .parse()
                .map_err(|_| format!("bad weight in mix entry `{part}`"))?;
        }
        if weights.iter().all(|(_, w)| *w == 0) {
            return Err(format!("mix `{s}` has no operation with a weight above 0"));
        }
        Ok(Mix { weights })
    }

    /// The weight of operation `name`.
    pub fn weight(&self, name: &str) -> u32 {
        self.weights
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, w)| *w)
    }

    /// Picks an operation index from a uniform random `r`.
    pub(crate) fn pick(&self, r: u64) -> usize {
        let total: u64 = self.weights.iter().map(|(_, w)| u64::from(*w)).sum();
        let mut x = r % total.max(1);
        for (i, (_, w)) in self.weights.iter().enumerate() {
            if x < u64::from(*w) {
                return i;
            }
            x -= u64::from(*w);
        }
        0
    }
}

impl fmt::Display for Mix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .weights
            .iter()
            .map(|(n, w)| format!("{n}={w}"))
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// A small, fast, seedable generator (SplitMix64); the load needs
/// reproducible variety, not cryptographic quality.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next_u64() % (hi - lo + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!("128".parse(), Ok(SizeRange { min: 128, max: 128 }));
        assert_eq!("64-4096".parse(), Ok(SizeRange { min: 64, max: 4096 }));
        assert_eq!(
            "1K-64K".parse(),
            Ok(SizeRange {
                min: 1024,
                max: 65536
            })
        );
        assert!("65537".parse::<SizeRange>().is_err());
        assert!("10-5".parse::<SizeRange>().is_err());
        assert!("x".parse::<SizeRange>().is_err());
    }

    #[test]
    fn mixes() {
        let names = ["get", "put", "del", "scan"];
        let m = Mix::parse("get=80, put=20", &names).unwrap();
        assert_eq!(
            (m.weight("get"), m.weight("put"), m.weight("scan")),
            (80, 20, 0)
        );
        assert_eq!(m.to_string(), "get=80,put=20,del=0,scan=0");
        assert!(Mix::parse("get=1,get=2", &names).is_err());
        assert!(Mix::parse("fly=1", &names).is_err());
        assert!(Mix::parse("get=0", &names).is_err());
        assert!(Mix::parse("get", &names).is_err());
        // pick follows the weights exactly over one period.
        let mut counts = [0u32; 4];
        for r in 0..100 {
            counts[m.pick(r)] += 1;
        }
        assert_eq!(counts, [80, 20, 0, 0]);
    }

    #[test]
    fn rng_range_bounds() {
        let mut r = Rng::new(1);
        for _ in 0..1000 {
            let x = r.range(3, 5);
            assert!((3..=5).contains(&x));
        }
        assert_eq!(r.range(9, 9), 9);
    }
}
