//! A gateway's link to standalone routers (`tandem gateway --router A,B`). Placements, outcome
//! reports and feedback go to the router that answered last, or the next one that answers; the
//! worker set is watched from one of them. While none answers, a local router fed with the last
//! worker set seen places instead: the same library, so the gateway has no placement logic of its
//! own, and it keeps serving. Workers register again with a router that comes back, and calls go
//! back to it.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_proto::v1;
use tokio::time::Instant;

use crate::client::RouterClient;
use crate::error::RouterError;
use crate::policy::Policy;
use crate::task::{RouterConfig, RouterHandle, spawn};
use crate::types::{Feedback, Load, Placement, RequestShape, WorkerSet};

/// Deadline of a call to a remote router: past it, the next router is tried.
const CALL_DEADLINE: Duration = Duration::from_secs(1);
/// After every router failed a call, how long calls go straight to the local router before one
/// tries the remote ones again (a router cut off silently costs a call's deadline per try).
const AWAY_RETRY: Duration = Duration::from_secs(1);
/// Tickets the local router issued carry this bit, so that their feedback comes back to it.
const LOCAL_TICKET: u64 = 1 << 63;
/// How often the local router's copy of each worker is renewed (its lease is 3 s).
const RENEW: Duration = Duration::from_secs(1);
/// How long after a router's set is first seen the workers missing from it are kept: a router
/// that restarted lists its workers only as each heartbeats again.
const RESYNC: Duration = Duration::from_secs(3);

/// Where a gateway places: its own router, or standalone ones.
#[derive(Clone, Debug)]
pub enum RouterLink {
    Embedded(RouterHandle),
    Remote(RemoteRouter),
}

impl From<RouterHandle> for RouterLink {
    fn from(h: RouterHandle) -> Self {
        RouterLink::Embedded(h)
    }
}

impl RouterLink {
    /// A prefill and a decode worker for a request, or its refusal.
    pub async fn place(&self, shape: RequestShape) -> Result<Placement, RouterError> {
        match self {
            RouterLink::Embedded(h) => h.place(shape).await,
            RouterLink::Remote(r) => r.place(shape).await,
        }
    }

    /// Another prefill worker, none of `shape.exclude`.
    pub async fn place_prefill(
        &self,
        shape: RequestShape,
    ) -> Result<Arc<v1::WorkerIdentity>, RouterError> {
        match self {
            RouterLink::Embedded(h) => h.place_prefill(shape).await,
            RouterLink::Remote(r) => r.place_prefill(shape).await,
        }
    }

    /// How a call to a worker went (best effort).
    pub fn report(&self, worker_id: &str, ok: bool) {
        match self {
            RouterLink::Embedded(h) => h.report(worker_id, ok),
            RouterLink::Remote(r) => r.report(worker_id, ok),
        }
    }

    /// What an admitted request measured (best effort).
    pub fn feedback(&self, feedback: Feedback) {
        match self {
            RouterLink::Embedded(h) => h.feedback(feedback),
            RouterLink::Remote(r) => r.feedback(feedback),
        }
    }

    /// The worker set as last known.
    pub fn workers(&self) -> Arc<WorkerSet> {
        match self {
            RouterLink::Embedded(h) => h.workers(),
            RouterLink::Remote(r) => r.shared.local.workers(),
        }
    }

    /// Admission's metrics, where the router lives in this process (a remote router serves its
    /// own).
    pub fn render_metrics(&self, out: &mut String) {
        if let RouterLink::Embedded(h) = self {
            h.render_metrics(out);
        }
    }
}

/// Standalone routers, tried in turn, with a local router for when none answers.
#[derive(Clone, Debug)]
pub struct RemoteRouter {
    shared: Arc<Shared>,
    _watcher: Arc<Watcher>,
}

#[derive(Debug)]
struct Shared {
    routers: Vec<(String, RouterClient)>,
    /// The router that answered last; calls start there.
    current: AtomicUsize,
    /// Until when calls skip the remote routers (all failed their last call).
    away_until: Mutex<Option<Instant>>,
    /// Places while no router answers; mirrors the watched worker set.
    local: RouterHandle,
}

/// The task that mirrors the worker set; stopped with the last clone of the link.
#[derive(Debug)]
struct Watcher(tokio::task::JoinHandle<()>);

