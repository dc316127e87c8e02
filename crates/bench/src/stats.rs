//! Order statistics.
//!
//! Percentiles use linear interpolation between the closest ranks, numpy's default (`method =
//! "linear"`, Hyndman and Fan type 7): for `n` sorted samples `x[0..n]` and a percentile `p`, take
//! `h = (n - 1) * p / 100`, then `x[floor(h)] + (h - floor(h)) * (x[floor(h) + 1] - x[floor(h)])`.

use serde::Serialize;

/// The `p`th percentile (`0..=100`) of `sorted` (ascending), or `None` when it is empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let h = last as f64 * (p.clamp(0.0, 100.0) / 100.0);
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(last);
    Some(sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo]))
}

/// Count, mean, extremes and the percentiles we report, of one metric.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Distribution {
    pub count: usize,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Distribution {
    /// Summarises `samples` (any order; NaNs are dropped). `None` when nothing is left.
    pub fn from_samples(mut samples: Vec<f64>) -> Option<Self> {
        samples.retain(|x| !x.is_nan());
        samples.sort_by(f64::total_cmp);
        let pct = |p| percentile(&samples, p);
        Some(Self {
            count: samples.len(),
            mean: samples.iter().sum::<f64>() / samples.len() as f64,
            min: *samples.first()?,
            max: *samples.last()?,
            p50: pct(50.0)?,
            p90: pct(90.0)?,
            p95: pct(95.0)?,
            p99: pct(99.0)?,
        })
    }

    /// The same distribution with every value multiplied by `k` (seconds to milliseconds).
    pub fn scaled(&self, k: f64) -> Self {
        Self {
            count: self.count,
            mean: self.mean * k,
            min: self.min * k,
            max: self.max * k,
            p50: self.p50 * k,
            p90: self.p90 * k,
            p95: self.p95 * k,
            p99: self.p99 * k,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn percentiles_match_hand_computed_values() {
        let x = [1.0, 2.0, 3.0, 4.0];
        // h = 3 * 0.5 = 1.5 -> 2 + 0.5 * (3 - 2)
        assert!(close(percentile(&x, 50.0).unwrap_or(f64::NAN), 2.5));
        // h = 2.7 -> 3 + 0.7 * 1
        assert!(close(percentile(&x, 90.0).unwrap_or(f64::NAN), 3.7));
        // h = 2.97 -> 3.97
        assert!(close(percentile(&x, 99.0).unwrap_or(f64::NAN), 3.97));
        assert_eq!(percentile(&x, 0.0), Some(1.0));
        assert_eq!(percentile(&x, 100.0), Some(4.0));
        // numpy.percentile([15, 20, 35, 40, 50], 40) == 29.0: h = 1.6 -> 20 + 0.6 * 15
        let y = [15.0, 20.0, 35.0, 40.0, 50.0];
        assert!(close(percentile(&y, 40.0).unwrap_or(f64::NAN), 29.0));
        assert_eq!(percentile(&[7.0], 95.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn distribution_of_one_to_ten() {
        let d = Distribution::from_samples((1..=10).rev().map(f64::from).collect());
        let d = d.unwrap_or_else(|| panic!("ten samples"));
        assert_eq!(d.count, 10);
        assert!(close(d.mean, 5.5));
        assert_eq!((d.min, d.max), (1.0, 10.0));
        // h = 9p: p50 -> 4.5 -> 5.5; p90 -> 8.1 -> 9.1; p95 -> 8.55 -> 9.55; p99 -> 8.91 -> 9.91
        assert!(close(d.p50, 5.5));
        assert!(close(d.p90, 9.1));
        assert!(close(d.p95, 9.55));
        assert!(close(d.p99, 9.91));
        let ms = d.scaled(1000.0);
        assert!(close(ms.p90, 9100.0) && ms.count == 10);
        assert_eq!(Distribution::from_samples(vec![f64::NAN]), None);
    }
}
