//! Latency histograms: recorded lock-free from every connection, merged
//! across worker processes, read as percentiles.
//!
//! Values are microseconds in log-linear buckets (the HdrHistogram idea):
//! values below 64 have a bucket each, and every power of two above is cut
//! into 64 equal buckets, so a bucket is never wider than 1/64 (1.6 %) of
//! its values. 3,776 buckets cover all of `u64`; a worker keeps one array
//! of atomic counters per histogram (30 KB) instead of one histogram per
//! connection.
//!
//! A [`Snapshot`] is the serializable, mergeable form: the non-empty
//! buckets plus exact count, min, max and sum. Percentiles are read from
//! the buckets and reported as the bucket's upper bound (never understating
//! a latency), clamped to the exact max.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Sub-buckets per power of two, as a power of two.
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Bucket count covering every `u64`.
pub const BUCKETS: usize = (SUB + (64 - SUB_BITS as u64) * SUB) as usize;

/// The bucket of `v`.
pub fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = (v >> shift) - SUB;
    (SUB + u64::from(shift) * SUB + sub) as usize
}

/// The smallest and largest value of bucket `i`.
pub fn bucket_bounds(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < SUB {
        return (i, i);
    }
    let shift = (i - SUB) / SUB;
    let sub = (i - SUB) % SUB;
    let low = (SUB + sub) << shift;
    (low, low + ((1u64 << shift) - 1))
}

/// A histogram many tasks record into at once.
pub struct AtomicHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
}

impl Default for AtomicHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }
}

impl AtomicHistogram {
    pub fn record(&self, v: u64) {
        self.buckets[bucket_of(v)].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
        // A plain load first: min and max rarely change, and fetch_min/max
        // would be a compare-and-swap on every record.
        if v < self.min.load(Ordering::Relaxed) {
            self.min.fetch_min(v, Ordering::Relaxed);
        }
        if v > self.max.load(Ordering::Relaxed) {
            self.max.fetch_max(v, Ordering::Relaxed);
        }
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Snapshot {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let c = c.load(Ordering::Relaxed);
                (c > 0).then_some((i as u32, c))
            })
            .collect();
        let count = self.count.load(Ordering::Relaxed);
        Snapshot {
            buckets,
            count,
            sum: self.sum.load(Ordering::Relaxed),
            min: if count == 0 {
                0
            } else {
                self.min.load(Ordering::Relaxed)
            },
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

/// A histogram at rest: what workers send and the driver merges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `(bucket, count)` for every non-empty bucket, by bucket.
    pub buckets: Vec<(u32, u64)>,
    pub count: u64,
    pub sum: u64,
    pub min: u64,
    pub max: u64,
}

impl Snapshot {
    /// Adds `other`'s values to these.
    pub fn merge(&mut self, other: &Snapshot) {
        if other.count == 0 {
            return;
        }
        self.min = if self.count == 0 {
            other.min
        } else {
            self.min.min(other.min)
        };
        self.max = self.max.max(other.max);
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        let mut merged = Vec::with_capacity(self.buckets.len() + other.buckets.len());
        let (mut a, mut b) = (
            self.buckets.iter().peekable(),
            other.buckets.iter().peekable(),
        );
        loop {
            match (a.peek(), b.peek()) {
                (Some(&&(ia, ca)), Some(&&(ib, cb))) => {
                    if ia == ib {
                        merged.push((ia, ca + cb));
                        a.next();
                        b.next();
                    } else if ia < ib {
                        merged.push((ia, ca));
                        a.next();
                    } else {
                        merged.push((ib, cb));
                        b.next();
                    }
                }
                (Some(&&x), None) => {
                    merged.push(x);
                    a.next();
                }
                (None, Some(&&x)) => {
                    merged.push(x);
                    b.next();
                }
                (None, None) => break,
            }
        }
        self.buckets = merged;
    }

