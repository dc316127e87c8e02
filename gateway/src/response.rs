//! The JSON shapes of OpenAI responses: whole bodies and streamed chunks.
use serde_json::{Value, json};
use tandem_engine::FinishReason;

use crate::request::Kind;

/// A text chunk's JSON with a hole for the text (see [`Meta::text_chunk_template`]).
#[derive(Debug, Clone)]
pub(crate) struct TextChunkTemplate {
    before: String,
    after: String,
}

impl TextChunkTemplate {
    /// The same JSON as `meta.text_chunk(text).to_string()`.
    #[cfg(test)]
    pub(crate) fn render(&self, text: &str) -> String {
        let mut out = Vec::with_capacity(self.before.len() + text.len() + 8 + self.after.len());
        self.write(text, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    fn write(&self, text: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(self.before.as_bytes());
        // Serializing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text);
        out.extend_from_slice(self.after.as_bytes());
    }

    /// The SSE event of that JSON (`data: <json>\n\n`), built in one buffer.
    pub(crate) fn render_event(&self, text: &str) -> bytes::Bytes {
        let mut out = Vec::with_capacity(self.before.len() + text.len() + 16 + self.after.len());
        out.extend_from_slice(b"data: ");
        self.write(text, &mut out);
        out.extend_from_slice(b"\n\n");
        bytes::Bytes::from(out)
    }
}

/// What every response and chunk of one request repeats.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub(crate) kind: Kind,
    pub(crate) id: String,
    pub(crate) created: u64,
    pub(crate) model: String,
    /// `stream_options.include_usage`: chunks carry `"usage": null`, and a usage chunk ends.
    pub(crate) include_usage: bool,
}

pub(crate) fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

pub(crate) fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

impl Meta {
    fn chunk_object(&self) -> &'static str {
        match self.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion => "text_completion",
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.chunk_object(),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The first chat chunk: the assistant's role, no text yet.
    pub(crate) fn role_chunk(&self) -> Value {
        self.chunk(json!([{
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": null,
            "finish_reason": null,
        }]))
    }

    /// A chunk of generated text.
    pub(crate) fn text_chunk(&self, text: &str) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "delta": {"content": text},
                "logprobs": null,
                "finish_reason": null,
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": null,
            }),
        };
        self.chunk(json!([choice]))
    }

    /// The chunk that ends the choice: no text, the finish reason.
    pub(crate) fn finish_chunk(&self, finish: FinishReason) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "delta": {},
                "logprobs": null,
                "finish_reason": finish_str(finish),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": "",
                "logprobs": null,
                "finish_reason": finish_str(finish),
            }),
        };
        self.chunk(json!([choice]))
    }

    /// The JSON of [`Meta::text_chunk`] around its text: everything before the text's JSON string
    /// and everything after it. Built once per streamed request, so that each text chunk is the
    /// escaped text between two copies, not a `Value` tree built, serialized and dropped: that
    /// was a quarter of the gateway's CPU at zero compute time.
    pub(crate) fn text_chunk_template(&self) -> TextChunkTemplate {
        // A marker no text piece can hold; its JSON form is searched for in the serialized chunk.
        const MARK: &str = "\u{0}tandem-text\u{0}";
        let whole = self.text_chunk(MARK).to_string();
        let mark = Value::from(MARK).to_string();
        let (before, after) = whole
            .split_once(&mark)
            .map_or((whole.as_str(), ""), |(b, a)| (b, a));
        TextChunkTemplate {
            before: before.to_owned(),
            after: after.to_owned(),
        }
    }

    /// With `include_usage`, the last chunk before `[DONE]`: no choices, the usage.
    pub(crate) fn usage_chunk(&self, prompt: usize, completion: usize) -> Value {
        let mut v = self.chunk(json!([]));
        v["usage"] = usage(prompt, completion);
        v
    }

    /// The whole (non-streamed) response body.
    pub(crate) fn body(
        &self,
        text: &str,
        finish: FinishReason,
        prompt: usize,
        completion: usize,
    ) -> Value {
        let (object, choice) = match self.kind {
            Kind::Chat => (
                "chat.completion",
                json!({
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": null,
                    "finish_reason": finish_str(finish),
                }),
            ),
            Kind::Completion => (
                "text_completion",
                json!({
                    "index": 0,
                    "text": text,
                    "logprobs": null,
                    "finish_reason": finish_str(finish),
                }),
            ),
        };
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(prompt, completion),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_template_renders_the_same_json_as_the_value() {
        for kind in [Kind::Chat, Kind::Completion] {
            for include_usage in [false, true] {
                let meta = Meta {
                    kind,
                    id: "cmpl-\"x\"".into(),
                    created: 17,
                    model: "m/é".into(),
                    include_usage,
                };
                let t = meta.text_chunk_template();
                for text in [
                    "",
                    "plain",
                    "q\"uo\\te\n",
                    "é中🙂",
                    "\u{0}\u{1f}",
                    "tandem-text",
                ] {
                    assert_eq!(
                        t.render(text),
                        meta.text_chunk(text).to_string(),
                        "{text:?}"
                    );
                    let event = format!("data: {}\n\n", meta.text_chunk(text));
                    assert_eq!(&t.render_event(text)[..], event.as_bytes(), "{text:?}");
                }
            }
        }
    }
}
