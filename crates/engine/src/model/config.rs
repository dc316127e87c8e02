use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

/// What the forward pass needs to know about a Llama-family model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub name: String,
    pub hidden: usize,
    pub ffn: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub max_context: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// GGUF Llama tensors rotate adjacent pairs; Hugging Face checkpoints rotate halves.
    pub rope_interleaved: bool,
}

impl ModelConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |why: String| Err(EngineError::Unsupported(why));
        if self.layers == 0
            || self.hidden == 0
            || self.heads == 0
            || self.kv_heads == 0
            || self.vocab == 0
        {
            return bad(format!("empty dimension in {self:?}"));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} heads are not a multiple of {} KV heads",
                self.heads, self.kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("odd head dimension {}", self.head_dim));
        }
        Ok(())
    }

    pub fn q_width(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// KV bytes per token in the f32 cache.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.layers * 2 * self.kv_width() * 4
    }
}

/// Hugging Face `config.json` of a Llama-family checkpoint (the fields we use).
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub vocab_size: usize,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f32,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
}

fn default_ctx() -> usize {
    4096
}
fn default_eps() -> f32 {
    1e-6
}
fn default_theta() -> f32 {
    10_000.0
}

impl HfConfig {
    pub fn to_config(&self, name: String) -> Result<ModelConfig> {
        let arch_ok = self
            .model_type
            .as_deref()
            .is_none_or(|t| t == "llama" || t == "mistral")
            && self
                .architectures
                .iter()
                .all(|a| a == "LlamaForCausalLM" || a == "MistralForCausalLM");
        if !arch_ok {
            return Err(EngineError::Unsupported(format!(
                "architecture {:?} / model_type {:?}: only Llama-family checkpoints are supported",
                self.architectures, self.model_type
            )));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(EngineError::Unsupported(
                "rope_scaling is not supported yet".into(),
            ));
        }
        let cfg = ModelConfig {
            name,
            hidden: self.hidden_size,
            ffn: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            vocab: self.vocab_size,
            max_context: self.max_position_embeddings,
            rms_eps: self.rms_norm_eps,
            rope_base: self.rope_theta,
            rope_interleaved: false,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Cosine and sine of every position's rotary angles, computed once in f64.
#[derive(Debug, Clone)]
pub struct RopeTable {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_dim: usize, base: f32, positions: usize, freq_factors: Option<&[f32]>) -> Self {
        let half = head_dim / 2;
        let inv: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / (base as f64).powf(2.0 * i as f64 / head_dim as f64);
                f / freq_factors
                    .and_then(|ff| ff.get(i))
                    .map_or(1.0, |x| *x as f64)
            })
            .collect();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    pub fn positions(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    pub fn at(&self, pos: usize) -> (&[f32], &[f32]) {
        let r = pos * self.half..(pos + 1) * self.half;
        (&self.cos[r.clone()], &self.sin[r])
    }
}
