//! Latency distributions and SLO attainment from a simulation run.

use serde::Serialize;

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

/// What a simulation run yields.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimReport {
    /// Requests measured (after the warm-up share).
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
    pub throughput_rps: f64,
    pub output_tokens_per_s: f64,
    /// Simulated seconds from the first measured arrival to the last completion.
    pub span_s: f64,
    pub events: u64,
}

/// One finished request's times.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Outcome {
    pub arrival: f64,
    pub first: f64,
    pub finish: f64,
    pub output: u32,
}

pub(crate) fn summarise(
    out: &[Outcome],
    steps: Vec<(f64, u32)>,
    slo: &Slo,
    check_ttft: bool,
    check_tpot: bool,
    events: u64,
) -> SimReport {
    let n = out.len();
    let tpot_of = |o: &Outcome| {
        if o.output > 1 {
            (o.finish - o.first) / f64::from(o.output - 1)
        } else {
            0.0
        }
    };
    let (mut ok_t, mut ok_p, mut ok) = (0usize, 0usize, 0usize);
    for o in out {
        let t = !check_ttft || o.first - o.arrival <= slo.ttft_s;
        let p = !check_tpot || tpot_of(o) <= slo.tpot_s;
        ok_t += usize::from(t);
        ok_p += usize::from(p);
        ok += usize::from(t && p);
    }
    let start = out.iter().map(|o| o.arrival).fold(f64::INFINITY, f64::min);
    let end = out
        .iter()
        .map(|o| o.finish)
        .fold(f64::NEG_INFINITY, f64::max);
    let span = if n > 0 {
        (end - start).max(f64::MIN_POSITIVE)
    } else {
        0.0
    };
    let share = |k: usize| if n > 0 { k as f64 / n as f64 } else { 0.0 };
    let tokens: u64 = out.iter().map(|o| u64::from(o.output)).sum();
    SimReport {
        requests: n,
        ttft: Dist::of(out.iter().map(|o| o.first - o.arrival).collect()),
        tpot: Dist::of(out.iter().filter(|o| o.output > 1).map(tpot_of).collect()),
        itl: Dist::weighted(steps),
        e2e: Dist::of(out.iter().map(|o| o.finish - o.arrival).collect()),
        attainment: share(ok),
        ttft_attainment: share(ok_t),
        tpot_attainment: share(ok_p),
        throughput_rps: if n > 0 { n as f64 / span } else { 0.0 },
        output_tokens_per_s: if n > 0 { tokens as f64 / span } else { 0.0 },
        span_s: span,
        events,
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
}
