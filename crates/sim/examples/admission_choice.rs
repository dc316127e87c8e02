//! Which pair choice gives latency-budget admission more goodput: the router's "headroom" (the
//! least loaded prefill and decode instances) or "best fit" (the busiest instances that still meet
//! the budgets, leaving idle ones for later requests)?
//!
//! Llama-2-70B on H100, 4 prefill + 4 decode instances at TP4 (as `tandem up` runs them: 512 prompt
//! tokens per prefill step, decode batches bounded by KV only), MLPerf's interactive objectives
//! (TTFT 450 ms, TPOT 40 ms) as the requests' budgets, chat-like requests (prompts normal around
//! 1000 tokens, answers around 200). The cluster's capacity is the highest Poisson rate at which
//! 99% of requests meet both objectives without admission (bisection on the simulator); each load
//! is then run without admission and with each choice, averaged over three seeds.
//!
//! `cargo run --release -p tandem-sim --example admission_choice`

use std::sync::Arc;

use tandem_sim::SimError;
use tandem_sim::admission::{Budget, Priority};
use tandem_sim::catalog::Catalog;
use tandem_sim::des::{
    AdmissionConfig, Cluster, InstanceSpec, PairChoice, Phase, SimConfig, simulate,
};
use tandem_sim::perf::{Link, PerfModel};
use tandem_sim::roofline::{Efficiency, Roofline};
use tandem_sim::stats::{SimReport, Slo};
use tandem_sim::workload::{Arrivals, Lengths, Workload};

const TTFT: f64 = 0.45;
const TPOT: f64 = 0.04;
const REQUESTS: usize = 4000;
const SEEDS: [u64; 3] = [1, 2, 3];

fn cluster() -> Result<Cluster, SimError> {
    let cat = Catalog::builtin()?;
    let m: Arc<dyn PerfModel> = Arc::new(Roofline::new(
        cat.model("llama-2-70b")?,
        cat.gpu("h100")?,
        4,
        Efficiency::CALIBRATED,
    )?);
    let unit = |max_running| InstanceSpec {
        model: m.clone(),
        max_running,
        max_batch_tokens: 512,
    };
    Ok(Cluster::Disaggregated {
        prefill: (0..4).map(|_| unit(1)).collect(),
        decode: (0..4).map(|_| unit(u32::MAX)).collect(),
        link: Link::infiniband_ndr(),
    })
}

fn config(c: &Cluster, rate: f64, seed: u64, choice: Option<PairChoice>) -> SimConfig {
    let admission = choice.map(|choice| AdmissionConfig {
        choice,
        ..AdmissionConfig::new(Budget {
            ttft: Some(TTFT),
            itl: Some(TPOT),
            priority: Priority::Standard,
        })
    });
    SimConfig {
        cluster: c.clone(),
        workload: Workload {
            arrivals: Arrivals::Poisson { rate },
            input: Lengths::Normal {
                mean: 1000.0,
                std: 300.0,
                lo: 100,
                hi: 3000,
            },
            output: Lengths::Normal {
                mean: 200.0,
                std: 50.0,
                lo: 20,
                hi: 400,
            },
        },
        requests: REQUESTS,
        seed,
        warmup: 0.1,
        phase: Phase::Full,
        slo: Slo {
            ttft_s: TTFT,
            tpot_s: TPOT,
        },
        admission,
    }
}

/// Means over the seeds: share rejected, attainment among the admitted, goodput.
fn run(c: &Cluster, rate: f64, choice: Option<PairChoice>) -> Result<(f64, f64, f64), SimError> {
    let mut sum = (0.0, 0.0, 0.0);
    for seed in SEEDS {
        let r: SimReport = simulate(&config(c, rate, seed, choice))?;
        sum.0 += r.rejected_share;
        sum.1 += r.admitted_attainment.unwrap_or(0.0);
        sum.2 += r.goodput_rps;
    }
    let n = SEEDS.len() as f64;
    Ok((sum.0 / n, sum.1 / n, sum.2 / n))
}

/// The highest rate at which 99% of requests meet both objectives without admission (for the
/// first seed), to 0.5%.
fn capacity(c: &Cluster) -> Result<f64, SimError> {
    let ok = |rate: f64| -> Result<bool, SimError> {
        Ok(simulate(&config(c, rate, SEEDS[0], None))?.attainment >= 0.99)
    };
    let (mut lo, mut hi) = (0.0, 4.0);
    while ok(hi)? {
        (lo, hi) = (hi, hi * 2.0);
    }
    while hi - lo > 0.005 * hi {
        let mid = (lo + hi) / 2.0;
        if ok(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(lo)
}

fn main() -> Result<(), SimError> {
    let c = cluster()?;
    let cap = capacity(&c)?;
    // The best goodput without admission at any rate: a sweep from half to three times the
    // capacity, which the loads below lie in.
    let mut best_off = 0.0_f64;
    for i in 0..=50 {
        let rate = cap * (0.5 + 0.05 * f64::from(i));
        best_off = best_off.max(run(&c, rate, None)?.2);
    }
    println!(
        "Llama-2-70B on H100, 4 prefill + 4 decode x TP4; budgets TTFT {} ms, TPOT {} ms",
        TTFT * 1e3,
        TPOT * 1e3
    );
    println!(
        "capacity (99% within both, no admission): {cap:.2} requests/s; best goodput without \
         admission at any rate: {best_off:.2} requests/s"
    );
    println!(
        "{:>6} {:>8}  {:<10} {:>9} {:>17} {:>14} {:>10}",
        "load", "rate/s", "admission", "rejected", "admitted in SLO", "goodput req/s", "vs best"
    );
    for load in [0.5, 1.0, 2.0, 3.0] {
        let rate = cap * load;
        for choice in [None, Some(PairChoice::Headroom), Some(PairChoice::BestFit)] {
            let (rejected, attained, goodput) = run(&c, rate, choice)?;
            println!(
                "{:>5.1}x {:>8.2}  {:<10} {:>8.1}% {:>16.1}% {:>14.2} {:>9.1}%",
                load,
                rate,
                choice.map_or("off", |c| c.as_str()),
                rejected * 100.0,
                attained * 100.0,
                goodput,
                goodput / best_off * 100.0
            );
        }
    }
    Ok(())
}
