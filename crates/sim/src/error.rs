use std::path::PathBuf;

/// Errors at the simulator's boundary: bad names, bad numbers, unreadable files, and workloads that
/// no configuration can serve.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("unknown model {name:?}; known models: {known}")]
    UnknownModel { name: String, known: String },
    #[error("unknown GPU {name:?}; known GPUs: {known}")]
    UnknownGpu { name: String, known: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("{model} does not fit: {reason}")]
    DoesNotFit { model: String, reason: String },
    #[error("no configuration meets the objectives; the binding objective is {binding}: {detail}")]
    Infeasible { binding: String, detail: String },
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {what}: {source}")]
    Parse {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("profile: {0}")]
    Profile(String),
}

impl SimError {
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        SimError::InvalidInput(msg.into())
    }
}
