use std::sync::Arc;

use super::*;
use crate::linear::LinearModel;
use crate::perf::{MemoryFit, StepShape};
use crate::workload::{Arrivals, Lengths};

/// Prefill costs 1 ms per prompt token; a step with decoding sequences costs 10 ms more.
fn toy(blocks: u64) -> LinearModel {
    LinearModel {
        per_prompt_token: 1e-3,
        decode_step: 0.01,
        kv_blocks: blocks,
        ..LinearModel::default()
    }
}

fn inst(blocks: u64, max_batch_tokens: u32) -> InstanceSpec {
    InstanceSpec {
        model: Arc::new(toy(blocks)),
        max_running: 64,
        max_batch_tokens,
    }
}

fn fast_link() -> Link {
    Link {
        bytes_per_s: 1e12,
        latency_s: 0.0,
    }
}

fn cfg(
    cluster: Cluster,
    arrivals: Arrivals,
    input: u32,
    output: u32,
    n: usize,
    phase: Phase,
) -> SimConfig {
    SimConfig {
        cluster,
        workload: Workload {
            arrivals,
            input: Lengths::Fixed(input),
            output: Lengths::Fixed(output),
        },
        requests: n,
        seed: 1,
        warmup: 0.0,
        phase,
        slo: Slo {
            ttft_s: 0.15,
            tpot_s: 0.0105,
        },
        admission: None,
    }
}

fn disagg(p_tokens: u32, d_blocks: u64) -> Cluster {
    Cluster::Disaggregated {
        prefill: vec![inst(1000, p_tokens)],
        decode: vec![inst(d_blocks, 1)],
        link: fast_link(),
    }
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-9, "{a} != {b}");
}

#[test]
fn an_idle_cluster_gives_exact_times() {
    let r = simulate(&cfg(
        disagg(100, 1000),
        Arrivals::Constant { rate: 1.0 },
        100,
        11,
        5,
        Phase::Full,
    ))
    .unwrap();
    assert_eq!(r.requests, 5);
    close(r.ttft.max, 0.1);
    close(r.ttft.p50, 0.1);
    close(r.tpot.max, 0.01);
    close(r.e2e.max, 0.2);
    close(r.itl.p99, 0.01);
    assert_eq!(r.attainment, 1.0);
}

#[test]
fn prompts_queue_fcfs_behind_the_token_budget() {
    let r = simulate(&cfg(
        disagg(100, 1000),
        Arrivals::Constant { rate: 1000.0 },
        100,
        11,
        3,
        Phase::Full,
    ))
    .unwrap();
    // Served one at a time: 0.1, 0.2 - 0.001, 0.3 - 0.002.
    close(r.ttft.mean, (0.1 + 0.199 + 0.298) / 3.0);
    close(r.ttft.max, 0.298);
    // Only the first meets the 150 ms objective.
    assert!((r.ttft_attainment - 1.0 / 3.0).abs() < 1e-12);
    // A budget of 300 tokens batches the second and third (queued behind the first) into one
    // 200-token step ending at 0.3.
    let r = simulate(&cfg(
        disagg(300, 1000),
        Arrivals::Constant { rate: 1000.0 },
        100,
        11,
        3,
        Phase::Full,
    ))
    .unwrap();
    close(r.ttft.max, 0.3 - 0.001);
    close(r.ttft.mean, (0.1 + 0.299 + 0.298) / 3.0);
}

#[test]
fn requests_wait_for_kv_room_at_the_router() {
    // 111 tokens need 7 blocks; 10 blocks hold one request at a time.
    let r = simulate(&cfg(
        disagg(100, 10),
        Arrivals::Constant { rate: 1000.0 },
        100,
        11,
        2,
        Phase::Full,
    ))
    .unwrap();
    // The second is placed when the first finishes at 0.2, then prefills for 0.1.
    close(r.ttft.max, 0.3 - 0.001);
}

#[test]
fn aggregated_chunks_prompts_within_the_step_budget() {
    let c = Cluster::Aggregated {
        instances: vec![inst(1000, 64)],
    };
    let r = simulate(&cfg(
        c,
        Arrivals::Constant { rate: 1.0 },
        100,
        3,
        4,
        Phase::Full,
    ))
    .unwrap();
    // Chunks of 64 and 36 tokens, then two 10 ms decode steps.
    close(r.ttft.max, 0.1);
    close(r.e2e.max, 0.12);
    close(r.tpot.p50, 0.01);
}

