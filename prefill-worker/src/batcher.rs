//! The prefill batcher: one OS thread that owns the engine and the active prompts. Each step takes
//! up to the token budget from the active prompts, oldest first (long prompts are chunked across
//! steps), and as each layer of the step finishes, hands that layer's KV of every block the step
//! completed to the request's transfer task, so the transfer runs while later layers compute.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tandem_engine::kv::KvPool;
use tandem_engine::{Engine, EngineError, Pending, SeqId, Sequence, StepItem, plan_chunks};
use tandem_kv_transfer::{ShmRegion, Writer, frame_checksums, pool_checksum};
use tonic::Status;

use crate::queue::{Computed, Job, LayerMsg, Queue};

/// Settings of the batcher.
#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Most prompt tokens computed in one step.
    pub step_tokens: usize,
}

struct Active {
    job: Job,
    seq: SeqId,
    /// Prompt positions computed.
    done: usize,
    /// Blocks (in sequence order) whose KV has been handed to the transfer.
    sent: usize,
    started: Option<Instant>,
}

/// What one step does for one active prompt.
struct Part {
    index: usize,
    tokens: std::ops::Range<usize>,
    /// Blocks, in sequence order, that this step completes.
    send: std::ops::Range<usize>,
    last: bool,
    /// Asks for logits: the last part, or the one that ends the given prompt before replayed
    /// tokens (its logits are dropped; asking makes the engine compute what follows as generated).
    logits: bool,
}

/// Prompt lengths timed before serving, as fractions of the step budget.
const WARM_UP: [f64; 6] = [0.0625, 0.125, 0.25, 0.5, 0.75, 1.0];

/// Times a few prompts of different lengths before the worker serves, so that the router's
/// step-time fit (admission's TTFT prediction) has points from the first heartbeat on rather than
/// after the first few requests. Sequences of token id 0, released at once.
fn warm_up(engine: &mut Engine, queue: &Queue, step_tokens: usize) -> SeqId {
    let mut seq: SeqId = 1;
    // The first step pays for faulting the weights in and is not timed (a step's time, not a
    // start-up's, is what the fit needs).
    for share in std::iter::once(0.0).chain(WARM_UP) {
        let n = ((step_tokens as f64 * share) as usize).max(1);
        if engine.blocks_for(n) > engine.free_blocks() {
            continue;
        }
        let tokens = vec![0u32; n];
        let t0 = Instant::now();
        let ran = engine
            .add_sequence(seq)
            .and_then(|()| engine.reserve(seq, n).map(|_| ()))
            .and_then(|()| {
                engine.step(&[StepItem {
                    seq,
                    tokens: &tokens,
                    logits: true,
                }])
            });
        let took = t0.elapsed();
        let _ = engine.release(seq);
        seq += 1;
        match ran {
            Ok(_) if share > 0.0 => {
                queue
                    .counters
                    .steps
                    .record([(0, n)].into_iter(), 0, 0, took);
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "warm-up step failed"),
        }
    }
    seq
}

/// Runs the batcher until the queue stops; `warmed` hears when the warm-up steps are timed.
pub fn run(
    mut engine: Engine,
    queue: Arc<Queue>,
    cfg: BatcherConfig,
    eos: Vec<u32>,
    warmed: tokio::sync::oneshot::Sender<()>,
) {
    let mut active: Vec<Active> = Vec::new();
    let mut regions: HashMap<String, ShmRegion> = HashMap::new();
    let mut next_seq: SeqId = warm_up(&mut engine, &queue, cfg.step_tokens);
    let _ = warmed.send(());
    loop {
        let mut free = engine.free_blocks();
        let bs = engine.block_size();
        let Some(new) = queue.take(active.is_empty(), |j| {
            let need = j.prompt.len().div_ceil(bs);
            if need <= free {
                free -= need;
                true
            } else {
                false
            }
        }) else {
            break;
        };
        for job in new {
            if job.cancel.load(Ordering::Relaxed) {
                finish_job(&queue, job, Err(Status::cancelled("prefill cancelled")), 0);
                continue;
            }
            let seq = next_seq;
            next_seq += 1;
            let added = engine
                .add_sequence(seq)
                .and_then(|()| engine.reserve(seq, job.prompt.len()).map(|_| ()));
            if let Err(e) = added {
                let _ = engine.release(seq);
                let n = job.prompt.len();
                finish_job(&queue, job, Err(tandem_wire::engine_status(&e)), n);
                continue;
            }
            active.push(Active {
                job,
                seq,
                done: 0,
                sent: 0,
                started: None,
            });
        }
        drop_cancelled(&mut engine, &queue, &mut active);
        queue
            .counters
            .running
            .store(active.len() as u32, Ordering::Relaxed);
        if active.is_empty() {
            continue;
        }
        step(&mut engine, &queue, &mut active, &mut regions, cfg, &eos);
    }
    for a in active.drain(..) {
        let _ = engine.release(a.seq);
        let n = a.job.prompt.len() - a.done;
        finish_job(
            &queue,
            a.job,
            Err(Status::unavailable("prefill worker stopping")),
            n,
        );
    }
    for job in queue.drain() {
        let n = job.prompt.len();
        finish_job(
            &queue,
            job,
            Err(Status::unavailable("prefill worker stopping")),
            n,
        );
    }
}

