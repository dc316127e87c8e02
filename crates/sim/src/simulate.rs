//! `tandem plan --simulate prefill=1,decode=1,tp=4`: one fixed cluster run through the
//! discrete-event simulator, configured as `tandem up` configures its workers, so that its
//! predictions can be set beside a measured run (see scripts/validate-sim.sh).
//!
//! What the workers do and how this run models it:
//! * Prefill worker: each step takes prompts oldest first up to `step-tokens` (the workers'
//!   `--step-tokens`, 512 by default), chunking the last one; the DES does the same.
//! * Decode worker: every sequence holding KV runs in every step (no batch limit but KV room); the
//!   DES runs with `max-running` unlimited unless given.
//! * KV transfer: the `sim` engine sends scaled-down bytes over the real transport, which is not
//!   modelled in time; here it overlaps the prefill over an InfiniBand NDR link, so only its fixed
//!   latency shows (microseconds), which is what the real transfer costs on loopback too.
//! * `--time-scale S` multiplies every step time, as the workers' `--sim-time-scale` does, so that
//!   times and rates compare with a run of `tandem up --engine sim` as measured by `tandem bench`.
//! * Not modelled: the gateway, router and gRPC hops (a millisecond or two per request on a small
//!   machine), and the streaming of tokens to the client.
//! * Admission (`--ttft-budget`, `--itl-budget`, `--priority`, or a replayed run's budgets): the
//!   router's latency-budget admission runs in the DES ([`crate::des::AdmissionConfig`]), and the
//!   report gives the share rejected, attainment of the budgets among the admitted and the goodput;
//!   beside a replayed run's measured rejections.

mod output;

use std::sync::Arc;

use crate::des::{AdmissionConfig, Cluster, InstanceSpec, Phase, SimConfig, simulate};
use crate::error::SimError;
use crate::perf::{Link, MemoryFit, PerfModel, StepShape};
use crate::planner::ModelSource;
use crate::replay::Measured;
use crate::stats::Slo;
use crate::workload::Workload;

/// The cluster `--simulate` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterSpec {
    pub prefill: u32,
    pub decode: u32,
    pub tp_prefill: u32,
    pub tp_decode: u32,
    /// Most prompt tokens per prefill step (the workers' `--step-tokens`).
    pub step_tokens: u32,
    /// Most sequences per decode step; `None`: as many as KV holds (the decode worker's rule).
    pub max_running: Option<u32>,
}

impl ClusterSpec {
    /// Parses `prefill=1,decode=1,tp=4[,tp-prefill=N][,tp-decode=N][,step-tokens=N][,max-running=N]`.
    pub fn parse(spec: &str) -> Result<Self, SimError> {
        let mut c = ClusterSpec {
            prefill: 1,
            decode: 1,
            tp_prefill: 1,
            tp_decode: 1,
            step_tokens: 512,
            max_running: None,
        };
        for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| {
                SimError::invalid(format!("--simulate wants key=value pairs, got {part:?}"))
            })?;
            let n = v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| {
                    SimError::invalid(format!("--simulate {k}: {v:?} is not a positive number"))
                })?;
            match k.trim() {
                "prefill" => c.prefill = n,
                "decode" => c.decode = n,
                "tp" => (c.tp_prefill, c.tp_decode) = (n, n),
                "tp-prefill" => c.tp_prefill = n,
                "tp-decode" => c.tp_decode = n,
                "step-tokens" => c.step_tokens = n,
                "max-running" => c.max_running = Some(n),
                other => {
                    return Err(SimError::invalid(format!(
                        "--simulate: unknown key {other:?} (prefill, decode, tp, tp-prefill, \
                         tp-decode, step-tokens, max-running)"
                    )));
                }
            }
        }
        Ok(c)
    }
}

/// A performance model whose times are all `scale` times another's (the `sim` engine's
/// `--sim-time-scale`).
#[derive(Debug)]
pub struct TimeScaled {
    inner: Arc<dyn PerfModel>,
    scale: f64,
}

impl TimeScaled {
    pub fn new(inner: Arc<dyn PerfModel>, scale: f64) -> Result<Self, SimError> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(SimError::invalid(format!(
                "--time-scale must be positive, got {scale}"
            )));
        }
        Ok(TimeScaled { inner, scale })
    }
}

