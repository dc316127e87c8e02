//! Admission's counters and gauges, written by the router's task and rendered (Prometheus text) by
//! whoever serves `/metrics`: lock-free, so that a scrape never waits for the task.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use tandem_sim::admission::{Coefficients, Priority, RejectReason};

use crate::breaker::BreakerState;
use crate::registry::{Calibration, ModelAdmission};

/// Decisions by outcome, reason and priority, and the queue's depth; and what kept workers out
/// of placement: their breakers' changes of state, and ejections for slowness.
#[derive(Debug, Default)]
pub struct AdmissionMetrics {
    admitted: [AtomicU64; 3],
    queued: [AtomicU64; 3],
    rejected: [[AtomicU64; 3]; 3],
    queue_depth: AtomicU64,
    /// Breakers that went open, half-open, closed.
    breaker: [AtomicU64; 3],
    ejected: AtomicU64,
}

fn p(priority: Priority) -> usize {
    priority as usize
}

fn r(reason: RejectReason) -> usize {
    reason as usize
}

impl AdmissionMetrics {
    pub(crate) fn admit(&self, priority: Priority) {
        self.admitted[p(priority)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn queue(&self, priority: Priority) {
        self.queued[p(priority)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn reject(&self, reason: RejectReason, priority: Priority) {
        self.rejected[r(reason)][p(priority)].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn breaker_went(&self, state: BreakerState) {
        self.breaker[state as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn ejected(&self) {
        self.ejected.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn set_queue_depth(&self, n: usize) {
        self.queue_depth.store(n as u64, Ordering::Relaxed);
    }

    /// Requests admitted so far with this priority.
    pub fn admitted(&self, priority: Priority) -> u64 {
        self.admitted[p(priority)].load(Ordering::Relaxed)
    }

    /// Requests refused so far for this reason with this priority.
    pub fn rejected(&self, reason: RejectReason, priority: Priority) -> u64 {
        self.rejected[r(reason)][p(priority)].load(Ordering::Relaxed)
    }

    /// Requests waiting in the queue now.
    pub fn queue_depth(&self) -> u64 {
        self.queue_depth.load(Ordering::Relaxed)
    }

    /// Appends the metrics as Prometheus text.
    pub fn render(&self, out: &mut String, models: &[ModelAdmission]) {
        let name = "tandem_router_admission_total";
        let _ = writeln!(
            out,
            "# HELP {name} Admission decisions: admitted, queued (then admitted or rejected), rejected.\n# TYPE {name} counter"
        );
        for pr in Priority::ALL {
            let pl = pr.as_str();
            let admitted = self.admitted(pr);
            let queued = self.queued[p(pr)].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "{name}{{decision=\"admitted\",reason=\"\",priority=\"{pl}\"}} {admitted}\n{name}{{decision=\"queued\",reason=\"\",priority=\"{pl}\"}} {queued}"
            );
            for reason in RejectReason::ALL {
                let n = self.rejected(reason, pr);
                let code = reason.code();
                let _ = writeln!(
                    out,
                    "{name}{{decision=\"rejected\",reason=\"{code}\",priority=\"{pl}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP tandem_router_queue_depth Requests waiting in the admission queue.\n# TYPE tandem_router_queue_depth gauge\ntandem_router_queue_depth {}",
            self.queue_depth()
        );
        let name = "tandem_router_breaker_transitions_total";
        let _ = writeln!(
            out,
            "# HELP {name} Workers' circuit breakers that went to each state.\n# TYPE {name} counter"
        );
        for state in [
            BreakerState::Open,
            BreakerState::HalfOpen,
            BreakerState::Closed,
        ] {
            let n = self.breaker[state as usize].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{state=\"{}\"}} {n}", state.as_str());
        }
        let _ = writeln!(
            out,
            "# HELP tandem_router_ejections_total Workers taken out of placement for 30 s for steps twice as slow as their peers'.\n# TYPE tandem_router_ejections_total counter\ntandem_router_ejections_total {}",
            self.ejected.load(Ordering::Relaxed)
        );
        render_models(out, models);
    }
}

/// The predictor's coefficients and errors, per served model and role.
fn render_models(out: &mut String, models: &[ModelAdmission]) {
    let _ = writeln!(
        out,
        "# HELP tandem_router_in_flight Admitted requests whose end the gateway has not reported yet.\n# TYPE tandem_router_in_flight gauge"
    );
    for m in models {
        let _ = writeln!(
            out,
            "tandem_router_in_flight{{model=\"{}\"}} {}",
            m.model, m.in_flight
        );
    }
    let _ = writeln!(
        out,
        "# HELP tandem_router_awaiting_first_token Admitted requests whose first token the gateway has not reported yet (what the load regime counts).\n# TYPE tandem_router_awaiting_first_token gauge"
    );
    for m in models {
        let _ = writeln!(
            out,
            "tandem_router_awaiting_first_token{{model=\"{}\"}} {}",
            m.model, m.awaiting_first_token
        );
    }
    let _ = writeln!(
        out,
        "# HELP tandem_router_step_model_coefficient The step-time model admission predicts with: a scale on the base model, or a linear form's seconds per unit of each term.\n# TYPE tandem_router_step_model_coefficient gauge"
    );
    for m in models {
        for r in &m.roles {
            let labels = format!("model=\"{}\",role=\"{}\"", m.model, r.role.as_str());
            match r.coefficients {
                Coefficients::Unfitted => {}
                Coefficients::Scaled { scale } => {
                    let _ = writeln!(
                        out,
                        "tandem_router_step_model_coefficient{{{labels},term=\"base_scale\"}} {scale}"
                    );
                }
                Coefficients::Linear { coef, level } => {
                    let terms = [
                        "prompt_token",
                        "attention",
                        "decode_seq",
                        "context_token",
                        "step",
                    ];
                    for (t, c) in terms.iter().zip(coef) {
                        let _ = writeln!(
                            out,
                            "tandem_router_step_model_coefficient{{{labels},term=\"{t}\"}} {c:e}"
                        );
                    }
                    let _ = writeln!(
                        out,
                        "tandem_router_step_model_coefficient{{{labels},term=\"level\"}} {level}"
                    );
                }
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP tandem_router_step_model_error Relative error of the step model on recent measured steps.\n# TYPE tandem_router_step_model_error gauge"
    );
    for m in models {
        for r in &m.roles {
            if let Some((p50, p90)) = r.error {
                let labels = format!("model=\"{}\",role=\"{}\"", m.model, r.role.as_str());
                let _ = writeln!(
                    out,
                    "tandem_router_step_model_error{{{labels},quantile=\"0.5\"}} {p50}\ntandem_router_step_model_error{{{labels},quantile=\"0.9\"}} {p90}"
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP tandem_router_prediction_factor The median line through recent admitted requests' measured against predicted latency (median = offset + slope x prediction), applied to what clients are told, per load regime (admitted requests waiting for their first token per worker that computes prompts: 0 idle, then doubling from a quarter).\n# TYPE tandem_router_prediction_factor gauge"
    );
    each_regime(out, models, |out, labels, c| {
        let _ = writeln!(
            out,
            "tandem_router_prediction_factor{{{labels},term=\"slope\"}} {}\ntandem_router_prediction_factor{{{labels},term=\"offset_seconds\"}} {}",
            c.slope, c.offset_s
        );
    });
    let _ = writeln!(
        out,
        "# HELP tandem_router_prediction_tail_seconds What admission adds to the median prediction to bound it: the high quantile of what recent admitted requests measured beyond it, per load regime.\n# TYPE tandem_router_prediction_tail_seconds gauge"
    );
    each_regime(out, models, |out, labels, c| {
        let _ = writeln!(
            out,
            "tandem_router_prediction_tail_seconds{{{labels}}} {}",
            c.tail_s
        );
    });
    let _ = writeln!(
        out,
        "# HELP tandem_router_prediction_samples Admitted requests measured in each load regime (a regime with fewer than 16 borrows a quieter one's line, or takes its prediction with the default margin).\n# TYPE tandem_router_prediction_samples gauge"
    );
    each_regime(out, models, |out, labels, c| {
        let _ = writeln!(
            out,
            "tandem_router_prediction_samples{{{labels}}} {}",
            c.samples
        );
    });
}

/// Calls `line` with each served model's, latency's and load regime's labels and calibration.
fn each_regime(
    out: &mut String,
    models: &[ModelAdmission],
    mut line: impl FnMut(&mut String, &str, &Calibration),
) {
    for m in models {
        for (what, regimes) in [("ttft", &m.ttft), ("itl", &m.itl)] {
            for (g, c) in regimes.iter().enumerate() {
                let labels = format!("model=\"{}\",latency=\"{what}\",regime=\"{g}\"", m.model);
                line(out, &labels, c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decision_is_rendered_with_bounded_labels() {
        let m = AdmissionMetrics::default();
        m.admit(Priority::Critical);
        m.reject(RejectReason::QueueFull, Priority::Sheddable);
        m.reject(RejectReason::QueueFull, Priority::Sheddable);
        m.set_queue_depth(3);
        let mut out = String::new();
        m.render(&mut out, &[]);
        assert!(out.contains(
            "tandem_router_admission_total{decision=\"admitted\",reason=\"\",priority=\"critical\"} 1"
        ));
        assert!(out.contains(
            "tandem_router_admission_total{decision=\"rejected\",reason=\"queue_full\",priority=\"sheddable\"} 2"
        ));
        assert!(out.contains("tandem_router_queue_depth 3"));
        m.breaker_went(BreakerState::Open);
        m.ejected();
        let mut out = String::new();
        m.render(&mut out, &[]);
        assert!(out.contains("tandem_router_breaker_transitions_total{state=\"open\"} 1\n"));
        assert!(out.contains("tandem_router_breaker_transitions_total{state=\"closed\"} 0\n"));
        assert!(out.contains("tandem_router_ejections_total 1\n"));
        // 3 priorities x (admitted, queued, 3 reasons).
        let lines = out
            .lines()
            .filter(|l| l.starts_with("tandem_router_admission_total{"))
            .count();
        assert_eq!(lines, 15);
    }
}
