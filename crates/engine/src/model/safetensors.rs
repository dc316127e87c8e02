//! Loading Llama-family checkpoints in the Hugging Face layout: `config.json` and `*.safetensors`
//! (f32, f16 or bf16; computed in f32 on the CPU).
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::gguf::stack_weights;
use super::{HfConfig, Layer, Model, RopeTable};
use crate::kernels::Weight;
use crate::{EngineError, Result};

/// Loads a model from a checkpoint directory.
pub fn load_safetensors(dir: &Path) -> Result<Model> {
    if !dir.exists() {
        return Err(EngineError::MissingFile(dir.to_path_buf()));
    }
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|source| EngineError::Io {
        path: cfg_path.clone(),
        source,
    })?;
    let hf: HfConfig = serde_json::from_str(&text).map_err(|e| EngineError::InvalidModel {
        path: cfg_path.clone(),
        reason: format!("config.json: {e}"),
    })?;
    let name = dir.file_name().map_or_else(
        || dir.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let cfg = hf.to_config(name)?;

    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|source| EngineError::Io {
            path: dir.to_path_buf(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(EngineError::InvalidModel {
            path: dir.to_path_buf(),
            reason: "no *.safetensors file".into(),
        });
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for f in &files {
        let part = candle_core::safetensors::load(f, &Device::Cpu).map_err(|e| {
            EngineError::InvalidModel {
                path: f.clone(),
                reason: format!("not a readable safetensors file: {e}"),
            }
        })?;
        tensors.extend(part);
    }
    let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let t = tensors
            .remove(name)
            .ok_or_else(|| EngineError::InvalidModel {
                path: dir.to_path_buf(),
                reason: format!("tensor {name} is missing"),
            })?;
        if t.dims() != shape {
            return Err(EngineError::InvalidModel {
                path: dir.to_path_buf(),
                reason: format!("tensor {name} has shape {:?}, expected {shape:?}", t.dims()),
            });
        }
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    let (h, f, qw, kvw) = (cfg.hidden, cfg.ffn, cfg.q_width(), cfg.kv_width());
    let embed = Weight::f32(
        cfg.vocab,
        h,
        take("model.embed_tokens.weight", &[cfg.vocab, h])?,
    );
    let mut layers = Vec::with_capacity(cfg.layers);
    for i in 0..cfg.layers {
        let p = |s: &str| format!("model.layers.{i}.{s}.weight");
        let q = Weight::f32(qw, h, take(&p("self_attn.q_proj"), &[qw, h])?);
        let k = Weight::f32(kvw, h, take(&p("self_attn.k_proj"), &[kvw, h])?);
        let v = Weight::f32(kvw, h, take(&p("self_attn.v_proj"), &[kvw, h])?);
        let gate = Weight::f32(f, h, take(&p("mlp.gate_proj"), &[f, h])?);
        let up = Weight::f32(f, h, take(&p("mlp.up_proj"), &[f, h])?);
        layers.push(Layer {
            attn_norm: take(&p("input_layernorm"), &[h])?,
            wqkv: stack_weights(&[q, k, v])?,
            wo: Weight::f32(h, qw, take(&p("self_attn.o_proj"), &[h, qw])?),
            ffn_norm: take(&p("post_attention_layernorm"), &[h])?,
            w_gate_up: stack_weights(&[gate, up])?,
            w_down: Weight::f32(h, f, take(&p("mlp.down_proj"), &[h, f])?),
        });
    }
    let norm = take("model.norm.weight", &[h])?;
    let lm_head = if hf.tie_word_embeddings {
        None
    } else {
        Some(Weight::f32(
            cfg.vocab,
            h,
            take("lm_head.weight", &[cfg.vocab, h])?,
        ))
    };
    let rope = RopeTable::new(cfg.head_dim, cfg.rope_base, cfg.max_context, None);
    Model::new(cfg, embed, layers, norm, lm_head, rope)
}
