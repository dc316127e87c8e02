//! The `sim` engine's model: compute replaced by the time a performance model gives, over the same
//! paged KV pool, so that everything above the model (the engine's block allocator and block
//! tables, the workers' batchers, KV export and import, the transports and their checks) runs
//! unchanged.
//!
//! # What is simulated, what is real, what is not modelled
//! * **Simulated: compute time.** Each forward step asks a [`StepClock`] how long the simulated
//!   model on its simulated GPUs would take for this step's shape (prompt chunks with their cached
//!   prefixes, decoding sequences and their context), spreads that time evenly over the layers, and
//!   sleeps each layer's share, measuring what it already spent so that a step takes the clock's
//!   time however long the bookkeeping took. `on_layer` is called as each layer's share ends, so a
//!   prefill worker's layer-by-layer KV push overlaps the simulated compute as it would the real.
//! * **Simulated: KV capacity.** The caller sizes the pool with the number of blocks the simulated
//!   GPUs' memory holds (see `tandem_sim::engine`), so admission, reservations and preemption see
//!   the simulated cluster's limits.
//! * **Real, scaled down: KV bytes.** The pool has the simulated model's layer count but one KV head
//!   of [`SIM_HEAD_DIM`] f32 per token and layer, so each token carries
//!   `layers * 2 * SIM_HEAD_DIM * 4` bytes instead of the simulated model's (Llama-2-70B: 1,280
//!   instead of 327,680, a factor of 256; [`SimModel::kv_scale`] gives it). Those bytes are real and
//!   checkable: every position's K and V is a hash of its token, its position, the layer below,
//!   the previous position and one pseudo-random earlier position of the same sequence, so greedy
//!   output is the same wherever the KV was computed, and KV damaged in transfer changes the
//!   generated tokens (at the prompt's last position at once; elsewhere as soon as a later position
//!   reads it, which a few dozen generated tokens make likely). Bytes rather than
//!   bookkeeping alone, because the transports' framing, checksums and commit checks are what a
//!   disaggregated run must exercise; scaled down, because a DGX-sized pool would not fit in the
//!   small machine this is meant to run on.
//! * **Not modelled: KV transfer time.** The scaled-down bytes travel through the real transport on
//!   the real link (loopback on one host), so transfer time is that of the small bytes on that
//!   link, not of the simulated KV over NVLink or InfiniBand.
//!
//! Logits are a function of the last position's KV in the last layer: a few high values at
//! hash-chosen token ids over a flat floor, so greedy decoding is deterministic and sampling with
//! temperature, top-k and top-p has a spread to choose from. They are handed over in that form
//! ([`Logits::Peaks`]: the floor and the few ids above it), not as one value per id, so that a
//! step costs nothing per vocabulary entry and the sampler sums the softmax over the whole
//! vocabulary in closed form; the distribution is the same as the dense vector's.
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ModelConfig, SeqChunk};
use crate::kv::KvPool;
use crate::logits::{Logits, Peaks};
use crate::{EngineError, Result};

/// Floats of K (and of V) per token and layer in a simulated pool.
pub const SIM_HEAD_DIM: usize = 2;
// The KV hashing below reads and writes each head as one pair of floats.
const _: () = assert!(SIM_HEAD_DIM == 2);

/// How long a step of the simulated model takes. Defined here so that the engine does not depend on
/// the performance model's crate; `tandem_sim` adapts its `PerfModel` to it.
pub trait StepClock: Send + Sync + fmt::Debug {
    /// Duration of one forward step over `prefill` chunks, each `(cached_prefix, new_tokens)`, and
    /// `decode_batch` decoding sequences that attend to `decode_context` tokens in all.
    fn step_time(
        &self,
        prefill: &[(usize, usize)],
        decode_batch: usize,
        decode_context: usize,
    ) -> Duration;
}

/// A clock for which every step is instant: the control plane's own overhead, alone.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroClock;

