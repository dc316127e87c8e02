//! What the engine-alone medians leave out, both measured by `tandem profile`:
//!
//! * **The spread of decode step times.** Each measured step divided by a reference (below) is a
//!   factor, and the DES multiplies each decode step by a factor drawn (seeded) from the pool.
//!   Without it every step of a batch size takes the same time, so when the tokens of a run split
//!   into two modes (single-sequence steps and steps of two or more) a percentile that falls
//!   between them snaps to one mode, where the real run's steps spread into the gap. The factors
//!   come from the served decode worker where the profile has its steps (`--served`: the gaps
//!   between the tokens of answers decoded alone, as the client sees them), pooled for every
//!   batch size; otherwise from the engine alone (every timed repetition of a decode shape over
//!   that shape's median, pooled per batch size), which spreads less than the served steps do:
//!   those share the cores with the prefill worker, the KV transfer and the token streaming.
//!   Taking the batch-1 factors for every batch size is an assumption: the served run's steps of
//!   two sequences spread about as much (their quartiles 3% either side of the median, single
//!   steps' 4%).
//!
//!   The served gaps give the *shape* of the step times only; their *level* is the engine-alone
//!   table's. Each gap is first taken over the engine's batch-1 step at its context (so that the
//!   context's growth along an answer is not counted as spread), and then the pool is divided by
//!   its own median, so the factors' median is 1 and the DES's median step is the table's. The
//!   probe's level is not trusted because it is one sequence decoding at a time with 16-token
//!   prompts and nothing else in its batch: over four profiles it came out at 0.94-1.08 of the
//!   engine alone, below the steps the chat runs saw in the runs where it was under 1, and it
//!   moved from profile to profile by more than the engine table did. Its relative spread is a
//!   property of the served path (the token streaming's batching of deliveries, the prefill
//!   worker's and the transfer's threads taking the core for a moment), which a level shift
//!   scales but does not make. The median rather than the mean: the table holds each shape's
//!   median repetition, so the median of the factors is what lines up with it, and the mean is
//!   pulled up by the few long gaps (a prompt's prefill sharing the cores), which stay in the
//!   pool as factors above 1.
//! * **Prefill served, against the engine alone.** `tandem profile --served` sends prompts one at
//!   a time through a real `tandem up` (one prefill and one decode worker) and keeps each prompt's
//!   time to first token (`ServedSample`) in four cases: with the decode worker idle or decoding a
//!   long answer, and with each prompt sent straight after the previous one (the prefill worker
//!   busy back to back, as for queued prompts) or on a clock with the worker idle in between (as
//!   for a prompt arriving at an idle worker). The ratio of each to the fitted engine-alone prefill
//!   time of its prompt is what the serving around the step costs on that machine: the KV
//!   transfer's threads, the decode worker's import and its decoding taking CPU from the prefill's
//!   compute thread, a worker waking from idle, the gateway's and the client's own milliseconds.
//!   The DES multiplies a prefill step by the median ratio of the case it is in (a decode instance
//!   decoding or not when the step starts; the step started by an arrival at an idle prefill
//!   instance or straight after the previous step).

use serde::{Deserialize, Serialize};

use super::DecodeSample;

/// One prompt sent through the served path during profiling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedSample {
    /// Prompt tokens as the server counted them.
    pub prompt_tokens: u32,
    /// Time to first token at the client.
    pub seconds: f64,
    /// Whether the decode worker was decoding another answer meanwhile.
    pub beside_decode: bool,
    /// Whether the prompt arrived at a prefill worker that had been idle (sent on a clock, the
    /// previous prompt done a while before) rather than straight after its previous prompt.
    #[serde(default)]
    pub after_idle: bool,
}

/// An answer decoded alone by the served decode worker during profiling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServedAnswer {
    /// Its prompt's tokens, as the server counted them.
    pub prompt_tokens: u32,
    /// Gaps between its tokens at the client, from the second to the third token on (the first
    /// decode step's gap includes the KV's import and is left out), seconds.
    pub gaps: Vec<f64>,
}

/// Relative decode step times per profiled batch size, each pool sorted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DecodeSpread {
    pools: Vec<(u32, Vec<f64>)>,
    served: bool,
}

impl DecodeSpread {
    /// From answers decoded alone by the served decode worker: each gap over `engine_alone`, the
    /// profiled engine's batch-1 step at that gap's context, pooled into one pool for every batch
    /// and divided by the pool's median: the factors carry the served steps' spread, not their
    /// level (see the module's notes).
    pub fn from_served(answers: &[ServedAnswer], engine_alone: impl Fn(u64) -> f64) -> Self {
        let mut pool = Vec::new();
        for a in answers {
            for (i, &g) in a.gaps.iter().enumerate() {
                // The gap before token i + 3: its step attends to the prompt and i + 3 tokens.
                let t = engine_alone(u64::from(a.prompt_tokens) + i as u64 + 3);
                let f = g / t;
                if f.is_finite() && f > 0.0 {
                    pool.push(f);
                }
            }
        }
        if pool.is_empty() {
            return DecodeSpread::default();
        }
        pool.sort_by(f64::total_cmp);
        let median = quantile(&pool, 0.5);
        for f in &mut pool {
            *f /= median;
        }
        DecodeSpread {
            pools: vec![(1, pool)],
            served: true,
        }
    }

