//! From a parsed request to what the backend gets: the chat template, tokenization, the context
//! check and the sampling parameters. Tokenization mirrors `tandem generate` exactly, so the same
//! prompt gives the same ids through the gateway as through the CLI.
use tandem_engine::SamplingParams;
use tandem_engine::tokenizer::Tokenizer;

use crate::error::ApiError;
use crate::ids::random_u64;
use crate::request::{Input, Parsed};

/// A request ready for the backend.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Prepared {
    pub(crate) prompt_tokens: Vec<u32>,
    pub(crate) sampling: SamplingParams,
}

/// Templates and tokenizes `req`, checks it against the context and fills in the sampling
/// parameters. `default_max_tokens` applies when the request sets none.
pub(crate) fn prepare(
    tok: &Tokenizer,
    max_context: usize,
    default_max_tokens: Option<u32>,
    req: &Parsed,
) -> Result<Prepared, ApiError> {
    let prompt_tokens = match &req.input {
        // Like `tandem generate --chat`: render, then encode with special tokens parsed, so the
        // template's `<|im_start|>` markers become their ids.
        Input::Messages(msgs) => {
            let text = tok
                .chat_template()
                .render(msgs, true)
                .map_err(|e| ApiError::invalid_param("messages", e.to_string()))?;
            encode(tok, &text)?
        }
        // Like `tandem generate` without --chat: the same encode call (BOS added when the model
        // asks for it; special-token text parsed, as vLLM does for raw prompts).
        Input::Text(text) => encode(tok, text)?,
        Input::Tokens(ids) => {
            let vocab = tok.vocab_size();
            if let Some((i, id)) = ids
                .iter()
                .enumerate()
                .find(|(_, id)| **id as usize >= vocab)
            {
                return Err(ApiError::invalid_param(
                    "prompt",
                    format!("prompt[{i}] = {id} is outside the vocabulary of {vocab} tokens."),
                ));
            }
            ids.clone()
        }
    };
    if prompt_tokens.is_empty() {
        return Err(ApiError::invalid_param(
            "prompt",
            "The prompt is empty after tokenization.",
        ));
    }
    let n = prompt_tokens.len();
    if n >= max_context {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {max_context} tokens. However, your prompt has {n} tokens, which leaves no room for a completion. Please reduce the length of the prompt."
        ))
        .with_param(param_of(&req.input)));
    }
    let room = (max_context - n) as u64;
    let max_tokens = match req.max_tokens {
        Some(m) if m > room => {
            return Err(ApiError::context_length(format!(
                "This model's maximum context length is {max_context} tokens. However, you requested {} tokens ({n} in the prompt, {m} for the completion). Please reduce the length of the prompt or the completion.",
                n as u64 + m
            ))
            .with_param("max_tokens"));
        }
        Some(m) => m,
        None => default_max_tokens.map_or(room, |d| u64::from(d).min(room)),
    };
    let mut sampling = SamplingParams {
        temperature: req.temperature,
        top_k: req.top_k,
        top_p: req.top_p,
        seed: 0,
        max_tokens: u32::try_from(max_tokens).unwrap_or(u32::MAX),
        // The backend sees only these parameters: EOS ids go in as stop ids, which is what
        // `tandem generate` does by passing them as `eos` to the engine.
        stop_token_ids: if req.ignore_eos {
            Vec::new()
        } else {
            tok.eos_token_ids().to_vec()
        },
        stop: req.stop.clone(),
        ignore_eos: req.ignore_eos,
    };
    // Greedy decoding ignores the seed; a sampled request without one gets a fresh one, so two
    // such requests do not return the same text.
    if !sampling.is_greedy() {
        sampling.seed = req.seed.unwrap_or_else(random_u64);
    } else if let Some(s) = req.seed {
        sampling.seed = s;
    }
    Ok(Prepared {
        prompt_tokens,
        sampling,
    })
}

fn encode(tok: &Tokenizer, text: &str) -> Result<Vec<u32>, ApiError> {
    tok.encode(text, true)
        .map_err(|e| ApiError::internal(format!("tokenizing the prompt failed: {e}")))
}

fn param_of(input: &Input) -> &'static str {
    match input {
        Input::Messages(_) => "messages",
        Input::Text(_) | Input::Tokens(_) => "prompt",
    }
}
