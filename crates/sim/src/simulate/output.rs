//! `--simulate`'s report, as text for people and JSON for machines.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::{Value, json};

use super::{ClusterSpec, RunLoad};
use crate::admission::Budget;
use crate::stats::{Dist, SimReport};
use crate::workload::{Arrivals, Lengths, Workload};

fn dist_json(d: &Dist) -> Value {
    json!({
        "mean": d.mean * 1e3, "p50": d.p50 * 1e3, "p90": d.p90 * 1e3,
        "p99": d.p99 * 1e3, "max": d.max * 1e3,
    })
}

fn describe_arrivals(w: &Workload) -> String {
    match &w.arrivals {
        Arrivals::Poisson { rate } => format!("Poisson arrivals at {rate}/s"),
        Arrivals::Gamma { rate, cv } => format!("gamma arrivals at {rate}/s, cv {cv}"),
        Arrivals::Constant { rate } => format!("constant arrivals at {rate}/s"),
        Arrivals::Trace(t) => format!("a trace of {} arrivals", t.len()),
        Arrivals::Replay(r) => format!("a replay of {} recorded requests", r.len()),
    }
}

fn lengths_text(l: &Lengths) -> String {
    match *l {
        Lengths::Fixed(n) => n.to_string(),
        Lengths::Uniform { lo, hi } => format!("{lo}-{hi}"),
        Lengths::Normal { mean, std, lo, hi } => format!("normal({mean}, {std}) in {lo}-{hi}"),
    }
}

pub(super) fn as_json(
    c: &ClusterSpec,
    load: &RunLoad,
    r: &SimReport,
    desc: &(String, String),
) -> String {
    let v = json!({
        "prefill_instances": c.prefill,
        "decode_instances": c.decode,
        "tp_prefill": c.tp_prefill,
        "tp_decode": c.tp_decode,
        "step_tokens": c.step_tokens,
        "max_running": c.max_running,
        "time_scale": load.time_scale,
        "arrivals": describe_arrivals(&load.workload),
        "requests": r.requests,
        "ttft_ms": dist_json(&r.ttft),
        "itl_ms": dist_json(&r.itl),
        "tpot_ms": dist_json(&r.tpot),
        "e2e_ms": dist_json(&r.e2e),
        "throughput_rps": r.throughput_rps,
        "output_tokens_per_s": r.output_tokens_per_s,
        "span_s": r.span_s,
        "model_prefill": desc.0,
        "model_decode": desc.1,
        "admission": admission_json(load, r),
    });
    format!("{v}\n")
}

pub(super) fn as_text(
    c: &ClusterSpec,
    load: &RunLoad,
    r: &SimReport,
    desc: &(String, String),
) -> String {
    let mut s = String::new();
    let running = c
        .max_running
        .map_or("as many as KV holds".to_string(), |n| n.to_string());
    let _ = writeln!(
        s,
        "simulated: {} x prefill TP{} ({} prompt tokens per step) + {} x decode TP{} (batch: {running})",
        c.prefill, c.tp_prefill, c.step_tokens, c.decode, c.tp_decode
    );
    let _ = writeln!(s, "prefill model: {}", desc.0);
    if desc.1 != desc.0 {
        let _ = writeln!(s, "decode model: {}", desc.1);
    }
    let w = &load.workload;
    let lens = match w.arrivals {
        Arrivals::Replay(_) => String::new(),
        _ => format!(
            "; prompts {} tokens, answers {} tokens",
            lengths_text(&w.input),
            lengths_text(&w.output)
        ),
    };
    let _ = writeln!(
        s,
        "workload: {} requests, {}{lens}",
        r.requests,
        describe_arrivals(w)
    );
    let _ = writeln!(
        s,
        "{:<10}{:>10}{:>10}{:>10}{:>10}{:>10}",
        "(ms)", "mean", "p50", "p90", "p99", "max"
    );
    for (name, d) in [
        ("TTFT", &r.ttft),
        ("ITL", &r.itl),
        ("TPOT", &r.tpot),
        ("E2E", &r.e2e),
    ] {
        let _ = writeln!(
            s,
            "{name:<10}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
            d.mean * 1e3,
            d.p50 * 1e3,
            d.p90 * 1e3,
            d.p99 * 1e3,
            d.max * 1e3
        );
    }
    let _ = writeln!(
        s,
        "throughput: {:.3} requests/s, {:.1} output tokens/s over {:.2} s",
        r.throughput_rps, r.output_tokens_per_s, r.span_s
    );
    admission_text(&mut s, load, r);
    s
}

