//! Tandem's gateway: OpenAI-compatible HTTP in front of a [`Backend`].
#![forbid(unsafe_code)]

pub mod backend;

pub use backend::{Backend, BackendError, GenerateRequest, Readiness, TokenChunk, TokenStream};
pub mod disagg;

pub use disagg::{DisaggBackend, DisaggConfig};
