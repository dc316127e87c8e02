//! A client of a remote router that puts a deadline on every call, and the loop that keeps a
//! worker registered. Workers and remote gateways use these instead of the generated client.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tandem_proto::v1;
use tandem_proto::v1::router_service_client::RouterServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::convert::{millis, priority_to_proto};
use crate::error::{RejectReason, RouterError};
use crate::registry::Lease;
use crate::types::{Feedback, Leg, Placement, Predicted, RequestShape};

fn endpoint(addr: &str, deadline: Duration) -> Result<Endpoint, RouterError> {
    let url = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(url)
        .map_err(|e| RouterError::InvalidArgument(format!("router address {addr:?}: {e}")))?
        .connect_timeout(deadline)
        .tcp_nodelay(true))
}

/// A connection to a router's `RouterService`, with one deadline for every unary call.
#[derive(Clone, Debug)]
pub struct RouterClient {
    inner: RouterServiceClient<Channel>,
    deadline: Duration,
}

impl RouterClient {
    /// Connects to `addr` ("host:port", or a URL with `http://`), giving every call `deadline`.
    pub async fn connect(addr: &str, deadline: Duration) -> Result<Self, RouterError> {
        let endpoint = endpoint(addr, deadline)?;
        Ok(RouterClient {
            inner: RouterServiceClient::new(endpoint.connect().await?),
            deadline,
        })
    }

    /// A client of `addr` that connects at its first call (and again after the connection
    /// breaks): a gateway starts whether or not its routers are up yet.
    pub fn lazy(addr: &str, deadline: Duration) -> Result<Self, RouterError> {
        Ok(RouterClient {
            inner: RouterServiceClient::new(endpoint(addr, deadline)?.connect_lazy()),
            deadline,
        })
    }

    /// Streams the router's worker set: the current one, then each change.
    pub async fn watch_workers(&mut self) -> Result<tonic::Streaming<v1::WorkerSet>, RouterError> {
        // No deadline: the stream lives as long as the router.
        Ok(self
            .inner
            .watch_workers(v1::WatchWorkersRequest::default())
            .await?
            .into_inner())
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.deadline);
        request
    }

    /// Registers (or re-registers) a worker.
    pub async fn register(
        &mut self,
        identity: v1::WorkerIdentity,
        load: v1::LoadReport,
    ) -> Result<Lease, RouterError> {
        let message = v1::RegisterRequest {
            identity: Some(identity),
            load: Some(load),
        };
        let granted = self
            .inner
            .register(self.request(message))
            .await?
            .into_inner();
        Ok(Lease {
            worker_id: Arc::from(granted.worker_id),
            lease: Duration::from_millis(u64::from(granted.lease_ms)),
            heartbeat_interval: Duration::from_millis(u64::from(granted.heartbeat_interval_ms)),
        })
    }

    /// Reports load (and the steps measured since the last report) and renews the lease;
    /// `UnknownWorker` means register again.
    pub async fn heartbeat(
        &mut self,
        worker_id: &str,
        load: v1::LoadReport,
    ) -> Result<Duration, RouterError> {
        let message = v1::HeartbeatRequest {
            worker_id: worker_id.to_owned(),
            load: Some(load),
        };
        match self.inner.heartbeat(self.request(message)).await {
            Ok(answer) => Ok(Duration::from_millis(u64::from(
                answer.into_inner().lease_ms,
            ))),
            Err(status) if status.code() == tonic::Code::NotFound => {
                Err(RouterError::UnknownWorker(worker_id.to_owned()))
            }
            Err(status) => Err(status.into()),
        }
    }

    /// Leaves the set at once; false when the router did not know the worker.
    pub async fn deregister(&mut self, worker_id: &str) -> Result<bool, RouterError> {
        let message = v1::DeregisterRequest {
            worker_id: worker_id.to_owned(),
        };
        Ok(self
            .inner
            .deregister(self.request(message))
            .await?
            .into_inner()
            .found)
    }

    /// Places a request (for gateways that do not embed the router). A rejection comes back as
    /// `NoWorkers` or `Overloaded`, as from an embedded router.
    pub async fn place(&mut self, shape: &RequestShape) -> Result<Placement, RouterError> {
        let answer = self
            .inner
            .place(self.request(place_request(shape, false)))
            .await?
            .into_inner();
        match answer.outcome {
            Some(v1::place_response::Outcome::Placed(p)) => match (p.prefill, p.decode) {
                (Some(prefill), Some(decode)) => {
                    let us = |v: u32| Duration::from_micros(u64::from(v));
                    let predicted = match (p.predicted_ttft_ms, p.predicted_itl_us) {
                        (Some(ttft), Some(itl)) => Some(Predicted {
                            ttft: Duration::from_millis(u64::from(ttft)),
                            itl: us(itl),
                            raw_ttft: us(p.raw_ttft_us),
                            raw_itl: us(p.raw_itl_us),
                            regime: u8::try_from(p.load_regime).unwrap_or(u8::MAX),
                            ticket: p.ticket,
                        }),
                        _ => None,
                    };
                    Ok(Placement {
                        prefill: Arc::new(prefill),
                        decode: Arc::new(decode),
                        predicted,
                    })
                }
                _ => Err(RouterError::InvalidArgument(
                    "placement without both workers".into(),
                )),
            },
            Some(v1::place_response::Outcome::Rejected(r)) => Err(rejected(&r)),
            None => Err(RouterError::InvalidArgument("empty PlaceResponse".into())),
        }
    }
}

