//! An operator's commands on a running cluster, through the router its workers registered with:
//! `tandem workers` lists them; `tandem drain WORKER_ID` asks one to drain (it takes no new work,
//! lets what it holds finish within the grace, then stops).
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tandem_proto::v1;

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The worker's id, as the router lists it (`tandem workers`).
    pub worker_id: String,
    /// The router the worker registered with, as host:port (`tandem up` prints it).
    #[arg(long, env = "TANDEM_ROUTER")]
    pub router: String,
    /// How long its work may take to finish (default: the worker's own --drain-grace).
    #[arg(long, value_parser = crate::admission_args::duration)]
    pub grace: Option<Duration>,
}

#[derive(Args, Debug)]
pub struct WorkersArgs {
    /// The router the workers registered with, as host:port (`tandem up` prints it).
    #[arg(long, env = "TANDEM_ROUTER")]
    pub router: String,
    /// One JSON object per worker instead of a table.
    #[arg(long)]
    pub json: bool,
}

const WITHIN: Duration = Duration::from_secs(5);

fn block_on(f: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

pub fn run(args: DrainArgs) -> anyhow::Result<()> {
    block_on(drain(args))
}

pub fn run_workers(args: WorkersArgs) -> anyhow::Result<()> {
    block_on(async move {
        for w in registered(&args.router).await? {
            let Some(i) = w.identity else { continue };
            // The worker's own count, current (the router's set changes with membership only).
            let load = match current_load(&i.grpc_addr).await {
                Some(l) => Some(l),
                None => w.load,
            };
            let state = load
                .as_ref()
                .map_or(v1::WorkerState::Unspecified, |l| l.state())
                .as_str_name()
                .trim_start_matches("WORKER_STATE_")
                .to_lowercase();
            let role = i
                .role()
                .as_str_name()
                .trim_start_matches("WORKER_ROLE_")
                .to_lowercase();
            let running = load.as_ref().map_or(0, |l| l.running_seqs);
            if args.json {
                let o = serde_json::json!({"id": i.worker_id, "role": role, "state": state,
                    "address": i.grpc_addr, "model": i.model, "pid": i.pid,
                    "running": running});
                println!("{o}");
            } else {
                println!(
                    "{:<14} {:<10} {:<9} {:>7} {:<22} {}",
                    i.worker_id, role, state, running, i.grpc_addr, i.model
                );
            }
        }
        Ok(())
    })
}

/// A worker's load as it answers Info now; `None` when it does not answer within a second.
async fn current_load(addr: &str) -> Option<v1::LoadReport> {
    let ask = async {
        let mut c =
            v1::worker_control_client::WorkerControlClient::connect(format!("http://{addr}"))
                .await
                .ok()?;
        c.info(v1::InfoRequest::default())
            .await
            .ok()?
            .into_inner()
            .load
    };
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()
        .flatten()
}

/// The workers registered with the router at `router`.
async fn registered(router: &str) -> anyhow::Result<Vec<v1::WorkerEntry>> {
    let mut client = tokio::time::timeout(
        WITHIN,
        v1::router_service_client::RouterServiceClient::connect(format!("http://{router}")),
    )
    .await
    .with_context(|| format!("router {router} did not answer"))?
    .with_context(|| format!("connecting to the router {router}"))?;
    let mut set = client
        .watch_workers(v1::WatchWorkersRequest::default())
        .await
        .context("listing the router's workers")?
        .into_inner();
    Ok(tokio::time::timeout(WITHIN, set.message())
        .await
        .context("the router sent no worker set")?
        .context("listing the router's workers")?
        .map(|s| s.workers)
        .unwrap_or_default())
}

async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let workers = registered(&args.router).await?;
    let ids: Vec<_> = workers.iter().filter_map(|w| w.identity.as_ref()).collect();
    let Some(worker) = ids.iter().find(|i| i.worker_id == args.worker_id) else {
        let known: Vec<&str> = ids.iter().map(|i| i.worker_id.as_str()).collect();
        bail!(
            "no worker {:?} registered with {} (registered: {})",
            args.worker_id,
            args.router,
            known.join(", ")
        );
    };
    let grace_ms = args.grace.map_or(0, |g| {
        u32::try_from(g.as_millis()).unwrap_or(u32::MAX).max(1)
    });
    let mut control = tokio::time::timeout(
        WITHIN,
        v1::worker_control_client::WorkerControlClient::connect(format!(
            "http://{}",
            worker.grpc_addr
        )),
    )
    .await
    .with_context(|| format!("worker at {} did not answer", worker.grpc_addr))?
    .with_context(|| format!("connecting to the worker at {}", worker.grpc_addr))?;
    let answer = control
        .drain(v1::DrainRequest { grace_ms })
        .await
        .context("asking the worker to drain")?
        .into_inner();
    println!(
        "{} draining with {} in flight; it stops once idle or at its grace",
        args.worker_id, answer.in_flight
    );
    Ok(())
}