impl StepClock for ZeroClock {
    fn step_time(&self, _: &[(usize, usize)], _: usize, _: usize) -> Duration {
        Duration::ZERO
    }
}

/// The simulated model's shape, as far as the engine needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// The simulated model's name (for logs and `ModelConfig::name`).
    pub name: String,
    /// The simulated model's layer count: the pool has as many, so KV moves layer by layer.
    pub layers: usize,
    /// Token ids the model produces; the serving tokenizer's vocabulary, so that ids detokenize.
    pub vocab: usize,
    /// The simulated model's context length.
    pub max_context: usize,
    /// KV bytes per token of the simulated model (all layers and heads, its dtype): the
    /// numerator of the stated scale factor.
    pub simulated_kv_bytes_per_token: u64,
}

/// A model whose forward pass writes deterministic KV and sleeps the simulated time.
#[derive(Debug, Clone)]
pub struct SimModel {
    sim: SimConfig,
    cfg: ModelConfig,
    clock: Arc<dyn StepClock>,
}

impl SimModel {
    pub fn new(sim: SimConfig, clock: Arc<dyn StepClock>) -> Result<Self> {
        if sim.max_context == 0 {
            return Err(EngineError::Unsupported(format!(
                "simulated model {}: zero context length",
                sim.name
            )));
        }
        let cfg = ModelConfig {
            name: sim.name.clone(),
            hidden: SIM_HEAD_DIM,
            ffn: 0,
            layers: sim.layers,
            heads: 1,
            kv_heads: 1,
            head_dim: SIM_HEAD_DIM,
            vocab: sim.vocab,
            max_context: sim.max_context,
            rms_eps: 0.0,
            rope_base: 0.0,
            rope_interleaved: false,
        };
        cfg.validate()?;
        Ok(SimModel { sim, cfg, clock })
    }

    /// The pool's shape: the simulated layers, one KV head of [`SIM_HEAD_DIM`].
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn sim_config(&self) -> &SimConfig {
        &self.sim
    }

    /// Simulated KV bytes per token over the bytes the pool really carries per token.
    pub fn kv_scale(&self) -> f64 {
        self.sim.simulated_kv_bytes_per_token as f64 / self.cfg.kv_bytes_per_token() as f64
    }

