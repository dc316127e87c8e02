//! Peak rate from an average: arrivals are close to Poisson, so size for a high percentile of the
//! number of arrivals in one second rather than for the mean.

use crate::error::SimError;

/// The smallest count `k` with `P(N <= k) >= percentile` for `N ~ Poisson(avg_per_s)`.
pub fn poisson_peak(avg_per_s: f64, percentile: f64) -> Result<f64, SimError> {
    if !(avg_per_s.is_finite() && avg_per_s > 0.0) {
        return Err(SimError::invalid(format!(
            "average rate must be positive, got {avg_per_s}"
        )));
    }
    if !(percentile > 0.0 && percentile < 1.0) {
        return Err(SimError::invalid(format!(
            "peak percentile must lie in (0, 1), got {percentile}"
        )));
    }
    // Terms in log space: exp(-avg) alone underflows for averages above ~745.
    let mut log_pmf = -avg_per_s;
    let mut cdf = log_pmf.exp();
    let mut k = 0u64;
    while cdf < percentile {
        k += 1;
        log_pmf += (avg_per_s / k as f64).ln();
        cdf += log_pmf.exp();
        if k as f64 > avg_per_s + 50.0 * avg_per_s.sqrt() + 100.0 {
            break;
        }
    }
    Ok(k as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_peaks() {
        assert_eq!(poisson_peak(64.0, 0.95).unwrap(), 77.0);
        assert_eq!(poisson_peak(7.0, 0.95).unwrap(), 12.0);
        assert_eq!(poisson_peak(1000.0, 0.5).unwrap(), 1000.0);
        // Normal approximation for a large mean: 5000 + 1.645 * 70.7 = 5116.3.
        assert!((poisson_peak(5000.0, 0.95).unwrap() - 5117.0).abs() <= 1.0);
    }

    #[test]
    fn bad_input_is_refused() {
        for (a, p) in [
            (0.0, 0.95),
            (-3.0, 0.95),
            (f64::NAN, 0.9),
            (10.0, 1.0),
            (10.0, 0.0),
        ] {
            assert!(poisson_peak(a, p).is_err(), "{a} {p}");
        }
    }
}
