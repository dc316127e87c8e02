//! The Llama-family model and its forward pass over the paged KV cache.
mod config;
mod gguf;
mod kind;
mod safetensors;
mod sim;

pub use config::{HfConfig, ModelConfig, RopeTable};
pub use gguf::{GgufFile, stack_weights};
pub use kind::Model;
pub use safetensors::load_safetensors;
pub use sim::{SIM_HEAD_DIM, SimConfig, SimModel, StepClock, ZeroClock};

use crate::kernels::{
    AttentionShape, Matrix, QueryCtx, Weight, add_in_place, matmul, matmul_rounded,
    paged_attention, rms_norm, rope_in_place, silu_mul,
};
use crate::kv::KvPool;
use crate::{EngineError, Result};

#[derive(Debug, Clone)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    /// q, k and v projections stacked: `(heads + 2 * kv_heads) * head_dim` rows.
    pub wqkv: Weight,
    pub wo: Weight,
    pub ffn_norm: Vec<f32>,
    /// gate then up projections stacked: `2 * ffn` rows.
    pub w_gate_up: Weight,
    pub w_down: Weight,
}

/// The real model: weights and the CPU forward pass ([`Model`] wraps it or a [`SimModel`]).
#[derive(Debug, Clone)]
struct Native {
    cfg: ModelConfig,
    embed: Weight,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// None when the output projection is tied to the embedding.
    lm_head: Option<Weight>,
    rope: RopeTable,
}

/// A run of consecutive tokens of one sequence to push through the model in one step: a prefill
/// chunk (many tokens) or a decode step (one). Positions start at `start`; the block table must
/// cover `start + tokens.len()` positions.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    pub start: usize,
    pub block_table: &'a [u32],
    /// Return the logits of the chunk's last token.
    pub logits: bool,
    /// The tokens were generated (sampled from this sequence's logits), not given as its prompt:
    /// their quantized products take activations rounded to 16 bits ([`matmul_rounded`]), twice
    /// as fast for the few rows of a decode step. A prompt's tokens compute exactly. Either way
    /// every row's values depend only on that row, so batches and chunks change nothing.
    pub generated: bool,
}

impl Native {
    pub fn new(
        cfg: ModelConfig,
        embed: Weight,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        lm_head: Option<Weight>,
        rope: RopeTable,
    ) -> Result<Self> {
        cfg.validate()?;
        let bad = |what: &str| {
            Err(EngineError::Unsupported(format!(
                "{what} does not match the configuration"
            )))
        };
        if embed.n != cfg.vocab || embed.k != cfg.hidden {
            return bad("token embedding");
        }
        if lm_head
            .as_ref()
            .is_some_and(|w| w.n != cfg.vocab || w.k != cfg.hidden)
            || norm.len() != cfg.hidden
        {
            return bad("output layer");
        }
        if layers.len() != cfg.layers {
            return bad("layer count");
        }
        for l in &layers {
            let qkv = cfg.q_width() + 2 * cfg.kv_width();
            if l.wqkv.n != qkv
                || l.wqkv.k != cfg.hidden
                || l.wo.n != cfg.hidden
                || l.wo.k != cfg.q_width()
                || l.w_gate_up.n != 2 * cfg.ffn
                || l.w_gate_up.k != cfg.hidden
                || l.w_down.n != cfg.hidden
                || l.w_down.k != cfg.ffn
                || l.attn_norm.len() != cfg.hidden
                || l.ffn_norm.len() != cfg.hidden
            {
                return bad("a layer's weights");
            }
        }
        Ok(Native {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| l.wqkv.bytes() + l.wo.bytes() + l.w_gate_up.bytes() + l.w_down.bytes())
            .sum();
        l + self.embed.bytes() + self.lm_head.as_ref().map_or(0, Weight::bytes)
    }

    pub fn attention_shape(&self, block_size: usize) -> AttentionShape {
        AttentionShape {
            heads: self.cfg.heads,
            kv_heads: self.cfg.kv_heads,
            head_dim: self.cfg.head_dim,
            block_size,
        }
    }

    /// Every id must be inside the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.cfg.vocab;
        match tokens.iter().find(|t| **t as usize >= vocab) {
            Some(t) => Err(EngineError::InvalidRequest(format!(
                "token id {t} is outside the vocabulary of {vocab}"
            ))),
            None => Ok(()),
        }
    }

