//! Causal attention of each query token over its own sequence's paged KV cache.
use rayon::prelude::*;
use wide::f32x8;

use super::{dot, hsum, load8};

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
    assert_eq!(q.len(), queries.len() * shape.heads * shape.head_dim);
    assert_eq!(out.len(), q.len());
    // One task per query row and head: a single decode row still spreads its heads over the pool.
    let hd = shape.head_dim;
    out.par_chunks_mut(hd)
        .zip(q.par_chunks(hd))
        .enumerate()
        .for_each_init(Vec::new, |scores, (i, (oh, qh))| {
            let ctx = &queries[i / shape.heads];
            attend_head(
                shape,
                i % shape.heads,
                qh,
                ctx,
                k_cache,
                v_cache,
                scores,
                oh,
            )
        });
}

/// Query head `h` of one query row (`qh`, `head_dim` values) into `oh`.
#[allow(clippy::too_many_arguments)]
fn attend_head(
    shape: &AttentionShape,
    h: usize,
    qh: &[f32],
    ctx: &QueryCtx<'_>,
    k_cache: &[f32],
    v_cache: &[f32],
    scores: &mut Vec<f32>,
    oh: &mut [f32],
) {
    let hd = shape.head_dim;
    let group = shape.heads / shape.kv_heads;
    let slot_w = shape.slot_width();
    let scale = 1.0 / (hd as f32).sqrt();
    scores.resize(ctx.n_ctx, 0.0);
    let kvh = h / group;
    let at = |p: usize| {
        let slot = ctx.block_table[p / shape.block_size] as usize * shape.block_size
            + p % shape.block_size;
        slot * slot_w + kvh * hd
    };
    if hd == 64 {
        scores_fixed::<8>(
            qh,
            ctx,
            shape.block_size,
            slot_w,
            kvh,
            k_cache,
            scale,
            scores,
        );
    } else if hd == 128 {
        scores_fixed::<16>(
            qh,
            ctx,
            shape.block_size,
            slot_w,
            kvh,
            k_cache,
            scale,
            scores,
        );
    } else if hd.is_multiple_of(8) {
        // Four positions at a time: four independent FMA chains instead of one, each the
        // canonical `dot` of its position (the tail is empty), so the values do not change.
        let done = scores.len() / 4 * 4;
        let mut chunks = scores.chunks_exact_mut(4);
        for (c, s4) in (&mut chunks).enumerate() {
            let base: [usize; 4] = std::array::from_fn(|i| at(4 * c + i));
            let mut acc = [f32x8::ZERO; 4];
            for k in (0..hd).step_by(8) {
                let qv = load8(&qh[k..]);
                for (a, b) in acc.iter_mut().zip(base) {
                    *a = qv.mul_add(load8(&k_cache[b + k..]), *a);
                }
            }
            for (s, a) in s4.iter_mut().zip(acc) {
                *s = hsum(a) * scale;
            }
        }
        for (p, s) in scores.iter_mut().enumerate().skip(done) {
            let base = at(p);
            *s = dot(qh, &k_cache[base..base + hd]) * scale;
        }
    } else {
        for (p, s) in scores.iter_mut().enumerate() {
            let base = at(p);
            *s = dot(qh, &k_cache[base..base + hd]) * scale;
        }
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    if hd == 64 {
        // The common head size with its accumulators in registers (same operations as below).
        weigh_values::<8>(scores, ctx, shape.block_size, slot_w, kvh, v_cache, oh);
    } else if hd == 128 {
        weigh_values::<16>(scores, ctx, shape.block_size, slot_w, kvh, v_cache, oh);
    } else if hd.is_multiple_of(8) && hd <= 256 {
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

/// The offsets of K/V head `kvh` at positions `0..n` of a sequence, in order, walking its block
/// table (no division per position).
fn head_offsets<'a>(
    ctx: &QueryCtx<'a>,
    block_size: usize,
    slot_w: usize,
    kvh: usize,
    head_dim: usize,
) -> impl Iterator<Item = usize> + 'a {
    ctx.block_table
        .iter()
        .flat_map(move |&b| {
            let first = b as usize * block_size;
            (first..first + block_size).map(move |slot| slot * slot_w + kvh * head_dim)
        })
        .take(ctx.n_ctx)
}

/// Scores of one query head of `8 · L` values over its context: the query held in registers,
/// four positions at a time, each score the canonical `dot` of its position times `scale` (a
/// chain of FMAs over the head's eight-lane chunks in order, then `hsum`), as the general path.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn scores_fixed<const L: usize>(
    qh: &[f32],
    ctx: &QueryCtx<'_>,
    block_size: usize,
    slot_w: usize,
    kvh: usize,
    k_cache: &[f32],
    scale: f32,
    scores: &mut [f32],
) {
    let q: [f32x8; L] = std::array::from_fn(|l| load8(&qh[l * 8..]));
    let chunks = |b: usize| k_cache[b..b + 8 * L].as_chunks::<8>().0;
    let mut offsets = head_offsets(ctx, block_size, slot_w, kvh, 8 * L);
    let mut four = scores.chunks_exact_mut(4);
    for s4 in &mut four {
        let k: [&[[f32; 8]]; 4] = std::array::from_fn(|_| {
            chunks(offsets.next().expect("the block table covers the context"))
        });
        let mut acc = [f32x8::ZERO; 4];
        for (l, ql) in q.iter().enumerate() {
            for (a, ki) in acc.iter_mut().zip(k) {
                *a = ql.mul_add(f32x8::new(ki[l]), *a);
            }
        }
        for (s, a) in s4.iter_mut().zip(acc) {
            *s = hsum(a) * scale;
        }
    }
    for (s, b) in four.into_remainder().iter_mut().zip(offsets) {
        let k = chunks(b);
        let mut a = f32x8::ZERO;
        for (ql, kl) in q.iter().zip(k) {
            a = ql.mul_add(f32x8::new(*kl), a);
        }
        *s = hsum(a) * scale;
    }
}

