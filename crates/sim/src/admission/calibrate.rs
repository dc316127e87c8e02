//! Calibration of predictions by what recent admitted requests measured, so that a prediction can
//! be read as a median (what the client is told) and as a bound (what admission tests against the
//! budget): "predicted within budget" should hold for nearly every admitted request, not half.
//!
//! The median is a line through the window's (predicted, measured) pairs, fitted robustly; the
//! bound adds to it the window's high quantile of what requests measured beyond the line, in
//! seconds. What a model leaves out under load (a worker waiting for a core its neighbours use, a
//! step the heartbeats had not shown yet) is a delay more than a proportion: a ratio would either
//! refuse the long prompts that fit or let the short ones it was measured on miss. A model off by a
//! proportion gives the line that slope instead.
//!
//! The window is kept per load regime (requests in flight per serving unit, a prefill and a decode
//! worker or an aggregated one, when the request is decided): what the model leaves out grows with
//! load, so one window would let a burst's delays refuse the idle cluster's requests long after the
//! burst, and the idle ones would hide a burst's.

use std::collections::VecDeque;

/// Ratios kept; the oldest go first. Short, so that the factors follow a change of regime (a burst
/// ending, the host's neighbours going quiet) within a hundred requests.
const WINDOW: usize = 96;
/// Ratios needed before the window's quantiles replace the defaults.
pub const MIN_RATIOS: usize = 16;

/// Load regimes: idle, then requests in flight per serving unit below 1/2, 1/2 to 1, 1 to 2, 2 to
/// 4, 4 to 8, and more (their bounds double, as queueing error grows with load).
pub const REGIMES: usize = 7;

/// The regime of a cluster with `per_unit` requests in flight per serving unit.
pub fn regime(per_unit: f64) -> u8 {
    if per_unit.is_nan() || per_unit <= 0.0 {
        return 0;
    }
    let r = 1.0 + (per_unit * 4.0).log2().floor().max(0.0);
    (r as usize).min(REGIMES - 1) as u8
}

/// Calibration windows per load regime, with a pooled window for regimes that have too few of
/// their own.
#[derive(Debug, Clone)]
pub struct RegimeRatios {
    pooled: Ratios,
    by: Vec<Ratios>,
    /// Whether a regime busier than any measured doubles the tail per regime beyond (TTFT: its
    /// queue and contention grow with load the model does not see), or takes the busiest
    /// measured one's as it is (ITL: the decode step is predicted for the batch it will have).
    extrapolate: bool,
}

impl RegimeRatios {
    pub fn new(quantile: f64, default_bound: f64, extrapolate: bool) -> Self {
        let r = Ratios::new(quantile, default_bound);
        RegimeRatios {
            pooled: r.clone(),
            by: vec![r; REGIMES],
            extrapolate,
        }
    }

    pub fn observe(&mut self, regime: u8, predicted: f64, measured: f64) {
        self.pooled.observe(predicted, measured);
        if let Some(r) = self.by.get_mut(usize::from(regime)) {
            r.observe(predicted, measured);
        }
    }

    fn mature(&self, g: usize) -> Option<&Ratios> {
        self.by.get(g).filter(|r| r.len() >= MIN_RATIOS)
    }

    /// The window a regime's median comes from: its own once it holds [`MIN_RATIOS`], else the
    /// nearest busier regime's that does (busier is the safe side), else the nearest quieter
    /// one's, else the pooled one.
    pub fn window(&self, regime: u8) -> &Ratios {
        let g = usize::from(regime).min(REGIMES - 1);
        (g..REGIMES)
            .find_map(|j| self.mature(j))
            .or_else(|| (0..g).rev().find_map(|j| self.mature(j)))
            .unwrap_or(&self.pooled)
    }

    /// The median of a raw prediction in `regime`.
    pub fn median(&self, regime: u8, raw: f64) -> f64 {
        self.window(regime).median(raw)
    }

