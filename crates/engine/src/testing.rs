//! Where tests find the real model. Shared by unit tests and the integration tests in `tests/`.

use std::path::PathBuf;

pub use tandem_runtime::DEFAULT_MODEL_FILE;

/// `$TANDEM_MODEL` when set, else `<workspace>/models/SmolLM2-135M-Instruct.Q4_1.gguf`.
pub fn model_path() -> PathBuf {
    match std::env::var_os("TANDEM_MODEL") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../models")
            .join(DEFAULT_MODEL_FILE),
    }
}

/// The model path for a test that needs the real model. Panics, failing the test rather than
/// skipping it, when the file is not there, and says how to fetch it.
pub fn require_model_path() -> PathBuf {
    let path = model_path();
    if !path.is_file() {
        panic!(
            "model file {} not found: run scripts/fetch-model.sh (or set TANDEM_MODEL to a GGUF file)",
            path.display()
        );
    }
    path
}
