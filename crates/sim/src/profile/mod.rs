//! The `profiled` model: step times fitted to measurements of a real engine. Prefill has the shape
//! DistServe uses, `a * tokens + b * sum(len^2) + c`; a decode step is a table over the profiled
//! batch sizes plus a cost per token of context ([`table`]), because a CPU engine's decode step is
//! not linear in the batch. The DistServe decode line `d * batch + e * context + f` is still fitted
//! and reported beside it, and gives the fixed part that a mixed step shares.
//!
//! `tandem profile` writes a [`ProfileFile`] (JSON); [`Profiled::from_profile`] fits it on
//! relative error (so that short steps weigh as much as long ones), and reports the fits' errors.
//! For a prompt with a cached prefix of `c` tokens and `n` new ones, the quadratic term counts
//! `n^2 + 2 n c`: the attention work of the new rows against the whole context, in the units of
//! `len^2` for a prompt with no prefix.
//!
//! Two optional parts of the file ([`serving`]) carry what the medians leave out: every timed
//! repetition of a decode step (the DES draws step times from their spread) and prompts timed
//! through the served path (the DES slows a prefill step by the measured ratio). A file without
//! them (written before they existed) reads as before and gives the model they had.

mod fit;
pub mod serving;
pub mod table;

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::perf::{MemoryFit, PerfModel, PrefillItem, StepShape};
pub use fit::Fit;
use fit::{features_decode, features_prefill, fit};
pub use serving::{DecodeSpread, ServedAnswer, ServedPrefill, ServedSample};
pub use table::DecodeTable;

/// The profile file's format version; bump it on an incompatible change. Optional fields added
/// since (`DecodeSample::times`, `ProfileFile::served`) are not one: older files lack them and
/// read as before, and older builds ignore them.
pub const PROFILE_FORMAT: u32 = 1;

/// One measured prefill step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrefillSample {
    /// New tokens of each prompt in the batch.
    pub prompt_lens: Vec<u32>,
    /// Tokens of each prompt already in the KV cache (absent or empty: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cached_lens: Vec<u32>,
    pub seconds: f64,
}

/// One measured decode step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecodeSample {
    pub batch: u32,
    /// Tokens attended to, summed over the batch.
    pub context_tokens: u64,
    /// The median of `times`.
    pub seconds: f64,
    /// Every timed repetition, in the order measured (absent in older files: no spread).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub times: Vec<f64>,
}

/// What `tandem profile` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileFile {
    /// Always [`PROFILE_FORMAT`].
    pub format: u32,
    /// The model measured (catalogue name or model path).
    pub model: String,
    /// The machine, in words (CPU model and threads, or GPU name).
    pub hardware: String,
    /// The engine measured (`native`).
    pub engine: String,
    pub tensor_parallel: u32,
    pub kv_bytes_per_token: u64,
    /// KV pool capacity of the measured engine, in 16-token blocks.
    pub kv_blocks: u64,
    pub weight_bytes: u64,
    pub prefill: Vec<PrefillSample>,
    pub decode: Vec<DecodeSample>,
    /// Prompts timed through a served pair of workers (`tandem profile --served`; absent: the
    /// served prefill is taken to be the engine's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub served: Vec<ServedSample>,
    /// Answers decoded alone by the served decode worker, with the gaps between their tokens
    /// (`tandem profile --served`). Where present, the decode step factors are theirs rather than
    /// the spread of the engine's repetitions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub served_decode: Vec<ServedAnswer>,
    /// Every rescaling applied to the measured times since they were taken
    /// ([`ProfileFile::rescaled`]), oldest first (absent: the times are as measured).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rescaled: Vec<SpeedRatio>,
    /// The host's speed while the served part was timed, against the engine part's (the mean of
    /// checks just before and just after it); `served` and `served_decode` hold their measured
    /// times divided by it, so that a host that changed speed between the two parts does not pass
    /// for a served path slower or faster than the engine (absent: taken as measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_host: Option<SpeedRatio>,
}

