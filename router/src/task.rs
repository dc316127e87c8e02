//! The one task that owns the registry and admission's queue. Everything else talks to it through
//! a cloneable [`RouterHandle`] over a bounded channel; a full channel fails fast with
//! [`RouterError::Busy`].
//!
//! A request that admission makes wait (a decode worker's KV or ITL headroom is short, or it has
//! no budget and the cluster is past its horizon) stays in a bounded [`DeadlineQueue`] with its
//! reply: it is decided again in queue order after every heartbeat and every few milliseconds, and
//! refused as soon as its budget can no longer be met. A caller that goes away drops out.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::v1::WorkerIdentity;
use tandem_sim::admission::{DeadlineQueue, Pushed, RejectReason, queue::class};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;

use crate::error::RouterError;
use crate::metrics::AdmissionMetrics;
use crate::policy::Policy;
use crate::registry::{Decision, Lease, ModelAdmission, Registry, RegistryConfig};
use crate::types::{Feedback, Load, Placement, RequestShape, WorkerSet};
use tandem_sim::admission::StepSample;

/// Settings of the router task.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Leases, limits, placement and admission settings.
    pub registry: RegistryConfig,
    /// Commands that may wait for the task before callers get `Busy`.
    pub queue: usize,
    /// How often lapsed leases are swept (placement also skips lapsed workers between sweeps).
    pub sweep_interval: Duration,
    /// Requests that may wait in admission's queue.
    pub admission_queue: usize,
    /// How often waiting requests are decided again between heartbeats.
    pub retry_interval: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            registry: RegistryConfig::default(),
            queue: 1024,
            sweep_interval: Duration::from_millis(250),
            admission_queue: 256,
            retry_interval: Duration::from_millis(10),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, RouterError>>;

enum Command {
    Register {
        identity: WorkerIdentity,
        load: Load,
        steps: Vec<StepSample>,
        reply: Reply<Lease>,
    },
    Heartbeat {
        worker_id: String,
        load: Load,
        steps: Vec<StepSample>,
        reply: Reply<Duration>,
    },
    Deregister {
        worker_id: String,
        reply: Reply<bool>,
    },
    Place {
        shape: RequestShape,
        arrived: Instant,
        reply: Reply<Placement>,
    },
    Feedback {
        feedback: Feedback,
    },
    Report {
        worker_id: String,
        ok: bool,
    },
    PlacePrefill {
        shape: RequestShape,
        reply: Reply<Arc<WorkerIdentity>>,
    },
}

/// A cheap, cloneable handle to the router task. The task stops when every handle is dropped.
#[derive(Clone, Debug)]
pub struct RouterHandle {
    tx: mpsc::Sender<Command>,
    workers: watch::Receiver<Arc<WorkerSet>>,
    admission: watch::Receiver<Arc<Vec<ModelAdmission>>>,
    metrics: Arc<AdmissionMetrics>,
}

/// Starts the router task on the current tokio runtime.
pub fn spawn(config: RouterConfig, policy: Box<dyn Policy>) -> RouterHandle {
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let (publish, workers) = watch::channel(Arc::new(WorkerSet::default()));
    let (publish_admission, admission) = watch::channel(Arc::new(Vec::new()));
    let metrics = Arc::new(AdmissionMetrics::default());
    let task = Task {
        registry: Registry::new(config.registry.clone(), policy),
        waiting: DeadlineQueue::new(config.admission_queue.max(1)),
        epoch: now(),
        metrics: metrics.clone(),
        publish,
        publish_admission,
        admission_published: None,
    };
    tokio::spawn(task.run(rx, config.sweep_interval, config.retry_interval));
    RouterHandle {
        tx,
        workers,
        admission,
        metrics,
    }
}

impl RouterHandle {
    /// Adds a worker, or refreshes the registration of the same id.
    pub async fn register(
        &self,
        identity: WorkerIdentity,
        load: Load,
    ) -> Result<Lease, RouterError> {
        self.register_with_steps(identity, load, Vec::new()).await
    }