    fn check(&self, chunks: &[SeqChunk<'_>], pool: &KvPool) -> Result<()> {
        let g = pool.geometry();
        if g.layers != self.cfg.layers
            || g.kv_heads != self.cfg.kv_heads
            || g.head_dim != self.cfg.head_dim
        {
            return Err(EngineError::InvalidRequest(
                "KV pool geometry does not match the model".into(),
            ));
        }
        for c in chunks {
            let end = c.start + c.tokens.len();
            if end > self.rope.positions() {
                return Err(EngineError::InvalidRequest(format!(
                    "position {end} is past the model's context of {}",
                    self.rope.positions()
                )));
            }
            if end.div_ceil(g.block_size) > c.block_table.len() {
                return Err(EngineError::InvalidRequest(format!(
                    "block table too short for {end} positions"
                )));
            }
            self.check_tokens(c.tokens)?;
            if let Some(b) = c.block_table.iter().find(|b| **b as usize >= g.num_blocks) {
                return Err(EngineError::InvalidRequest(format!(
                    "block {b} is outside the pool"
                )));
            }
        }
        Ok(())
    }

    /// Runs `chunks` through the model: writes their K and V into `pool` at their positions, calls
    /// `on_layer(layer, pool)` as each layer's KV is complete (so a transfer can start while later
    /// layers compute), and returns the logits of every chunk that asked for them, in order.
    pub fn forward(
        &self,
        chunks: &[SeqChunk<'_>],
        pool: &mut KvPool,
        mut on_layer: impl FnMut(usize, &KvPool) -> Result<()>,
    ) -> Result<Vec<Vec<f32>>> {
        self.check(chunks, pool)?;
        let cfg = &self.cfg;
        let t_rows: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let (hd, qw, kvw) = (cfg.head_dim, cfg.q_width(), cfg.kv_width());
        let block_size = pool.geometry().block_size;
        let shape = self.attention_shape(block_size);

        // Per row: its position and what its query attends to.
        let mut positions = Vec::with_capacity(t_rows);
        let mut queries = Vec::with_capacity(t_rows);
        for c in chunks {
            for i in 0..c.tokens.len() {
                positions.push((c.start + i, c.block_table));
                queries.push(QueryCtx {
                    block_table: c.block_table,
                    n_ctx: c.start + i + 1,
                });
            }
        }

        let rounded: Vec<bool> = chunks
            .iter()
            .flat_map(|c| std::iter::repeat_n(c.generated, c.tokens.len()))
            .collect();
        let mut x = Matrix::zeros(t_rows, cfg.hidden);
        let mut scratch = Vec::new();
        for (r, tok) in chunks.iter().flat_map(|c| c.tokens.iter()).enumerate() {
            x.row_mut(r)
                .copy_from_slice(self.embed.row_f32(*tok as usize, &mut scratch));
        }
        let mut h = Matrix::zeros(t_rows, cfg.hidden);
        let mut qkv = Matrix::zeros(t_rows, qw + 2 * kvw);
        let mut q = Matrix::zeros(t_rows, qw);
        let mut attn = Matrix::zeros(t_rows, qw);
        let mut proj = Matrix::zeros(t_rows, cfg.hidden);
        let mut gu = Matrix::zeros(t_rows, 2 * cfg.ffn);
        let mut act = Matrix::zeros(t_rows, cfg.ffn);

        for (li, layer) in self.layers.iter().enumerate() {
            rms_norm(
                &x.data,
                cfg.hidden,
                &layer.attn_norm,
                cfg.rms_eps,
                &mut h.data,
            );
            linear(&h.data, &rounded, &layer.wqkv, &mut qkv.data);
            {
                let (kc, vc) = pool.layer_mut(li);
                for (r, &(pos, table)) in positions.iter().enumerate() {
                    let row = qkv.row_mut(r);
                    let (cos, sin) = self.rope.at(pos);
                    let (qr, kv) = row.split_at_mut(qw);
                    let (kr, vr) = kv.split_at_mut(kvw);
                    rope_in_place(qr, hd, cfg.rope_interleaved, cos, sin);
                    rope_in_place(kr, hd, cfg.rope_interleaved, cos, sin);
                    let slot = table[pos / block_size] as usize * block_size + pos % block_size;
                    kc[slot * kvw..(slot + 1) * kvw].copy_from_slice(kr);
                    vc[slot * kvw..(slot + 1) * kvw].copy_from_slice(vr);
                    q.row_mut(r).copy_from_slice(qr);
                }
            }
            {
                let (kc, vc) = pool.layer(li);
                paged_attention(&shape, &q.data, &queries, kc, vc, &mut attn.data);
            }
            linear(&attn.data, &rounded, &layer.wo, &mut proj.data);
            add_in_place(&mut x.data, &proj.data);
            rms_norm(
                &x.data,
                cfg.hidden,
                &layer.ffn_norm,
                cfg.rms_eps,
                &mut h.data,
            );
            linear(&h.data, &rounded, &layer.w_gate_up, &mut gu.data);
            silu_mul(&gu.data, cfg.ffn, &mut act.data);
            linear(&act.data, &rounded, &layer.w_down, &mut proj.data);
            add_in_place(&mut x.data, &proj.data);
            on_layer(li, pool)?;
        }

        let mut last_rows = Vec::new();
        let mut last_rounded = Vec::new();
        let mut end = 0;
        for c in chunks {
            end += c.tokens.len();
            if c.logits && !c.tokens.is_empty() {
                last_rows.push(end - 1);
                last_rounded.push(c.generated);
            }
        }
        let n = last_rows.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut last = Matrix::zeros(n, cfg.hidden);
        for (i, &r) in last_rows.iter().enumerate() {
            rms_norm(
                x.row(r),
                cfg.hidden,
                &self.norm,
                cfg.rms_eps,
                last.row_mut(i),
            );
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; n * cfg.vocab];
        linear(&last.data, &last_rounded, head, &mut logits);
        Ok(logits
            .chunks_exact(cfg.vocab)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// `out = x · Wᵀ` for rows that each say whether they compute rounded ([`SeqChunk::generated`]):
/// each run of rows alike is one matmul.
fn linear(x: &[f32], rounded: &[bool], w: &Weight, out: &mut [f32]) {
    let (k, n) = (w.k, w.n);
    let mut r = 0;
    while r < rounded.len() {
        let e = r + rounded[r..]
            .iter()
            .take_while(|v| **v == rounded[r])
            .count();
        let (xs, os) = (&x[r * k..e * k], &mut out[r * n..e * n]);
        if rounded[r] {
            matmul_rounded(xs, e - r, w, os);
        } else {
            matmul(xs, e - r, w, os);
        }
        r = e;
    }
}
