//! The step-time model admission predicts with: a worker role's forward step, fitted online to the
//! steps its workers measure and report in their heartbeats.
//!
//! With a base [`PerfModel`] (a profile file, or the roofline of the simulated model and GPU), a
//! step is the base's time times a scale: the median of measured/base over the recent samples, so
//! that a host slower or faster than profiled is followed at once. Without one, a step is linear in
//! five features (prompt tokens, their attention work `n^2 + 2nc`, decode batch, decode context, and
//! a constant), fitted by non-negative least squares on relative error ([`crate::nnls`]), the same
//! fit the profile's prefill line uses.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::nnls::{dot, fit_relative};
use crate::perf::{PerfModel, PrefillItem, StepShape};

/// Samples kept per model; older ones age out, so the fit follows the host (and forgets start-up).
pub const WINDOW: usize = 256;
/// Samples a linear fit needs before it predicts (a base model predicts from the start).
pub const MIN_SAMPLES: usize = 6;
/// New samples between two refits.
const REFIT_EVERY: usize = 16;
/// The latest samples the model's level is taken from: what the host does now (a worker slowed by
/// its neighbours, a GPU that throttles) moves predictions within a few steps, not a window.
pub const RECENT: usize = 16;
/// Least time between two least-squares refits of [`StepModel::observe_batch`], seconds: with many
/// workers reporting, the fit runs once in a while, not once per report (it costs milliseconds,
/// taken from the serving process). The recent level is updated with every report.
const MIN_REFIT_GAP_S: f64 = 2.0;
/// Seconds without a measured step after which the recent level gives way to the level of the
/// steps of the last [`LEVEL_HORIZON_S`]: a worker that went quiet after a burst is no longer as
/// slow as its last contended steps.
pub const LEVEL_TTL_S: f64 = 5.0;
/// How far back a settled level looks, seconds, when at least [`MIN_SAMPLES`] steps arrived in
/// that time (else the whole window). A window filled by a long overload would otherwise hold a
/// lightly loaded cluster at the overload's contended speed for hundreds of requests (a prompt is
/// about one step), so that every prediction of the quiet cluster read twice what it measured.
pub const LEVEL_HORIZON_S: f64 = 30.0;
/// Most prompt chunks a sample or a predicted step carries.
pub const MAX_CHUNKS: usize = 8;

/// One measured forward step.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepSample {
    /// Prompt chunks computed in the step (first `chunk_count` entries).
    pub chunks: [PrefillItem; MAX_CHUNKS],
    pub chunk_count: u8,
    /// Sequences that produced a token in the step.
    pub decode_batch: u32,
    /// Tokens those sequences attended to, summed.
    pub decode_context: u64,
    pub seconds: f64,
}

const NO_CHUNK: PrefillItem = PrefillItem {
    new_tokens: 0,
    cached_tokens: 0,
};

impl StepSample {
    /// A step over these chunks and decode batch. Chunks beyond [`MAX_CHUNKS`] are merged into the
    /// last one (their tokens add up; their attention is then slightly overstated).
    pub fn new(
        chunks: &[PrefillItem],
        decode_batch: u32,
        decode_context: u64,
        seconds: f64,
    ) -> Self {
        let mut s = StepSample {
            chunks: [NO_CHUNK; MAX_CHUNKS],
            chunk_count: 0,
            decode_batch,
            decode_context,
            seconds,
        };
        for c in chunks {
            if usize::from(s.chunk_count) < MAX_CHUNKS {
                s.chunks[usize::from(s.chunk_count)] = *c;
                s.chunk_count += 1;
            } else {
                let last = &mut s.chunks[MAX_CHUNKS - 1];
                last.new_tokens = last.new_tokens.saturating_add(c.new_tokens);
                last.cached_tokens = last.cached_tokens.max(c.cached_tokens);
            }
        }
        s
    }

    pub fn chunks(&self) -> &[PrefillItem] {
        &self.chunks[..usize::from(self.chunk_count)]
    }

    pub fn shape(&self) -> StepShape<'_> {
        StepShape {
            prefill: self.chunks(),
            decode_batch: self.decode_batch,
            decode_context: self.decode_context,
        }
    }
}

