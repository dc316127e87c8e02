//! Reads the requests of a `tandem bench --json` run, so that the simulator can be given the very
//! arrivals and lengths a measured run had (`tandem plan --simulate ... --replay FILE`).
//!
//! Only the fields needed are read, so the simulator does not depend on the bench crate: each
//! record's send time (`send_s`, seconds from the run's start), the prompt length the server
//! counted (`usage.prompt_tokens`, else the asked-for `input_len`) and the answer length
//! (`usage.completion_tokens`, else `max_tokens`). Failed requests are kept: they loaded the cluster
//! as much as the others did until they failed, and the simulator has no notion of failing them.
//! Rejected requests (HTTP 429) are kept too: they were offered load, and the simulator's own
//! admission decides them again.
//!
//! For admission, [`parse_bench_run`] also reads the budgets and priority the run's requests
//! carried (the config's `ttft_budget_ms`, `itl_budget_ms` and `priority`; a record's own, where it
//! has them) and what the server did with them: the rejections by code, and measured over predicted
//! TTFT of the admitted.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::admission::{Budget, Priority};
use crate::error::SimError;
use crate::stats::Dist;
use crate::workload::RequestSpec;

#[derive(Deserialize)]
struct BenchFile {
    #[serde(default)]
    config: Asked,
    runs: Vec<Run>,
}

/// Budgets and priority as the bench writes them (whole milliseconds; the header's spelling).
#[derive(Deserialize, Default, Clone)]
struct Asked {
    #[serde(default)]
    ttft_budget_ms: Option<f64>,
    #[serde(default)]
    itl_budget_ms: Option<f64>,
    #[serde(default)]
    priority: Option<String>,
}

impl Asked {
    fn any(&self) -> bool {
        self.ttft_budget_ms.is_some() || self.itl_budget_ms.is_some() || self.priority.is_some()
    }

    fn budget(&self) -> Result<Budget, SimError> {
        let secs = |ms: Option<f64>, what: &str| match ms {
            Some(ms) if !(ms.is_finite() && ms > 0.0) => Err(SimError::invalid(format!(
                "the bench report's {what} is not a positive number of milliseconds"
            ))),
            other => Ok(other.map(|ms| ms / 1e3)),
        };
        let priority = match self.priority.as_deref() {
            None => Priority::default(),
            Some(p) => Priority::parse(p).ok_or_else(|| {
                SimError::invalid(format!(
                    "the bench report's priority {p:?} is not critical, standard or sheddable"
                ))
            })?,
        };
        Ok(Budget {
            ttft: secs(self.ttft_budget_ms, "ttft_budget_ms")?,
            itl: secs(self.itl_budget_ms, "itl_budget_ms")?,
            priority,
        })
    }
}

#[derive(Deserialize)]
struct Run {
    records: Vec<Record>,
}

#[derive(Deserialize)]
struct Record {
    send_s: f64,
    input_len: u32,
    max_tokens: u32,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    first_token_s: Option<f64>,
    #[serde(default)]
    error: Option<serde_json::Value>,
    #[serde(default)]
    rejected: bool,
    #[serde(default)]
    reject_code: Option<String>,
    #[serde(default)]
    predicted_ttft_ms: Option<f64>,
    #[serde(flatten)]
    asked: Asked,
}

/// A bench run to replay.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRun {
    /// Its requests, ascending by send time, the first at time 0; each with its own budget only
    /// where its record states one.
    pub requests: Vec<RequestSpec>,
    /// The budgets and priority every request carried; `None` when it sent none.
    pub budget: Option<Budget>,
    pub measured: Measured,
}

/// What the measured run's admission did.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    pub requests: usize,
    /// Requests the server rejected, and how many of each code (`unspecified` without one).
    pub rejected: usize,
    pub rejections: BTreeMap<String, usize>,
    /// Measured TTFT over the server's predicted TTFT of the requests answered in full.
    pub ttft_over_predicted: Option<Dist>,
}

impl Measured {
    /// Rejected over all requests.
    pub fn rejected_share(&self) -> f64 {
        self.rejected as f64 / self.requests.max(1) as f64
    }
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
}

/// The requests of the first run in `text` (a bench report), ascending by send time, the first
/// at time 0.
pub fn parse_bench_json(text: &str) -> Result<Vec<RequestSpec>, SimError> {
    Ok(parse_bench_run(text)?.requests)
}

