//! The crate's one error type: what stops a benchmark as a whole. A failed request is not an
//! error here; it is counted in the report under its [`ErrorClass`](crate::ErrorClass).

use std::path::PathBuf;

/// Why `run_bench` could not produce a report.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The flags do not describe a runnable benchmark.
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// No `--model` was given and the endpoint's model list gave none.
    #[error("cannot find a model to ask for (pass --model): {0}")]
    NoModel(String),
    /// An output file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The report could not be encoded as JSON.
    #[error("cannot encode the report: {0}")]
    Json(#[from] serde_json::Error),
    /// A task of the load generator died (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}
