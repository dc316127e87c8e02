//! `tandem prefill-worker`, `tandem decode-worker` and `tandem router`: each role on its own, so
//! that a multi-host deployment needs nothing but this binary.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tandem_engine::Model;
use tokio::net::TcpListener;

use crate::engine_args::{EngineArgs, tokenizer_facts};

/// Flags every worker shares.
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Model: a GGUF file or a safetensors checkpoint directory (default: the fetched SmolLM2).
    /// With --engine sim, only its tokenizer is read (for the vocabulary and end-of-sequence ids),
    /// and only when the file is there.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// Name clients use for the model (default: the model file's name without extension).
    #[arg(long, env = "TANDEM_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Router to register with, as host:port.
    #[arg(long, env = "TANDEM_ROUTER")]
    pub router: String,
    /// Address to listen on.
    #[arg(long, env = "TANDEM_LISTEN", default_value = "127.0.0.1")]
    pub listen: String,
    /// Host name or address other processes use to reach this worker (default: --listen).
    #[arg(long, env = "TANDEM_ADVERTISE")]
    pub advertise: Option<String>,
    /// gRPC port (0: any free port).
    #[arg(long, env = "TANDEM_PORT", default_value_t = 0)]
    pub port: u16,
    /// Memory for the KV pool, in MiB (native engine; a sim pool holds the simulated capacity).
    #[arg(long, env = "TANDEM_KV_MEMORY_MB")]
    pub kv_memory_mb: Option<usize>,
    /// Compute threads (default: all cores; one with `--engine sim`).
    #[arg(long, env = "TANDEM_THREADS")]
    pub threads: Option<usize>,
    /// Stop when standard input closes (`tandem up` uses it so that no worker outlives it).
    #[arg(long, hide = true)]
    pub exit_with_stdin: bool,
    /// On SIGTERM, Ctrl-C or a drain (`tandem drain`), how long the work this worker holds may
    /// take to finish: it takes no new work at once, stops when idle, and at this limit ends what
    /// still runs (gateways move its streams to other decode workers).
    #[arg(long, env = "TANDEM_DRAIN_GRACE", default_value = "30s", value_parser = crate::admission_args::grace)]
    pub drain_grace: Duration,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// `tandem prefill-worker`.
#[derive(Args, Debug)]
pub struct PrefillArgs {
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Most prompt tokens per prefill step (longer prompts are chunked across steps).
    #[arg(long, env = "TANDEM_STEP_TOKENS", default_value_t = 512)]
    pub step_tokens: usize,
    /// Prompt tokens the queue may hold before new prompts are refused.
    #[arg(long, env = "TANDEM_MAX_QUEUED_TOKENS", default_value_t = 65536)]
    pub max_queued_tokens: u64,
}

/// How prefill workers deliver KV to a decode worker.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Framed stream over tcp (works across hosts).
    Tcp,
    /// The decode worker's pool lives in a shared-memory file (same host only).
    Shm,
}

/// `tandem decode-worker`.
#[derive(Args, Debug)]
pub struct DecodeArgs {
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Port of the KV listener (0: any free port).
    #[arg(long, env = "TANDEM_KV_PORT", default_value_t = 0)]
    pub kv_port: u16,
    /// KV endpoint prefill workers dial, as host:port, when it is not --advertise and the KV
    /// port (a separate network for KV, or a translated address).
    #[arg(long, env = "TANDEM_KV_ADVERTISE")]
    pub kv_advertise: Option<String>,
    /// How prefill workers deliver KV.
    #[arg(long, env = "TANDEM_TRANSPORT", value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// Directory of the shared-memory pool file (shm only).
    #[arg(long, env = "TANDEM_SHM_DIR", default_value = "/dev/shm")]
    pub shm_dir: PathBuf,
    /// Lease of a reservation whose Reserve asks for none, in milliseconds.
    #[arg(long, env = "TANDEM_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,
    /// Also prefill: prompts are computed in chunks inside this worker's continuous batch (the
    /// aggregated baseline that disaggregation is measured against).
    #[arg(long, env = "TANDEM_AGGREGATED")]
    pub aggregated: bool,
    /// Most tokens per step: decode tokens plus, with --aggregated, prompt chunks.
    #[arg(long, env = "TANDEM_STEP_TOKENS", default_value_t = 512)]
    pub step_tokens: usize,
}

/// `tandem router`.
#[derive(Args, Debug)]
pub struct RouterArgs {
    /// Address to listen on, as host:port.
    #[arg(long, env = "TANDEM_ROUTER_LISTEN", default_value = "127.0.0.1:7000")]
    pub listen: String,
}

struct Loaded {
    model: Arc<Model>,
    name: String,
    eos: Vec<u32>,
    /// The pool's size when the engine fixes it (sim: the simulated capacity).
    kv_blocks: Option<usize>,
}

/// A simulated model for `--engine sim`: no weights; the tokenizer, when there, for its ids.
fn load_sim(w: &WorkerArgs) -> anyhow::Result<Loaded> {
    let path = w
        .model
        .clone()
        .unwrap_or_else(tandem_runtime::default_model_path);
    let facts = tokenizer_facts(&path)?;
    if facts.is_none() {
        tracing::warn!(path = %path.display(), "no tokenizer file: the simulated model uses its own vocabulary and has no end-of-sequence id");
    }
    if w.kv_memory_mb.is_some() {
        tracing::warn!(
            "--kv-memory-mb is ignored with --engine sim: the pool holds the simulated capacity"
        );
    }
    // The simulated model computes on one thread; the engine still runs each step on a compute
    // thread, and every other thread of the pool would only spin beside it, taking a core from
    // the processes it shares the machine with.
    crate::setup::compute_threads(Some(w.threads.unwrap_or(1)))?;
    let (vocab, eos) = facts.map_or((None, Vec::new()), |(v, e)| (Some(v), e));
    let sim = w.engine.build_sim(vocab)?;
    tracing::info!("{}", sim.summary);
    Ok(Loaded {
        name: w
            .model_name
            .clone()
            .unwrap_or_else(|| sim.model.config().name.clone()),
        model: Arc::new(sim.model),
        eos,
        kv_blocks: Some(sim.kv_blocks),
    })
}

