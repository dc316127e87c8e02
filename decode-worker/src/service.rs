//! The DecodeService and WorkerControl gRPC handlers.
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::Stream;
use tandem_proto::v1;
use tandem_proto::v1::decode_service_server::DecodeService;
use tandem_proto::v1::prefill_service_server::PrefillService;
use tandem_proto::v1::worker_control_server::WorkerControl;
use tonic::{Request, Response, Status};

use crate::batch::LoopStats;
use crate::coalesce::{ChunkResult, Coalesced};
use crate::events::Failure;
use crate::inbox::{Inbox, Joiner, PrefillJob};
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
    pub drain: tandem_router::Drain,
    /// Aggregated mode: also serves Prefill, computing prompts inside its own batch.
    pub aggregated: bool,
    /// Moves running sequences' KV to other decode workers (Migrate, drain).
    pub kv_sender: Arc<tandem_kv_transfer::KvSender>,
}

impl DecodeGrpc {
    /// The worker's load as heartbeats and Info report it.
    pub fn load(&self) -> v1::LoadReport {
        let outlook = self.shared.book().outlook();
        let reservations = outlook.waiting;
        v1::LoadReport {
            state: self.state().into(),
            queued_prefill_tokens: self.stats.queued_prefill_tokens.load(Ordering::Relaxed),
            running_seqs: self.stats.running.load(Ordering::Relaxed),
            waiting_seqs: self.stats.waiting.load(Ordering::Relaxed),
            free_kv_blocks: self.shared.free_blocks() as u64,
            total_kv_blocks: self.shared.total_blocks() as u64,
            prefill_tokens_per_s: f32::from_bits(
                self.stats.prefill_tokens_per_s.load(Ordering::Relaxed),
            ),
            decode_tokens_per_s: f32::from_bits(self.stats.tokens_per_s.load(Ordering::Relaxed)),
            reservations,
            steps: Vec::new(),
            decode_context_tokens: self.stats.context_tokens.load(Ordering::Relaxed),
            reserved_seqs: outlook.waiting,
            reserved_prompt_tokens: outlook.waiting_prompt_tokens,
            tightest_itl_budget_ms: outlook.tightest_itl_budget_ms,
        }
    }

    /// What a heartbeat carries: the load and the steps measured since the last heartbeat.
    pub fn report(&self) -> v1::LoadReport {
        v1::LoadReport {
            steps: self.stats.step_log.take(),
            ..self.load()
        }
    }

    fn state(&self) -> v1::WorkerState {
        if self.drain.draining() {
            v1::WorkerState::Draining
        } else {
            v1::WorkerState::Ready
        }
    }

    pub(crate) fn identity(&self) -> v1::WorkerIdentity {
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
        if self.drain.draining() {
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
        if req.itl_budget_ms > 0
            && let Some(r) = self.shared.book().get_mut(id)
        {
            r.itl_budget_ms = req.itl_budget_ms;
        }
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
        let mut book = self.shared.book();
        let r = book
            .get_mut(id)
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
        let kv_tokens = {
            let mut book = self.shared.book();
            let room = book
                .get(req.reservation_id)
                .map(|r| r.block_ids.len() * self.shared.geometry.block_tokens as usize);
            if room.is_some_and(|room| req.kv_tokens as usize > room) {
                return Err(Status::invalid_argument(format!(
                    "{} positions of KV do not fit reservation {}",
                    req.kv_tokens, req.reservation_id
                )));
            }
            // The batch loop hands the blocks to the engine at its next step boundary.
            let prompt_tokens = book.admit(req.reservation_id)?;
            match req.kv_tokens {
                0 => prompt_tokens,
                n => n as usize,
            }
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.inbox.join(Joiner {
            reservation_id: req.reservation_id,
            kv_tokens,
            first_token: req.first_token,
            generated_before: req.generated_before,
            sampling,
            tx,
        });
        Ok(Response::new(Box::pin(Coalesced::new(rx))))
    }

    async fn release(
        &self,
        request: Request<v1::ReleaseRequest>,
    ) -> Result<Response<v1::ReleaseResponse>, Status> {
        let id = request.into_inner().reservation_id;
        let book = self.shared.book();
        let Some(r) = book.get(id) else {
            return Ok(Response::new(v1::ReleaseResponse::default()));
        };
        let blocks = r.block_ids.len() as u32;
        if r.phase == Phase::Running {
            // The batch loop owns a running sequence; it frees the blocks before its next step.
            drop(book);
            self.inbox.cancel(id);
            return Ok(Response::new(v1::ReleaseResponse {
                found: true,
                blocks_freed: blocks,
            }));
        }
        drop(book);
        let freed = self.shared.end(id).unwrap_or(0);
        Ok(Response::new(v1::ReleaseResponse {
            found: true,
            blocks_freed: freed,
        }))
    }

    async fn migrate(
        &self,
        request: Request<v1::MigrateRequest>,
    ) -> Result<Response<v1::MigrateResponse>, Status> {
        let req = request.into_inner();
        if req.destination_grpc_addr == self.identity().grpc_addr {
            return Err(Status::invalid_argument(
                "a sequence cannot move to the worker it runs on",
            ));
        }
        // On its own task: a caller that goes away must not cut a migration short between the
        // pause and the hand-over.
        let g = self.clone();
        tokio::spawn(async move { crate::migrate::migrate(&g, req).await })
            .await
            .map_err(|e| Status::internal(format!("migration task: {e}")))?
            .map(Response::new)
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
            engine: self.shared.model().engine_name().into(),
        }))
    }

    async fn drain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        self.drain.ask(request.into_inner().grace_ms);
        let load = self.load();
        Ok(Response::new(v1::DrainResponse {
            in_flight: load.running_seqs + load.reservations,
        }))
    }
}

