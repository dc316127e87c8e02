//! The JSON inside the stream: `chat.completion.chunk` and `text_completion` chunks, and the
//! non-streaming bodies. Only the fields the metrics need are read; everything else is skipped.

use std::borrow::Cow;

use serde::Deserialize;

use crate::record::Usage;

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    choices: Vec<Choice<'a>>,
    #[serde(default)]
    usage: Option<Usage>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default, borrow)]
    delta: Option<Message<'a>>,
    #[serde(default, borrow)]
    message: Option<Message<'a>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    /// Reasoning models stream their thinking here; those are output tokens too.
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
}

/// What one event or body held.
#[derive(Debug, PartialEq)]
pub struct Parsed<'a> {
    /// Output text, when non-empty.
    pub content: Option<Cow<'a, str>>,
    pub usage: Option<Usage>,
}

/// One stream event's data. `Ok(None)` for `[DONE]`.
pub fn parse_event(data: &[u8]) -> Result<Option<Parsed<'_>>, String> {
    if data.trim_ascii() == b"[DONE]" {
        return Ok(None);
    }
    parse_body(data).map(Some)
}

/// A chunk or a whole non-streaming answer (chat `message` or completions `text`).
pub fn parse_body(data: &[u8]) -> Result<Parsed<'_>, String> {
    let chunk: Chunk<'_> = serde_json::from_slice(data).map_err(|e| {
        let head = String::from_utf8_lossy(&data[..data.len().min(120)]).into_owned();
        format!("malformed chunk ({e}): {head}")
    })?;
    if let Some(err) = chunk.error {
        return Err(format!("error event: {err}"));
    }
    let mut content: Option<Cow<'_, str>> = None;
    for choice in chunk.choices {
        let parts = [choice.delta, choice.message]
            .into_iter()
            .flatten()
            .flat_map(|m| [m.reasoning_content, m.content])
            .chain([choice.text])
            .flatten()
            .filter(|s| !s.is_empty());
        for part in parts {
            content = Some(match content {
                None => part,
                Some(prev) => Cow::Owned(prev.into_owned() + &part),
            });
        }
    }
    Ok(Parsed {
        content,
        usage: chunk.usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_chat_and_completion_chunks() {
        let chat = br#"{"id":"x","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"Hi"},"logprobs":null,"finish_reason":null}]}"#;
        let p = parse_event(chat).expect("valid").expect("not done");
        assert_eq!(p.content.as_deref(), Some("Hi"));
        assert_eq!(p.usage, None);

        let text = br#"{"object":"text_completion","choices":[{"index":0,"text":" there","finish_reason":null}]}"#;
        let p = parse_event(text).expect("valid").expect("not done");
        assert_eq!(p.content.as_deref(), Some(" there"));

        let role_only = br#"{"choices":[{"delta":{"role":"assistant","content":""}}]}"#;
        assert_eq!(
            parse_event(role_only).expect("valid").expect("x").content,
            None
        );

        let usage = br#"{"choices":[],"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17}}"#;
        let p = parse_event(usage).expect("valid").expect("not done");
        assert_eq!(
            p.usage,
            Some(Usage {
                prompt_tokens: 12,
                completion_tokens: 5
            })
        );
        assert_eq!(parse_event(b" [DONE] "), Ok(None));
    }

    #[test]
    fn reads_escaped_and_non_streaming_bodies() {
        let esc = br#"{"choices":[{"delta":{"content":"a\"b\n"}}]}"#;
        let p = parse_event(esc).expect("valid").expect("x");
        assert_eq!(p.content.as_deref(), Some("a\"b\n"));
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"all of it"}}],"usage":{"prompt_tokens":3,"completion_tokens":3}}"#;
        let p = parse_body(body).expect("valid");
        assert_eq!(p.content.as_deref(), Some("all of it"));
        assert_eq!(p.usage.map(|u| u.completion_tokens), Some(3));
    }

    #[test]
    fn rejects_malformed_and_error_events() {
        assert!(parse_event(b"{\"choices\": [ {oops").is_err());
        assert!(parse_event(b"not json").is_err());
        let err = parse_event(br#"{"error":{"message":"boom","code":500}}"#);
        assert!(err.is_err_and(|e| e.contains("boom")));
    }
}
