//! Tandem's decode worker: reserves KV blocks under a lease, takes the prompt's KV from prefill
//! workers (tcp frames or writes into its shared-memory pool), and generates the rest of each
//! sequence in a continuous batch, streaming tokens over gRPC.
//!
//! Parts: [`book`] (the reservation table, apart from the engine), [`state`] (what the parts
//! share, and the KV receiver's sink), [`batch`] (the continuous-batching loop, on its own thread
//! and owning the engine) and its [`inbox`], [`migrate`] (moving a running sequence to another
//! decode worker), [`service`] (the gRPC handlers), and [`run`], which wires them to
//! listeners and the router.
#![forbid(unsafe_code)]

pub mod batch;
pub mod book;
pub mod coalesce;
pub mod events;
pub mod inbox;
pub mod migrate;
pub mod service;
pub mod state;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tandem_engine::{Engine, Model};
use tandem_kv_transfer::{ShmRegion, Wire};
use tandem_proto::v1;
use tandem_proto::v1::decode_service_server::DecodeServiceServer;
use tandem_proto::v1::prefill_service_server::PrefillServiceServer;
use tandem_proto::v1::worker_control_server::WorkerControlServer;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::batch::LoopStats;
use crate::inbox::Inbox;
use crate::service::DecodeGrpc;
use crate::state::{Shared, Sink};

