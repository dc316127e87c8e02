//! The planner's answer as text for people and JSON for machines.

use std::fmt::Write;

use serde_json::{Value, json};

use crate::evaluate::{StaticEstimate, StaticSizing};
use crate::perf::PerfModel;
use crate::planner::{Candidate, Mode, Plan, PlanInput};
use crate::stats::Dist;

/// What the report needs besides the plan.
#[derive(Debug)]
pub struct Context<'a> {
    pub input: &'a PlanInput,
    /// (average, percentile, peak) when the rate came from an average.
    pub peak: Option<(f64, f64, f64)>,
    pub gpus_per_node: u32,
    /// The calculator's static-batch answer, for comparison.
    pub static_sizing: Option<StaticSizing>,
}

fn ms(d: &Dist) -> Value {
    json!({ "p50": d.p50 * 1e3, "p90": d.p90 * 1e3, "p99": d.p99 * 1e3, "mean": d.mean * 1e3 })
}

fn describe_model(ctx: &Context<'_>, tp: u32) -> String {
    ctx.input
        .source
        .at(tp)
        .map(|m| m.describe())
        .unwrap_or_default()
}

fn shape(c: &Candidate) -> String {
    match c.mode {
        Mode::Aggregated => format!(
            "aggregated: {} x TP{} (batch {}, {} tokens per step)",
            c.prefill_instances, c.tp_prefill, c.max_batch, c.batch_tokens
        ),
        Mode::Disaggregated => format!(
            "disaggregated: {} x prefill TP{} ({} prompt tokens per batch) + {} x decode TP{} (batch {})",
            c.prefill_instances,
            c.tp_prefill,
            c.batch_tokens,
            c.decode_instances,
            c.tp_decode,
            c.max_batch
        ),
    }
}

fn ratio(c: &Candidate) -> Option<String> {
    (c.mode == Mode::Disaggregated)
        .then(|| format!("{}:{}", c.prefill_instances, c.decode_instances))
}

fn candidate_json(ctx: &Context<'_>, c: &Candidate) -> Value {
    let rep = c.at_rate.as_ref();
    json!({
        "mode": c.mode,
        "gpus": c.gpus,
        "nodes": c.gpus.div_ceil(ctx.gpus_per_node),
        "prefill_instances": if c.mode == Mode::Disaggregated { Some(c.prefill_instances) } else { None },
        "decode_instances": if c.mode == Mode::Disaggregated { Some(c.decode_instances) } else { None },
        "instances": if c.mode == Mode::Aggregated { Some(c.prefill_instances) } else { None },
        "tp_prefill": c.tp_prefill,
        "tp_decode": c.tp_decode,
        "max_batch": c.max_batch,
        "batch_tokens": c.batch_tokens,
        "prefill_decode_ratio": ratio(c),
        "goodput_rps": c.goodput_rps,
        "goodput_per_gpu": c.goodput_per_gpu(),
        "ttft_ms": rep.map(|r| ms(&r.ttft)),
        "itl_ms": rep.map(|r| ms(&r.itl)),
        "tpot_ms": rep.map(|r| ms(&r.tpot)),
        "attainment": rep.map(|r| r.attainment),
        "model": describe_model(ctx, c.tp_prefill),
    })
}

