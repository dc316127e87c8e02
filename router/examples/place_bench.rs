//! Placement cost per decision at 10, 100 and 1,000 workers per role, against a plain linear scan
//! (argmin) of a `Vec<u64>` of the same size in the same process; and the same decisions with
//! latency-budget admission (requests with TTFT and ITL budgets, step times from Llama-2-70B's
//! roofline on four H100s): the prediction, the verdict and the charge; and placements through
//! the router task, and over its gRPC service on loopback (a gateway with `--router`).
//!
//! Run: `cargo run --release -p tandem-router --example place_bench`

use std::hint::black_box;
use std::time::{Duration, Instant};

use tandem_proto::v1::{WorkerIdentity, WorkerRole};
use tandem_router::{
    LeastLoaded, Load, Registry, RegistryConfig, RequestShape, RouterConfig, RouterError,
    WorkerState,
};
use tandem_sim::catalog::Catalog;
use tandem_sim::perf::PerfModel;
use tandem_sim::roofline::{Efficiency, Roofline};

const DECISIONS: u32 = 100_000;
const VIA_TASK: u32 = 10_000;
/// Placements over gRPC on loopback (a gateway placing through a standalone router).
const VIA_GRPC: u32 = 2_000;

fn identity(i: usize, role: WorkerRole) -> WorkerIdentity {
    WorkerIdentity {
        worker_id: format!("{}-{i:05}", role.as_str_name()),
        role: role.into(),
        grpc_addr: format!("10.0.{}.{}:50051", i / 256, i % 256),
        kv_endpoint: format!("10.0.{}.{}:50052", i / 256, i % 256),
        model: "llama".into(),
        ..WorkerIdentity::default()
    }
}

/// A deterministic spread of loads, so that the best worker is not simply the first.
fn load(i: usize) -> Load {
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    Load {
        state: WorkerState::Ready,
        queued_prefill_tokens: x % 10_000,
        free_kv_blocks: 1_000_000 - x % 1000,
        total_kv_blocks: 1_000_000,
        running_seqs: (x % 64) as u32,
        ..Load::default()
    }
}

fn registry(workers: usize, now: Instant, admission: bool) -> Result<Registry, RouterError> {
    let mut config = RegistryConfig {
        max_workers: 2 * workers,
        max_queued_prefill_tokens: u64::MAX,
        lease: Duration::from_secs(3600),
        ..RegistryConfig::default()
    };
    if admission {
        config.admission.base = Some(roofline()?);
    }
    let mut r = Registry::new(config, Box::new(LeastLoaded));
    for i in 0..workers {
        r.register(identity(i, WorkerRole::Prefill), load(i), now)?;
        r.register(identity(i, WorkerRole::Decode), load(i + workers), now)?;
    }
    Ok(r)
}

fn shape(admission: bool) -> RequestShape {
    RequestShape {
        prompt_tokens: 64,
        max_new_tokens: 128,
        ttft_budget: admission.then_some(Duration::from_secs(2)),
        itl_budget: admission.then_some(Duration::from_millis(100)),
        ..RequestShape::default()
    }
}

fn roofline() -> Result<std::sync::Arc<dyn PerfModel>, RouterError> {
    let bad = |e: tandem_sim::SimError| RouterError::InvalidArgument(e.to_string());
    let cat = Catalog::builtin().map_err(bad)?;
    let r = Roofline::new(
        cat.model("llama-2-70b").map_err(bad)?,
        cat.gpu("h100").map_err(bad)?,
        4,
        Efficiency::CALIBRATED,
    )
    .map_err(bad)?;
    Ok(std::sync::Arc::new(r))
}

/// Nanoseconds per placement on the plain struct. As in service, heartbeats arrive between
/// placements (each worker reports once per round of `workers` decisions, a second of simulated
/// time apart) and clear the optimistic charges; only the placements are timed.
fn place_ns(workers: usize, admission: bool) -> Result<f64, RouterError> {
    let mut now = Instant::now();
    let mut r = registry(workers, now, admission)?;
    let shape = shape(admission);
    let rounds = (DECISIONS as usize / workers).max(1);
    let mut timed = Duration::ZERO;
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..workers {
            // A refusal is a decision too (none is expected at these loads).
            let _ = black_box(r.place(black_box(&shape), now));
        }
        timed += start.elapsed();
        now += Duration::from_secs(1);
        for i in 0..workers {
            r.heartbeat(&identity(i, WorkerRole::Prefill).worker_id, load(i), now)?;
            r.heartbeat(
                &identity(i, WorkerRole::Decode).worker_id,
                load(i + workers),
                now,
            )?;
        }
    }
    Ok(timed.as_nanos() as f64 / (rounds * workers) as f64)
}

