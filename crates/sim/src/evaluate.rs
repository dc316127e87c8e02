//! One configuration costed the way a sizing calculator reports it (NVIDIA's TRT-LLM tables):
//! a static batch of `batch` prompts is prefilled together, then decoded in lock step.
//!
//! How we read the published TTFT: the time from the batch's start until its first generated token
//! reaches the caller, which in TRT-LLM's static-batch session is the context phase of the whole
//! batch followed by the first generation step. So TTFT = prefill(batch x isl) + one decode step.
//! The reading is forced by the numbers, not chosen for them: with TTFT = prefill alone, no single
//! set of efficiency factors brings both Llama-2-70B rows within 20% (grid search: 22.6% at best,
//! because a 128-token prefill at TP8 would have to take 2.2 decode steps while a 16,384-token one
//! at TP4 runs near the compute roof); with the extra step, all rows fit within 6%. The batch-128
//! figure (1516.7 ms) is then a full batch prefilled at once, not a queue in steady state: a queue
//! at the published throughput (5.6 prompts/s per TP4 instance) would wait far less than a second.
//!
//! ITL is the decode step at the mean context of the run (isl + osl/2); throughput per 8 GPUs is
//! `(8 / tp) * batch / (TTFT + (osl - 1) * ITL)`.

use serde::Serialize;

use crate::error::SimError;
use crate::perf::{PerfModel, PrefillItem, blocks_for};

/// The calculator's answer for one configuration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StaticEstimate {
    pub tp: u32,
    pub batch: u32,
    pub ttft_ms: f64,
    pub itl_ms: f64,
    pub prompts_per_s_per_8gpu: f64,
    pub tokens_per_s_per_gpu: f64,
}

