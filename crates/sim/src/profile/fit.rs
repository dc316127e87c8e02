//! The linear forms of the `profiled` model, fitted by non-negative least squares on relative
//! error (so that short steps weigh as much as long ones): prefill `a * tokens + b * sum(len^2) + c`
//! and the decode line `d * batch + e * context + f`.

use serde::Serialize;

use super::{DecodeSample, PrefillSample};
use crate::error::SimError;

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

pub(super) fn features_prefill(s: &PrefillSample) -> [f64; 3] {
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

pub(super) fn features_decode(s: &DecodeSample) -> [f64; 3] {
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
pub(super) fn fit(rows: &[([f64; 3], f64)], what: &str) -> Result<Fit, SimError> {
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