/// Errors that stop a decode worker from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum DecodeWorkerError {
    #[error("engine: {0}")]
    Engine(#[from] tandem_engine::EngineError),
    #[error("kv pool: {0}")]
    Kv(#[from] tandem_kv_transfer::KvTransferError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("router: {0}")]
    Router(#[from] tandem_router::RouterError),
}

/// How KV reaches this worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvTransport {
    /// Framed tcp stream into a heap pool.
    Tcp,
    /// Prefill workers write into a pool file at this path; only notices cross the socket.
    Shm(PathBuf),
}

/// Everything a decode worker needs to start.
pub struct DecodeWorkerConfig {
    /// Name clients use for the model.
    pub model_name: String,
    /// The loaded model.
    pub model: Arc<Model>,
    /// Token ids that end a sequence unless a request ignores EOS.
    pub eos: Vec<u32>,
    /// KV blocks in the pool.
    pub kv_blocks: usize,
    /// How prefill workers deliver KV.
    pub transport: KvTransport,
    /// Listener for the gRPC services.
    pub grpc_listener: TcpListener,
    /// Listener for KV frames (tcp) or shm notices.
    pub kv_listener: TcpListener,
    /// Host name other processes use to reach the listeners.
    pub advertise_host: String,
    /// The KV endpoint prefill workers dial, when it is not the advertised host and the KV
    /// listener's port (a separate network for KV, or an address translated on the way).
    pub kv_advertise: Option<String>,
    /// Router to register with; `None` serves unregistered (tests).
    pub router: Option<String>,
    /// Lease for a reservation when Reserve asks for none.
    pub default_lease: Duration,
    /// Aggregated mode: also serve Prefill, with chunked prefill inside the continuous batch.
    pub aggregated: bool,
    /// Most tokens per step (decode tokens plus, in aggregated mode, prompt chunks).
    pub step_tokens: usize,
    /// How long a drain (SIGTERM, the `Drain` RPC) lets running sequences finish before it ends
    /// them (their gateways move them to other decode workers).
    pub drain_grace: Duration,
}

/// A started worker: its identity and a handle to stop it.
pub struct DecodeWorker {
    pub identity: v1::WorkerIdentity,
    grpc: DecodeGrpc,
}

impl DecodeWorker {
    /// The current load (what heartbeats carry).
    pub fn load(&self) -> v1::LoadReport {
        self.grpc.load()
    }
}

/// The engine and what the KV receiver needs beside it.
struct Built {
    engine: Engine,
    /// shm: the pool file's layout, for prefill workers to map.
    shm_layout: Option<v1::ShmPoolLayout>,
    /// A second mapping of the engine's pool, through which KV lands without the engine.
    view: ShmRegion,
}

/// Builds the engine over a pool in anonymous shared memory (tcp) or in a shared-memory pool
/// file (shm), with a second mapping of it.
fn build_engine(
    model: Arc<Model>,
    blocks: usize,
    transport: &KvTransport,
) -> Result<Built, DecodeWorkerError> {
    let geom = Engine::geometry_for(&model, blocks);
    match transport {
        KvTransport::Tcp => {
            let (pool, view) = ShmRegion::anonymous_pool(&geom)?;
            Ok(Built {
                engine: Engine::with_pool(model, pool),
                shm_layout: None,
                view,
            })
        }
        KvTransport::Shm(path) => {
            let region = ShmRegion::create(path, &geom)?;
            let layout = region.layout().clone();
            let view = ShmRegion::open(&layout)?;
            let pool = tandem_engine::kv::KvPool::with_memory(geom, Box::new(region))
                .map_err(tandem_engine::EngineError::from)?;
            Ok(Built {
                engine: Engine::with_pool(model, pool),
                shm_layout: Some(layout),
                view,
            })
        }
    }
}

/// Starts the worker and serves until `shutdown` resolves or the `Drain` RPC asks; then drains
/// (no new work; running sequences may finish within the grace), deregisters, stops the batch
/// loop (what still runs ends with UNAVAILABLE) and returns.
pub async fn run(
    cfg: DecodeWorkerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DecodeWorkerError> {
    let Built {
        engine,
        shm_layout,
        view,
    } = build_engine(cfg.model.clone(), cfg.kv_blocks, &cfg.transport)?;
    let inbox = Arc::new(Inbox::default());
    let shared = Arc::new(Shared::new(
        &engine,
        view,
        shm_layout.is_some(),
        inbox.clone(),
    ));
    let grpc_addr = cfg.grpc_listener.local_addr()?;
    let kv_addr = cfg.kv_listener.local_addr()?;
    let identity = v1::WorkerIdentity {
        worker_id: String::new(),
        role: if cfg.aggregated {
            v1::WorkerRole::Aggregated
        } else {
            v1::WorkerRole::Decode
        }
        .into(),
        grpc_addr: format!("{}:{}", cfg.advertise_host, grpc_addr.port()),
        kv_endpoint: cfg
            .kv_advertise
            .clone()
            .unwrap_or_else(|| format!("{}:{}", cfg.advertise_host, kv_addr.port())),
        kv_transport: match cfg.transport {
            KvTransport::Tcp => v1::KvTransportKind::Tcp,
            KvTransport::Shm(_) => v1::KvTransportKind::Shm,
        }
        .into(),
        model: cfg.model_name.clone(),
        host: cfg.advertise_host.clone(),
        geometry: Some(shared.geometry),
        max_context_tokens: cfg.model.config().max_context as u32,
        pid: std::process::id(),
        step_tokens: u32::try_from(cfg.step_tokens).unwrap_or(u32::MAX),
    };
    let stats = Arc::new(LoopStats::default());
    let grpc = DecodeGrpc {
        shared: shared.clone(),
        inbox: inbox.clone(),
        stats: stats.clone(),
        identity: Arc::new(RwLock::new(identity.clone())),
        shm_layout,
        default_lease: cfg.default_lease,
        drain: tandem_router::Drain::new(cfg.drain_grace),
        aggregated: cfg.aggregated,
        kv_sender: Arc::new(tandem_kv_transfer::KvSender::new(
            identity.grpc_addr.clone(),
        )),
    };
    let loop_thread = {
        let (shared, inbox, stats, eos) = (shared.clone(), inbox.clone(), stats.clone(), cfg.eos);
        let lc = batch::LoopConfig {
            step_tokens: cfg.step_tokens,
        };
        std::thread::Builder::new()
            .name("decode-batch".into())
            .spawn(move || batch::run(engine, shared, inbox, stats, eos, lc))?
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let wire = if shared.shm { Wire::Shm } else { Wire::Tcp };
    let kv = tokio::spawn(tandem_kv_transfer::serve_with(
        cfg.kv_listener,
        stopped(stop_rx.clone()),
        Arc::new(Sink(shared.clone())),
        wire,
    ));
    let sweeper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                shared.sweep(std::time::Instant::now());
            }
        })
    };
    let server = tonic::transport::Server::builder()
        .add_service(DecodeServiceServer::new(grpc.clone()))
        .add_service(WorkerControlServer::new(grpc.clone()))
        .add_service(PrefillServiceServer::new(grpc.clone()))
        .serve_with_incoming_shutdown(
            // Small messages (each streamed token, each answer) go out at once, not held by Nagle's
            // algorithm until the previous one is acknowledged.
            TcpIncoming::from(cfg.grpc_listener).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );
    let server = tokio::spawn(server);
    let registration = match &cfg.router {
        Some(addr) => {
            let client = tandem_router::RouterClient::connect(addr, Duration::from_secs(5)).await?;
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
    // A drain moves the running sequences to other decode workers, which the router knows.
    let mover = cfg.router.clone().map(|router| {
        let g = grpc.clone();
        tokio::spawn(async move {
            g.drain.asked().await;
            crate::migrate::move_all(&g, &router).await;
        })
    });
    tracing::info!(grpc = %grpc_addr, kv = %kv_addr, "decode worker serving");
    let drain = grpc.drain.clone();
    drain
        .run(shutdown, || {
            let l = grpc.load();
            // A sequence out of the batch while it migrates is still this worker's to hand over.
            l.running_seqs == 0 && l.reservations == 0 && grpc.shared.book().running().is_empty()
        })
        .await;
    let _ = stop_tx.send(true);
    if let Some(r) = registration
        && let Ok(Err(e)) = r.await
    {
        tracing::warn!(error = %e, "deregistration failed");
    }
    inbox.stop();
    sweeper.abort();
    if let Some(m) = mover {
        m.abort();
    }
    let _ = kv.await;
    let _ = server.await;
    let _ = tokio::task::spawn_blocking(move || loop_thread.join()).await;
    Ok(())
}
