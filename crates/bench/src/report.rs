//! The benchmark's result: its configuration, one summary per run with every request's timings,
//! the table it prints and the JSON it writes.

use std::fmt;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::admission::Admission;
use crate::args::{ApiKind, Workload};
use crate::dist::{Arrival, LengthDist};
use crate::error::BenchError;
use crate::record::{ErrorClass, RequestRecord};
use crate::stats::Distribution;
use crate::summary::{RunSummary, Slo};

/// What was asked for, as it was understood.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchConfig {
    /// The full request URL.
    pub url: String,
    pub model: String,
    /// The model was the first of the endpoint's `/v1/models` (no `--model` given).
    pub model_from_endpoint: bool,
    pub api: ApiKind,
    pub stream: bool,
    pub workload: Workload,
    pub isl: LengthDist,
    pub osl: LengthDist,
    pub arrival: Arrival,
    pub burstiness: f64,
    pub seed: u64,
    pub requests: Option<usize>,
    pub duration_s: Option<f64>,
    pub warmup: usize,
    /// Warmup requests not answered in full (failed or rejected).
    pub warmup_failed: usize,
    pub timeout_s: f64,
    /// `tokens`, or whitespace words when no tokenizer was given.
    pub prompt_unit: String,
    /// Prompts whose length could not be made exact (the closest was sent).
    pub prompts_inexact: usize,
    pub slo: Slo,
    /// The budgets and priority every request carried (`ttft_budget_ms`, `itl_budget_ms`,
    /// `priority`; null when not sent).
    #[serde(flatten)]
    pub admission: Admission,
}

/// One run: its summary and every measured request.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub summary: RunSummary,
    pub records: Vec<RequestRecord>,
    /// The instant the records' times count from (not serialised).
    #[serde(skip)]
    pub epoch: Instant,
}

/// The whole benchmark. `Display` prints the table.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub config: BenchConfig,
    pub runs: Vec<RunReport>,
}

impl BenchReport {
    /// Writes the report as JSON (compact: records hold every chunk time).
    pub fn write_json(&self, path: &Path) -> Result<(), BenchError> {
        let wrap = |source| BenchError::Write {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::create(path).map_err(wrap)?;
        let mut w = std::io::BufWriter::new(file);
        serde_json::to_writer(&mut w, self)?;
        w.write_all(b"\n").map_err(wrap)?;
        w.flush().map_err(wrap)
    }
}

fn row(f: &mut fmt::Formatter<'_>, name: &str, d: Option<&Distribution>) -> fmt::Result {
    match d {
        Some(d) => writeln!(
            f,
            "  {name:<16}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
            d.mean, d.p50, d.p90, d.p95, d.p99, d.min, d.max
        ),
        None => writeln!(f, "  {name:<16}{:>10}", "-"),
    }
}

fn rejections_line(s: &RunSummary) -> String {
    let a = &s.admission;
    if a.rejected == 0 {
        return String::new();
    }
    let codes: Vec<String> = a
        .rejections
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    format!(
        "  rejected {} ({:.1}%: {})",
        a.rejected,
        a.rejected_share * 100.0,
        codes.join(", ")
    )
}

fn errors_line(s: &RunSummary) -> String {
    let parts: Vec<String> = ErrorClass::ALL
        .iter()
        .filter(|c| s.errors_of(**c) > 0)
        .map(|c| format!("{} {}", c.as_str(), s.errors_of(*c)))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!(" ({})", parts.join(", "))
    }
}