#[test]
fn poisson_queue_matches_pollaczek_khinchine() {
    // M/D/1 with service 0.1 s at load 0.5: mean wait rho * S / (2 (1 - rho)) = 0.05 s.
    let r = simulate(&cfg(
        disagg(100, 1000),
        Arrivals::Poisson { rate: 5.0 },
        100,
        11,
        100_000,
        Phase::PrefillOnly,
    ))
    .unwrap();
    assert_eq!(r.requests, 100_000);
    assert!((r.ttft.mean / 0.15 - 1.0).abs() < 0.02, "{}", r.ttft.mean);
    assert!(
        (r.throughput_rps / 5.0 - 1.0).abs() < 0.02,
        "{}",
        r.throughput_rps
    );
}

#[test]
fn same_seed_same_report_and_decode_only_skips_prefill() {
    let c = cfg(
        disagg(2048, 1000),
        Arrivals::Poisson { rate: 8.0 },
        100,
        11,
        2000,
        Phase::Full,
    );
    assert_eq!(simulate(&c).unwrap(), simulate(&c).unwrap());
    let d = cfg(
        disagg(2048, 1000),
        Arrivals::Poisson { rate: 8.0 },
        100,
        11,
        2000,
        Phase::DecodeOnly,
    );
    let r = simulate(&d).unwrap();
    close(r.ttft.max, 0.0);
    // Every step takes 10 ms; a sequence waits for the step in flight before it joins.
    close(r.itl.p99, 0.01);
    assert!(
        r.tpot.p50 > 0.01 && r.tpot.max <= 0.011 + 1e-12,
        "{:?}",
        r.tpot
    );
}

#[test]
fn requests_that_fit_nowhere_are_refused() {
    let e = simulate(&cfg(
        disagg(100, 5),
        Arrivals::Poisson { rate: 1.0 },
        100,
        11,
        10,
        Phase::Full,
    ))
    .unwrap_err();
    assert!(matches!(e, SimError::DoesNotFit { .. }), "{e}");
    let e = simulate(&cfg(
        disagg(100, 50),
        Arrivals::Poisson { rate: 0.0 },
        100,
        11,
        10,
        Phase::Full,
    ))
    .unwrap_err();
    assert!(
        e.to_string().contains("arrival rate must be positive"),
        "{e}"
    );
}

/// The toy with a served-prefill factor (1.0 with the decode worker idle, 1.4 beside decoding, 0.1
/// more when the prefill worker starts from idle) and decode steps spread uniformly over 0.5-1.5
/// of the toy's.
#[derive(Debug)]
struct Served(LinearModel);

impl PerfModel for Served {
    fn describe(&self) -> String {
        "served toy".into()
    }
    fn tensor_parallel(&self) -> u32 {
        1
    }
    fn step_time(&self, s: &StepShape<'_>) -> f64 {
        self.0.step_time(s)
    }
    fn kv_bytes_per_token(&self) -> u64 {
        1
    }
    fn memory(&self) -> MemoryFit {
        self.0.memory()
    }
    fn decode_spread(&self, _batch: u32, u: f64) -> f64 {
        0.5 + u
    }
    fn served_prefill_factor(&self, beside_decode: bool, after_idle: bool) -> f64 {
        (if beside_decode { 1.4 } else { 1.0 }) + if after_idle { 0.1 } else { 0.0 }
    }
}

#[test]
fn served_prefill_factor_follows_the_decoder_and_decode_steps_spread() {
    let served = || InstanceSpec {
        model: Arc::new(Served(toy(1000))),
        max_running: 64,
        max_batch_tokens: 100,
    };
    let c = cfg(
        Cluster::Disaggregated {
            prefill: vec![served()],
            decode: vec![served()],
            link: fast_link(),
        },
        // The second prompt arrives while the first answer decodes (0.11 to about 0.21).
        Arrivals::Trace(vec![0.0, 0.15]),
        100,
        11,
        2,
        Phase::Full,
    );
    let r = simulate(&c).unwrap();
    close(r.ttft.p50, (0.11 + 0.15) / 2.0);
    close(r.ttft.max, 0.15);
    // Two prompts at once, the decode worker idle: the first from idle (x1.1), the second queued
    // behind it (x1.0).
    let c2 = cfg(
        Cluster::Disaggregated {
            prefill: vec![served()],
            decode: vec![served()],
            link: fast_link(),
        },
        Arrivals::Trace(vec![0.0, 0.0]),
        100,
        2,
        2,
        Phase::Full,
    );
    let r2 = simulate(&c2).unwrap();
    close(r2.ttft.p50, (0.11 + 0.21) / 2.0);
    // 20 decode steps of 5-15 ms drawn from the spread, the same ones for the same seed.
    assert!(r.itl.max > 0.0105 && r.itl.max < 0.015, "{:?}", r.itl);
    assert!(r.itl.mean > 0.0075 && r.itl.mean < 0.0125, "{:?}", r.itl);
    assert_eq!(simulate(&c).unwrap(), r);
}
