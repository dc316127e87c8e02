#![forbid(unsafe_code)]

pub mod catalog;
pub mod cli;
pub mod des;
pub mod error;
pub mod evaluate;
pub mod peak;
pub mod perf;
pub mod planner;
pub mod profile;
pub mod report;
pub mod rng;
pub mod roofline;
pub mod stats;
pub mod svg;
pub mod workload;

pub use error::SimError;

pub use cli::{PlanArgs, parse_duration, run_plan};
