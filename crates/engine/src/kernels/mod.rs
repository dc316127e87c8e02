//! CPU kernels with one fixed arithmetic order per output element.
//!
//! Every value the model computes for a token depends only on that token's inputs, never on which
//! other rows share the batch, where a chunk boundary falls, or how work is split across threads.
//! A dot product with f32 weights is always one 8-lane FMA accumulator over `k` in steps of 8, a fixed
//! horizontal sum, then the scalar tail in order; with quantized weights, the row is first rounded to
//! 16-bit blocks on its own and the block products are exact integers summed in one order ([`q16`]). So a prompt prefilled in one chunk or ten, a sequence decoded alone
//! or beside 31 others, and a KV cache computed in another process all give bit-identical results:
//! the equivalence tests of a disaggregated run against a single process are exact, not approximate.

mod attention;
mod fused;
mod matmul;
mod ops;
mod q16;
mod quant;

pub use attention::{AttentionShape, QueryCtx, paged_attention};
pub use matmul::{Matrix, Weight, WeightData, matmul, matmul_rounded};
pub use ops::{add_in_place, rms_norm, rope_in_place, silu_mul};
pub use quant::{BlockFormat, dequantize_row};

use wide::f32x8;

/// Loads 8 consecutive floats; the slice must hold at least 8.
#[inline(always)]
pub(crate) fn load8(s: &[f32]) -> f32x8 {
    let mut a = [0f32; 8];
    a.copy_from_slice(&s[..8]);
    f32x8::new(a)
}

/// The one horizontal sum every kernel uses, so every reduction rounds the same way.
#[inline(always)]
pub(crate) fn hsum(v: f32x8) -> f32 {
    let a = v.to_array();
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// The canonical dot product: all kernels must produce exactly this value for each element.
#[inline(always)]
pub fn dot(x: &[f32], w: &[f32]) -> f32 {
    debug_assert_eq!(x.len(), w.len());
    let k8 = x.len() / 8 * 8;
    let mut acc = f32x8::ZERO;
    let mut k = 0;
    while k < k8 {
        acc = load8(&x[k..]).mul_add(load8(&w[k..]), acc);
        k += 8;
    }
    finish(acc, &x[k8..], &w[k8..])
}

#[inline(always)]
pub(crate) fn finish(acc: f32x8, x_tail: &[f32], w_tail: &[f32]) -> f32 {
    let mut s = hsum(acc);
    for (a, b) in x_tail.iter().zip(w_tail) {
        s = a.mul_add(*b, s);
    }
    s
}
