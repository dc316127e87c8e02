//! `tandem gateway` (the OpenAI HTTP front with the router embedded) and `tandem up` (a whole
//! local cluster: gateway and router in this process, prefill and decode workers as children).
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tandem_router::{Leg, RouterLink};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use crate::admission_args::AdmissionArgs;
use crate::engine_args::{EngineArgs, tokenizer_facts};
use crate::roles::{Transport, model_name};
use crate::supervise::{Backoff, Worker, supervise};

/// Flags of the gateway, shared by `tandem gateway` and `tandem up`.
#[derive(Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Model: a GGUF file or a safetensors checkpoint directory (default: the fetched SmolLM2);
    /// the gateway reads only its tokenizer and context length.
    #[arg(long, env = "TANDEM_MODEL")]
    pub model: Option<PathBuf>,
    /// Name clients use for the model (default: the model file's name without extension).
    #[arg(long, env = "TANDEM_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Address the HTTP server listens on.
    #[arg(long, env = "TANDEM_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// HTTP port of the OpenAI-compatible API (0: any free port).
    #[arg(long, env = "TANDEM_HTTP_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Address of the embedded router's gRPC service, where workers register (port 0: any).
    #[arg(long, env = "TANDEM_ROUTER_LISTEN", default_value = "127.0.0.1:0")]
    pub router_listen: String,
    /// Place through standalone routers (`tandem router`) instead of an embedded one, as
    /// host:port[,host:port...]: tried in turn; while none answers, the gateway places with the
    /// last worker set it saw. Workers then register with a router, not with the gateway.
    #[arg(long, env = "TANDEM_ROUTERS", value_delimiter = ',')]
    pub router: Vec<String>,
    /// Times a stream may move to another decode worker when its own fails mid-stream (0: never;
    /// the client then gets an error chunk).
    #[arg(long, env = "TANDEM_MAX_MIGRATIONS", default_value_t = 2)]
    pub max_migrations: u32,
    #[command(flatten)]
    pub admission: AdmissionArgs,
}

/// `tandem up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    /// Prefill worker processes.
    #[arg(long, env = "TANDEM_PREFILL", default_value_t = 1)]
    pub prefill: usize,
    /// Decode worker processes.
    #[arg(long, env = "TANDEM_DECODE", default_value_t = 1)]
    pub decode: usize,
    /// Aggregated worker processes (each prefills and decodes in one continuous batch); with
    /// `--prefill 0 --decode 0` this is the aggregated baseline.
    #[arg(long, env = "TANDEM_AGGREGATED", default_value_t = 0)]
    pub aggregated: usize,
    /// How prefill workers deliver KV to decode workers.
    #[arg(long, env = "TANDEM_TRANSPORT", value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// Directory of the decode workers' shared-memory pool files (shm only). It must hold every
    /// decode worker's KV memory: a container's /dev/shm is often only 64 MiB.
    #[arg(long, env = "TANDEM_SHM_DIR", default_value = "/dev/shm")]
    pub shm_dir: PathBuf,
    /// Compute threads of each worker process (default: all cores).
    #[arg(long, env = "TANDEM_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Most prompt tokens per prefill step.
    #[arg(long, env = "TANDEM_STEP_TOKENS", default_value_t = 512)]
    pub step_tokens: usize,
    /// How long a worker's work may take to finish when it drains (its SIGTERM, `tandem drain`,
    /// or this command's Ctrl-C, which drains every worker before it stops).
    #[arg(long, env = "TANDEM_DRAIN_GRACE", default_value = "30s", value_parser = crate::admission_args::grace)]
    pub drain_grace: Duration,
    /// How long to wait for every worker to load its model and register, in seconds.
    #[arg(long, default_value_t = 300)]
    pub ready_timeout_s: u64,
    /// Print the listening address as one JSON line on stdout once ready (for scripts and tests).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

/// What the gateway serves when the workers run a simulated model: its name and context length
/// (the tokenizer is still the model file's), and the step times the workers simulate.
struct SimFront {
    name: String,
    max_context: usize,
    perf: Option<Arc<dyn tandem_sim::perf::PerfModel>>,
}

