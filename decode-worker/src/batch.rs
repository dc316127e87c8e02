//! The continuous-batching loop: one OS thread that owns the engine and the running set. New
//! sequences join at each step, finished and cancelled ones leave at once and free their blocks;
//! everyone else reaches the engine through the loop's [`Inbox`]. What it tells streams and
//! callers are plain [`Event`]s and [`Failure`]s; `coalesce` and the service make gRPC of them.
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use tandem_engine::{Engine, EngineError, Logits, Pending, Sequence, StepItem, plan_chunks};
use tokio::sync::mpsc::UnboundedSender;

use crate::events::{Event, Failure};
use crate::inbox::{Detached, Inbox, PrefillJob, Prefilled, Snapshot};
use crate::state::Shared;

struct Prefilling {
    job: PrefillJob,
    done: usize,
    started: Option<Instant>,
    /// The engine holds the reservation's blocks as a sequence.
    adopted: bool,
}

pub(crate) struct Running {
    pub(crate) id: u64,
    /// Positions of KV the reservation held when it joined (what the engine adopts).
    kv_tokens: usize,
    last: u32,
    pub(crate) seq: Sequence,
    pub(crate) tx: UnboundedSender<Event>,
    /// The engine holds the reservation's blocks as a sequence.
    adopted: bool,
}

/// Counters the heartbeat and Info read.
#[derive(Default)]
pub struct LoopStats {
    pub running: AtomicU32,
    pub waiting: AtomicU32,
    /// Tokens per second over the batch, as f32 bits (moving average).
    pub tokens_per_s: AtomicU32,
    pub steps: AtomicU64,
    /// Aggregated mode: prompt tokens accepted and not yet computed.
    pub queued_prefill_tokens: AtomicU64,
    /// Aggregated mode: prompt tokens per second (f32 bits, moving average).
    pub prefill_tokens_per_s: AtomicU32,
    /// Tokens the running sequences attended to in the last step, summed.
    pub context_tokens: AtomicU64,
    /// Steps measured since the last heartbeat.
    pub step_log: tandem_wire::StepLog,
}

/// Settings of the loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// Most tokens per step (decode tokens plus prompt chunks in aggregated mode).
    pub step_tokens: usize,
}