/// Nanoseconds per argmin over a `Vec<u64>` of `len` values, one value changed between scans
/// (as placement changes one load per decision) so that no scan can be skipped.
fn scan_ns(len: usize) -> f64 {
    let mut v: Vec<u64> = (0..len).map(|i| load(i).queued_prefill_tokens).collect();
    let start = Instant::now();
    for k in 0..DECISIONS as usize {
        let vs = black_box(&v);
        let mut best = 0;
        for (i, &x) in vs.iter().enumerate() {
            if x < vs[best] {
                best = i;
            }
        }
        v[best] += 64 + (k as u64 & 1);
    }
    start.elapsed().as_nanos() as f64 / f64::from(DECISIONS)
}

/// Nanoseconds per placement through the router task (channel, task switch, reply).
fn via_task_ns(workers: usize) -> Result<f64, RouterError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RouterError::InvalidArgument(e.to_string()))?;
    runtime.block_on(async {
        let router = filled_router(workers).await?;
        let start = Instant::now();
        for _ in 0..VIA_TASK {
            black_box(router.place(shape(false)).await?);
        }
        Ok(start.elapsed().as_nanos() as f64 / f64::from(VIA_TASK))
    })
}

/// A router task holding `workers` prefill and as many decode workers.
async fn filled_router(workers: usize) -> Result<tandem_router::RouterHandle, RouterError> {
    let config = RouterConfig {
        registry: RegistryConfig {
            max_workers: 2 * workers,
            max_queued_prefill_tokens: u64::MAX,
            lease: Duration::from_secs(3600),
            ..RegistryConfig::default()
        },
        ..RouterConfig::default()
    };
    let router = tandem_router::spawn(config, Box::new(LeastLoaded));
    for i in 0..workers {
        router
            .register(identity(i, WorkerRole::Prefill), load(i))
            .await?;
        router
            .register(identity(i, WorkerRole::Decode), load(i + workers))
            .await?;
    }
    Ok(router)
}

/// Nanoseconds per placement by a client of the router's gRPC service on loopback, one call at a
/// time (what `tandem gateway --router` pays per request over an embedded router).
fn via_grpc_ns(workers: usize) -> Result<f64, RouterError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RouterError::InvalidArgument(e.to_string()))?;
    runtime.block_on(async {
        let router = filled_router(workers).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| RouterError::InvalidArgument(e.to_string()))?;
        let addr = listener
            .local_addr()
            .map_err(|e| RouterError::InvalidArgument(e.to_string()))?;
        let server = tokio::spawn(tandem_router::serve(
            listener,
            std::future::pending(),
            router,
        ));
        let mut client =
            tandem_router::RouterClient::connect(&addr.to_string(), Duration::from_secs(5)).await?;
        let start = Instant::now();
        for _ in 0..VIA_GRPC {
            black_box(client.place(&shape(false)).await?);
        }
        let ns = start.elapsed().as_nanos() as f64 / f64::from(VIA_GRPC);
        server.abort();
        Ok(ns)
    })
}

/// Median of five runs, so that one disturbed run on a shared machine does not set the figure.
fn median(mut run: impl FnMut() -> Result<f64, RouterError>) -> Result<f64, RouterError> {
    let mut xs = Vec::with_capacity(5);
    for _ in 0..5 {
        xs.push(run()?);
    }
    xs.sort_by(f64::total_cmp);
    Ok(xs[2])
}

fn main() -> Result<(), RouterError> {
    println!("medians of 5 runs");
    println!(
        "workers/role  place ns/decision  with admission ns  scan ns (Vec<u64>)  place/scan  via task ns  via gRPC ns  gRPC/task"
    );
    for workers in [10, 100, 1000] {
        let place = median(|| place_ns(workers, false))?;
        let admitted = median(|| place_ns(workers, true))?;
        let scan = median(|| Ok(scan_ns(workers)))?;
        let task = median(|| via_task_ns(workers))?;
        let grpc = median(|| via_grpc_ns(workers))?;
        println!(
            "{workers:>12}  {place:>17.1}  {admitted:>17.1}  {scan:>18.1}  {:>10.2}  {task:>11.1}  {grpc:>11.0}  {:>9.1}",
            place / scan,
            grpc / task
        );
    }
    Ok(())
}