fn finish_job(queue: &Queue, job: Job, result: Result<Computed, Status>, uncomputed: usize) {
    queue
        .counters
        .queued_tokens
        .fetch_sub(uncomputed as u64, Ordering::Relaxed);
    let _ = job.done.send(result);
}

fn drop_cancelled(engine: &mut Engine, queue: &Queue, active: &mut Vec<Active>) {
    let mut i = 0;
    while i < active.len() {
        if active[i].job.cancel.load(Ordering::Relaxed) {
            let a = active.remove(i);
            let _ = engine.release(a.seq);
            let n = a.job.prompt.len() - a.done;
            finish_job(queue, a.job, Err(Status::cancelled("prefill cancelled")), n);
        } else {
            i += 1;
        }
    }
}

fn plan(active: &[Active], budget: usize, block: usize) -> Vec<Part> {
    let pending = active.iter().map(|a| {
        let len = a.job.prompt.len();
        Pending {
            done: a.done,
            len,
            // A chunk stops where the given prompt ends, so that what follows computes as
            // generated.
            boundary: len - a.job.replayed.min(len - 1),
        }
    });
    plan_chunks(pending, budget)
        .into_iter()
        .map(|(index, tokens)| {
            let a = &active[index];
            let len = a.job.prompt.len();
            let given = len - a.job.replayed.min(len - 1);
            let last = tokens.end == len;
            Part {
                index,
                last,
                logits: last || tokens.end == given,
                send: sends(a.sent, tokens.end, len, block),
                tokens,
            }
        })
        .collect()
}

/// The blocks a step completes for a prompt of `len` tokens with `sent` blocks sent, once it has
/// computed up to `end`: a block goes once it is full, or with the prompt's last chunk, so that
/// each goes exactly once.
fn sends(sent: usize, end: usize, len: usize, block: usize) -> std::ops::Range<usize> {
    let upto = if end == len {
        len.div_ceil(block)
    } else {
        end / block
    };
    sent..upto.max(sent)
}

