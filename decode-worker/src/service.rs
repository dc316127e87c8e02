//! The DecodeService and WorkerControl gRPC handlers.
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::Stream;
use tandem_proto::v1;
use tandem_proto::v1::decode_service_server::DecodeService;
use tandem_proto::v1::worker_control_server::WorkerControl;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status};

use crate::batch::{ChunkResult, Inbox, Joiner, LoopStats, admit};
use crate::state::{Phase, Shared};

/// Longest lease a Reserve may ask for.
const MAX_LEASE: Duration = Duration::from_secs(600);

/// Everything a handler needs.
#[derive(Clone)]
pub struct DecodeGrpc {
    pub shared: Arc<Shared>,
    pub inbox: Arc<Inbox>,
    pub stats: Arc<LoopStats>,
    pub identity: Arc<std::sync::RwLock<v1::WorkerIdentity>>,
    pub shm_layout: Option<v1::ShmPoolLayout>,
    pub default_lease: Duration,
    pub draining: Arc<AtomicBool>,
}

impl DecodeGrpc {
    /// The worker's load as heartbeats and Info report it.
    pub fn load(&self) -> v1::LoadReport {
        let inner = self.shared.lock();
        let reservations = inner
            .reservations
            .values()
            .filter(|r| r.phase != Phase::Running)
            .count() as u32;
        v1::LoadReport {
            state: self.state().into(),
            queued_prefill_tokens: 0,
            running_seqs: self.stats.running.load(Ordering::Relaxed),
            waiting_seqs: self.stats.waiting.load(Ordering::Relaxed),
            free_kv_blocks: inner.engine.free_blocks() as u64,
            total_kv_blocks: inner.engine.total_blocks() as u64,
            prefill_tokens_per_s: 0.0,
            decode_tokens_per_s: f32::from_bits(self.stats.tokens_per_s.load(Ordering::Relaxed)),
            reservations,
        }
    }

    fn state(&self) -> v1::WorkerState {
        if self.draining.load(Ordering::Relaxed) {
            v1::WorkerState::Draining
        } else {
            v1::WorkerState::Ready
        }
    }

    fn identity(&self) -> v1::WorkerIdentity {
        self.identity
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

type DecodeStream = Pin<Box<dyn Stream<Item = ChunkResult> + Send>>;

#[tonic::async_trait]
impl DecodeService for DecodeGrpc {
    async fn reserve(
        &self,
        request: Request<v1::ReserveRequest>,
    ) -> Result<Response<v1::ReserveResponse>, Status> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(Status::unavailable("decode worker is draining"));
        }
        let req = request.into_inner();
        let lease = match req.lease_ms {
            0 => self.default_lease,
            ms => Duration::from_millis(u64::from(ms)).min(MAX_LEASE),
        };
        // Keep a block per running sequence free, so that the batch can grow by one step.
        let headroom = self.stats.running.load(Ordering::Relaxed) as usize;
        let (id, blocks) = self.shared.reserve(
            req.request_id,
            req.prompt_tokens,
            req.max_new_tokens,
            lease,
            headroom,
        )?;
        let identity = self.identity();
        Ok(Response::new(v1::ReserveResponse {
            reservation_id: id,
            block_ids: blocks.to_vec(),
            kv_endpoint: identity.kv_endpoint,
            transport: identity.kv_transport,
            geometry: Some(self.shared.geometry),
            shm_layout: self.shm_layout.clone(),
            lease_ms: lease.as_millis() as u32,
        }))
    }

    async fn commit(
        &self,
        request: Request<v1::CommitRequest>,
    ) -> Result<Response<v1::CommitResponse>, Status> {
        let id = request.into_inner().reservation_id;
        let mut inner = self.shared.lock();
        let r = inner
            .reservations
            .get_mut(&id)
            .ok_or_else(|| Status::not_found(format!("reservation {id} is unknown or expired")))?;
        match r.phase {
            Phase::Filling => Err(Status::failed_precondition(format!(
                "the KV of reservation {id} has not fully arrived"
            ))),
            Phase::Complete { .. } | Phase::Running => {
                // Frozen: the lease stops running; Release or Decode ends it.
                r.expires = Instant::now() + MAX_LEASE;
                Ok(Response::new(v1::CommitResponse {
                    complete: true,
                    frames_received: 0,
                    missing_layers: Vec::new(),
                }))
            }
        }
    }

    type DecodeStream = DecodeStream;

    async fn decode(
        &self,
        request: Request<v1::DecodeRequest>,
    ) -> Result<Response<Self::DecodeStream>, Status> {
        let req = request.into_inner();
        let sampling = tandem_wire::sampling_from_proto(&req.sampling.unwrap_or_default());
        sampling
            .validate()
            .map_err(|e| tandem_wire::engine_status(&e))?;
        if req.generated_before == 0 {
            return Err(Status::invalid_argument(
                "generated_before counts first_token, so it is at least 1",
            ));
        }
        let prompt_tokens = admit(&self.shared, req.reservation_id)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.inbox.join(Joiner {
            reservation_id: req.reservation_id,
            prompt_tokens,
            first_token: req.first_token,
            generated_before: req.generated_before,
            sampling,
            tx,
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn release(
        &self,
        request: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseResponse>, Status> {
        let id = request.into_inner().reservation_id;
        let mut inner = self.shared.lock();
        let Some(r) = inner.reservations.get(&id) else {
            return Ok(Response::new(v1::ReleaseResponse::default()));
        };
        let blocks = r.block_ids.len() as u32;
        if r.phase == Phase::Running {
            // The batch loop owns a running sequence; it frees the blocks before its next step.
            drop(inner);
            self.inbox.cancel(id);
            return Ok(Response::new(v1::ReleaseResponse {
                found: true,
                blocks_freed: blocks,
            }));
        }
        let freed = inner.release(id).unwrap_or(0);
        Ok(Response::new(v1::ReleaseResponse {
            found: true,
            blocks_freed: freed,
        }))
    }
}

#[tonic::async_trait]
impl WorkerControl for DecodeGrpc {
    async fn health(
        &self,
        _request: Request<v1::HealthRequest>,
    ) -> Result<Response<v1::HealthResponse>, Status> {
        Ok(Response::new(v1::HealthResponse {
            state: self.state().into(),
        }))
    }

    async fn info(
        &self,
        _request: Request<v1::InfoRequest>,
    ) -> Result<Response<v1::InfoResponse>, Status> {
        Ok(Response::new(v1::InfoResponse {
            identity: Some(self.identity()),
            load: Some(self.load()),
            prefill_requests: 0,
            engine: self.shared.lock().engine.model().engine_name().into(),
        }))
    }

    async fn drain(
        &self,
        _request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        self.draining.store(true, Ordering::Relaxed);
        let load = self.load();
        Ok(Response::new(v1::DrainResponse {
            in_flight: load.running_seqs + load.reservations,
        }))
    }
}
