//! The discrete-event cluster simulator. Time is simulated (no wall clock, no async runtime): an
//! event queue of arrivals, step completions and KV arrivals drives instances whose step times come
//! from a [`PerfModel`].
//!
//! * Disaggregated: a request is placed at arrival as the router does: its KV blocks (prompt plus
//!   answer, in 16-token blocks) are reserved on the decode instance with the most free blocks
//!   (then the fewest sequences), and its prompt is queued on the prefill instance with the fewest
//!   queued tokens. A prefill instance fills each step with queued prompts FCFS up to its token
//!   budget, chunking the last one that does not fit (as the prefill worker does). KV moves
//!   layer by layer while the prefill computes, so only the transfer time beyond the prefill's own
//!   shows. A decode instance runs continuous batching up to its sequence limit. A prefill step
//!   takes the model's served-prefill factor for its case (a decode instance decoding or not when
//!   it starts; started by an arrival at the idle instance or straight after its previous step),
//!   and each decode step a factor drawn (seeded) from the model's measured step factors; both are
//!   1 for a model that measured neither.
//! * Aggregated: one instance does both, Sarathi-style: each step carries every running sequence's
//!   next token plus prompt chunks (FCFS) up to the step's token budget.
//! * A request that finds no instance with room for its KV waits, FCFS, at the router.
//! * With [`SimConfig::admission`], arrivals go through the router's latency-budget admission
//!   instead ([`admit`]): admitted, queued by deadline, or rejected.
//!
//! Cost per event is O(log n): a decode step advances every sequence by one token through running
//! sums (context grows by the batch size), and completions come off a heap keyed by step number.

mod admit;
mod admit_config;
mod choice;
mod handlers;
mod state;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

use crate::error::SimError;
use crate::perf::{Link, PerfModel, blocks_for};
use crate::rng::Rng;
use crate::stats::{Outcome, SimReport, Slo, summarise};
use crate::workload::{RequestStream, Workload};
pub use admit_config::{AdmissionConfig, PairChoice};
use state::{AggInst, DecodeInst, Event, Kind, PrefillInst, Req};

/// Mixed into the seed for the decode step spread's stream.
const SPREAD_STREAM: u64 = 0x5EED_5E7D_0000_0001;

/// One instance: a performance model (which fixes its tensor parallelism) and its batch limits.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub model: Arc<dyn PerfModel>,
    /// Most sequences decoding at once.
    pub max_running: u32,
    /// Most prompt tokens in one step (prefill batch, or chunk budget when aggregated).
    pub max_batch_tokens: u32,
}

/// The cluster under test.
#[derive(Debug, Clone)]
pub enum Cluster {
    Disaggregated {
        prefill: Vec<InstanceSpec>,
        decode: Vec<InstanceSpec>,
        link: Link,
    },
    Aggregated {
        instances: Vec<InstanceSpec>,
    },
}

impl Cluster {
    pub fn gpus(&self) -> u32 {
        let sum = |v: &[InstanceSpec]| v.iter().map(|i| i.model.tensor_parallel()).sum::<u32>();
        match self {
            Cluster::Disaggregated {
                prefill, decode, ..
            } => sum(prefill) + sum(decode),
            Cluster::Aggregated { instances } => sum(instances),
        }
    }
}

/// Which part of a disaggregated cluster to run: the planner sizes each role on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Full,
    /// Prefill instances only; a request ends at its first token.
    PrefillOnly,
    /// Decode instances only; a request arrives with its KV in place.
    DecodeOnly,
}

/// A simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub cluster: Cluster,
    pub workload: Workload,
    pub requests: usize,
    pub seed: u64,
    /// Share of the first requests left out of the statistics, while the cluster fills.
    pub warmup: f64,
    pub phase: Phase,
    pub slo: Slo,
    /// Latency-budget admission as the router runs it; `None` (the default everywhere): every
    /// request is placed, waiting FCFS for KV room.
    pub admission: Option<AdmissionConfig>,
}

