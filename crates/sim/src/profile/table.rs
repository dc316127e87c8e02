//! The decode step of the `profiled` model as a table over batch sizes: `base(batch) + e *
//! context`, with `base` measured at each profiled batch size and interpolated between them.
//!
//! Why not the line `d * batch + e * context + f`: a CPU engine's step is not linear in the batch.
//! Its kernels take the batch's rows in groups (the native engine's 16-bit decode kernel computes
//! eight rows in one pass over the weights, and the rows left over one at a time), so a batch of 8
//! can cost less than a batch of 7 and the cost climbs again from 9. A line through 1, 2, 4, 8 and
//! 16 then errs by a quarter at the batches between, which are the ones a lightly loaded decode
//! worker runs. The table keeps the shape the engine has; profile every batch size that matters.
//!
//! Fit: one base per profiled batch size and one cost per token of context shared by all, by
//! least squares on relative error. The context cost comes from batches profiled at several
//! contexts; when no batch was, it is the decode line's. Between profiled batch sizes the base is
//! interpolated linearly; below the smallest it is the smallest's (a small batch's step is mostly
//! the weights' one pass); above the largest it grows in proportion to the batch, at the largest's
//! cost per sequence.

use serde::Serialize;

use super::DecodeSample;
use crate::error::SimError;

/// Decode step time: `base(batch) + per_token * context_tokens`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecodeTable {
    /// Profiled batch sizes, ascending, with the base step time (seconds) fitted at each.
    pub points: Vec<(u32, f64)>,
    /// Seconds per token of context attended to.
    pub per_token: f64,
    pub samples: usize,
    /// Mean of |predicted / measured - 1| over the samples.
    pub mean_rel_err: f64,
    pub max_rel_err: f64,
}

impl DecodeTable {
    /// Fits `samples`; `fallback_per_token` is the context cost used when no batch size was
    /// profiled at two contexts (the decode line's `e`).
    pub fn fit(samples: &[DecodeSample], fallback_per_token: f64) -> Result<Self, SimError> {
        if samples.is_empty() {
            return Err(SimError::Profile("decode: no samples".into()));
        }
        if samples
            .iter()
            .any(|s| s.batch == 0 || !(s.seconds > 0.0 && s.seconds.is_finite()))
        {
            return Err(SimError::Profile(
                "decode: every sample needs a batch of at least 1 and a positive time".into(),
            ));
        }
        let mut batches: Vec<u32> = samples.iter().map(|s| s.batch).collect();
        batches.sort_unstable();
        batches.dedup();
        // Weighted means of time and context per batch size (weights 1/y^2: relative error).
        let groups: Vec<(u32, f64, f64)> = batches
            .iter()
            .map(|&b| {
                let (mut w, mut y, mut x) = (0.0, 0.0, 0.0);
                for s in samples.iter().filter(|s| s.batch == b) {
                    let wi = s.seconds.powi(-2);
                    w += wi;
                    y += wi * s.seconds;
                    x += wi * s.context_tokens as f64;
                }
                (b, y / w, x / w)
            })
            .collect();
        let (mut num, mut den) = (0.0, 0.0);
        for s in samples {
            let Some(&(_, yb, xb)) = groups.iter().find(|g| g.0 == s.batch) else {
                continue;
            };
            let wi = s.seconds.powi(-2);
            let dx = s.context_tokens as f64 - xb;
            num += wi * (s.seconds - yb) * dx;
            den += wi * dx * dx;
        }
        let spread = batches.iter().any(|&b| {
            let mut ctx = samples
                .iter()
                .filter(|s| s.batch == b)
                .map(|s| s.context_tokens);
            let first = ctx.next();
            ctx.any(|c| Some(c) != first)
        });
        let per_token = if spread && den > 0.0 && (num / den).is_finite() {
            (num / den).max(0.0)
        } else {
            fallback_per_token.max(0.0)
        };
        let points = groups
            .iter()
            .map(|&(b, yb, xb)| (b, (yb - per_token * xb).max(0.0)))
            .collect();
        let mut t = DecodeTable {
            points,
            per_token,
            samples: samples.len(),
            mean_rel_err: 0.0,
            max_rel_err: 0.0,
        };
        let errs: Vec<f64> = samples
            .iter()
            .map(|s| (t.step_time(s.batch, s.context_tokens) / s.seconds - 1.0).abs())
            .collect();
        t.mean_rel_err = errs.iter().sum::<f64>() / errs.len() as f64;
        t.max_rel_err = errs.iter().copied().fold(0.0, f64::max);
        Ok(t)
    }