/// Runs the loop on the current thread, owning `engine`, until [`Inbox::stop`].
pub fn run(
    mut engine: Engine,
    shared: Arc<Shared>,
    inbox: Arc<Inbox>,
    stats: Arc<LoopStats>,
    eos: Vec<u32>,
    cfg: LoopConfig,
) {
    let mut running: Vec<Running> = Vec::new();
    let mut prefilling: Vec<Prefilling> = Vec::new();
    let stopped = AtomicBool::new(false);
    let ctx = engine.model().config().max_context;
    while !stopped.load(Ordering::Relaxed) {
        let q = {
            let busy = !running.is_empty() || !prefilling.is_empty();
            let mut q = inbox.wait(busy);
            if q.stop {
                stopped.store(true, Ordering::Relaxed);
            }
            std::mem::take(&mut *q)
        };
        let (joiners, prefills, cancels) = (q.joiners, q.prefills, q.cancels);
        for j in joiners {
            // The prompt as the context counts it: the KV held, less the tokens generated into
            // it (a failover's replayed tokens, a migrated sequence's), plus the one pending.
            let prompt = (j.kv_tokens + 1).saturating_sub(j.generated_before as usize);
            running.push(Running {
                id: j.reservation_id,
                kv_tokens: j.kv_tokens,
                last: j.first_token,
                seq: Sequence::new(j.sampling, prompt, j.generated_before, ctx),
                tx: j.tx,
                adopted: false,
            });
        }
        running.extend(q.reattached.into_iter().map(|d| d.run));
        prefilling.extend(prefills.into_iter().map(|job| Prefilling {
            job,
            done: 0,
            started: None,
            adopted: false,
        }));
        let stop_all = stopped.load(Ordering::Relaxed);
        if !cancels.is_empty() || stop_all {
            running.retain(|r| {
                let drop = stop_all || cancels.contains(&r.id);
                if drop {
                    if stop_all {
                        let _ = r.tx.send(Event::Failed(Failure::Stopping));
                    }
                    shared.end_in(&mut engine, r.id);
                }
                !drop
            });
        }
        // A prefill its caller gave up leaves its reservation filling (Release or the lease frees
        // it); one whose reservation went (released, lapsed) fails, and the engine lets it go.
        prefilling.retain_mut(|p| {
            let id = p.job.reservation_id;
            let gone = cancels.contains(&id);
            let drop = stop_all || gone || p.job.cancel.load(Ordering::Relaxed);
            if drop {
                let left = (p.job.prompt.len() - p.done) as u64;
                stats
                    .queued_prefill_tokens
                    .fetch_sub(left, Ordering::Relaxed);
            }
            if gone {
                shared.end_in(&mut engine, id);
                if let Some(reply) = p.job.reply.take() {
                    let _ = reply.send(Err(Failure::Gone(id)));
                }
            }
            !drop
        });
        for &id in &cancels {
            // Released with nothing running here (an aggregated prompt cancelled before, or a
            // sequence that already ended): whatever the engine still holds goes.
            if engine.seq_len(id).is_some() && !running.iter().any(|r| r.id == id) {
                shared.end_in(&mut engine, id);
            }
        }
        for (id, reply) in q.snapshots {
            let _ = reply.send(snapshot(&engine, &running, id));
        }
        for (id, reply) in q.detaches {
            if let Err(Some(d)) = reply.send(detach(&engine, &mut running, id)) {
                // Whoever asked went away: the sequence goes on here.
                running.push(d.run);
            }
        }
        if running.is_empty() && prefilling.is_empty() {
            stats.running.store(0, Ordering::Relaxed);
            continue;
        }
        step(
            &shared,
            &mut engine,
            &mut running,
            &mut prefilling,
            &stats,
            &eos,
            cfg,
        );
    }
}

/// A running sequence's KV between two steps.
fn snapshot(engine: &Engine, running: &[Running], id: u64) -> Option<Snapshot> {
    let r = running.iter().find(|r| r.id == id && r.adopted)?;
    Some(Snapshot {
        kv_tokens: engine.seq_len(id)?,
        blocks: engine.block_table(id)?.to_vec(),
        left: r.seq.left(),
    })
}

/// Takes a running sequence out of the batch; the engine keeps its KV.
fn detach(engine: &Engine, running: &mut Vec<Running>, id: u64) -> Option<Detached> {
    let i = running.iter().position(|r| r.id == id && r.adopted)?;
    let kv_tokens = engine.seq_len(id)?;
    let blocks = engine.block_table(id)?.to_vec();
    Some(Detached {
        run: running.remove(i),
        kv_tokens,
        blocks,
    })
}