/// The gateway and its embedded router, started.
struct Front {
    router: RouterLink,
    /// The embedded router's address, where workers register (none with remote routers).
    router_addr: Option<std::net::SocketAddr>,
    /// The standalone routers placed through, if any.
    remote_routers: Vec<String>,
    http_addr: std::net::SocketAddr,
    model_path: PathBuf,
    model_name: String,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start_front(args: &GatewayArgs, sim: Option<SimFront>) -> anyhow::Result<Front> {
    let model_path = args
        .model
        .clone()
        .unwrap_or_else(tandem_runtime::default_model_path);
    if !model_path.exists() {
        bail!(
            "model {} not found (fetch the default model with scripts/fetch-model.sh)",
            model_path.display()
        );
    }
    let name = args.model_name.clone().unwrap_or_else(|| match &sim {
        Some(s) => s.name.clone(),
        None => model_name(&model_path),
    });
    let router_config = args
        .admission
        .router_config(sim.as_ref().and_then(|s| s.perf.clone()))?;
    let (router, router_listener) = if args.router.is_empty() {
        let handle = tandem_router::spawn(router_config, Box::new(tandem_router::LeastLoaded));
        let listener = TcpListener::bind(&args.router_listen)
            .await
            .with_context(|| format!("router listening on {}", args.router_listen))?;
        (RouterLink::Embedded(handle), Some(listener))
    } else {
        let remote = tandem_router::RemoteRouter::new(
            &args.router,
            router_config,
            Box::new(tandem_router::LeastLoaded),
        )?;
        (RouterLink::Remote(remote), None)
    };
    let http = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("HTTP listening on {}:{}", args.host, args.port))?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let backend = Arc::new(tandem_gateway::DisaggBackend::new(
        router.clone(),
        tandem_gateway::DisaggConfig {
            max_migrations: args.max_migrations,
            ..tandem_gateway::DisaggConfig::default()
        },
    ));
    let mut config = match &sim {
        Some(s) => tandem_gateway::GatewayConfig::new(
            &name,
            tandem_engine::load_tokenizer(&model_path)?,
            s.max_context,
            backend,
        ),
        None => tandem_gateway::GatewayConfig::from_model_path(&name, &model_path, backend)?,
    };
    config.default_budget = args.admission.default_budget();
    let state = tandem_gateway::AppState::new(config)?;
    let http_addr = http.local_addr()?;
    let mut tasks = vec![tokio::spawn({
        let s = until_stopped(stopped.clone());
        async move {
            if let Err(e) = tandem_gateway::serve(http, state, s).await {
                tracing::error!(error = %e, "gateway failed");
            }
        }
    })];
    let router_addr = match (router_listener, &router) {
        (Some(listener), RouterLink::Embedded(handle)) => {
            let addr = listener.local_addr()?;
            let s = until_stopped(stopped.clone());
            let handle = handle.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = tandem_router::serve(listener, s, handle).await {
                    tracing::error!(error = %e, "router service failed");
                }
            }));
            Some(addr)
        }
        _ => None,
    };
    let front = Front {
        router,
        router_addr,
        remote_routers: args.router.clone(),
        http_addr,
        model_path,
        model_name: name,
        stop,
        tasks,
    };
    Ok(front)
}

impl Front {
    /// Where workers register: the embedded router, or the first standalone one.
    fn registry(&self) -> String {
        match self.router_addr {
            Some(addr) => addr.to_string(),
            None => self.remote_routers.first().cloned().unwrap_or_default(),
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(crate::setup::async_threads())
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run_gateway(args: GatewayArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let front = start_front(&args, None).await?;
        match front.router_addr {
            Some(addr) => eprintln!(
                "gateway on http://{} serving {:?}; workers register with --router {addr}",
                front.http_addr, front.model_name
            ),
            None => eprintln!(
                "gateway on http://{} serving {:?}; placing through routers {}",
                front.http_addr,
                front.model_name,
                front.remote_routers.join(",")
            ),
        }
        tandem_runtime::shutdown_signal().await;
        front.stop().await;
        Ok(())
    })
}

/// Starts worker `index` of `role` (prefill, decode or aggregated).
fn spawn_worker(
    role: &'static str,
    front: &Front,
    args: &UpArgs,
    index: usize,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("finding the tandem binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg(match role {
        "prefill" => "prefill-worker",
        _ => "decode-worker",
    })
    .arg("--router")
    .arg(front.registry())
    .arg("--model")
    .arg(&front.model_path)
    .arg("--model-name")
    .arg(&front.model_name)
    .arg("--exit-with-stdin")
    .stdin(Stdio::piped())
    .stdout(Stdio::null())
    .kill_on_drop(true);
    if let Some(t) = args.worker_threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    cmd.arg("--drain-grace")
        .arg(format!("{}ms", args.drain_grace.as_millis()));
    cmd.args(args.engine.to_args());
    match role {
        "prefill" => {
            cmd.arg("--step-tokens").arg(args.step_tokens.to_string());
        }
        other => {
            if other == "aggregated" {
                cmd.arg("--aggregated")
                    .arg("--step-tokens")
                    .arg(args.step_tokens.to_string());
            }
            let t = match args.transport {
                Transport::Tcp => "tcp",
                Transport::Shm => "shm",
            };
            cmd.arg("--transport")
                .arg(t)
                .arg("--shm-dir")
                .arg(&args.shm_dir);
        }
    }
    cmd.spawn()
        .with_context(|| format!("starting {role} {index}"))
}

