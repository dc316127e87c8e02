//! `out = x · Wᵀ` for activations `x` (m × k, row-major) and a weight `W` (n × k, row-major, as GGUF
//! and PyTorch store linear layers), with each element computed exactly as [`super::dot`] does.
use std::ops::Range;

use rayon::prelude::*;
use wide::f32x8;

use super::finish;
use super::q16::{self, Q16Rows};
use super::quant::{BlockFormat, QK};

/// Weight rows in their stored form: f32, or a GGUF block format dequantized on the fly.
#[derive(Debug, Clone)]
pub enum WeightData {
    F32(Vec<f32>),
    Quant { format: BlockFormat, bytes: Vec<u8> },
}

/// A linear layer's weight: `n` output rows of `k` inputs each.
#[derive(Debug, Clone)]
pub struct Weight {
    pub n: usize,
    pub k: usize,
    pub data: WeightData,
}

/// A row-major activation matrix.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }
}

impl Weight {
    pub fn f32(n: usize, k: usize, data: Vec<f32>) -> Self {
        debug_assert_eq!(data.len(), n * k);
        Weight {
            n,
            k,
            data: WeightData::F32(data),
        }
    }

    /// Concatenates weights with the same input width and storage into one (rows stacked), so
    /// q/k/v or gate/up run as a single matmul.
    pub fn stack(parts: &[Weight]) -> Option<Weight> {
        let first = parts.first()?;
        let k = first.k;
        let n = parts.iter().map(|p| p.n).sum();
        match &first.data {
            WeightData::F32(_) => {
                let mut data = Vec::with_capacity(n * k);
                for p in parts {
                    match &p.data {
                        WeightData::F32(d) if p.k == k => data.extend_from_slice(d),
                        _ => return None,
                    }
                }
                Some(Weight {
                    n,
                    k,
                    data: WeightData::F32(data),
                })
            }
            WeightData::Quant { format, .. } => {
                let mut bytes = Vec::new();
                for p in parts {
                    match &p.data {
                        WeightData::Quant {
                            format: f,
                            bytes: b,
                        } if f == format && p.k == k => bytes.extend_from_slice(b),
                        _ => return None,
                    }
                }
                Some(Weight {
                    n,
                    k,
                    data: WeightData::Quant {
                        format: *format,
                        bytes,
                    },
                })
            }
        }
    }

    /// Converts to f32 storage (the form every format computes in).
    pub fn to_f32(&self) -> Weight {
        let mut out = vec![0f32; self.n * self.k];
        for (r, dst) in out.chunks_exact_mut(self.k).enumerate() {
            dst.copy_from_slice(self.row_f32(r, &mut Vec::new()));
        }
        Weight::f32(self.n, self.k, out)
    }

    /// Row `r` as f32: borrowed when stored so, else dequantized into `scratch`.
    pub fn row_f32<'a>(&'a self, r: usize, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        match &self.data {
            WeightData::F32(d) => &d[r * self.k..(r + 1) * self.k],
            WeightData::Quant { format, bytes } => {
                let rb = format.row_bytes(self.k);
                scratch.resize(self.k, 0.0);
                super::fused::dequantize_into(*format, &bytes[r * rb..(r + 1) * rb], scratch);
                scratch
            }
        }
    }

    /// The values, when stored as f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            WeightData::F32(d) => Some(d),
            WeightData::Quant { .. } => None,
        }
    }

    /// Bytes the weight occupies in memory.
    pub fn bytes(&self) -> usize {
        match &self.data {
            WeightData::F32(d) => d.len() * 4,
            WeightData::Quant { bytes, .. } => bytes.len(),
        }
    }
}

const MR: usize = 3;
const NR: usize = 4;
/// Below this many rows the work is split by columns (decode); above, by rows (prefill).
const ROW_SPLIT_MIN: usize = 64;

/// `out[m × n] = x[m × k] · Wᵀ`, every element exactly as [`super::dot`] computes it (quantized
/// weights take their dequantized values).
pub fn matmul(x: &[f32], m: usize, w: &Weight, out: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "matmul: x is not m × k");
    assert_eq!(out.len(), m * n, "matmul: out is not m × n");
    split(m, n, out, |rows, cols, o| {
        block(&x[rows.start * k..rows.end * k], rows.len(), w, cols, o)
    });
}