/// `out = Σ_p e[p] · v[p]` for a head of `8 · L` values, accumulated position by position.
#[inline(always)]
fn weigh_values<const L: usize>(
    e: &[f32],
    ctx: &QueryCtx<'_>,
    block_size: usize,
    slot_w: usize,
    kvh: usize,
    v_cache: &[f32],
    out: &mut [f32],
) {
    let mut acc = [f32x8::ZERO; L];
    for (&w, b) in e
        .iter()
        .zip(head_offsets(ctx, block_size, slot_w, kvh, 8 * L))
    {
        let v = v_cache[b..b + 8 * L].as_chunks::<8>().0;
        let ev = f32x8::splat(w);
        for (a, vl) in acc.iter_mut().zip(v) {
            *a = ev.mul_add(f32x8::new(*vl), *a);
        }
    }
    for (l, a) in acc.iter().enumerate() {
        out[l * 8..l * 8 + 8].copy_from_slice(&a.to_array());
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Tensor};

    use super::*;

    /// Plain causal attention with candle ops over contiguous K and V, GQA by repeating KV heads.
    fn plain(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        s: &AttentionShape,
    ) -> candle_core::Result<Vec<f32>> {
        let dev = Device::Cpu;
        let (h, kvh, hd) = (s.heads, s.kv_heads, s.head_dim);
        let q = Tensor::from_slice(q, (n, h, hd), &dev)?
            .transpose(0, 1)?
            .contiguous()?;
        let rep = |t: &[f32]| -> candle_core::Result<Tensor> {
            let t = Tensor::from_slice(t, (n, kvh, 1, hd), &dev)?;
            t.broadcast_as((n, kvh, h / kvh, hd))?
                .reshape((n, h, hd))?
                .transpose(0, 1)?
                .contiguous()
        };
        let (k, v) = (rep(k)?, rep(v)?);
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let mask: Vec<f32> = (0..n * n)
            .map(|i| {
                if i % n > i / n {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let scores = scores.broadcast_add(&Tensor::from_slice(&mask, (n, n), &dev)?)?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        p.matmul(&v)?
            .transpose(0, 1)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()
    }

    /// `len` values in [-2, 2) from a linear congruential generator.
    fn random_values(len: usize, seed: &mut u64) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    #[test]
    fn fixed_head_sizes_compute_as_the_general_path_bit_for_bit() {
        for l in [8usize, 16] {
            let hd = 8 * l;
            let (bs, slot_w, kvh) = (4, 3 * hd, 2);
            let mut seed = 3u64;
            let mut rnd = |len: usize| random_values(len, &mut seed);
            let table: Vec<u32> = vec![5, 1, 8, 0, 3, 7, 2, 6, 4, 9];
            let (kc, vc, q) = (rnd(10 * bs * slot_w), rnd(10 * bs * slot_w), rnd(hd));
            for n in 1..=37 {
                let ctx = QueryCtx {
                    block_table: &table,
                    n_ctx: n,
                };
                let at = |p: usize| (table[p / bs] as usize * bs + p % bs) * slot_w + kvh * hd;
                let mut got = vec![0f32; n];
                if l == 8 {
                    scores_fixed::<8>(&q, &ctx, bs, slot_w, kvh, &kc, 0.125, &mut got);
                } else {
                    scores_fixed::<16>(&q, &ctx, bs, slot_w, kvh, &kc, 0.125, &mut got);
                }
                let want: Vec<f32> = (0..n)
                    .map(|p| dot(&q, &kc[at(p)..at(p) + hd]) * 0.125)
                    .collect();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "scores, head_dim {hd}, {n} positions"
                );
                let mut out = vec![0f32; hd];
                if l == 8 {
                    weigh_values::<8>(&want, &ctx, bs, slot_w, kvh, &vc, &mut out);
                } else {
                    weigh_values::<16>(&want, &ctx, bs, slot_w, kvh, &vc, &mut out);
                }
                let mut acc = vec![f32x8::ZERO; l];
                for (p, &e) in want.iter().enumerate() {
                    for (j, a) in acc.iter_mut().enumerate() {
                        *a = f32x8::splat(e).mul_add(load8(&vc[at(p) + 8 * j..]), *a);
                    }
                }
                let general: Vec<f32> = acc.iter().flat_map(|a| a.to_array()).collect();
                assert_eq!(
                    bits(&out),
                    bits(&general),
                    "values, head_dim {hd}, {n} positions"
                );
            }
        }
    }

    #[test]
    fn paged_attention_equals_plain_attention() {
        // 16 takes the general path, 64 and 128 the register-tile ones, 12 the scalar one; 23
        // queries see 1 to 23 positions, so every remainder of the four-position score chunks.
        for head_dim in [16, 64, 128, 12] {
            paged_equals_plain(head_dim);
        }
    }

    fn paged_equals_plain(head_dim: usize) {
        let s = AttentionShape {
            heads: 6,
            kv_heads: 2,
            head_dim,
            block_size: 4,
        };
        let n = 23;
        let mut seed = 99u64;
        let mut rnd = |len: usize| random_values(len, &mut seed);
        let (q, k, v) = (
            rnd(n * s.heads * s.head_dim),
            rnd(n * s.slot_width()),
            rnd(n * s.slot_width()),
        );
        // Scatter K and V into a pool of 10 blocks through a shuffled block table.
        let table: Vec<u32> = vec![7, 2, 9, 0, 5, 3];
        let blocks = 10;
        let mut kc = vec![0f32; blocks * s.block_size * s.slot_width()];
        let mut vc = kc.clone();
        let w = s.slot_width();
        for p in 0..n {
            let slot = table[p / s.block_size] as usize * s.block_size + p % s.block_size;
            kc[slot * w..(slot + 1) * w].copy_from_slice(&k[p * w..(p + 1) * w]);
            vc[slot * w..(slot + 1) * w].copy_from_slice(&v[p * w..(p + 1) * w]);
        }
        let queries: Vec<QueryCtx<'_>> = (0..n)
            .map(|p| QueryCtx {
                block_table: &table,
                n_ctx: p + 1,
            })
            .collect();
        let mut out = vec![0f32; q.len()];
        paged_attention(&s, &q, &queries, &kc, &vc, &mut out);
        let want = plain(&q, &k, &v, n, &s).expect("candle attention");
        let err = out
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-4, "head_dim {head_dim}: max error {err}");
    }
}
