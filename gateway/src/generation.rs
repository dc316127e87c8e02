//! One generation as text: the backend's token stream, detokenized incrementally and cut at stop
//! strings. Streaming and non-streaming responses both read it. It owns the [`TokenStream`], so
//! dropping it (the client left and axum dropped the response body, or a stop string matched)
//! drops the stream and cancels the generation.
use std::time::Instant;

use futures::StreamExt;
use tandem_engine::FinishReason;
use tandem_engine::sampling::StopStrings;
use tandem_engine::tokenizer::{IncrementalDecoder, Tokenizer};

use crate::backend::TokenStream;
use crate::config::AppState;
use crate::error::ApiError;

/// Text that became final, and on the last piece why the generation ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Piece {
    pub(crate) text: String,
    pub(crate) finish: Option<FinishReason>,
}

pub(crate) struct Generation {
    state: AppState,
    /// `None` once the generation ended (or was cut by a stop string): the stream is dropped then.
    tokens: Option<TokenStream>,
    /// `None` after `finish` took it.
    detok: Option<IncrementalDecoder>,
    stops: StopStrings,
    pub(crate) prompt_tokens: usize,
    /// Tokens taken from the backend up to the end or the stop string.
    pub(crate) completion_tokens: usize,
    /// Those tokens' ids.
    pub(crate) token_ids: Vec<u32>,
    arrived: Instant,
    last_token: Option<Instant>,
}

impl Generation {
    /// `arrived` is when the HTTP request came in: latencies are measured from it.
    pub(crate) fn new(
        state: AppState,
        tokens: TokenStream,
        tokenizer: Tokenizer,
        stops: Vec<String>,
        prompt_tokens: usize,
        arrived: Instant,
    ) -> Self {
        state.metrics().enter();
        Generation {
            state,
            tokens: Some(tokens),
            detok: Some(IncrementalDecoder::new(tokenizer, true)),
            stops: StopStrings::new(stops),
            prompt_tokens,
            completion_tokens: 0,
            token_ids: Vec::new(),
            arrived,
            last_token: None,
        }
    }

    /// The next non-empty piece of text, or the last piece (which carries the finish reason and
    /// may be empty); `None` after the last piece or an error.
    pub(crate) async fn next(&mut self) -> Option<Result<Piece, ApiError>> {
        loop {
            let stream = self.tokens.as_mut()?;
            let chunk = match stream.next().await {
                Some(Ok(c)) => c,
                Some(Err(e)) => {
                    self.tokens = None;
                    return Some(Err(e.into()));
                }
                None => {
                    self.tokens = None;
                    return Some(Err(ApiError::internal(
                        "the backend ended the generation without a finish reason",
                    )));
                }
            };
            if !chunk.tokens.is_empty() {
                self.time_tokens();
            }
            let mut text = String::new();
            for &t in &chunk.tokens {
                self.completion_tokens += 1;
                self.token_ids.push(t);
                if self.stops.is_empty() {
                    // No stop string to hold text back for: decode straight into the piece.
                    if let Some(Err(e)) = self.detok.as_mut().map(|d| d.push_into(t, &mut text)) {
                        return Some(Err(self.fail(e.to_string())));
                    }
                    continue;
                }
                let piece = match self.detok.as_mut().map(|d| d.push(t)) {
                    Some(Ok(p)) => p,
                    Some(Err(e)) => return Some(Err(self.fail(e.to_string()))),
                    None => String::new(),
                };
                let (emit, stopped) = self.stops.push(&piece);
                text.push_str(&emit);
                if stopped {
                    // Dropping the stream here cancels whatever the backend would still send.
                    return Some(Ok(self.end(text, FinishReason::Stop)));
                }
            }
            if let Some(finish) = chunk.finish {
                let rest = match self.detok.take().map(IncrementalDecoder::finish) {
                    Some(Ok(r)) => r,
                    Some(Err(e)) => return Some(Err(self.fail(e.to_string()))),
                    None => String::new(),
                };
                let (emit, stopped) = self.stops.push(&rest);
                text.push_str(&emit);
                if !stopped {
                    text.push_str(&self.stops.flush());
                }
                let finish = if stopped { FinishReason::Stop } else { finish };
                return Some(Ok(self.end(text, finish)));
            }
            if !text.is_empty() {
                return Some(Ok(Piece { text, finish: None }));
            }
        }
    }

    fn time_tokens(&mut self) {
        let now = Instant::now();
        let m = self.state.metrics();
        match self.last_token {
            None => m.ttft.observe(now - self.arrived),
            Some(prev) => m.itl.observe(now - prev),
        }
        self.last_token = Some(now);
    }

    fn end(&mut self, text: String, finish: FinishReason) -> Piece {
        self.tokens = None;
        self.state.metrics().e2e.observe(self.arrived.elapsed());
        Piece {
            text,
            finish: Some(finish),
        }
    }

    fn fail(&mut self, why: String) -> ApiError {
        self.tokens = None;
        ApiError::internal(format!("detokenizing the backend's tokens failed: {why}"))
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let m = self.state.metrics();
        m.add_completion_tokens(self.completion_tokens);
        m.leave();
    }
}
