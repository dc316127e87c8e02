//! Predicted time to first token and inter-token latency of a request on a candidate, from the
//! role's [`StepModel`], the candidate's load and the recent measured/predicted ratios.
//!
//! Disaggregated: TTFT is the prefill worker's queue ahead of the prompt at its step budget (FCFS,
//! chunked as the batcher chunks) plus the prompt's own steps, plus the KV transfer time measured to
//! be left exposed after the overlap. The first token comes from the prefill worker, so the decode
//! worker's next step is not part of it: it is the second token's wait, inside the ITL. ITL is the
//! decode worker's step for the batch and context it will have once this sequence and those
//! already reserved on it (placed but still prefilling) have joined. Aggregated: the prompt's steps
//! also carry the worker's decode batch, and the decode steps carry prompt chunks while prompts wait.

use super::calibrate::RegimeRatios;
use super::model::{MAX_CHUNKS, StepModel};
use crate::perf::{PrefillItem, StepShape};

/// A worker that computes prompts: a prefill worker, or an aggregated one.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PrefillLoad {
    /// Prompt tokens ahead of a new prompt (queued, or in the running step).
    pub queued_tokens: u64,
    /// Most prompt tokens in one step (for an aggregated worker: before its decode tokens).
    pub step_tokens: u32,
    /// Aggregated only: the decode batch every step also carries, and its context.
    pub decode_batch: u32,
    pub decode_context: u64,
}

/// A worker that decodes: a decode worker, or an aggregated one.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct DecodeLoad {
    /// Sequences running or reserved to join (placements not yet reported included).
    pub batch: u32,
    /// Tokens those sequences attend to, summed.
    pub context: u64,
    /// Aggregated only: prompt tokens each step carries while prompts wait.
    pub prefill_tokens_per_step: u32,
    /// The tightest ITL budget among the sequences it runs or has reserved, seconds.
    pub tightest_itl: Option<f64>,
}

/// Which path a request would take.
#[derive(Debug, Clone, Copy)]
pub enum Candidate<'a> {
    Disaggregated {
        prefill: &'a PrefillLoad,
        decode: &'a DecodeLoad,
    },
    Aggregated {
        prefill: &'a PrefillLoad,
        decode: &'a DecodeLoad,
    },
}

/// A request's predicted latencies on one candidate, seconds. `*_bound` is the high quantile
/// admission tests; `*_idle_bound` the same on an idle candidate (a budget below it can never be
/// met, so no wait helps). The ITL fields are 0 while no decode step has been measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    pub ttft: f64,
    pub ttft_bound: f64,
    pub ttft_idle_bound: f64,
    pub itl: f64,
    pub itl_bound: f64,
    pub itl_idle_bound: f64,
    /// The TTFT before calibration, which measured TTFTs are later divided by.
    pub ttft_raw: f64,
    /// The ITL before calibration.
    pub itl_raw: f64,
    /// The load regime it was predicted in ([`super::calibrate::regime`]), whose ratios the
    /// measurement joins.
    pub regime: u8,
}

/// Settings of the predictor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PredictorConfig {
    /// The measured/predicted quantile admission bounds a prediction with.
    pub quantile: f64,
    /// The bound's factor until enough requests have been measured.
    pub default_margin: f64,
}

impl Default for PredictorConfig {
    fn default() -> Self {
        PredictorConfig {
            quantile: 0.99,
            default_margin: 1.25,
        }
    }
}

/// Everything admission predicts one served model with. A plain struct: the router's task owns it.
#[derive(Debug, Clone)]
pub struct Predictor {
    pub prefill: StepModel,
    pub decode: StepModel,
    pub aggregated: StepModel,
    /// Measured over predicted TTFT (before calibration) of recent admitted requests, per load
    /// regime (a regime busier than any measured extrapolates the tail).
    pub ttft: RegimeRatios,
    /// Measured mean inter-token latency over predicted ITL, per load regime.
    pub itl: RegimeRatios,
    /// Seconds of KV transfer left exposed per prompt token (moving average of measurements).
    exposed_per_token: f64,
    /// Moving averages of prompt lengths and output budgets asked for.
    mean_prompt: f64,
    mean_new_tokens: f64,
}

impl Predictor {
    pub fn new(
        prefill: StepModel,
        decode: StepModel,
        aggregated: StepModel,
        cfg: PredictorConfig,
    ) -> Self {
        Predictor {
            prefill,
            decode,
            aggregated,
            ttft: RegimeRatios::new(cfg.quantile, cfg.default_margin, true),
            itl: RegimeRatios::new(cfg.quantile, cfg.default_margin, false),
            exposed_per_token: 0.0,
            mean_prompt: 0.0,
            mean_new_tokens: 0.0,
        }
    }

