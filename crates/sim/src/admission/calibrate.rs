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
//! The window is kept per load regime (admitted requests waiting for their first token per worker
//! that computes prompts, when the request is decided): what the model leaves out grows with the
//! queue, so one window would let a burst's delays refuse the idle cluster's requests long after
//! the burst, and the idle ones would hide a burst's.

use std::collections::VecDeque;

/// Ratios kept; the oldest go first. Short, so that the factors follow a change of regime (a burst
/// ending, the host's neighbours going quiet) within a hundred requests.
const WINDOW: usize = 96;
/// Ratios needed before the window's quantiles replace the defaults.
pub const MIN_RATIOS: usize = 16;

/// Load regimes: idle, then requests waiting per prefill worker below 1/2, 1/2 to 1, 1 to 2, 2 to
/// 4, 4 to 8, and more (their bounds double, as queueing error grows with load).
pub const REGIMES: usize = 7;

/// The regime of a cluster with `per_unit` requests waiting for a first token per prefill worker.
pub fn regime(per_unit: f64) -> u8 {
    if per_unit.is_nan() || per_unit <= 0.0 {
        return 0;
    }
    let r = 1.0 + (per_unit * 4.0).log2().floor().max(0.0);
    (r as usize).min(REGIMES - 1) as u8
}

/// Calibration windows per load regime. A regime with too few pairs of its own borrows from a
/// quieter one (its tail doubled per regime beyond, for TTFT), else takes the default margin: never
/// a busier regime's, which would let a burst's delays refuse the idle cluster's requests.
#[derive(Debug, Clone)]
pub struct RegimeRatios {
    by: Vec<Ratios>,
    /// Whether a regime busier than any measured doubles the tail per regime beyond (TTFT: its
    /// queue and contention grow with load the model does not see), or takes the busiest
    /// measured one's as it is (ITL: the decode step is predicted for the batch it will have).
    extrapolate: bool,
}

impl RegimeRatios {
    pub fn new(quantile: f64, default_bound: f64, extrapolate: bool) -> Self {
        RegimeRatios {
            by: vec![Ratios::new(quantile, default_bound); REGIMES],
            extrapolate,
        }
    }

    /// Until a regime has its own measurements, its prediction is taken as exact (no margin).
    pub fn assume_exact(&mut self) {
        for r in &mut self.by {
            r.default_bound = 1.0;
        }
    }

    /// Records a pair measured in `regime` (an out-of-range regime is ignored).
    pub fn observe(&mut self, regime: u8, predicted: f64, measured: f64) {
        if let Some(r) = self.by.get_mut(usize::from(regime)) {
            r.observe(predicted, measured);
        }
    }

    fn mature(&self, g: usize) -> Option<&Ratios> {
        self.by.get(g).filter(|r| r.len() >= MIN_RATIOS)
    }

    /// The nearest quieter mature regime, if any.
    fn quieter(&self, g: usize) -> Option<(usize, &Ratios)> {
        (0..g).rev().find_map(|j| self.mature(j).map(|r| (j, r)))
    }

    /// The window a regime's median comes from: its own once it holds [`MIN_RATIOS`], else the
    /// nearest quieter regime's that does, else its own (young: the raw prediction).
    pub fn window(&self, regime: u8) -> &Ratios {
        let g = usize::from(regime).min(REGIMES - 1);
        self.mature(g)
            .or_else(|| self.quieter(g).map(|(_, r)| r))
            .unwrap_or(&self.by[g])
    }

    /// The median of a raw prediction in `regime`.
    pub fn median(&self, regime: u8, raw: f64) -> f64 {
        self.window(regime).median(raw)
    }

