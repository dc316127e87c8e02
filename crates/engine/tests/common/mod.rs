//! A plain f64 Llama forward pass over the whole sequence, with no cache: the reference the paged,
//! fixed-order f32 engine is checked against. With `round_from: Some(p)`, at positions from `p` on
//! (the generated tokens) the input of every linear layer but the output head is first rounded to
//! 16-bit blocks of 32 (scale max|x|/32767, ties to even), as the engine rounds a generated token's
//! activations against quantized weights; the rest stays exact.
#![allow(dead_code)]
use tandem_engine::ModelConfig;
use tandem_engine::tiny::TinyWeights;

/// `x` rounded to 16-bit blocks of 32, as values.
fn round_q16(x: &[f64]) -> Vec<f64> {
    x.chunks(32)
        .flat_map(|b| {
            let d = b.iter().fold(0f64, |a, v| a.max(v.abs())) / 32767.0;
            b.iter().map(move |v| {
                if d > 0.0 {
                    (v / d).round_ties_even() * d
                } else {
                    0.0
                }
            })
        })
        .collect()
}

fn matvec_q(w: &[f32], n: usize, k: usize, x: &[f64], round: bool) -> Vec<f64> {
    if round {
        matvec(w, n, k, &round_q16(x))
    } else {
        matvec(w, n, k, x)
    }
}

fn matvec(w: &[f32], n: usize, k: usize, x: &[f64]) -> Vec<f64> {
    (0..n)
        .map(|r| (0..k).map(|i| w[r * k + i] as f64 * x[i]).sum())
        .collect()
}

fn rms(x: &[f64], w: &[f32], eps: f32) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let s = 1.0 / (ms + eps as f64).sqrt();
    x.iter().zip(w).map(|(v, w)| v * s * *w as f64).collect()
}

fn rope(v: &mut [f64], hd: usize, pos: usize, base: f32, interleaved: bool) {
    for head in v.chunks_mut(hd) {
        for i in 0..hd / 2 {
            let theta = pos as f64 / (base as f64).powf(2.0 * i as f64 / hd as f64);
            let (a, b) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + hd / 2)
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * theta.cos() - x1 * theta.sin();
            head[b] = x0 * theta.sin() + x1 * theta.cos();
        }
    }
}

/// Logits at every position of `tokens`.
pub fn reference_logits(
    c: &ModelConfig,
    w: &TinyWeights,
    tokens: &[u32],
    round_from: Option<usize>,
) -> Vec<Vec<f64>> {
    let rounds = |p: usize| round_from.is_some_and(|f| p >= f);
    let (h, hd) = (c.hidden, c.head_dim);
    let mut xs: Vec<Vec<f64>> = tokens
        .iter()
        .map(|t| {
            w.embed[*t as usize * h..(*t as usize + 1) * h]
                .iter()
                .map(|v| *v as f64)
                .collect()
        })
        .collect();
    for l in &w.layers {
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (p, x) in xs.iter().enumerate() {
            let n = rms(x, &l.attn_norm, c.rms_eps);
            let mut q = matvec_q(&l.wq, c.q_width(), h, &n, rounds(p));
            let mut k = matvec_q(&l.wk, c.kv_width(), h, &n, rounds(p));
            rope(&mut q, hd, p, c.rope_base, c.rope_interleaved);
            rope(&mut k, hd, p, c.rope_base, c.rope_interleaved);
            qs.push(q);
            ks.push(k);
            vs.push(matvec_q(&l.wv, c.kv_width(), h, &n, rounds(p)));
        }
        let group = c.heads / c.kv_heads;
        for (p, x) in xs.iter_mut().enumerate() {
            let mut att = vec![0f64; c.q_width()];
            for head in 0..c.heads {
                let kvh = head / group;
                let q = &qs[p][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=p)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j][kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (j, ej) in e.iter().enumerate() {
                    for d in 0..hd {
                        att[head * hd + d] += ej / z * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = matvec_q(&l.wo, h, c.q_width(), &att, rounds(p));
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
            let n = rms(x, &l.ffn_norm, c.rms_eps);
            let g = matvec_q(&l.w_gate, c.ffn, h, &n, rounds(p));
            let u = matvec_q(&l.w_up, c.ffn, h, &n, rounds(p));
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = matvec_q(&l.w_down, h, c.ffn, &act, rounds(p));
            for (a, b) in x.iter_mut().zip(&d) {
                *a += b;
            }
        }
    }
    xs.iter()
        .map(|x| matvec(&w.embed, c.vocab, h, &rms(x, &w.norm, c.rms_eps)))
        .collect()
}