    /// Where the factors come from, in words.
    pub fn source(&self) -> &'static str {
        if self.served {
            "the served decode worker's batch-1 steps over the engine's, over their median, for every batch"
        } else {
            "the engine's repetitions over their median, per batch size"
        }
    }

    pub fn from_samples(samples: &[DecodeSample]) -> Self {
        let mut pools: Vec<(u32, Vec<f64>)> = Vec::new();
        for s in samples {
            let mut t: Vec<f64> = s
                .times
                .iter()
                .copied()
                .filter(|x| x.is_finite() && *x > 0.0)
                .collect();
            if t.len() < 2 {
                continue;
            }
            t.sort_by(f64::total_cmp);
            let median = quantile(&t, 0.5);
            let factors = t.iter().map(|x| x / median);
            match pools.iter_mut().find(|p| p.0 == s.batch) {
                Some(p) => p.1.extend(factors),
                None => pools.push((s.batch, factors.collect())),
            }
        }
        for p in &mut pools {
            p.1.sort_by(f64::total_cmp);
        }
        pools.sort_by_key(|p| p.0);
        DecodeSpread {
            pools,
            served: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// Factors pooled over all batch sizes.
    pub fn factors(&self) -> usize {
        self.pools.iter().map(|p| p.1.len()).sum()
    }

    /// The `u` quantile (`u` in [0, 1)) of the factors of the profiled batch size nearest `batch`;
    /// 1 when nothing was profiled.
    pub fn factor(&self, batch: u32, u: f64) -> f64 {
        let Some((_, pool)) = self.pools.iter().min_by_key(|p| p.0.abs_diff(batch)) else {
            return 1.0;
        };
        quantile(pool, u.clamp(0.0, 1.0))
    }

    /// The `p` quantile of the factors pooled over every batch size (for reporting the spread).
    pub fn pooled_quantile(&self, p: f64) -> f64 {
        let mut all: Vec<f64> = self
            .pools
            .iter()
            .flat_map(|x| x.1.iter().copied())
            .collect();
        if all.is_empty() {
            return 1.0;
        }
        all.sort_by(f64::total_cmp);
        quantile(&all, p)
    }
}

/// Linear interpolation between the two closest ranks of `sorted` (non-empty).
fn quantile(sorted: &[f64], p: f64) -> f64 {
    let h = (sorted.len() - 1) as f64 * p;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo])
}

/// Median ratios of served time to first token to the fitted engine-alone prefill time, in four
/// cases: the decode worker decoding or idle, and the prefill worker starting the prompt after
/// idling (it arrived at an idle worker) or straight after its previous step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ServedPrefill {
    /// Indexed by `[beside_decode][after_idle]`: (median ratio, samples).
    pub cases: [[(f64, usize); 2]; 2],
}

impl Default for ServedPrefill {
    fn default() -> Self {
        ServedPrefill {
            cases: [[(1.0, 0); 2]; 2],
        }
    }
}

impl ServedPrefill {
    /// From the served samples and `engine_alone`, the fitted prefill time of a prompt of that many
    /// tokens. A case with no sample takes the other case with the same decode worker state, and
    /// failing that the ratio 1.
    pub fn fit(samples: &[ServedSample], engine_alone: impl Fn(u32) -> f64) -> Self {
        let ratio = |beside: bool, after_idle: bool| {
            let mut r: Vec<f64> = samples
                .iter()
                .filter(|s| {
                    s.beside_decode == beside && s.after_idle == after_idle && s.prompt_tokens > 0
                })
                .map(|s| s.seconds / engine_alone(s.prompt_tokens))
                .filter(|x| x.is_finite() && *x > 0.0)
                .collect();
            r.sort_by(f64::total_cmp);
            let n = r.len();
            (if n == 0 { 1.0 } else { quantile(&r, 0.5) }, n)
        };
        let mut cases = [[(1.0, 0); 2]; 2];
        for (b, row) in cases.iter_mut().enumerate() {
            for (i, c) in row.iter_mut().enumerate() {
                *c = ratio(b == 1, i == 1);
            }
            for i in 0..2 {
                if row[i].1 == 0 && row[1 - i].1 > 0 {
                    row[i].0 = row[1 - i].0;
                }
            }
        }
        ServedPrefill { cases }
    }

    pub fn samples(&self) -> usize {
        self.cases.iter().flatten().map(|c| c.1).sum()
    }

    pub fn factor(&self, beside_decode: bool, after_idle: bool) -> f64 {
        self.cases[usize::from(beside_decode)][usize::from(after_idle)].0
    }

