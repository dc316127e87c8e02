//! Row-wise operations of the Llama block. Each row is computed on its own, in a fixed order.
use rayon::prelude::*;

use super::dot;

/// `out = x / sqrt(mean(x²) + eps) * weight`, row by row.
pub fn rms_norm(x: &[f32], width: usize, weight: &[f32], eps: f32, out: &mut [f32]) {
    for (xr, or) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let ss = dot(xr, xr);
        let scale = 1.0 / (ss / width as f32 + eps).sqrt();
        for ((o, v), w) in or.iter_mut().zip(xr).zip(weight) {
            *o = (v * scale) * w;
        }
    }
}

/// `x += y`.
pub fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// For rows laid out as `[gate (f) | up (f)]`, writes `silu(gate) * up` (f wide) per row.
/// Several rows are spread over the compute pool (an `exp` per element: at a batch of 16 decode
/// rows, on one thread, this was a tenth of the step while the other cores waited); each element
/// is the same expression wherever it runs.
pub fn silu_mul(gate_up: &[f32], f: usize, out: &mut [f32]) {
    let row = |(gu, o): (&[f32], &mut [f32])| {
        let (g, u) = gu.split_at(f);
        for ((o, g), u) in o.iter_mut().zip(g).zip(u) {
            *o = (g / (1.0 + (-g).exp())) * u;
        }
    };
    if f == 0 {
        return;
    }
    if out.len() < 2 * f {
        gate_up
            .chunks_exact(2 * f)
            .zip(out.chunks_exact_mut(f))
            .for_each(row);
    } else {
        gate_up
            .par_chunks_exact(2 * f)
            .zip(out.par_chunks_exact_mut(f))
            .for_each(row);
    }
}

/// Rotates `heads` heads of `head_dim` in `row` by the angles of one position.
/// `interleaved`: pairs are (2i, 2i+1), as GGUF Llama tensors are laid out; otherwise (i, i + d/2),
/// as Hugging Face checkpoints are. `cos`/`sin` hold `head_dim / 2` values for that position.
pub fn rope_in_place(
    row: &mut [f32],
    head_dim: usize,
    interleaved: bool,
    cos: &[f32],
    sin: &[f32],
) {
    let half = head_dim / 2;
    for head in row.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + half)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * cos[i] - x1 * sin[i];
            head[b] = x0 * sin[i] + x1 * cos[i];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_a_constant_row_is_the_weight() {
        let x = [2.0f32; 8];
        let w = [0.5f32, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0, 3.0];
        let mut out = [0f32; 8];
        rms_norm(&x, 8, &w, 0.0, &mut out);
        assert_eq!(out, w);
    }

    #[test]
    fn rope_styles_rotate_different_pairs() {
        let (cos, sin) = ([0.0f32, 1.0], [1.0f32, 0.0]);
        let mut a = [1.0f32, 2.0, 3.0, 4.0];
        rope_in_place(&mut a, 4, true, &cos, &sin);
        assert_eq!(a, [-2.0, 1.0, 3.0, 4.0]);
        let mut b = [1.0f32, 2.0, 3.0, 4.0];
        rope_in_place(&mut b, 4, false, &cos, &sin);
        assert_eq!(b, [-3.0, 2.0, 1.0, 4.0]);
    }

    #[test]
    fn silu_mul_of_many_rows_equals_each_row_alone() {
        let (f, rows) = (37, 9);
        let gate_up: Vec<f32> = (0..rows * 2 * f)
            .map(|i| ((i * 7919) % 1000) as f32 / 97.0 - 5.0)
            .collect();
        let mut together = vec![0f32; rows * f];
        silu_mul(&gate_up, f, &mut together);
        for r in 0..rows {
            let mut alone = vec![0f32; f];
            silu_mul(&gate_up[r * 2 * f..(r + 1) * 2 * f], f, &mut alone);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&together[r * f..(r + 1) * f]), bits(&alone), "row {r}");
        }
    }

    #[test]
    fn silu_mul_uses_gate_then_up() {
        let mut out = [0f32; 1];
        silu_mul(&[0.0, 5.0], 1, &mut out);
        assert_eq!(out, [0.0]);
        silu_mul(&[1.0, 2.0], 1, &mut out);
        assert!((out[0] - 2.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-7);
    }
}
