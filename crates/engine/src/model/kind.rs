//! [`Model`]: the native model or a simulated one behind one type, so that the engine, the workers
//! and the transports are the same code for both. The choice is made once per step (one match per
//! forward pass), never inside the native forward's loops.
use std::sync::Arc;

use super::sim::{SimConfig, SimModel, StepClock};
use super::{Layer, ModelConfig, Native, RopeTable, SeqChunk};
use crate::Result;
use crate::kernels::{AttentionShape, Weight};
use crate::kv::KvPool;
use crate::logits::Logits;

/// A model the engine runs: real weights, or compute replaced by a performance model's time.
#[derive(Debug, Clone)]
pub struct Model {
    inner: Inner,
}

#[derive(Debug, Clone)]
enum Inner {
    Native(Native),
    Sim(SimModel),
}

impl Model {
    /// A native model from its weights (checked against `cfg`).
    pub fn new(
        cfg: ModelConfig,
        embed: Weight,
        layers: Vec<Layer>,
        norm: Vec<f32>,
        lm_head: Option<Weight>,
        rope: RopeTable,
    ) -> Result<Self> {
        Native::new(cfg, embed, layers, norm, lm_head, rope).map(|n| Model {
            inner: Inner::Native(n),
        })
    }

    /// A simulated model whose steps take the time `clock` gives (see [`SimModel`]).
    pub fn simulated(sim: SimConfig, clock: Arc<dyn StepClock>) -> Result<Self> {
        SimModel::new(sim, clock).map(|s| Model {
            inner: Inner::Sim(s),
        })
    }

    /// The simulated model, when this is one.
    pub fn sim(&self) -> Option<&SimModel> {
        match &self.inner {
            Inner::Native(_) => None,
            Inner::Sim(s) => Some(s),
        }
    }

    /// The engine's name as workers report it: `native` or `sim`.
    pub fn engine_name(&self) -> &'static str {
        match &self.inner {
            Inner::Native(_) => "native",
            Inner::Sim(_) => "sim",
        }
    }

    /// The model's shape; for a simulated model, the scaled-down KV geometry of its pool.
    pub fn config(&self) -> &ModelConfig {
        match &self.inner {
            Inner::Native(n) => n.config(),
            Inner::Sim(s) => s.config(),
        }
    }

    /// Bytes of weights held in memory (none for a simulated model).
    pub fn weight_bytes(&self) -> usize {
        match &self.inner {
            Inner::Native(n) => n.weight_bytes(),
            Inner::Sim(_) => 0,
        }
    }

    pub fn attention_shape(&self, block_size: usize) -> AttentionShape {
        match &self.inner {
            Inner::Native(n) => n.attention_shape(block_size),
            Inner::Sim(s) => {
                let c = s.config();
                AttentionShape {
                    heads: c.heads,
                    kv_heads: c.kv_heads,
                    head_dim: c.head_dim,
                    block_size,
                }
            }
        }
    }

    /// Every id must be inside the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        match &self.inner {
            Inner::Native(n) => n.check_tokens(tokens),
            Inner::Sim(s) => s.check_tokens(tokens),
        }
    }

    /// Runs `chunks` through the model: writes their K and V into `pool` at their positions, calls
    /// `on_layer(layer, pool)` as each layer's KV is complete (so a transfer can start while later
    /// layers compute), and returns the logits of every chunk that asked for them, in order.
    pub fn forward(
        &self,
        chunks: &[SeqChunk<'_>],
        pool: &mut KvPool,
        on_layer: impl FnMut(usize, &KvPool) -> Result<()>,
    ) -> Result<Vec<Logits>> {
        match &self.inner {
            Inner::Native(n) => Ok(n
                .forward(chunks, pool, on_layer)?
                .into_iter()
                .map(Logits::Dense)
                .collect()),
            Inner::Sim(s) => s.forward(chunks, pool, on_layer),
        }
    }
}