impl Drop for Watcher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether a failed call says nothing of the request: the router could not be reached, did not
/// answer in time, or is stopping.
fn unreachable(e: &RouterError) -> bool {
    use tonic::Code;
    match e {
        RouterError::Transport(_) => true,
        RouterError::Remote(s) => matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
        ),
        _ => false,
    }
}

impl RemoteRouter {
    /// A link to the routers at `addrs` (host:port, at least one); `config` and `policy` are the
    /// local router's, which places while none answers. Connects lazily: the routers need not be
    /// up yet.
    pub fn new(
        addrs: &[String],
        config: RouterConfig,
        policy: Box<dyn Policy>,
    ) -> Result<Self, RouterError> {
        if addrs.is_empty() {
            return Err(RouterError::InvalidArgument("no router address".into()));
        }
        let routers = addrs
            .iter()
            .map(|a| Ok((a.clone(), RouterClient::lazy(a, CALL_DEADLINE)?)))
            .collect::<Result<Vec<_>, RouterError>>()?;
        let shared = Arc::new(Shared {
            routers,
            current: AtomicUsize::new(0),
            away_until: Mutex::new(None),
            local: spawn(config, policy),
        });
        let watcher = Watcher(tokio::spawn(mirror(shared.clone())));
        Ok(RemoteRouter {
            shared,
            _watcher: Arc::new(watcher),
        })
    }

    /// Runs `call` on the router that answered last, then on each other in turn, until one
    /// answers (an answer may be a refusal); `None` when none did.
    async fn first_answer<T, F, Fut>(&self, call: F) -> Option<Result<T, RouterError>>
    where
        F: Fn(RouterClient) -> Fut,
        Fut: Future<Output = Result<T, RouterError>>,
    {
        let s = &self.shared;
        if s.away() {
            return None;
        }
        let n = s.routers.len();
        let start = s.current.load(Ordering::Relaxed);
        for i in 0..n {
            let k = (start + i) % n;
            let (addr, client) = &s.routers[k];
            match call(client.clone()).await {
                Err(e) if unreachable(&e) => {
                    tracing::debug!(router = %addr, error = %e, "router did not answer");
                }
                answer => {
                    s.current.store(k, Ordering::Relaxed);
                    s.set_away(None);
                    return Some(answer);
                }
            }
        }
        s.set_away(Some(Instant::now() + AWAY_RETRY));
        None
    }

    pub async fn place(&self, shape: RequestShape) -> Result<Placement, RouterError> {
        let remote = self
            .first_answer(|mut c| {
                let shape = shape.clone();
                async move { c.place(&shape).await }
            })
            .await;
        match remote {
            // A router that just restarted knows no worker until they register again (within a
            // heartbeat): the last set known may serve meanwhile.
            Some(Err(RouterError::NoWorkers(_))) | None => {}
            Some(answer) => return answer,
        }
        let mut placement = self.shared.local.place(shape).await?;
        if let Some(p) = &mut placement.predicted {
            p.ticket |= LOCAL_TICKET;
        }
        Ok(placement)
    }

    pub async fn place_prefill(
        &self,
        shape: RequestShape,
    ) -> Result<Arc<v1::WorkerIdentity>, RouterError> {
        let remote = self
            .first_answer(|mut c| {
                let shape = shape.clone();
                async move { c.place_prefill(&shape).await }
            })
            .await;
        match remote {
            Some(Err(RouterError::NoWorkers(_))) | None => {
                self.shared.local.place_prefill(shape).await
            }
            Some(answer) => answer,
        }
    }

    /// To the remote router (best effort, not waited for) and to the local one, whose breakers
    /// then hold what it would need while the routers are away.
    pub fn report(&self, worker_id: &str, ok: bool) {
        let s = &self.shared;
        s.local.report(worker_id, ok);
        if let Some(mut client) = s.remote() {
            let id = worker_id.to_owned();
            tokio::spawn(async move {
                let _ = client.report(&id, ok).await;
            });
        }
    }

    /// To the router that placed the request (best effort, not waited for).
    pub fn feedback(&self, mut feedback: Feedback) {
        let s = &self.shared;
        if feedback.ticket & LOCAL_TICKET != 0 {
            feedback.ticket &= !LOCAL_TICKET;
            s.local.feedback(feedback);
        } else if let Some(mut client) = s.remote() {
            tokio::spawn(async move {
                let _ = client.feedback(&feedback).await;
            });
        }
    }
}

