//! The fields of `/v1/chat/completions` and `/v1/completions` bodies, read and checked for type
//! and range. Checks that need the tokenizer or the model (context length) are in `prepare`.
use serde_json::Value;
use tandem_engine::tokenizer::ChatMessage;

use crate::error::ApiError;
use crate::fields::{Fields, parse_object, wrong_type};

/// Most stop strings a request may carry (OpenAI's limit).
pub(crate) const MAX_STOPS: usize = 4;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

/// What to generate from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Input {
    Messages(Vec<ChatMessage>),
    Text(String),
    Tokens(Vec<u32>),
}

/// The request fields both endpoints share, checked for range.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Parsed {
    pub(crate) model: String,
    pub(crate) input: Input,
    /// `max_completion_tokens`, else `max_tokens`; at least 1 when set.
    pub(crate) max_tokens: Option<u64>,
    pub(crate) temperature: f32,
    pub(crate) top_p: f32,
    pub(crate) top_k: u32,
    pub(crate) seed: Option<u64>,
    pub(crate) stop: Vec<String>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    pub(crate) ignore_eos: bool,
    /// vLLM's extension: non-streamed answers carry `prompt_token_ids` and each choice's
    /// `token_ids` (what the equivalence tests compare).
    pub(crate) return_token_ids: bool,
}

pub(crate) fn parse(kind: Kind, body: &[u8]) -> Result<Parsed, ApiError> {
    let map = parse_object(body)?;
    let f = Fields(&map);
    let model = f
        .string("model")?
        .ok_or_else(|| {
            ApiError::invalid_param("model", "You must provide a model parameter ('model').")
        })?
        .to_owned();
    let input = match kind {
        Kind::Chat => Input::Messages(messages(&f)?),
        Kind::Completion => prompt(&f)?,
    };
    if let Some(n) = f.int("n")?
        && n != 1
    {
        return Err(ApiError::invalid_param(
            "n",
            format!(
                "n = {n} is not supported: this server returns exactly one choice per request (n = 1)."
            ),
        ));
    }
    // `max_completion_tokens` replaced `max_tokens` in OpenAI's API; the newer name wins.
    let (max_key, max) = match f.int("max_completion_tokens")? {
        Some(m) => ("max_completion_tokens", Some(m)),
        None => ("max_tokens", f.int("max_tokens")?),
    };
    let max_tokens = match max {
        Some(m) if m < 1 => {
            return Err(ApiError::invalid_param(
                max_key,
                format!("{max_key} must be at least 1, got {m}."),
            ));
        }
        Some(m) => Some(m as u64),
        None => None,
    };
    let temperature = f.number("temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid_param(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}."),
        ));
    }
    let top_p = f.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid_param(
            "top_p",
            format!("top_p must be greater than 0 and at most 1, got {top_p}."),
        ));
    }
    // -1 is how vLLM and others spell "no top-k"; we take it too.
    let top_k = match f.int("top_k")? {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => u32::try_from(k).unwrap_or(u32::MAX),
        Some(k) => {
            return Err(ApiError::invalid_param(
                "top_k",
                format!("top_k must be -1 (no limit) or at least 0, got {k}."),
            ));
        }
    };
    // A negative seed is a valid 64-bit seed too: keep its bits.
    let seed = f.int("seed")?.map(|s| s as u64);
    let stop = f.strings("stop")?.unwrap_or_default();
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid_param(
            "stop",
            format!(
                "stop may hold at most {MAX_STOPS} strings, got {}.",
                stop.len()
            ),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            "stop strings must not be empty.",
        ));
    }
    let stream = f.bool("stream")?.unwrap_or(false);
    let include_usage = match f.object("stream_options")? {
        None => false,
        Some(_) if !stream => {
            return Err(ApiError::invalid_param(
                "stream_options",
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            ));
        }
        Some(opts) => opts.bool("include_usage")?.unwrap_or(false),
    };
    let ignore_eos = f.bool("ignore_eos")?.unwrap_or(false);
    let return_token_ids = f.bool("return_token_ids")?.unwrap_or(false);
    f.string("user")?;
    Ok(Parsed {
        model,
        input,
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        seed,
        stop,
        stream,
        include_usage,
        ignore_eos,
        return_token_ids,
    })
}

fn messages(f: &Fields<'_>) -> Result<Vec<ChatMessage>, ApiError> {
    let items = match f.get("messages") {
        None => {
            return Err(ApiError::invalid_param(
                "messages",
                "You must provide messages ('messages').",
            ));
        }
        Some(Value::Array(items)) => items,
        Some(v) => return Err(wrong_type("messages", "an array", v)),
    };
    if items.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "'messages' must contain at least one message.",
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| message(i, item))
        .collect()
}

