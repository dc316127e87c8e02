//! Latency distributions and SLO attainment from a simulation run.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::admission::RejectReason;

/// Summary of one latency distribution, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Dist {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    /// From unweighted samples (sorted here). Percentiles interpolate linearly between the two
    /// closest ranks, as `tandem bench` (and numpy) compute them, so that a replay of a bench run
    /// compares like with like: over 20 requests the nearest rank below would put the median at the
    /// 10th value where the bench puts it halfway to the 11th.
    pub fn of(mut xs: Vec<f64>) -> Dist {
        if xs.is_empty() {
            return Dist::default();
        }
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        let q = |p: f64| {
            let h = (n - 1) as f64 * p;
            let lo = h.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            xs[lo] + (h - lo as f64) * (xs[hi] - xs[lo])
        };
        Dist {
            mean: xs.iter().sum::<f64>() / n as f64,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: xs[n - 1],
        }
    }

    /// From (value, weight) samples: each step's duration counted once per token it produced.
    pub fn weighted(mut xs: Vec<(f64, u32)>) -> Dist {
        xs.retain(|(_, w)| *w > 0);
        if xs.is_empty() {
            return Dist::default();
        }
        xs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total: f64 = xs.iter().map(|(_, w)| f64::from(*w)).sum();
        let mean = xs.iter().map(|(v, w)| v * f64::from(*w)).sum::<f64>() / total;
        let q = |p: f64| {
            let target = p * total;
            let mut acc = 0.0;
            for (v, w) in &xs {
                acc += f64::from(*w);
                if acc >= target {
                    return *v;
                }
            }
            xs[xs.len() - 1].0
        };
        Dist {
            mean,
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: xs[xs.len() - 1].0,
        }
    }
}

/// Latency objectives: time to first token and time per output token (per request, its mean gap
/// between tokens after the first, as DistServe counts it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_s: f64,
    pub tpot_s: f64,
}

/// What a simulation run yields. With admission, a rejected request counts in `requests` and in
/// the attainment shares (as a miss), never in a latency distribution nor in the throughputs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    /// Requests measured (after the warm-up share), rejected ones included.
    pub requests: usize,
    pub ttft: Dist,
    /// Per-request mean time per output token.
    pub tpot: Dist,
    /// Gaps between consecutive tokens, over all tokens.
    pub itl: Dist,
    pub e2e: Dist,
    /// Share of requests meeting both objectives.
    pub attainment: f64,
    pub ttft_attainment: f64,
    pub tpot_attainment: f64,
    /// Completed requests per second.
    pub throughput_rps: f64,
    pub output_tokens_per_s: f64,
    /// Simulated seconds from the first measured arrival to the last completion (or rejection).
    pub span_s: f64,
    pub events: u64,
    /// Requests admission refused.
    pub rejected: usize,
    /// `rejected` over `requests` (0 without any request).
    pub rejected_share: f64,
    /// Rejections by reason, by the code clients see (`ttft_budget_unreachable`, ...).
    pub rejections: BTreeMap<String, usize>,
    /// Share of the completed (admitted) requests meeting both objectives; `None` when none was.
    pub admitted_attainment: Option<f64>,
    /// Requests that completed within both objectives, per second of the span.
    pub goodput_rps: f64,
    /// Measured TTFT over admission's predicted TTFT of each admitted request, both from its
    /// arrival (the prediction being what a client is told: the median plus the time it waited in
    /// the queue); `None` without admission.
    pub ttft_over_predicted: Option<Dist>,
}

/// One finished (or rejected) request's times.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub arrival: f64,
    pub first: f64,
    pub finish: f64,
    pub output: u32,
    /// Refused by admission: why, and when.
    pub rejected: Option<(RejectReason, f64)>,
    /// Admission's predicted TTFT from arrival, for an admitted request.
    pub predicted_ttft: Option<f64>,
}