impl RouterClient {
    /// Another prefill worker for a request whose prefill failed, none of `shape.exclude`.
    pub async fn place_prefill(
        &mut self,
        shape: &RequestShape,
    ) -> Result<Arc<v1::WorkerIdentity>, RouterError> {
        let answer = self
            .inner
            .place(self.request(place_request(shape, true)))
            .await?
            .into_inner();
        match answer.outcome {
            Some(v1::place_response::Outcome::Placed(v1::Placement {
                prefill: Some(prefill),
                ..
            })) => Ok(Arc::new(prefill)),
            Some(v1::place_response::Outcome::Placed(_)) => Err(RouterError::InvalidArgument(
                "prefill placement without a worker".into(),
            )),
            Some(v1::place_response::Outcome::Rejected(r)) => Err(rejected(&r)),
            None => Err(RouterError::InvalidArgument("empty PlaceResponse".into())),
        }
    }

    /// Sends what an admitted request measured (best effort: the caller may ignore the error).
    pub async fn feedback(&mut self, feedback: &Feedback) -> Result<(), RouterError> {
        let message = v1::FeedbackRequest::from(feedback);
        self.inner.feedback(self.request(message)).await?;
        Ok(())
    }

    /// Reports how a call to a worker went (best effort).
    pub async fn report(&mut self, worker_id: &str, ok: bool) -> Result<(), RouterError> {
        let message = v1::ReportRequest {
            worker_id: worker_id.to_owned(),
            ok,
        };
        self.inner.report(self.request(message)).await?;
        Ok(())
    }
}

fn place_request(shape: &RequestShape, prefill_only: bool) -> v1::PlaceRequest {
    v1::PlaceRequest {
        request_id: String::new(),
        model: shape.model.clone(),
        prompt_tokens: shape.prompt_tokens,
        max_new_tokens: shape.max_new_tokens,
        prefix_block_hashes: shape.prefix_block_hashes.clone(),
        ttft_budget_ms: shape.ttft_budget.map_or(0, |d| millis(d).max(1)),
        itl_budget_ms: shape.itl_budget.map_or(0, |d| millis(d).max(1)),
        priority: priority_to_proto(shape.priority),
        exclude_workers: shape.exclude.clone(),
        prefill_only,
    }
}

/// The error an embedded router would have returned for a rejection.
fn rejected(r: &v1::Rejection) -> RouterError {
    let retry_after = Duration::from_millis(u64::from(r.retry_after_ms));
    let overloaded = |leg| RouterError::Overloaded {
        leg,
        detail: r.message.clone(),
        retry_after,
    };
    let budget = |reason| RouterError::Rejected {
        reason,
        detail: r.message.clone(),
        retry_after: (r.retry_after_ms > 0).then_some(retry_after),
        predicted_ttft: r
            .predicted_ttft_ms
            .map(|ms| Duration::from_millis(u64::from(ms))),
    };
    match r.reason() {
        v1::RejectReason::NoPrefillWorker => RouterError::NoWorkers(Leg::Prefill),
        v1::RejectReason::NoDecodeWorker => RouterError::NoWorkers(Leg::Decode),
        v1::RejectReason::PrefillOverloaded => overloaded(Leg::Prefill),
        v1::RejectReason::KvExhausted | v1::RejectReason::Unspecified => overloaded(Leg::Decode),
        v1::RejectReason::TtftBudgetUnreachable => budget(RejectReason::TtftBudgetUnreachable),
        v1::RejectReason::ItlBudgetUnreachable => budget(RejectReason::ItlBudgetUnreachable),
        v1::RejectReason::QueueFull => budget(RejectReason::QueueFull),
    }
}

/// Keeps a worker in the router's set until `shutdown` completes: registers, heartbeats at the
/// interval the router asks for with the load `report` gives, registers again when the router
/// has forgotten it (a lapsed lease, a restarted router), then deregisters. A failed heartbeat is
/// retried at the next interval; only the first registration's failure is returned.
pub async fn keep_registered(
    mut client: RouterClient,
    identity: v1::WorkerIdentity,
    mut report: impl FnMut() -> v1::LoadReport + Send,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RouterError> {
    let lease = client.register(identity.clone(), report()).await?;
    let worker_id = lease.worker_id.to_string();
    let mut identity = identity;
    identity.worker_id.clone_from(&worker_id);
    let mut beat = tokio::time::interval(lease.heartbeat_interval.max(Duration::from_millis(10)));
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.tick().await;
    tokio::pin!(shutdown);
    // Failed beats in a row: the first is logged, the rest only when the router answers again
    // (a router away for minutes would otherwise log a line per beat).
    let mut failed = 0u32;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = beat.tick() => {
                let outcome = match client.heartbeat(&worker_id, report()).await {
                    Err(RouterError::UnknownWorker(_)) => client
                        .register(identity.clone(), report())
                        .await
                        .map(|_| tracing::info!(%worker_id, "registered again")),
                    other => other.map(|_| ()),
                };
                match outcome {
                    Ok(()) if failed > 0 => {
                        tracing::info!(%worker_id, failed, "the router answers again");
                        failed = 0;
                    }
                    Ok(()) => {}
                    Err(e) => {
                        if failed == 0 {
                            tracing::warn!(%worker_id, error = %e, "heartbeat failed; retrying at each interval");
                        }
                        failed = failed.saturating_add(1);
                    }
                }
            }
        }
    }
    client.deregister(&worker_id).await?;
    Ok(())
}
