//! `tandem plan`: its flags and the function the binary calls.

mod admission;

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};

use crate::catalog::Catalog;
use crate::error::SimError;
use crate::evaluate::{size_static, static_batch};
use crate::peak::poisson_peak;
use crate::perf::{Link, PerfModel};
use crate::planner::{Grid, Mode, ModelSource, PlanInput, plan};
use crate::profile::Profiled;
use crate::replay::read_bench_run;
use crate::report;
use crate::roofline::{Efficiency, Roofline};
use crate::simulate::{ClusterSpec, RunLoad, run_cluster};
use crate::stats::Slo;
use crate::workload::{Arrivals, Lengths, Workload};

/// How `tandem plan` sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// The sizing calculator's method (the default): static batches, each prefilled together and
    /// then decoded in lock step; the best configuration per GPU replicated to the rate.
    Static,
    /// Simulate continuous batching, aggregated and disaggregated, with the discrete-event
    /// simulator: a DistServe-style search that also gives the prefill:decode ratio.
    Simulate,
}

pub use admission::AdmissionArgs;

/// Size a cluster for a workload under latency objectives, or cost one configuration.
#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// Model to size, by catalogue name (llama-2-70b, llama-3-8b, gpt-43b, smollm2-135m, ...).
    #[arg(long, env = "TANDEM_PLAN_MODEL")]
    pub model: String,
    /// GPU, by catalogue name (h100, h200, a100-80gb, l40s).
    #[arg(long, env = "TANDEM_PLAN_GPU")]
    pub gpu: String,
    /// Mean prompt length, tokens (not needed with --replay).
    #[arg(long, env = "TANDEM_PLAN_ISL", required_unless_present = "replay")]
    pub isl: Option<u32>,
    /// Mean answer length, tokens (not needed with --replay).
    #[arg(long, env = "TANDEM_PLAN_OSL", required_unless_present = "replay")]
    pub osl: Option<u32>,
    /// Prompt lengths spread uniformly over isl +- this many tokens (0: all equal).
    #[arg(long, env = "TANDEM_PLAN_ISL_SPREAD", default_value_t = 0)]
    pub isl_spread: u32,
    /// Answer lengths spread uniformly over osl +- this many tokens (0: all equal).
    #[arg(long, env = "TANDEM_PLAN_OSL_SPREAD", default_value_t = 0)]
    pub osl_spread: u32,
    /// Peak request rate to serve, per second (or give --avg-rate).
    #[arg(long, env = "TANDEM_PLAN_RATE")]
    pub rate: Option<f64>,
    /// Average request rate; the peak is its Poisson percentile (--peak-percentile).
    #[arg(long, env = "TANDEM_PLAN_AVG_RATE")]
    pub avg_rate: Option<f64>,
    /// Percentile of the one-second Poisson count to size for when --avg-rate is given.
    #[arg(long, env = "TANDEM_PLAN_PEAK_PERCENTILE", default_value_t = 0.95)]
    pub peak_percentile: f64,
    /// Time-to-first-token objective (e.g. 3s, 450ms).
    #[arg(long, env = "TANDEM_PLAN_TTFT", default_value = "3s")]
    pub ttft: String,
    /// Inter-token latency objective, per request's mean gap (e.g. 100ms).
    #[arg(long, env = "TANDEM_PLAN_ITL", default_value = "100ms")]
    pub itl: String,
    /// Share of requests that must meet both objectives.
    #[arg(long, env = "TANDEM_PLAN_ATTAINMENT", default_value_t = 0.9)]
    pub attainment: f64,
    /// Cost one configuration instead of searching: `tp=4,batch=128,mode=aggregated`.
    #[arg(long, env = "TANDEM_PLAN_EVALUATE")]
    pub evaluate: Option<String>,
    /// Simulate one disaggregated cluster instead of searching, configured as `tandem up`
    /// configures its workers: `prefill=1,decode=1,tp=4[,tp-prefill=N][,tp-decode=N]
    /// [,step-tokens=512][,max-running=N]` (no max-running: decode batches are bounded by KV only).
    #[arg(long, env = "TANDEM_PLAN_SIMULATE", conflicts_with = "evaluate")]
    pub simulate: Option<String>,
    /// With --simulate: replay the requests of a `tandem bench --json` report (their send times and
    /// token counts) instead of drawing arrivals and lengths.
    #[arg(long, env = "TANDEM_PLAN_REPLAY", requires = "simulate")]
    pub replay: Option<PathBuf>,
    /// With --simulate: multiply every step time, as `--sim-time-scale` does for the sim engine.
    #[arg(long, env = "TANDEM_PLAN_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,
    #[command(flatten)]
    pub admission: AdmissionArgs,
    /// Sizing method: static (the sizing calculator's, the default) or simulate (continuous
    /// batching, aggregated and disaggregated, with the prefill:decode ratio).
    ///
    /// `static` answers as NVIDIA's sizing calculator does, and as the published answers were
    /// reached: TTFT is the prefill of a whole batch plus one decode step, so the TTFT objective
    /// bounds the batch; the configuration (tensor parallelism, power-of-two batch) with the most
    /// prompts/s per GPU within the objectives is replicated to the rate. It is the method the
    /// roofline's efficiency factors are calibrated against (GPT-43B 3500/500, TTFT under 3 s, 31
    /// requests/s: 13 DGX H100, as published). --attainment, --requests, --seed and --plot apply to
    /// `simulate` only.
    ///
    /// `simulate` searches tensor parallelism per role, batch limits and instance counts on the
    /// discrete-event simulator, as a continuous-batching server (Tandem's own) would run them.
    /// It needs fewer GPUs than the calculator for the same objectives (7 DGX for the GPT-43B
    /// question, 10 with the published 21.4 ms ITL as objective): first tokens no longer wait for
    /// a whole batch's prefill, so batches grow to what KV and ITL allow. That gain is a prediction
    /// of the model, not yet checked against a GPU cluster; size purchases with `static`.
    #[arg(long, env = "TANDEM_PLAN_METHOD", value_enum, default_value_t = Method::Static)]
    pub method: Method,
    /// Print JSON instead of text.
    #[arg(long, env = "TANDEM_PLAN_JSON")]
    pub json: bool,
    /// Write an SVG plot of throughput per GPU against TTFT, the chosen point marked.
    #[arg(long, env = "TANDEM_PLAN_PLOT")]
    pub plot: Option<PathBuf>,
    /// A JSON catalogue that adds to or overrides the built-in models and GPUs.
    #[arg(long, env = "TANDEM_PLAN_CATALOG")]
    pub catalog: Option<PathBuf>,
    /// A profile written by `tandem profile`: use the fitted model instead of the roofline.
    #[arg(long, env = "TANDEM_PLAN_PROFILE")]
    pub profile: Option<PathBuf>,
    /// Requests simulated per run of the search.
    #[arg(long, env = "TANDEM_PLAN_REQUESTS", default_value_t = 3000)]
    pub requests: usize,
    /// Seed of the simulated arrivals and lengths.
    #[arg(long, env = "TANDEM_PLAN_SEED", default_value_t = 1)]
    pub seed: u64,
}

