//! Tandem's gateway: OpenAI-compatible HTTP in front of a [`Backend`].
//!
//! [`serve`] (or [`router`], to embed it) takes an [`AppState`] built from a [`GatewayConfig`]:
//! the served model's name, tokenizer and context, and the backend that generates. Requests are
//! validated and tokenized here; the backend gets token ids and streams token ids back, which are
//! detokenized incrementally, cut at stop strings, and written as SSE or one JSON body.
//! [`LocalBackend`] runs the model in this process, one request at a time.
#![forbid(unsafe_code)]

pub mod backend;
pub mod budget;
pub mod config;
pub mod disagg;
pub mod error;
pub mod local;
pub mod metrics;

mod failover;
mod fields;
mod generation;
mod handlers;
mod ids;
mod prepare;
mod request;
mod response;
mod retry;
mod server;
mod sse;
mod watchdog;

#[cfg(test)]
mod tests;

pub use backend::{
    Admitted, Backend, BackendError, Budget, GenerateRequest, Readiness, TokenChunk, TokenStream,
};
pub use config::{AppState, GatewayConfig, model_max_context};
pub use disagg::{DisaggBackend, DisaggConfig};
pub use error::{ApiError, GatewayError};
pub use local::LocalBackend;
pub use server::{router, serve};