    /// Starts the calibration as a router's whose requests measured what was predicted: the
    /// simulator's steps are its model's own, so only queueing is left to learn (a cold router's
    /// default margin would refuse what a warm one admits). Made-up pairs would not do: their
    /// scale is not the requests', and a line through both puts one of them far off it.
    pub fn assume_calibrated(&mut self) {
        self.ttft.assume_exact();
        self.itl.assume_exact();
    }

    /// Seconds of exposed KV transfer per prompt token now assumed.
    pub fn exposed_per_token(&self) -> f64 {
        self.exposed_per_token
    }

    /// Notes the shape of a request asked for (its prompt sizes the queue's chunks).
    pub fn note_ask(&mut self, prompt_tokens: u32, max_new_tokens: u32) {
        ewma(&mut self.mean_prompt, f64::from(prompt_tokens), 0.05);
        ewma(&mut self.mean_new_tokens, f64::from(max_new_tokens), 0.05);
    }

    /// Records what an admitted request measured against what was predicted for it.
    pub fn observe(&mut self, fb: &Feedback) {
        self.ttft
            .observe(fb.regime, fb.predicted_ttft_raw, fb.measured_ttft);
        if let Some(measured) = fb.measured_itl {
            self.itl.observe(fb.regime, fb.predicted_itl_raw, measured);
        }
        if let Some(exposed) = fb.exposed_transfer
            && fb.prompt_tokens > 0
            && exposed.is_finite()
            && exposed >= 0.0
        {
            ewma(
                &mut self.exposed_per_token,
                exposed / f64::from(fb.prompt_tokens),
                0.1,
            );
        }
    }

    /// The model of the role that computes the prompt on `c`.
    fn prompt_model(&self, c: &Candidate<'_>) -> &StepModel {
        match c {
            Candidate::Disaggregated { .. } => &self.prefill,
            Candidate::Aggregated { .. } => &self.aggregated,
        }
    }

    /// Seconds until the prompt's last chunk is computed on `p`, or `None` while the model cannot
    /// predict.
    pub fn prefill_time(&self, model: &StepModel, p: &PrefillLoad, prompt: u32) -> Option<f64> {
        let budget = p.step_tokens.saturating_sub(p.decode_batch).max(1);
        let mean = if self.mean_prompt >= 1.0 {
            self.mean_prompt
        } else {
            f64::from(prompt)
        };
        let total = p.queued_tokens.saturating_add(u64::from(prompt));
        let full = total / u64::from(budget);
        let rem = (total % u64::from(budget)) as u32;
        let mut t = 0.0;
        if full > 0 {
            let mut chunks = [PrefillItem::fresh(0); MAX_CHUNKS];
            let n = queue_chunks(&mut chunks, budget, mean);
            t += full as f64 * model.step_time(&step(&chunks[..n], p))?;
        }
        if rem > 0 {
            // The last step: what is left of the queue, then the prompt's last part.
            let own = rem.min(prompt);
            let mut chunks = [PrefillItem::fresh(0); MAX_CHUNKS];
            let n = queue_chunks(&mut chunks[..MAX_CHUNKS - 1], rem - own, mean);
            chunks[n] = PrefillItem {
                new_tokens: own,
                cached_tokens: prompt - own,
            };
            t += model.step_time(&step(&chunks[..=n], p))?;
        }
        Some(t)
    }

    /// Seconds of one decode step on `d` once a sequence with this prompt has joined.
    pub fn decode_step(&self, model: &StepModel, d: &DecodeLoad, prompt: u32) -> Option<f64> {
        let mut chunks = [PrefillItem::fresh(0); MAX_CHUNKS];
        let n = if d.prefill_tokens_per_step > 0 {
            let mean = self.mean_prompt.max(f64::from(prompt));
            queue_chunks(&mut chunks, d.prefill_tokens_per_step, mean)
        } else {
            0
        };
        model.step_time(&StepShape {
            prefill: &chunks[..n],
            decode_batch: d.batch.saturating_add(1),
            decode_context: d.context.saturating_add(u64::from(prompt) + 1),
        })
    }