fn budget_text(b: &Budget) -> String {
    // Whole microseconds, in milliseconds: 0.45 s reads 450 ms, not 450.00000000000006.
    let ms = |s: Option<f64>| {
        s.map_or("none".to_string(), |s| {
            format!("{} ms", (s * 1e6).round() / 1e3)
        })
    };
    format!(
        "budgets TTFT {}, ITL {}, priority {}",
        ms(b.ttft),
        ms(b.itl),
        b.priority.as_str()
    )
}

fn rejections_text(rejected: usize, requests: usize, by: &BTreeMap<String, usize>) -> String {
    let codes: Vec<String> = by.iter().map(|(c, n)| format!("{c} {n}")).collect();
    let share = rejected as f64 / requests.max(1) as f64 * 100.0;
    if codes.is_empty() {
        format!("{rejected} of {requests} ({share:.1}%)")
    } else {
        format!(
            "{rejected} of {requests} ({share:.1}%: {})",
            codes.join(", ")
        )
    }
}

fn ratio_text(d: Option<&Dist>) -> String {
    d.map_or("-".into(), |d| {
        format!("p50 {:.2}, p90 {:.2}", d.p50, d.p90)
    })
}

/// Admission's lines: what was asked, then predicted rejections beside measured ones.
fn admission_text(s: &mut String, load: &RunLoad, r: &SimReport) {
    let Some(a) = &load.admission else { return };
    let _ = writeln!(
        s,
        "admission: {}; queue {}; pair choice {}",
        budget_text(&a.budget),
        a.queue,
        a.choice.as_str()
    );
    let _ = writeln!(
        s,
        "rejected (predicted): {}",
        rejections_text(r.rejected, r.requests, &r.rejections)
    );
    if let Some(m) = &load.measured {
        let _ = writeln!(
            s,
            "rejected (bench run): {}",
            rejections_text(m.rejected, m.requests, &m.rejections)
        );
    }
    let attained = r
        .admitted_attainment
        .map_or("-".into(), |x| format!("{:.1}%", x * 100.0));
    let _ = writeln!(
        s,
        "admitted: {}, {attained} within the budgets; goodput {:.3} requests/s",
        r.requests - r.rejected,
        r.goodput_rps
    );
    let _ = write!(
        s,
        "TTFT measured/predicted: {}",
        ratio_text(r.ttft_over_predicted.as_ref())
    );
    match &load.measured {
        Some(m) => {
            let _ = writeln!(
                s,
                " (bench run: {})",
                ratio_text(m.ttft_over_predicted.as_ref())
            );
        }
        None => s.push('\n'),
    }
}

fn ratio_json(d: Option<&Dist>) -> Value {
    d.map_or(Value::Null, |d| json!({ "p50": d.p50, "p90": d.p90 }))
}

fn admission_json(load: &RunLoad, r: &SimReport) -> Value {
    let Some(a) = &load.admission else {
        return Value::Null;
    };
    let ms = |s: Option<f64>| s.map(|s| (s * 1e6).round() / 1e3);
    let measured = load.measured.as_ref().map(|m| {
        json!({
            "requests": m.requests,
            "rejected": m.rejected,
            "rejected_share": m.rejected_share(),
            "rejections": m.rejections,
            "ttft_over_predicted": ratio_json(m.ttft_over_predicted.as_ref()),
        })
    });
    json!({
        "ttft_budget_ms": ms(a.budget.ttft),
        "itl_budget_ms": ms(a.budget.itl),
        "priority": a.budget.priority.as_str(),
        "queue": a.queue,
        "choice": a.choice.as_str(),
        "rejected": r.rejected,
        "rejected_share": r.rejected_share,
        "rejections": r.rejections,
        "admitted_attainment": r.admitted_attainment,
        "goodput_rps": r.goodput_rps,
        "ttft_over_predicted": ratio_json(r.ttft_over_predicted.as_ref()),
        "measured": measured,
    })
}
