//! Latency-budget admission in the simulator: the router's prediction ([`Predictor`]), rule
//! ([`crate::admission::judge`]) and queue ([`DeadlineQueue`]) run on the simulated instances, so
//! that a plan predicts the share a cluster rejects with the code that rejects it.
//!
//! What the router does and how this mirrors it:
//! * At arrival the request's shape is noted, then it is decided at once (work without a TTFT
//!   budget waits behind budgeted work already waiting, as in the router's task). The candidates
//!   and their loads are built in [`super::choice`].
//! * `Wait`: the request joins a bounded [`DeadlineQueue`] ordered by class, then deadline; a full
//!   queue evicts its least urgent entry or refuses the newcomer (`queue_full`). Waiting requests
//!   are decided again, in queue order and with their TTFT budget less the time waited, whenever a
//!   step completes (the router: after every heartbeat and every 10 ms), and refused at their
//!   deadline with the reason of their last decision.
//! * Admitted requests feed back their TTFT (measured from their placement, as the gateway
//!   measures it) and mean ITL when they finish, against the raw predictions made for them, so
//!   that the predictor's calibration evolves as the router's does.
//!
//! What the simulator cannot mirror exactly:
//! * The router reads loads from heartbeats (about a second old, prefill queues drained by the
//!   predicted speed since) plus its own charges of placements not yet reported; the simulator
//!   reads each instance's exact state, a prefill step in flight counted in full until it ends.
//! * Waiting requests are decided again the moment a step ends, before any later arrival; in the
//!   router an arrival between two retries (10 ms apart) may take room that frees first.
//! * The step models learn from every simulated step as it starts; the router sees a sample of at
//!   most 32 steps per worker per heartbeat.
//! * KV room: the decode worker reserves prompt plus answer, and so does the simulator; the
//!   router's own check (and charge) counts the prompt's blocks only.
//! * A simulated first token comes with the prompt's last step, its KV transfer after it, while
//!   the gateway's comes once the transfer is done: the exposed transfer the predictor adds (a
//!   link's latency on InfiniBand, microseconds) is not in the TTFT fed back here.
//! * One predictor serves the run (the router keeps one per served model), its step models based
//!   on the first instance of each role.
//! * A cluster is disaggregated or aggregated here, never both, so the router's choice between
//!   the two paths does not arise.
//! * A request admission cannot predict (no step model fitted: cannot happen with a base model)
//!   is placed as without admission, FCFS when KV is short.

use crate::admission::queue::class;
use crate::admission::{
    Budget, DeadlineQueue, Feedback, InFlight, Prediction, Predictor, Pushed, QueueKey,
    RejectReason, StepModel, StepSample,
};
use crate::perf::PrefillItem;
use crate::stats::Outcome;
use crate::workload::RequestSpec;

use super::admit_config::AdmissionConfig;
use super::choice::Decision;
use super::state::Kind;
use super::{Cluster, Sim};

/// Whose step a measured step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Prefill,
    Decode,
    Aggregated,
}

/// Where a request stands with admission.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Status {
    Arriving,
    /// In the queue under `key`, to leave by `until` or be refused for `reason`.
    Waiting {
        key: QueueKey,
        until: f64,
        reason: RejectReason,
    },
    /// Placed on admission's verdict at `at`, with what was predicted.
    Placed {
        at: f64,
        prediction: Prediction,
    },
    /// Placed without a prediction (no step model yet).
    Unpredicted,
    Rejected {
        reason: RejectReason,
        at: f64,
    },
}

/// One request's record.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ticket {
    pub budget: Budget,
    pub status: Status,
    /// KV transfer left exposed after its prefill (disaggregated).
    pub exposed: Option<f64>,
}

/// Admission's state for a run.
#[derive(Debug)]
pub(super) struct AdmState {
    pub cfg: AdmissionConfig,
    pub predictor: Predictor,
    pub queue: DeadlineQueue<u32>,
    pub tickets: Vec<Ticket>,
    /// Placed requests until their end, and those waiting for their first token (the load regime).
    pub in_flight: InFlight,
}

impl AdmState {
    pub fn new(cfg: &AdmissionConfig, cluster: &Cluster, requests: usize) -> Self {
        let base = |v: &[super::InstanceSpec]| StepModel::new(v.first().map(|i| i.model.clone()));
        let (p, d, a) = match cluster {
            Cluster::Disaggregated {
                prefill, decode, ..
            } => (base(prefill), base(decode), base(prefill)),
            Cluster::Aggregated { instances } => {
                (base(instances), base(instances), base(instances))
            }
        };
        let mut predictor = Predictor::new(p, d, a, cfg.predictor);
        predictor.assume_calibrated();
        AdmState {
            cfg: cfg.clone(),
            predictor,
            queue: DeadlineQueue::new(cfg.queue.max(1)),
            tickets: Vec::with_capacity(requests),
            in_flight: InFlight::default(),
        }
    }

