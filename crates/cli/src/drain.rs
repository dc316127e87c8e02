//! `tandem drain WORKER_ID`: asks one worker, found through the router it registered with, to
//! drain: it takes no new work, lets what it holds finish within the grace, then stops.
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use tandem_proto::v1;

#[derive(Args, Debug)]
pub struct DrainArgs {
    /// The worker's id, as the router lists it (e.g. decode-2; `tandem up` logs each one's).
    pub worker_id: String,
    /// The router the worker registered with, as host:port (`tandem up` prints it).
    #[arg(long, env = "TANDEM_ROUTER")]
    pub router: String,
    /// How long its work may take to finish (default: the worker's own --drain-grace).
    #[arg(long, value_parser = crate::admission_args::duration)]
    pub grace: Option<Duration>,
}

pub fn run(args: DrainArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(drain(args))
}

async fn drain(args: DrainArgs) -> anyhow::Result<()> {
    let within = Duration::from_secs(5);
    let router = format!("http://{}", args.router);
    let mut client = tokio::time::timeout(
        within,
        v1::router_service_client::RouterServiceClient::connect(router.clone()),
    )
    .await
    .with_context(|| format!("router {} did not answer", args.router))?
    .with_context(|| format!("connecting to the router {}", args.router))?;
    let mut set = client
        .watch_workers(v1::WatchWorkersRequest::default())
        .await
        .context("listing the router's workers")?
        .into_inner();
    let workers = tokio::time::timeout(within, set.message())
        .await
        .context("the router sent no worker set")?
        .context("listing the router's workers")?
        .map(|s| s.workers)
        .unwrap_or_default();
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
        within,
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