fn message(i: usize, item: &Value) -> Result<ChatMessage, ApiError> {
    let at = format!("messages[{i}]");
    let Value::Object(m) = item else {
        return Err(wrong_type(&at, "an object", item));
    };
    let f = Fields(m);
    let role = match f.get("role") {
        Some(Value::String(r)) => r.as_str(),
        Some(v) => return Err(wrong_type(&format!("{at}.role"), "a string", v)),
        None => {
            return Err(ApiError::invalid_param(
                &format!("{at}.role"),
                format!("Missing required parameter: '{at}.role'."),
            ));
        }
    };
    // Chat templates know `system`; OpenAI's newer `developer` role means the same.
    let role = match role {
        "developer" => "system",
        "system" | "user" | "assistant" | "tool" => role,
        other => {
            return Err(ApiError::invalid_param(
                &format!("{at}.role"),
                format!(
                    "Invalid value for '{at}.role': '{other}'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'."
                ),
            ));
        }
    };
    let content = match f.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => text_parts(&at, parts)?,
        Some(v) => {
            return Err(wrong_type(
                &format!("{at}.content"),
                "a string or an array of content parts",
                v,
            ));
        }
        // An assistant turn that only called tools has no content.
        None if role == "assistant" => String::new(),
        None => {
            return Err(ApiError::invalid_param(
                &format!("{at}.content"),
                format!("Missing required parameter: '{at}.content'."),
            ));
        }
    };
    Ok(ChatMessage::new(role, content))
}

/// Joins `{type: "text", text}` parts with newlines (as vLLM does); other part types are refused.
fn text_parts(at: &str, parts: &[Value]) -> Result<String, ApiError> {
    let mut texts = Vec::with_capacity(parts.len());
    for (j, part) in parts.iter().enumerate() {
        let p = format!("{at}.content[{j}]");
        let Value::Object(m) = part else {
            return Err(wrong_type(&p, "an object", part));
        };
        let f = Fields(m);
        match f.string("type")? {
            Some("text") => {}
            Some(other) => {
                return Err(ApiError::invalid_param(
                    &format!("{p}.type"),
                    format!(
                        "Content parts of type '{other}' are not supported; only 'text' parts are."
                    ),
                ));
            }
            None => {
                return Err(ApiError::invalid_param(
                    &format!("{p}.type"),
                    format!("Missing required parameter: '{p}.type'."),
                ));
            }
        }
        match f.get("text") {
            Some(Value::String(t)) => texts.push(t.as_str()),
            Some(v) => return Err(wrong_type(&format!("{p}.text"), "a string", v)),
            None => {
                return Err(ApiError::invalid_param(
                    &format!("{p}.text"),
                    format!("Missing required parameter: '{p}.text'."),
                ));
            }
        }
    }
    Ok(texts.join("\n"))
}

/// `prompt`: a string, an array of one string, an array of token ids, or an array of one array
/// of token ids. Batches of prompts are refused (one choice per request).
fn prompt(f: &Fields<'_>) -> Result<Input, ApiError> {
    let expected = "a string, an array of one string, or an array of token ids";
    let batch = || {
        ApiError::invalid_param(
            "prompt",
            "Batched prompts are not supported: send one prompt per request.",
        )
    };
    let input = match f.get("prompt") {
        None => {
            return Err(ApiError::invalid_param(
                "prompt",
                "You must provide a prompt ('prompt').",
            ));
        }
        Some(Value::String(s)) => Input::Text(s.clone()),
        Some(Value::Array(items)) => match items.as_slice() {
            [] => Input::Text(String::new()),
            [Value::String(s)] => Input::Text(s.clone()),
            [Value::Array(ids)] => Input::Tokens(token_ids(ids)?),
            [Value::Number(_), ..] => Input::Tokens(token_ids(items)?),
            [Value::String(_) | Value::Array(_), _, ..] => return Err(batch()),
            [other, ..] => return Err(wrong_type("prompt[0]", expected, other)),
        },
        Some(v) => return Err(wrong_type("prompt", expected, v)),
    };
    let empty = match &input {
        Input::Text(t) => t.is_empty(),
        Input::Tokens(t) => t.is_empty(),
        Input::Messages(m) => m.is_empty(),
    };
    if empty {
        return Err(ApiError::invalid_param(
            "prompt",
            "The prompt must not be empty.",
        ));
    }
    Ok(input)
}

fn token_ids(items: &[Value]) -> Result<Vec<u32>, ApiError> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    ApiError::invalid_param(
                        "prompt",
                        format!(
                            "prompt[{i}] must be a token id (an integer from 0 to 4294967295)."
                        ),
                    )
                })
        })
        .collect()
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