impl PerfModel for TimeScaled {
    fn describe(&self) -> String {
        if self.scale == 1.0 {
            self.inner.describe()
        } else {
            format!("{}; times x {}", self.inner.describe(), self.scale)
        }
    }
    fn tensor_parallel(&self) -> u32 {
        self.inner.tensor_parallel()
    }
    fn step_time(&self, step: &StepShape<'_>) -> f64 {
        self.inner.step_time(step) * self.scale
    }
    fn kv_bytes_per_token(&self) -> u64 {
        self.inner.kv_bytes_per_token()
    }
    fn memory(&self) -> MemoryFit {
        self.inner.memory()
    }
    fn kv_transfer_time(&self, tokens: u64, link: &Link) -> f64 {
        self.inner.kv_transfer_time(tokens, link) * self.scale
    }
    fn decode_spread(&self, batch: u32, u: f64) -> f64 {
        self.inner.decode_spread(batch, u)
    }
    fn served_prefill_factor(&self, beside_decode: bool, after_idle: bool) -> f64 {
        self.inner.served_prefill_factor(beside_decode, after_idle)
    }
}

/// The arrivals and lengths of one simulated run.
#[derive(Debug, Clone)]
pub struct RunLoad {
    pub workload: Workload,
    pub requests: usize,
    pub seed: u64,
    /// Multiplies every step time.
    pub time_scale: f64,
    /// Latency-budget admission, with the budgets that are also the run's objectives.
    pub admission: Option<AdmissionConfig>,
    /// What the replayed run's admission did, to set beside the prediction.
    pub measured: Option<Measured>,
}

/// Simulates `cluster` under `load` and reports as text or JSON.
pub fn run_cluster(
    src: &ModelSource,
    cluster: &ClusterSpec,
    load: &RunLoad,
    json: bool,
) -> Result<String, SimError> {
    let model = |tp: u32| -> Result<Arc<dyn PerfModel>, SimError> {
        let m = src.at(tp).ok_or_else(|| {
            SimError::invalid(format!(
                "no performance model at tp={tp} (a power of two the model fits on, or the \
                 profile's own tp)"
            ))
        })?;
        Ok(Arc::new(TimeScaled::new(m, load.time_scale)?))
    };
    let (pm, dm) = (model(cluster.tp_prefill)?, model(cluster.tp_decode)?);
    let unit = |m: &Arc<dyn PerfModel>, max_running: u32| InstanceSpec {
        model: m.clone(),
        max_running,
        max_batch_tokens: cluster.step_tokens,
    };
    let sim = SimConfig {
        cluster: Cluster::Disaggregated {
            prefill: (0..cluster.prefill).map(|_| unit(&pm, 1)).collect(),
            decode: (0..cluster.decode)
                .map(|_| unit(&dm, cluster.max_running.unwrap_or(u32::MAX)))
                .collect(),
            link: Link::infiniband_ndr(),
        },
        workload: load.workload.clone(),
        requests: load.requests,
        seed: load.seed,
        // A measured run counts every request it sends, so the prediction does too.
        warmup: 0.0,
        phase: Phase::Full,
        slo: objectives(load.admission.as_ref()),
        admission: load.admission.clone(),
    };
    let rep = simulate(&sim)?;
    let desc = (pm.describe(), dm.describe());
    Ok(if json {
        output::as_json(cluster, load, &rep, &desc)
    } else {
        output::as_text(cluster, load, &rep, &desc)
    })
}

/// The run's objectives: admission's budgets where it has them, none otherwise.
fn objectives(admission: Option<&AdmissionConfig>) -> Slo {
    let b = admission.map(|a| a.budget).unwrap_or_default();
    Slo {
        ttft_s: b.ttft.unwrap_or(f64::INFINITY),
        tpot_s: b.itl.unwrap_or(f64::INFINITY),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_worker_defaults() {
        let c = ClusterSpec::parse("prefill=1,decode=2,tp=4").unwrap();
        assert_eq!(
            c,
            ClusterSpec {
                prefill: 1,
                decode: 2,
                tp_prefill: 4,
                tp_decode: 4,
                step_tokens: 512,
                max_running: None,
            }
        );
        let c = ClusterSpec::parse("tp=4,tp-decode=8,step-tokens=256,max-running=64").unwrap();
        assert_eq!(
            (c.tp_prefill, c.tp_decode, c.step_tokens, c.max_running),
            (4, 8, 256, Some(64))
        );
        for bad in ["prefill=0", "tp=x", "gpus=8", "prefill"] {
            assert!(ClusterSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
