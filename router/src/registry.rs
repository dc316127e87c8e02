//! The worker registry and placement as a plain struct: no tasks, no clocks of its own (every
//! method that needs the time takes `now`), so that it is tested synchronously.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::v1::WorkerIdentity;

use tandem_sim::admission::calibrate::REGIMES;
use tandem_sim::admission::{
    Coefficients, Feedback as AdmissionFeedback, InFlight, Predictor, PredictorConfig,
    RegimeRatios, Rules, StepModel, StepSample,
};
use tandem_sim::perf::PerfModel;

use crate::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::candidates::Candidates;
use crate::convert::role_from_proto;
use crate::error::RouterError;
use crate::pending::Pending;
use crate::policy::Policy;
use crate::types::{Feedback, Leg, Load, RequestShape, Role, WorkerSet, WorkerState, WorkerView};

/// Registry settings.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// A worker not heard from for this long leaves the set.
    pub lease: Duration,
    /// Heartbeat interval the router asks workers for (a fraction of the lease).
    pub heartbeat_interval: Duration,
    /// How long a placement may take to show in the target's heartbeats; until then the router
    /// adds it to the reported load itself.
    pub report_lag: Duration,
    /// Most workers in the set.
    pub max_workers: usize,
    /// A prefill worker with this many queued prompt tokens takes no more work.
    pub max_queued_prefill_tokens: u64,
    /// Tokens per KV block, used when a worker's identity states no geometry.
    pub block_tokens: u32,
    /// Retry-after to suggest when there is no measured speed to estimate one from.
    pub default_retry_after: Duration,
    /// Latency-budget admission.
    pub admission: AdmissionConfig,
    /// How long a worker a gateway reported failed takes no new work (unless it registers
    /// again); its heartbeats after that list it again.
    pub suspect_for: Duration,
    /// When consecutive failures keep a worker out for longer ([`crate::breaker`]).
    pub breaker: BreakerConfig,
}

/// Settings of admission ([`tandem_sim::admission`]).
#[derive(Clone, Debug)]
pub struct AdmissionConfig {
    /// The rule: headroom left by sheddable work, the horizon of work without a budget.
    pub rules: Rules,
    /// The quantile predictions are bounded by, and the margin before measurements.
    pub predictor: PredictorConfig,
    /// The step-time model workers start from (a profile, or the simulated model's roofline);
    /// `None`: a linear form fitted to the steps the workers report.
    pub base: Option<Arc<dyn PerfModel>>,
    /// Prompt tokens per prefill step assumed for a worker whose identity states none.
    pub step_tokens: u32,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        AdmissionConfig {
            rules: Rules::default(),
            predictor: PredictorConfig::default(),
            base: None,
            step_tokens: 512,
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            lease: Duration::from_secs(3),
            // 250 ms (fresher prefill queues for admission) made served TTFT 13% slower on the
            // 2-core host (tests/e2e_sim_native): the reports' handling competes with the workers.
            heartbeat_interval: Duration::from_secs(1),
            report_lag: Duration::from_millis(250),
            max_workers: 4096,
            suspect_for: Duration::from_secs(5),
            breaker: BreakerConfig::default(),
            max_queued_prefill_tokens: 1 << 20,
            block_tokens: 16,
            default_retry_after: Duration::from_secs(1),
            admission: AdmissionConfig::default(),
        }
    }
}

/// A granted registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The worker's id (as sent, or assigned).
    pub worker_id: Arc<str>,
    /// How long the registration lasts without a heartbeat.
    pub lease: Duration,
    /// How often the worker should heartbeat.
    pub heartbeat_interval: Duration,
}

struct Worker {
    id: Arc<str>,
    identity: Arc<WorkerIdentity>,
    role: Role,
    reported: Load,
    /// When `reported` arrived: the queue it reports has drained since.
    reported_at: Instant,
    pending: Pending,
    lease_deadline: Instant,
    /// Reported failed by a gateway: no new work until then.
    suspect_until: Option<Instant>,
    /// What gateways saw of its calls.
    breaker: Breaker,
    /// Its recent steps against its role's model, and whether that put it out for a while.
    pace: outliers::Pace,
    ejected_until: Option<Instant>,
}

