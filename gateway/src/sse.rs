//! The streamed response: a [`Generation`] turned into OpenAI's SSE chunk sequence.
//!
//! Order: (chat only) a role chunk; one chunk per piece of text; a chunk with the finish reason;
//! with `include_usage` a chunk with empty `choices` and the usage; then `data: [DONE]`. An error
//! after the stream started is one `data: {"error": ...}` event, and the stream ends there.
//!
//! Each event is `data: <json>\n\n`, written here rather than through axum's `Event` (which
//! copies the data once more, looking for line breaks to split it at): compact JSON has none.
use std::convert::Infallible;

use bytes::{BufMut, Bytes, BytesMut};
use futures::Stream;

use crate::generation::Generation;
use crate::request::Kind;
use crate::response::{Meta, TextChunkTemplate};

enum Phase {
    Role,
    Text,
    Usage,
    Done,
    Ended,
}

struct SseState {
    meta: Meta,
    text: TextChunkTemplate,
    generation: Generation,
    phase: Phase,
    /// Events ready to go out before the generation is read again.
    queued: Vec<Bytes>,
}

/// One SSE event whose data is `payload`, which holds no line break.
pub(crate) fn data_event(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(payload.len() + 8);
    b.put_slice(b"data: ");
    b.put_slice(payload);
    b.put_slice(b"\n\n");
    b.freeze()
}

fn event(v: &serde_json::Value) -> Bytes {
    data_event(v.to_string().as_bytes())
}

impl SseState {
    async fn next_event(&mut self) -> Option<Bytes> {
        loop {
            if !self.queued.is_empty() {
                return Some(self.queued.remove(0));
            }
            match self.phase {
                Phase::Role => {
                    self.phase = Phase::Text;
                    if self.meta.kind == Kind::Chat {
                        return Some(event(&self.meta.role_chunk()));
                    }
                }
                Phase::Text => match self.generation.next().await {
                    Some(Ok(piece)) => {
                        if !piece.text.is_empty() {
                            self.queued.push(self.text.render_event(&piece.text));
                        }
                        if let Some(f) = piece.finish {
                            self.queued.push(event(&self.meta.finish_chunk(f)));
                            self.phase = if self.meta.include_usage {
                                Phase::Usage
                            } else {
                                Phase::Done
                            };
                        }
                    }
                    Some(Err(e)) => {
                        self.phase = Phase::Ended;
                        return Some(event(&e.body()));
                    }
                    None => {
                        // `next` returns None only after the last piece or an error, both of
                        // which leave this phase; reaching here is a bug, so end cleanly.
                        self.phase = Phase::Ended;
                    }
                },
                Phase::Usage => {
                    self.phase = Phase::Done;
                    let g = &self.generation;
                    return Some(event(
                        &self.meta.usage_chunk(g.prompt_tokens, g.completion_tokens),
                    ));
                }
                Phase::Done => {
                    self.phase = Phase::Ended;
                    return Some(data_event(b"[DONE]"));
                }
                Phase::Ended => return None,
            }
        }
    }
}

/// The SSE events of a generation. The stream owns the generation (and so the backend's token
/// stream): when axum drops the body because the client went away, the generation is cancelled.
pub(crate) fn events(
    meta: Meta,
    generation: Generation,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let state = SseState {
        text: meta.text_chunk_template(),
        meta,
        generation,
        phase: Phase::Role,
        queued: Vec::new(),
    };
    futures::stream::unfold(state, |mut st| async move {
        let ev = st.next_event().await?;
        Some((Ok(ev), st))
    })
}