    /// Every id must be inside the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|t| **t as usize >= self.cfg.vocab) {
            Some(t) => Err(EngineError::InvalidRequest(format!(
                "token id {t} is outside the vocabulary of {}",
                self.cfg.vocab
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
            if end > self.cfg.max_context {
                return Err(EngineError::InvalidRequest(format!(
                    "position {end} is past the model's context of {}",
                    self.cfg.max_context
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

    /// The step's shape as the clock sees it. A one-token chunk after position 0 is a decode step
    /// (the last one-token chunk of a chunked prompt is costed as one too: the same work).
    fn step_time(&self, chunks: &[SeqChunk<'_>]) -> Duration {
        let mut prefill = Vec::new();
        let (mut batch, mut context) = (0, 0);
        for c in chunks.iter().filter(|c| !c.tokens.is_empty()) {
            if c.tokens.len() == 1 && c.start > 0 {
                batch += 1;
                context += c.start + 1;
            } else {
                prefill.push((c.start, c.tokens.len()));
            }
        }
        if prefill.is_empty() && batch == 0 {
            return Duration::ZERO;
        }
        self.clock.step_time(&prefill, batch, context)
    }

    /// As [`super::Model::forward`]: writes every chunk's KV, layer by layer, sleeping each layer's
    /// share of the step's simulated time before `on_layer`; returns the asked-for logits.
    pub fn forward(
        &self,
        chunks: &[SeqChunk<'_>],
        pool: &mut KvPool,
        mut on_layer: impl FnMut(usize, &KvPool) -> Result<()>,
    ) -> Result<Vec<Logits>> {
        self.check(chunks, pool)?;
        let total = self.step_time(chunks);
        let t0 = Instant::now();
        let layers = self.cfg.layers;
        let bs = pool.geometry().block_size;
        let plan: Vec<Write> = chunks
            .iter()
            .flat_map(|c| {
                let slot = |pos: usize| c.block_table[pos / bs] as usize * bs + pos % bs;
                c.tokens.iter().enumerate().map(move |(i, &token)| {
                    let pos = c.start + i;
                    Write {
                        seed: mix(mix(((pos as u64) << 8) ^ 0x5EED) ^ u64::from(token)),
                        at: slot(pos),
                        prev: pos.checked_sub(1).map(slot),
                        far: far_position(pos).map(slot),
                    }
                })
            })
            .collect();
        let mut below = vec![0u64; plan.len()];
        for layer in 0..layers {
            write_layer(pool, layer, &plan, &mut below);
            let due = total.mul_f64((layer + 1) as f64 / layers as f64);
            if let Some(rest) = due.checked_sub(t0.elapsed())
                && !rest.is_zero()
            {
                std::thread::sleep(rest);
            }
            on_layer(layer, pool)?;
        }
        Ok(chunks
            .iter()
            .filter(|c| c.logits && !c.tokens.is_empty())
            .map(|c| {
                let last = c.start + c.tokens.len() - 1;
                logits(
                    digest(pool, layers - 1, c.block_table, last),
                    self.cfg.vocab,
                )
            })
            .collect())
    }
}

/// SplitMix64's finaliser: a cheap, well-mixed 64-bit hash step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A hash of every bit of K and V at `pos` in `layer`.
fn digest(pool: &KvPool, layer: usize, table: &[u32], pos: usize) -> u64 {
    let bs = pool.geometry().block_size;
    let (k, v) = pool.layer(layer);
    digest_at(k, v, table[pos / bs] as usize * bs + pos % bs)
}

/// A hash of every bit of K and V in slot `s` of one layer's halves: one mixing step per 64 bits
/// (K's two floats, then V's).
fn digest_at(k: &[f32], v: &[f32], s: usize) -> u64 {
    mix(mix(0x51 ^ pair(&k[s * SIM_HEAD_DIM..])) ^ pair(&v[s * SIM_HEAD_DIM..]))
}

/// The bits of the first two floats of `x`, as one word.
fn pair(x: &[f32]) -> u64 {
    u64::from(x[0].to_bits()) | (u64::from(x[1].to_bits()) << 32)
}

/// The earlier position besides `pos - 1` that `pos` depends on, so that bytes lost anywhere in a
/// sequence's KV (not only at its end) change what it generates.
fn far_position(pos: usize) -> Option<usize> {
    (pos >= 2).then(|| (mix(pos as u64 ^ 0xFA) % (pos as u64 - 1)) as usize)
}

/// One position a step writes, with the pool slots it writes and reads (the same in every layer).
struct Write {
    /// A hash of the position and its token, the same in every layer.
    seed: u64,
    at: usize,
    prev: Option<usize>,
    far: Option<usize>,
}

/// Whether [`prefetch`] does anything on this target.
const PREFETCH: bool = cfg!(target_arch = "x86_64");

/// Asks for the cache line holding `x` without waiting for it.
#[cfg(target_arch = "x86_64")]
fn prefetch(x: &f32) {
    safe_arch::prefetch_t0(x);
}

#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_: &f32) {}

/// Takes one 64-bit word into a running hash. Xor, an odd multiply and an xorshift are each
/// invertible, so for a given state two different words always give two different states: a word
/// read back changed (one bit or all of them) always changes the values written from it. The
/// spreading is left to the one [`mix`] that turns the state into values.
fn absorb(h: u64, w: u64) -> u64 {
    let x = (h ^ w).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^ (x >> 32)
}

/// Writes one layer's K and V at every position of `plan`, in order. Each position's values are
/// a hash of its token, its position, the layer below at that position (written just before, in
/// this step), and every bit of K and V at the previous and one earlier position of this layer
/// (written earlier in this step or in an earlier one, or imported). `below` holds the state the
/// layer below's values came from on entry, and this layer's on return.
///
/// Per position and layer that is four words read and absorbed (K and V of two slots), the state
/// below absorbed last (so the reads' share need not wait for the layer below), and one mixing
/// step per value word: a decode step does this for every layer of every sequence, so it is most
/// of the `sim` engine's CPU time.
///
/// The slots lie anywhere in a pool of hundreds of megabytes, so their reads (and the writes'
/// lines) miss every cache. Read one after another, each behind the hashing of the last, they were
/// most of a step at zero simulated time. So while this layer is hashed, the same slots of the next
/// layer are prefetched (a prefetch does not wait for its line, so the misses overlap the hashing);
/// where there is no prefetch instruction, and for the first layer, a first pass loads the slots
/// all at once (independent loads, so the misses overlap each other). The values are the same
/// either way.
fn write_layer(pool: &mut KvPool, layer: usize, plan: &[Write], below: &mut [u64]) {
    const W: usize = SIM_HEAD_DIM;
    let ((k, v), next) = pool.layer_mut_and_next(layer);
    if layer == 0 || !PREFETCH {
        let mut touched = 0u32;
        for w in plan {
            touched ^= k[w.at * W].to_bits() ^ v[w.at * W].to_bits();
            if let Some(f) = w.far {
                touched ^= k[f * W].to_bits() ^ v[f * W].to_bits();
            }
            if let Some(p) = w.prev {
                touched ^= k[p * W].to_bits() ^ v[p * W].to_bits();
            }
        }
        std::hint::black_box(touched);
    }
    let layer_key = mix(((layer as u64) << 40) ^ 0x1A7E);
    for (w, below) in plan.iter().zip(below.iter_mut()) {
        if let Some((nk, nv)) = next {
            for s in [Some(w.at), w.far, w.prev.filter(|p| p / 8 != w.at / 8)]
                .into_iter()
                .flatten()
            {
                prefetch(&nk[s * W]);
                prefetch(&nv[s * W]);
            }
        }
        let mut h = w.seed ^ layer_key;
        if let Some(p) = w.prev {
            h = absorb(absorb(h, pair(&k[p * W..])), pair(&v[p * W..]));
        }
        if let Some(f) = w.far {
            h = absorb(absorb(h, pair(&k[f * W..])), pair(&v[f * W..]));
        }
        if layer > 0 {
            h = absorb(h, *below);
        }
        // Two values of 24 bits from each mixing step, in [-1, 1) as real K and V would be.
        let unit = |bits: u64| (bits & 0xFF_FFFF) as f32 / (1u64 << 23) as f32 - 1.0;
        let (hk, hv) = (mix(h), mix(h ^ 1));
        k[w.at * W] = unit(hk >> 40);
        k[w.at * W + 1] = unit(hk >> 8);
        v[w.at * W] = unit(hv >> 40);
        v[w.at * W + 1] = unit(hv >> 8);
        *below = h;
    }
}

/// Token ids that get a high logit, best first, and their values over a floor of zero.
const PEAKS: [f32; 6] = [12.0, 11.0, 10.0, 9.0, 8.0, 7.0];

/// Hash-chosen ids at the [`PEAKS`] values (an id chosen twice keeps the higher), every other id
/// at zero.
fn logits(state: u64, vocab: usize) -> Logits {
    let mut out = Peaks::new(vocab, 0.0);
    for (i, value) in PEAKS.iter().enumerate() {
        let id = (mix(state ^ (i as u64 + 1)) % vocab as u64) as u32;
        out.raise(id, *value);
    }
    Logits::Peaks(out)
}

#[cfg(test)]
#[path = "sim_tests.rs"]
mod tests;