fn step(
    engine: &mut Engine,
    queue: &Queue,
    active: &mut Vec<Active>,
    regions: &mut HashMap<String, ShmRegion>,
    cfg: BatcherConfig,
    eos: &[u32],
) {
    let t0 = Instant::now();
    let parts = plan(active, cfg.step_tokens, engine.block_size());
    for p in &parts {
        active[p.index].started.get_or_insert(t0);
    }
    // Source and destination block ids of what each part sends, fixed before the step.
    let routes: Vec<(Vec<u32>, Vec<u32>)> = parts
        .iter()
        .map(|p| {
            let a = &active[p.index];
            let src = engine
                .block_table(a.seq)
                .map(|t| t[p.send.clone()].to_vec())
                .unwrap_or_default();
            let dst = a.job.destination.block_ids[p.send.clone()].to_vec();
            (src, dst)
        })
        .collect();
    for p in &parts {
        let a = &active[p.index];
        if let Some(layout) = &a.job.destination.shm_layout
            && !regions.contains_key(&layout.path)
        {
            match ShmRegion::open(layout) {
                Ok(r) => {
                    regions.insert(layout.path.clone(), r);
                }
                Err(e) => {
                    tracing::warn!(path = %layout.path, error = %e, "cannot map a decode pool")
                }
            }
        }
    }
    let layers = engine.model().config().layers;
    let items: Vec<StepItem<'_>> = parts
        .iter()
        .map(|p| StepItem {
            seq: active[p.index].seq,
            tokens: &active[p.index].job.prompt[p.tokens.clone()],
            logits: p.logits,
        })
        .collect();
    let active_ref = &*active;
    let on_layer = |layer: usize, pool: &KvPool| -> tandem_engine::Result<()> {
        for (p, (src, dst)) in parts.iter().zip(&routes) {
            if src.is_empty() {
                continue;
            }
            let job = &active_ref[p.index].job;
            let last = p.last && layer + 1 == layers;
            let msg = match &job.destination.shm_layout {
                Some(layout) => {
                    let Some(region) = regions.get_mut(&layout.path) else {
                        job.cancel.store(true, Ordering::Relaxed);
                        continue;
                    };
                    let writer = Writer {
                        reservation_id: job.destination.reservation_id,
                        attempt: job.destination.attempt,
                    };
                    match region.write_blocks_from(layer, dst, pool.layer(layer), src, writer) {
                        Ok(bytes) => LayerMsg::Written {
                            layer: layer as u32,
                            dst: dst.clone(),
                            bytes: bytes as u64,
                            checksum: pool_checksum(pool, layer, src).unwrap_or(0),
                            last,
                        },
                        Err(e) => {
                            tracing::warn!(error = %e, "shm write refused");
                            job.cancel.store(true, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                None => {
                    let mut bytes = Vec::with_capacity(pool.geometry().layer_bytes(src.len()));
                    pool.export_layer(layer, src, &mut bytes)?;
                    let checksums = job
                        .destination
                        .geometry
                        .and_then(|g| frame_checksums(&g, src.len(), &bytes).ok())
                        .unwrap_or_default();
                    LayerMsg::Bytes {
                        layer: layer as u32,
                        dst: dst.clone(),
                        bytes,
                        checksums,
                        last,
                    }
                }
            };
            // A closed channel means the transfer failed and the handler gave up: the job is
            // dropped after this step.
            if job.layers.send(msg).is_err() {
                job.cancel.store(true, Ordering::Relaxed);
            }
        }
        Ok(())
    };
    let result = engine.step_with(&items, on_layer);
    drop(items);
    let logits = match result {
        Ok(l) => l,
        Err(e) => {
            fail_step(engine, queue, active, &parts, &e);
            return;
        }
    };
    let finished = Instant::now();
    queue.counters.steps.record(
        parts.iter().map(|p| (p.tokens.start, p.tokens.len())),
        0,
        0,
        finished - t0,
    );
    let computed: usize = parts.iter().map(|p| p.tokens.len()).sum();
    let rate = computed as f32 / t0.elapsed().as_secs_f32().max(1e-6);
    let old = f32::from_bits(queue.counters.tokens_per_s.load(Ordering::Relaxed));
    let avg = if old == 0.0 {
        rate
    } else {
        0.8 * old + 0.2 * rate
    };
    queue
        .counters
        .tokens_per_s
        .store(avg.to_bits(), Ordering::Relaxed);
    queue
        .counters
        .queued_tokens
        .fetch_sub(computed as u64, Ordering::Relaxed);
    let ctx = engine.model().config().max_context;
    let mut logits = logits.into_iter();
    let mut done = Vec::new();
    for p in &parts {
        let a = &mut active[p.index];
        a.done = p.tokens.end;
        a.sent = p.send.end;
        if !p.logits {
            continue;
        }
        let Some(l) = logits.next() else {
            continue;
        };
        if !p.last {
            continue;
        }
        let p_job = &a.job;
        let (first_token, finish) =
            Sequence::new(p_job.sampling.clone(), p_job.prompt.len(), 0, ctx).next(&l, eos);
        done.push((
            p.index,
            Computed {
                first_token,
                finish,
                started: a.started.unwrap_or(t0),
                finished,
            },
        ));
    }
    for (index, c) in done.into_iter().rev() {
        let a = active.remove(index);
        let _ = engine.release(a.seq);
        let _ = a.job.done.send(Ok(c));
    }
}

fn fail_step(
    engine: &mut Engine,
    queue: &Queue,
    active: &mut Vec<Active>,
    parts: &[Part],
    e: &EngineError,
) {
    tracing::error!(error = %e, "prefill step failed");
    for p in parts.iter().rev() {
        let a = active.remove(p.index);
        let _ = engine.release(a.seq);
        let n = a.job.prompt.len() - a.done;
        finish_job(queue, a.job, Err(tandem_wire::engine_status(e)), n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The positions a step computes for a lone prompt, and the blocks it completes.
    fn chunk(
        done: usize,
        sent: usize,
        len: usize,
        room: usize,
        block: usize,
    ) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let one = Pending {
            done,
            len,
            boundary: len,
        };
        let [(_, tokens)] = &plan_chunks([one], room)[..] else {
            panic!("one chunk")
        };
        (tokens.clone(), sends(sent, tokens.end, len, block))
    }

    #[test]
    fn full_blocks_go_with_their_chunk_and_the_partial_one_with_the_last() {
        // 40 tokens in 16-token blocks, a 24-token budget: step 1 computes 0..24 and completes
        // block 0; step 2 computes 24..40 and sends blocks 1 and 2 (the partial last one).
        assert_eq!(chunk(0, 0, 40, 24, 16), (0..24, 0..1));
        assert_eq!(chunk(24, 1, 40, 24, 16), (24..40, 1..3));
        // A chunk that ends inside a block sends nothing yet.
        assert_eq!(chunk(0, 0, 40, 8, 16), (0..8, 0..0));
        // An exact multiple: the last chunk's last block is full and goes.
        assert_eq!(chunk(16, 1, 32, 16, 16), (16..32, 1..2));
        // A whole prompt in one step sends every block, the partial one included.
        assert_eq!(chunk(0, 0, 33, 512, 16), (0..33, 0..3));
    }

    fn active(len: usize, replayed: usize, done: usize, sent: usize) -> Active {
        let (layers, _) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, _) = tokio::sync::oneshot::channel();
        Active {
            job: Job {
                request_id: "r".into(),
                prompt: vec![1; len],
                replayed,
                sampling: tandem_engine::sampling::SamplingParams::greedy(1),
                destination: tandem_proto::v1::KvDestination::default(),
                arrived: Instant::now(),
                cancel: Default::default(),
                layers,
                done: done_tx,
            },
            seq: 1,
            done,
            sent,
            started: None,
        }
    }

    #[test]
    fn a_replay_stops_a_chunk_where_the_given_prompt_ends_and_asks_for_its_logits() {
        // 40 tokens, the last 10 replayed (generated): 0..24, then 24..30 (the prompt's end,
        // logits asked so that the engine computes what follows as generated), then 30..40.
        let steps = [(0, 0), (24, 1), (30, 1)];
        let want = [
            (0..24, false, false),
            (24..30, true, false),
            (30..40, true, true),
        ];
        for ((done, sent), (tokens, logits, last)) in steps.into_iter().zip(want) {
            let [p] = &plan(&[active(40, 10, done, sent)], 24, 16)[..] else {
                panic!("one part")
            };
            assert_eq!((p.tokens.clone(), p.logits, p.last), (tokens, logits, last));
        }
        // Without a replay, one part to the end, as before.
        let [p] = &plan(&[active(40, 0, 0, 0)], 64, 16)[..] else {
            panic!("one part")
        };
        assert_eq!((p.tokens.clone(), p.logits, p.last), (0..40, true, true));
    }

    #[test]
    fn every_block_goes_exactly_once_whatever_the_budget() {
        for len in 1..70 {
            for budget in 1..40 {
                let (mut done, mut sent, mut seen) = (0, 0, Vec::new());
                while done < len {
                    let (t, s) = chunk(done, sent, len, budget, 16);
                    seen.extend(s.clone());
                    (done, sent) = (t.end, s.end);
                }
                assert_eq!(
                    seen,
                    (0..len.div_ceil(16)).collect::<Vec<_>>(),
                    "{len}/{budget}"
                );
            }
        }
    }
}