    pub fn ticket_for(&mut self, r: &RequestSpec) {
        self.tickets.push(Ticket {
            budget: r.budget.unwrap_or(self.cfg.budget),
            status: Status::Arriving,
            exposed: None,
        });
    }

    pub fn rejected(&self, i: usize) -> bool {
        matches!(self.tickets[i].status, Status::Rejected { .. })
    }
}

/// A deadline on the queue's clock (microseconds of simulated time).
fn deadline_us(until: f64) -> u64 {
    (until.max(0.0) * 1e6) as u64
}

impl Sim<'_> {
    /// The ITL budget a request brings to its decode instance.
    pub(super) fn itl_budget(&self, id: u32) -> Option<f64> {
        self.adm.as_ref()?.tickets[id as usize].budget.itl
    }

    /// A new request: decided at once, or queued behind budgeted work when it has no budget.
    pub(super) fn arrive(&mut self, id: u32) {
        let r = self.reqs[id as usize];
        let prompts = self.prefill.len() + self.agg.len();
        let Some(a) = self.adm.as_deref_mut() else {
            return;
        };
        a.predictor.note_ask(r.input, r.output);
        let budget = a.tickets[id as usize].budget;
        let decision = if budget.ttft.is_none() && a.queue.holds_before(3) {
            Decision::Wait {
                until: r.arrival + a.cfg.rules.horizon_s,
                reason: RejectReason::QueueFull,
            }
        } else {
            let regime = a.in_flight.regime(self.now, prompts);
            match self.adm.as_deref() {
                Some(a) => self.decide(a, regime, id, budget),
                None => return,
            }
        };
        self.act(id, decision, None);
    }

    /// Decides every waiting request again, most urgent first.
    pub(super) fn retry_waiting(&mut self) {
        let prompts = self.prefill.len() + self.agg.len();
        let keys: Vec<(QueueKey, u32)> = match self.adm.as_deref() {
            Some(a) if !a.queue.is_empty() => a.queue.iter().map(|(k, v)| (*k, *v)).collect(),
            _ => return,
        };
        for (key, id) in keys {
            let arrival = self.reqs[id as usize].arrival;
            let Some(a) = self.adm.as_deref_mut() else {
                return;
            };
            if a.queue.remove(&key).is_none() {
                continue;
            }
            let t = a.tickets[id as usize];
            let Status::Waiting { until, reason, .. } = t.status else {
                continue;
            };
            if until <= self.now {
                self.reject(id, reason);
                continue;
            }
            let waited = self.now - arrival;
            let mut budget = t.budget;
            budget.ttft = budget.ttft.map(|b| (b - waited).max(0.0));
            let decision = if budget.ttft.is_none() && a.queue.holds_before(3) {
                Decision::Wait { until, reason }
            } else {
                let regime = a.in_flight.regime(self.now, prompts);
                match self.adm.as_deref() {
                    Some(a) => self.decide(a, regime, id, budget),
                    None => return,
                }
            };
            self.act(id, decision, Some(key));
        }
    }

    /// Carries out a decision; `requeue`: the key of the queue entry being decided again.
    fn act(&mut self, id: u32, decision: Decision, requeue: Option<QueueKey>) {
        match decision {
            Decision::Place { p, d, prediction } => {
                let now = self.now;
                let tokens = self.reqs[id as usize].output;
                if let Some(a) = self.adm.as_deref_mut() {
                    a.in_flight.placed(u64::from(id), now, &prediction, tokens);
                }
                self.set_status(
                    id,
                    Status::Placed {
                        at: self.now,
                        prediction,
                    },
                );
                self.place_at(id, p, d);
            }
            Decision::Wait { until, reason } => self.wait(id, until, reason, requeue),
            Decision::Reject(reason) => self.reject(id, reason),
            Decision::Unpredicted => {
                self.set_status(id, Status::Unpredicted);
                self.pending.push_back(id);
                self.admit_pending();
            }
        }
    }

    fn wait(&mut self, id: u32, until: f64, reason: RejectReason, requeue: Option<QueueKey>) {
        let now = self.now;
        let Some(a) = self.adm.as_deref_mut() else {
            return;
        };
        let t = &mut a.tickets[id as usize];
        // A request decided again keeps its place (class and first deadline) and the earlier of
        // its deadlines.
        let (class, deadline, until) = match (requeue, t.status) {
            (Some(key), Status::Waiting { until: was, .. }) => {
                (key.class, key.deadline_us, until.min(was))
            }
            _ => (class(&t.budget), deadline_us(until), until),
        };
        let moved = match t.status {
            Status::Waiting { until: was, .. } => until < was,
            _ => true,
        };
        let mut refuse = None;
        match a.queue.push(class, deadline, id) {
            Pushed::Queued(key) => {
                t.status = Status::Waiting { key, until, reason };
            }
            Pushed::Evicted(key, out) => {
                t.status = Status::Waiting { key, until, reason };
                refuse = Some(out);
            }
            // Not for a requeued entry, whose own place was just freed.
            Pushed::Full(_) => {
                self.reject(id, RejectReason::QueueFull);
                return;
            }
        }
        if moved {
            self.schedule(until.max(now), Kind::Deadline(id));
        }
        if let Some(out) = refuse {
            self.reject(out, RejectReason::QueueFull);
        }
    }

    fn reject(&mut self, id: u32, reason: RejectReason) {
        let at = self.now;
        self.set_status(id, Status::Rejected { reason, at });
    }

    fn set_status(&mut self, id: u32, status: Status) {
        if let Some(a) = self.adm.as_deref_mut() {
            a.tickets[id as usize].status = status;
        }
    }

    /// A waiting request's deadline: refused if it still waits and its deadline has come (a
    /// deadline only ever moves earlier, and each move schedules its own event).
    pub(super) fn on_deadline(&mut self, id: u32) {
        let Some(a) = self.adm.as_deref_mut() else {
            return;
        };
        if let Status::Waiting { key, until, reason } = a.tickets[id as usize].status
            && until <= self.now
        {
            a.queue.remove(&key);
            self.reject(id, reason);
        }
    }

    /// A request's first token: it no longer waits for a prefill (the load regime's count).
    pub(super) fn first_token(&mut self, id: u32) {
        if let Some(a) = self.adm.as_deref_mut() {
            a.in_flight.first_token(u64::from(id));
        }
    }

    /// A request finished: its ITL budget leaves its instance, and an admitted one reports what
    /// it measured against what was predicted for it (as the gateway does).
    pub(super) fn finished(&mut self, id: u32) {
        let r = self.reqs[id as usize];
        let Some(a) = self.adm.as_deref_mut() else {
            return;
        };
        let t = a.tickets[id as usize];
        a.in_flight.ended(u64::from(id));
        if let Some(b) = t.budget.itl {
            match self.cfg.cluster {
                Cluster::Aggregated { .. } => self.agg[r.inst as usize].itl.remove(b),
                Cluster::Disaggregated { .. } => self.decode[r.inst as usize].itl.remove(b),
            }
        }
        if let Status::Placed { at, prediction } = t.status {
            a.predictor.observe(&Feedback {
                prompt_tokens: r.input,
                predicted_ttft_raw: prediction.ttft_raw,
                measured_ttft: r.first - at,
                predicted_itl_raw: prediction.itl_raw,
                measured_itl: (r.output > 1)
                    .then(|| (r.finish - r.first) / f64::from(r.output - 1)),
                exposed_transfer: t.exposed,
                regime: prediction.regime,
            });
        }
    }

    pub(super) fn note_exposed(&mut self, id: u32, exposed: f64) {
        if let Some(a) = self.adm.as_deref_mut() {
            a.tickets[id as usize].exposed = Some(exposed);
        }
    }

    /// A step as the worker measures it, for its role's step model.
    pub(super) fn observe_step(
        &mut self,
        role: Role,
        chunks: &[PrefillItem],
        decode_batch: u32,
        decode_context: u64,
        seconds: f64,
    ) {
        if let Some(a) = self.adm.as_deref_mut() {
            let m = match role {
                Role::Prefill => &mut a.predictor.prefill,
                Role::Decode => &mut a.predictor.decode,
                Role::Aggregated => &mut a.predictor.aggregated,
            };
            m.observe(StepSample::new(
                chunks,
                decode_batch,
                decode_context,
                seconds,
            ));
        }
    }

    /// What request `i` did, for the statistics.
    pub(super) fn outcome(&self, i: usize) -> Outcome {
        let r = &self.reqs[i];
        let mut o = Outcome {
            arrival: r.arrival,
            first: r.first,
            finish: r.finish,
            output: r.output,
            rejected: None,
            predicted_ttft: None,
        };
        if let Some(a) = self.adm.as_deref() {
            match a.tickets[i].status {
                Status::Rejected { reason, at } => o.rejected = Some((reason, at)),
                // What the gateway tells the client: the median, plus the time in the queue.
                Status::Placed { at, prediction } => {
                    o.predicted_ttft = Some(prediction.ttft + (at - r.arrival));
                }
                _ => {}
            }
        }
        o
    }
}

#[cfg(test)]
#[path = "admit_tests.rs"]
mod tests;
