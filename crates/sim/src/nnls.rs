//! Non-negative least squares on relative error for the small linear forms of the performance
//! model (at most a handful of features): every subset of features is solved exactly and the best
//! one whose coefficients are all non-negative wins. Exact for these sizes, and shared by the
//! profile's fits and the router's online fit, so that both read measurements the same way.

/// Coefficients minimising the sum of `(x . coef / y - 1)^2` with every coefficient `>= 0`, and
/// that sum; `None` when no subset admits a finite solution (every row must have `y > 0`).
pub fn fit_relative<const N: usize>(rows: &[([f64; N], f64)]) -> Option<([f64; N], f64)> {
    // A feature that is zero in every row (a prefill worker's decode terms) cannot be fitted:
    // subsets with it are skipped, which makes the search several times cheaper.
    let used = (0..N)
        .filter(|&i| rows.iter().any(|(x, _)| x[i] != 0.0))
        .fold(0u32, |m, i| m | (1 << i));
    let mut best: Option<(f64, [f64; N])> = None;
    for mask in (1u32..(1 << N)).filter(|m| m & !used == 0) {
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
        if sse.is_finite() && best.is_none_or(|(b, _)| sse < b) {
            best = Some((sse, coef));
        }
    }
    best.map(|(sse, coef)| (coef, sse))
}

/// `a . b`.
pub fn dot<const N: usize>(a: &[f64; N], b: &[f64; N]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Weighted least squares (weight `1/y`) over the features in `mask`; the others are 0. `None`
/// when the system is singular.
fn solve_masked<const N: usize>(rows: &[([f64; N], f64)], mask: u32) -> Option<[f64; N]> {
    let idx: Vec<usize> = (0..N).filter(|&i| mask & (1 << i) != 0).collect();
    let k = idx.len();
    let mut a = vec![vec![0.0; k + 1]; k];
    for (x, y) in rows {
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
    let mut out = [0.0; N];
    for (r, &i) in idx.iter().enumerate() {
        out[i] = a[r][k] / a[r][r];
    }
    out.iter().all(|v| v.is_finite()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_an_exact_non_negative_form() {
        let coef = [2e-3, 0.0, 5e-2, 1e-6];
        let rows: Vec<([f64; 4], f64)> = (1..40)
            .map(|i| {
                let x = [f64::from(i), f64::from(i % 7), 1.0, f64::from(i * i)];
                (x, dot(&coef, &x))
            })
            .collect();
        let (got, sse) = fit_relative(&rows).unwrap();
        for (g, w) in got.iter().zip(&coef) {
            assert!((g - w).abs() <= 1e-9 * w.max(1e-9), "{got:?} vs {coef:?}");
        }
        assert!(sse < 1e-12);
    }

    #[test]
    fn a_negative_best_fit_is_replaced_by_a_non_negative_subset() {
        // y falls with x: the unconstrained slope is negative, so the constant alone wins.
        let rows = [([1.0, 1.0], 3.0), ([2.0, 1.0], 2.0), ([3.0, 1.0], 1.0)];
        let (coef, _) = fit_relative(&rows).unwrap();
        assert_eq!(coef[0], 0.0);
        assert!(coef[1] > 0.0);
    }

    #[test]
    fn no_rows_no_fit() {
        assert!(fit_relative::<3>(&[]).is_none());
    }
}
