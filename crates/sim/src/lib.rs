#![forbid(unsafe_code)]

pub mod catalog;
pub mod des;
pub mod error;
pub mod evaluate;
pub mod perf;
pub mod profile;
pub mod rng;
pub mod roofline;
pub mod stats;
pub mod workload;

pub use error::SimError;
