//! Tandem's prefill worker: computes prompts' KV caches in batches under a token budget (long
//! prompts chunked across steps), pushes each layer's KV into the decode worker's reserved blocks
//! while later layers compute, and answers with the first token and where the time went.
//!
//! Parts: [`queue`] (jobs and counters shared with the handlers), [`batcher`] (the engine's
//! thread), [`transfer`] (a request's KV on the wire), [`service`] (the gRPC handlers), and
//! [`run`], which wires them to a listener and the router.
#![forbid(unsafe_code)]

pub mod batcher;
pub mod queue;
pub mod service;
pub mod transfer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tandem_engine::{Engine, Model};
use tandem_kv_transfer::{KvSender, block_geometry};
use tandem_proto::v1;
use tandem_proto::v1::prefill_service_server::PrefillServiceServer;
use tandem_proto::v1::worker_control_server::WorkerControlServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::batcher::BatcherConfig;
use crate::queue::Queue;
use crate::service::PrefillGrpc;

/// Errors that stop a prefill worker from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum PrefillWorkerError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("router: {0}")]
    Router(#[from] tandem_router::RouterError),
}

/// Everything a prefill worker needs to start.
pub struct PrefillWorkerConfig {
    /// Name clients use for the model.
    pub model_name: String,
    /// The loaded model.
    pub model: Arc<Model>,
    /// Token ids that end a sequence unless a request ignores EOS.
    pub eos: Vec<u32>,
    /// KV blocks of the worker's own pool (prompts in flight live there until sent).
    pub kv_blocks: usize,
    /// Most prompt tokens per step.
    pub step_tokens: usize,
    /// Prompt tokens the queue may hold before new prompts are refused (RESOURCE_EXHAUSTED).
    pub max_queued_tokens: u64,
    /// Listener for the gRPC services.
    pub grpc_listener: TcpListener,
    /// Host name other processes use to reach the listener.
    pub advertise_host: String,
    /// Router to register with; `None` serves unregistered (tests).
    pub router: Option<String>,
    /// How long a drain (SIGTERM, the `Drain` RPC) lets queued and running prompts finish.
    pub drain_grace: Duration,
}

/// Starts the worker and serves until `shutdown` resolves or the `Drain` RPC asks; then drains
/// (no new prompts; those it holds may finish within the grace), deregisters, fails what is still
/// queued with UNAVAILABLE, and returns.
pub async fn run(
    cfg: PrefillWorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), PrefillWorkerError> {
    let engine = Engine::new(cfg.model.clone(), cfg.kv_blocks);
    let geometry = block_geometry(engine.pool().geometry());
    let grpc_addr = cfg.grpc_listener.local_addr()?;
    let identity = v1::WorkerIdentity {
        worker_id: String::new(),
        role: v1::WorkerRole::Prefill.into(),
        grpc_addr: format!("{}:{}", cfg.advertise_host, grpc_addr.port()),
        kv_endpoint: String::new(),
        kv_transport: v1::KvTransportKind::Unspecified.into(),
        model: cfg.model_name.clone(),
        host: cfg.advertise_host.clone(),
        geometry: Some(geometry),
        max_context_tokens: cfg.model.config().max_context as u32,
        pid: std::process::id(),
        step_tokens: u32::try_from(cfg.step_tokens).unwrap_or(u32::MAX),
    };
    let queue = Arc::new(Queue::default());
    let (warmed_tx, warmed_rx) = tokio::sync::oneshot::channel();
    let batcher = {
        let queue = queue.clone();
        let bc = BatcherConfig {
            step_tokens: cfg.step_tokens,
        };
        let eos = cfg.eos;
        std::thread::Builder::new()
            .name("prefill-batch".into())
            .spawn(move || batcher::run(engine, queue, bc, eos, warmed_tx))?
    };
    let grpc = PrefillGrpc {
        queue: queue.clone(),
        sender: Arc::new(KvSender::new(format!("prefill@{}", identity.grpc_addr))),
        identity: Arc::new(RwLock::new(identity.clone())),
        geometry,
        max_context: cfg.model.config().max_context,
        pool_blocks: cfg.kv_blocks,
        max_queued_tokens: cfg.max_queued_tokens,
        drain: tandem_router::Drain::new(cfg.drain_grace),
        inflight: Arc::new(Mutex::new(HashMap::new())),
        engine: cfg.model.engine_name(),
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(PrefillServiceServer::new(grpc.clone()))
            .add_service(WorkerControlServer::new(grpc.clone()))
            .serve_with_incoming_shutdown(
                // Small messages (each streamed token, each answer) go out at once, not held by Nagle's
                // algorithm until the previous one is acknowledged.
                TcpIncoming::from(cfg.grpc_listener).with_nodelay(Some(true)),
                stopped(stop_rx.clone()),
            ),
    );
    // Register once the warm-up steps are timed: the registration carries them, so that the
    // router predicts this worker's prompts from its first request.
    let _ = warmed_rx.await;
    let registration = match cfg.router {
        Some(addr) => {
            let client =
                tandem_router::RouterClient::connect(&addr, Duration::from_secs(5)).await?;
            let g = grpc.clone();
            Some(tokio::spawn(tandem_router::keep_registered(
                client,
                identity,
                move || g.report(),
                stopped(stop_rx.clone()),
            )))
        }
        None => None,
    };
    tracing::info!(grpc = %grpc_addr, "prefill worker serving");
    let drain = grpc.drain.clone();
    drain.run(shutdown, || grpc.inflight().is_empty()).await;
    let _ = stop_tx.send(true);
    if let Some(r) = registration
        && let Ok(Err(e)) = r.await
    {
        tracing::warn!(error = %e, "deregistration failed");
    }
    queue.stop();
    let _ = server.await;
    let _ = tokio::task::spawn_blocking(move || batcher.join()).await;
    Ok(())
}