/// Computes columns `cols` of `x · Wᵀ` for `m` rows into `out` (one segment per row, column 0 =
/// cols.start).
fn block(x: &[f32], m: usize, w: &Weight, cols: Range<usize>, out: &mut [&mut [f32]]) {
    let k = w.k;
    if let WeightData::Quant { format, bytes } = &w.data
        && m < ROW_SPLIT_MIN
        && k.is_multiple_of(QK)
    {
        // Few rows: dequantize in registers rather than into a panel that few rows would share.
        let rb = format.row_bytes(k);
        let wrows = &bytes[cols.start * rb..cols.end * rb];
        super::fused::quant_block(*format, wrows, rb, &x[..m * k], k, out);
        return;
    }
    let mut scratch: Vec<Vec<f32>> = vec![Vec::new(); NR];
    let mut c = cols.start;
    while c < cols.end {
        let nr = (cols.end - c).min(NR);
        let mut wrows: [&[f32]; NR] = [&[]; NR];
        for (j, (slot, s)) in wrows
            .iter_mut()
            .zip(scratch.iter_mut())
            .enumerate()
            .take(nr)
        {
            *slot = w.row_f32(c + j, s);
        }
        let oc = c - cols.start;
        let mut r = 0;
        while r + MR <= m && nr == NR {
            let xr: [&[f32]; MR] = std::array::from_fn(|i| &x[(r + i) * k..(r + i + 1) * k]);
            let t = tile::<MR, NR>(xr, wrows);
            for i in 0..MR {
                out[r + i][oc..oc + NR].copy_from_slice(&t[i]);
            }
            r += MR;
        }
        while r < m {
            let xr = &x[r * k..(r + 1) * k];
            if nr == NR {
                let t = tile::<1, NR>([xr], wrows);
                out[r][oc..oc + NR].copy_from_slice(&t[0]);
            } else {
                for j in 0..nr {
                    out[r][oc + j] = super::dot(xr, wrows[j]);
                }
            }
            r += 1;
        }
        c += nr;
    }
}

/// `out[m × n] = x[m × k] · Wᵀ` with the rows of `x` rounded to 16-bit blocks first where the
/// weight is quantized (`k` a multiple of 32), as [`super::q16`] defines: integer products, about
/// twice as fast for a few rows as dequantizing in registers. f32 weights compute as [`matmul`].
/// Either way an element depends only on its own activation row and weight row.
pub fn matmul_rounded(x: &[f32], m: usize, w: &Weight, out: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    let WeightData::Quant { format, bytes } = &w.data else {
        return matmul(x, m, w, out);
    };
    if !k.is_multiple_of(QK) {
        return matmul(x, m, w, out);
    }
    assert_eq!(x.len(), m * k, "matmul: x is not m × k");
    assert_eq!(out.len(), m * n, "matmul: out is not m × n");
    let xq = Q16Rows::quantize(x, k);
    let rb = format.row_bytes(k);
    split(m, n, out, |rows, cols, o| {
        let wrows = &bytes[cols.start * rb..cols.end * rb];
        q16::rows_times_weights(*format, wrows, rb, &xq, rows, o)
    });
}

/// Shares an m × n product among the threads: above `ROW_SPLIT_MIN` rows, one task per thread
/// takes a run of rows and every column (prefill: each weight row read once per task); below, each
/// task takes a run of columns and every row (decode: the weights are split, not re-read).
/// `f(rows, cols, out)` computes that part into `out`: one slice per row, cut from the output
/// itself and starting at the part's first column, so every task writes in place.
fn split(
    m: usize,
    n: usize,
    out: &mut [f32],
    f: impl Fn(Range<usize>, Range<usize>, &mut [&mut [f32]]) + Sync,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    if m >= ROW_SPLIT_MIN {
        let rows_per_task = m.div_ceil(threads).next_multiple_of(MR).min(192);
        out.par_chunks_mut(rows_per_task * n)
            .enumerate()
            .for_each(|(t, o)| {
                let r0 = t * rows_per_task;
                let mut rows: Vec<&mut [f32]> = o.chunks_mut(n).collect();
                f(r0..r0 + rows.len(), 0..n, &mut rows)
            });
    } else {
        let cols_per_task = n.div_ceil(threads * 4).next_multiple_of(NR).max(NR * 4);
        let mut parts: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(cols_per_task))
            .map(|_| Vec::with_capacity(m))
            .collect();
        for row in out.chunks_mut(n) {
            for (part, segment) in parts.iter_mut().zip(row.chunks_mut(cols_per_task)) {
                part.push(segment);
            }
        }
        parts.into_par_iter().enumerate().for_each(|(t, mut rows)| {
            let c0 = t * cols_per_task;
            let width = rows.first().map_or(0, |r| r.len());
            f(0..m, c0..c0 + width, &mut rows)
        });
    }
}

