//! Causal attention of each query token over its own sequence's paged KV cache.
use rayon::prelude::*;
use wide::f32x8;

use super::{dot, load8};

/// Geometry of one layer's KV cache and of the query heads that read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
}

impl AttentionShape {
    /// Floats of one cache slot (one token position): all KV heads.
    pub fn slot_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// What one query row attends to: the first `n_ctx` positions of the sequence whose blocks are
/// `block_table` (position p lives in slot `block_table[p / block_size] * block_size + p % block_size`).
#[derive(Debug, Clone, Copy)]
pub struct QueryCtx<'a> {
    pub block_table: &'a [u32],
    pub n_ctx: usize,
}

/// `q` and `out` are `[queries.len()][heads * head_dim]`; `k_cache`/`v_cache` are one layer's
/// `[blocks][block_size][kv_heads][head_dim]`. Softmax scale is `1/sqrt(head_dim)`.
pub fn paged_attention(
    shape: &AttentionShape,
    q: &[f32],
    queries: &[QueryCtx<'_>],
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
) {
    let width = shape.heads * shape.head_dim;
    assert_eq!(q.len(), queries.len() * width);
    assert_eq!(out.len(), q.len());
    out.par_chunks_mut(width)
        .zip(q.par_chunks(width))
        .zip(queries.par_iter())
        .for_each_init(Vec::new, |scores, ((o, qr), ctx)| {
            attend_one(shape, qr, ctx, k_cache, v_cache, scores, o)
        });
}

fn attend_one(
    shape: &AttentionShape,
    q: &[f32],
    ctx: &QueryCtx<'_>,
    k_cache: &[f32],
    v_cache: &[f32],
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = shape.heads / shape.kv_heads;
    let slot_w = shape.slot_width();
    let scale = 1.0 / (hd as f32).sqrt();
    scores.resize(ctx.n_ctx, 0.0);
    for h in 0..shape.heads {
        let kvh = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        let at = |p: usize| {
            let slot = ctx.block_table[p / shape.block_size] as usize * shape.block_size + p % shape.block_size;
            slot * slot_w + kvh * hd
        };
        let mut max = f32::NEG_INFINITY;
        for (p, s) in scores.iter_mut().enumerate() {
            let base = at(p);
            *s = dot(qh, &k_cache[base..base + hd]) * scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let oh = &mut out[h * hd..(h + 1) * hd];
        if hd % 8 == 0 && hd <= 256 {
            let mut acc = [f32x8::ZERO; 32];
            let lanes = hd / 8;
            for (p, &e) in scores.iter().enumerate() {
                let base = at(p);
                let v = &v_cache[base..base + hd];
                let ev = f32x8::splat(e);
                for (l, a) in acc.iter_mut().enumerate().take(lanes) {
                    *a = ev.mul_add(load8(&v[l * 8..]), *a);
                }
            }
            for (l, a) in acc.iter().enumerate().take(lanes) {
                oh[l * 8..l * 8 + 8].copy_from_slice(&a.to_array());
            }
        } else {
            oh.fill(0.0);
            for (p, &e) in scores.iter().enumerate() {
                let base = at(p);
                for (o, v) in oh.iter_mut().zip(&v_cache[base..base + hd]) {
                    *o = e.mul_add(*v, *o);
                }
            }
        }
        for o in oh.iter_mut() {
            *o /= sum;
        }
    }
}
