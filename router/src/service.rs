//! The `tandem.v1.RouterService` gRPC front of the router task, and `serve`.

use std::future::Future;
use std::pin::Pin;

use futures::Stream;
use tandem_proto::v1;
use tandem_proto::v1::router_service_server::{RouterService, RouterServiceServer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

use crate::convert::{millis, steps_from_proto};
use crate::error::RouterError;
use crate::task::RouterHandle;
use crate::types::{Feedback, Load, RequestShape};

/// The gRPC service over a [`RouterHandle`].
#[derive(Clone, Debug)]
pub struct RouterGrpc {
    handle: RouterHandle,
    stopping: watch::Receiver<bool>,
}

impl RouterGrpc {
    /// A service over `handle`; its WatchWorkers streams end once `stopping` turns true (or its
    /// sender is dropped), so that a graceful shutdown is not held up by them.
    pub fn new(handle: RouterHandle, stopping: watch::Receiver<bool>) -> Self {
        RouterGrpc { handle, stopping }
    }
}

/// Serves `tandem.v1.RouterService` on `listener` until `shutdown` completes, then stops
/// accepting, ends the watch streams and lets in-flight calls finish.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    handle: RouterHandle,
) -> Result<(), RouterError> {
    let (stop, stopping) = watch::channel(false);
    let service = RouterServiceServer::new(RouterGrpc::new(handle, stopping));
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.await;
            stop.send_replace(true);
        })
        .await?;
    Ok(())
}

/// Resolves when `stopping` turns true or its sender goes away.
async fn stopped(stopping: &mut watch::Receiver<bool>) {
    while !*stopping.borrow_and_update() {
        if stopping.changed().await.is_err() {
            return;
        }
    }
}

type WorkerSetStream = Pin<Box<dyn Stream<Item = Result<v1::WorkerSet, Status>> + Send>>;

#[tonic::async_trait]
impl RouterService for RouterGrpc {
    async fn register(
        &self,
        request: Request<v1::RegisterRequest>,
    ) -> Result<Response<v1::RegisterResponse>, Status> {
        let r = request.into_inner();
        let identity = r
            .identity
            .ok_or_else(|| RouterError::InvalidArgument("identity is missing".into()))?;
        let load = r
            .load
            .as_ref()
            .map(Load::try_from)
            .transpose()?
            .unwrap_or_default();
        let steps = r.load.as_ref().map(steps_from_proto).transpose()?;
        let lease = self
            .handle
            .register_with_steps(identity, load, steps.unwrap_or_default())
            .await?;
        Ok(Response::new(v1::RegisterResponse {
            worker_id: lease.worker_id.to_string(),
            lease_ms: millis(lease.lease),
            heartbeat_interval_ms: millis(lease.heartbeat_interval),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let load = r
            .load
            .as_ref()
            .ok_or_else(|| RouterError::InvalidArgument("load is missing".into()))?;
        let steps = steps_from_proto(load)?;
        let lease = self
            .handle
            .heartbeat_with_steps(r.worker_id, Load::try_from(load)?, steps)
            .await?;
        Ok(Response::new(v1::HeartbeatResponse {
            lease_ms: millis(lease),
        }))
    }

    async fn deregister(
        &self,
        request: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::DeregisterResponse>, Status> {
        let found = self
            .handle
            .deregister(request.into_inner().worker_id)
            .await?;
        Ok(Response::new(v1::DeregisterResponse { found }))
    }

    type WatchWorkersStream = WorkerSetStream;

    async fn watch_workers(
        &self,
        _request: Request<v1::WatchWorkersRequest>,
    ) -> Result<Response<Self::WatchWorkersStream>, Status> {
        let mut workers = self.handle.subscribe();
        workers.mark_changed();
        let state = (workers, self.stopping.clone());
        let stream = futures::stream::unfold(state, |(mut workers, mut stopping)| async move {
            tokio::select! {
                changed = workers.changed() => {
                    changed.ok()?;
                    let set = v1::WorkerSet::from(&**workers.borrow_and_update());
                    Some((Ok(set), (workers, stopping)))
                }
                () = stopped(&mut stopping) => None,
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn place(
        &self,
        request: Request<v1::PlaceRequest>,
    ) -> Result<Response<v1::PlaceResponse>, Status> {
        let request = request.into_inner();
        let prefill_only = request.prefill_only;
        let shape = RequestShape::try_from(request)?;
        if prefill_only {
            let outcome = match self.handle.place_prefill(shape).await {
                Ok(prefill) => v1::place_response::Outcome::Placed(v1::Placement {
                    prefill: Some((*prefill).clone()),
                    ..v1::Placement::default()
                }),
                Err(e) => match e.rejection() {
                    Some(rejection) => v1::place_response::Outcome::Rejected(rejection),
                    None => return Err(e.into()),
                },
            };
            return Ok(Response::new(v1::PlaceResponse {
                outcome: Some(outcome),
            }));
        }
        let outcome = match self.handle.place(shape).await {
            Ok(placement) => v1::place_response::Outcome::Placed((&placement).into()),
            Err(e) => match e.rejection() {
                Some(rejection) => v1::place_response::Outcome::Rejected(rejection),
                None => return Err(e.into()),
            },
        };
        Ok(Response::new(v1::PlaceResponse {
            outcome: Some(outcome),
        }))
    }

    async fn feedback(
        &self,
        request: Request<v1::FeedbackRequest>,
    ) -> Result<Response<v1::FeedbackResponse>, Status> {
        let r = request.into_inner();
        if r.raw_ttft_us == 0 {
            return Err(Status::invalid_argument(
                "feedback without a predicted TTFT (raw_ttft_us)",
            ));
        }
        self.handle.feedback(Feedback::from(&r));
        Ok(Response::new(v1::FeedbackResponse {}))
    }

    async fn report(
        &self,
        request: Request<v1::ReportRequest>,
    ) -> Result<Response<v1::ReportResponse>, Status> {
        let r = request.into_inner();
        self.handle.report(&r.worker_id, r.ok);
        Ok(Response::new(v1::ReportResponse {}))
    }
}