impl Worker {
    fn effective(&self) -> Load {
        self.pending.apply(&self.reported)
    }

    fn block_tokens(&self, fallback: u32) -> u64 {
        let bt = self
            .identity
            .geometry
            .as_ref()
            .map_or(0, |g| g.block_tokens);
        u64::from(if bt == 0 { fallback } else { bt })
    }

    fn step_tokens(&self, fallback: u32) -> u32 {
        match self.identity.step_tokens {
            0 => fallback,
            n => n,
        }
    }
}

/// One served model's ready workers, by role, and what admission predicts them with.
#[derive(Debug)]
struct ModelTables {
    prefill: Candidates,
    decode: Candidates,
    aggregated: Candidates,
    predictor: Predictor,
    in_flight: InFlight,
    /// The median pace of each role's workers ([`Role`] as index).
    peers: [outliers::Peers; 3],
}

impl ModelTables {
    fn new(cfg: &AdmissionConfig) -> Self {
        let model = || StepModel::new(cfg.base.clone());
        ModelTables {
            prefill: Candidates::default(),
            decode: Candidates::default(),
            aggregated: Candidates::default(),
            predictor: Predictor::new(model(), model(), model(), cfg.predictor),
            in_flight: InFlight::default(),
            peers: Default::default(),
        }
    }

    fn table(&mut self, role: Role) -> &mut Candidates {
        match role {
            Role::Prefill => &mut self.prefill,
            Role::Decode => &mut self.decode,
            Role::Aggregated => &mut self.aggregated,
        }
    }

    fn step_model(&mut self, role: Role) -> &mut StepModel {
        match role {
            Role::Prefill => &mut self.predictor.prefill,
            Role::Decode => &mut self.predictor.decode,
            Role::Aggregated => &mut self.predictor.aggregated,
        }
    }
}

/// One role's step-time model, for operators.
#[derive(Clone, Debug, PartialEq)]
pub struct RoleModel {
    pub role: Role,
    pub coefficients: Coefficients,
    /// Measured steps it is fitted to.
    pub samples: usize,
    /// Median and 90th percentile of |predicted/measured - 1| over recent steps.
    pub error: Option<(f64, f64)>,
}

/// What admission predicts one served model with, for operators.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelAdmission {
    pub model: String,
    /// Step-time models of prefill, decode and aggregated workers.
    pub roles: [RoleModel; 3],
    /// Calibration of TTFT and ITL by recent admitted requests, per load regime; a regime with too
    /// few measurements of its own borrows a quieter regime's.
    pub ttft: [Calibration; REGIMES],
    pub itl: [Calibration; REGIMES],
    /// Seconds of exposed KV transfer per prompt token.
    pub exposed_per_token: f64,
    /// Admitted requests whose end has not been reported yet.
    pub in_flight: usize,
    /// Of those, the ones whose first token has not been reported (the load regime's count).
    pub awaiting_first_token: usize,
}

/// How one load regime's predictions are calibrated: median = offset + slope x raw prediction,
/// bound = median + tail.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Calibration {
    /// Measurements the regime holds itself.
    pub samples: usize,
    pub slope: f64,
    pub offset_s: f64,
    pub tail_s: f64,
}

fn factors(r: &RegimeRatios) -> [Calibration; REGIMES] {
    let counts = r.counts();
    std::array::from_fn(|g| {
        let w = r.window(g as u8);
        let (slope, offset_s) = w.line_coefficients();
        Calibration {
            samples: counts[g],
            slope,
            offset_s,
            tail_s: w.tail(),
        }
    })
}