    /// The bound of a raw prediction in `regime`: its window's, and never below a quieter
    /// regime's (more load does not make a request faster; a regime measured on few requests must
    /// not promise more than the quieter ones measured on many). A regime busier than any measured
    /// takes the busiest measured one's tail doubled for each regime beyond it, as each doubles the
    /// load: delays from shared resources grow with it, and admitting the first requests of a
    /// burst on a quiet regime's figures would let the burst miss.
    pub fn bound(&self, regime: u8, raw: f64) -> f64 {
        let g = usize::from(regime).min(REGIMES - 1);
        let own = match (self.mature(g), (g..REGIMES).find_map(|j| self.mature(j))) {
            (Some(r), _) | (None, Some(r)) => r.bound(raw),
            (None, None) => match (0..g).rev().find(|&j| self.mature(j).is_some()) {
                Some(j) => {
                    let r = &self.by[j];
                    let beyond = i32::try_from(g - j).unwrap_or(i32::MAX);
                    let factor = if self.extrapolate {
                        2f64.powi(beyond)
                    } else {
                        1.0
                    };
                    r.median(raw) + r.tail() * factor
                }
                None => self.pooled.bound(raw),
            },
        };
        (0..g)
            .filter_map(|j| self.mature(j))
            .map(|r| r.bound(raw))
            .fold(own, f64::max)
    }

    pub fn pooled(&self) -> &Ratios {
        &self.pooled
    }

    /// Ratios held per regime.
    pub fn counts(&self) -> [usize; REGIMES] {
        let mut n = [0; REGIMES];
        for (i, r) in self.by.iter().enumerate() {
            n[i] = r.len();
        }
        n
    }
}

/// A window of (predicted, measured) pairs and the calibration they give.
#[derive(Debug, Clone)]
pub struct Ratios {
    window: VecDeque<(f64, f64)>,
    /// The quantile the bound is taken at (0.99: "within budget" for 99 of 100 admitted).
    quantile: f64,
    /// The bound's factor until the window holds [`MIN_RATIOS`].
    default_bound: f64,
    /// The median line, measured = offset + slope x predicted (slope clamped to [`SLOPE_RANGE`]).
    slope: f64,
    offset: f64,
    /// Seconds beyond the median line at the quantile, at least 0.
    tail: f64,
    /// Pairs added since the last calibration.
    stale: usize,
}

/// Clamp of the slope: a burst of outliers cannot make admission refuse everything, nor a run of
/// lucky requests make it promise the impossible.
const SLOPE_RANGE: (f64, f64) = (0.5, 4.0);
/// Pairs between two calibrations once the window is grown (each costs a sort of its pairwise
/// slopes).
const CALIBRATE_EVERY: usize = 4;

impl Ratios {
    pub fn new(quantile: f64, default_bound: f64) -> Self {
        Ratios {
            window: VecDeque::with_capacity(WINDOW),
            quantile: quantile.clamp(0.5, 1.0),
            default_bound: default_bound.max(1.0),
            slope: 1.0,
            offset: 0.0,
            tail: 0.0,
            stale: 0,
        }
    }

    /// Records one request's predicted and measured seconds (ignored unless both are finite and
    /// positive).
    pub fn observe(&mut self, predicted: f64, measured: f64) {
        let ok = |x: f64| x.is_finite() && x > 0.0;
        if !(ok(predicted) && ok(measured)) {
            return;
        }
        if self.window.len() >= WINDOW {
            self.window.pop_front();
        }
        self.window.push_back((predicted, measured));
        self.stale += 1;
        let n = self.window.len();
        if n >= MIN_RATIOS && (n < 2 * MIN_RATIOS || self.stale >= CALIBRATE_EVERY) {
            self.calibrate();
        }
    }

    /// Fits the median line (Theil-Sen: the median of pairwise slopes, then the median offset),
    /// robust to the outliers a burst brings, and takes the tail from what is left.
    fn calibrate(&mut self) {
        self.stale = 0;
        let w = &self.window;
        let mut v = Vec::with_capacity(w.len() * w.len() / 2);
        for (i, (p1, m1)) in w.iter().enumerate() {
            for (p2, m2) in w.iter().skip(i + 1) {
                // Pairs whose predictions differ by under 1% say nothing of the slope.
                if (p2 - p1).abs() > 0.01 * p1.max(*p2) {
                    v.push((m2 - m1) / (p2 - p1));
                }
            }
        }
        self.slope = if v.len() >= w.len() {
            v.sort_by(f64::total_cmp);
            at(&v, 0.5)
        } else {
            // Predictions too alike for a line: the median ratio through the origin.
            v.clear();
            v.extend(w.iter().map(|(p, m)| m / p));
            v.sort_by(f64::total_cmp);
            at(&v, 0.5)
        }
        .clamp(SLOPE_RANGE.0, SLOPE_RANGE.1);
        v.clear();
        v.extend(w.iter().map(|(p, m)| m - self.slope * p));
        v.sort_by(f64::total_cmp);
        self.offset = at(&v, 0.5);
        v.clear();
        v.extend(w.iter().map(|&(p, m)| m - self.line(p)));
        v.sort_by(f64::total_cmp);
        self.tail = at(&v, self.quantile).max(0.0);
    }