/// One decode step over every sequence that has room to grow; sequences that do not fit wait.
#[allow(clippy::too_many_arguments)]
fn step(
    shared: &Shared,
    engine: &mut Engine,
    running: &mut Vec<Running>,
    prefilling: &mut Vec<Prefilling>,
    stats: &LoopStats,
    eos: &[u32],
    cfg: LoopConfig,
) {
    let t0 = Instant::now();
    adopt(shared, engine, running, prefilling, stats);
    if running.is_empty() && prefilling.is_empty() {
        return;
    }
    // Oldest first: admit sequences while their next position gets a block. The block is taken
    // now, not inside the step: Reserve draws from the same allocator at any time.
    let mut take = Vec::with_capacity(running.len());
    let mut context = 0usize;
    for (i, r) in running.iter().enumerate() {
        let len = engine.seq_len(r.id).unwrap_or(0);
        if engine.reserve(r.id, len + 1).is_ok() {
            take.push(i);
            context += len + 1;
        }
    }
    if take.is_empty() && !running.is_empty() && prefilling.is_empty() {
        // Every sequence needs a block and none is free: the youngest gives its blocks back so
        // that the others can go on (it fails; the gateway may retry it elsewhere).
        if let Some(r) = running.pop() {
            let _ = r.tx.send(Event::Failed(Failure::Preempted));
            shared.end_in(engine, r.id);
        }
        return;
    }
    // Prompt chunks fill what the decode tokens leave of the step's budget, oldest first. Their
    // blocks were reserved whole, so they need none from the free list.
    let room = cfg.step_tokens.saturating_sub(take.len());
    let chunks = plan_chunks(
        prefilling.iter().map(|p| Pending {
            done: p.done,
            len: p.job.prompt.len(),
            boundary: p.job.prompt.len(),
        }),
        room,
    );
    for (i, _) in &chunks {
        prefilling[*i].started.get_or_insert(t0);
    }
    let tokens: Vec<[u32; 1]> = take.iter().map(|&i| [running[i].last]).collect();
    let mut items: Vec<StepItem<'_>> = take
        .iter()
        .zip(&tokens)
        .map(|(&i, t)| StepItem {
            seq: running[i].id,
            tokens: t,
            logits: true,
        })
        .collect();
    for (i, r) in &chunks {
        let p = &prefilling[*i];
        items.push(StepItem {
            seq: p.job.reservation_id,
            tokens: &p.job.prompt[r.clone()],
            logits: r.end == p.job.prompt.len(),
        });
    }
    let result = engine.step(&items);
    drop(items);
    let logits = match result {
        Ok(l) => l,
        Err(e) => {
            fail_step(shared, engine, running, &take, &e);
            for (i, _) in chunks.iter().rev() {
                let p = prefilling.remove(*i);
                let left = (p.job.prompt.len() - p.done) as u64;
                stats
                    .queued_prefill_tokens
                    .fetch_sub(left, Ordering::Relaxed);
                if let Some(reply) = p.job.reply {
                    let _ = reply.send(Err(Failure::from(&e)));
                }
            }
            return;
        }
    };
    let (decode_logits, prefill_logits) = logits.split_at(take.len());
    finish_prefills(shared, prefilling, &chunks, prefill_logits, stats, eos, t0);
    let waiting = running.len() - take.len();
    let mut done = Vec::new();
    for (&i, l) in take.iter().zip(decode_logits) {
        let r = &mut running[i];
        let (token, finish) = r.seq.next(l, eos);
        r.last = token;
        let event = Event::Token {
            token,
            generated: r.seq.generated(),
            finish,
        };
        // A closed receiver is a dropped stream: the client went away.
        if r.tx.send(event).is_err() || finish.is_some() {
            done.push(i);
        }
    }
    for &i in done.iter().rev() {
        let r = running.remove(i);
        shared.end_in(engine, r.id);
    }
    let took = t0.elapsed();
    stats.step_log.record(
        chunks.iter().map(|(_, r)| (r.start, r.len())),
        take.len(),
        context,
        took,
    );
    stats
        .context_tokens
        .store(context as u64, Ordering::Relaxed);
    let dt = took.as_secs_f32().max(1e-6);
    let rate = take.len() as f32 / dt;
    let old = f32::from_bits(stats.tokens_per_s.load(Ordering::Relaxed));
    let avg = if old == 0.0 {
        rate
    } else {
        0.9 * old + 0.1 * rate
    };
    stats.tokens_per_s.store(avg.to_bits(), Ordering::Relaxed);
    stats.running.store(running.len() as u32, Ordering::Relaxed);
    stats.waiting.store(waiting as u32, Ordering::Relaxed);
    stats.steps.fetch_add(1, Ordering::Relaxed);
}