    /// The four ratios, in words.
    pub fn describe(&self) -> String {
        let c = |b: usize, i: usize| format!("x{:.3} ({})", self.cases[b][i].0, self.cases[b][i].1);
        format!(
            "decode worker idle: {} after idling, {} straight after a step; decoding: {} after \
             idling, {} straight after a step (median ratio, prompts)",
            c(0, 1),
            c(0, 0),
            c(1, 1),
            c(1, 0)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(batch: u32, times: &[f64]) -> DecodeSample {
        DecodeSample {
            batch,
            context_tokens: 100,
            seconds: 0.0,
            times: times.to_vec(),
        }
    }

    #[test]
    fn factors_are_relative_to_each_shapes_median_and_pooled_per_batch() {
        let s = DecodeSpread::from_samples(&[
            sample(1, &[0.010, 0.011, 0.012]),
            sample(1, &[0.020, 0.022, 0.018]),
            sample(4, &[0.040, 0.040]),
            sample(8, &[0.05]),
        ]);
        assert_eq!(s.factors(), 8);
        // Batch 1: 10/11, 1, 12/11, 0.9, 1, 1.1.
        assert!((s.factor(1, 0.0) - 0.9).abs() < 1e-12);
        assert!((s.factor(1, 0.2) - 10.0 / 11.0).abs() < 1e-12);
        assert!((s.factor(1, 0.5) - 1.0).abs() < 1e-12);
        assert!((s.factor(1, 1.0) - 1.1).abs() < 1e-12);
        // Batch 8 had one repetition only, so the nearest pool with a spread answers: 4's.
        assert_eq!(s.factor(8, 0.9), 1.0);
        assert_eq!(s.factor(2, 0.3), s.factor(1, 0.3));
        assert_eq!(DecodeSpread::default().factor(3, 0.7), 1.0);
    }

    #[test]
    fn served_gaps_give_the_spread_about_their_median_at_every_batch_not_the_level() {
        // The engine alone: 10 ms plus 0.1 ms per token of context; the served steps 5% slower,
        // one of them 50%.
        let alone = |ctx: u64| 0.010 + 1e-4 * ctx as f64;
        let served = |level: f64| {
            let mut gaps: Vec<f64> = (0..20u64).map(|i| level * alone(10 + i + 3)).collect();
            gaps[7] *= 1.5 / level;
            DecodeSpread::from_served(
                &[ServedAnswer {
                    prompt_tokens: 10,
                    gaps,
                }],
                alone,
            )
        };
        let s = served(1.05);
        assert_eq!(s.factors(), 20);
        assert!(s.source().contains("served"));
        // The context's growth is not spread, the 5% is level (left to the table): every step but
        // the slow one is the median, factor 1, and the slow one is 1.5 / 1.05 of it.
        assert!(
            (s.factor(1, 1.0) - 1.5 / 1.05).abs() < 1e-9,
            "{}",
            s.factor(1, 1.0)
        );
        assert!(
            (s.factor(7, 0.9) - 1.0).abs() < 1e-9,
            "{}",
            s.factor(7, 0.9)
        );
        assert!(
            (s.factor(1, 0.0) - 1.0).abs() < 1e-9,
            "{}",
            s.factor(1, 0.0)
        );
        assert!((s.pooled_quantile(0.5) - 1.0).abs() < 1e-12);
        // Served 10% faster than the engine instead: the same factors but for the slow step's.
        let t = served(0.9);
        assert!(
            (t.factor(3, 0.5) - 1.0).abs() < 1e-9,
            "{}",
            t.factor(3, 0.5)
        );
        assert!((t.factor(1, 1.0) - 1.5 / 0.9).abs() < 1e-9);
        assert!(DecodeSpread::from_served(&[], alone).is_empty());
    }

    #[test]
    fn served_ratios_are_medians_per_case() {
        let alone = |n: u32| f64::from(n) * 1e-3;
        let mk = |n: u32, s: f64, b: bool, i: bool| ServedSample {
            prompt_tokens: n,
            seconds: s,
            beside_decode: b,
            after_idle: i,
        };
        let f = ServedPrefill::fit(
            &[
                mk(100, 0.102, false, false),
                mk(200, 0.206, false, false),
                mk(300, 0.9, false, false),
                mk(100, 0.105, false, true),
                mk(100, 0.107, true, false),
                mk(200, 0.212, true, false),
            ],
            alone,
        );
        assert!((f.factor(false, false) - 1.03).abs() < 1e-9, "{f:?}");
        assert!((f.factor(false, true) - 1.05).abs() < 1e-9, "{f:?}");
        assert!((f.factor(true, false) - 1.065).abs() < 1e-9, "{f:?}");
        // No prompt after idling beside a decoding answer: the other decoding case answers.
        assert!((f.factor(true, true) - 1.065).abs() < 1e-9, "{f:?}");
        assert_eq!(f.samples(), 6);
        assert!(
            f.describe().contains("x1.050 (1) after idling"),
            "{}",
            f.describe()
        );
        let none = ServedPrefill::fit(&[], alone);
        assert_eq!(
            (none.factor(false, true), none.factor(true, false)),
            (1.0, 1.0)
        );
    }
}