pub(crate) fn summarise(
    all: &[Outcome],
    steps: Vec<(f64, u32)>,
    slo: &Slo,
    check_ttft: bool,
    check_tpot: bool,
    events: u64,
) -> SimReport {
    let offered = all.len();
    let out: Vec<Outcome> = all
        .iter()
        .filter(|o| o.rejected.is_none())
        .copied()
        .collect();
    let n = out.len();
    let tpot_of = |o: &Outcome| {
        if o.output > 1 {
            (o.finish - o.first) / f64::from(o.output - 1)
        } else {
            0.0
        }
    };
    let (mut ok_t, mut ok_p, mut ok) = (0usize, 0usize, 0usize);
    for o in &out {
        let t = !check_ttft || o.first - o.arrival <= slo.ttft_s;
        let p = !check_tpot || tpot_of(o) <= slo.tpot_s;
        ok_t += usize::from(t);
        ok_p += usize::from(p);
        ok += usize::from(t && p);
    }
    let mut rejections = BTreeMap::new();
    for (reason, _) in all.iter().filter_map(|o| o.rejected) {
        *rejections.entry(reason.code().to_string()).or_insert(0) += 1;
    }
    let rejected = offered - n;
    let start = all.iter().map(|o| o.arrival).fold(f64::INFINITY, f64::min);
    let end = all
        .iter()
        .map(|o| o.rejected.map_or(o.finish, |(_, at)| at))
        .fold(f64::NEG_INFINITY, f64::max);
    let span = if offered > 0 {
        (end - start).max(f64::MIN_POSITIVE)
    } else {
        0.0
    };
    let share = |k: usize| {
        if offered > 0 {
            k as f64 / offered as f64
        } else {
            0.0
        }
    };
    let per_s = |k: f64| if offered > 0 { k / span } else { 0.0 };
    let tokens: u64 = out.iter().map(|o| u64::from(o.output)).sum();
    let ratios: Vec<f64> = out
        .iter()
        .filter_map(|o| {
            let p = o.predicted_ttft.filter(|p| *p > 0.0)?;
            Some((o.first - o.arrival) / p)
        })
        .collect();
    SimReport {
        requests: offered,
        ttft: Dist::of(out.iter().map(|o| o.first - o.arrival).collect()),
        tpot: Dist::of(out.iter().filter(|o| o.output > 1).map(tpot_of).collect()),
        itl: Dist::weighted(steps),
        e2e: Dist::of(out.iter().map(|o| o.finish - o.arrival).collect()),
        attainment: share(ok),
        ttft_attainment: share(ok_t),
        tpot_attainment: share(ok_p),
        throughput_rps: per_s(n as f64),
        output_tokens_per_s: per_s(tokens as f64),
        span_s: span,
        events,
        rejected,
        rejected_share: share(rejected),
        rejections,
        admitted_attainment: (n > 0).then(|| ok as f64 / n as f64),
        goodput_rps: per_s(ok as f64),
        ttft_over_predicted: (!ratios.is_empty()).then(|| Dist::of(ratios)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_as_the_bench_does_and_weighted_ones_take_a_rank() {
        let d = Dist::of((1..=100).map(f64::from).collect());
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(
            close(d.p50, 50.5) && close(d.p90, 90.1) && close(d.p99, 99.01),
            "{d:?}"
        );
        assert_eq!((d.max, d.mean), (100.0, 50.5));
        // numpy.percentile([15, 20, 35, 40, 50], [50, 90]) == [35, 46]
        let d = Dist::of(vec![50.0, 15.0, 35.0, 20.0, 40.0]);
        assert!(close(d.p50, 35.0) && close(d.p90, 46.0), "{d:?}");
        assert_eq!(Dist::of(vec![7.0]).p99, 7.0);
        let w = Dist::weighted(vec![(1.0, 9), (10.0, 1)]);
        assert_eq!((w.p50, w.p90, w.p99), (1.0, 1.0, 10.0));
        assert!((w.mean - 1.9).abs() < 1e-12);
    }

    fn done(arrival: f64, ttft: f64, e2e: f64, output: u32) -> Outcome {
        Outcome {
            arrival,
            first: arrival + ttft,
            finish: arrival + e2e,
            output,
            rejected: None,
            predicted_ttft: None,
        }
    }

    #[test]
    fn rejected_requests_are_offered_load_but_in_no_latency() {
        let slo = Slo {
            ttft_s: 0.5,
            tpot_s: 0.1,
        };
        let mut a = done(0.0, 0.25, 0.75, 10);
        a.predicted_ttft = Some(0.125);
        let mut b = done(1.0, 0.75, 1.5, 10);
        b.predicted_ttft = Some(0.5);
        let late = Outcome {
            rejected: Some((RejectReason::TtftBudgetUnreachable, 4.0)),
            ..done(2.0, f64::NAN, f64::NAN, 10)
        };
        let full = Outcome {
            rejected: Some((RejectReason::QueueFull, 3.0)),
            ..done(3.0, f64::NAN, f64::NAN, 10)
        };
        let r = summarise(&[a, b, late, full], Vec::new(), &slo, true, true, 9);
        assert_eq!((r.requests, r.rejected), (4, 2));
        assert_eq!(r.rejected_share, 0.5);
        assert_eq!(
            r.rejections.into_iter().collect::<Vec<_>>(),
            [
                ("queue_full".to_string(), 1),
                ("ttft_budget_unreachable".to_string(), 1)
            ]
        );
        // Only the first meets both objectives: a quarter of those offered, half the admitted.
        assert_eq!((r.attainment, r.admitted_attainment), (0.25, Some(0.5)));
        assert_eq!((r.ttft.p50, r.ttft.max), (0.5, 0.75));
        // From the first arrival (0) to the last rejection (4.0).
        assert_eq!(r.span_s, 4.0);
        assert_eq!((r.goodput_rps, r.throughput_rps), (0.25, 0.5));
        let ratio = r.ttft_over_predicted.unwrap();
        assert_eq!((ratio.p50, ratio.max), (1.75, 2.0));
    }
}