    /// The value at quantile `q` (0 < q ≤ 1): the upper bound of the bucket
    /// holding the ⌈q·count⌉-th smallest value, clamped to the exact max.
    /// 0 for an empty histogram.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // The epsilon keeps float noise (0.9 * 50 = 45.000…01) from
        // pushing the rank one value up.
        let rank = ((q * self.count as f64 - 1e-9).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for &(i, c) in &self.buckets {
            seen += c;
            if seen >= rank {
                return bucket_bounds(i as usize).1.clamp(self.min, self.max);
            }
        }
        self.max
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(63), 63);
        assert_eq!(bucket_of(64), 64);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        for v in [0, 1, 63, 64, 65, 127, 128, 1000, 123_456, 1 << 40, u64::MAX] {
            let (lo, hi) = bucket_bounds(bucket_of(v));
            assert!(lo <= v && v <= hi, "{v} in [{lo}, {hi}]");
            // A bucket is at most 1/64 of its values wide.
            assert!((hi - lo) as f64 <= lo as f64 / 64.0 + 1.0, "{v}");
        }
        // Consecutive buckets tile the line with no gap or overlap.
        for i in 0..BUCKETS - 1 {
            assert_eq!(bucket_bounds(i).1 + 1, bucket_bounds(i + 1).0, "{i}");
        }
    }

    fn filled(values: impl IntoIterator<Item = u64>) -> Snapshot {
        let h = AtomicHistogram::default();
        for v in values {
            h.record(v);
        }
        h.snapshot()
    }

    #[test]
    fn small_values_give_exact_percentiles() {
        // 1..=50: p50 is the 25th value, p90 the 45th, p99 and max the 50th.
        let s = filled(1..=50);
        assert_eq!(s.count, 50);
        assert_eq!(s.quantile(0.5), 25);
        assert_eq!(s.quantile(0.9), 45);
        assert_eq!(s.quantile(0.99), 50);
        assert_eq!(s.quantile(0.999), 50);
        assert_eq!(s.quantile(1.0), 50);
        assert_eq!((s.min, s.max), (1, 50));
        assert_eq!(s.mean(), 25.5);
    }

    #[test]
    fn large_values_are_within_the_bucket_precision_and_never_understated() {
        let s = filled((1..=10_000).map(|v| v * 1000));
        for (q, exact) in [(0.5, 5_000_000u64), (0.9, 9_000_000), (0.99, 9_900_000)] {
            let got = s.quantile(q);
            assert!(got >= exact, "q{q}: {got} < {exact}");
            assert!((got - exact) as f64 <= exact as f64 / 64.0, "q{q}: {got}");
        }
        // The top quantile is the exact max, not a bucket bound above it.
        assert_eq!(s.quantile(1.0), 10_000_000);
        assert_eq!(s.quantile(0.9999), 10_000_000);
    }

    #[test]
    fn one_outlier_shows_at_p999_only_when_it_is_past_the_rank() {
        let mut values = vec![100u64; 999];
        values.push(1_000_000);
        let s = filled(values);
        assert!(s.quantile(0.99) < 110);
        assert!(s.quantile(0.999) < 110); // rank 999 of 1000 is still 100
        assert_eq!(s.quantile(1.0), 1_000_000);
    }

    #[test]
    fn merging_equals_recording_everything_in_one() {
        let a = filled([1, 5, 64, 1000, 1000, 70_000]);
        let b = filled([5, 2, 999_999, 64]);
        let mut merged = a.clone();
        merged.merge(&b);
        assert_eq!(
            merged,
            filled([1, 5, 64, 1000, 1000, 70_000, 5, 2, 999_999, 64])
        );
        // Merging into or from an empty snapshot changes nothing.
        let mut empty = Snapshot::default();
        empty.merge(&a);
        assert_eq!(empty, a);
        let mut same = a.clone();
        same.merge(&Snapshot::default());
        assert_eq!(same, a);
    }

    #[test]
    fn empty_histograms_read_as_zero() {
        let s = Snapshot::default();
        assert_eq!(s.quantile(0.5), 0);
        assert_eq!(s.mean(), 0.0);
    }

    #[test]
    fn snapshots_round_trip_through_json() {
        let s = filled([3, 300, 30_000]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Snapshot>(&json).unwrap(), s);
    }
}
