//! What every command that runs the native engine does first: size the compute pool and load the
//! model (the named one, or the fetched default).
use std::path::PathBuf;

use anyhow::Context;

/// Sizes rayon's global pool to `threads` (default: all cores).
pub fn compute_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up compute threads")?;
    }
    Ok(())
}

/// Threads of a process's async runtime: `$TANDEM_ASYNC_THREADS`, else half the cores, at least
/// one and at most two. Every process of a cluster has its own runtime beside its compute threads;
/// on two cores, a second runtime thread in each of them mostly hands tasks across threads (with
/// everything on one 2-core machine, one thread each streamed 5-20% more tokens per second at 64
/// streams, at no cost to time to first token below saturation).
pub fn async_threads() -> usize {
    std::env::var("TANDEM_ASYNC_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            (cores / 2).clamp(1, 2)
        })
}

/// Loads `model`, or the default model when none is named; returns the path it loaded too.
pub fn load_model(model: Option<&PathBuf>) -> anyhow::Result<(PathBuf, tandem_engine::Loaded)> {
    let path = model
        .cloned()
        .unwrap_or_else(tandem_runtime::default_model_path);
    let loaded = tandem_engine::load(&path).with_context(|| {
        format!(
            "loading {} (fetch the default model with scripts/fetch-model.sh)",
            path.display()
        )
    })?;
    Ok((path, loaded))
}
