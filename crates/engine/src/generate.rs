//! Single-process generation: prefill a prompt, then decode one token at a time. `tandem generate`
//! runs this, and it is the reference a disaggregated run must equal.
use std::time::{Duration, Instant};

use crate::engine::{Engine, SeqId, StepItem};
use crate::sampling::{FinishReason, SamplingParams};
use crate::sequence::Sequence;
use crate::{EngineError, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Whether to go on after a token: `on_token` answers `Stop` when a stop string was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Generates from `prompt` on sequence `id` (which must not exist yet; it is released at the end).
pub fn generate(
    engine: &mut Engine,
    id: SeqId,
    prompt: &[u32],
    params: &SamplingParams,
    eos: &[u32],
    prefill_chunk: usize,
    mut on_token: impl FnMut(u32) -> Flow,
) -> Result<Generated> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(EngineError::InvalidRequest("the prompt is empty".into()));
    }
    let ctx = engine.model().config().max_context;
    if prompt.len() >= ctx {
        return Err(EngineError::InvalidRequest(format!(
            "the prompt has {} tokens; the model's context is {ctx}",
            prompt.len()
        )));
    }
    engine.add_sequence(id)?;
    let out = run(
        engine,
        id,
        prompt,
        params,
        eos,
        prefill_chunk,
        &mut on_token,
    );
    let released = engine.release(id);
    let out = out?;
    released?;
    Ok(out)
}

fn run(
    engine: &mut Engine,
    id: SeqId,
    prompt: &[u32],
    params: &SamplingParams,
    eos: &[u32],
    prefill_chunk: usize,
    on_token: &mut impl FnMut(u32) -> Flow,
) -> Result<Generated> {
    let ctx = engine.model().config().max_context;
    let t0 = Instant::now();
    let logits = engine.prefill(&[(id, prompt)], prefill_chunk)?;
    let mut seq = Sequence::new(params.clone(), prompt.len(), 0, ctx);
    let (mut token, mut ends) = seq.next(&logits[0], eos);
    let prefill_time = t0.elapsed();
    let t1 = Instant::now();
    let mut tokens = vec![token];
    let finish = loop {
        let flow = on_token(token);
        // A stop token, then the caller's stop (a stop string), then the budget or the context.
        match (ends, flow) {
            (Some(FinishReason::Stop), _) | (_, Flow::Stop) => break FinishReason::Stop,
            (Some(f), Flow::Continue) => break f,
            (None, Flow::Continue) => {}
        }
        let logits = engine.step(&[StepItem {
            seq: id,
            tokens: &[token],
            logits: true,
        }])?;
        (token, ends) = seq.next(&logits[0], eos);
        tokens.push(token);
    };
    Ok(Generated {
        tokens,
        finish,
        prompt_tokens: prompt.len(),
        prefill_time,
        decode_time: t1.elapsed(),
    })
}
