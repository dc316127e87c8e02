//! `tandem bench`: a load generator for OpenAI-compatible HTTP endpoints (ours, vLLM, SGLang), and
//! its report.
//!
//! # Load
//! Open loop with `--rate R` (gaps from `--arrival poisson|gamma|constant`; gamma gaps have shape
//! `--burstiness` k and scale `1/(R k)`, so the mean rate stays R), or closed loop with
//! `--concurrency C` (both together: open loop with at most C in flight). A run sends `--requests N`
//! or sends for `--duration`, then waits for what is in flight. `--warmup N` requests go first and
//! are not measured. `--sweep-rates` or `--sweep-concurrency` repeat the run per value; every run
//! sends the same sequence of prompts. All randomness comes from our own generator seeded by
//! `--seed`.
//!
//! # Prompts
//! Prompt and output lengths come from a named workload (shared/WORKLOADS.md) or `--isl`/`--osl`
//! (`N`, `uniform:A-B`, `normal:MEAN,STD,MIN,MAX`). With a [`PromptTokenizer`] a prompt is a window of
//! the tokenized built-in corpus, decoded and re-encoded, and resized until it is exactly the asked
//! number of tokens; without one, lengths are whitespace words and the report says so. Requests
//! carry `max_tokens` and `ignore_eos: true`, and when streaming `stream_options.include_usage`.
//! With the chat API the server's template adds tokens: the report shows the server's
//! `prompt_tokens` beside the asked length.
//!
//! # Metrics
//! The definitions follow GenAI-Perf and AIPerf; all times are taken on the client.
//! - **TTFT**: from handing the request to the connection to the arrival of the first chunk that
//!   carries content (chunks with only a role or empty text do not count). Not streaming: the whole
//!   answer's arrival, so TTFT equals E2E.
//! - **E2E**: from the send to the end of the answer (`data: [DONE]`, or the end of the body).
//! - **ITL**: the time between consecutive content chunks of one response, made token-level: the
//!   gap before a chunk that carries k tokens counts as k samples of gap/k, so the samples of a
//!   response sum to the time from its first to its last content chunk. Tokens that arrive with the
//!   first chunk give no sample. A chunk's k is first estimated (1, or with a tokenizer, after the
//!   run, the tokens of the whole text whose text ends in that chunk); when the server reports
//!   usage, the estimates are then scaled to add up to its `completion_tokens` (each chunk keeps
//!   at least one token, largest remainder, ties to the later chunk), so tokens that never showed
//!   as text (a special token generated under `ignore_eos`) still count. The ITL distribution
//!   pools every sample of every successful request. (AIPerf calls the chunk-level gap "inter
//!   chunk latency".)
//! - **TPOT**: per request, `(E2E - TTFT) / (output_tokens - 1)`, for two or more output tokens
//!   (what GenAI-Perf and AIPerf report as "inter token latency").
//! - **Output tokens**: the server's `usage.completion_tokens`; else the tokenizer on the whole
//!   text; else one per content chunk (words when not streaming). The source is counted per run.
//! - **Throughput**: successful requests, and their output tokens, divided by the run's duration,
//!   from its first send to its last answer's end.
//! - **Distributions**: mean, min, max and p50/p90/p95/p99, with percentiles by linear
//!   interpolation between closest ranks (numpy's default; see [`stats::percentile`]).
//! - **Errors** by a bounded [`ErrorClass`]: connect, http_4xx, http_5xx, timeout, protocol
//!   (malformed chunk or body, error event), disconnected (closed before `[DONE]`).
//! - **SLO attainment**: the share of all measured requests that succeeded with TTFT within
//!   `--slo-ttft`, with TPOT within `--slo-itl` (a one-token answer has no TPOT and meets it), with
//!   E2E within `--goodput e2el:MS`, and all of them; also that last share among the admitted
//!   requests only. `--goodput ttft:MS tpot:MS e2el:MS` is vLLM's spelling of the same objectives
//!   (`tpot` is `--slo-itl`); an objective given both ways must agree. **Goodput**: requests
//!   meeting every objective, per second of the run; a rejected or failed request never does.
//!
//! # Admission control
//! `--ttft-budget`, `--itl-budget` and `--priority` send `x-tandem-ttft-budget-ms`,
//! `x-tandem-itl-budget-ms` (whole milliseconds, rounded up, at least 1) and `x-tandem-priority`
//! with every request. Every measured request is then exactly one of: **admitted** (answered in
//! full: `succeeded`), **rejected** (HTTP 429, counted by its OpenAI error body's `error.code`,
//! e.g. `ttft_budget_unreachable`, `itl_budget_unreachable`, `queue_full`, `rate_limit_exceeded`,
//! with its `Retry-After`), or **failed** (any other error, including an answer broken off after
//! it was admitted). Rejections are not errors and are not measured as answers (no TTFT, no E2E),
//! but count in the run's duration and in the denominators of the shares over all requests. When
//! answers carry `x-tandem-predicted-ttft-ms`, the report gives the distribution of measured TTFT
//! (the client's, defined above) over predicted TTFT among the admitted requests.
//!
//! # Model
//! Without `--model`, the first entry of the endpoint's `GET /v1/models` is asked for (once,
//! before the run); the benchmark does not start if that fails.
#![forbid(unsafe_code)]

