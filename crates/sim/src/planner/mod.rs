//! The planner: DistServe's placement search on our simulator. Each role is sized on its own
//! first (the highest rate one prefill instance sustains within the TTFT objective, and one decode
//! instance within the time-per-token objective, for every tensor parallelism and batch limit), the
//! best units per GPU are replicated to the target rate, and the whole cluster is then simulated
//! and adjusted instance by instance until it meets the attainment objective with the fewest GPUs.
//! Aggregated instances (continuous batching with chunked prefill) are sized the same way.

mod search;

use std::sync::Arc;

use serde::Serialize;

use crate::catalog::{GpuSpec, ModelSpec};
use crate::des::{Cluster, InstanceSpec, Phase, SimConfig, simulate};
use crate::error::SimError;
use crate::perf::{Link, PerfModel, PrefillItem, blocks_for};
use crate::roofline::{Efficiency, Roofline};
use crate::stats::{SimReport, Slo};
use crate::workload::Workload;

pub use search::max_rate;

/// Where instance models come from: the roofline at any tensor parallelism, or one profile.
#[derive(Debug, Clone)]
pub enum ModelSource {
    Roofline {
        model: Box<ModelSpec>,
        gpu: Box<GpuSpec>,
        eff: Efficiency,
    },
    Profiled(Arc<dyn PerfModel>),
}

impl ModelSource {
    /// The model at `tp` GPUs, or `None` where it cannot run so (does not fit, heads do not split).
    pub fn at(&self, tp: u32) -> Option<Arc<dyn PerfModel>> {
        match self {
            ModelSource::Roofline { model, gpu, eff } => Roofline::new(model, gpu, tp, *eff)
                .ok()
                .map(|r| Arc::new(r) as Arc<dyn PerfModel>),
            ModelSource::Profiled(m) => (m.tensor_parallel() == tp).then(|| m.clone()),
        }
    }

    pub fn gpus_per_node(&self) -> u32 {
        match self {
            ModelSource::Roofline { gpu, .. } => gpu.gpus_per_node,
            ModelSource::Profiled(_) => 8,
        }
    }
}

/// Aggregated (both phases on each instance) or disaggregated (separate prefill and decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Aggregated,
    Disaggregated,
}

/// What the planner may choose from.
#[derive(Debug, Clone)]
pub struct Grid {
    pub tps: Vec<u32>,
    pub batches: Vec<u32>,
    pub modes: Vec<Mode>,
    pub max_instances: u32,
}

impl Default for Grid {
    fn default() -> Self {
        Grid {
            tps: vec![1, 2, 4, 8],
            batches: vec![8, 16, 32, 64, 128, 256, 512],
            modes: vec![Mode::Aggregated, Mode::Disaggregated],
            max_instances: 256,
        }
    }
}

/// The question: serve `workload` (its arrivals at the target rate) within `slo` for a share
/// `attainment` of requests.
#[derive(Debug, Clone)]
pub struct PlanInput {
    pub source: ModelSource,
    pub workload: Workload,
    pub rate: f64,
    pub slo: Slo,
    pub attainment: f64,
    pub link: Link,
    pub requests: usize,
    pub seed: u64,
    pub grid: Grid,
}

/// One cluster configuration and how it does at the target rate.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub mode: Mode,
    pub tp_prefill: u32,
    pub tp_decode: u32,
    /// Prefill instances (aggregated: the instances).
    pub prefill_instances: u32,
    /// Decode instances (aggregated: 0).
    pub decode_instances: u32,
    /// Most sequences decoding at once per instance.
    pub max_batch: u32,
    /// Prompt tokens per prefill step (aggregated: the step's token budget).
    pub batch_tokens: u32,
    pub gpus: u32,
    /// Simulated at the target rate.
    #[serde(skip)]
    pub at_rate: Option<SimReport>,
    /// Highest rate meeting the objectives (filled for the configurations reported).
    pub goodput_rps: Option<f64>,
}

impl Candidate {
    pub fn cluster(&self, input: &PlanInput) -> Option<Cluster> {
        let mk = |tp: u32, n: u32, running: u32, tokens: u32| -> Option<Vec<InstanceSpec>> {
            let m = input.source.at(tp)?;
            Some(
                (0..n)
                    .map(|_| InstanceSpec {
                        model: m.clone(),
                        max_running: running,
                        max_batch_tokens: tokens,
                    })
                    .collect(),
            )
        };
        Some(match self.mode {
            Mode::Aggregated => Cluster::Aggregated {
                instances: mk(
                    self.tp_prefill,
                    self.prefill_instances,
                    self.max_batch,
                    self.batch_tokens,
                )?,
            },
            Mode::Disaggregated => Cluster::Disaggregated {
                prefill: mk(
                    self.tp_prefill,
                    self.prefill_instances,
                    1,
                    self.batch_tokens,
                )?,
                decode: mk(self.tp_decode, self.decode_instances, self.max_batch, 1)?,
                link: input.link,
            },
        })
    }

    pub fn goodput_per_gpu(&self) -> Option<f64> {
        self.goodput_rps.map(|g| g / f64::from(self.gpus))
    }
}

/// The planner's answer.
#[derive(Debug, Clone)]
pub struct Plan {
    pub recommended: Candidate,
    pub runner_ups: Vec<Candidate>,
    /// Every feasible configuration found, fewest GPUs first.
    pub all: Vec<Candidate>,
}