/// The five features of the linear form.
pub fn features(step: &StepShape<'_>) -> [f64; 5] {
    let mut tokens = 0.0;
    let mut attention = 0.0;
    for c in step.prefill {
        let (n, cached) = (f64::from(c.new_tokens), f64::from(c.cached_tokens));
        tokens += n;
        attention += n * n + 2.0 * n * cached;
    }
    [
        tokens,
        attention,
        f64::from(step.decode_batch),
        step.decode_context as f64,
        1.0,
    ]
}

/// What the model currently predicts with, for operators (metrics) and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Coefficients {
    /// Too few samples and no base model: no prediction yet.
    Unfitted,
    /// Base model times `scale` (the median of measured/base over the recent steps).
    Scaled { scale: f64 },
    /// Seconds per prompt token, per unit of attention work, per decoding sequence, per token of
    /// decode context, and per step (fitted over the window), times `level` (the median of
    /// measured/fitted over the recent steps).
    Linear { coef: [f64; 5], level: f64 },
}

/// A role's step-time model. A plain struct: the router's task owns one per (model, role).
#[derive(Debug, Clone)]
pub struct StepModel {
    base: Option<Arc<dyn PerfModel>>,
    samples: VecDeque<StepSample>,
    /// When each of `samples` arrived, on the caller's clock (the latest report's time for
    /// samples given without one).
    arrived: VecDeque<f64>,
    unfitted: usize,
    coefficients: Coefficients,
    /// |predicted/measured - 1| of each sample against the model in force when it arrived.
    errors: VecDeque<f64>,
    /// When [`StepModel::observe_batch`] last refitted, on its caller's clock.
    fitted_at: f64,
    /// When it last received a step, on the same clock, and whether the level has settled since.
    stepped_at: f64,
    settled: bool,
    /// The latest report's time, which samples are filed under.
    reported_at: f64,
}

impl StepModel {
    /// A model that starts from `base` (then predicts at once), or from nothing (then it predicts
    /// once [`MIN_SAMPLES`] steps have been measured).
    pub fn new(base: Option<Arc<dyn PerfModel>>) -> Self {
        let coefficients = if base.is_some() {
            Coefficients::Scaled { scale: 1.0 }
        } else {
            Coefficients::Unfitted
        };
        StepModel {
            base,
            samples: VecDeque::with_capacity(WINDOW),
            arrived: VecDeque::with_capacity(WINDOW),
            unfitted: 0,
            coefficients,
            errors: VecDeque::with_capacity(WINDOW),
            fitted_at: f64::NEG_INFINITY,
            stepped_at: f64::NEG_INFINITY,
            reported_at: f64::NEG_INFINITY,
            settled: false,
        }
    }

    pub fn base(&self) -> Option<&Arc<dyn PerfModel>> {
        self.base.as_ref()
    }

    pub fn coefficients(&self) -> Coefficients {
        self.coefficients
    }

    pub fn samples(&self) -> usize {
        self.samples.len()
    }

    /// Median and 90th percentile of the relative error of recent samples against the model that
    /// was in force when each arrived; `None` before any prediction could be checked.
    pub fn step_error(&self) -> Option<(f64, f64)> {
        let mut e: Vec<f64> = self.errors.iter().copied().collect();
        if e.is_empty() {
            return None;
        }
        e.sort_by(f64::total_cmp);
        let at = |p: f64| e[((e.len() - 1) as f64 * p).round() as usize];
        Some((at(0.5), at(0.9)))
    }

    /// Adds a measured step (samples with no work or no positive time are ignored) and refits
    /// every few samples.
    pub fn observe(&mut self, s: StepSample) {
        if self.push(s) && self.due() {
            self.refit();
        }
    }

    /// Adds the steps of one report and refits if enough arrived since the last fit and it was at
    /// least [`MIN_REFIT_GAP_S`] before `now_s` (seconds on the caller's clock).
    pub fn observe_batch(&mut self, steps: &[StepSample], now_s: f64) {
        let mut added = false;
        self.reported_at = now_s;
        for s in steps {
            added |= self.push(*s);
        }
        if !added {
            self.settle(now_s);
            return;
        }
        self.stepped_at = now_s;
        self.settled = false;
        if self.due() && now_s - self.fitted_at >= MIN_REFIT_GAP_S {
            self.fitted_at = now_s;
            self.refit();
        } else {
            // Follows the recent steps' level without fitting the form again.
            self.set_level(RECENT);
        }
    }