pub fn run_up(args: UpArgs) -> anyhow::Result<()> {
    if args.aggregated == 0 && (args.prefill == 0 || args.decode == 0) {
        bail!("a cluster needs a prefill and a decode worker, or an aggregated one");
    }
    // Build the simulated model here too: bad flags fail once, before any worker starts.
    let sim = if args.engine.is_sim() {
        let path = args
            .gateway
            .model
            .clone()
            .unwrap_or_else(tandem_runtime::default_model_path);
        let vocab = tokenizer_facts(&path)?.map(|(v, _)| v);
        let e = args.engine.build_sim(vocab)?;
        eprintln!("{}", e.summary);
        let c = e.model.config();
        // Admission predicts with the step times the workers simulate (none at time scale 0).
        let scale = args.engine.sim_time_scale;
        let perf = (scale > 0.0)
            .then(|| tandem_sim::simulate::TimeScaled::new(e.perf.clone(), scale))
            .transpose()?
            .map(|t| Arc::new(t) as Arc<dyn tandem_sim::perf::PerfModel>);
        Some(SimFront {
            name: c.name.clone(),
            max_context: c.max_context,
            perf,
        })
    } else {
        None
    };
    runtime()?.block_on(async {
        let front = start_front(&args.gateway, sim).await?;
        let mut children = Vec::new();
        let roles = [
            ("prefill", args.prefill),
            ("decode", args.decode),
            ("aggregated", args.aggregated),
        ];
        for (role, n) in roles {
            for i in 0..n {
                let child = spawn_worker(role, &front, &args, i)?;
                children.push(Worker::new(role, i, child, tokio::time::Instant::now()));
            }
        }
        let ready = wait_ready(&front.router, &mut children, &args);
        let outcome = tokio::select! {
            r = ready => r,
            () = tandem_runtime::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
        };
        if let Err(e) = outcome {
            shutdown(front, children, args.drain_grace).await;
            return Err(e);
        }
        let url = format!("http://{}", front.http_addr);
        if args.json {
            println!(
                "{}",
                serde_json::json!({"url": url, "model": front.model_name, "router": front.registry()})
            );
        } else {
            println!(
                "Tandem is up: {} prefill + {} decode + {} aggregated workers ({:?} KV transport, {:?} engine), model {:?}",
                args.prefill, args.decode, args.aggregated, args.transport, args.engine.engine, front.model_name
            );
            println!("OpenAI API at {url}/v1 (Ctrl-C stops everything). Try:\n");
            println!(
                "curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n  -d '{{\"model\": \"{}\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is the capital of France?\"}}], \"max_tokens\": 32}}'",
                front.model_name
            );
        }
        // A worker that exits is started again (a crashed decode worker's streams end with an
        // error; the restarted one serves what comes next).
        let restart = |role, i| spawn_worker(role, &front, &args, i);
        tokio::select! {
            () = supervise(&mut children, restart, Backoff::default()) => {}
            () = tandem_runtime::shutdown_signal() => {}
        }
        eprintln!("stopping");
        shutdown(front, children, args.drain_grace).await;
        Ok(())
    })
}

/// Waits until every worker is ready in the router's set; fails if a worker exits first.
async fn wait_ready(
    router: &RouterLink,
    children: &mut [Worker],
    args: &UpArgs,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.ready_timeout_s);
    loop {
        let set = router.workers();
        let want = |n: usize| n + args.aggregated;
        if set.ready_for(Leg::Prefill) >= want(args.prefill)
            && set.ready_for(Leg::Decode) >= want(args.decode)
        {
            return Ok(());
        }
        for w in children.iter_mut() {
            if let Some(child) = &mut w.child
                && let Some(status) = child.try_wait()?
            {
                bail!("a {} worker exited before it was ready ({status})", w.role);
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "workers not ready after {}s ({} prefill, {} decode ready)",
                args.ready_timeout_s,
                set.ready_for(Leg::Prefill),
                set.ready_for(Leg::Decode)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Closes every worker's stdin (their signal to drain and stop), waits for them while the gateway
/// still serves what they finish (they deregister from the router on the way out), kills those
/// still running past their grace, then stops the gateway and the router.
async fn shutdown(front: Front, children: Vec<Worker>, grace: Duration) {
    let mut running: Vec<(&str, Child)> = children
        .into_iter()
        .filter_map(|w| w.child.map(|c| (w.role, c)))
        .collect();
    for (_, child) in &mut running {
        drop(child.stdin.take());
    }
    // They drain at once, together: one deadline for all.
    let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(10);
    for (role, mut child) in running {
        match tokio::time::timeout_at(deadline, child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(role, "worker did not stop in time; killing it");
                let _ = child.kill().await;
            }
        }
    }
    front.stop().await;
}