    /// The base step time of `batch` sequences (no context).
    pub fn base(&self, batch: u32) -> f64 {
        let (Some(&(b0, y0)), Some(&(bn, yn))) = (self.points.first(), self.points.last()) else {
            return 0.0;
        };
        if batch <= b0 {
            return y0;
        }
        if batch >= bn {
            return yn * f64::from(batch) / f64::from(bn);
        }
        let i = self.points.partition_point(|p| p.0 <= batch);
        let ((lo, ylo), (hi, yhi)) = (self.points[i - 1], self.points[i]);
        ylo + (yhi - ylo) * f64::from(batch - lo) / f64::from(hi - lo)
    }

    /// One decode step of `batch` sequences attending to `context_tokens` tokens in all.
    pub fn step_time(&self, batch: u32, context_tokens: u64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        self.base(batch) + self.per_token * context_tokens as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(batch: u32, context_tokens: u64, seconds: f64) -> DecodeSample {
        DecodeSample {
            batch,
            context_tokens,
            seconds,
            times: Vec::new(),
        }
    }

    /// Rows in groups of eight: a group costs 24 ms, a row left over 7 ms, a context token 8 µs.
    fn grouped(batch: u32, ctx: u64) -> f64 {
        8e-3 + 24e-3 * f64::from(batch / 8) + 7e-3 * f64::from(batch % 8) + 8e-6 * ctx as f64
    }

    #[test]
    fn a_grouped_engine_is_recovered_where_a_line_is_not() {
        let mut samples = Vec::new();
        for b in 1..=16u32 {
            for per_seq in [100u64, 300] {
                let ctx = u64::from(b) * per_seq;
                samples.push(sample(b, ctx, grouped(b, ctx)));
            }
        }
        let t = DecodeTable::fit(&samples, 0.0).unwrap();
        assert!((t.per_token / 8e-6 - 1.0).abs() < 1e-9, "{}", t.per_token);
        assert!(t.max_rel_err < 1e-9, "{t:?}");
        // The line through the same samples misses by far more.
        let rows: Vec<_> = samples
            .iter()
            .map(|s| (super::super::fit::features_decode(s), s.seconds))
            .collect();
        let line = super::super::fit::fit(&rows, "decode").unwrap();
        assert!(line.max_rel_err > 0.15, "{line:?}");
        assert!(t.step_time(8, 800) < t.step_time(7, 700));
    }

    #[test]
    fn between_below_and_above_the_profiled_batches() {
        // Bases 10 ms at 2, 30 ms at 6; no context cost.
        let t = DecodeTable::fit(
            &[
                sample(2, 100, 10e-3),
                sample(2, 200, 10e-3),
                sample(6, 300, 30e-3),
                sample(6, 600, 30e-3),
            ],
            1.0,
        )
        .unwrap();
        assert_eq!(t.per_token, 0.0);
        assert!((t.base(4) - 20e-3).abs() < 1e-12);
        assert!((t.base(1) - 10e-3).abs() < 1e-12);
        assert!((t.base(12) - 60e-3).abs() < 1e-12);
        assert_eq!(t.step_time(0, 0), 0.0);
    }

    #[test]
    fn one_context_per_batch_takes_the_fallback_context_cost() {
        let t = DecodeTable::fit(
            &[
                sample(1, 100, 11e-3),
                sample(2, 300, 13e-3),
                sample(4, 500, 15e-3),
            ],
            1e-5,
        )
        .unwrap();
        assert_eq!(t.per_token, 1e-5);
        assert!((t.base(2) - 10e-3).abs() < 1e-12);
        assert!(t.max_rel_err < 1e-12);
    }

    #[test]
    fn bad_samples_are_refused() {
        assert!(DecodeTable::fit(&[], 0.0).is_err());
        let e = DecodeTable::fit(&[sample(0, 10, 1e-3)], 0.0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch of at least 1"), "{e}");
        assert!(DecodeTable::fit(&[sample(1, 10, f64::NAN)], 0.0).is_err());
    }
}