pub(crate) fn sim_config(
    input: &PlanInput,
    cluster: Cluster,
    phase: Phase,
    rate: f64,
    requests: usize,
) -> SimConfig {
    let workload = Workload {
        arrivals: input.workload.arrivals.at_rate(rate),
        ..input.workload.clone()
    };
    SimConfig {
        cluster,
        workload,
        requests,
        seed: input.seed,
        warmup: 0.2,
        phase,
        slo: input.slo,
        admission: None,
    }
}

/// Checks the objectives against the best an idle instance can do, so that an impossible request
/// says which objective binds before any search.
pub fn check_feasible(input: &PlanInput) -> Result<(), SimError> {
    let isl = input.workload.input.max();
    let osl = input.workload.output.max();
    let need = blocks_for(u64::from(isl) + u64::from(osl));
    let models: Vec<_> = input
        .grid
        .tps
        .iter()
        .filter_map(|&tp| input.source.at(tp))
        .collect();
    let models: Vec<_> = models
        .into_iter()
        .filter(|m| m.memory().kv_blocks >= need)
        .collect();
    if models.is_empty() {
        return Err(SimError::Infeasible {
            binding: "memory".into(),
            detail: format!(
                "no tensor parallelism in {:?} holds the weights plus one request's KV",
                input.grid.tps
            ),
        });
    }
    let best_ttft = models
        .iter()
        .map(|m| m.prefill_time(&[PrefillItem::fresh(isl)]))
        .fold(f64::INFINITY, f64::min);
    if best_ttft > input.slo.ttft_s {
        return Err(SimError::Infeasible {
            binding: "TTFT".into(),
            detail: format!(
                "a lone {isl}-token prompt takes {:.0} ms to prefill at best, over the {:.0} ms objective",
                best_ttft * 1e3,
                input.slo.ttft_s * 1e3
            ),
        });
    }
    let ctx = u64::from(isl) + u64::from(osl);
    let best_itl = models
        .iter()
        .map(|m| m.decode_step_time(1, ctx))
        .fold(f64::INFINITY, f64::min);
    if best_itl > input.slo.tpot_s {
        return Err(SimError::Infeasible {
            binding: "ITL".into(),
            detail: format!(
                "a decode step for one sequence takes {:.1} ms at best, over the {:.1} ms objective",
                best_itl * 1e3,
                input.slo.tpot_s * 1e3
            ),
        });
    }
    Ok(())
}

/// Searches the grid for the configuration that meets the objectives at `input.rate` with the
/// fewest GPUs (ties: the highest goodput per GPU).
pub fn plan(input: &PlanInput) -> Result<Plan, SimError> {
    validate(input)?;
    check_feasible(input)?;
    let mut all = Vec::new();
    let mut binding = Vec::new();
    if input.grid.modes.contains(&Mode::Disaggregated) {
        search::disaggregated(input, &mut all, &mut binding)?;
    }
    if input.grid.modes.contains(&Mode::Aggregated) {
        search::aggregated(input, &mut all, &mut binding)?;
    }
    if all.is_empty() {
        let b = if binding.is_empty() {
            "attainment".to_string()
        } else {
            binding.join(" and ")
        };
        return Err(SimError::Infeasible {
            binding: b,
            detail: format!(
                "no configuration of at most {} instances serves {:.2} requests/s with {:.0}% attainment",
                input.grid.max_instances,
                input.rate,
                input.attainment * 100.0
            ),
        });
    }
    all.sort_by_key(|c| c.gpus);
    // Goodput (a rate search on the whole cluster) only for the configurations reported.
    let top = all.len().min(4);
    for c in all.iter_mut().take(top) {
        c.goodput_rps = search::cluster_goodput(input, c)?;
    }
    all[..top].sort_by(|a, b| {
        a.gpus.cmp(&b.gpus).then(
            b.goodput_per_gpu()
                .unwrap_or(0.0)
                .total_cmp(&a.goodput_per_gpu().unwrap_or(0.0)),
        )
    });
    let recommended = all[0].clone();
    let runner_ups = all[1..top].to_vec();
    Ok(Plan {
        recommended,
        runner_ups,
        all,
    })
}

fn validate(input: &PlanInput) -> Result<(), SimError> {
    input.workload.validate()?;
    if !(input.rate.is_finite() && input.rate > 0.0) {
        return Err(SimError::invalid(format!(
            "request rate must be positive, got {}",
            input.rate
        )));
    }
    if !(input.slo.ttft_s > 0.0 && input.slo.tpot_s > 0.0) {
        return Err(SimError::invalid(
            "TTFT and ITL objectives must be positive",
        ));
    }
    if !(input.attainment > 0.0 && input.attainment <= 1.0) {
        return Err(SimError::invalid(format!(
            "attainment must lie in (0, 1], got {}",
            input.attainment
        )));
    }
    if input.grid.tps.is_empty() || input.grid.batches.is_empty() || input.grid.modes.is_empty() {
        return Err(SimError::invalid("the search grid is empty"));
    }
    Ok(())
}

/// Runs the whole cluster of `c` at `rate`.
pub fn simulate_candidate(
    input: &PlanInput,
    c: &Candidate,
    rate: f64,
) -> Result<Option<SimReport>, SimError> {
    let Some(cluster) = c.cluster(input) else {
        return Ok(None);
    };
    let n = search::cluster_requests(input, rate);
    simulate(&sim_config(input, cluster, Phase::Full, rate, n)).map(Some)
}

#[cfg(test)]
mod tests;
