#![forbid(unsafe_code)]

pub mod catalog;
pub mod error;
pub mod evaluate;
pub mod perf;
pub mod rng;
pub mod roofline;

pub use error::SimError;
