//! Tandem's performance model, discrete-event cluster simulator and planner.
//!
//! # The performance model
//! [`perf::PerfModel`] answers, for one engine instance (a model on `tp` GPUs): the time of a
//! forward step over a mix of prompt chunks (with cached prefixes) and decoding sequences, KV bytes
//! per token, KV transfer time over a link, and what fits in memory (weights, KV capacity in
//! 16-token blocks). It is object-safe and synchronous: the router can call it to predict time to
//! first token, the `sim` engine to replace compute, and the simulator to drive time.
//!
//! * [`roofline::Roofline`] costs a step from the model's shape and the GPU's peaks: the larger of
//!   FLOPs at `compute_eff * M / (M + gemm_ramp_tokens)` of peak (M: tokens in the step) and bytes
//!   (weights once, KV read and written) at `bandwidth_eff` of peak, plus two all-reduces per layer
//!   over NVLink at `link_eff`, each with a fixed latency. KV heads are split across GPUs.
//! * [`profile::Profiled`] is fitted to measurements of a real engine, in DistServe's shape
//!   (prefill `a*tokens + b*sum(len^2) + c`, decode `d*batch + e*context + f`), by non-negative least
//!   squares on relative error, and reports its fit error. [`profile::ProfileFile`] is the format
//!   `tandem profile` writes.
//!
//! # Calibration and accuracy
//! One set of factors ([`roofline::Efficiency::CALIBRATED`]: compute 47.5%, GEMM ramp 384 tokens,
//! bandwidth 70%, link 90%, all-reduce latency 15 us, memory use 90%) was fitted by grid search to
//! NVIDIA's published TRT-LLM sizing rows (shared/WORKLOADS.md) and is shown in every output. With
//! it, the calculator view ([`evaluate::static_batch`]) reproduces all nine published figures within
//! 6%: Llama-2-70B 128/512 at TP4 batch 128 (TTFT 1516.7 ms, ITL 41.6 ms, 11.2 prompts/s per 8 GPUs)
//! and at TP8 batch 1 (37.3 ms, 17.2 ms, 0.1), and GPT-43B 3500/500 (2606 ms, 21.4 ms, 2.4) read as
//! TP4 batch 16, the one configuration consistent with its throughput. The 70B rows do not
//! constrain bandwidth efficiency (both are bound by compute at small GEMMs or by fixed costs in
//! this model); the 43B row's ITL, bound by KV traffic, sets it.
//!
//! How the published TTFT arises: it is a static batch, not a queue. The batch-128 figure
//! (1516.7 ms) is the context phase of all 128 prompts (16,384 tokens) together plus the first
//! generation step, after which the caller sees the first token; a steady-state queue at the
//! published throughput (5.6 prompts/s per TP4 instance) would wait far less than a second. Read as
//! prefill alone, no single set of factors fits both 70B rows within 20% (22.6% at best by grid
//! search), because a 128-token prefill at TP8 would have to cost 2.2 decode steps.
//!
//! # The `sim` engine
//! With the `engine` feature, [`engine::build`] makes a `tandem_engine::Model` whose steps take the
//! time this model gives and whose pool holds the simulated KV capacity: workers run
//! `--engine sim` on it.
//!
//! # The simulator and the planner
//! [`des::simulate`] runs a cluster (disaggregated prefill and decode instances, or aggregated ones
//! with continuous batching and chunked prefill) in simulated time: 100,000 requests take well
//! under a second on one core (`cargo run --release -p tandem-sim --example des_speed`).
//! [`planner::plan`] searches tensor parallelism, batch limits and instance counts, DistServe-style;
//! [`run_plan`] is `tandem plan`; its `--simulate prefill=1,decode=1,tp=4` runs one cluster as the
//! workers run it ([`simulate`]), optionally replaying the requests of a `tandem bench --json` run
//! ([`replay`]), which is how scripts/validate-sim.sh sets the simulator beside a measured run.
//! Its default method simulates continuous batching; `--method static` sizes as the calculator
//! does (for the GPT-43B question: 13 DGX H100, as published).
//! Continuous batching with chunked prefill needs markedly fewer GPUs for the same objectives (7 DGX
//! for that question in this model), which is the gap in-flight batching is known to close.
#![forbid(unsafe_code)]
// Tests may unwrap: a failure there is the test failing.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod catalog;
pub mod cli;
pub mod des;
#[cfg(feature = "engine")]
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod peak;
pub mod perf;
pub mod planner;
pub mod profile;
pub mod replay;
pub mod report;
pub mod rng;
pub mod roofline;
pub mod simulate;
pub mod stats;
pub mod svg;
pub mod workload;

pub use cli::{Method, PlanArgs, parse_duration, run_plan};
pub use error::SimError;
