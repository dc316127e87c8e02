//! The `native` engine: a Llama-family model with a paged KV cache, its tokenizer and its sampler.
#![forbid(unsafe_code)]

pub mod error;
pub mod testing;
pub mod tokenizer;

pub use error::{EngineError, ErrorClass, Result};