/// Parses `3s`, `450ms` or `800us` into seconds.
pub fn parse_duration(s: &str) -> Result<f64, SimError> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(SimError::invalid(format!(
            "duration {s:?} needs a unit: s, ms or us"
        )));
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| SimError::invalid(format!("bad duration {s:?}")))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(SimError::invalid(format!(
            "duration {s:?} must be positive"
        )));
    }
    Ok(v * scale)
}

fn lengths(mean: u32, spread: u32, what: &str) -> Result<Lengths, SimError> {
    if mean == 0 {
        return Err(SimError::invalid(format!("{what} must be positive")));
    }
    if spread == 0 {
        return Ok(Lengths::Fixed(mean));
    }
    if spread >= mean {
        return Err(SimError::invalid(format!(
            "{what} spread must be below the mean"
        )));
    }
    Ok(Lengths::Uniform {
        lo: mean - spread,
        hi: mean + spread,
    })
}

/// The performance model source the flags name.
fn source(args: &PlanArgs) -> Result<(ModelSource, u32), SimError> {
    let cat = Catalog::with_user_file(args.catalog.as_deref())?;
    let model = cat.model(&args.model)?.clone();
    let gpu = cat.gpu(&args.gpu)?.clone();
    let per_node = gpu.gpus_per_node;
    if let Some(p) = &args.profile {
        let m: Arc<dyn PerfModel> = Arc::new(Profiled::from_file(p)?);
        return Ok((ModelSource::Profiled(m), per_node));
    }
    Ok((
        ModelSource::Roofline {
            model: Box::new(model),
            gpu: Box::new(gpu),
            eff: Efficiency::CALIBRATED,
        },
        per_node,
    ))
}