struct Sim<'a> {
    cfg: &'a SimConfig,
    now: f64,
    seq: u64,
    events: BinaryHeap<Reverse<Event>>,
    reqs: Vec<Req>,
    pending: VecDeque<u32>,
    prefill: Vec<PrefillInst>,
    decode: Vec<DecodeInst>,
    agg: Vec<AggInst>,
    /// (start, duration, tokens produced) of every decoding step.
    steps: Vec<(f64, f64, u32)>,
    measure_from: f64,
    processed: u64,
    scratch_items: Vec<crate::perf::PrefillItem>,
    scratch_ids: Vec<u32>,
    /// Draws decode step times from the model's spread (its own stream, so that arrivals do not
    /// depend on it).
    spread_rng: Rng,
    /// Admission's predictor, queue and per-request records, when it is on.
    adm: Option<Box<admit::AdmState>>,
}

/// Runs the simulation to the last completion.
pub fn simulate(cfg: &SimConfig) -> Result<SimReport, SimError> {
    let sim = run(cfg)?;
    let warm = warm_up(cfg);
    let outcomes: Vec<Outcome> = (warm.min(sim.reqs.len())..sim.reqs.len())
        .map(|i| sim.outcome(i))
        .collect();
    let (check_ttft, check_tpot) = match cfg.phase {
        Phase::Full => (true, true),
        Phase::PrefillOnly => (true, false),
        Phase::DecodeOnly => (false, true),
    };
    let from = sim.measure_from;
    let steps = sim
        .steps
        .iter()
        .filter(|s| s.0 >= from)
        .map(|s| (s.1, s.2))
        .collect();
    Ok(summarise(
        &outcomes,
        steps,
        &cfg.slo,
        check_ttft,
        check_tpot,
        sim.processed,
    ))
}

/// Requests left out of the statistics while the cluster fills.
fn warm_up(cfg: &SimConfig) -> usize {
    (cfg.requests as f64 * cfg.warmup.clamp(0.0, 0.9)) as usize
}

/// The simulation itself, its final state returned for the statistics (and for tests).
fn run(cfg: &SimConfig) -> Result<Sim<'_>, SimError> {
    validate(cfg)?;
    let mut sim = Sim::new(cfg);
    let mut stream = RequestStream::new(&cfg.workload, cfg.seed);
    let warm = warm_up(cfg);
    if let Some(first) = stream.next() {
        sim.push_arrival(first);
    }
    while let Some(Reverse(ev)) = sim.events.pop() {
        sim.now = ev.time;
        sim.processed += 1;
        match ev.kind {
            Kind::Arrival(id) => {
                if id as usize == warm {
                    sim.measure_from = sim.reqs[id as usize].arrival;
                }
                if sim.reqs.len() < cfg.requests
                    && let Some(next) = stream.next()
                {
                    sim.push_arrival(next);
                }
                if sim.adm.is_some() {
                    sim.arrive(id);
                } else {
                    sim.pending.push_back(id);
                    sim.admit_pending();
                }
            }
            Kind::PrefillDone(p) => sim.on_prefill_done(p as usize),
            Kind::KvReady(id) => {
                let d = sim.reqs[id as usize].inst as usize;
                sim.decode[d].ready.push_back(id);
                if !sim.decode[d].busy {
                    sim.start_decode(d);
                }
            }
            Kind::DecodeDone(d) => sim.on_decode_done(d as usize),
            Kind::AggDone(a) => sim.on_agg_done(a as usize),
            Kind::Deadline(id) => sim.on_deadline(id),
        }
    }
    let unfinished = (0..sim.reqs.len())
        .any(|i| sim.reqs[i].finish.is_nan() && sim.adm.as_ref().is_none_or(|a| !a.rejected(i)));
    if unfinished {
        return Err(SimError::invalid(
            "simulation ended with unfinished requests (a request that fits no instance)",
        ));
    }
    Ok(sim)
}