/// Advances the prompts this step computed; those whose last chunk it was get their first token
/// and become complete reservations, ready for Decode.
fn finish_prefills(
    shared: &Shared,
    prefilling: &mut Vec<Prefilling>,
    chunks: &[(usize, std::ops::Range<usize>)],
    logits: &[Logits],
    stats: &LoopStats,
    eos: &[u32],
    t0: Instant,
) {
    let finished = Instant::now();
    let computed: usize = chunks.iter().map(|(_, r)| r.len()).sum();
    if computed > 0 {
        stats
            .queued_prefill_tokens
            .fetch_sub(computed as u64, Ordering::Relaxed);
        let rate = computed as f32 / (finished - t0).as_secs_f32().max(1e-6);
        let old = f32::from_bits(stats.prefill_tokens_per_s.load(Ordering::Relaxed));
        let avg = if old == 0.0 {
            rate
        } else {
            0.8 * old + 0.2 * rate
        };
        stats
            .prefill_tokens_per_s
            .store(avg.to_bits(), Ordering::Relaxed);
    }
    let ctx = shared.model().config().max_context;
    let mut logits = logits.iter();
    let mut done = Vec::new();
    for (i, r) in chunks {
        let p = &mut prefilling[*i];
        p.done = r.end;
        if r.end < p.job.prompt.len() {
            continue;
        }
        let Some(l) = logits.next() else {
            continue;
        };
        let (first_token, finish) =
            Sequence::new(p.job.sampling.clone(), p.job.prompt.len(), 0, ctx).next(l, eos);
        shared.book().complete(p.job.reservation_id, 0);
        done.push((
            *i,
            Prefilled {
                first_token,
                finish,
                started: p.started.unwrap_or(t0),
                finished,
            },
        ));
    }
    for (i, out) in done.into_iter().rev() {
        let p = prefilling.remove(i);
        if let Some(reply) = p.job.reply {
            let _ = reply.send(Ok(out));
        }
    }
}

/// A failed step changed nothing in the engine; the sequences in it fail with the error, so that
/// one bad sequence cannot wedge the loop.
fn fail_step(
    shared: &Shared,
    engine: &mut Engine,
    running: &mut Vec<Running>,
    take: &[usize],
    e: &EngineError,
) {
    tracing::error!(error = %e, "decode step failed");
    for &i in take.iter().rev() {
        let r = running.remove(i);
        let _ = r.tx.send(Event::Failed(Failure::from(e)));
        shared.end_in(engine, r.id);
    }
}

/// At a step boundary, hands the blocks of sequences that joined (and of prompts about to be
/// computed here) to the engine. One that cannot join fails alone; so does a prompt whose
/// reservation went away (its lease lapsed) while it was being computed.
fn adopt(
    shared: &Shared,
    engine: &mut Engine,
    running: &mut Vec<Running>,
    prefilling: &mut Vec<Prefilling>,
    stats: &LoopStats,
) {
    running.retain_mut(|r| {
        if r.adopted {
            return true;
        }
        match shared.adopt(engine, r.id, r.kv_tokens) {
            Ok(()) => {
                r.adopted = true;
                true
            }
            Err(failure) => {
                let _ = r.tx.send(Event::Failed(failure));
                shared.end_in(engine, r.id);
                false
            }
        }
    });
    let mut i = 0;
    while i < prefilling.len() {
        let p = &mut prefilling[i];
        let id = p.job.reservation_id;
        let ok = if p.adopted {
            engine.seq_len(id).map(|_| ()).ok_or(Failure::Gone(id))
        } else {
            shared.adopt(engine, id, 0)
        };
        match ok {
            Ok(()) => {
                p.adopted = true;
                i += 1;
            }
            Err(failure) => {
                let p = prefilling.remove(i);
                let left = (p.job.prompt.len() - p.done) as u64;
                stats
                    .queued_prefill_tokens
                    .fetch_sub(left, Ordering::Relaxed);
                if let Some(reply) = p.job.reply {
                    let _ = reply.send(Err(failure));
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "batch_tests.rs"]
mod tests;
