//! Admission's settings for a simulated run (see [`super::admit`] for what it mirrors).

use crate::admission::{Budget, PredictorConfig, Rules};
use crate::error::SimError;

use super::Phase;

/// How admission picks the pair of instances a request is judged on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PairChoice {
    /// The router's: the prefill instance with the fewest queued prompt tokens, the decode
    /// instance with the most free KV blocks (another with room within the ITL limit when that
    /// one has none): the most headroom for this request.
    #[default]
    Headroom,
    /// Among prefill instances predicted within the TTFT budget the one with the most queued
    /// tokens, and among decode instances with room within the ITL limit the one with the longest
    /// predicted step: the idlest instances are left for requests that need them.
    BestFit,
}

impl PairChoice {
    pub fn as_str(self) -> &'static str {
        match self {
            PairChoice::Headroom => "headroom",
            PairChoice::BestFit => "best-fit",
        }
    }
}

/// Admission's settings for a run.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    /// The budget of every request that carries none of its own ([`RequestSpec::budget`]).
    pub budget: Budget,
    pub rules: Rules,
    pub predictor: PredictorConfig,
    /// Requests that may wait (the router's default: 256).
    pub queue: usize,
    pub choice: PairChoice,
}

impl AdmissionConfig {
    /// The router's defaults with this budget.
    pub fn new(budget: Budget) -> Self {
        AdmissionConfig {
            budget,
            rules: Rules::default(),
            predictor: PredictorConfig::default(),
            queue: 256,
            choice: PairChoice::Headroom,
        }
    }
}

pub(super) fn validate(a: &AdmissionConfig, phase: Phase) -> Result<(), SimError> {
    if phase != Phase::Full {
        return Err(SimError::invalid("admission applies to whole-cluster runs"));
    }
    let ok = |s: Option<f64>| s.is_none_or(|s| s.is_finite() && s > 0.0);
    if !(ok(a.budget.ttft) && ok(a.budget.itl)) {
        return Err(SimError::invalid("admission budgets must be positive"));
    }
    if a.queue == 0 {
        return Err(SimError::invalid(
            "admission's queue needs room for one request",
        ));
    }
    Ok(())
}
