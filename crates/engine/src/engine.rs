//! Sequences over a model and a KV pool: the entry points prefill and decode workers use.
use std::collections::HashMap;
use std::sync::Arc;

use crate::kv::{BlockLease, BlockSource, KvGeometry, KvPool};
use crate::logits::Logits;
use crate::model::{Model, SeqChunk};
use crate::sequence::{Pending, plan_chunks};
use crate::{EngineError, Result};

pub type SeqId = u64;

#[derive(Debug)]
struct Seq {
    /// Dropping the sequence gives its blocks back.
    blocks: BlockLease,
    /// Positions whose K and V are in the cache.
    len: usize,
    /// The sequence has had logits (its prompt is done): what it is given next was generated, and
    /// computes as [`crate::model::SeqChunk::generated`] says.
    generating: bool,
}

/// One sequence's part of a step: `tokens` continue the sequence at its current length.
#[derive(Debug, Clone, Copy)]
pub struct StepItem<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    /// Return the logits of the last of `tokens`.
    pub logits: bool,
}

#[derive(Debug)]
pub struct Engine {
    model: Arc<Model>,
    pool: KvPool,
    /// Shared, so that blocks can be handed out while a step runs (a decode worker reserves for
    /// incoming prompts while the engine is busy).
    alloc: BlockSource,
    seqs: HashMap<SeqId, Seq>,
}

impl Engine {
    /// An engine with a heap-backed pool of `num_blocks` blocks.
    pub fn new(model: Arc<Model>, num_blocks: usize) -> Self {
        let geom = Self::geometry_for(&model, num_blocks);
        Engine::with_pool(model, KvPool::new(geom))
    }

    pub fn geometry_for(model: &Model, num_blocks: usize) -> KvGeometry {
        let c = model.config();
        KvGeometry::new(c.layers, c.kv_heads, c.head_dim, num_blocks)
    }

    /// An engine over a pool the caller made (for example one in shared memory).
    pub fn with_pool(model: Arc<Model>, pool: KvPool) -> Self {
        let alloc = BlockSource::new(pool.geometry().num_blocks);
        Engine {
            model,
            pool,
            alloc,
            seqs: HashMap::new(),
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    pub fn block_size(&self) -> usize {
        self.pool.geometry().block_size
    }

    pub fn free_blocks(&self) -> usize {
        self.alloc.free_count()
    }

    pub fn total_blocks(&self) -> usize {
        self.alloc.total()
    }

    /// The allocator this engine's sequences draw their blocks from. Others may lease blocks from
    /// it at any time, even during a step (a decode worker's reservations for incoming KV); such
    /// blocks are theirs until [`Engine::adopt`] hands the lease to a sequence.
    pub fn allocator(&self) -> BlockSource {
        self.alloc.clone()
    }

    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    pub fn seq_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.len)
    }

