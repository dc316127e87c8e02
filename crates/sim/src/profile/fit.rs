//! The linear forms of the `profiled` model, fitted by non-negative least squares on relative
//! error (so that short steps weigh as much as long ones): prefill `a * tokens + b * sum(len^2) + c`
//! and the decode line `d * batch + e * context + f`.

use serde::Serialize;

use super::{DecodeSample, PrefillSample};
use crate::error::SimError;
use crate::nnls::dot;

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

/// Non-negative least squares over the three features ([`crate::nnls`]).
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
    let (coef, _) = crate::nnls::fit_relative(rows)
        .ok_or_else(|| SimError::Profile(format!("{what}: samples admit no fit")))?;
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
