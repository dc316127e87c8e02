//! The admission rule: admit what is predicted to meet its budgets, make wait what can still meet
//! them after a wait the decode side needs, reject at once the rest.

use super::budget::{Ask, Priority, RejectReason, Verdict};
use super::predict::{DecodeLoad, Prediction};

/// Settings of the rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    /// Share of its TTFT budget a sheddable request must leave unused, so that under pressure it
    /// is refused before standard and critical work is.
    pub shed_headroom: f64,
    /// The TTFT a request without a budget may be predicted to wait for: past it, the cluster is
    /// out of capacity for unbudgeted work and such requests queue behind budgeted ones.
    pub horizon_s: f64,
}

impl Default for Rules {
    fn default() -> Self {
        Rules {
            shed_headroom: 0.25,
            horizon_s: 30.0,
        }
    }
}

/// The TTFT the prediction's bound must stay under, seconds.
pub fn usable_ttft(ask: &Ask, rules: &Rules) -> f64 {
    let b = ask.budget.ttft.unwrap_or(rules.horizon_s);
    match ask.budget.priority {
        Priority::Sheddable => b * (1.0 - rules.shed_headroom.clamp(0.0, 0.95)),
        Priority::Critical | Priority::Standard => b,
    }
}

/// The tightest ITL the sequence may push its decode worker's step to, seconds.
pub fn itl_limit(ask: &Ask, d: &DecodeLoad) -> Option<f64> {
    match (ask.budget.itl, d.tightest_itl) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Judges a request against its best candidate's prediction. `kv_fits`: the decode worker has the
/// free KV blocks the request needs. `decode_drain_s`: the predicted time for that worker to finish
/// a sequence, the Retry-After of a decode-side refusal.
pub fn judge(
    ask: &Ask,
    pred: &Prediction,
    d: &DecodeLoad,
    kv_fits: bool,
    decode_drain_s: f64,
    rules: &Rules,
) -> Verdict {
    let usable = usable_ttft(ask, rules);
    let reject = |reason, retry_after_s| Verdict::Reject {
        reason,
        retry_after_s,
    };
    if pred.ttft_idle_bound > usable {
        return reject(RejectReason::TtftBudgetUnreachable, None);
    }
    if ask.budget.itl.is_some_and(|b| pred.itl_idle_bound > b) {
        return reject(RejectReason::ItlBudgetUnreachable, None);
    }
    if pred.ttft_bound > usable {
        // The prompt's wait is the prefill queue ahead of it, which only drains at its worker's
        // speed: waiting here instead would not start it sooner.
        return reject(
            RejectReason::TtftBudgetUnreachable,
            Some(pred.ttft_bound - usable),
        );
    }
    let itl_ok = itl_limit(ask, d).is_none_or(|l| pred.itl_bound <= l);
    if itl_ok && kv_fits {
        return Verdict::Admit;
    }
    let slack = usable - pred.ttft_bound;
    if slack > 0.0 {
        return Verdict::Wait { for_s: slack };
    }
    let reason = if itl_ok {
        RejectReason::TtftBudgetUnreachable
    } else {
        RejectReason::ItlBudgetUnreachable
    };
    reject(reason, Some(decode_drain_s.max(0.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::budget::Budget;

    fn ask(ttft: Option<f64>, itl: Option<f64>, priority: Priority) -> Ask {
        Ask {
            prompt_tokens: 100,
            max_new_tokens: 10,
            budget: Budget {
                ttft,
                itl,
                priority,
            },
        }
    }

    fn pred(ttft_bound: f64, idle: f64, itl_bound: f64, itl_idle: f64) -> Prediction {
        Prediction {
            ttft: ttft_bound / 1.25,
            ttft_bound,
            ttft_idle_bound: idle,
            itl: itl_bound / 1.25,
            itl_bound,
            itl_idle_bound: itl_idle,
            ttft_raw: ttft_bound / 1.25,
            itl_raw: itl_bound / 1.25,
            regime: 0,
        }
    }

    const R: Rules = Rules {
        shed_headroom: 0.25,
        horizon_s: 30.0,
    };

    fn judged(a: &Ask, p: &Prediction, d: &DecodeLoad, kv: bool) -> Verdict {
        judge(a, p, d, kv, 0.7, &R)
    }

    #[test]
    fn within_every_budget_is_admitted() {
        let a = ask(Some(2.0), Some(0.1), Priority::Standard);
        let d = DecodeLoad::default();
        assert_eq!(
            judged(&a, &pred(1.9, 0.2, 0.05, 0.01), &d, true),
            Verdict::Admit
        );
    }

    #[test]
    fn a_budget_below_the_idle_prediction_is_refused_with_no_retry() {
        let d = DecodeLoad::default();
        let a = ask(Some(0.1), None, Priority::Critical);
        assert_eq!(
            judged(&a, &pred(0.5, 0.2, 0.05, 0.01), &d, true),
            Verdict::Reject {
                reason: RejectReason::TtftBudgetUnreachable,
                retry_after_s: None
            }
        );
        let a = ask(Some(2.0), Some(0.005), Priority::Standard);
        assert_eq!(
            judged(&a, &pred(0.5, 0.2, 0.05, 0.01), &d, true),
            Verdict::Reject {
                reason: RejectReason::ItlBudgetUnreachable,
                retry_after_s: None
            }
        );
    }

    #[test]
    fn a_long_prefill_queue_is_refused_at_once_with_the_excess_as_retry_after() {
        let a = ask(Some(2.0), None, Priority::Critical);
        let d = DecodeLoad::default();
        let v = judged(&a, &pred(3.5, 0.2, 0.05, 0.01), &d, true);
        assert_eq!(
            v,
            Verdict::Reject {
                reason: RejectReason::TtftBudgetUnreachable,
                retry_after_s: Some(1.5)
            }
        );
    }

    #[test]
    fn sheddable_work_must_leave_headroom() {
        let d = DecodeLoad::default();
        let p = pred(1.6, 0.2, 0.05, 0.01);
        assert_eq!(
            judged(&ask(Some(2.0), None, Priority::Standard), &p, &d, true),
            Verdict::Admit
        );
        // 75% of 2 s is 1.5 s: 1.6 s is over.
        let v = judged(&ask(Some(2.0), None, Priority::Sheddable), &p, &d, true);
        assert!(matches!(
            v,
            Verdict::Reject {
                reason: RejectReason::TtftBudgetUnreachable,
                ..
            }
        ));
    }

    #[test]
    fn decode_side_limits_make_it_wait_for_its_slack_then_refuse() {
        let a = ask(Some(2.0), Some(0.1), Priority::Standard);
        let tight = DecodeLoad {
            tightest_itl: Some(0.04),
            ..DecodeLoad::default()
        };
        // The step would go to 50 ms, past a running sequence's 40 ms budget: wait 0.5 s at most.
        let v = judged(&a, &pred(1.5, 0.2, 0.05, 0.01), &tight, true);
        assert_eq!(v, Verdict::Wait { for_s: 0.5 });
        // No KV room: the same.
        let v = judged(
            &a,
            &pred(1.5, 0.2, 0.05, 0.01),
            &DecodeLoad::default(),
            false,
        );
        assert_eq!(v, Verdict::Wait { for_s: 0.5 });
        // No slack left: refused, with the decode worker's drain time as Retry-After.
        let v = judged(&a, &pred(2.0, 0.2, 0.05, 0.01), &tight, true);
        assert_eq!(
            v,
            Verdict::Reject {
                reason: RejectReason::ItlBudgetUnreachable,
                retry_after_s: Some(0.7)
            }
        );
    }

    #[test]
    fn unbudgeted_work_waits_past_the_horizon_and_respects_running_budgets() {
        let a = ask(None, None, Priority::Standard);
        let d = DecodeLoad::default();
        assert_eq!(
            judged(&a, &pred(29.0, 0.2, 0.5, 0.01), &d, true),
            Verdict::Admit
        );
        let tight = DecodeLoad {
            tightest_itl: Some(0.1),
            ..DecodeLoad::default()
        };
        assert_eq!(
            judged(&a, &pred(10.0, 0.2, 0.5, 0.01), &tight, true),
            Verdict::Wait { for_s: 20.0 }
        );
    }
}
