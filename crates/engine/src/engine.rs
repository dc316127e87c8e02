//! Sequences over a model and a KV pool: the entry points prefill and decode workers use.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::kv::{BlockAllocator, KvGeometry, KvPool};
use crate::logits::Logits;
use crate::model::{Model, SeqChunk};
use crate::{EngineError, Result};

pub type SeqId = u64;

#[derive(Debug, Default, Clone)]
struct Seq {
    blocks: Vec<u32>,
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

/// A block allocator that several owners draw from (see [`Engine::allocator`]).
pub type SharedAllocator = Arc<Mutex<BlockAllocator>>;

/// Locks a shared allocator. Every holder keeps it for a few list operations, none of which can
/// leave it half changed, so a holder that panicked left it consistent.
pub fn lock_allocator(a: &Mutex<BlockAllocator>) -> MutexGuard<'_, BlockAllocator> {
    a.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug)]
pub struct Engine {
    model: Arc<Model>,
    pool: KvPool,
    /// Behind its own lock so that blocks can be handed out while a step runs (a decode worker
    /// reserves for incoming prompts while the engine is busy); held only for list operations.
    alloc: SharedAllocator,
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
        let alloc = BlockAllocator::new(pool.geometry().num_blocks);
        Engine {
            model,
            pool,
            alloc: Arc::new(Mutex::new(alloc)),
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
        lock_allocator(&self.alloc).free_count()
    }

    pub fn total_blocks(&self) -> usize {
        lock_allocator(&self.alloc).total()
    }

    /// The allocator this engine's sequences draw their blocks from. Others may take blocks from
    /// it at any time, even during a step (a decode worker's reservations for incoming KV); such
    /// blocks are theirs until [`Engine::adopt`] hands them to a sequence.
    pub fn allocator(&self) -> SharedAllocator {
        self.alloc.clone()
    }

    pub fn sequences(&self) -> usize {
        self.seqs.len()
    }

    pub fn seq_len(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.len)
    }

    pub fn block_table(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.blocks.as_slice())
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
        self.seqs.insert(id, Seq::default());
        Ok(())
    }

    /// Makes sure sequence `id` has blocks for `tokens` positions; returns its whole block table.
    pub fn reserve(&mut self, id: SeqId, tokens: usize) -> Result<&[u32]> {
        let need = self.blocks_for(tokens);
        let seq = self
            .seqs
            .get_mut(&id)
            .ok_or(EngineError::UnknownSequence(id))?;
        if need > seq.blocks.len() {
            let more = lock_allocator(&self.alloc).allocate(need - seq.blocks.len())?;
            seq.blocks.extend(more);
        }
        Ok(&seq.blocks)
    }

    /// Makes `blocks`, taken from [`Engine::allocator`] by the caller, the block table of a new
    /// sequence `id` whose first `len` positions already hold KV (imported into those blocks).
    /// The sequence owns the blocks from now on; on an error the caller still does.
    pub fn adopt(&mut self, id: SeqId, blocks: Vec<u32>, len: usize) -> Result<()> {
        if self.seqs.contains_key(&id) {
            return Err(EngineError::InvalidRequest(format!(
                "sequence {id} already exists"
            )));
        }
        if self.blocks_for(len) > blocks.len() {
            return Err(EngineError::KvImport(format!(
                "{len} positions do not fit {} blocks",
                blocks.len()
            )));
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
        let seq = self
            .seqs
            .remove(&id)
            .ok_or(EngineError::UnknownSequence(id))?;
        lock_allocator(&self.alloc).release(&seq.blocks)
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
        {
            // Checked and taken under one lock: others may allocate between two locks.
            let bs = self.block_size();
            let mut alloc = lock_allocator(&self.alloc);
            if extra > alloc.free_count() {
                return Err(EngineError::OutOfBlocks {
                    needed: extra,
                    free: alloc.free_count(),
                });
            }
            for it in items {
                if let Some(s) = self.seqs.get_mut(&it.seq) {
                    let need = (s.len + it.tokens.len()).div_ceil(bs);
                    if need > s.blocks.len() {
                        s.blocks.extend(alloc.allocate(need - s.blocks.len())?);
                    }
                }
            }
        }
        let out = self.run_step(items, on_layer);
        if out.is_err() {
            // Give back what this step allocated, so a failed step changes nothing.
            let mut alloc = lock_allocator(&self.alloc);
            for (it, n) in items.iter().zip(before) {
                if let Some(s) = self.seqs.get_mut(&it.seq) {
                    let extra = s.blocks.split_off(n);
                    alloc.release(&extra)?;
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
                    block_table: &s.blocks,
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
        let budget = budget.max(1);
        let mut done = vec![0usize; prompts.len()];
        let mut logits = vec![Logits::Dense(Vec::new()); prompts.len()];
        while done.iter().zip(prompts).any(|(d, (_, p))| *d < p.len()) {
            let mut room = budget;
            let mut items = Vec::new();
            let mut owners = Vec::new();
            for (i, (id, p)) in prompts.iter().enumerate() {
                if room == 0 {
                    break;
                }
                let n = (p.len() - done[i]).min(room);
                if n == 0 {
                    continue;
                }
                let last = done[i] + n == p.len();
                items.push(StepItem {
                    seq: *id,
                    tokens: &p[done[i]..done[i] + n],
                    logits: last,
                });
                if last {
                    owners.push(i);
                }
                done[i] += n;
                room -= n;
            }
            for (i, l) in owners.into_iter().zip(self.step(&items)?) {
                logits[i] = l;
            }
        }
        Ok(logits)
    }

    /// Appends the KV of sequence `id` for `layer` (all its blocks) to `out`.
    pub fn export_layer(&self, id: SeqId, layer: usize, out: &mut Vec<u8>) -> Result<()> {
        let seq = self.seqs.get(&id).ok_or(EngineError::UnknownSequence(id))?;
        let used = self.blocks_for(seq.len);
        self.pool.export_layer(layer, &seq.blocks[..used], out)
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
        let blocks = seq.blocks[..n].to_vec();
        self.pool.import_layer(layer, &blocks, bytes)
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