    /// Once no step has arrived for [`LEVEL_TTL_S`] before `now_s`, takes the level from the steps
    /// of the last [`LEVEL_HORIZON_S`] (the whole window where too few came in that time) instead
    /// of the latest steps.
    pub fn settle(&mut self, now_s: f64) {
        if !self.settled && now_s - self.stepped_at > LEVEL_TTL_S {
            self.settled = true;
            let horizon = self
                .arrived
                .iter()
                .rev()
                .take_while(|&&at| at >= now_s - LEVEL_HORIZON_S)
                .count();
            self.set_level(if horizon >= MIN_SAMPLES {
                horizon
            } else {
                WINDOW
            });
        }
    }

    /// The level as the median of measured/modelled over the latest `n` samples.
    fn set_level(&mut self, n: usize) {
        self.coefficients = match (self.coefficients, &self.base) {
            (Coefficients::Scaled { .. }, Some(base)) => Coefficients::Scaled {
                scale: self.level_of(n, |s| base.step_time(&s.shape())),
            },
            (Coefficients::Linear { coef, .. }, _) => Coefficients::Linear {
                coef,
                level: self.level_of(n, |s| dot(&coef, &features(&s.shape()))),
            },
            (c, _) => c,
        };
    }

    fn push(&mut self, s: StepSample) -> bool {
        let f = features(&s.shape());
        let has_work = f[0] > 0.0 || f[2] > 0.0;
        if !(has_work && s.seconds > 0.0 && s.seconds.is_finite()) {
            return false;
        }
        if let Some(p) = self.step_time(&s.shape()) {
            push_bounded(&mut self.errors, (p / s.seconds - 1.0).abs());
        }
        push_bounded(&mut self.samples, s);
        push_bounded(&mut self.arrived, self.reported_at);
        self.unfitted += 1;
        true
    }

    fn due(&self) -> bool {
        let young = self.samples.len() < 4 * MIN_SAMPLES;
        self.unfitted >= REFIT_EVERY || (young && self.samples.len() >= MIN_SAMPLES)
    }

    /// The median of measured over `predict` for the latest `n` samples (1 without any).
    fn level_of(&self, n: usize, predict: impl Fn(&StepSample) -> f64) -> f64 {
        let mut ratios: Vec<f64> = self
            .samples
            .iter()
            .rev()
            .take(n)
            .filter_map(|s| {
                let p = predict(s);
                (p > 0.0).then(|| s.seconds / p)
            })
            .filter(|r| r.is_finite())
            .collect();
        if ratios.is_empty() {
            return 1.0;
        }
        ratios.sort_by(f64::total_cmp);
        ratios[ratios.len() / 2]
    }

    /// Fits again to the samples held.
    pub fn refit(&mut self) {
        self.unfitted = 0;
        match &self.base {
            Some(_) => self.set_level(RECENT),
            None => {
                if self.samples.len() < MIN_SAMPLES {
                    return;
                }
                let rows: Vec<([f64; 5], f64)> = self
                    .samples
                    .iter()
                    .map(|s| (features(&s.shape()), s.seconds))
                    .collect();
                if let Some((coef, _)) = fit_relative(&rows) {
                    self.coefficients = Coefficients::Linear { coef, level: 1.0 };
                    self.set_level(RECENT);
                }
            }
        }
    }

    /// A step's duration by the model's form alone, without the level the latest steps set: a
    /// reference that holds still while they come in, to compare workers with each other.
    pub fn form_time(&self, step: &StepShape<'_>) -> Option<f64> {
        let t = match (&self.coefficients, &self.base) {
            (Coefficients::Scaled { .. }, Some(base)) => base.step_time(step),
            (Coefficients::Linear { coef, .. }, _) => dot(coef, &features(step)),
            _ => return None,
        };
        (t.is_finite() && t >= 0.0).then_some(t)
    }

