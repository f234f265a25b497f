//! Latency histograms: recorded from every connection of a worker, merged
//! across worker processes, read as percentiles.
//!
//! Values are microseconds in an HdrHistogram (crate `hdrhistogram`) with
//! 3 significant digits: every value below 2,048 µs has a bucket of its
//! own, and a bucket is never wider than 1/1,024 of its values above. The
//! histogram grows to whatever range it is given (auto-resize).
//!
//! A worker keeps one [`SharedHistogram`] per measurement, which its
//! client tasks record into under a mutex: hdrhistogram records through
//! `&mut`, and a worker's runtime has one thread by default, so the lock
//! is uncontended (docs/BENCHMARKS.md, "Latency histograms in the tester",
//! has what it costs against the atomic counters it replaced).
//!
//! A [`Snapshot`] is the serializable, mergeable form: the histogram in
//! HdrHistogram's V2 encoding (base64 in JSON, so any HdrHistogram
//! implementation can read it) plus the exact min, max and sum, which the
//! histogram only knows to its bucket precision. Percentiles are read from
//! the buckets and reported as the bucket's upper bound (never
//! understating a latency), clamped to the exact min and max.

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// Significant decimal digits every value keeps.
pub const SIGFIG: u8 = 3;

fn empty() -> Histogram<u64> {
    Histogram::new(SIGFIG).expect("3 significant digits are valid")
}

/// A histogram the tasks of one worker record into.
#[derive(Default)]
pub struct SharedHistogram {
    inner: Mutex<Snapshot>,
}

impl SharedHistogram {
    pub fn record(&self, v: u64) {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(v);
    }

    pub fn count(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).count()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A histogram at rest: what workers send and the driver merges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The buckets, as HdrHistogram V2 (base64) on the wire.
    #[serde(with = "v2_base64")]
    pub hist: Histogram<u64>,
    pub sum: u64,
    /// Exact smallest value (0 when empty).
    pub min: u64,
    /// Exact largest value (0 when empty).
    pub max: u64,
}

impl Default for Snapshot {
    fn default() -> Self {
        Self {
            hist: empty(),
            sum: 0,
            min: 0,
            max: 0,
        }
    }
}

impl Snapshot {
    pub fn record(&mut self, v: u64) {
        // Auto-resize grows the histogram to any value up to 2^62 or so;
        // one beyond that is counted at the histogram's top (its exact
        // value still sets `max`).
        if self.hist.record(v).is_err() {
            self.hist.saturating_record(v);
        }
        self.min = if self.count() == 1 {
            v
        } else {
            self.min.min(v)
        };
        self.max = self.max.max(v);
        self.sum = self.sum.saturating_add(v);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Adds `other`'s values to these.
    pub fn merge(&mut self, other: &Snapshot) {
        if other.count() == 0 {
            return;
        }
        self.min = if self.count() == 0 {
            other.min
        } else {
            self.min.min(other.min)
        };
        self.max = self.max.max(other.max);
        self.sum = self.sum.saturating_add(other.sum);
        // Auto-resize is on (also after deserializing), so adding grows
        // the range as needed and cannot fail.
        self.hist
            .add(&other.hist)
            .expect("an auto-resizing histogram takes any other");
    }

    /// The value at quantile `q` (0 < q ≤ 1): the upper bound of the bucket
    /// holding the ⌈q·count⌉-th smallest value, clamped to the exact min
    /// and max; the largest value for the top rank. 0 for an empty
    /// histogram.
    pub fn quantile(&self, q: f64) -> u64 {
        let count = self.count();
        if count == 0 {
            return 0;
        }
        // The rank computed here, with an epsilon so that float noise
        // (0.9 * 50 = 45.000…01) does not push it one value up; then a
        // quantile half a value below it, which hdrhistogram's own ceil()
        // maps back to exactly this rank.
        let rank = ((q * count as f64 - 1e-9).ceil() as u64).clamp(1, count);
        if rank == count {
            return self.max;
        }
        let at = self
            .hist
            .value_at_quantile((rank as f64 - 0.5) / count as f64);
        at.clamp(self.min, self.max)
    }

    pub fn mean(&self) -> f64 {
        match self.count() {
            0 => 0.0,
            n => self.sum as f64 / n as f64,
        }
    }
}

/// `Histogram<u64>` as a base64 string of its V2 serialization.
mod v2_base64 {
    use super::*;
    use serde::de::Error as _;
    use serde::ser::Error as _;

    pub fn serialize<S: serde::Serializer>(h: &Histogram<u64>, s: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(h, &mut bytes)
            .map_err(|e| S::Error::custom(format!("histogram: {e:?}")))?;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Histogram<u64>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(D::Error::custom)?;
        let mut h: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| D::Error::custom(format!("histogram: {e:?}")))?;
        h.auto(true);
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(values: impl IntoIterator<Item = u64>) -> Snapshot {
        let h = SharedHistogram::default();
        for v in values {
            h.record(v);
        }
        h.snapshot()
    }

    #[test]
    fn small_values_give_exact_percentiles() {
        // 1..=50: p50 is the 25th value, p90 the 45th, p99 and max the 50th.
        let s = filled(1..=50);
        assert_eq!(s.count(), 50);
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
            assert!((got - exact) as f64 <= exact as f64 / 1000.0, "q{q}: {got}");
        }
        // The top quantile is the exact max, not a bucket bound above it.
        assert_eq!(s.quantile(1.0), 10_000_000);
        assert_eq!(s.quantile(0.9999), 10_000_000);
    }

    #[test]
    fn zero_and_huge_values_are_kept() {
        let s = filled([0, 0, 1 << 40, u64::MAX]);
        assert_eq!(s.count(), 4);
        assert_eq!((s.min, s.max), (0, u64::MAX));
        assert_eq!(s.quantile(0.5), 0);
        assert_eq!(s.quantile(1.0), u64::MAX);
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
    fn snapshots_round_trip_through_json_and_still_merge() {
        let s = filled([3, 300, 30_000]);
        let json = serde_json::to_string(&s).unwrap();
        let mut back = serde_json::from_str::<Snapshot>(&json).unwrap();
        assert_eq!(back, s);
        // A deserialized histogram takes values beyond its original range.
        back.merge(&filled([5_000_000_000]));
        assert_eq!(back.count(), 4);
        assert_eq!(back.quantile(1.0), 5_000_000_000);
        assert!(
            serde_json::from_str::<Snapshot>(r#"{"hist":"AAAA","sum":0,"min":0,"max":0}"#).is_err()
        );
    }
}