    /// A registration that also carries the steps the worker measured (its warm-up).
    pub async fn register_with_steps(
        &self,
        identity: WorkerIdentity,
        load: Load,
        steps: Vec<StepSample>,
    ) -> Result<Lease, RouterError> {
        self.call(|reply| Command::Register {
            identity,
            load,
            steps,
            reply,
        })
        .await
    }

    /// Records a worker's load and renews its lease; returns the lease length.
    pub async fn heartbeat(&self, worker_id: String, load: Load) -> Result<Duration, RouterError> {
        self.heartbeat_with_steps(worker_id, load, Vec::new()).await
    }

    /// A heartbeat that also carries the steps the worker measured since the last one.
    pub async fn heartbeat_with_steps(
        &self,
        worker_id: String,
        load: Load,
        steps: Vec<StepSample>,
    ) -> Result<Duration, RouterError> {
        self.call(|reply| Command::Heartbeat {
            worker_id,
            load,
            steps,
            reply,
        })
        .await
    }

    /// Removes a worker at once; false when it was not in the set.
    pub async fn deregister(&self, worker_id: String) -> Result<bool, RouterError> {
        self.call(|reply| Command::Deregister { worker_id, reply })
            .await
    }

    /// Chooses a prefill and a decode worker for a request, or refuses it; may wait in admission's
    /// queue first (never past the request's budget).
    pub async fn place(&self, shape: RequestShape) -> Result<Placement, RouterError> {
        let arrived = now();
        self.call(|reply| Command::Place {
            shape,
            arrived,
            reply,
        })
        .await
    }

    /// Reports what an admitted request measured; dropped when the task is busy (best effort).
    pub fn feedback(&self, feedback: Feedback) {
        let _ = self.tx.try_send(Command::Feedback { feedback });
    }

    /// Reports that a call to a worker succeeded, or failed (a prefill or a stream broke, or the
    /// worker stopped sending): a failure keeps new work away for a while and counts toward the
    /// worker's circuit breaker. Dropped when the task is busy (best effort).
    pub fn report(&self, worker_id: &str, ok: bool) {
        let _ = self.tx.try_send(Command::Report {
            worker_id: worker_id.to_owned(),
            ok,
        });
    }

    /// Another prefill worker for a request whose prefill failed, none of `shape.exclude`.
    pub async fn place_prefill(
        &self,
        shape: RequestShape,
    ) -> Result<Arc<WorkerIdentity>, RouterError> {
        self.call(|reply| Command::PlacePrefill { shape, reply })
            .await
    }

    /// The current worker set.
    pub fn workers(&self) -> Arc<WorkerSet> {
        self.workers.borrow().clone()
    }

    /// A receiver that sees every new worker set (joins, leaves, state changes).
    pub fn subscribe(&self) -> watch::Receiver<Arc<WorkerSet>> {
        self.workers.clone()
    }

    /// What admission predicts each served model with (published at most twice a second).
    pub fn admission(&self) -> Arc<Vec<ModelAdmission>> {
        self.admission.borrow().clone()
    }

    /// Admission's counters.
    pub fn metrics(&self) -> &AdmissionMetrics {
        &self.metrics
    }

    /// Appends admission's metrics as Prometheus text.
    pub fn render_metrics(&self, out: &mut String) {
        self.metrics.render(out, &self.admission());
    }

    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, RouterError> {
        let (reply, answer) = oneshot::channel();
        self.tx.try_send(command(reply)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => RouterError::Busy,
            mpsc::error::TrySendError::Closed(_) => RouterError::Stopped,
        })?;
        answer.await.map_err(|_| RouterError::Stopped)?
    }
}

fn now() -> Instant {
    // tokio's clock, so that tests with paused time drive leases.
    tokio::time::Instant::now().into_std()
}

