//! The seam between the OpenAI HTTP layer and the serving path behind it.
//!
//! The HTTP layer validates, templates and tokenizes a request, then hands token ids to a
//! [`Backend`]; it gets back a stream of token ids that it detokenizes and writes as SSE or as one
//! JSON body. The disaggregated backend (router, prefill and decode workers) and the in-process
//! backend both implement this trait, so the HTTP layer is the same for both.
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use futures::future::BoxFuture;
use tandem_engine::sampling::{FinishReason, SamplingParams};

pub use crate::budget::Budget;

/// One generation, already tokenized.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The gateway's request id (the `id` of the OpenAI response, e.g. "chatcmpl-...").
    pub request_id: String,
    /// The served model's name as the client asked for it.
    pub model: String,
    /// Prompt token ids after the chat template; not empty.
    pub prompt_tokens: Vec<u32>,
    /// Sampling; `max_tokens` is always set (at least 1). Stop strings are enforced by the HTTP
    /// layer while it detokenizes (it drops the stream when one matches); the backend may ignore
    /// `stop`.
    pub sampling: SamplingParams,
    /// Latency budgets and priority, for admission.
    pub budget: Budget,
}

/// A generation that admission let in: its tokens and what was predicted for it.
pub struct Admitted {
    pub tokens: TokenStream,
    /// The time to first token predicted at admission, from the backend's receipt of the request.
    pub predicted_ttft: Option<Duration>,
}

/// Tokens generated since the previous chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChunk {
    /// New token ids, in order.
    pub tokens: Vec<u32>,
    /// Set on the last chunk only: why the sequence ended (EOS or stop id: `Stop`; max_tokens or
    /// the context: `Length`).
    pub finish: Option<FinishReason>,
}

/// The tokens of one generation. The stream ends after the chunk that carries a finish reason, or
/// with an error. Dropping it before the end cancels the generation and frees everything it held
/// (queued work, KV reservations) on every worker involved.
pub type TokenStream = Pin<Box<dyn Stream<Item = Result<TokenChunk, BackendError>> + Send>>;

/// Why a generation could not start or could not go on. Each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackendError {
    /// The request is invalid for this backend (400).
    #[error("{0}")]
    Invalid(String),
    /// Prompt plus max_tokens do not fit the model's context (400, code `context_length_exceeded`).
    #[error("{0}")]
    ContextLength(String),
    /// Every worker that could take the request is saturated (429, with Retry-After).
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after: Option<Duration>,
    },
    /// Admission refused the request: it cannot meet its budget, or the queue is full (429 with
    /// `code` naming why, and Retry-After when a wait would help).
    #[error("{message}")]
    Rejected {
        code: &'static str,
        message: String,
        retry_after: Option<Duration>,
        predicted_ttft: Option<Duration>,
    },
    /// No ready worker of a role the request needs, or a worker failed beyond retry (503).
    #[error("{0}")]
    Unavailable(String),
    /// A leg missed its deadline (504).
    #[error("{0}")]
    Timeout(String),
    /// Anything else; a bug or an unexpected worker answer (500).
    #[error("{0}")]
    Internal(String),
}

/// Whether the backend can take requests now, for `GET /ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub ready: bool,
    /// Why not, or a summary of what is up (e.g. "1 prefill, 1 decode worker ready").
    pub detail: String,
}

/// Where the HTTP layer sends tokenized requests.
pub trait Backend: Send + Sync + 'static {
    /// Starts a generation. Resolves once the request is placed and accepted (errors that make it
    /// impossible come back here, before any token); the stream then yields its tokens.
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<TokenStream, BackendError>>;
    /// [`Backend::generate`], with what admission predicted (backends without admission predict
    /// nothing).
    fn generate_admitted(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<Admitted, BackendError>> {
        let started = self.generate(req);
        Box::pin(async move {
            Ok(Admitted {
                tokens: started.await?,
                predicted_ttft: None,
            })
        })
    }
    /// Whether requests can be served now.
    fn readiness(&self) -> Readiness;
    /// Appends the backend's own metrics (Prometheus text) to `/metrics`.
    fn render_metrics(&self, _out: &mut String) {}
}