    /// Predicted duration of one step, seconds; `None` while unfitted.
    pub fn step_time(&self, step: &StepShape<'_>) -> Option<f64> {
        let t = match (&self.coefficients, &self.base) {
            (Coefficients::Scaled { scale }, Some(base)) => base.step_time(step) * scale,
            (Coefficients::Linear { coef, level }, _) => dot(coef, &features(step)) * level,
            _ => return None,
        };
        (t.is_finite() && t >= 0.0).then_some(t)
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() >= WINDOW {
        q.pop_front();
    }
    q.push_back(v);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::LinearModel;

    /// A base whose steps cost 1 ms per prompt token and 2 ms per decoding sequence.
    const TOY: LinearModel = LinearModel {
        prefill_step: 0.0,
        per_prompt_token: 1e-3,
        decode_step: 0.0,
        per_sequence: 2e-3,
        per_context_token: 0.0,
        kv_blocks: 1,
    };

    fn prefill(n: u32, seconds: f64) -> StepSample {
        StepSample::new(&[PrefillItem::fresh(n)], 0, 0, seconds)
    }

    fn decode(batch: u32, context: u64, seconds: f64) -> StepSample {
        StepSample::new(&[], batch, context, seconds)
    }

    #[test]
    fn a_base_model_predicts_at_once_and_its_scale_follows_the_host() {
        let mut m = StepModel::new(Some(Arc::new(TOY)));
        assert_eq!(hundred_time(&m), 0.1);
        // The host runs 1.5x slower than the base says.
        for i in 0..MIN_SAMPLES {
            m.observe(prefill(50 + i as u32, 1.5e-3 * f64::from(50 + i as u32)));
        }
        let t = hundred_time(&m);
        assert!((t - 0.15).abs() < 1e-12, "{t}");
        // Then it runs 3x slower: the level follows the recent steps, not the whole window.
        for i in 0..RECENT {
            m.observe(prefill(50 + i as u32, 3e-3 * f64::from(50 + i as u32)));
        }
        let t = hundred_time(&m);
        assert!((t - 0.3).abs() < 1e-9, "{t}");
    }

    #[test]
    fn a_batch_refits_no_more_often_than_the_gap_allows() {
        let mut m = StepModel::new(None);
        let batch = |scale: f64| -> Vec<StepSample> {
            [32u32, 64, 128, 256, 384, 512, 100, 200]
                .iter()
                .map(|&n| prefill(n, scale * (1e-3 + 1e-4 * f64::from(n))))
                .collect()
        };
        m.observe_batch(&batch(1.0), 0.0);
        assert!((hundred_time(&m) - 0.011).abs() < 1e-9);
        // Twice as slow, reported 0.1 s later: within the gap no refit, but the level follows.
        m.observe_batch(&batch(2.0), 0.1);
        m.observe_batch(&batch(2.0), 0.15);
        let t = hundred_time(&m);
        assert!((t - 0.022).abs() < 1e-9, "{t}");
        let Coefficients::Linear { coef, .. } = m.coefficients() else {
            panic!("{:?}", m.coefficients());
        };
        assert!(
            (coef[0] - 1e-4).abs() < 1e-12,
            "the form is the first fit's: {coef:?}"
        );
        m.observe_batch(&batch(2.0), 2.5);
        let Coefficients::Linear { coef, .. } = m.coefficients() else {
            panic!("{:?}", m.coefficients());
        };
        // Refitted over the window (both speeds); the level keeps it on the recent one.
        assert!(coef[0] > 1.2e-4, "refitted: {coef:?}");
        let t = hundred_time(&m);
        assert!((t - 0.022).abs() < 1e-6, "{t}");
    }

    /// `n` steps of one 100-token prompt, at `scale` times the toy base's 0.1 s.
    fn hundreds(scale: f64, n: usize) -> Vec<StepSample> {
        (0..n).map(|_| prefill(100, scale * 0.1)).collect()
    }

    /// What `m` predicts for a step of one 100-token prompt.
    fn hundred_time(m: &StepModel) -> f64 {
        let one = [PrefillItem::fresh(100)];
        let shape = StepShape {
            prefill: &one,
            ..StepShape::default()
        };
        m.step_time(&shape).unwrap()
    }

    #[test]
    fn a_quiet_worker_s_level_settles_to_the_whole_window() {
        let mut m = StepModel::new(Some(Arc::new(TOY)));
        // A long run at the base's speed, then a burst at 3x (contended).
        m.observe_batch(&hundreds(1.0, WINDOW - RECENT), 0.0);
        m.observe_batch(&hundreds(3.0, RECENT), 10.0);
        assert!((hundred_time(&m) - 0.3).abs() < 1e-9);
        // Reports without steps: nothing changes until the level's time is up.
        m.observe_batch(&[], 10.0 + LEVEL_TTL_S);
        assert!((hundred_time(&m) - 0.3).abs() < 1e-9);
        m.observe_batch(&[], 10.1 + LEVEL_TTL_S);
        assert!((hundred_time(&m) - 0.1).abs() < 1e-9);
        // A new step brings the recent level back.
        m.observe_batch(&hundreds(3.0, 1), 20.0);
        assert!((hundred_time(&m) - 0.3).abs() < 1e-9);
    }

    #[test]
    fn after_a_long_overload_a_quiet_worker_settles_to_its_recent_steps() {
        let mut m = StepModel::new(Some(Arc::new(TOY)));
        // The whole window at 2x (an overload), then a quiet minute later eight steps at 1x, one
        // report every two seconds: their level, not the window's median, once settled.
        m.observe_batch(&hundreds(2.0, WINDOW), 0.0);
        for i in 0..MIN_SAMPLES + 2 {
            m.observe_batch(&hundreds(1.0, 1), 60.0 + 2.0 * i as f64);
        }
        let last = 60.0 + 2.0 * (MIN_SAMPLES + 1) as f64;
        m.observe_batch(&[], last + LEVEL_TTL_S + 0.1);
        assert!((hundred_time(&m) - 0.1).abs() < 1e-9);
        // Too few steps in the horizon: the whole window's level (2x here).
        let mut m = StepModel::new(Some(Arc::new(TOY)));
        m.observe_batch(&hundreds(2.0, WINDOW), 0.0);
        m.observe_batch(&hundreds(1.0, MIN_SAMPLES - 1), 60.0);
        m.observe_batch(&[], 60.0 + LEVEL_TTL_S + 0.1);
        assert!((hundred_time(&m) - 0.2).abs() < 1e-9);
    }

    #[test]
    fn without_a_base_the_linear_form_is_learned() {
        let mut m = StepModel::new(None);
        let truth = |s: &StepSample| {
            let f = features(&s.shape());
            2e-4 * f[0] + 1e-7 * f[1] + 3e-4 * f[2] + 1e-6 * f[3] + 4e-3
        };
        assert_eq!(m.coefficients(), Coefficients::Unfitted);
        let mut shapes = Vec::new();
        for n in [16, 64, 128, 256, 512] {
            shapes.push(prefill(n, 0.0));
        }
        for (b, c) in [(1, 100), (4, 900), (8, 3000), (16, 5000), (2, 5000)] {
            shapes.push(decode(b, c, 0.0));
        }
        assert_eq!(m.step_time(&shapes[0].shape()), None);
        for mut s in shapes.iter().copied() {
            s.seconds = truth(&s);
            m.observe(s);
        }
        for s in &shapes {
            let t = m.step_time(&s.shape()).unwrap();
            assert!((t / truth(s) - 1.0).abs() < 1e-6, "{t} vs {}", truth(s));
        }
        // A second pass is predicted exactly: more than half of all checked samples.
        for mut s in shapes.iter().copied() {
            s.seconds = truth(&s);
            m.observe(s);
        }
        let (p50, _) = m.step_error().unwrap();
        assert!(p50 < 1e-6, "{p50}");
    }

    #[test]
    fn empty_and_nonsense_samples_are_ignored_and_the_window_is_bounded() {
        let mut m = StepModel::new(None);
        m.observe(prefill(0, 0.1));
        m.observe(decode(1, 10, 0.0));
        m.observe(decode(1, 10, f64::NAN));
        assert_eq!(m.samples(), 0);
        for i in 0..(WINDOW + 40) {
            m.observe(decode(1 + (i % 7) as u32, 100, 1e-3));
        }
        assert_eq!(m.samples(), WINDOW);
    }

    #[test]
    fn chunks_past_the_limit_fold_into_the_last() {
        let many: Vec<PrefillItem> = (0..12).map(|_| PrefillItem::fresh(10)).collect();
        let s = StepSample::new(&many, 0, 0, 1.0);
        assert_eq!(s.chunks().len(), MAX_CHUNKS);
        let tokens: u32 = s.chunks().iter().map(|c| c.new_tokens).sum();
        assert_eq!(tokens, 120);
    }
}
