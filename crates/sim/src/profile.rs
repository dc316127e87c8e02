//! The `profiled` model: step times fitted to measurements of a real engine, in the shape DistServe
//! uses: prefill = a * tokens + b * sum(len^2) + c, decode step = d * batch + e * context + f.
//!
//! `tandem profile` writes a [`ProfileFile`] (JSON); [`Profiled::from_profile`] fits it by
//! non-negative least squares on relative error (so that short steps weigh as much as long ones),
//! and reports the fit's error. For a prompt with a cached prefix of `c` tokens and `n` new ones,
//! the quadratic term counts `n^2 + 2 n c`: the attention work of the new rows against the whole
//! context, in the units of `len^2` for a prompt with no prefix.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::perf::{MemoryFit, PerfModel, StepShape};

/// The profile file's format version; bump it on an incompatible change.
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
    pub seconds: f64,
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
}

/// A fitted linear form and how well it matches its samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fit {
    /// Coefficients: (a, b, c) for prefill, (d, e, f) for decode.
    pub coef: [f64; 3],
    pub samples: usize,
    /// Mean of |predicted / measured - 1|.
    pub mean_rel_err: f64,
    pub max_rel_err: f64,
}

fn features_prefill(s: &PrefillSample) -> [f64; 3] {
    let mut tokens = 0.0;
    let mut sq = 0.0;
    for (i, &n) in s.prompt_lens.iter().enumerate() {
        let n = f64::from(n);
        let c = f64::from(s.cached_lens.get(i).copied().unwrap_or(0));
        tokens += n;
        sq += n * n + 2.0 * n * c;
    }
    [tokens, sq, 1.0]
}

fn features_decode(s: &DecodeSample) -> [f64; 3] {
    [f64::from(s.batch), s.context_tokens as f64, 1.0]
}

/// Solves the 3x3 (or smaller, by mask) weighted least-squares problem; `None` when singular.
fn solve_masked(rows: &[([f64; 3], f64)], mask: [bool; 3]) -> Option<[f64; 3]> {
    let idx: Vec<usize> = (0..3).filter(|&i| mask[i]).collect();
    let k = idx.len();
    let mut a = vec![vec![0.0; k + 1]; k];
    for (x, y) in rows {
        // Weight 1/y: minimise relative error.
        let w = 1.0 / y;
        for (r, &i) in idx.iter().enumerate() {
            for (c, &j) in idx.iter().enumerate() {
                a[r][c] += x[i] * x[j] * w * w;
            }
            a[r][k] += x[i] * y * w * w;
        }
    }
    for col in 0..k {
        let piv = (col..k).max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))?;
        if a[piv][col].abs() < 1e-300 {
            return None;
        }
        a.swap(col, piv);
        let pivot_row = a[col].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (x, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut out = [0.0; 3];
    for (r, &i) in idx.iter().enumerate() {
        out[i] = a[r][k] / a[r][r];
    }
    out.iter().all(|v| v.is_finite()).then_some(out)
}

/// Non-negative least squares over the 8 subsets of 3 features: exact for this size.
fn fit(rows: &[([f64; 3], f64)], what: &str) -> Result<Fit, SimError> {
    if rows.len() < 3 {
        return Err(SimError::Profile(format!(
            "{what}: need at least 3 samples, have {}",
            rows.len()
        )));
    }
    if rows.iter().any(|(_, y)| !(*y > 0.0 && y.is_finite())) {
        return Err(SimError::Profile(format!(
            "{what}: every sample needs a positive time"
        )));
    }
    let mut best: Option<(f64, [f64; 3])> = None;
    for m in 1u8..8 {
        let mask = [m & 1 != 0, m & 2 != 0, m & 4 != 0];
        let Some(coef) = solve_masked(rows, mask) else {
            continue;
        };
        if coef.iter().any(|c| *c < 0.0) {
            continue;
        }
        let sse: f64 = rows
            .iter()
            .map(|(x, y)| (dot(&coef, x) / y - 1.0).powi(2))
            .sum();
        if best.is_none_or(|(b, _)| sse < b) {
            best = Some((sse, coef));
        }
    }
    let (_, coef) =
        best.ok_or_else(|| SimError::Profile(format!("{what}: samples admit no fit")))?;
    let errs: Vec<f64> = rows
        .iter()
        .map(|(x, y)| (dot(&coef, x) / y - 1.0).abs())
        .collect();
    Ok(Fit {
        coef,
        samples: rows.len(),
        mean_rel_err: errs.iter().sum::<f64>() / errs.len() as f64,
        max_rel_err: errs.iter().copied().fold(0.0, f64::max),
    })
}

fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// A performance model fitted to a profile.
#[derive(Debug, Clone)]
pub struct Profiled {
    source: ProfileFile,
    pub prefill_fit: Fit,
    pub decode_fit: Fit,
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
        Ok(Profiled {
            source: profile,
            prefill_fit,
            decode_fit,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, SimError> {
        Self::from_profile(ProfileFile::read(path)?)
    }
}

impl PerfModel for Profiled {
    fn describe(&self) -> String {
        format!(
            "profiled: {} on {} (tp {}, engine {}); prefill fit {} samples, mean error {:.1}%, max {:.1}%; \
             decode fit {} samples, mean error {:.1}%, max {:.1}%",
            self.source.model,
            self.source.hardware,
            self.source.tensor_parallel,
            self.source.engine,
            self.prefill_fit.samples,
            self.prefill_fit.mean_rel_err * 100.0,
            self.prefill_fit.max_rel_err * 100.0,
            self.decode_fit.samples,
            self.decode_fit.mean_rel_err * 100.0,
            self.decode_fit.max_rel_err * 100.0
        )
    }

    fn tensor_parallel(&self) -> u32 {
        self.source.tensor_parallel
    }

    /// A mixed step pays both variable parts and the larger fixed part once: the fixed parts are
    /// mostly the weight traffic, which one forward pass reads once.
    fn step_time(&self, step: &StepShape<'_>) -> f64 {
        let [a, b, c] = self.prefill_fit.coef;
        let [d, e, f] = self.decode_fit.coef;
        let mut tokens = 0.0;
        let mut sq = 0.0;
        for p in step.prefill {
            let n = f64::from(p.new_tokens);
            tokens += n;
            sq += n * n + 2.0 * n * f64::from(p.cached_tokens);
        }
        let has_p = !step.prefill.is_empty();
        let has_d = step.decode_batch > 0;
        let fixed = match (has_p, has_d) {
            (false, false) => return 0.0,
            (true, false) => c,
            (false, true) => f,
            (true, true) => c.max(f),
        };
        a * tokens
            + b * sq
            + d * f64::from(step.decode_batch)
            + e * step.decode_context as f64
            + fixed
    }

    fn kv_bytes_per_token(&self) -> u64 {
        self.source.kv_bytes_per_token
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
    use crate::perf::PrefillItem;

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
        let t = m.prefill_time(&[PrefillItem::fresh(300)]);
        assert!(
            (t - (2e-4 * 300.0 + 1e-8 * 90_000.0 + 5e-3)).abs() < 1e-9,
            "{t}"
        );
        assert!((m.decode_step_time(10, 1000) - (3e-3 + 2e-4 + 8e-3)).abs() < 1e-9);
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
        assert!(m.describe().contains("prefill fit 6 samples"));
    }

    #[test]
    fn too_few_samples_is_an_error() {
        let mut p = synthetic(false);
        p.decode.truncate(2);
        let e = Profiled::from_profile(p).unwrap_err().to_string();
        assert!(e.contains("decode: need at least 3 samples"), "{e}");
    }
}