fn validate(cfg: &SimConfig) -> Result<(), SimError> {
    cfg.workload.validate()?;
    if cfg.requests == 0 {
        return Err(SimError::invalid("a simulation needs at least one request"));
    }
    let (a, b): (&[InstanceSpec], &[InstanceSpec]) = match (&cfg.cluster, cfg.phase) {
        (Cluster::Aggregated { instances }, Phase::Full) => (instances, &[]),
        (Cluster::Aggregated { .. }, _) => {
            return Err(SimError::invalid(
                "role-only phases apply to disaggregated clusters",
            ));
        }
        (Cluster::Disaggregated { prefill, .. }, Phase::PrefillOnly) => (prefill, &[]),
        (Cluster::Disaggregated { decode, .. }, Phase::DecodeOnly) => (decode, &[]),
        (
            Cluster::Disaggregated {
                prefill, decode, ..
            },
            Phase::Full,
        ) => {
            if prefill.is_empty() {
                return Err(SimError::invalid(
                    "a disaggregated cluster needs a prefill instance",
                ));
            }
            (decode, prefill)
        }
    };
    if a.is_empty() {
        return Err(SimError::invalid(
            "the cluster has no instance for this phase",
        ));
    }
    if let Some(adm) = &cfg.admission {
        admit_config::validate(adm, cfg.phase)?;
    }
    let (longest_in, longest_out) = cfg.workload.longest();
    let need = blocks_for(u64::from(longest_in) + u64::from(longest_out));
    for i in a.iter().chain(b) {
        if i.max_running == 0 || i.max_batch_tokens == 0 {
            return Err(SimError::invalid("batch limits must be positive"));
        }
        if cfg.phase != Phase::PrefillOnly && i.model.memory().kv_blocks < need {
            return Err(SimError::DoesNotFit {
                model: i.model.describe(),
                reason: format!(
                    "the longest request needs {need} KV blocks; the instance holds {}",
                    i.model.memory().kv_blocks
                ),
            });
        }
    }
    Ok(())
}

impl<'a> Sim<'a> {
    fn new(cfg: &'a SimConfig) -> Self {
        let mut s = Sim {
            cfg,
            now: 0.0,
            seq: 0,
            events: BinaryHeap::new(),
            reqs: Vec::with_capacity(cfg.requests),
            pending: VecDeque::new(),
            prefill: Vec::new(),
            decode: Vec::new(),
            agg: Vec::new(),
            steps: Vec::new(),
            measure_from: 0.0,
            processed: 0,
            scratch_items: Vec::new(),
            scratch_ids: Vec::new(),
            spread_rng: Rng::new(cfg.seed ^ SPREAD_STREAM),
            adm: None,
        };
        match &cfg.cluster {
            Cluster::Disaggregated {
                prefill, decode, ..
            } => {
                s.prefill = prefill.iter().map(|_| PrefillInst::default()).collect();
                s.decode = decode
                    .iter()
                    .map(|d| DecodeInst::new(d.model.memory().kv_blocks))
                    .collect();
            }
            Cluster::Aggregated { instances } => {
                s.agg = instances
                    .iter()
                    .map(|d| AggInst::new(d.model.memory().kv_blocks))
                    .collect();
            }
        }
        s.adm = cfg
            .admission
            .as_ref()
            .map(|a| Box::new(admit::AdmState::new(a, &cfg.cluster, cfg.requests)));
        s
    }

    fn schedule(&mut self, time: f64, kind: Kind) {
        self.seq += 1;
        self.events.push(Reverse(Event {
            time,
            seq: self.seq,
            kind,
        }));
    }

    fn push_arrival(&mut self, r: crate::workload::RequestSpec) {
        let id = self.reqs.len() as u32;
        let blocks = blocks_for(u64::from(r.input) + u64::from(r.output));
        self.reqs.push(Req::new(r, blocks));
        if let Some(a) = self.adm.as_mut() {
            a.ticket_for(&r);
        }
        self.schedule(r.arrival, Kind::Arrival(id));
    }
}

#[cfg(test)]
mod tests;