mod admission;
mod args;
mod chunk;
mod client;
mod corpus;
mod dist;
mod error;
mod http_error;
mod models;
mod objectives;
mod plot;
mod prompt;
mod record;
mod report;
mod rng;
mod runner;
mod shedding;
mod sse;
pub mod stats;
mod summary;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use admission::{Admission, Priority};
pub use args::{ApiKind, BenchArgs, Workload};
pub use dist::{Arrival, LengthDist, parse_duration};
pub use error::BenchError;
pub use objectives::{GoodputKey, GoodputObjective};
pub use plot::render as render_svg;
pub use prompt::PromptTokenizer;
pub use record::{ErrorClass, RequestError, RequestRecord, TokenSource, Usage};
pub use report::{BenchConfig, BenchReport, RunReport};
pub use shedding::AdmissionSummary;
pub use sse::SseParser;
pub use summary::{RunSummary, Slo, SloSummary};

use client::{Client, ClientConfig};
use prompt::PromptSource;
use runner::{Planner, RunCtx, Stop};

/// Runs the benchmark the flags describe against `args.url` and returns its report, after writing
/// `--json` and `--plot` if asked. Failed requests are counted in the report, not returned as
/// errors; an error means no benchmark could run (bad flags) or an output could not be written.
pub async fn run_bench(
    args: BenchArgs,
    tokenizer: Option<Arc<dyn PromptTokenizer>>,
) -> Result<BenchReport, BenchError> {
    if args.timeout.is_zero() {
        return Err(BenchError::InvalidArgs("--timeout must be positive".into()));
    }
    let phases = runner::phases(&args)?;
    let stop = runner::stop(&args)?;
    let (w_isl, w_osl) = args.workload.lengths();
    let (isl, osl) = (args.isl.unwrap_or(w_isl), args.osl.unwrap_or(w_osl));
    let slo = objectives::objectives(args.slo_ttft, args.slo_itl, &args.goodput)?;
    let admission = Admission {
        ttft_budget_ms: args.ttft_budget.map(admission::budget_ms),
        itl_budget_ms: args.itl_budget.map(admission::budget_ms),
        priority: args.priority,
    };
    client::base_uri(&args.url)?;
    let (model, model_from_endpoint) = match &args.model {
        Some(m) => (m.clone(), false),
        None => {
            let key = args.api_key.as_deref();
            (
                models::first_model(&args.url, key, args.timeout).await?,
                true,
            )
        }
    };
    let client = Arc::new(Client::new(
        &ClientConfig {
            url: &args.url,
            api: args.api,
            model: &model,
            stream: !args.no_stream,
            api_key: args.api_key.as_deref(),
            timeout: args.timeout,
            admission,
        },
        tokenizer.clone(),
    )?);
    let source = tokio::task::spawn_blocking(move || PromptSource::new(tokenizer))
        .await
        .map_err(|e| BenchError::Internal(e.to_string()))?;
    let planner = Planner {
        source: Arc::new(source),
        isl,
        osl,
        seed: args.seed,
        inexact: Arc::new(AtomicUsize::new(0)),
    };
    let ctx = RunCtx {
        client: &client,
        planner: &planner,
        arrival: args.arrival,
        burstiness: args.burstiness,
        quiet: args.quiet,
    };
    let mut warmup_failed = 0;
    if args.warmup > 0 {
        let warm = runner::Phase {
            label: "warmup".into(),
            rate: None,
            concurrency: Some(phases[0].concurrency.unwrap_or(1)),
        };
        let (records, _) =
            runner::run_phase(&ctx, &warm, Stop::Count(args.warmup), 0, true).await?;
        warmup_failed = records.iter().filter(|r| !r.ok()).count();
    }
    let mut runs = Vec::with_capacity(phases.len());
    for (i, phase) in phases.iter().enumerate() {
        let (records, epoch) = runner::run_phase(&ctx, phase, stop, i + 1, false).await?;
        let summary = summary::summarize(
            phase.label.clone(),
            phase.rate,
            phase.concurrency,
            &records,
            slo,
        );
        runs.push(RunReport {
            summary,
            records,
            epoch,
        });
    }
    let report = BenchReport {
        config: BenchConfig {
            url: client.uri().to_string(),
            model,
            model_from_endpoint,
            api: args.api,
            stream: !args.no_stream,
            workload: args.workload,
            isl,
            osl,
            arrival: args.arrival,
            burstiness: args.burstiness,
            seed: args.seed,
            requests: match stop {
                Stop::Count(n) => Some(n),
                Stop::Until(_) => None,
            },
            duration_s: args.duration.map(|d| d.as_secs_f64()),
            warmup: args.warmup,
            warmup_failed,
            timeout_s: args.timeout.as_secs_f64(),
            prompt_unit: planner.source.unit().to_string(),
            prompts_inexact: planner.inexact.load(Ordering::Relaxed),
            slo,
            admission,
        },
        runs,
    };
    if let Some(path) = &args.json {
        report.write_json(path)?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plot::render(&report)).map_err(|source| BenchError::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(report)
}
