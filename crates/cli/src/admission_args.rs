//! Admission's flags, shared by `tandem gateway` and `tandem up`: the served model's default
//! budgets, and how the embedded router predicts and queues.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tandem_router::{AdmissionConfig, Priority, RouterConfig};
use tandem_sim::perf::PerfModel;
use tandem_sim::profile::Profiled;

/// A duration flag: "2s", "150ms", "1m".
pub(crate) fn duration(s: &str) -> Result<Duration, String> {
    let secs = tandem_sim::parse_duration(s).map_err(|e| e.to_string())?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// A drain's grace: a duration, or 0 (stop at once).
pub(crate) fn grace(s: &str) -> Result<Duration, String> {
    match s.trim() {
        "0" | "0s" | "0ms" => Ok(Duration::ZERO),
        _ => duration(s),
    }
}

fn share(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} must be a number from 0 to below 1")),
    }
}

fn quantile(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.5..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} must be a quantile from 0.5 to 1")),
    }
}

/// Latency-budget admission.
#[derive(Args, Debug, Clone)]
pub struct AdmissionArgs {
    /// Time-to-first-token budget of a request that sends no x-tandem-ttft-budget-ms header
    /// (e.g. 2s, 450ms). Without it, such requests have no budget: admitted while the cluster is
    /// within --unbudgeted-horizon, behind budgeted work.
    #[arg(long, env = "TANDEM_TTFT_BUDGET", value_parser = duration)]
    pub ttft_budget: Option<Duration>,
    /// Inter-token latency budget of a request that sends no x-tandem-itl-budget-ms header.
    #[arg(long, env = "TANDEM_ITL_BUDGET", value_parser = duration)]
    pub itl_budget: Option<Duration>,
    /// A profile written by `tandem profile`: the step times admission starts from (scaled to what
    /// the workers measure). Without it (and without --engine sim, whose model is used), admission
    /// fits step times to what the workers report, and admits everything until it can predict.
    #[arg(long, env = "TANDEM_ADMISSION_PROFILE")]
    pub admission_profile: Option<PathBuf>,
    /// Requests that may wait in the router's admission queue; more are refused (queue_full).
    #[arg(long, env = "TANDEM_ADMISSION_QUEUE", default_value_t = 256)]
    pub admission_queue: usize,
    /// The quantile of measured/predicted latency that must fit the budget (0.99: "within budget"
    /// for 99 of 100 admitted requests).
    #[arg(long, env = "TANDEM_ADMISSION_QUANTILE", default_value_t = 0.99, value_parser = quantile)]
    pub admission_quantile: f64,
    /// Share of its TTFT budget a sheddable request must leave unused.
    #[arg(long, env = "TANDEM_SHED_HEADROOM", default_value_t = 0.25, value_parser = share)]
    pub shed_headroom: f64,
    /// Predicted TTFT past which a request without a budget waits (behind budgeted work) instead
    /// of being admitted.
    #[arg(long, env = "TANDEM_UNBUDGETED_HORIZON", default_value = "30s", value_parser = duration)]
    pub unbudgeted_horizon: Duration,
}

impl AdmissionArgs {
    /// The served model's default budget.
    pub fn default_budget(&self) -> tandem_gateway::Budget {
        tandem_gateway::Budget {
            ttft: self.ttft_budget,
            itl: self.itl_budget,
            priority: Priority::Standard,
        }
    }

    /// The embedded router's settings; `sim_base` is the simulated model's step times when the
    /// workers run `--engine sim`.
    pub fn router_config(
        &self,
        sim_base: Option<Arc<dyn PerfModel>>,
    ) -> anyhow::Result<RouterConfig> {
        let base: Option<Arc<dyn PerfModel>> = match &self.admission_profile {
            Some(path) => Some(Arc::new(Profiled::from_file(path).with_context(|| {
                format!("reading the admission profile {}", path.display())
            })?)),
            None => sim_base,
        };
        let mut config = RouterConfig {
            admission_queue: self.admission_queue.max(1),
            ..RouterConfig::default()
        };
        let mut admission = AdmissionConfig {
            base,
            ..AdmissionConfig::default()
        };
        admission.predictor.quantile = self.admission_quantile;
        admission.rules.shed_headroom = self.shed_headroom;
        admission.rules.horizon_s = self.unbudgeted_horizon.as_secs_f64();
        config.registry.admission = admission;
        Ok(config)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        a: AdmissionArgs,
    }

    #[test]
    fn budgets_and_bounds_parse() {
        let cli = Cli::try_parse_from([
            "t",
            "--ttft-budget",
            "2s",
            "--itl-budget",
            "100ms",
            "--shed-headroom",
            "0.5",
        ])
        .unwrap();
        assert_eq!(cli.a.ttft_budget, Some(Duration::from_secs(2)));
        assert_eq!(cli.a.default_budget().itl, Some(Duration::from_millis(100)));
        let c = cli.a.router_config(None).unwrap();
        assert_eq!(c.registry.admission.rules.shed_headroom, 0.5);
        assert_eq!(c.registry.admission.rules.horizon_s, 30.0);
        assert!(c.registry.admission.base.is_none());
        for bad in [
            ["t", "--ttft-budget", "2"],
            ["t", "--ttft-budget", "-1s"],
            ["t", "--shed-headroom", "1"],
            ["t", "--admission-quantile", "0.2"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let missing = Cli::try_parse_from(["t", "--admission-profile", "/nope.json"]).unwrap();
        assert!(missing.a.router_config(None).is_err());
    }
}