    /// Predicts a request on a candidate, calibrated by the ratios of load `regime`; `None` while
    /// the model of the role that computes the prompt cannot predict yet.
    pub fn predict(&self, c: &Candidate<'_>, prompt_tokens: u32, regime: u8) -> Option<Prediction> {
        let (p, d) = match c {
            Candidate::Disaggregated { prefill, decode } => (*prefill, *decode),
            Candidate::Aggregated { prefill, decode } => (*prefill, *decode),
        };
        let pm = self.prompt_model(c);
        let dm = match c {
            Candidate::Disaggregated { .. } => &self.decode,
            Candidate::Aggregated { .. } => &self.aggregated,
        };
        let exposed = match c {
            Candidate::Disaggregated { .. } => self.exposed_per_token * f64::from(prompt_tokens),
            Candidate::Aggregated { .. } => 0.0,
        };
        let ttft_raw = self.prefill_time(pm, p, prompt_tokens)? + exposed;
        let idle = PrefillLoad {
            queued_tokens: 0,
            decode_batch: 0,
            decode_context: 0,
            ..*p
        };
        let ttft_idle_raw = self.prefill_time(pm, &idle, prompt_tokens)? + exposed;
        // A decode model that cannot predict yet (no decode step measured) leaves ITL unchecked
        // (0) rather than the whole request unpredicted.
        let itl_raw = self.decode_step(dm, d, prompt_tokens).unwrap_or(0.0);
        let itl_idle_raw = self
            .decode_step(dm, &DecodeLoad::default(), prompt_tokens)
            .unwrap_or(0.0);
        let (t, i) = (&self.ttft, &self.itl);
        // An ITL left unchecked stays 0, tail or not.
        let itl_bound = |g: u8, raw: f64| {
            if raw > 0.0 { i.bound(g, raw) } else { 0.0 }
        };
        Some(Prediction {
            ttft: t.median(regime, ttft_raw),
            ttft_bound: t.bound(regime, ttft_raw),
            // An idle candidate: what the quietest regime bounds.
            ttft_idle_bound: t.bound(0, ttft_idle_raw),
            itl: i.median(regime, itl_raw),
            itl_bound: itl_bound(regime, itl_raw),
            itl_idle_bound: itl_bound(0, itl_idle_raw),
            ttft_raw,
            itl_raw,
            regime,
        })
    }

    /// Prompt tokens `p` computes in `elapsed` seconds while it has a full queue: what to take off
    /// a queue length reported `elapsed` ago.
    pub fn drained(&self, model: &StepModel, p: &PrefillLoad, elapsed: f64) -> u64 {
        let budget = p.step_tokens.saturating_sub(p.decode_batch).max(1);
        let mean = self.mean_prompt.max(1.0);
        let mut chunks = [PrefillItem::fresh(0); MAX_CHUNKS];
        let n = queue_chunks(&mut chunks, budget, mean);
        match model.step_time(&step(&chunks[..n], p)) {
            Some(t) if t > 0.0 && elapsed > 0.0 => (elapsed / t * f64::from(budget)) as u64,
            _ => 0,
        }
    }

    /// Seconds until a decode worker with this batch is predicted to finish one of its sequences
    /// (each lives about half its output budget), for a Retry-After.
    pub fn decode_drain(&self, pred: &Prediction, d: &DecodeLoad) -> f64 {
        let life_steps = (self.mean_new_tokens / 2.0).max(1.0);
        pred.itl * life_steps / f64::from(d.batch.max(1))
    }
}

/// What one admitted request measured, for the predictor's ratios.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Feedback {
    pub prompt_tokens: u32,
    pub predicted_ttft_raw: f64,
    /// 0 when this report carries only the ITL (a stream reports its TTFT at its first token).
    pub measured_ttft: f64,
    pub predicted_itl_raw: f64,
    /// Mean time per output token after the first; `None` for fewer than two tokens.
    pub measured_itl: Option<f64>,
    /// KV transfer left exposed after the prefill's compute (disaggregated only).
    pub exposed_transfer: Option<f64>,
    /// [`Prediction::regime`] of its placement.
    pub regime: u8,
}

fn ewma(v: &mut f64, x: f64, alpha: f64) {
    if !x.is_finite() {
        return;
    }
    *v = if *v == 0.0 { x } else { *v + alpha * (x - *v) };
}

fn step<'a>(chunks: &'a [PrefillItem], p: &PrefillLoad) -> StepShape<'a> {
    StepShape {
        prefill: chunks,
        decode_batch: p.decode_batch,
        decode_context: p.decode_context,
    }
}

/// Fills `out` with a step of `tokens` queued prompt tokens made of prompts of `mean` tokens (the
/// last ones merged when there are more than `out` holds; a prompt longer than the step is one
/// chunk halfway through it). Returns the chunks used.
fn queue_chunks(out: &mut [PrefillItem], tokens: u32, mean: f64) -> usize {
    if tokens == 0 || out.is_empty() {
        return 0;
    }
    let len = mean.round().max(1.0);
    if len >= f64::from(tokens) {
        out[0] = PrefillItem {
            new_tokens: tokens,
            cached_tokens: ((len - f64::from(tokens)) / 2.0) as u32,
        };
        return 1;
    }
    let len = len as u32;
    let pieces = ((tokens / len) as usize).min(out.len());
    let size = tokens / pieces as u32;
    for c in out.iter_mut().take(pieces) {
        *c = PrefillItem::fresh(size);
    }
    let left = tokens - size * pieces as u32;
    out[pieces - 1].new_tokens += left;
    pieces
}

#[cfg(test)]
#[path = "predict_tests.rs"]
mod tests;
