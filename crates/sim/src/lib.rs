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
//! * [`profile::Profiled`] is fitted to measurements of a real engine on relative error, and
//!   reports its fit errors: prefill in DistServe's shape (`a*tokens + b*sum(len^2) + c`, by
//!   non-negative least squares), a decode step as a table over the profiled batch sizes plus a cost
//!   per token of context ([`profile::DecodeTable`]; a CPU engine's step is not a line in the
//!   batch). [`profile::ProfileFile`] is the format `tandem profile` writes.
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
//!
//! # Which sizing `tandem plan` gives by default, and why
//! Two methods ([`Method`]). `static` (the default) sizes as NVIDIA's calculator does
//! ([`evaluate::size_static`]): a batch is prefilled together and decoded in lock step, so TTFT is
//! the whole batch's prefill plus one step and the TTFT objective bounds the batch; the
//! configuration with the most prompts/s per GPU is replicated to the rate. `simulate` runs the
//! planner above on the discrete-event simulator (continuous batching, chunked prefill when
//! aggregated, disaggregated prefill and decode) and is the one that gives a prefill:decode ratio.
//!
//! For the published GPT-43B question (3500/500 tokens, TTFT under 3 s, 31 requests/s at peak,
//! answered with 13 DGX H100) `static` gives 13 (26 x TP4 batch 16: TTFT 2750 ms, ITL 20.7 ms,
//! 2.44 prompts/s per 8 GPUs; published 2606 ms, 21.4 ms, 2.4) and `simulate` 7 (aggregated TP8,
//! ITL 100 ms), or 10 with the published 21.4 ms as ITL objective (TP2 prefill, TP8 decode). We
//! looked for an optimism in the simulated search that would explain the gap and found none that
//! the published data supports:
//! * KV capacity is honoured: at 4,000 tokens per request a TP8 instance holds 77 sequences, and
//!   the search caps batches there; attainment at 99% instead of 90% changes nothing.
//! * The ITL objective is applied (per request's mean time per token); with the published 21.4 ms
//!   the answer rises from 7 to 10, not to 13.
//! * The roofline takes the larger of compute and memory time for a whole step, so in an aggregated
//!   step a prompt chunk's GEMMs hide under the decode batch's KV reads, while on a GPU attention
//!   and GEMMs are separate kernels. Costing them in sequence (linear layers, then attention) fits
//!   the nine published figures worse (11% at best by grid search, against 6%), puts the static
//!   answer at 15 DGX, and still leaves continuous batching near 10.
//! * GPT-43B's shape (multi-head attention, 64 KV heads) is what makes its decode bound by KV
//!   traffic; the published ITL calibrates bandwidth efficiency on exactly that.
//!
//! So the gap is the method, not an error: the published answer is the static-batch answer, and
//! a server that admits prompts into a running batch needs fewer GPUs for the same objectives, which
//! is the gain in-flight batching is known for. A purchase should not rest on a gain that this
//! model predicts but no GPU cluster has confirmed yet, so the default reproduces the method the
//! published answers (and the calibration) come from, and `--method simulate` gives the
//! continuous-batching plan with its prefill:decode split beside it; each method's report names
//! the other.
#![forbid(unsafe_code)]
// Tests may unwrap: a failure there is the test failing.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod admission;
pub mod catalog;
pub mod cli;
pub mod des;
#[cfg(feature = "engine")]
pub mod engine;
pub mod error;
pub mod evaluate;
pub mod linear;
pub mod nnls;
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