/// Costs a static batch of `batch` prompts of `isl` tokens generating `osl` tokens each.
pub fn static_batch(
    model: &dyn PerfModel,
    batch: u32,
    isl: u32,
    osl: u32,
) -> Result<StaticEstimate, SimError> {
    if batch == 0 || isl == 0 || osl == 0 {
        return Err(SimError::invalid(
            "batch, input and output lengths must be positive",
        ));
    }
    let need = u64::from(batch) * blocks_for(u64::from(isl) + u64::from(osl));
    let fit = model.memory();
    if need > fit.kv_blocks {
        return Err(SimError::DoesNotFit {
            model: model.describe(),
            reason: format!(
                "a batch of {batch} needs {need} KV blocks; the instance holds {}",
                fit.kv_blocks
            ),
        });
    }
    let prompts = vec![PrefillItem::fresh(isl); batch as usize];
    let prefill = model.prefill_time(&prompts);
    let first_step = model.decode_step_time(batch, u64::from(batch) * u64::from(isl + 1));
    let mean_ctx = f64::from(isl) + f64::from(osl) / 2.0;
    let itl = model.decode_step_time(batch, (f64::from(batch) * mean_ctx) as u64);
    let ttft = prefill + first_step;
    let total = ttft + f64::from(osl - 1) * itl;
    let tp = model.tensor_parallel();
    let per_instance = f64::from(batch) / total;
    Ok(StaticEstimate {
        tp,
        batch,
        ttft_ms: ttft * 1e3,
        itl_ms: itl * 1e3,
        prompts_per_s_per_8gpu: per_instance * 8.0 / f64::from(tp),
        tokens_per_s_per_gpu: per_instance * f64::from(osl) / f64::from(tp),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Catalog;
    use crate::roofline::{Efficiency, Roofline};

    fn roof(model: &str, tp: u32) -> Roofline {
        let c = Catalog::builtin().unwrap();
        Roofline::new(
            c.model(model).unwrap(),
            c.gpu("h100").unwrap(),
            tp,
            Efficiency::CALIBRATED,
        )
        .unwrap()
    }

    fn within(got: f64, want: f64, tol: f64) {
        assert!(
            (got / want - 1.0).abs() <= tol,
            "got {got}, published {want}"
        );
    }

    #[test]
    fn llama2_70b_throughput_row_within_20_percent() {
        let e = static_batch(&roof("llama-2-70b", 4), 128, 128, 512).unwrap();
        within(e.ttft_ms, 1516.7, 0.20);
        within(e.itl_ms, 41.6, 0.20);
        within(e.prompts_per_s_per_8gpu, 11.2, 0.20);
    }

    #[test]
    fn llama2_70b_latency_row_within_20_percent() {
        let e = static_batch(&roof("llama-2-70b", 8), 1, 128, 512).unwrap();
        within(e.ttft_ms, 37.3, 0.20);
        within(e.itl_ms, 17.2, 0.20);
        // Published as 0.1 (one digit); the unrounded value from its own TTFT and ITL is 0.113.
        within(e.prompts_per_s_per_8gpu, 0.113, 0.20);
    }

    #[test]
    fn gpt43b_row_within_20_percent_at_tp4_batch16() {
        let e = static_batch(&roof("gpt-43b", 4), 16, 3500, 500).unwrap();
        within(e.ttft_ms, 2606.0, 0.20);
        within(e.itl_ms, 21.4, 0.20);
        within(e.prompts_per_s_per_8gpu, 2.4, 0.20);
    }

    #[test]
    fn gpt43b_static_sizing_answers_13_dgx_give_or_take_one() {
        let models: Vec<std::sync::Arc<dyn PerfModel>> = [1, 2, 4, 8]
            .iter()
            .filter_map(|&tp| Some(std::sync::Arc::new(roof_opt("gpt-43b", tp)?) as _))
            .collect();
        let s = size_static(&models, 3500, 500, 31.0, 3.0, 10.0, 8).unwrap();
        assert!((12..=14).contains(&s.nodes), "{s:?}");
        assert!(s.estimate.ttft_ms <= 3000.0);
    }

    fn roof_opt(model: &str, tp: u32) -> Option<Roofline> {
        let c = Catalog::builtin().unwrap();
        Roofline::new(
            c.model(model).unwrap(),
            c.gpu("h100").unwrap(),
            tp,
            Efficiency::CALIBRATED,
        )
        .ok()
    }

    #[test]
    fn oversized_batch_is_refused() {
        let r = roof("llama-2-70b", 4);
        let err = static_batch(&r, 4096, 3500, 500).unwrap_err();
        assert!(matches!(err, SimError::DoesNotFit { .. }), "{err}");
    }
}

/// The sizing calculator's answer for a rate: the static configuration (tensor parallelism and a
/// power-of-two batch, as the published tables use) with the most prompts/s per GPU whose TTFT and
/// ITL meet the objectives, replicated to the rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StaticSizing {
    pub estimate: StaticEstimate,
    pub instances: u32,
    pub gpus: u32,
    pub nodes: u32,
}

/// Searches tensor parallelism in `tps` and batches 1, 2, 4, ... for the static sizing of `rate`.
/// `None` when no configuration meets the objectives.
pub fn size_static(
    models: &[std::sync::Arc<dyn PerfModel>],
    isl: u32,
    osl: u32,
    rate: f64,
    ttft_s: f64,
    itl_s: f64,
    gpus_per_node: u32,
) -> Option<StaticSizing> {
    let mut best: Option<StaticEstimate> = None;
    for m in models {
        let mut batch = 1u32;
        while batch <= 4096 {
            let Ok(e) = static_batch(m.as_ref(), batch, isl, osl) else {
                break;
            };
            if e.ttft_ms <= ttft_s * 1e3
                && e.itl_ms <= itl_s * 1e3
                && best.is_none_or(|b| e.prompts_per_s_per_8gpu > b.prompts_per_s_per_8gpu)
            {
                best = Some(e);
            }
            batch *= 2;
        }
    }
    let e = best?;
    let per_instance = e.prompts_per_s_per_8gpu * f64::from(e.tp) / 8.0;
    let instances = (rate / per_instance).ceil().max(1.0) as u32;
    let gpus = instances * e.tp;
    Some(StaticSizing {
        estimate: e,
        instances,
        gpus,
        nodes: gpus.div_ceil(gpus_per_node),
    })
}
