use std::path::PathBuf;

/// Errors at the engine's boundary. Callers map them to HTTP or gRPC status in one place
/// (see `EngineError::class`), so every variant says which side is at fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model file not found: {0}")]
    MissingFile(PathBuf),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid model file {path}: {reason}")]
    InvalidModel { path: PathBuf, reason: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("out of KV blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    #[error("KV import: {0}")]
    KvImport(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<tandem_kv_pool::PoolError> for EngineError {
    fn from(e: tandem_kv_pool::PoolError) -> Self {
        use tandem_kv_pool::PoolError;
        match e {
            PoolError::OutOfBlocks { needed, free } => EngineError::OutOfBlocks { needed, free },
            PoolError::Import(s) => EngineError::KvImport(s),
            e @ (PoolError::NotAllocated(_) | PoolError::Memory(_)) => {
                EngineError::InvalidRequest(e.to_string())
            }
        }
    }
}

/// A bounded class for metric labels and status mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The caller sent something wrong (HTTP 400, gRPC INVALID_ARGUMENT).
    InvalidInput,
    /// Capacity is exhausted for now (HTTP 429/503, gRPC RESOURCE_EXHAUSTED).
    Exhausted,
    /// The model or its files are wrong or unsupported (HTTP 500, gRPC FAILED_PRECONDITION).
    Model,
    /// Anything else inside the engine (HTTP 500, gRPC INTERNAL).
    Internal,
}

impl EngineError {
    pub fn class(&self) -> ErrorClass {
        match self {
            EngineError::InvalidRequest(_)
            | EngineError::UnknownSequence(_)
            | EngineError::KvImport(_)
            | EngineError::Tokenizer(_)
            | EngineError::Template(_) => ErrorClass::InvalidInput,
            EngineError::OutOfBlocks { .. } => ErrorClass::Exhausted,
            EngineError::MissingFile(_)
            | EngineError::Io { .. }
            | EngineError::InvalidModel { .. }
            | EngineError::Unsupported(_) => ErrorClass::Model,
            EngineError::Candle(_) => ErrorClass::Internal,
        }
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