    /// The median line at `raw`, never below half of it.
    fn line(&self, raw: f64) -> f64 {
        (self.offset + self.slope * raw).max(SLOPE_RANGE.0 * raw)
    }

    pub fn len(&self) -> usize {
        self.window.len()
    }

    pub fn is_empty(&self) -> bool {
        self.window.is_empty()
    }

    fn young(&self) -> bool {
        self.len() < MIN_RATIOS
    }

    /// The median line's slope and offset (seconds): 1 and 0 while young.
    pub fn line_coefficients(&self) -> (f64, f64) {
        if self.young() {
            (1.0, 0.0)
        } else {
            (self.slope, self.offset)
        }
    }

    /// Seconds the bound adds to the median (0 while young).
    pub fn tail(&self) -> f64 {
        if self.young() { 0.0 } else { self.tail }
    }

    /// The median of a raw prediction, seconds.
    pub fn median(&self, raw: f64) -> f64 {
        if self.young() { raw } else { self.line(raw) }
    }

    /// The bound of a raw prediction: the median plus the tail, or the default margin while the
    /// window is young.
    pub fn bound(&self, raw: f64) -> f64 {
        if self.young() {
            raw * self.default_bound
        } else {
            self.line(raw) + self.tail
        }
    }
}

/// The value at quantile `p` of sorted, non-empty `v`, interpolated.
fn at(v: &[f64], p: f64) -> f64 {
    let h = (v.len() - 1) as f64 * p.clamp(0.0, 1.0);
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    v[lo] + (h - lo as f64) * (v[hi] - v[lo])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn defaults_until_enough_requests_then_the_median_and_the_tail_in_seconds() {
        let mut r = Ratios::new(0.9, 1.25);
        assert_eq!((r.median(1.0), r.bound(1.0)), (1.0, 1.25));
        // Predicted 1 s each; measured 1.00, 1.01, ..., 1.14.
        for i in 0..MIN_RATIOS - 1 {
            r.observe(1.0, 1.0 + i as f64 / 100.0);
        }
        assert_eq!(r.bound(2.0), 2.5);
        r.observe(f64::NAN, 1.0);
        r.observe(1.0, -1.0);
        r.observe(0.0, 1.0);
        assert_eq!(r.len(), MIN_RATIOS - 1);
        r.observe(1.0, 1.15);
        // Ratios 1.00 ... 1.15: median 1.075; beyond it, -0.075 ... +0.075 s, 90th percentile
        // 0.06 s.
        // (All predicted alike: the line is the median ratio through the origin.)
        let (slope, offset) = r.line_coefficients();
        assert!(
            close(slope, 1.075) && close(offset, 0.0),
            "{slope} {offset}"
        );
        assert!(close(r.tail(), 0.06), "{}", r.tail());
        assert!(close(r.bound(2.0), 2.0 * 1.075 + 0.06));
    }

    #[test]
    fn a_delay_under_load_bounds_long_and_short_prompts_alike() {
        // Every request measured its prediction plus 0.5 s (a contended host), for predictions
        // of 0.2 s to 1 s: the bound of a 0.2 s prediction covers 0.7 s, and of a 1 s one 1.5 s
        // (a ratio's 99th percentile, 3.5, would have bounded it at 3.5 s).
        let mut r = Ratios::new(0.99, 1.25);
        for i in 0..32 {
            let p = 0.2 + 0.8 * f64::from(i % 5) / 4.0;
            r.observe(p, p + 0.5);
        }
        for p in [0.2, 0.6, 1.0, 1.5] {
            assert!(
                close(r.median(p), p + 0.5) && close(r.bound(p), p + 0.5),
                "{p}"
            );
        }
    }

    #[test]
    fn regimes_double_from_a_quarter_request_per_unit() {
        let cases = [
            (0.0, 0),
            (f64::NAN, 0),
            (0.1, 1),
            (0.25, 1),
            (0.49, 1),
            (0.5, 2),
            (0.99, 2),
            (1.0, 3),
            (2.0, 4),
            (4.0, 5),
            (8.0, 6),
            (1e9, 6),
        ];
        for (per_unit, want) in cases {
            assert_eq!(regime(per_unit), want, "{per_unit}");
        }
    }

    #[test]
    fn a_regime_uses_its_own_window_once_it_has_enough_and_the_pooled_one_before() {
        let mut r = RegimeRatios::new(0.99, 1.25, true);
        for _ in 0..MIN_RATIOS {
            r.observe(3, 1.0, 3.0);
        }
        // Idle has none of its own: the nearest busier regime speaks for it, and for regime 5,
        // the nearest quieter one (no tail to double here).
        assert!(close(r.bound(0, 1.0), 3.0) && close(r.bound(5, 1.0), 3.0));
        for _ in 0..MIN_RATIOS {
            r.observe(0, 1.0, 1.1);
        }
        assert!(close(r.bound(0, 1.0), 1.1) && close(r.median(0, 1.0), 1.1));
        assert!(
            close(r.bound(1, 1.0), 3.0),
            "regime 1 is closer to 3 in the safe direction"
        );
        assert!(close(r.bound(3, 1.0), 3.0));
        assert_eq!(r.counts()[..4], [MIN_RATIOS, 0, 0, MIN_RATIOS]);
        assert_eq!(r.pooled().len(), 2 * MIN_RATIOS);
        // An out-of-range regime only feeds the pooled window.
        r.observe(200, 1.0, 1.0);
        assert_eq!(r.pooled().len(), 2 * MIN_RATIOS + 1);
    }

    #[test]
    fn a_busier_regime_never_bounds_below_a_quieter_one() {
        let mut r = RegimeRatios::new(0.99, 1.25, true);
        for _ in 0..MIN_RATIOS {
            r.observe(1, 1.0, 2.0);
            r.observe(2, 1.0, 1.2);
        }
        assert!(close(r.median(2, 1.0), 1.2), "its own median");
        assert!(close(r.bound(2, 1.0), 2.0), "regime 1's bound");
        assert!(close(r.bound(0, 1.0), 2.0));
    }

    #[test]
    fn a_regime_busier_than_any_measured_doubles_the_tail_per_regime() {
        let mut r = RegimeRatios::new(0.99, 1.25, true);
        // Regime 1: predicted 1 s, measured 1 s to 1.15 s (median 1.075, tail 0.075 s).
        for i in 0..MIN_RATIOS {
            r.observe(1, 1.0, 1.0 + 0.01 * i as f64);
        }
        let (m, t) = (r.median(1, 1.0), r.bound(1, 1.0) - r.median(1, 1.0));
        assert!(close(r.bound(2, 1.0), m + 2.0 * t));
        assert!(close(r.bound(4, 1.0), m + 8.0 * t));
        // Quieter regimes take the nearest busier one's.
        assert!(close(r.bound(0, 1.0), m + t));
        // Without extrapolation (ITL), the busiest measured regime's bound as it is.
        let mut i = RegimeRatios::new(0.99, 1.25, false);
        for k in 0..MIN_RATIOS {
            i.observe(1, 1.0, 1.0 + 0.01 * k as f64);
        }
        assert!(close(i.bound(4, 1.0), m + t));
    }

    #[test]
    fn the_window_slides_and_the_slope_is_clamped() {
        let mut r = Ratios::new(0.99, 1.25);
        for _ in 0..WINDOW {
            r.observe(1.0, 100.0);
        }
        assert_eq!(r.line_coefficients(), (4.0, 96.0));
        // (A grown window calibrates every few requests.)
        for _ in 0..WINDOW + CALIBRATE_EVERY {
            r.observe(1.0, 0.01);
        }
        assert_eq!(r.len(), WINDOW);
        assert_eq!(r.tail(), 0.0, "every 100 has left the window");
        // Never below half the raw prediction.
        assert!(close(r.median(1.0), 0.5) && close(r.bound(2.0), 1.0));
    }

    #[test]
    fn a_proportional_error_gives_the_line_its_slope() {
        let mut r = Ratios::new(0.99, 1.25);
        for i in 0..40 {
            let p = 0.1 * f64::from(1 + i % 10);
            r.observe(p, 1.3 * p);
        }
        let (slope, offset) = r.line_coefficients();
        assert!(close(slope, 1.3) && close(offset, 0.0), "{slope} {offset}");
        assert!(close(r.bound(2.0), 2.6));
    }
}