    pub fn block_table(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.blocks.ids())
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size())
    }

    pub fn add_sequence(&mut self, id: SeqId) -> Result<()> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::InvalidRequest(format!(
                "sequence {id} already exists"
            )));
        }
        self.seqs.insert(
            id,
            Seq {
                blocks: self.alloc.empty(),
                len: 0,
                generating: false,
            },
        );
        Ok(())
    }

    /// Makes sure sequence `id` has blocks for `tokens` positions; returns its whole block table.
    pub fn reserve(&mut self, id: SeqId, tokens: usize) -> Result<&[u32]> {
        let need = self.blocks_for(tokens);
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(EngineError::UnknownSequence(id))?;
        seq.blocks.grow_to(need)?;
        Ok(seq.blocks.ids())
    }

    /// Makes `blocks`, leased from [`Engine::allocator`] by the caller, the block table of a new
    /// sequence `id` whose first `len` positions already hold KV (imported into those blocks).
    /// The sequence holds the lease from now on; on an error it is handed back.
    pub fn adopt(
        &mut self,
        id: SeqId,
        blocks: BlockLease,
        len: usize,
    ) -> std::result::Result<(), (EngineError, BlockLease)> {
        if self.seqs.contains_key(&id) {
            return Err((
                EngineError::InvalidRequest(format!("sequence {id} already exists")),
                blocks,
            ));
        }
        if !blocks.is_from(&self.alloc) {
            return Err((
                EngineError::InvalidRequest("blocks of another pool".into()),
                blocks,
            ));
        }
        if self.blocks_for(len) > blocks.len() {
            let e = EngineError::KvImport(format!(
                "{len} positions do not fit {} blocks",
                blocks.len()
            ));
            return Err((e, blocks));
        }
        // Its prompt was computed elsewhere (that is where its first token came from).
        self.seqs.insert(
            id,
            Seq {
                blocks,
                len,
                generating: true,
            },
        );
        Ok(())
    }

    /// Frees a sequence and its blocks.
    pub fn release(&mut self, id: SeqId) -> Result<()> {
        self.seqs
            .remove(&id)
            .map(drop)
            .ok_or(EngineError::UnknownSequence(id))
    }

    /// Runs one step over `items` (prefill chunks and decode tokens together), returning the logits
    /// each item asked for, in order.
    pub fn step(&mut self, items: &[StepItem<'_>]) -> Result<Vec<Logits>> {
        self.step_with(items, |_, _| Ok(()))
    }

    /// One greedy decode step for a batch: sequence `ids[i]` takes `last[i]` and `last[i]` becomes
    /// its most likely next token.
    pub fn greedy_step(&mut self, ids: &[SeqId], last: &mut [u32]) -> Result<()> {
        let tokens: Vec<[u32; 1]> = last.iter().map(|t| [*t]).collect();
        let items: Vec<StepItem<'_>> = ids
            .iter()
            .zip(&tokens)
            .map(|(id, t)| StepItem {
                seq: *id,
                tokens: t,
                logits: true,
            })
            .collect();
        for (t, l) in last.iter_mut().zip(self.step(&items)?) {
            *t = l.argmax();
        }
        Ok(())
    }

    /// As [`Engine::step`], calling `on_layer(layer, pool)` when each layer's KV is written.
    pub fn step_with(
        &mut self,
        items: &[StepItem<'_>],
        on_layer: impl FnMut(usize, &KvPool) -> Result<()> + Send,
    ) -> Result<Vec<Logits>> {
        // Validate and allocate for the whole step first: a step either runs whole or changes nothing.
        let mut extra = 0;
        for (i, it) in items.iter().enumerate() {
            if items[..i].iter().any(|o| o.seq == it.seq) {
                return Err(EngineError::InvalidRequest(format!(
                    "sequence {} twice in one step",
                    it.seq
                )));
            }
            let seq = self
                .seqs
                .get(&it.seq)
                .ok_or(EngineError::UnknownSequence(it.seq))?;
            let end = seq.len + it.tokens.len();
            if end > self.model.config().max_context {
                return Err(EngineError::InvalidRequest(format!(
                    "sequence {} would reach {end} tokens, past the context of {}",
                    it.seq,
                    self.model.config().max_context
                )));
            }
            self.model.check_tokens(it.tokens)?;
            extra += self.blocks_for(end).saturating_sub(seq.blocks.len());
        }
        let before: Vec<usize> = items
            .iter()
            .map(|it| self.seqs[&it.seq].blocks.len())
            .collect();
        let free = self.alloc.free_count();
        if extra > free {
            return Err(EngineError::OutOfBlocks {
                needed: extra,
                free,
            });
        }
        let bs = self.block_size();
        let mut grown = Ok(());
        for it in items {
            if let Some(s) = self.seqs.get_mut(&it.seq) {
                // Others may lease between the count and here: then the step changes nothing.
                grown = s.blocks.grow_to((s.len + it.tokens.len()).div_ceil(bs));
                if grown.is_err() {
                    break;
                }
            }
        }
        let out = match grown {
            Ok(()) => self.run_step(items, on_layer),
            Err(e) => Err(e.into()),
        };
        if out.is_err() {
            // Give back what this step took, so a failed step changes nothing.
            for (it, n) in items.iter().zip(before) {
                if let Some(s) = self.seqs.get_mut(&it.seq) {
                    s.blocks.truncate(n);
                }
            }
        }
        out
    }

    fn run_step(
        &mut self,
        items: &[StepItem<'_>],
        on_layer: impl FnMut(usize, &KvPool) -> Result<()> + Send,
    ) -> Result<Vec<Logits>> {
        let Engine {
            model, pool, seqs, ..
        } = self;
        let chunks: Vec<SeqChunk<'_>> = items
            .iter()
            .map(|it| {
                let s = &seqs[&it.seq];
                SeqChunk {
                    tokens: it.tokens,
                    start: s.len,
                    block_table: s.blocks.ids(),
                    logits: it.logits,
                    generated: s.generating,
                }
            })
            .collect();
        let out = on_a_worker(|| model.forward(&chunks, pool, on_layer))?;
        for it in items {
            if let Some(s) = seqs.get_mut(&it.seq) {
                s.len += it.tokens.len();
                s.generating |= it.logits;
            }
        }
        Ok(out)
    }

    /// Prefills whole prompts, cutting them into chunks of at most `budget` tokens per step
    /// (first come, first served), and returns each prompt's last logits.
    pub fn prefill(&mut self, prompts: &[(SeqId, &[u32])], budget: usize) -> Result<Vec<Logits>> {
        let mut done = vec![0usize; prompts.len()];
        let mut logits = vec![Logits::Dense(Vec::new()); prompts.len()];
        while done.iter().zip(prompts).any(|(d, (_, p))| *d < p.len()) {
            let pending = done.iter().zip(prompts).map(|(&d, (_, p))| Pending {
                done: d,
                len: p.len(),
                boundary: p.len(),
            });
            let chunks = plan_chunks(pending, budget);
            let items: Vec<StepItem<'_>> = chunks
                .iter()
                .map(|(i, r)| StepItem {
                    seq: prompts[*i].0,
                    tokens: &prompts[*i].1[r.clone()],
                    logits: r.end == prompts[*i].1.len(),
                })
                .collect();
            let owners = chunks.iter().filter(|(i, r)| r.end == prompts[*i].1.len());
            for ((i, _), l) in owners.zip(self.step(&items)?) {
                logits[*i] = l;
            }
            for (i, r) in chunks {
                done[i] = r.end;
            }
        }
        Ok(logits)
    }

    /// Appends the KV of sequence `id` for `layer` (all its blocks) to `out`.
    pub fn export_layer(&self, id: SeqId, layer: usize, out: &mut Vec<u8>) -> Result<()> {
        let seq = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id))?;
        let used = self.blocks_for(seq.len);
        Ok(self
            .pool
            .export_layer(layer, &seq.blocks.ids()[..used], out)?)
    }

    /// Writes KV bytes made by [`Engine::export_layer`] into the blocks reserved for `id`.
    pub fn import_layer(&mut self, id: SeqId, layer: usize, bytes: &[u8]) -> Result<()> {
        let seq = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id))?;
        let n = bytes.len() / self.pool.geometry().layer_bytes(1).max(1);
        if n > seq.blocks.len() {
            return Err(EngineError::KvImport(format!(
                "{n} blocks of KV for a sequence with {} reserved",
                seq.blocks.len()
            )));
        }
        let blocks = seq.blocks.ids()[..n].to_vec();
        Ok(self.pool.import_layer(layer, &blocks, bytes)?)
    }

    /// Declares that the first `len` positions of `id` hold imported KV, so decoding may continue.
    pub fn commit(&mut self, id: SeqId, len: usize) -> Result<()> {
        let bs = self.block_size();
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(EngineError::UnknownSequence(id))?;
        if len.div_ceil(bs) > seq.blocks.len() {
            return Err(EngineError::KvImport(format!(
                "{len} positions do not fit the reserved blocks"
            )));
        }
        seq.len = len;
        // The prompt was computed where this KV came from; what follows was generated.
        seq.generating = true;
        Ok(())
    }

    /// Direct access for transports that write into reserved blocks themselves.
    pub fn pool_mut(&mut self) -> &mut KvPool {
        &mut self.pool
    }
}

/// Runs `f` on one of the compute pool's threads. A step issues a few hundred parallel kernels one
/// after another; issued from outside the pool, each would hand its work to the pool and put the
/// caller to sleep until it is done (two thread switches per kernel, about a fifth of a
/// single-stream decode step here). From inside, the caller takes part in the work and the other
/// threads, still spinning from the previous kernel, pick theirs up at once.
fn on_a_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}