pub fn json(ctx: &Context<'_>, p: &Plan) -> String {
    let i = ctx.input;
    let v = json!({
        "method": "simulate",
        "rate_rps": i.rate,
        "peak": ctx.peak.map(|(avg, pct, peak)| json!({"avg_rps": avg, "percentile": pct, "peak_rps": peak})),
        "objectives": { "ttft_ms": i.slo.ttft_s * 1e3, "itl_ms": i.slo.tpot_s * 1e3, "attainment": i.attainment },
        "recommended": candidate_json(ctx, &p.recommended),
        "runner_ups": p.runner_ups.iter().map(|c| candidate_json(ctx, c)).collect::<Vec<_>>(),
        "static_sizing": ctx.static_sizing.map(|s| static_json(&s, i.rate, None)),
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

fn line(ctx: &Context<'_>, c: &Candidate) -> String {
    let mut s = format!(
        "{}\n    GPUs: {} ({} nodes of {})",
        shape(c),
        c.gpus,
        c.gpus.div_ceil(ctx.gpus_per_node),
        ctx.gpus_per_node
    );
    if let Some(r) = ratio(c) {
        let _ = write!(
            s,
            "; prefill:decode = {r} instances ({}:{} GPUs)",
            c.prefill_instances * c.tp_prefill,
            c.decode_instances * c.tp_decode
        );
    }
    if let (Some(g), Some(pg)) = (c.goodput_rps, c.goodput_per_gpu()) {
        let _ = write!(s, "\n    goodput: {g:.2} requests/s, {pg:.3} per GPU");
    }
    if let Some(r) = &c.at_rate {
        let _ = write!(
            s,
            "\n    at {:.2} requests/s: TTFT p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms; ITL p50 {:.1} ms, p90 {:.1} ms; \
             attainment {:.1}%",
            ctx.input.rate,
            r.ttft.p50 * 1e3,
            r.ttft.p90 * 1e3,
            r.ttft.p99 * 1e3,
            r.itl.p50 * 1e3,
            r.itl.p90 * 1e3,
            r.attainment * 100.0
        );
    }
    s
}

pub fn text(ctx: &Context<'_>, p: &Plan) -> String {
    let i = ctx.input;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "workload: prompts {:.0} tokens, answers {:.0} tokens, {:.2} requests/s at peak",
        i.workload.input.mean(),
        i.workload.output.mean(),
        i.rate
    );
    if let Some((avg, pct, peak)) = ctx.peak {
        let _ = writeln!(
            s,
            "peak: the {:.0}th percentile of a Poisson count averaging {avg}/s is {peak}/s",
            pct * 100.0
        );
    }
    let _ = writeln!(
        s,
        "objectives: TTFT <= {:.0} ms and ITL <= {:.1} ms for {:.0}% of requests",
        i.slo.ttft_s * 1e3,
        i.slo.tpot_s * 1e3,
        i.attainment * 100.0
    );
    let _ = writeln!(
        s,
        "model: {}",
        describe_model(ctx, p.recommended.tp_prefill)
    );
    let _ = writeln!(s, "\nrecommended: {}", line(ctx, &p.recommended));
    if let Some(st) = &ctx.static_sizing {
        let _ = writeln!(
            s,
            "\nfor comparison, static batching (the sizing calculator's method): {} x TP{} batch {}, {} GPUs \
             ({} nodes); TTFT {:.0} ms, ITL {:.1} ms, {:.2} prompts/s per 8 GPUs",
            st.instances,
            st.estimate.tp,
            st.estimate.batch,
            st.gpus,
            st.nodes,
            st.estimate.ttft_ms,
            st.estimate.itl_ms,
            st.estimate.prompts_per_s_per_8gpu
        );
    }
    if !p.runner_ups.is_empty() {
        let _ = writeln!(s, "\nrunner-ups:");
        for (k, c) in p.runner_ups.iter().enumerate() {
            let _ = writeln!(s, "  {}. {}", k + 1, line(ctx, c));
        }
    }
    s
}

pub fn evaluation(e: &StaticEstimate, mode: Mode, model: &dyn PerfModel, as_json: bool) -> String {
    if as_json {
        let v = json!({
            "mode": mode, "tp": e.tp, "batch": e.batch, "ttft_ms": e.ttft_ms, "itl_ms": e.itl_ms,
            "prompts_per_s_per_8gpu": e.prompts_per_s_per_8gpu, "tokens_per_s_per_gpu": e.tokens_per_s_per_gpu,
            "model": model.describe(),
        });
        return serde_json::to_string_pretty(&v).unwrap_or_default();
    }
    format!(
        "{}\nstatic batch of {} at TP{}: TTFT {:.1} ms (batch prefill + first step), ITL {:.1} ms, \
         {:.2} prompts/s per 8 GPUs, {:.0} output tokens/s per GPU\n",
        model.describe(),
        e.batch,
        e.tp,
        e.ttft_ms,
        e.itl_ms,
        e.prompts_per_s_per_8gpu,
        e.tokens_per_s_per_gpu
    )
}

fn static_json(s: &StaticSizing, rate: f64, model: Option<String>) -> Value {
    let e = &s.estimate;
    json!({
        "method": "static", "mode": "static", "rate_rps": rate, "gpus": s.gpus, "nodes": s.nodes, "instances": s.instances,
        "tp_prefill": e.tp, "tp_decode": e.tp, "batch": e.batch, "ttft_ms": e.ttft_ms, "itl_ms": e.itl_ms,
        "prompts_per_s_per_8gpu": e.prompts_per_s_per_8gpu,
        "goodput_per_gpu": e.prompts_per_s_per_8gpu / 8.0, "model": model,
    })
}

/// The calculator method's answer (`--method static`).
pub fn static_sizing(s: &StaticSizing, rate: f64, model: Option<String>, as_json: bool) -> String {
    if as_json {
        return serde_json::to_string_pretty(&static_json(s, rate, model)).unwrap_or_default();
    }
    let e = &s.estimate;
    format!(
        "{}\nstatic batching for {rate:.2} requests/s: {} x TP{} batch {}: {} GPUs ({} nodes)\n\
         TTFT {:.0} ms (batch prefill + first step), ITL {:.1} ms, {:.2} prompts/s per 8 GPUs\n\
         (the sizing calculator's method; --method simulate searches continuous batching, aggregated \
         and disaggregated, with the prefill:decode ratio)\n",
        model.unwrap_or_default(),
        s.instances,
        e.tp,
        e.batch,
        s.gpus,
        s.nodes,
        e.ttft_ms,
        e.itl_ms,
        e.prompts_per_s_per_8gpu
    )
}