/// A request waiting in admission's queue.
struct Waiting {
    shape: RequestShape,
    arrived: Instant,
    /// When it must leave the queue to still meet its budget, and why it is refused then.
    until: Instant,
    reason: RejectReason,
    predicted_ttft: Option<Duration>,
    reply: Reply<Placement>,
}

struct Task {
    registry: Registry,
    waiting: DeadlineQueue<Waiting>,
    /// Zero of the queue's deadlines.
    epoch: Instant,
    metrics: Arc<AdmissionMetrics>,
    publish: watch::Sender<Arc<WorkerSet>>,
    publish_admission: watch::Sender<Arc<Vec<ModelAdmission>>>,
    admission_published: Option<Instant>,
}

impl Task {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Command>,
        sweep_interval: Duration,
        retry_interval: Duration,
    ) {
        let mut sweep = tokio::time::interval(sweep_interval.max(Duration::from_millis(1)));
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(retry_interval.max(Duration::from_millis(1)));
        retry.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = rx.recv() => match command {
                    Some(command) => self.handle(command, now()),
                    None => break,
                },
                _ = sweep.tick() => {
                    for id in self.registry.expire(now()) {
                        tracing::info!(worker_id = %id, "worker lease lapsed; removed");
                    }
                }
                _ = retry.tick(), if !self.waiting.is_empty() => self.retry_waiting(now()),
            }
            if self.registry.take_changed() {
                self.publish
                    .send_replace(Arc::new(self.registry.snapshot(now())));
            }
        }
    }

    fn handle(&mut self, command: Command, now: Instant) {
        // A reply that cannot be sent means the caller left; nothing is left to undo but the
        // placement's optimistic charge, which the next heartbeat clears.
        match command {
            Command::Register {
                identity,
                load,
                steps,
                reply,
            } => {
                let answer = self.registry.register(identity, load, now);
                if let Ok(lease) = &answer {
                    // Without steps this still lets an idle role's level settle.
                    if self.registry.observe_steps(&lease.worker_id, &steps, now) {
                        self.metrics.ejected();
                    }
                    if !steps.is_empty() {
                        self.publish_admission(now);
                    }
                }
                let _ = reply.send(answer);
            }
            Command::Heartbeat {
                worker_id,
                load,
                steps,
                reply,
            } => {
                let answer = self.registry.heartbeat(&worker_id, load, now);
                if answer.is_ok() {
                    if self.registry.observe_steps(&worker_id, &steps, now) {
                        self.metrics.ejected();
                    }
                    if !steps.is_empty() {
                        self.publish_admission(now);
                    }
                }
                let _ = reply.send(answer);
                self.retry_waiting(now);
            }
            Command::Deregister { worker_id, reply } => {
                let _ = reply.send(Ok(self.registry.deregister(&worker_id)));
            }
            Command::Place {
                shape,
                arrived,
                reply,
            } => {
                if !reply.is_closed() {
                    self.registry.note_ask(&shape);
                    self.place(shape, arrived, reply, now);
                }
            }
            Command::Report { worker_id, ok } => {
                if !ok {
                    tracing::warn!(worker = %worker_id, "worker reported failed; no new work for a while");
                }
                if let Some(state) = self.registry.report(&worker_id, ok, now) {
                    self.metrics.breaker_went(state);
                }
            }
            Command::PlacePrefill { shape, reply } => {
                let _ = reply.send(self.registry.place_prefill(&shape, now));
            }
            Command::Feedback { feedback } => {
                if let Err(e) = self.registry.feedback(&feedback) {
                    tracing::debug!(error = %e, "feedback ignored");
                }
            }
        }
    }

    /// Decides a new request: answered at once, or queued.
    fn place(
        &mut self,
        shape: RequestShape,
        arrived: Instant,
        reply: Reply<Placement>,
        now: Instant,
    ) {
        let priority = shape.priority;
        let horizon = self.registry.config().admission.rules.horizon_s;
        // Work without a budget waits behind budgeted work already waiting.
        let behind = shape.ttft_budget.is_none() && self.waiting.holds_before(3);
        let decision = if behind {
            Ok(Decision::Wait {
                until: arrived + Duration::from_secs_f64(horizon),
                reason: RejectReason::QueueFull,
                predicted_ttft: None,
            })
        } else {
            self.registry.decide(&shape, now)
        };
        match decision {
            Ok(Decision::Placed(p)) => {
                self.metrics.admit(priority);
                let _ = reply.send(Ok(p));
            }
            Ok(Decision::Wait {
                until,
                reason,
                predicted_ttft,
            }) => {
                let class = class(&crate::registry::ask_budget(&shape));
                let deadline = self.deadline_us(until);
                let w = Waiting {
                    shape,
                    arrived,
                    until,
                    reason,
                    predicted_ttft,
                    reply,
                };
                match self.waiting.push(class, deadline, w) {
                    Pushed::Queued(_) => self.metrics.queue(priority),
                    Pushed::Evicted(_, out) => {
                        self.metrics.queue(priority);
                        self.refuse_full(out, now);
                    }
                    Pushed::Full(w) => self.refuse_full(w, now),
                }
                self.metrics.set_queue_depth(self.waiting.len());
            }
            Err(e) => {
                if let RouterError::Rejected { reason, .. } = &e {
                    self.metrics.reject(*reason, priority);
                }
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Decides every waiting request again, most urgent first.
    fn retry_waiting(&mut self, now: Instant) {
        if self.waiting.is_empty() {
            return;
        }
        let keys: Vec<_> = self.waiting.iter().map(|(k, _)| *k).collect();
        for key in keys {
            let Some(mut w) = self.waiting.remove(&key) else {
                continue;
            };
            if w.reply.is_closed() {
                continue;
            }
            let priority = w.shape.priority;
            if w.until <= now {
                self.refuse(w, now);
                continue;
            }
            let waited = now.saturating_duration_since(w.arrived);
            let mut shape = w.shape.clone();
            shape.ttft_budget = shape.ttft_budget.map(|b| b.saturating_sub(waited));
            let behind = shape.ttft_budget.is_none() && self.waiting.holds_before(3);
            if behind {
                self.requeue(key, w);
                continue;
            }
            match self.registry.decide(&shape, now) {
                Ok(Decision::Placed(p)) => {
                    self.metrics.admit(priority);
                    let _ = w.reply.send(Ok(p));
                }
                Ok(Decision::Wait {
                    until,
                    reason,
                    predicted_ttft,
                }) => {
                    w.until = w.until.min(until);
                    w.reason = reason;
                    w.predicted_ttft = predicted_ttft;
                    self.requeue(key, w);
                }
                Err(e) => {
                    if let RouterError::Rejected { reason, .. } = &e {
                        self.metrics.reject(*reason, priority);
                    }
                    let _ = w.reply.send(Err(e));
                }
            }
        }
        self.metrics.set_queue_depth(self.waiting.len());
    }

    /// Puts an entry back under its own key's order (its class and first deadline).
    fn requeue(&mut self, key: tandem_sim::admission::QueueKey, w: Waiting) {
        if let Pushed::Full(w) | Pushed::Evicted(_, w) =
            self.waiting.push(key.class, key.deadline_us, w)
        {
            // Cannot happen: the entry's own place was just freed. Refuse rather than lose it.
            let _ = w.reply.send(Err(RouterError::Busy));
        }
    }

    /// Refuses a waiting request whose budget can no longer be met.
    fn refuse(&mut self, w: Waiting, _now: Instant) {
        self.metrics.reject(w.reason, w.shape.priority);
        let detail = match w.reason {
            RejectReason::ItlBudgetUnreachable => {
                "no decode worker could take the sequence within its ITL budget in time"
            }
            RejectReason::TtftBudgetUnreachable => {
                "no decode worker had room for the request in time to meet its TTFT budget"
            }
            RejectReason::QueueFull => {
                "the cluster stayed past its horizon for work without a budget"
            }
        };
        let _ = w.reply.send(Err(RouterError::Rejected {
            reason: w.reason,
            detail: detail.into(),
            retry_after: Some(self.registry.config().default_retry_after),
            predicted_ttft: w.predicted_ttft,
        }));
    }

    /// Refuses a request the full queue has no room for.
    fn refuse_full(&mut self, w: Waiting, now: Instant) {
        self.metrics
            .reject(RejectReason::QueueFull, w.shape.priority);
        // The backlog drains by the time the last waiting request must have left.
        let drain = self
            .waiting
            .iter()
            .map(|(_, x)| x.until.saturating_duration_since(now))
            .max()
            .unwrap_or_default()
            .max(self.registry.config().default_retry_after);
        let _ = w.reply.send(Err(RouterError::Rejected {
            reason: RejectReason::QueueFull,
            detail: format!(
                "the admission queue holds {} requests at least as urgent",
                self.waiting.len()
            ),
            retry_after: Some(drain),
            predicted_ttft: w.predicted_ttft,
        }));
    }

    fn deadline_us(&self, until: Instant) -> u64 {
        u64::try_from(until.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }

    /// Publishes what admission predicts with, at most twice a second.
    fn publish_admission(&mut self, now: Instant) {
        if self
            .admission_published
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_millis(500))
        {
            return;
        }
        self.admission_published = Some(now);
        self.publish_admission
            .send_replace(Arc::new(self.registry.admission()));
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use tandem_proto::v1::{WorkerIdentity, WorkerRole};

    use super::*;
    use crate::policy::LeastLoaded;
    use crate::types::WorkerState;

    fn identity(id: &str, role: WorkerRole) -> WorkerIdentity {
        WorkerIdentity {
            worker_id: id.into(),
            role: role.into(),
            grpc_addr: "a:1".into(),
            kv_endpoint: "a:2".into(),
            model: "m".into(),
            ..WorkerIdentity::default()
        }
    }

    fn ready(free: u64) -> Load {
        Load {
            state: WorkerState::Ready,
            free_kv_blocks: free,
            ..Load::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn leases_lapse_on_the_task_clock_and_the_set_is_published() {
        let router = spawn(RouterConfig::default(), Box::new(LeastLoaded));
        let mut sets = router.subscribe();
        router
            .register(identity("p0", WorkerRole::Prefill), ready(0))
            .await
            .unwrap();
        router
            .register(identity("d0", WorkerRole::Decode), ready(8))
            .await
            .unwrap();
        sets.wait_for(|s| s.workers.len() == 2).await.unwrap();
        let shape = RequestShape {
            prompt_tokens: 5,
            max_new_tokens: 5,
            ..RequestShape::default()
        };
        let placed = router.place(shape.clone()).await.unwrap();
        assert_eq!(placed.prefill.worker_id, "p0");

        tokio::time::sleep(Duration::from_secs(2)).await;
        router.heartbeat("d0".into(), ready(8)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // p0's lease (3 s) has run out; d0's was renewed at 2 s.
        let set = sets
            .wait_for(|s| s.workers.len() == 1)
            .await
            .unwrap()
            .clone();
        assert_eq!(set.workers[0].identity.worker_id, "d0");
        assert!(matches!(
            router.place(shape).await,
            Err(RouterError::NoWorkers(crate::Leg::Prefill))
        ));
        assert!(router.deregister("d0".into()).await.unwrap());
        assert!(router.workers().workers.is_empty());
    }

    #[tokio::test]
    async fn a_full_queue_fails_fast() {
        let (tx, rx) = mpsc::channel(1);
        let (_publish, workers) = watch::channel(Arc::new(WorkerSet::default()));
        let (_publish_admission, admission) = watch::channel(Arc::new(Vec::new()));
        let router = RouterHandle {
            tx,
            workers,
            admission,
            metrics: Arc::default(),
        };
        // Nobody serves the queue: fill its one place, and the next call is refused at once.
        let (reply, _answer) = oneshot::channel();
        let filler = Command::Deregister {
            worker_id: "a".into(),
            reply,
        };
        assert!(router.tx.try_send(filler).is_ok());
        assert!(matches!(
            router.deregister("b".into()).await,
            Err(RouterError::Busy)
        ));
        drop(rx);
        assert!(matches!(
            router.deregister("c".into()).await,
            Err(RouterError::Stopped)
        ));
    }

    fn budgeted(prompt: u32, ttft_ms: u64, priority: crate::Priority) -> RequestShape {
        RequestShape {
            prompt_tokens: prompt,
            max_new_tokens: 8,
            ttft_budget: Some(Duration::from_millis(ttft_ms)),
            priority,
            ..RequestShape::default()
        }
    }

    async fn with_base(queue: usize) -> RouterHandle {
        let mut config = RouterConfig {
            admission_queue: queue,
            ..RouterConfig::default()
        };
        config.registry.admission.base = Some(Arc::new(crate::registry::admission_tests::HAND));
        config.registry.lease = Duration::from_secs(3600);
        let router = spawn(config, Box::new(LeastLoaded));
        router
            .register(identity("p0", WorkerRole::Prefill), ready(0))
            .await
            .unwrap();
        // Four free blocks: a 100-token prompt (7 blocks) must wait for room.
        router
            .register(identity("d0", WorkerRole::Decode), ready(4))
            .await
            .unwrap();
        router
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_decode_room_and_is_placed_when_it_frees() {
        let router = with_base(8).await;
        let waiting = tokio::spawn({
            let router = router.clone();
            async move {
                router
                    .place(budgeted(100, 2000, crate::Priority::Standard))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished());
        assert_eq!(router.metrics().queue_depth(), 1);
        router.heartbeat("d0".into(), ready(100)).await.unwrap();
        let placed = waiting.await.unwrap().unwrap();
        assert_eq!(placed.decode.worker_id, "d0");
        assert_eq!(router.metrics().queue_depth(), 0);
        assert_eq!(router.metrics().admitted(crate::Priority::Standard), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_request_is_refused_once_its_budget_cannot_be_met() {
        let router = with_base(8).await;
        let started = tokio::time::Instant::now();
        let refused = router
            .place(budgeted(100, 200, crate::Priority::Standard))
            .await;
        match refused {
            Err(RouterError::Rejected { reason, .. }) => {
                assert_eq!(reason, crate::RejectReason::TtftBudgetUnreachable);
            }
            other => panic!("{other:?}"),
        }
        // It waited for its slack (200 ms less the predicted 13.75 ms), not for its whole budget.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(180) && waited < Duration::from_millis(200),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_sheds_sheddable_work_first() {
        let router = with_base(1).await;
        let shed = tokio::spawn({
            let router = router.clone();
            async move {
                router
                    .place(budgeted(100, 5000, crate::Priority::Sheddable))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let standard = tokio::spawn({
            let router = router.clone();
            async move {
                router
                    .place(budgeted(100, 5000, crate::Priority::Standard))
                    .await
            }
        });
        match shed.await.unwrap() {
            Err(RouterError::Rejected {
                reason: crate::RejectReason::QueueFull,
                retry_after: Some(after),
                ..
            }) => assert!(after >= Duration::from_secs(1)),
            other => panic!("{other:?}"),
        }
        // Another standard request finds the one place taken by work as urgent: refused at once.
        let late = router
            .place(budgeted(100, 5000, crate::Priority::Standard))
            .await;
        assert!(matches!(
            late,
            Err(RouterError::Rejected {
                reason: crate::RejectReason::QueueFull,
                ..
            })
        ));
        router.heartbeat("d0".into(), ready(100)).await.unwrap();
        assert!(standard.await.unwrap().is_ok());
        let m = router.metrics();
        assert_eq!(
            m.rejected(crate::RejectReason::QueueFull, crate::Priority::Sheddable),
            1
        );
        assert_eq!(
            m.rejected(crate::RejectReason::QueueFull, crate::Priority::Standard),
            1
        );
    }
}
