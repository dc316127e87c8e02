//! Reads the requests of a `tandem bench --json` run, so that the simulator can be given the very
//! arrivals and lengths a measured run had (`tandem plan --simulate ... --replay FILE`).
//!
//! Only the fields needed are read, so the simulator does not depend on the bench crate: each
//! record's send time (`send_s`, seconds from the run's start), the prompt length the server
//! counted (`usage.prompt_tokens`, else the asked-for `input_len`) and the answer length
//! (`usage.completion_tokens`, else `max_tokens`). Failed requests are kept: they loaded the cluster
//! as much as the others did until they failed, and the simulator has no notion of failing them.

use std::path::Path;

use serde::Deserialize;

use crate::error::SimError;
use crate::workload::RequestSpec;

#[derive(Deserialize)]
struct BenchFile {
    runs: Vec<Run>,
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
    let file: BenchFile = serde_json::from_str(text).map_err(|source| SimError::Parse {
        what: "the bench report to replay".into(),
        source,
    })?;
    let run = file
        .runs
        .into_iter()
        .next()
        .ok_or_else(|| SimError::invalid("the bench report to replay has no run"))?;
    let mut out: Vec<RequestSpec> = run
        .records
        .iter()
        .map(|r| {
            let (p, c) = r
                .usage
                .as_ref()
                .map_or((0, 0), |u| (u.prompt_tokens, u.completion_tokens));
            RequestSpec {
                arrival: r.send_s,
                input: if p > 0 { p } else { r.input_len },
                output: if c > 0 { c } else { r.max_tokens },
            }
        })
        .collect();
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
    Ok(out)
}

/// [`parse_bench_json`] of the file at `path`.
pub fn read_bench_json(path: &Path) -> Result<Vec<RequestSpec>, SimError> {
    let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_bench_json(&text)
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
    }
}