impl Shared {
    /// Whether calls skip the remote routers now (all failed their last call, recently).
    fn away(&self) -> bool {
        self.away_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some_and(|t| Instant::now() < t)
    }

    fn set_away(&self, until: Option<Instant>) {
        let mut away = self
            .away_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match (away.is_some(), until.is_some()) {
            (false, true) => tracing::warn!(
                "no router answers; placing with the last worker set known until one does"
            ),
            (true, false) => tracing::info!("a router answers again; placing through it"),
            _ => {}
        }
        *away = until;
    }

    /// The router to send best-effort messages to, unless all are away.
    fn remote(&self) -> Option<RouterClient> {
        if self.away() {
            return None;
        }
        let k = self.current.load(Ordering::Relaxed) % self.routers.len();
        Some(self.routers[k].1.clone())
    }
}

/// The workers the local router holds, and which of them the router watched lists.
#[derive(Default)]
struct Mirror {
    known: HashMap<String, (v1::WorkerIdentity, Load)>,
    /// Ids the watched router listed last.
    listed: HashSet<String>,
    /// When the current watch began; `None` while no router is watched.
    since: Option<Instant>,
}

/// Keeps the local router's worker set the remote one's: watches a router's set (the next one's
/// when that breaks), adds and updates workers as it changes, and renews every worker's lease in
/// the local router each second, so that the last set known stays while no router answers. A
/// worker the watched router does not list leaves once that router has been watched for
/// [`RESYNC`].
async fn mirror(s: Arc<Shared>) {
    let mut m = Mirror::default();
    let mut renew = tokio::time::interval(RENEW);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut k = 0;
    loop {
        let (addr, client) = &s.routers[k];
        if let Ok(mut stream) = client.clone().watch_workers().await {
            tracing::info!(router = %addr, "watching the router's worker set");
            s.current.store(k, Ordering::Relaxed);
            m.since = Some(Instant::now());
            loop {
                tokio::select! {
                    set = stream.message() => match set {
                        Ok(Some(set)) => m.sync(&s.local, set).await,
                        _ => {
                            tracing::warn!(router = %addr, "lost the router's worker set");
                            break;
                        }
                    },
                    _ = renew.tick() => m.keep(&s.local).await,
                }
            }
            m.since = None;
        }
        k = (k + 1) % s.routers.len();
        // Before the next router: the known set stays alive meanwhile.
        let pause = tokio::time::sleep(Duration::from_millis(500));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                _ = renew.tick() => m.keep(&s.local).await,
            }
        }
    }
}

impl Mirror {
    /// Takes the watched router's new set: adds and updates its workers, then drops those it
    /// does not list if it is time.
    async fn sync(&mut self, local: &RouterHandle, set: v1::WorkerSet) {
        self.listed.clear();
        for entry in set.workers {
            let Some(identity) = entry.identity else {
                continue;
            };
            let load = entry
                .load
                .as_ref()
                .and_then(|l| Load::try_from(l).ok())
                .unwrap_or_default();
            let id = identity.worker_id.clone();
            let fresh = self.known.get(&id).is_none_or(|(old, _)| *old != identity);
            if fresh {
                let _ = local.register(identity.clone(), load).await;
            } else {
                let _ = local.heartbeat(id.clone(), load).await;
            }
            self.listed.insert(id.clone());
            self.known.insert(id, (identity, load));
        }
        self.drop_unlisted(local).await;
    }

    /// Renews every known worker's lease in the local router (registering again one it dropped).
    async fn keep(&mut self, local: &RouterHandle) {
        self.drop_unlisted(local).await;
        for (id, (identity, load)) in &self.known {
            if let Err(RouterError::UnknownWorker(_)) = local.heartbeat(id.clone(), *load).await {
                let _ = local.register(identity.clone(), *load).await;
            }
        }
    }

    async fn drop_unlisted(&mut self, local: &RouterHandle) {
        if self.since.is_none_or(|t| t.elapsed() < RESYNC) {
            return;
        }
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|id| !self.listed.contains(*id))
            .cloned()
            .collect();
        for id in gone {
            self.known.remove(&id);
            let _ = local.deregister(id).await;
        }
    }
}