/// The first run in `text` (a bench report): its requests and what admission did with them.
pub fn parse_bench_run(text: &str) -> Result<BenchRun, SimError> {
    let file: BenchFile = serde_json::from_str(text).map_err(|source| SimError::Parse {
        what: "the bench report to replay".into(),
        source,
    })?;
    let run = file
        .runs
        .into_iter()
        .next()
        .ok_or_else(|| SimError::invalid("the bench report to replay has no run"))?;
    let mut out = Vec::with_capacity(run.records.len());
    for r in &run.records {
        let (p, c) = r
            .usage
            .as_ref()
            .map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens));
        out.push(RequestSpec {
            arrival: r.send_s,
            input: if p > 0 { p } else { r.input_len },
            output: if c > 0 { c } else { r.max_tokens },
            budget: if r.asked.any() {
                Some(r.asked.budget()?)
            } else {
                None
            },
        });
    }
    if out.is_empty() {
        return Err(SimError::invalid(
            "the bench report to replay has no request",
        ));
    }
    if out.iter().any(|r| !r.arrival.is_finite()) {
        return Err(SimError::invalid(
            "the bench report has a send time that is not a number",
        ));
    }
    out.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    let t0 = out[0].arrival;
    for r in &mut out {
        r.arrival -= t0;
    }
    let mut rejections = BTreeMap::new();
    for r in run.records.iter().filter(|r| r.rejected) {
        let code = r.reject_code.as_deref().unwrap_or("unspecified");
        *rejections.entry(code.to_string()).or_insert(0) += 1;
    }
    let ratios: Vec<f64> = run
        .records
        .iter()
        .filter(|r| !r.rejected && r.error.as_ref().is_none_or(|e| e.is_null()))
        .filter_map(|r| {
            let predicted = r.predicted_ttft_ms.filter(|p| *p > 0.0)?;
            Some((r.first_token_s? - r.send_s) * 1e3 / predicted)
        })
        .collect();
    Ok(BenchRun {
        measured: Measured {
            requests: out.len(),
            rejected: rejections.values().sum(),
            rejections,
            ttft_over_predicted: (!ratios.is_empty()).then(|| Dist::of(ratios)),
        },
        requests: out,
        budget: if file.config.any() {
            Some(file.config.budget()?)
        } else {
            None
        },
    })
}

/// [`parse_bench_json`] of the file at `path`.
pub fn read_bench_json(path: &Path) -> Result<Vec<RequestSpec>, SimError> {
    let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_bench_json(&text)
}

/// [`parse_bench_run`] of the file at `path`.
pub fn read_bench_run(path: &Path) -> Result<BenchRun, SimError> {
    let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_bench_run(&text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_become_requests_in_send_order() {
        let text = r#"{"config":{},"runs":[{"summary":{},"records":[
            {"send_s":0.75,"input_len":200,"max_tokens":64,"usage":{"prompt_tokens":203,"completion_tokens":64},"error":null},
            {"send_s":0.25,"input_len":100,"max_tokens":32,"usage":null,"error":{"class":"timeout"}},
            {"send_s":0.5,"input_len":50,"max_tokens":8,"usage":{"prompt_tokens":0,"completion_tokens":5}}
        ]}]}"#;
        let r = parse_bench_json(text).unwrap();
        let got: Vec<(f64, u32, u32)> = r.iter().map(|x| (x.arrival, x.input, x.output)).collect();
        assert_eq!(got, vec![(0.0, 100, 32), (0.25, 50, 5), (0.5, 203, 64)]);
    }

    #[test]
    fn empty_or_malformed_reports_are_refused() {
        let e = parse_bench_json(r#"{"runs":[]}"#).unwrap_err().to_string();
        assert!(e.contains("no run"), "{e}");
        let e = parse_bench_json(r#"{"runs":[{"records":[]}]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no request"), "{e}");
        let e = parse_bench_json("{").unwrap_err().to_string();
        assert!(e.contains("cannot parse the bench report"), "{e}");
        let e = parse_bench_run(
            r#"{"config":{"priority":"urgent"},"runs":[{"records":[{"send_s":0,"input_len":1,"max_tokens":1}]}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"urgent\" is not critical"), "{e}");
    }

    #[test]
    fn budgets_rejections_and_predictions_come_with_the_requests() {
        // Three requests under a 450 ms budget: two rejected (one without a code), one admitted
        // with TTFT 0.3 s against 200 ms predicted. The third record states its own budget.
        let text = r#"{"config":{"ttft_budget_ms":450,"itl_budget_ms":null,"priority":"sheddable"},
          "runs":[{"records":[
            {"send_s":1.0,"input_len":100,"max_tokens":8,"usage":{"prompt_tokens":100,"completion_tokens":8},
             "first_token_s":1.3,"error":null,"rejected":false,"reject_code":null,"predicted_ttft_ms":200.0},
            {"send_s":1.5,"input_len":100,"max_tokens":8,"usage":null,"error":null,"rejected":true,
             "reject_code":"ttft_budget_unreachable","predicted_ttft_ms":900.0},
            {"send_s":2.0,"input_len":60,"max_tokens":4,"usage":null,"error":null,"rejected":true,
             "ttft_budget_ms":100,"priority":"critical"}
          ]}]}"#;
        let run = parse_bench_run(text).unwrap();
        assert_eq!(
            run.budget,
            Some(Budget {
                ttft: Some(0.45),
                itl: None,
                priority: Priority::Sheddable
            })
        );
        let own: Vec<Option<Budget>> = run.requests.iter().map(|r| r.budget).collect();
        assert_eq!(
            own,
            vec![
                None,
                None,
                Some(Budget {
                    ttft: Some(0.1),
                    itl: None,
                    priority: Priority::Critical
                })
            ]
        );
        let arrivals: Vec<(f64, u32)> = run.requests.iter().map(|r| (r.arrival, r.input)).collect();
        assert_eq!(arrivals, vec![(0.0, 100), (0.5, 100), (1.0, 60)]);
        let m = run.measured;
        assert_eq!((m.requests, m.rejected), (3, 2));
        assert!((m.rejected_share() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(
            m.rejections.into_iter().collect::<Vec<_>>(),
            [
                ("ttft_budget_unreachable".to_string(), 1),
                ("unspecified".to_string(), 1)
            ]
        );
        let ratio = m.ttft_over_predicted.unwrap();
        assert!((ratio.p50 - 1.5).abs() < 1e-9, "{ratio:?}");
    }
}