/// Runs `tandem plan`: the text (or JSON) to print; writes the plot when asked.
pub fn run_plan(args: &PlanArgs) -> Result<String, SimError> {
    let (src, per_node) = source(args)?;
    if let Some(spec) = &args.simulate {
        return simulate_one(args, &src, spec);
    }
    let (isl, osl) = (args.isl_value()?, args.osl_value()?);
    let input_len = lengths(isl, args.isl_spread, "--isl")?;
    let output_len = lengths(osl, args.osl_spread, "--osl")?;
    if let Some(spec) = &args.evaluate {
        return evaluate(args, &src, spec);
    }
    let (rate, peak_note) = match (args.rate, args.avg_rate) {
        (Some(_), Some(_)) => return Err(SimError::invalid("give --rate or --avg-rate, not both")),
        (None, None) => return Err(SimError::invalid("give --rate (peak) or --avg-rate")),
        (Some(r), None) => (r, None),
        (None, Some(avg)) => {
            let peak = poisson_peak(avg, args.peak_percentile)?;
            (peak, Some((avg, args.peak_percentile, peak)))
        }
    };
    if !(rate.is_finite() && rate > 0.0) {
        return Err(SimError::invalid(format!(
            "--rate must be positive, got {rate}"
        )));
    }
    let slo = Slo {
        ttft_s: parse_duration(&args.ttft)?,
        tpot_s: parse_duration(&args.itl)?,
    };
    let models: Vec<Arc<dyn PerfModel>> =
        [1, 2, 4, 8].iter().filter_map(|&tp| src.at(tp)).collect();
    let stat = size_static(&models, isl, osl, rate, slo.ttft_s, slo.tpot_s, per_node);
    if args.method == Method::Static {
        if args.plot.is_some() {
            return Err(SimError::invalid(
                "--plot draws the simulated search: add --method simulate",
            ));
        }
        let Some(st) = stat else {
            let best = models
                .iter()
                .filter_map(|m| static_batch(m.as_ref(), 1, isl, osl).ok());
            let ttft = best.map(|e| e.ttft_ms).fold(f64::INFINITY, f64::min);
            let binding = if ttft > slo.ttft_s * 1e3 {
                "TTFT"
            } else {
                "ITL"
            };
            return Err(SimError::Infeasible {
                binding: binding.into(),
                detail: format!(
                    "no static batch meets the objectives (best TTFT at batch 1: {ttft:.0} ms)"
                ),
            });
        };
        return Ok(report::static_sizing(
            &st,
            rate,
            models
                .iter()
                .find(|m| m.tensor_parallel() == st.estimate.tp)
                .map(|m| m.describe()),
            args.json,
        ));
    }
    let input = PlanInput {
        source: src,
        workload: Workload {
            arrivals: Arrivals::Poisson { rate },
            input: input_len,
            output: output_len,
        },
        rate,
        slo,
        attainment: args.attainment,
        link: Link::infiniband_ndr(),
        requests: args.requests.max(200),
        seed: args.seed,
        grid: Grid::default(),
    };
    let p = plan(&input)?;
    let ctx = report::Context {
        input: &input,
        peak: peak_note,
        gpus_per_node: per_node,
        static_sizing: stat,
    };
    if let Some(path) = &args.plot {
        let svg = crate::svg::plot(&ctx, &p)?;
        std::fs::write(path, svg).map_err(|source| SimError::Io {
            path: path.clone(),
            source,
        })?;
    }
    if args.json {
        Ok(report::json(&ctx, &p))
    } else {
        Ok(report::text(&ctx, &p))
    }
}