impl fmt::Display for RunSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== {} ==", self.label)?;
        writeln!(
            f,
            "  requests {}  ok {}  failed {}{}{}  duration {:.2} s",
            self.requests,
            self.succeeded,
            self.failed,
            errors_line(self),
            rejections_line(self),
            self.duration_s
        )?;
        writeln!(
            f,
            "  throughput {:.2} req/s  {:.1} output tok/s  ({} output tokens)",
            self.request_throughput, self.output_token_throughput, self.total_output_tokens
        )?;
        writeln!(
            f,
            "  {:<16}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "", "mean", "p50", "p90", "p95", "p99", "min", "max"
        )?;
        row(f, "TTFT (ms)", self.ttft_ms.as_ref())?;
        row(f, "ITL (ms)", self.itl_ms.as_ref())?;
        row(f, "TPOT (ms)", self.tpot_ms.as_ref())?;
        row(f, "E2E (ms)", self.e2e_ms.as_ref())?;
        row(f, "output tokens", self.output_tokens.as_ref())?;
        row(f, "prompt length", self.input_len.as_ref())?;
        if self.server_prompt_tokens.is_some() {
            row(f, "server prompt", self.server_prompt_tokens.as_ref())?;
        }
        if let Some(d) = &self.admission.ttft_over_predicted {
            row(f, "TTFT/predicted", Some(d))?;
        }
        if let Some(slo) = &self.slo {
            let lim = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
            let e2e = slo.e2e_ms.map_or(String::new(), |v| {
                format!(
                    "  E2E <= {v:.0} ms met by {:.1}%",
                    slo.e2e_attainment * 100.0
                )
            });
            let admitted = slo
                .admitted_attainment
                .map_or("-".to_string(), |a| format!("{:.1}%", a * 100.0));
            writeln!(
                f,
                "  SLO  TTFT <= {} met by {:.1}%  TPOT <= {} met by {:.1}%{e2e}  all {:.1}% (of admitted {admitted})  goodput {:.2} req/s",
                lim(slo.ttft_ms),
                slo.ttft_attainment * 100.0,
                lim(slo.itl_ms),
                slo.itl_attainment * 100.0,
                slo.attainment * 100.0,
                slo.goodput_rps
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "tandem bench  {}  model {}{}  {}",
            c.url,
            c.model,
            if c.model_from_endpoint {
                " (first of /v1/models)"
            } else {
                ""
            },
            if c.stream {
                "streaming"
            } else {
                "not streaming"
            }
        )?;
        let a = &c.admission;
        if a.ttft_budget_ms.is_some() || a.itl_budget_ms.is_some() || a.priority.is_some() {
            let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
            writeln!(
                f,
                "  budgets: TTFT {}  ITL {}  priority {}",
                ms(a.ttft_budget_ms),
                ms(a.itl_budget_ms),
                a.priority.map_or("-", |p| p.as_str())
            )?;
        }
        writeln!(
            f,
            "  workload {}  prompt {}  output {}  prompt unit: {}  seed {}  warmup {} ({} failed)",
            c.workload.name(),
            c.isl,
            c.osl,
            c.prompt_unit,
            c.seed,
            c.warmup,
            c.warmup_failed
        )?;
        if c.prompts_inexact > 0 {
            writeln!(
                f,
                "  {} prompts could not be cut to their exact length",
                c.prompts_inexact
            )?;
        }
        for run in &self.runs {
            write!(f, "{}", run.summary)?;
        }
        if self.runs.len() > 1 {
            writeln!(f, "== sweep ==")?;
            writeln!(
                f,
                "  {:<40}{:>9}{:>11}{:>10}{:>10}{:>9}{:>9}{:>8}{:>10}{:>9}",
                "run",
                "req/s",
                "out tok/s",
                "TTFT p50",
                "TTFT p99",
                "ITL p50",
                "ITL p99",
                "failed",
                "rejected",
                "goodput"
            )?;
            for run in &self.runs {
                let s = &run.summary;
                let p = |d: &Option<Distribution>, p99: bool| {
                    d.as_ref().map_or("-".into(), |d| {
                        format!("{:.1}", if p99 { d.p99 } else { d.p50 })
                    })
                };
                let good = s
                    .slo
                    .as_ref()
                    .map_or("-".into(), |g| format!("{:.2}", g.goodput_rps));
                writeln!(
                    f,
                    "  {:<40}{:>9.2}{:>11.1}{:>10}{:>10}{:>9}{:>9}{:>8}{:>10}{:>9}",
                    s.label,
                    s.request_throughput,
                    s.output_token_throughput,
                    p(&s.ttft_ms, false),
                    p(&s.ttft_ms, true),
                    p(&s.itl_ms, false),
                    p(&s.itl_ms, true),
                    s.failed,
                    s.admission.rejected,
                    good
                )?;
            }
        }
        Ok(())
    }
}
