//! The one task that owns the registry. Everything else talks to it through a cloneable
//! [`RouterHandle`] over a bounded channel; a full channel fails fast with [`RouterError::Busy`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::v1::WorkerIdentity;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::MissedTickBehavior;

use crate::error::RouterError;
use crate::policy::Policy;
use crate::registry::{Lease, Registry, RegistryConfig};
use crate::types::{Load, Placement, RequestShape, WorkerSet};

/// Settings of the router task.
#[derive(Clone, Debug)]
pub struct RouterConfig {
    /// Leases, limits and placement settings.
    pub registry: RegistryConfig,
    /// Commands that may wait for the task before callers get `Busy`.
    pub queue: usize,
    /// How often lapsed leases are swept (placement also skips lapsed workers between sweeps).
    pub sweep_interval: Duration,
}

impl Default for RouterConfig {
    fn default() -> Self {
        RouterConfig {
            registry: RegistryConfig::default(),
            queue: 1024,
            sweep_interval: Duration::from_millis(250),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, RouterError>>;

enum Command {
    Register {
        identity: WorkerIdentity,
        load: Load,
        reply: Reply<Lease>,
    },
    Heartbeat {
        worker_id: String,
        load: Load,
        reply: Reply<Duration>,
    },
    Deregister {
        worker_id: String,
        reply: Reply<bool>,
    },
    Place {
        shape: RequestShape,
        reply: Reply<Placement>,
    },
}

/// A cheap, cloneable handle to the router task. The task stops when every handle is dropped.
#[derive(Clone, Debug)]
pub struct RouterHandle {
    tx: mpsc::Sender<Command>,
    workers: watch::Receiver<Arc<WorkerSet>>,
}

/// Starts the router task on the current tokio runtime.
pub fn spawn(config: RouterConfig, policy: Box<dyn Policy>) -> RouterHandle {
    let (tx, rx) = mpsc::channel(config.queue.max(1));
    let (publish, workers) = watch::channel(Arc::new(WorkerSet::default()));
    let registry = Registry::new(config.registry, policy);
    tokio::spawn(run(registry, rx, publish, config.sweep_interval));
    RouterHandle { tx, workers }
}

impl RouterHandle {
    /// Adds a worker, or refreshes the registration of the same id.
    pub async fn register(
        &self,
        identity: WorkerIdentity,
        load: Load,
    ) -> Result<Lease, RouterError> {
        self.call(|reply| Command::Register {
            identity,
            load,
            reply,
        })
        .await
    }

    /// Records a worker's load and renews its lease; returns the lease length.
    pub async fn heartbeat(&self, worker_id: String, load: Load) -> Result<Duration, RouterError> {
        self.call(|reply| Command::Heartbeat {
            worker_id,
            load,
            reply,
        })
        .await
    }

    /// Removes a worker at once; false when it was not in the set.
    pub async fn deregister(&self, worker_id: String) -> Result<bool, RouterError> {
        self.call(|reply| Command::Deregister { worker_id, reply })
            .await
    }

    /// Chooses a prefill and a decode worker for a request.
    pub async fn place(&self, shape: RequestShape) -> Result<Placement, RouterError> {
        self.call(|reply| Command::Place { shape, reply }).await
    }

    /// The current worker set.
    pub fn workers(&self) -> Arc<WorkerSet> {
        self.workers.borrow().clone()
    }

    /// A receiver that sees every new worker set (joins, leaves, state changes).
    pub fn subscribe(&self) -> watch::Receiver<Arc<WorkerSet>> {
        self.workers.clone()
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

async fn run(
    mut registry: Registry,
    mut rx: mpsc::Receiver<Command>,
    publish: watch::Sender<Arc<WorkerSet>>,
    sweep_interval: Duration,
) {
    let mut sweep = tokio::time::interval(sweep_interval.max(Duration::from_millis(1)));
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            command = rx.recv() => match command {
                Some(command) => handle(&mut registry, command, now()),
                None => break,
            },
            _ = sweep.tick() => {
                for id in registry.expire(now()) {
                    tracing::info!(worker_id = %id, "worker lease lapsed; removed");
                }
            }
        }
        if registry.take_changed() {
            publish.send_replace(Arc::new(registry.snapshot(now())));
        }
    }
}

fn handle(registry: &mut Registry, command: Command, now: Instant) {
    // A reply that cannot be sent means the caller left; nothing is left to undo but the
    // placement's optimistic charge, which the next heartbeat clears.
    match command {
        Command::Register {
            identity,
            load,
            reply,
        } => {
            let _ = reply.send(registry.register(identity, load, now));
        }
        Command::Heartbeat {
            worker_id,
            load,
            reply,
        } => {
            let _ = reply.send(registry.heartbeat(&worker_id, load, now));
        }
        Command::Deregister { worker_id, reply } => {
            let _ = reply.send(Ok(registry.deregister(&worker_id)));
        }
        Command::Place { shape, reply } => {
            if !reply.is_closed() {
                let _ = reply.send(registry.place(&shape, now));
            }
        }
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
        let router = RouterHandle { tx, workers };
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
}