impl PlanArgs {
    fn isl_value(&self) -> Result<u32, SimError> {
        self.isl.ok_or_else(|| SimError::invalid("give --isl"))
    }

    fn osl_value(&self) -> Result<u32, SimError> {
        self.osl.ok_or_else(|| SimError::invalid("give --osl"))
    }
}

/// `--simulate`: one cluster under the rate and lengths given, or under a replayed bench run.
fn simulate_one(args: &PlanArgs, src: &ModelSource, spec: &str) -> Result<String, SimError> {
    let cluster = ClusterSpec::parse(spec)?;
    let mut replay = args.replay.as_deref().map(read_bench_run).transpose()?;
    let admission = args.admission.settings(replay.as_mut())?;
    let (workload, requests, measured) = match replay {
        Some(run) => {
            let n = run.requests.len();
            let (input, output) = (Lengths::Fixed(1), Lengths::Fixed(1));
            let arrivals = Arrivals::Replay(run.requests);
            let w = Workload {
                arrivals,
                input,
                output,
            };
            (w, n, Some(run.measured))
        }
        None => {
            let rate = match (args.rate, args.avg_rate) {
                (Some(r), None) => r,
                _ => return Err(SimError::invalid("--simulate needs --rate (or --replay)")),
            };
            let w = Workload {
                arrivals: Arrivals::Poisson { rate },
                input: lengths(args.isl_value()?, args.isl_spread, "--isl")?,
                output: lengths(args.osl_value()?, args.osl_spread, "--osl")?,
            };
            (w, args.requests, None)
        }
    };
    let load = RunLoad {
        workload,
        requests,
        seed: args.seed,
        time_scale: args.time_scale,
        admission,
        measured,
    };
    run_cluster(src, &cluster, &load, args.json)
}

fn evaluate(args: &PlanArgs, src: &ModelSource, spec: &str) -> Result<String, SimError> {
    let (mut tp, mut batch, mut mode) = (None, None, Mode::Aggregated);
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, v) = part.split_once('=').ok_or_else(|| {
            SimError::invalid(format!("--evaluate wants key=value pairs, got {part:?}"))
        })?;
        let num = || {
            v.trim()
                .parse::<u32>()
                .map_err(|_| SimError::invalid(format!("--evaluate {k}: bad number {v:?}")))
        };
        match k.trim() {
            "tp" => tp = Some(num()?),
            "batch" => batch = Some(num()?),
            "mode" if v.trim() == "aggregated" => mode = Mode::Aggregated,
            "mode" => {
                return Err(SimError::invalid(format!(
                    "--evaluate mode={v}: the calculator costs static aggregated batches; search with \
                     the planner for disaggregated configurations"
                )));
            }
            other => {
                return Err(SimError::invalid(format!(
                    "--evaluate: unknown key {other:?} (tp, batch, mode)"
                )));
            }
        }
    }
    let tp = tp.ok_or_else(|| SimError::invalid("--evaluate needs tp=N"))?;
    let batch = batch.ok_or_else(|| SimError::invalid("--evaluate needs batch=N"))?;
    let model: Arc<dyn PerfModel> = match src {
        ModelSource::Roofline { model, gpu, eff } => Arc::new(Roofline::new(model, gpu, tp, *eff)?),
        ModelSource::Profiled(m) if m.tensor_parallel() == tp => m.clone(),
        ModelSource::Profiled(m) => {
            return Err(SimError::invalid(format!(
                "the profile was taken at tp={}, not tp={tp}",
                m.tensor_parallel()
            )));
        }
    };
    let e = static_batch(model.as_ref(), batch, args.isl_value()?, args.osl_value()?)?;
    Ok(report::evaluation(&e, mode, model.as_ref(), args.json))
}

#[cfg(test)]
mod tests;
