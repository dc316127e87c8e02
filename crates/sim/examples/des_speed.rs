//! How fast the discrete-event simulator runs: 100,000 requests of a chat workload on a
//! disaggregated Llama-3-8B cluster (4 prefill + 8 decode H100s) near its capacity, on one core.
//! Prints the wall time and the cost per request against a 10,000-request baseline run in the
//! same process (a ratio near 1 means the cost grows linearly with the number of requests).
//!
//! `cargo run --release -p tandem-sim --example des_speed`

use std::sync::Arc;
use std::time::Instant;

use tandem_sim::catalog::Catalog;
use tandem_sim::des::{Cluster, InstanceSpec, Phase, SimConfig, simulate};
use tandem_sim::perf::{Link, PerfModel};
use tandem_sim::roofline::{Efficiency, Roofline};
use tandem_sim::stats::Slo;
use tandem_sim::workload::{Arrivals, Lengths, Workload};

fn config(requests: usize) -> Result<SimConfig, tandem_sim::SimError> {
    let cat = Catalog::builtin()?;
    let m: Arc<dyn PerfModel> = Arc::new(Roofline::new(
        cat.model("llama-3-8b")?,
        cat.gpu("h100")?,
        1,
        Efficiency::CALIBRATED,
    )?);
    let spec = |running, tokens| InstanceSpec {
        model: m.clone(),
        max_running: running,
        max_batch_tokens: tokens,
    };
    Ok(SimConfig {
        cluster: Cluster::Disaggregated {
            prefill: (0..4).map(|_| spec(1, 8192)).collect(),
            decode: (0..8).map(|_| spec(256, 1)).collect(),
            link: Link::infiniband_ndr(),
        },
        workload: Workload {
            arrivals: Arrivals::Poisson { rate: 95.0 },
            input: Lengths::Normal {
                mean: 1000.0,
                std: 400.0,
                lo: 50,
                hi: 3000,
            },
            output: Lengths::Uniform { lo: 64, hi: 512 },
        },
        requests,
        seed: 7,
        warmup: 0.1,
        phase: Phase::Full,
        slo: Slo {
            ttft_s: 1.0,
            tpot_s: 0.05,
        },
        admission: None,
    })
}

fn main() -> Result<(), tandem_sim::SimError> {
    let run = |n: usize| -> Result<(f64, tandem_sim::stats::SimReport), tandem_sim::SimError> {
        let cfg = config(n)?;
        let t = Instant::now();
        let rep = simulate(&cfg)?;
        Ok((t.elapsed().as_secs_f64(), rep))
    };
    let (base_s, _) = run(10_000)?;
    let (big_s, rep) = run(100_000)?;
    println!(
        "100,000 requests: {big_s:.2} s wall, {} events ({:.1} M events/s), {:.0} simulated s",
        rep.events,
        rep.events as f64 / big_s / 1e6,
        rep.span_s
    );
    println!(
        "TTFT p50 {:.0} ms p99 {:.0} ms, ITL p50 {:.1} ms, throughput {:.1} req/s, attainment {:.1}%",
        rep.ttft.p50 * 1e3,
        rep.ttft.p99 * 1e3,
        rep.itl.p50 * 1e3,
        rep.throughput_rps,
        rep.attainment * 100.0
    );
    let ratio = (big_s / 100_000.0) / (base_s / 10_000.0);
    println!(
        "cost per request vs a 10,000-request baseline: {ratio:.2}x ({base_s:.3} s for the baseline)"
    );
    Ok(())
}
