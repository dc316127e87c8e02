//! What a server's admission control did to a run: how many requests it admitted and rejected,
//! why, and how its TTFT predictions compared with the TTFT the client measured.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::record::RequestRecord;
use crate::stats::Distribution;

/// The table key of a rejection whose 429 had no `error.code`.
pub const NO_CODE: &str = "unspecified";

/// Admission counts and prediction error of one run. Every measured request is exactly one of
/// admitted (answered in full), rejected (HTTP 429) or failed (any other error, including an
/// answer broken off after it was admitted).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdmissionSummary {
    /// Requests answered in full (the same as `succeeded`).
    pub admitted: usize,
    /// Requests answered HTTP 429.
    pub rejected: usize,
    /// Rejections by their `error.code` (`unspecified` when the 429 had none).
    pub rejections: BTreeMap<String, usize>,
    /// Rejected over all measured requests (0 for an empty run).
    pub rejected_share: f64,
    /// Measured TTFT over the server's predicted TTFT (`x-tandem-predicted-ttft-ms`), one sample
    /// per admitted request whose answer carried a positive prediction; `None` without any.
    pub ttft_over_predicted: Option<Distribution>,
}

impl AdmissionSummary {
    pub fn of(records: &[RequestRecord]) -> Self {
        let mut rejections = BTreeMap::new();
        for r in records.iter().filter(|r| r.rejected) {
            let code = r.reject_code.as_deref().unwrap_or(NO_CODE);
            *rejections.entry(code.to_string()).or_insert(0) += 1;
        }
        let rejected: usize = rejections.values().sum();
        Self {
            admitted: records.iter().filter(|r| r.ok()).count(),
            rejected,
            rejections,
            rejected_share: if records.is_empty() {
                0.0
            } else {
                rejected as f64 / records.len() as f64
            },
            ttft_over_predicted: Distribution::from_samples(
                records
                    .iter()
                    .filter_map(RequestRecord::ttft_over_predicted)
                    .collect(),
            ),
        }
    }

    /// Rejections of one code (`None`: without a code).
    pub fn rejected_with(&self, code: Option<&str>) -> usize {
        let code = code.unwrap_or(NO_CODE);
        self.rejections.get(code).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{ErrorClass, RequestError};

    /// A success with TTFT `ttft_ms` and the server's prediction `predicted`.
    fn admitted(ttft_ms: f64, predicted: Option<f64>) -> RequestRecord {
        let first = 1.0 + ttft_ms / 1000.0;
        RequestRecord {
            predicted_ttft_ms: predicted,
            ..RequestRecord::streamed(1.0, vec![first, first + 0.01], vec![1, 1])
        }
    }

    fn rejected(code: Option<&str>) -> RequestRecord {
        RequestRecord {
            first_token_s: None,
            end_s: 1.001,
            chunk_s: vec![],
            chunk_tokens: vec![],
            output_tokens: 0,
            rejected: true,
            reject_code: code.map(str::to_string),
            retry_after_s: Some(2.0),
            // A prediction on a rejection is not a sample: nothing was measured.
            predicted_ttft_ms: Some(10.0),
            ..admitted(0.0, None)
        }
    }

    #[test]
    fn counts_and_prediction_error_by_hand() {
        let mut broken = admitted(100.0, Some(100.0));
        broken.error = Some(RequestError {
            class: ErrorClass::Disconnected,
            message: "closed".into(),
        });
        let records = vec![
            admitted(200.0, Some(100.0)), // 2.0
            admitted(50.0, Some(100.0)),  // 0.5
            admitted(300.0, Some(300.0)), // 1.0
            admitted(120.0, Some(40.0)),  // 3.0
            admitted(80.0, None),         // no prediction: no sample
            admitted(80.0, Some(0.0)),    // no ratio to a zero prediction
            rejected(Some("ttft_budget_unreachable")),
            rejected(Some("ttft_budget_unreachable")),
            rejected(Some("queue_full")),
            rejected(None),
            broken,
        ];
        let s = AdmissionSummary::of(&records);
        assert_eq!((s.admitted, s.rejected), (6, 4));
        assert_eq!(s.rejected_with(Some("ttft_budget_unreachable")), 2);
        assert_eq!(s.rejected_with(Some("queue_full")), 1);
        assert_eq!(s.rejected_with(None), 1);
        assert_eq!(s.rejected_with(Some("itl_budget_unreachable")), 0);
        assert_eq!(s.rejections.len(), 3);
        assert!((s.rejected_share - 4.0 / 11.0).abs() < 1e-12);
        // Ratios 0.5, 1.0, 2.0, 3.0: h = 3p -> p50 1.5 -> 1.5; p90 2.7 -> 2.7; p99 2.97 -> 2.97.
        let d = s.ttft_over_predicted.expect("four samples");
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert_eq!(d.count, 4);
        assert!(close(d.p50, 1.5), "{d:?}");
        assert!(close(d.p90, 2.7), "{d:?}");
        assert!(close(d.p99, 2.97), "{d:?}");
        assert!(
            close(d.min, 0.5) && close(d.max, 3.0) && close(d.mean, 1.625),
            "{d:?}"
        );
    }

    #[test]
    fn no_prediction_no_distribution() {
        let s = AdmissionSummary::of(&[admitted(10.0, None), rejected(None)]);
        assert_eq!((s.admitted, s.rejected, s.rejected_share), (1, 1, 0.5));
        assert_eq!(s.ttft_over_predicted, None);
        let empty = AdmissionSummary::of(&[]);
        assert_eq!((empty.admitted, empty.rejected_share), (0, 0.0));
    }
}
