//! What every Tandem process shares: where the default model lives, logging set-up, shutdown.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

/// File name of the default model, as `scripts/fetch-model.sh` extracts it.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The model to use when none is named: `$TANDEM_MODEL`, else `models/<default>` in the current
/// directory or the nearest parent that has one (so commands work from anywhere in a checkout).
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TANDEM_MODEL").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let rel = Path::new("models").join(DEFAULT_MODEL_FILE);
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let p = dir.join(&rel);
            if p.exists() {
                return p;
            }
        }
    }
    rel
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info` for our crates, `warn` for the rest).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,tandem=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolves on Ctrl-C or SIGTERM, whichever comes first, so that every process stops cleanly
/// under a terminal and under a supervisor alike.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