/// Aggregated mode: the prompt is computed inside this worker's own batch, into its own
/// reservation; no KV crosses a wire. The destination must be a reservation of this worker.
#[tonic::async_trait]
impl PrefillService for DecodeGrpc {
    async fn prefill(
        &self,
        request: Request<v1::PrefillRequest>,
    ) -> Result<Response<v1::PrefillResponse>, Status> {
        let arrived = Instant::now();
        if !self.aggregated {
            return Err(Status::unimplemented(
                "this decode worker does not prefill (start it with --aggregated)",
            ));
        }
        let req = request.into_inner();
        if req.replayed > 0 {
            // Its batch computes a whole prompt as given; replayed tokens would compute otherwise
            // than they did when generated, and the stream would not continue exactly.
            return Err(Status::invalid_argument(
                "an aggregated worker does not take replayed tokens (a decode failover moves to a prefill and decode pair)",
            ));
        }
        let dest = req
            .destination
            .ok_or_else(|| Status::invalid_argument("no KV destination"))?;
        let sampling = tandem_wire::sampling_from_proto(&req.sampling.unwrap_or_default());
        sampling
            .validate()
            .map_err(|e| tandem_wire::engine_status(&e))?;
        {
            let book = self.shared.book();
            let r = book.get(dest.reservation_id).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "reservation {} is not one of this worker's",
                    dest.reservation_id
                ))
            })?;
            if r.phase != Phase::Filling || r.prompt_tokens as usize != req.prompt_tokens.len() {
                return Err(Status::invalid_argument(format!(
                    "reservation {} is not waiting for a prompt of {} tokens",
                    dest.reservation_id,
                    req.prompt_tokens.len()
                )));
            }
        }
        let n = req.prompt_tokens.len();
        self.stats
            .queued_prefill_tokens
            .fetch_add(n as u64, Ordering::Relaxed);
        let cancel = Arc::new(AtomicBool::new(false));
        let guard = CancelOnDrop(cancel.clone(), self.inbox.clone());
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.inbox.prefill(PrefillJob {
            reservation_id: dest.reservation_id,
            prompt: req.prompt_tokens,
            sampling,
            cancel,
            reply: Some(tx),
        });
        let out = rx
            .await
            .unwrap_or(Err(Failure::Stopping))
            .map_err(Status::from)?;
        drop(guard.disarm());
        let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_micros() as u64;
        Ok(Response::new(v1::PrefillResponse {
            request_id: req.request_id,
            first_token: out.first_token,
            finish: tandem_wire::finish_to_proto(out.finish).into(),
            prompt_tokens: n as u32,
            timings: Some(v1::Timings {
                queue_wait_us: us(arrived, out.started),
                compute_us: us(out.started, out.finished),
                transfer_us: 0,
                transfer_overlap_us: 0,
                total_us: us(arrived, Instant::now()),
            }),
            kv_frames: 0,
            kv_bytes: 0,
        }))
    }

    async fn cancel(
        &self,
        _request: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        // A caller that gives up drops its Prefill call, which cancels the work; by request id
        // there is nothing more to find here.
        Ok(Response::new(v1::CancelResponse { found: false }))
    }
}

/// Cancels an aggregated prefill when its handler is dropped before the answer.
struct CancelOnDrop(Arc<AtomicBool>, Arc<Inbox>);

impl CancelOnDrop {
    fn disarm(self) -> Arc<AtomicBool> {
        let flag = self.0.clone();
        std::mem::forget(self);
        flag
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
        self.1.poke();
    }
}
