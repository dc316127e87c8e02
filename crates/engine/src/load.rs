//! Opening a model by path: a GGUF file (weights, configuration and tokenizer in one file) or a
//! safetensors checkpoint directory (`config.json`, `*.safetensors`, `tokenizer.json`).
use std::path::Path;

use crate::model::{GgufFile, Model, load_safetensors};
use crate::tokenizer::Tokenizer;
use crate::{EngineError, Result};

#[derive(Debug)]
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
}

pub fn load(path: &Path) -> Result<Loaded> {
    if !path.exists() {
        return Err(EngineError::MissingFile(path.to_path_buf()));
    }
    if path.is_dir() {
        let model = load_safetensors(path)?;
        let tokenizer = load_tokenizer(path)?;
        return Ok(Loaded { model, tokenizer });
    }
    let mut file = GgufFile::open(path)?;
    let model = file.model()?;
    let tokenizer = Tokenizer::from_gguf(file.metadata())?;
    Ok(Loaded { model, tokenizer })
}

/// Only the tokenizer (cheap: a GGUF's metadata, not its weights).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        let cfg = path.join("tokenizer_config.json");
        return Tokenizer::from_files(
            &path.join("tokenizer.json"),
            cfg.exists().then_some(cfg.as_path()),
        );
    }
    Tokenizer::from_gguf(GgufFile::open(path)?.metadata())
}