    /// The bound of a raw prediction in `regime`: its window's, and never below a quieter
    /// regime's (more load does not make a request faster; a regime measured on few requests must
    /// not promise more than the quieter ones measured on many). A regime with too few pairs takes
    /// the default margin on its raw prediction (which counts the queue ahead), or the nearest
    /// quieter mature regime's median with its tail doubled per regime beyond (as each doubles the
    /// load, delays from shared resources grow with it) where that is lower.
    pub fn bound(&self, regime: u8, raw: f64) -> f64 {
        let g = usize::from(regime).min(REGIMES - 1);
        let doubled = |beyond: usize| {
            if self.extrapolate {
                2f64.powi(i32::try_from(beyond).unwrap_or(i32::MAX))
            } else {
                1.0
            }
        };
        let margin = self.by[g].bound(raw);
        let own = match (self.mature(g), self.quieter(g)) {
            (Some(r), _) => r.bound(raw),
            // Whichever admits more, so that a young regime is measured and comes of age: a
            // quiet regime's tail, doubled twice or more, would refuse every request of a busy
            // regime that has none of its own, which then never would.
            (None, Some((j, r))) => margin.min(r.median(raw) + r.tail() * doubled(g - j)),
            (None, None) => margin,
        };
        (0..g)
            .filter_map(|j| self.mature(j))
            .map(|r| r.bound(raw))
            .fold(own, f64::max)
    }

    /// Pairs held per regime.
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
    fn a_regime_borrows_from_a_quieter_one_never_from_a_busier_one() {
        let mut r = RegimeRatios::new(0.99, 1.25, true);
        for _ in 0..MIN_RATIOS {
            r.observe(3, 1.0, 3.0);
        }
        // Idle, regimes 1 and 2 have none of their own and nothing quieter: the default margin,
        // not regime 3's 3x (a burst's delays must not refuse the idle cluster). Regime 5 borrows
        // regime 3's (no tail to double here).
        assert!(close(r.bound(0, 1.0), 1.25) && close(r.median(0, 1.0), 1.0));
        assert!(close(r.bound(1, 1.0), 1.25) && close(r.bound(2, 1.0), 1.25));
        assert!(close(r.bound(5, 1.0), 3.0) && close(r.median(5, 1.0), 3.0));
        for _ in 0..MIN_RATIOS {
            r.observe(0, 1.0, 1.1);
        }
        assert!(close(r.bound(0, 1.0), 1.1) && close(r.median(0, 1.0), 1.1));
        assert!(close(r.bound(1, 1.0), 1.1), "regime 0's, no tail to double");
        assert!(close(r.bound(3, 1.0), 3.0));
        assert_eq!(r.counts()[..4], [MIN_RATIOS, 0, 0, MIN_RATIOS]);
        // An out-of-range regime is ignored.
        r.observe(200, 1.0, 1.0);
        assert_eq!(r.counts().iter().sum::<usize>(), 2 * MIN_RATIOS);
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
        assert!(close(r.bound(0, 1.0), 1.25), "idle: the default margin");
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
        // Eight times the tail (1.675 s) is past the default margin (1.25 s), which bounds it;
        // for a 10 s prediction the doubled tail is the lower.
        assert!(close(r.bound(4, 1.0), 1.25));
        assert!(close(r.bound(4, 10.0), r.median(1, 10.0) + 8.0 * t));
        // Without extrapolation (ITL), the busiest measured regime's bound as it is, and the
        // default margin where nothing quieter was measured.
        let mut i = RegimeRatios::new(0.99, 1.25, false);
        for k in 0..MIN_RATIOS {
            i.observe(1, 1.0, 1.0 + 0.01 * k as f64);
        }
        assert!(close(i.bound(4, 1.0), m + t));
        assert!(close(
            RegimeRatios::new(0.99, 1.25, false).bound(4, 1.0),
            1.25
        ));
    }

    #[test]
    fn a_young_regime_is_not_refused_by_a_quiet_regime_s_tail_doubled_beyond_the_margin() {
        // Idle requests measured as predicted (0.2 s), but two waited 0.6 s more (a burst
        // arrived behind them): the idle tail is 0.6 s, and doubled twice for regime 2 it would
        // bound a 0.2 s prediction at 2.6 s and refuse every request of regime 2, which then
        // would never be measured. The default margin (1.25x) bounds it instead, but never below
        // the idle regime's own bound.
        let mut r = RegimeRatios::new(0.99, 1.25, true);
        for i in 0..MIN_RATIOS {
            r.observe(0, 0.2, if i < 2 { 0.8 } else { 0.2 });
        }
        assert!(close(r.median(0, 0.2), 0.2) && close(r.bound(0, 0.2), 0.8));
        assert!(close(r.bound(2, 0.2), 0.8), "{}", r.bound(2, 0.2));
        assert!(close(r.bound(2, 1.0), 1.6), "{}", r.bound(2, 1.0));
        assert!(close(r.bound(3, 3.0), 3.75), "{}", r.bound(3, 3.0));
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
