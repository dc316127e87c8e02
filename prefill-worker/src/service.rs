//! The PrefillService and WorkerControl gRPC handlers.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tandem_kv_transfer::KvSender;
use tandem_proto::v1;
use tandem_proto::v1::prefill_service_server::PrefillService;
use tandem_proto::v1::worker_control_server::WorkerControl;
use tonic::{Request, Response, Status};

use crate::queue::{Job, Queue};
use crate::transfer;

/// Everything a handler needs.
#[derive(Clone)]
pub struct PrefillGrpc {
    pub queue: Arc<Queue>,
    pub sender: Arc<KvSender>,
    pub identity: Arc<RwLock<v1::WorkerIdentity>>,
    pub geometry: v1::BlockGeometry,
    pub max_context: usize,
    /// Blocks in the worker's own pool: a prompt needing more could never run.
    pub pool_blocks: usize,
    /// Prompt tokens the queue may hold before new prompts are refused.
    pub max_queued_tokens: u64,
    pub drain: tandem_router::Drain,
    /// Cancel flags of requests in flight, by request id.
    pub inflight: Arc<Mutex<HashMap<String, Arc<AtomicBool>>>>,
    /// The engine Info reports: `native` or `sim`.
    pub engine: &'static str,
}

/// Cancels the job when the handler's future is dropped (the caller went away or its deadline
/// passed) and forgets it in every case.
struct InFlight<'a> {
    grpc: &'a PrefillGrpc,
    request_id: String,
    cancel: Arc<AtomicBool>,
    finished: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel.store(true, Ordering::Relaxed);
            self.grpc.queue.poke();
        }
        self.grpc.inflight().remove(&self.request_id);
    }
}

