//! Measured/predicted ratios of recent admitted requests, so that a prediction can be read as a
//! median (what the client is told) and as a high quantile (what admission tests against the
//! budget): "predicted within budget" should hold for nearly every admitted request, not half.

use std::collections::VecDeque;

/// Ratios kept; the oldest go first. Short, so that the factors follow a change of regime (a burst
/// ending, the host's neighbours going quiet) within a hundred requests.
const WINDOW: usize = 96;
/// Ratios needed before the window's quantiles replace the defaults.
pub const MIN_RATIOS: usize = 16;

/// A window of measured/predicted ratios.
#[derive(Debug, Clone)]
pub struct Ratios {
    window: VecDeque<f64>,
    sorted: Vec<f64>,
    /// The quantile admission uses (0.99: "within budget" for 99 of 100 admitted).
    quantile: f64,
    /// The bound's factor until the window holds [`MIN_RATIOS`].
    default_bound: f64,
    /// Clamp of every factor: a burst of outliers cannot make admission refuse everything, nor
    /// a run of lucky requests make it promise the impossible.
    range: (f64, f64),
}

impl Ratios {
    pub fn new(quantile: f64, default_bound: f64) -> Self {
        Ratios {
            window: VecDeque::with_capacity(WINDOW),
            sorted: Vec::with_capacity(WINDOW),
            quantile: quantile.clamp(0.5, 1.0),
            default_bound: default_bound.max(1.0),
            range: (0.5, 4.0),
        }
    }

    /// Records one request's measured over predicted value (ignored unless finite and positive).
    pub fn observe(&mut self, ratio: f64) {
        if !(ratio.is_finite() && ratio > 0.0) {
            return;
        }
        if self.window.len() >= WINDOW
            && let Some(old) = self.window.pop_front()
            && let Ok(i) = self.sorted.binary_search_by(|x| x.total_cmp(&old))
        {
            self.sorted.remove(i);
        }
        self.window.push_back(ratio);
        let i = self.sorted.partition_point(|x| x.total_cmp(&ratio).is_lt());
        self.sorted.insert(i, ratio);
    }

    pub fn len(&self) -> usize {
        self.window.len()
    }

    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    fn at(&self, p: f64) -> f64 {
        let n = self.sorted.len();
        let h = (n - 1) as f64 * p;
        let lo = h.floor() as usize;
        let hi = (lo + 1).min(n - 1);
        self.sorted[lo] + (h - lo as f64) * (self.sorted[hi] - self.sorted[lo])
    }

    /// The ratio at quantile `p` of the window (1 while empty).
    pub fn quantile(&self, p: f64) -> f64 {
        if self.sorted.is_empty() {
            return 1.0;
        }
        self.at(p.clamp(0.0, 1.0))
    }

    /// What a point prediction is multiplied by: the window's median.
    pub fn median_factor(&self) -> f64 {
        if self.len() < MIN_RATIOS {
            return 1.0;
        }
        self.at(0.5).clamp(self.range.0, self.range.1)
    }

    /// What a prediction is multiplied by to bound it: the window's high quantile, never below
    /// the median (nor below 1 while the window is young).
    pub fn bound_factor(&self) -> f64 {
        if self.len() < MIN_RATIOS {
            return self.default_bound;
        }
        self.at(self.quantile)
            .max(self.median_factor())
            .clamp(self.range.0, self.range.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_until_enough_ratios_then_the_windows_quantiles() {
        let mut r = Ratios::new(0.9, 1.25);
        assert_eq!((r.median_factor(), r.bound_factor()), (1.0, 1.25));
        for i in 0..MIN_RATIOS - 1 {
            r.observe(1.0 + i as f64 / 100.0);
        }
        assert_eq!(r.bound_factor(), 1.25);
        r.observe(f64::NAN);
        r.observe(-1.0);
        assert_eq!(r.len(), MIN_RATIOS - 1);
        r.observe(1.15);
        // 1.00, 1.01, ..., 1.14, 1.15: median 1.075, 90th percentile 1.135.
        assert!((r.median_factor() - 1.075).abs() < 1e-12);
        assert!((r.bound_factor() - 1.135).abs() < 1e-12);
    }

    #[test]
    fn the_window_slides_and_the_factors_are_clamped() {
        let mut r = Ratios::new(0.99, 1.25);
        for _ in 0..WINDOW {
            r.observe(100.0);
        }
        assert_eq!(r.bound_factor(), 4.0);
        for _ in 0..WINDOW {
            r.observe(0.01);
        }
        assert_eq!(r.len(), WINDOW);
        assert_eq!(r.median_factor(), 0.5);
        assert_eq!(r.quantile(1.0), 0.01, "every 100 has left the window");
    }
}
