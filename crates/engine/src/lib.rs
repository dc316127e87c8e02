//! The `native` engine: a Llama-family model with a paged KV cache, its tokenizer and its sampler.
//!
//! Layers: [`kernels`] (fixed-order CPU kernels), [`model`] (configuration, loading, forward pass),
//! [`kv`] (block allocator and KV pool), [`engine`] (sequences and steps: what workers call),
//! [`logits`] and [`sampling`], [`sequence`] (a generating sequence's next token and end, and the
//! cut of a step among prompts), [`generate`] (the single-process reference loop), [`tokenizer`] (tokenizer, chat
//! template, incremental detokenizer), [`load`] (a model and its tokenizer by path), and [`tiny`]
//! (a random model for tests). [`model::SimModel`] is the `sim` engine's model: compute replaced by
//! a performance model's time over the same pool and engine.
#![forbid(unsafe_code)]

pub mod engine;
pub mod error;
pub mod generate;
pub mod kernels;
pub mod kv;
pub mod load;
pub mod logits;
pub mod model;
pub mod sampling;
pub mod sequence;
pub mod testing;
pub mod tiny;
pub mod tokenizer;

pub use engine::{Engine, SeqId, StepItem};
pub use error::{EngineError, ErrorClass, Result};
pub use generate::{Flow, Generated, generate};
pub use load::{Loaded, load, load_tokenizer};
pub use logits::{Logits, Peaks};
pub use model::{Model, ModelConfig, SimConfig, SimModel, StepClock, ZeroClock};
pub use sampling::{FinishReason, SamplingParams};
pub use sequence::{Pending, Sequence, plan_chunks};