/// An MR × NR register tile of canonical dot products.
#[inline(always)]
fn tile<const R: usize, const C: usize>(xr: [&[f32]; R], wr: [&[f32]; C]) -> [[f32; C]; R] {
    let k = xr[0].len();
    let k8 = k / 8;
    let xs: [&[[f32; 8]]; R] = std::array::from_fn(|i| &xr[i].as_chunks::<8>().0[..k8]);
    let ws: [&[[f32; 8]]; C] = std::array::from_fn(|j| &wr[j].as_chunks::<8>().0[..k8]);
    let mut acc = [[f32x8::ZERO; C]; R];
    for p in 0..k8 {
        let xv: [f32x8; R] = std::array::from_fn(|i| f32x8::new(xs[i][p]));
        for j in 0..C {
            let wv = f32x8::new(ws[j][p]);
            for i in 0..R {
                acc[i][j] = xv[i].mul_add(wv, acc[i][j]);
            }
        }
    }
    // No closure may capture `acc`: taking its address keeps a copy in memory, stored at every FMA.
    let mut out = [[0f32; C]; R];
    for i in 0..R {
        for j in 0..C {
            out[i][j] = finish(acc[i][j], &xr[i][k8 * 8..], &wr[j][k8 * 8..]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n).map(|_| lcg(seed)).collect()
    }

    #[test]
    fn every_row_equals_the_canonical_dot_whatever_the_batch() {
        let mut seed = 7;
        for &(n, k) in &[(13, 37), (64, 96), (5, 8)] {
            let w = Weight::f32(n, k, rand_vec(n * k, &mut seed));
            for m in [1, 2, 4, 7, 30, 61] {
                let x = rand_vec(m * k, &mut seed);
                let mut out = vec![0f32; m * n];
                matmul(&x, m, &w, &mut out);
                for r in 0..m {
                    for c in 0..n {
                        let want = crate::kernels::dot(
                            &x[r * k..(r + 1) * k],
                            w.row_f32(c, &mut Vec::new()),
                        );
                        assert_eq!(
                            out[r * n + c].to_bits(),
                            want.to_bits(),
                            "m={m} r={r} c={c}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_matches_f64_reference() {
        let mut seed = 11;
        let (m, n, k) = (9, 17, 64);
        let w = Weight::f32(n, k, rand_vec(n * k, &mut seed));
        let x = rand_vec(m * k, &mut seed);
        let mut out = vec![0f32; m * n];
        matmul(&x, m, &w, &mut out);
        let WeightData::F32(wd) = &w.data else {
            unreachable!()
        };
        for r in 0..m {
            for c in 0..n {
                let want: f64 = (0..k)
                    .map(|i| x[r * k + i] as f64 * wd[c * k + i] as f64)
                    .sum();
                assert!((out[r * n + c] as f64 - want).abs() < 1e-5);
            }
        }
    }

    /// A Q4_1 weight of random nibbles under one scale and offset.
    fn q4_1_weight(n: usize, k: usize, seed: &mut u64) -> Weight {
        let mut bytes = Vec::new();
        for _ in 0..n * k / QK {
            bytes.extend_from_slice(&half::f16::from_f32(0.01).to_le_bytes());
            bytes.extend_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
            bytes.extend((0..16).map(|_| ((lcg(seed) + 0.5) * 255.0) as u8));
        }
        Weight {
            n,
            k,
            data: WeightData::Quant {
                format: BlockFormat::Q4_1,
                bytes,
            },
        }
    }

    #[test]
    fn rounded_rows_give_the_same_value_whatever_the_batch_and_split() {
        let mut seed = 3;
        let (n, k) = (70, 64);
        let q = q4_1_weight(n, k, &mut seed);
        let f = q.to_f32();
        // 70 rows go through the row split, each alone through the column split.
        let m = 70;
        let x = rand_vec(m * k, &mut seed);
        let mut all = vec![0f32; m * n];
        matmul_rounded(&x, m, &q, &mut all);
        let mut exact = vec![0f32; m * n];
        matmul(&x, m, &f, &mut exact);
        for r in 0..m {
            let mut one = vec![0f32; n];
            matmul_rounded(&x[r * k..(r + 1) * k], 1, &q, &mut one);
            assert_eq!(&all[r * n..(r + 1) * n], &one[..], "row {r}");
            // 16-bit activations stay within a rounding step of the f32 product.
            for c in 0..n {
                let (a, b) = (all[r * n + c], exact[r * n + c]);
                assert!((a - b).abs() < 1e-5, "row {r} col {c}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn quantized_rows_compute_as_their_dequantized_form() {
        let mut seed = 3;
        let (n, k) = (10, 64);
        let q = q4_1_weight(n, k, &mut seed);
        let f = q.to_f32();
        let x = rand_vec(5 * k, &mut seed);
        let (mut a, mut b) = (vec![0f32; 5 * n], vec![0f32; 5 * n]);
        matmul(&x, 5, &q, &mut a);
        matmul(&x, 5, &f, &mut b);
        assert_eq!(a, b);
    }
}