impl PrefillGrpc {
    pub(crate) fn inflight(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<AtomicBool>>> {
        self.inflight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The worker's load as heartbeats and Info report it.
    pub fn load(&self) -> v1::LoadReport {
        let c = &self.queue.counters;
        v1::LoadReport {
            state: self.state().into(),
            queued_prefill_tokens: c.queued_tokens.load(Ordering::Relaxed),
            running_seqs: c.running.load(Ordering::Relaxed),
            waiting_seqs: c.waiting.load(Ordering::Relaxed),
            free_kv_blocks: 0,
            total_kv_blocks: 0,
            prefill_tokens_per_s: f32::from_bits(c.tokens_per_s.load(Ordering::Relaxed)),
            decode_tokens_per_s: 0.0,
            reservations: 0,
            ..v1::LoadReport::default()
        }
    }

    /// What a heartbeat carries: the load and the steps measured since the last heartbeat.
    pub fn report(&self) -> v1::LoadReport {
        v1::LoadReport {
            steps: self.queue.counters.steps.take(),
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

    fn check(&self, req: &v1::PrefillRequest) -> Result<v1::KvDestination, Status> {
        if self.drain.draining() {
            return Err(Status::unavailable("prefill worker is draining"));
        }
        let n = req.prompt_tokens.len();
        if n == 0 {
            return Err(Status::invalid_argument("the prompt is empty"));
        }
        if req.replayed as usize >= n {
            return Err(Status::invalid_argument(format!(
                "{} replayed tokens of a {n}-token prompt: at least one must be the prompt's",
                req.replayed
            )));
        }
        if n >= self.max_context {
            return Err(Status::invalid_argument(format!(
                "the prompt has {n} tokens; the model's context is {}",
                self.max_context
            )));
        }
        let dest = req
            .destination
            .clone()
            .ok_or_else(|| Status::invalid_argument("no KV destination"))?;
        if dest.geometry != Some(self.geometry) {
            return Err(Status::invalid_argument(format!(
                "destination geometry {:?} differs from this worker's {:?}",
                dest.geometry, self.geometry
            )));
        }
        let need = n.div_ceil(self.geometry.block_tokens as usize);
        if dest.block_ids.len() < need {
            return Err(Status::invalid_argument(format!(
                "{} destination blocks for a prompt that needs {need}",
                dest.block_ids.len()
            )));
        }
        if need > self.pool_blocks {
            return Err(Status::invalid_argument(format!(
                "the prompt needs {need} KV blocks; this prefill worker's pool has {}",
                self.pool_blocks
            )));
        }
        let queued = self.queue.counters.queued_tokens.load(Ordering::Relaxed);
        if queued > 0 && queued + n as u64 > self.max_queued_tokens {
            return Err(Status::resource_exhausted(format!(
                "{queued} prompt tokens already queued"
            )));
        }
        Ok(dest)
    }
}

#[tonic::async_trait]
impl PrefillService for PrefillGrpc {
    async fn prefill(
        &self,
        request: Request<v1::PrefillRequest>,
    ) -> Result<Response<v1::PrefillResponse>, Status> {
        let arrived = Instant::now();
        let req = request.into_inner();
        let dest = self.check(&req)?;
        let sampling = tandem_wire::sampling_from_proto(&req.sampling.unwrap_or_default());
        sampling
            .validate()
            .map_err(|e| tandem_wire::engine_status(&e))?;
        let outbound = transfer::open(&self.sender, &req.request_id, &dest).await?;
        let cancel = Arc::new(AtomicBool::new(false));
        let mut guard = InFlight {
            grpc: self,
            request_id: req.request_id.clone(),
            cancel: cancel.clone(),
            finished: false,
        };
        self.inflight()
            .insert(req.request_id.clone(), cancel.clone());
        let (layers_tx, layers_rx) = tokio::sync::mpsc::unbounded_channel();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let prompt_len = req.prompt_tokens.len();
        self.queue.push(Job {
            request_id: req.request_id.clone(),
            prompt: req.prompt_tokens,
            replayed: req.replayed as usize,
            sampling,
            destination: dest,
            arrived,
            cancel: cancel.clone(),
            layers: layers_tx,
            done: done_tx,
        });
        let sending = async {
            let r = transfer::run(outbound, layers_rx).await;
            if r.is_err() {
                // The batcher stops computing for nobody.
                cancel.store(true, Ordering::Relaxed);
                self.queue.poke();
            }
            r
        };
        let computing = async {
            done_rx
                .await
                .unwrap_or_else(|_| Err(Status::internal("the prefill batcher stopped")))
        };
        let (computed, transferred) = tokio::join!(computing, sending);
        guard.finished = true;
        // A compute error explains a transfer that ended early, so it comes first.
        let computed = computed?;
        let transferred = transferred?;
        let us = |a: Instant, b: Instant| b.saturating_duration_since(a).as_micros() as u64;
        let overlap_end = transferred.acked.min(computed.finished);
        Ok(Response::new(v1::PrefillResponse {
            request_id: req.request_id,
            first_token: computed.first_token,
            finish: tandem_wire::finish_to_proto(computed.finish).into(),
            prompt_tokens: prompt_len as u32,
            timings: Some(v1::Timings {
                queue_wait_us: us(arrived, computed.started),
                compute_us: us(computed.started, computed.finished),
                transfer_us: us(transferred.first_byte, transferred.acked),
                transfer_overlap_us: us(transferred.first_byte, overlap_end),
                total_us: us(arrived, Instant::now()),
            }),
            kv_frames: transferred.frames,
            kv_bytes: transferred.bytes,
        }))
    }

    async fn cancel(
        &self,
        request: Request<v1::CancelRequest>,
    ) -> Result<Response<v1::CancelResponse>, Status> {
        let id = request.into_inner().request_id;
        let flag = self.inflight().get(&id).cloned();
        if let Some(f) = &flag {
            f.store(true, Ordering::Relaxed);
            self.queue.poke();
        }
        Ok(Response::new(v1::CancelResponse {
            found: flag.is_some(),
        }))
    }
}

#[tonic::async_trait]
impl WorkerControl for PrefillGrpc {
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
        let identity = self
            .identity
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        Ok(Response::new(v1::InfoResponse {
            identity: Some(identity),
            load: Some(self.load()),
            prefill_requests: self.inflight().len() as u32,
            engine: self.engine.into(),
        }))
    }

    async fn drain(
        &self,
        request: Request<v1::DrainRequest>,
    ) -> Result<Response<v1::DrainResponse>, Status> {
        self.drain.ask(request.into_inner().grace_ms);
        Ok(Response::new(v1::DrainResponse {
            in_flight: self.inflight().len() as u32,
        }))
    }
}