/// Registered workers, their leases and loads, and the candidate tables placement reads.
pub struct Registry {
    config: RegistryConfig,
    policy: Box<dyn Policy>,
    slots: Vec<Option<Worker>>,
    free_slots: Vec<u32>,
    by_id: HashMap<Arc<str>, u32>,
    models: HashMap<String, ModelTables>,
    version: u64,
    changed: bool,
    next_auto_id: u64,
    /// Zero of the step models' clock.
    epoch: Instant,
    /// The last placement's ticket.
    next_ticket: u64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("policy", &self.policy.name())
            .field("workers", &self.by_id.len())
            .field("version", &self.version)
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new(config: RegistryConfig, policy: Box<dyn Policy>) -> Self {
        Registry {
            config,
            policy,
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_id: HashMap::new(),
            models: HashMap::new(),
            version: 0,
            changed: false,
            next_auto_id: 0,
            epoch: Instant::now(),
            next_ticket: 0,
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Workers in the set, in any state.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Bumped on every change of membership or state.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// True once after any change of membership or state (for publishing the set).
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    /// Adds a worker, or replaces the registration of the same id.
    pub fn register(
        &mut self,
        mut identity: WorkerIdentity,
        load: Load,
        now: Instant,
    ) -> Result<Lease, RouterError> {
        let role = role_from_proto(identity.role)?;
        if identity.grpc_addr.is_empty() {
            return Err(RouterError::InvalidArgument("grpc_addr is empty".into()));
        }
        if identity.model.is_empty() {
            return Err(RouterError::InvalidArgument("model is empty".into()));
        }
        if role != Role::Prefill && identity.kv_endpoint.is_empty() {
            return Err(RouterError::InvalidArgument(
                "a decode worker needs a kv_endpoint".into(),
            ));
        }
        if identity.worker_id.is_empty() {
            identity.worker_id = self.fresh_id(role);
        }
        let existing = self.by_id.get(identity.worker_id.as_str()).copied();
        if existing.is_none() && self.by_id.len() >= self.config.max_workers {
            return Err(RouterError::TooManyWorkers(self.config.max_workers));
        }
        if let Some(slot) = existing {
            self.unlist(slot);
        }
        let id: Arc<str> = Arc::from(identity.worker_id.as_str());
        let worker = Worker {
            id: id.clone(),
            identity: Arc::new(identity),
            role,
            reported: load,
            reported_at: now,
            pending: Pending::default(),
            lease_deadline: now + self.config.lease,
            suspect_until: None,
            breaker: Breaker::default(),
            pace: outliers::Pace::default(),
            ejected_until: None,
        };
        let slot = match existing {
            Some(slot) => {
                self.slots[slot as usize] = Some(worker);
                slot
            }
            None => {
                let slot = match self.free_slots.pop() {
                    Some(slot) => {
                        self.slots[slot as usize] = Some(worker);
                        slot
                    }
                    None => {
                        self.slots.push(Some(worker));
                        (self.slots.len() - 1) as u32
                    }
                };
                self.by_id.insert(id.clone(), slot);
                slot
            }
        };
        self.list(slot);
        self.mark_changed();
        Ok(Lease {
            worker_id: id,
            lease: self.config.lease,
            heartbeat_interval: self.config.heartbeat_interval,
        })
    }

    /// Records a worker's load and renews its lease; returns the lease length.
    pub fn heartbeat(
        &mut self,
        id: &str,
        load: Load,
        now: Instant,
    ) -> Result<Duration, RouterError> {
        let slot = self.live_slot(id, now)?;
        let (lag, lease) = (self.config.report_lag, self.config.lease);
        let w = self.worker_mut(slot);
        let state_changed = w.reported.state != load.state;
        w.reported = load;
        w.reported_at = now;
        w.pending.settle(now, lag);
        w.lease_deadline = now + lease;
        if w.suspect_until.is_some_and(|t| now >= t) {
            w.suspect_until = None;
        }
        w.breaker.tick(now);
        if w.ejected_until.is_some_and(|t| now >= t) {
            w.ejected_until = None;
        }
        self.list(slot);
        if state_changed {
            self.mark_changed();
        }
        Ok(self.config.lease)
    }

    /// What a gateway saw of a call to the worker. A failure (a prefill or a stream broke, or the
    /// worker stopped sending) keeps new work away for [`RegistryConfig::suspect_for`], after
    /// which its heartbeats list it again, and counts toward its breaker; a success resets the
    /// count or closes a half-open breaker. Returns the breaker's new state when it changed.
    /// Unknown ids are ignored (the worker may have left already).
    pub fn report(&mut self, id: &str, ok: bool, now: Instant) -> Option<BreakerState> {
        let slot = *self.by_id.get(id)?;
        let (config, suspect_for) = (self.config.breaker, self.config.suspect_for);
        let w = self.worker_mut(slot);
        if !ok {
            w.suspect_until = Some(now + suspect_for);
        }
        w.breaker.tick(now);
        let admitted = w.breaker.admits();
        let changed = w.breaker.record(ok, now, &config);
        let relist = !ok || admitted != w.breaker.admits();
        if let Some(state) = changed {
            tracing::warn!(worker = id, state = state.as_str(), "circuit breaker");
        }
        if relist {
            // Only the candidate tables change: the published set does not show it.
            self.list(slot);
        }
        changed
    }

    /// The breaker of each worker, by id.
    pub fn breakers(&self) -> Vec<(Arc<str>, BreakerState)> {
        self.slots
            .iter()
            .flatten()
            .map(|w| (w.id.clone(), w.breaker.state()))
            .collect()
    }

    /// Feeds steps a worker measured to its role's step-time model, and to its pace against its
    /// peers' (a worker far slower than they is ejected for a while, [`outliers`]).
    /// Returns whether that ejected it.
    pub fn observe_steps(&mut self, id: &str, steps: &[StepSample], now: Instant) -> bool {
        let Some(&slot) = self.by_id.get(id) else {
            return false;
        };
        let w = self.worker(slot);
        let role = w.role;
        let model = w.identity.model.clone();
        let now_s = self.seconds(now);
        self.observe_pace(slot, role, steps);
        if let Some(t) = self.models.get_mut(&model) {
            t.step_model(role).observe_batch(steps, now_s);
        }
        !steps.is_empty() && self.judge_pace(slot, now)
    }

    /// Records what an admitted request measured against its placement's predictions.
    pub fn feedback(&mut self, fb: &Feedback) -> Result<(), RouterError> {
        if fb.raw_ttft.is_zero() {
            return Err(RouterError::InvalidArgument(
                "feedback without a predicted TTFT".into(),
            ));
        }
        let key = self.model_key(&fb.model)?;
        let Some(t) = self.models.get_mut(&key) else {
            return Ok(());
        };
        if fb.ttft.is_zero() {
            t.in_flight.ended(fb.ticket);
        } else {
            t.in_flight.first_token(fb.ticket);
        }
        t.predictor.observe(&AdmissionFeedback {
            prompt_tokens: fb.prompt_tokens,
            predicted_ttft_raw: fb.raw_ttft.as_secs_f64(),
            measured_ttft: fb.ttft.as_secs_f64(),
            predicted_itl_raw: fb.raw_itl.as_secs_f64(),
            measured_itl: fb.itl.map(|d| d.as_secs_f64()),
            exposed_transfer: fb.exposed_transfer.map(|d| d.as_secs_f64()),
            regime: fb.regime,
        });
        Ok(())
    }

    /// What admission predicts each served model with, ordered by model name.
    pub fn admission(&self) -> Vec<ModelAdmission> {
        let mut out: Vec<ModelAdmission> = self
            .models
            .iter()
            .map(|(name, t)| {
                let p = &t.predictor;
                let role = |role: Role, m: &StepModel| RoleModel {
                    role,
                    coefficients: m.coefficients(),
                    samples: m.samples(),
                    error: m.step_error(),
                };
                ModelAdmission {
                    model: name.clone(),
                    roles: [
                        role(Role::Prefill, &p.prefill),
                        role(Role::Decode, &p.decode),
                        role(Role::Aggregated, &p.aggregated),
                    ],
                    ttft: factors(&p.ttft),
                    itl: factors(&p.itl),
                    exposed_per_token: p.exposed_per_token(),
                    in_flight: t.in_flight.len(),
                    awaiting_first_token: t.in_flight.waiting(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.model.cmp(&b.model));
        out
    }

    /// Notes a request's shape in its model's predictor (the queue's prompt sizes).
    pub fn note_ask(&mut self, shape: &RequestShape) {
        if let Ok(key) = self.model_key(&shape.model)
            && let Some(t) = self.models.get_mut(&key)
        {
            t.predictor
                .note_ask(shape.prompt_tokens, shape.max_new_tokens);
        }
    }

    /// Removes a worker at once; false when it was not in the set.
    pub fn deregister(&mut self, id: &str) -> bool {
        match self.by_id.get(id).copied() {
            Some(slot) => {
                self.remove(slot);
                true
            }
            None => false,
        }
    }

    /// Removes every worker whose lease has run out by `now`; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<Arc<str>> {
        let lapsed: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(slot, w)| match w {
                Some(w) if w.lease_deadline <= now => Some(slot as u32),
                _ => None,
            })
            .collect();
        lapsed
            .into_iter()
            .filter_map(|slot| self.remove(slot))
            .collect()
    }

    /// The whole set, ordered by worker id.
    pub fn snapshot(&self, now: Instant) -> WorkerSet {
        let mut workers: Vec<WorkerView> = self
            .slots
            .iter()
            .flatten()
            .map(|w| WorkerView {
                identity: w.identity.clone(),
                role: w.role,
                load: w.reported,
                lease_left: w.lease_deadline.saturating_duration_since(now),
            })
            .collect();
        workers.sort_by(|a, b| a.identity.worker_id.cmp(&b.identity.worker_id));
        WorkerSet {
            version: self.version,
            workers,
        }
    }

    /// Puts a worker's current effective load into the tables of the legs it serves while ready,
    /// and takes it out of the others.
    fn list(&mut self, slot: u32) {
        let w = self.slots[slot as usize]
            .as_ref()
            .expect("listed slots are occupied");
        if !self.models.contains_key(&w.identity.model) {
            self.models.insert(
                w.identity.model.clone(),
                ModelTables::new(&self.config.admission),
            );
        }
        let Some(tables) = self.models.get_mut(&w.identity.model) else {
            return;
        };
        let eff = w.effective();
        let t = tables.table(w.role);
        let kept_out = w.suspect_until.is_some() || w.ejected_until.is_some();
        if w.reported.state == WorkerState::Ready && !kept_out && w.breaker.admits() {
            // An aggregated worker is chosen for its prompt's wait, as a prefill worker is.
            let leg = match w.role {
                Role::Decode => Leg::Decode,
                Role::Prefill | Role::Aggregated => Leg::Prefill,
            };
            t.upsert(w.id.clone(), slot, eff, self.policy.score(leg, &eff));
        } else {
            t.remove(&w.id);
        }
    }

    fn unlist(&mut self, slot: u32) {
        let w = self.slots[slot as usize]
            .as_ref()
            .expect("listed slots are occupied");
        if let Some(tables) = self.models.get_mut(&w.identity.model) {
            tables.table(w.role).remove(&w.id);
        }
    }

    fn remove(&mut self, slot: u32) -> Option<Arc<str>> {
        self.slots.get(slot as usize)?.as_ref()?;
        self.unlist(slot);
        let w = self.slots[slot as usize].take()?;
        self.by_id.remove(&w.id);
        self.free_slots.push(slot);
        self.mark_changed();
        Some(w.id)
    }

    /// The slot of a worker whose lease is still running; a lapsed one is removed on the spot.
    fn live_slot(&mut self, id: &str, now: Instant) -> Result<u32, RouterError> {
        let unknown = || RouterError::UnknownWorker(id.to_owned());
        let slot = self.by_id.get(id).copied().ok_or_else(unknown)?;
        if self.worker(slot).lease_deadline <= now {
            self.remove(slot);
            return Err(unknown());
        }
        Ok(slot)
    }

    fn worker(&self, slot: u32) -> &Worker {
        self.slots[slot as usize]
            .as_ref()
            .expect("slots named by tables and by_id are occupied")
    }

    fn worker_mut(&mut self, slot: u32) -> &mut Worker {
        self.slots[slot as usize]
            .as_mut()
            .expect("slots named by tables and by_id are occupied")
    }

    /// An id no registered worker has, for workers that register without one.
    fn fresh_id(&mut self, role: Role) -> String {
        loop {
            self.next_auto_id += 1;
            let id = format!("{}-{}", role.as_str(), self.next_auto_id);
            if !self.by_id.contains_key(id.as_str()) {
                return id;
            }
        }
    }

    fn mark_changed(&mut self) {
        self.version += 1;
        self.changed = true;
    }
}

mod outliers;
mod place;
mod regime;

pub use place::Decision;
pub(crate) use place::ask_budget;

#[cfg(test)]
pub(crate) mod tests;

#[cfg(test)]
pub(crate) mod admission_tests;