fn load(w: &WorkerArgs) -> anyhow::Result<Loaded> {
    if w.engine.is_sim() {
        return load_sim(w);
    }
    crate::setup::compute_threads(w.threads)?;
    let (path, loaded) = crate::setup::load_model(w.model.as_ref())?;
    Ok(Loaded {
        model: Arc::new(loaded.model),
        name: w.model_name.clone().unwrap_or_else(|| model_name(&path)),
        eos: loaded.tokenizer.eos_token_ids().to_vec(),
        kv_blocks: None,
    })
}

/// The name a model is served under when none is given: its file name without extension.
pub fn model_name(path: &std::path::Path) -> String {
    path.file_stem()
        .or_else(|| path.file_name())
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
}

/// Blocks that fit in `mb` MiB for this model.
fn blocks_in(model: &Model, mb: usize) -> usize {
    let g = tandem_engine::Engine::geometry_for(model, 1);
    ((mb << 20) / g.layer_bytes(1).max(1) / g.layers.max(1)).max(1)
}

/// Resolves when the process should stop: Ctrl-C, SIGTERM, or (with --exit-with-stdin) the
/// parent closing our standard input.
async fn stop_signal(with_stdin: bool) {
    let stdin_closed = async move {
        if !with_stdin {
            return std::future::pending::<()>().await;
        }
        let mut buf = [0u8; 64];
        let mut stdin = tokio::io::stdin();
        use tokio::io::AsyncReadExt;
        while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
    };
    tokio::select! {
        () = tandem_runtime::shutdown_signal() => {}
        () = stdin_closed => {}
    }
}

async fn bind(host: &str, port: u16) -> anyhow::Result<TcpListener> {
    TcpListener::bind((host, port))
        .await
        .with_context(|| format!("listening on {host}:{port}"))
}

/// Runs a worker to its end on a runtime of its own, then leaves at once: a stop that did not come
/// through stdin (SIGTERM, a drain) leaves the stdin watcher's blocking read behind, and dropping
/// the runtime would wait for it as long as `tandem up` holds the pipe open.
fn run_worker(worker: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    let rt = runtime()?;
    let done = rt.block_on(worker);
    rt.shutdown_background();
    done
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::setup::async_threads())
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run_prefill(args: PrefillArgs) -> anyhow::Result<()> {
    let w = &args.worker;
    let loaded = load(w)?;
    let kv_blocks = loaded
        .kv_blocks
        .unwrap_or_else(|| blocks_in(&loaded.model, w.kv_memory_mb.unwrap_or(512)));
    run_worker(async {
        let grpc = bind(&w.listen, w.port).await?;
        let cfg = tandem_prefill_worker::PrefillWorkerConfig {
            model_name: loaded.name,
            model: loaded.model,
            eos: loaded.eos,
            kv_blocks,
            step_tokens: args.step_tokens,
            max_queued_tokens: args.max_queued_tokens,
            grpc_listener: grpc,
            advertise_host: w.advertise.clone().unwrap_or_else(|| w.listen.clone()),
            router: Some(w.router.clone()),
            drain_grace: w.drain_grace,
        };
        tandem_prefill_worker::run(cfg, stop_signal(w.exit_with_stdin)).await?;
        Ok(())
    })
}

pub fn run_decode(args: DecodeArgs) -> anyhow::Result<()> {
    let w = &args.worker;
    let loaded = load(w)?;
    let kv_blocks = loaded
        .kv_blocks
        .unwrap_or_else(|| blocks_in(&loaded.model, w.kv_memory_mb.unwrap_or(1024)));
    let transport = match args.transport {
        Transport::Tcp => tandem_decode_worker::KvTransport::Tcp,
        Transport::Shm => tandem_decode_worker::KvTransport::Shm(args.shm_dir.join(format!(
            "tandem-kv-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ))),
    };
    run_worker(async {
        let grpc = bind(&w.listen, w.port).await?;
        let kv = bind(&w.listen, args.kv_port).await?;
        let cfg = tandem_decode_worker::DecodeWorkerConfig {
            model_name: loaded.name,
            model: loaded.model,
            eos: loaded.eos,
            kv_blocks,
            transport,
            grpc_listener: grpc,
            kv_listener: kv,
            advertise_host: w.advertise.clone().unwrap_or_else(|| w.listen.clone()),
            kv_advertise: args.kv_advertise.clone(),
            router: Some(w.router.clone()),
            default_lease: Duration::from_millis(args.lease_ms),
            aggregated: args.aggregated,
            step_tokens: args.step_tokens,
            drain_grace: w.drain_grace,
        };
        tandem_decode_worker::run(cfg, stop_signal(w.exit_with_stdin)).await?;
        Ok(())
    })
}

pub fn run_router(args: RouterArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let listener = TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let handle = tandem_router::spawn(
            tandem_router::RouterConfig::default(),
            Box::new(tandem_router::LeastLoaded),
        );
        eprintln!("router listening on {}", listener.local_addr()?);
        tandem_router::serve(listener, tandem_runtime::shutdown_signal(), handle).await?;
        Ok(())
    })
}