/// How long the engine takes now for the shapes of a profile, against what the profile predicts
/// for them: above 1, the host runs slower than when it was profiled. Prefill and decode have their
/// own ratio, since a host's neighbours slow arithmetic and memory traffic by different amounts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SpeedRatio {
    pub prefill: f64,
    pub decode: f64,
}

impl SpeedRatio {
    /// The mean of two ratios, each phase apart: the host's speed over a span bracketed by two
    /// checks.
    pub fn mean(self, other: SpeedRatio) -> SpeedRatio {
        SpeedRatio {
            prefill: (self.prefill + other.prefill) / 2.0,
            decode: (self.decode + other.decode) / 2.0,
        }
    }

    /// The larger relative difference between two ratios, of the two phases.
    pub fn moved_from(self, other: SpeedRatio) -> f64 {
        (self.prefill / other.prefill - 1.0)
            .abs()
            .max((self.decode / other.decode - 1.0).abs())
    }
}

impl ProfileFile {
    pub fn read(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let p: ProfileFile = serde_json::from_str(&text).map_err(|source| SimError::Parse {
            what: path.display().to_string(),
            source,
        })?;
        if p.format != PROFILE_FORMAT {
            return Err(SimError::Profile(format!(
                "{} has format {}, this build reads {PROFILE_FORMAT}",
                path.display(),
                p.format
            )));
        }
        Ok(p)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The same profile with every measured time multiplied by `by` (prefill steps and served
    /// prompts by its prefill ratio; decode steps, their repetitions and the served answers' gaps
    /// by its decode ratio), and `by` added to [`Self::rescaled`]. The fitted shapes stay as
    /// measured, and so do the served path's ratios to the engine alone, which both sides scale
    /// by the same factor: only the host's speed changes.
    pub fn rescaled(&self, by: SpeedRatio) -> ProfileFile {
        let mut p = self.clone();
        for s in &mut p.prefill {
            s.seconds *= by.prefill;
        }
        for s in &mut p.served {
            s.seconds *= by.prefill;
        }
        for s in &mut p.decode {
            s.seconds *= by.decode;
            for t in &mut s.times {
                *t *= by.decode;
            }
        }
        for a in &mut p.served_decode {
            for g in &mut a.gaps {
                *g *= by.decode;
            }
        }
        p.rescaled.push(by);
        p
    }
}

/// The served decode steps' level against the engine alone's
/// ([`Profiled::profiled_served_decode_level`]) that a profile taken on a quiet host stays inside
/// (0.93-1.08 seen, with a margin): outside it, the profile's served part ran under a load its
/// engine part did not, or the other way round.
pub const QUIET_SERVED_DECODE_LEVEL: std::ops::RangeInclusive<f64> = 0.85..=1.15;

/// The fitted engine-alone prefill time of one fresh prompt of `n` tokens, the base the served
/// prompts' ratios are taken against.
fn prefill_alone(fit: &Fit, n: u32) -> f64 {
    let [a, b, c] = fit.coef;
    let n = f64::from(n);
    a * n + b * n * n + c
}

/// The median of the positive finite values of `v`.
fn median(mut v: Vec<f64>, what: &str) -> Result<f64, SimError> {
    v.retain(|r| r.is_finite() && *r > 0.0);
    if v.is_empty() {
        return Err(SimError::Profile(format!(
            "no {what} sample to compare with the profile"
        )));
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Ok((v[(n - 1) / 2] + v[n / 2]) / 2.0)
}

/// A performance model fitted to a profile.
#[derive(Debug, Clone)]
pub struct Profiled {
    source: ProfileFile,
    pub prefill_fit: Fit,
    /// The decode line, for its fixed part and for comparison.
    pub decode_fit: Fit,
    /// What a decode step costs.
    pub decode_table: DecodeTable,
    /// How decode step times spread about the table's.
    pub decode_spread: DecodeSpread,
    /// How much slower a served prefill is than the engine's.
    pub served_prefill: ServedPrefill,
}

impl Profiled {
    pub fn from_profile(profile: ProfileFile) -> Result<Self, SimError> {
        if profile.tensor_parallel == 0 || profile.kv_bytes_per_token == 0 || profile.kv_blocks == 0
        {
            return Err(SimError::Profile(
                "tensor_parallel, kv_bytes_per_token and kv_blocks must be positive".into(),
            ));
        }
        let p: Vec<_> = profile
            .prefill
            .iter()
            .map(|s| (features_prefill(s), s.seconds))
            .collect();
        let d: Vec<_> = profile
            .decode
            .iter()
            .map(|s| (features_decode(s), s.seconds))
            .collect();
        let prefill_fit = fit(&p, "prefill")?;
        let decode_fit = fit(&d, "decode")?;
        let decode_table = DecodeTable::fit(&profile.decode, decode_fit.coef[1])?;
        let served_spread =
            DecodeSpread::from_served(&profile.served_decode, |ctx| decode_table.step_time(1, ctx));
        let decode_spread = if served_spread.is_empty() {
            DecodeSpread::from_samples(&profile.decode)
        } else {
            served_spread
        };
        let served_prefill =
            ServedPrefill::fit(&profile.served, |n| prefill_alone(&prefill_fit, n));
        Ok(Profiled {
            source: profile,
            prefill_fit,
            decode_fit,
            decode_table,
            decode_spread,
            served_prefill,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, SimError> {
        Self::from_profile(ProfileFile::read(path)?)
    }

    /// The host's speed now against this profile's: the median, over the samples given (measured
    /// now, of any shapes), of the measured time over the time the fitted model gives for the
    /// same shape, for prefill and decode apart (`tandem profile --check`). A decode sample counts
    /// every timed repetition it kept, not only their median: a check is short, and a burst from a
    /// neighbour that covers a few of its steps should not move it.
    pub fn speed_ratio(
        &self,
        prefill: &[PrefillSample],
        decode: &[DecodeSample],
    ) -> Result<SpeedRatio, SimError> {
        let prefill: Vec<f64> = prefill
            .iter()
            .map(|s| {
                let items: Vec<PrefillItem> = s
                    .prompt_lens
                    .iter()
                    .enumerate()
                    .map(|(i, &n)| PrefillItem {
                        new_tokens: n,
                        cached_tokens: s.cached_lens.get(i).copied().unwrap_or(0),
                    })
                    .collect();
                s.seconds / self.prefill_time(&items)
            })
            .collect();
        let decode: Vec<f64> = decode
            .iter()
            .flat_map(|s| {
                let model = self.decode_step_time(s.batch, s.context_tokens);
                let times = if s.times.is_empty() {
                    std::slice::from_ref(&s.seconds)
                } else {
                    &s.times[..]
                };
                times.iter().map(move |t| t / model)
            })
            .collect();
        Ok(SpeedRatio {
            prefill: median(prefill, "prefill")?,
            decode: median(decode, "decode")?,
        })
    }
}

impl Profiled {
    /// The served pair's speed now against this profile's served part: prompts timed through a
    /// running server (`samples`, each against the fitted engine-alone prefill time of its length
    /// times the profile's served ratio for its case) and answers decoded there (`answers`, each
    /// gap against the engine's batch-1 step at its context, over the same for the profile's own
    /// served answers); medians, above 1 when the pair runs slower. This sees what a check of one
    /// engine in one process cannot: the two workers slowed together, by each other or by the
    /// neighbours (`tandem profile --check --served-url`).
    pub fn served_speed_ratio(
        &self,
        samples: &[ServedSample],
        answers: &[ServedAnswer],
    ) -> Result<SpeedRatio, SimError> {
        if self.source.served.is_empty() || self.source.served_decode.is_empty() {
            return Err(SimError::Profile(
                "the profile has no served part to compare with (take it with --served)".into(),
            ));
        }
        let engine = |n: u32| prefill_alone(&self.prefill_fit, n);
        let prefill: Vec<f64> = samples
            .iter()
            .filter(|s| s.prompt_tokens > 0)
            .map(|s| {
                s.seconds
                    / (engine(s.prompt_tokens)
                        * self.served_prefill.factor(s.beside_decode, s.after_idle))
            })
            .collect();
        Ok(SpeedRatio {
            prefill: median(prefill, "served prefill")?,
            decode: self.served_decode_level(answers)? / self.profiled_served_decode_level()?,
        })
    }

    /// The median, over every gap of `answers` (decoded by a served decode worker), of the gap
    /// over the profiled engine's batch-1 step at its context: 1 when the served steps take what
    /// the engine alone takes.
    pub fn served_decode_level(&self, answers: &[ServedAnswer]) -> Result<f64, SimError> {
        let ratios = answers
            .iter()
            .flat_map(|a| {
                a.gaps.iter().enumerate().map(move |(i, &g)| {
                    // As `DecodeSpread::from_served`: the gap before token i + 3.
                    g / self
                        .decode_table
                        .step_time(1, u64::from(a.prompt_tokens) + i as u64 + 3)
                })
            })
            .collect();
        median(ratios, "served decode")
    }

    /// [`Self::served_decode_level`] of the profile's own served answers. A quiet host gives
    /// 0.93-1.08 (the served steps also carry token delivery); far from 1, the served part ran
    /// under a load the engine part did not (or the other way round), and the profile does not
    /// describe one host: take it again.
    pub fn profiled_served_decode_level(&self) -> Result<f64, SimError> {
        self.served_decode_level(&self.source.served_decode)
    }

    /// The spread and served parts of [`PerfModel::describe`], empty when the profile has neither.
    fn serving_note(&self) -> String {
        let mut out = String::new();
        let s = &self.decode_spread;
        if !s.is_empty() {
            out += &format!(
                "; decode steps x a factor drawn from {} ({} steps, p10 {:.3}, median {:.3}, p90 \
                 {:.3})",
                s.source(),
                s.factors(),
                s.pooled_quantile(0.1),
                s.pooled_quantile(0.5),
                s.pooled_quantile(0.9)
            );
        }
        let p = &self.served_prefill;
        if p.samples() > 0 {
            out += &format!("; served prefill against the engine, {}", p.describe());
        }
        out
    }
}

impl PerfModel for Profiled {
    fn describe(&self) -> String {
        let t = &self.decode_table;
        let (lo, hi) = (
            t.points.first().map_or(0, |p| p.0),
            t.points.last().map_or(0, |p| p.0),
        );
        format!(
            "profiled: {} on {} (tp {}, engine {}); prefill fit {} samples, mean error {:.1}%, max {:.1}%; \
             decode table over {} batch sizes ({lo}-{hi}), {} samples, mean error {:.1}%, max {:.1}% \
             (a line in the batch: mean {:.1}%, max {:.1}%)",
            self.source.model,
            self.source.hardware,
            self.source.tensor_parallel,
            self.source.engine,
            self.prefill_fit.samples,
            self.prefill_fit.mean_rel_err * 100.0,
            self.prefill_fit.max_rel_err * 100.0,
            t.points.len(),
            t.samples,
            t.mean_rel_err * 100.0,
            t.max_rel_err * 100.0,
            self.decode_fit.mean_rel_err * 100.0,
            self.decode_fit.max_rel_err * 100.0
        ) + &self.serving_note()
    }

    fn tensor_parallel(&self) -> u32 {
        self.source.tensor_parallel
    }

    /// A mixed step pays both parts but the smaller fixed part (prefill's `c`, the decode line's
    /// `f`) once only: the fixed parts are mostly the weight traffic, which one forward pass reads
    /// once.
    fn step_time(&self, step: &StepShape<'_>) -> f64 {
        let [a, b, c] = self.prefill_fit.coef;
        let f = self.decode_fit.coef[2];
        let mut tokens = 0.0;
        let mut sq = 0.0;
        for p in step.prefill {
            let n = f64::from(p.new_tokens);
            tokens += n;
            sq += n * n + 2.0 * n * f64::from(p.cached_tokens);
        }
        let prefill = if step.prefill.is_empty() {
            0.0
        } else {
            a * tokens + b * sq + c
        };
        let decode = self
            .decode_table
            .step_time(step.decode_batch, step.decode_context);
        let shared = if prefill > 0.0 && decode > 0.0 {
            c.min(f)
        } else {
            0.0
        };
        prefill + decode - shared
    }

    fn kv_bytes_per_token(&self) -> u64 {
        self.source.kv_bytes_per_token
    }

    fn decode_spread(&self, batch: u32, u: f64) -> f64 {
        self.decode_spread.factor(batch, u)
    }

    fn served_prefill_factor(&self, beside_decode: bool, after_idle: bool) -> f64 {
        self.served_prefill.factor(beside_decode, after_idle)
    }

    fn memory(&self) -> MemoryFit {
        let tp = self.source.tensor_parallel;
        MemoryFit {
            gpus: tp,
            weight_bytes_per_gpu: self.source.weight_bytes as f64 / f64::from(tp),
            kv_bytes_per_gpu: (self.source.kv_blocks * 16 * self.source.kv_bytes_per_token) as f64
                / f64::from(tp),
            kv_blocks: self.source.kv_blocks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(noise: bool) -> ProfileFile {
        let (a, b, c, d, e, f) = (2e-4, 1e-8, 5e-3, 3e-4, 2e-7, 8e-3);
        let mut prefill = Vec::new();
        let mut k = 0;
        for lens in [
            vec![32],
            vec![128],
            vec![512],
            vec![1024],
            vec![128; 4],
            vec![256, 512, 64],
        ] {
            let t: f64 = lens.iter().map(|&n| f64::from(n)).sum();
            let s: f64 = lens.iter().map(|&n| f64::from(n).powi(2)).sum();
            k += 1;
            let jitter = if noise && k % 2 == 0 { 1.03 } else { 1.0 };
            prefill.push(PrefillSample {
                prompt_lens: lens,
                cached_lens: vec![],
                seconds: (a * t + b * s + c) * jitter,
            });
        }
        let mut decode = Vec::new();
        for (batch, ctx) in [(1u32, 100u64), (4, 800), (16, 4000), (32, 16000), (8, 512)] {
            let secs = d * f64::from(batch) + e * ctx as f64 + f;
            decode.push(DecodeSample {
                batch,
                context_tokens: ctx,
                seconds: secs,
                times: Vec::new(),
            });
        }
        ProfileFile {
            format: PROFILE_FORMAT,
            model: "smollm2-135m".into(),
            hardware: "test".into(),
            engine: "native".into(),
            tensor_parallel: 1,
            kv_bytes_per_token: 46_080,
            kv_blocks: 4096,
            weight_bytes: 269_000_000,
            prefill,
            decode,
            served: Vec::new(),
            served_decode: Vec::new(),
            rescaled: Vec::new(),
            served_host: None,
        }
    }

    #[test]
    fn exact_samples_are_recovered() {
        let m = Profiled::from_profile(synthetic(false)).unwrap();
        let [a, b, c] = m.prefill_fit.coef;
        assert!(
            (a / 2e-4 - 1.0).abs() < 1e-6
                && (b / 1e-8 - 1.0).abs() < 1e-6
                && (c / 5e-3 - 1.0).abs() < 1e-6
        );
        assert!(m.decode_fit.max_rel_err < 1e-9);
        assert!(m.decode_table.max_rel_err < 1e-9, "{:?}", m.decode_table);
        let t = m.prefill_time(&[PrefillItem::fresh(300)]);
        assert!(
            (t - (2e-4 * 300.0 + 1e-8 * 90_000.0 + 5e-3)).abs() < 1e-9,
            "{t}"
        );
        assert!((m.decode_step_time(10, 1000) - (3e-3 + 2e-4 + 8e-3)).abs() < 1e-9);
    }

    #[test]
    fn a_mixed_step_shares_the_smaller_fixed_part() {
        let m = Profiled::from_profile(synthetic(false)).unwrap();
        let p = [PrefillItem::fresh(100)];
        let apart = m.prefill_time(&p) + m.decode_step_time(4, 800);
        let mixed = m.step_time(&StepShape {
            prefill: &p,
            decode_batch: 4,
            decode_context: 800,
        });
        assert!((apart - mixed - 5e-3).abs() < 1e-12, "{apart} {mixed}");
        assert_eq!(m.step_time(&StepShape::default()), 0.0);
    }

    #[test]
    fn noise_shows_in_the_reported_error_and_file_round_trips() {
        let p = synthetic(true);
        let back: ProfileFile = serde_json::from_str(&p.to_json()).unwrap();
        assert_eq!(back.prefill.len(), 6);
        assert_eq!(back.prefill[5].prompt_lens, vec![256, 512, 64]);
        for (x, y) in back.prefill.iter().zip(&p.prefill) {
            assert!((x.seconds / y.seconds - 1.0).abs() < 1e-12);
        }
        let m = Profiled::from_profile(back).unwrap();
        assert!(
            m.prefill_fit.max_rel_err > 0.005 && m.prefill_fit.max_rel_err < 0.03,
            "{:?}",
            m.prefill_fit
        );
        let d = m.describe();
        assert!(d.contains("prefill fit 6 samples"), "{d}");
        assert!(d.contains("decode table over 5 batch sizes (1-32)"), "{d}");
    }

    #[test]
    fn too_few_samples_is_an_error() {
        let mut p = synthetic(false);
        p.decode.truncate(2);
        let e = Profiled::from_profile(p).unwrap_err().to_string();
        assert!(e.contains("decode: need at least 3 samples"), "{e}");
    }

    #[test]
    fn a_rescaled_profile_predicts_the_host_at_its_new_speed() {
        let mut p = synthetic(false);
        p.decode[0].times = vec![0.9 * p.decode[0].seconds, p.decode[0].seconds];
        p.served = vec![ServedSample {
            prompt_tokens: 128,
            seconds: 0.05,
            beside_decode: false,
            after_idle: true,
        }];
        p.served_decode = vec![ServedAnswer {
            prompt_tokens: 128,
            gaps: vec![0.01, 0.012],
        }];
        let before = Profiled::from_profile(p.clone()).unwrap();
        // A host 25% slower at prefill and 10% faster at decode, measured on shapes the profile
        // never took.
        let now_prefill = [PrefillSample {
            prompt_lens: vec![300, 200],
            cached_lens: vec![0, 64],
            seconds: 1.25
                * before.prefill_time(&[
                    PrefillItem::fresh(300),
                    PrefillItem {
                        new_tokens: 200,
                        cached_tokens: 64,
                    },
                ]),
        }];
        let now_decode: Vec<DecodeSample> = [(2u32, 300u64), (6, 2000), (12, 9000)]
            .iter()
            .map(|&(batch, context_tokens)| DecodeSample {
                batch,
                context_tokens,
                seconds: 0.9 * before.decode_step_time(batch, context_tokens),
                times: Vec::new(),
            })
            .collect();
        let r = before.speed_ratio(&now_prefill, &now_decode).unwrap();
        assert!(
            (r.prefill - 1.25).abs() < 1e-9 && (r.decode - 0.9).abs() < 1e-9,
            "{r:?}"
        );
        // Every repetition counts: a burst over a few steps of one shape does not move the ratio,
        // though it moves that shape's median.
        let mut bursty = now_decode.clone();
        let t = bursty[1].seconds;
        bursty[1].times = vec![t, 1.6 * t, 1.6 * t, 1.6 * t, t];
        bursty[1].seconds = 1.6 * t;
        let b = before.speed_ratio(&now_prefill, &bursty).unwrap();
        assert!((b.decode - 0.9).abs() < 1e-9, "{b:?}");

        let q = p.rescaled(r);
        assert_eq!(q.rescaled, vec![r]);
        assert!((q.served[0].seconds - 0.0625).abs() < 1e-12);
        assert!((q.served_decode[0].gaps[1] - 0.0108).abs() < 1e-12);
        assert!((q.decode[0].times[0] / p.decode[0].times[0] - 0.9).abs() < 1e-12);
        let after = Profiled::from_profile(q.clone()).unwrap();
        let item = [PrefillItem::fresh(700)];
        assert!((after.prefill_time(&item) / before.prefill_time(&item) - 1.25).abs() < 1e-9);
        assert!(
            (after.decode_step_time(7, 3000) / before.decode_step_time(7, 3000) - 0.9).abs() < 1e-9
        );
        // The served path's ratios to the engine alone are the host's, not its speed's.
        let (a, b) = (
            after.served_prefill.factor(false, true),
            before.served_prefill.factor(false, true),
        );
        assert!((a / b - 1.0).abs() < 1e-9, "{a} {b}");
        // The history survives the file (to the last bit or so: serde_json's float parsing), and
        // the ratio of a host that did not move is 1.
        let back: ProfileFile = serde_json::from_str(&q.to_json()).unwrap();
        assert_eq!(back.rescaled.len(), 1);
        assert!((back.rescaled[0].prefill - 1.25).abs() < 1e-12);
        assert!((back.rescaled[0].decode - 0.9).abs() < 1e-12);
        let same = after.speed_ratio(&q.prefill, &q.decode).unwrap();
        assert!((same.prefill - 1.0).abs() < 1e-6 && (same.decode - 1.0).abs() < 1e-6);
        assert!(
            (r.moved_from(r.mean(SpeedRatio {
                prefill: 1.25,
                decode: 1.08
            })) - 0.0909)
                .abs()
                < 1e-3
        );
        assert!(before.speed_ratio(&[], &now_decode).is_err());
    }

    #[test]
    fn a_served_check_compares_the_pair_with_the_profiles_served_part() {
        let mut p = synthetic(false);
        assert!(
            Profiled::from_profile(p.clone())
                .unwrap()
                .served_speed_ratio(&[], &[])
                .unwrap_err()
                .to_string()
                .contains("no served part")
        );
        // Served prompts at 1.2x (idle, after idling) and 1.5x (beside decode) the engine alone,
        // served decode gaps at 1.1x the engine's batch-1 step.
        let engine = Profiled::from_profile(p.clone()).unwrap();
        let at = |n: u32| engine.prefill_time(&[PrefillItem::fresh(n)]);
        let step = |ctx: u64| engine.decode_step_time(1, ctx);
        let sample = |n: u32, r: f64, beside_decode: bool| ServedSample {
            prompt_tokens: n,
            seconds: r * at(n),
            beside_decode,
            after_idle: true,
        };
        p.served = vec![
            sample(64, 1.2, false),
            sample(256, 1.2, false),
            sample(128, 1.5, true),
        ];
        p.served_decode = vec![ServedAnswer {
            prompt_tokens: 100,
            gaps: (0..5).map(|i| 1.1 * step(103 + i)).collect(),
        }];
        let m = Profiled::from_profile(p).unwrap();
        // Now the pair runs 30% slower at prefill in both cases and 20% faster at decode, on
        // other lengths; the ratios are against each case's own served ratio.
        let now = [
            sample(300, 1.2 * 1.3, false),
            sample(90, 1.5 * 1.3, true),
            sample(200, 1.2 * 1.3, false),
        ];
        let answers = [ServedAnswer {
            prompt_tokens: 40,
            gaps: (0..9).map(|i| 0.8 * 1.1 * step(43 + i)).collect(),
        }];
        let r = m.served_speed_ratio(&now, &answers).unwrap();
        assert!(
            (r.prefill - 1.3).abs() < 1e-9 && (r.decode - 0.8).abs() < 1e-9,
            "{r:?}"
        );
        assert!(m.served_speed_ratio(&[], &answers).is_err());
        assert!(m.served_speed_ratio(&now, &[]).is_err());
    }
}
