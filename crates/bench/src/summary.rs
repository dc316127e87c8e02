//! A run's metrics, from its request records.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::record::{ErrorClass, RequestRecord, TokenSource};
use crate::shedding::AdmissionSummary;
use crate::stats::Distribution;

/// Latency objectives, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Slo {
    pub ttft_s: Option<f64>,
    /// Bounds each request's TPOT (`--slo-itl`, `--goodput tpot:MS`).
    pub itl_s: Option<f64>,
    /// Bounds each request's end-to-end latency (`--goodput e2el:MS`).
    pub e2e_s: Option<f64>,
}

impl Slo {
    pub fn any(&self) -> bool {
        self.ttft_s.is_some() || self.itl_s.is_some() || self.e2e_s.is_some()
    }
}

/// Attainment of the objectives and the goodput. A request meets an objective only if it was
/// admitted and answered in full: rejected and failed requests meet none.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SloSummary {
    pub ttft_ms: Option<f64>,
    pub itl_ms: Option<f64>,
    pub e2e_ms: Option<f64>,
    /// Share of all measured requests that succeeded with TTFT within its objective.
    pub ttft_attainment: f64,
    /// Share of all measured requests that succeeded with TPOT within the ITL objective.
    pub itl_attainment: f64,
    /// Share of all measured requests that succeeded within the end-to-end objective.
    pub e2e_attainment: f64,
    /// Share of all measured requests (rejected ones included) meeting every objective.
    pub attainment: f64,
    /// Share of the admitted requests (answered in full) meeting every objective; `None` when
    /// none was.
    pub admitted_attainment: Option<f64>,
    /// Requests meeting every objective.
    pub met: usize,
    /// Requests meeting every objective, per second of the run (goodput).
    pub goodput_rps: f64,
}

/// Everything reported about one run. Latencies in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSummary {
    /// `rate 4/s (poisson)` or `concurrency 16`.
    pub label: String,
    pub rate: Option<f64>,
    pub concurrency: Option<usize>,
    pub requests: usize,
    /// Admitted and answered in full.
    pub succeeded: usize,
    /// Failed for another reason than a rejection (counted in `errors`).
    pub failed: usize,
    pub errors: BTreeMap<ErrorClass, usize>,
    /// Admitted, rejected, rejections by code, and the server's TTFT predictions against the
    /// measured TTFT.
    #[serde(flatten)]
    pub admission: AdmissionSummary,
    /// From the first send to the last answer's end.
    pub duration_s: f64,
    /// Successful requests per second.
    pub request_throughput: f64,
    /// Output tokens of successful requests per second.
    pub output_token_throughput: f64,
    pub total_output_tokens: u64,
    pub ttft_ms: Option<Distribution>,
    /// Token-level inter-token latencies, pooled over all successful requests.
    pub itl_ms: Option<Distribution>,
    /// One sample per successful request with at least two output tokens.
    pub tpot_ms: Option<Distribution>,
    pub e2e_ms: Option<Distribution>,
    pub output_tokens: Option<Distribution>,
    /// Prompt lengths asked for (in the run's prompt unit).
    pub input_len: Option<Distribution>,
    /// `usage.prompt_tokens` as the server counted them (chat templates add tokens).
    pub server_prompt_tokens: Option<Distribution>,
    /// How many successful requests took their output token count from each source.
    pub output_token_sources: BTreeMap<String, usize>,
    pub slo: Option<SloSummary>,
}

impl RunSummary {
    /// Failed requests of one class.
    pub fn errors_of(&self, class: ErrorClass) -> usize {
        self.errors.get(&class).copied().unwrap_or(0)
    }
}

fn dist_ms(samples: Vec<f64>) -> Option<Distribution> {
    Distribution::from_samples(samples).map(|d| d.scaled(1000.0))
}

