//! What the gateway serves ([`GatewayConfig`]) and the state its handlers share ([`AppState`]).
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tandem_engine::EngineError;
use tandem_engine::model::{GgufFile, HfConfig};
use tandem_engine::tokenizer::Tokenizer;

use crate::backend::{Backend, Budget};
use crate::error::GatewayError;
use crate::metrics::Metrics;

/// Largest request body by default: room for a prompt far beyond any context we serve.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// The gateway's configuration: one served model, its tokenizer and the backend that runs it.
#[derive(Clone)]
pub struct GatewayConfig {
    /// The model name clients must send in `model` (and that `/v1/models` lists).
    pub model_name: String,
    /// The served model's tokenizer (chat template, EOS ids, detokenization).
    pub tokenizer: Tokenizer,
    /// The model's context length in tokens: prompt plus completion must fit in it.
    pub max_context: usize,
    /// `max_tokens` for a request that sets none; `None` means the rest of the context. Always
    /// capped by the room the prompt leaves.
    pub default_max_tokens: Option<u32>,
    /// Largest request body accepted (larger ones get a 413).
    pub max_body_bytes: usize,
    /// Budgets and priority of a request that sends no `x-tandem-*` header (`--ttft-budget`,
    /// `--itl-budget`).
    pub default_budget: Budget,
    /// Where tokenized requests go.
    pub backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("model_name", &self.model_name)
            .field("max_context", &self.max_context)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

impl GatewayConfig {
    /// A configuration with the defaults for everything else.
    pub fn new(
        model_name: impl Into<String>,
        tokenizer: Tokenizer,
        max_context: usize,
        backend: Arc<dyn Backend>,
    ) -> Self {
        GatewayConfig {
            model_name: model_name.into(),
            tokenizer,
            max_context,
            default_max_tokens: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            default_budget: Budget::default(),
            backend,
        }
    }

    /// Reads the tokenizer and the context length from a model path (a GGUF file or a
    /// safetensors directory) without loading its weights.
    pub fn from_model_path(
        model_name: impl Into<String>,
        path: &Path,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, GatewayError> {
        let tokenizer = tandem_engine::load_tokenizer(path)?;
        let max_context = model_max_context(path)?;
        Ok(Self::new(model_name, tokenizer, max_context, backend))
    }
}

/// The context length a model declares: GGUF `<arch>.context_length`, or `max_position_embeddings`
/// of a checkpoint's `config.json`. Cheap: only metadata is read.
pub fn model_max_context(path: &Path) -> Result<usize, GatewayError> {
    if !path.is_dir() {
        return Ok(GgufFile::open(path)?.config()?.max_context);
    }
    let cfg_path = path.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| EngineError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let hf: HfConfig = serde_json::from_str(&text).map_err(|e| EngineError::InvalidModel {
        path: cfg_path,
        reason: format!("config.json: {e}"),
    })?;
    Ok(hf.to_config(String::new())?.max_context)
}

/// What every handler reads: the configuration and the metrics. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: GatewayConfig,
    pub(crate) metrics: Metrics,
    /// Unix seconds when the gateway started: the `created` of the model in `/v1/models`.
    pub(crate) started: u64,
}

impl AppState {
    /// Checks the configuration and builds the shared state.
    pub fn new(config: GatewayConfig) -> Result<Self, GatewayError> {
        if config.model_name.trim().is_empty() {
            return Err(GatewayError::Config(
                "the served model name is empty".into(),
            ));
        }
        if config.max_context < 2 {
            return Err(GatewayError::Config(format!(
                "a context of {} tokens cannot hold a prompt and a completion",
                config.max_context
            )));
        }
        Ok(AppState {
            inner: Arc::new(Inner {
                config,
                metrics: Metrics::default(),
                started: unix_now(),
            }),
        })
    }

    /// The configuration it was built from.
    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    /// The gateway's metrics (what `/metrics` renders).
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
