//! `tandem plan --simulate`'s admission flags: the router's latency-budget admission in the
//! simulated cluster, with budgets given here or carried by a replayed bench run.

use clap::Args;

use crate::admission::{Budget, Priority};
use crate::des::{AdmissionConfig, PairChoice};
use crate::error::SimError;
use crate::replay::BenchRun;

use super::parse_duration;

fn priority(s: &str) -> Result<Priority, String> {
    Priority::parse(s).ok_or_else(|| format!("{s:?}: critical, standard or sheddable"))
}

fn choice(s: &str) -> Result<PairChoice, String> {
    match s {
        "headroom" => Ok(PairChoice::Headroom),
        "best-fit" => Ok(PairChoice::BestFit),
        _ => Err(format!("{s:?}: headroom or best-fit")),
    }
}

/// Latency-budget admission in the simulated cluster. Any of these flags, or a replayed bench run
/// whose requests carried budgets, turns it on; the budgets are then also the run's objectives.
#[derive(Debug, Clone, Default, Args)]
pub struct AdmissionArgs {
    /// With --simulate: admit each request only if its first token is predicted within this
    /// budget (e.g. 450ms), as the router does; default: the replayed run's, or none.
    #[arg(long, env = "TANDEM_PLAN_TTFT_BUDGET", requires = "simulate")]
    pub ttft_budget: Option<String>,
    /// With --simulate: the inter-token latency budget each request asks for (e.g. 40ms).
    #[arg(long, env = "TANDEM_PLAN_ITL_BUDGET", requires = "simulate")]
    pub itl_budget: Option<String>,
    /// With --simulate: the requests' priority (critical, standard or sheddable).
    #[arg(long, env = "TANDEM_PLAN_PRIORITY", requires = "simulate", value_parser = priority)]
    pub priority: Option<Priority>,
    /// With --simulate: requests that may wait in admission's queue (the router's default: 256).
    #[arg(long, env = "TANDEM_PLAN_ADMISSION_QUEUE", requires = "simulate")]
    pub admission_queue: Option<usize>,
    /// With --simulate: how admission picks a request's instances: headroom (the router's: the
    /// least loaded) or best-fit (the busiest that still meet the budgets).
    #[arg(long, env = "TANDEM_PLAN_ADMISSION_CHOICE", requires = "simulate", value_parser = choice)]
    pub admission_choice: Option<PairChoice>,
}

impl AdmissionArgs {
    fn any(&self) -> bool {
        self.ttft_budget.is_some()
            || self.itl_budget.is_some()
            || self.priority.is_some()
            || self.admission_queue.is_some()
            || self.admission_choice.is_some()
    }

    /// The flags' budget over `under` (a replayed run's), field by field.
    fn over(&self, under: Budget) -> Result<Budget, SimError> {
        let secs = |s: &Option<String>| s.as_deref().map(parse_duration).transpose();
        Ok(Budget {
            ttft: secs(&self.ttft_budget)?.or(under.ttft),
            itl: secs(&self.itl_budget)?.or(under.itl),
            priority: self.priority.unwrap_or(under.priority),
        })
    }

    /// Admission's settings for the run, `None` when it is off; the flags' budgets also replace
    /// those of replayed requests that state their own.
    pub fn settings(
        &self,
        replay: Option<&mut BenchRun>,
    ) -> Result<Option<AdmissionConfig>, SimError> {
        let (file, own) = match &replay {
            Some(r) => (r.budget, r.requests.iter().any(|x| x.budget.is_some())),
            None => (None, false),
        };
        if !(self.any() || file.is_some() || own) {
            return Ok(None);
        }
        let mut cfg = AdmissionConfig::new(self.over(file.unwrap_or_default())?);
        if let Some(q) = self.admission_queue {
            if q == 0 {
                return Err(SimError::invalid("--admission-queue must be at least 1"));
            }
            cfg.queue = q;
        }
        if let Some(c) = self.admission_choice {
            cfg.choice = c;
        }
        if let Some(run) = replay {
            for r in &mut run.requests {
                if let Some(b) = r.budget {
                    r.budget = Some(self.over(b)?);
                }
            }
        }
        Ok(Some(cfg))
    }
}