fn source_name(s: TokenSource) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Summarises the measured requests of one run.
pub fn summarize(
    label: String,
    rate: Option<f64>,
    concurrency: Option<usize>,
    records: &[RequestRecord],
    slo: Slo,
) -> RunSummary {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
    let mut errors = BTreeMap::new();
    for e in records.iter().filter_map(|r| r.error.as_ref()) {
        *errors.entry(e.class).or_insert(0) += 1;
    }
    let start = records
        .iter()
        .map(|r| r.send_s)
        .fold(f64::INFINITY, f64::min);
    let end = records
        .iter()
        .map(|r| r.end_s)
        .fold(f64::NEG_INFINITY, f64::max);
    let duration_s = if records.is_empty() {
        0.0
    } else {
        (end - start).max(0.0)
    };
    let per_s = |x: f64| {
        if duration_s > 0.0 {
            x / duration_s
        } else {
            0.0
        }
    };
    let total_output_tokens: u64 = ok.iter().map(|r| u64::from(r.output_tokens)).sum();
    let mut sources = BTreeMap::new();
    for r in &ok {
        *sources
            .entry(source_name(r.output_tokens_source))
            .or_insert(0) += 1;
    }
    let slo_summary = slo.any().then(|| {
        let ttft_ok = |r: &RequestRecord| {
            slo.ttft_s
                .is_none_or(|lim| r.ttft().is_some_and(|t| t <= lim))
        };
        // A one-token answer has no time per output token and cannot miss the objective.
        let itl_ok = |r: &RequestRecord| {
            slo.itl_s
                .is_none_or(|lim| r.tpot().is_none_or(|t| t <= lim))
        };
        let e2e_ok = |r: &RequestRecord| slo.e2e_s.is_none_or(|lim| r.e2e() <= lim);
        let n_ttft = ok.iter().filter(|r| ttft_ok(r)).count();
        let n_itl = ok.iter().filter(|r| itl_ok(r)).count();
        let n_e2e = ok.iter().filter(|r| e2e_ok(r)).count();
        let met = ok
            .iter()
            .filter(|r| ttft_ok(r) && itl_ok(r) && e2e_ok(r))
            .count();
        let share = |n: usize| {
            if records.is_empty() {
                0.0
            } else {
                n as f64 / records.len() as f64
            }
        };
        SloSummary {
            ttft_ms: slo.ttft_s.map(|s| s * 1000.0),
            itl_ms: slo.itl_s.map(|s| s * 1000.0),
            e2e_ms: slo.e2e_s.map(|s| s * 1000.0),
            ttft_attainment: share(n_ttft),
            itl_attainment: share(n_itl),
            e2e_attainment: share(n_e2e),
            attainment: share(met),
            admitted_attainment: (!ok.is_empty()).then(|| met as f64 / ok.len() as f64),
            met,
            goodput_rps: per_s(met as f64),
        }
    });
    RunSummary {
        label,
        rate,
        concurrency,
        requests: records.len(),
        succeeded: ok.len(),
        failed: records.iter().filter(|r| r.failed()).count(),
        errors,
        admission: AdmissionSummary::of(records),
        duration_s,
        request_throughput: per_s(ok.len() as f64),
        output_token_throughput: per_s(total_output_tokens as f64),
        total_output_tokens,
        ttft_ms: dist_ms(ok.iter().filter_map(|r| r.ttft()).collect()),
        itl_ms: dist_ms(ok.iter().flat_map(|r| r.itls()).collect()),
        tpot_ms: dist_ms(ok.iter().filter_map(|r| r.tpot()).collect()),
        e2e_ms: dist_ms(ok.iter().map(|r| r.e2e()).collect()),
        output_tokens: Distribution::from_samples(
            ok.iter().map(|r| f64::from(r.output_tokens)).collect(),
        ),
        input_len: Distribution::from_samples(
            records.iter().map(|r| f64::from(r.input_len)).collect(),
        ),
        server_prompt_tokens: Distribution::from_samples(
            ok.iter()
                .filter_map(|r| r.usage.map(|u| f64::from(u.prompt_tokens)))
                .collect(),
        ),
        output_token_sources: sources,
        slo: slo_summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RequestError;

    /// A one-token-per-chunk answer: sent at `send`, first token after `ttft`, then `n - 1` tokens
    /// `gap` apart.
    fn rec(send: f64, ttft: f64, gap: f64, n: u32) -> RequestRecord {
        let chunk_s: Vec<f64> = (0..n).map(|i| send + ttft + gap * f64::from(i)).collect();
        RequestRecord {
            input_len: 100,
            ..RequestRecord::streamed(send, chunk_s, vec![1; n as usize])
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn goodput_and_attainment_by_hand() {
        let mut failed = rec(0.5, 0.1, 0.01, 2);
        failed.error = Some(RequestError {
            class: ErrorClass::Http5xx,
            message: "500".into(),
        });
        let records = vec![
            rec(0.0, 0.1, 0.01, 11), // ttft 100 ms, tpot 10 ms, ends 0.2: meets both
            rec(1.0, 0.3, 0.01, 11), // ttft 300 ms: misses TTFT; ends 1.4
            rec(2.0, 0.1, 0.05, 11), // tpot 50 ms: misses ITL; ends 2.6
            rec(3.0, 0.15, 0.02, 1), // one token, ttft 150 ms: meets both; ends 3.15
            rec(3.5, 0.2, 0.02, 26), // ttft 200 ms, tpot 20 ms: meets both; ends 4.2
            failed,
        ];
        let slo = Slo {
            ttft_s: Some(0.25),
            itl_s: Some(0.025),
            e2e_s: None,
        };
        let s = summarize("t".into(), None, Some(1), &records, slo);
        assert_eq!((s.requests, s.succeeded, s.failed), (6, 5, 1));
        assert_eq!(s.errors_of(ErrorClass::Http5xx), 1);
        assert_eq!(s.errors_of(ErrorClass::Timeout), 0);
        // From the first send (0.0) to the last end (4.2).
        assert!(close(s.duration_s, 4.2));
        assert!(close(s.request_throughput, 5.0 / 4.2));
        assert_eq!(s.total_output_tokens, 11 + 11 + 11 + 1 + 26);
        assert!(close(s.output_token_throughput, 60.0 / 4.2));
        let slo = s.slo.expect("objectives given");
        assert_eq!(slo.met, 3);
        assert!(close(slo.ttft_attainment, 4.0 / 6.0));
        assert!(close(slo.itl_attainment, 4.0 / 6.0));
        assert!(close(slo.attainment, 3.0 / 6.0));
        assert_eq!(slo.admitted_attainment, Some(3.0 / 5.0));
        assert!(close(slo.goodput_rps, 3.0 / 4.2));
        // ITL samples: 10 + 10 + 10 + 0 + 25 tokens after a first.
        assert_eq!(s.itl_ms.as_ref().map(|d| d.count), Some(55));
        assert_eq!(s.tpot_ms.as_ref().map(|d| d.count), Some(4));
        // TTFT of the five successes in ms: 100, 300, 100, 150, 200 -> sorted 100 100 150 200 300.
        let ttft = s.ttft_ms.expect("five samples");
        assert!(close(ttft.p50, 150.0) && close(ttft.mean, 170.0) && close(ttft.max, 300.0));
        // h = 4 * 0.9 = 3.6 -> 200 + 0.6 * 100
        assert!(close(ttft.p90, 260.0));
        assert_eq!(s.output_token_sources.get("usage"), Some(&5));
    }

    #[test]
    fn rejections_are_neither_errors_nor_good() {
        let reject = |send: f64, code: &str| RequestRecord {
            first_token_s: None,
            end_s: send + 0.002,
            chunk_s: vec![],
            chunk_tokens: vec![],
            output_tokens: 0,
            rejected: true,
            reject_code: Some(code.into()),
            retry_after_s: Some(1.0),
            ..rec(send, 0.0, 0.0, 0)
        };
        let mut timed_out = rec(2.0, 0.1, 0.01, 3);
        timed_out.error = Some(RequestError {
            class: ErrorClass::Timeout,
            message: "late".into(),
        });
        let records = vec![
            rec(0.0, 0.1, 0.01, 11), // ends 0.2, e2e 200 ms: meets every objective
            rec(0.5, 0.1, 0.04, 11), // ends 1.0, e2e 500 ms: misses E2E
            reject(1.0, "ttft_budget_unreachable"),
            reject(1.5, "queue_full"),
            reject(3.0, "ttft_budget_unreachable"),
            timed_out,               // ends 2.12
            rec(3.5, 0.05, 0.01, 6), // ends 3.6, e2e 100 ms: meets every objective
        ];
        let slo = Slo {
            ttft_s: Some(0.2),
            itl_s: None,
            e2e_s: Some(0.3),
        };
        let s = summarize("r".into(), Some(2.0), None, &records, slo);
        assert_eq!((s.requests, s.succeeded, s.failed), (7, 3, 1));
        assert_eq!(s.errors.len(), 1);
        assert_eq!(s.errors_of(ErrorClass::Timeout), 1);
        assert_eq!(s.errors_of(ErrorClass::Http4xx), 0);
        assert_eq!((s.admission.admitted, s.admission.rejected), (3, 3));
        assert_eq!(
            s.admission.rejected_with(Some("ttft_budget_unreachable")),
            2
        );
        assert_eq!(s.admission.rejected_with(Some("queue_full")), 1);
        assert!(close(s.admission.rejected_share, 3.0 / 7.0));
        // Rejections are not measured as answers.
        assert_eq!(s.ttft_ms.as_ref().map(|d| d.count), Some(3));
        assert!(close(s.duration_s, 3.6));
        assert!(close(s.request_throughput, 3.0 / 3.6));
        let slo = s.slo.expect("objectives given");
        assert_eq!(slo.e2e_ms, Some(300.0));
        assert_eq!(slo.met, 2);
        assert!(close(slo.ttft_attainment, 3.0 / 7.0));
        assert!(close(slo.itl_attainment, 3.0 / 7.0));
        assert!(close(slo.e2e_attainment, 2.0 / 7.0));
        assert!(close(slo.attainment, 2.0 / 7.0));
        assert_eq!(slo.admitted_attainment, Some(2.0 / 3.0));
        assert!(close(slo.goodput_rps, 2.0 / 3.6));
        // Nothing admitted: no attainment among the admitted, and no goodput.
        let s = summarize("r".into(), None, Some(1), &records[2..5], slo_of(0.2));
        let slo = s.slo.expect("objectives given");
        assert_eq!((slo.met, slo.admitted_attainment), (0, None));
        assert_eq!((slo.attainment, slo.goodput_rps), (0.0, 0.0));
        assert_eq!(s.admission.rejected_share, 1.0);
    }

    fn slo_of(ttft_s: f64) -> Slo {
        Slo {
            ttft_s: Some(ttft_s),
            ..Slo::default()
        }
    }

    #[test]
    fn empty_run_has_no_distributions() {
        let s = summarize("e".into(), Some(1.0), None, &[], Slo::default());
        assert_eq!(s.requests, 0);
        assert_eq!(s.duration_s, 0.0);
        assert_eq!(s.request_throughput, 0.0);
        assert!(s.ttft_ms.is_none() && s.slo.is_none());
    }
}
