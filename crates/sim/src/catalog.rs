//! Model and GPU descriptions, from the data files in `crates/sim/catalog/` (embedded at build
//! time) plus, optionally, a user's JSON file with the same shape (`{"models": [...], "gpus": [...]}`),
//! whose entries add to or replace the built-in ones by name.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::SimError;

const MODELS: &str = include_str!("../catalog/models.json");
const GPUS: &str = include_str!("../catalog/gpus.json");

/// A decoder-only transformer's shape: all the roofline needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub note: Option<String>,
    pub layers: u32,
    pub hidden: u32,
    pub heads: u32,
    pub kv_heads: u32,
    /// Per-head dimension; `hidden / heads` when absent.
    #[serde(default)]
    pub head_dim: Option<u32>,
    pub ffn: u32,
    pub vocab: u32,
    /// SwiGLU-style FFN with three matrices (Llama) rather than two (GPT).
    pub gated_ffn: bool,
    pub tied_embeddings: bool,
    /// Weight and KV dtype, a key of the GPU's `flops` table (`bf16`, `fp16`, `fp8`).
    pub dtype: String,
    pub max_context: u32,
}

impl ModelSpec {
    pub fn head_dim(&self) -> u32 {
        self.head_dim.unwrap_or(self.hidden / self.heads.max(1))
    }

    pub fn dtype_bytes(&self) -> f64 {
        match self.dtype.as_str() {
            "fp8" | "int8" => 1.0,
            "fp32" => 4.0,
            _ => 2.0,
        }
    }

    /// Parameters in the transformer blocks (what every token multiplies through).
    pub fn block_params(&self) -> f64 {
        let h = f64::from(self.hidden);
        let q = f64::from(self.heads * self.head_dim());
        let kv = f64::from(self.kv_heads * self.head_dim());
        let attn = h * (q + 2.0 * kv) + q * h;
        let mats = if self.gated_ffn { 3.0 } else { 2.0 };
        let mlp = mats * h * f64::from(self.ffn);
        f64::from(self.layers) * (attn + mlp)
    }

    pub fn embedding_params(&self) -> f64 {
        let e = f64::from(self.vocab) * f64::from(self.hidden);
        if self.tied_embeddings { e } else { 2.0 * e }
    }

    pub fn params(&self) -> f64 {
        self.block_params() + self.embedding_params()
    }

    pub fn weight_bytes(&self) -> f64 {
        self.params() * self.dtype_bytes()
    }

    /// K and V for one token across all layers and KV heads.
    pub fn kv_bytes_per_token(&self) -> u64 {
        let per =
            2.0 * f64::from(self.layers * self.kv_heads * self.head_dim()) * self.dtype_bytes();
        per as u64
    }

    fn validate(&self) -> Result<(), SimError> {
        let zero = [
            self.layers,
            self.hidden,
            self.heads,
            self.kv_heads,
            self.ffn,
            self.vocab,
        ];
        if zero.contains(&0) || self.max_context == 0 {
            return Err(SimError::invalid(format!(
                "model {}: layers, hidden, heads, kv_heads, ffn, vocab and max_context must be positive",
                self.name
            )));
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(SimError::invalid(format!(
                "model {}: heads ({}) must be a multiple of kv_heads ({})",
                self.name, self.heads, self.kv_heads
            )));
        }
        Ok(())
    }
}

/// An accelerator: peak dense FLOP/s per dtype, memory bandwidth and size, and the per-direction
/// bandwidth of the link that tensor parallelism all-reduces over (NVLink, or PCIe without it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuSpec {
    pub name: String,
    #[serde(default)]
    pub aliases: Vec<String>,
    #[serde(default)]
    pub note: Option<String>,
    pub flops: BTreeMap<String, f64>,
    pub mem_bw: f64,
    pub mem_bytes: f64,
    pub link_bw: f64,
    pub gpus_per_node: u32,
}

impl GpuSpec {
    pub fn flops_for(&self, dtype: &str) -> Result<f64, SimError> {
        self.flops.get(dtype).copied().ok_or_else(|| {
            SimError::invalid(format!(
                "GPU {} has no {dtype} throughput in the catalogue",
                self.name
            ))
        })
    }

    fn validate(&self) -> Result<(), SimError> {
        let ok = self.mem_bw > 0.0 && self.mem_bytes > 0.0 && self.link_bw > 0.0;
        if !ok || self.gpus_per_node == 0 || self.flops.values().any(|f| *f <= 0.0) {
            return Err(SimError::invalid(format!(
                "GPU {}: flops, mem_bw, mem_bytes, link_bw and gpus_per_node must be positive",
                self.name
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Default, Deserialize)]
struct CatalogFile {
    #[serde(default)]
    models: Vec<ModelSpec>,
    #[serde(default)]
    gpus: Vec<GpuSpec>,
}

/// The models and GPUs the simulator knows by name.
#[derive(Debug, Clone)]
pub struct Catalog {
    models: Vec<ModelSpec>,
    gpus: Vec<GpuSpec>,
}

impl Catalog {
    /// The built-in catalogue.
    pub fn builtin() -> Result<Self, SimError> {
        let mut c = Catalog {
            models: Vec::new(),
            gpus: Vec::new(),
        };
        c.merge_str(MODELS, "built-in models")?;
        c.merge_str(GPUS, "built-in GPUs")?;
        Ok(c)
    }

    /// The built-in catalogue extended (or overridden by name) with a user's file.
    pub fn with_user_file(path: Option<&Path>) -> Result<Self, SimError> {
        let mut c = Self::builtin()?;
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            c.merge_str(&text, &path.display().to_string())?;
        }
        Ok(c)
    }

    /// Adds the entries of a catalogue document; an entry replaces a known one of the same name.
    pub fn merge_str(&mut self, text: &str, what: &str) -> Result<(), SimError> {
        let file: CatalogFile = serde_json::from_str(text).map_err(|source| SimError::Parse {
            what: what.to_string(),
            source,
        })?;
        for m in file.models {
            m.validate()?;
            self.models.retain(|k| k.name != m.name);
            self.models.push(m);
        }
        for g in file.gpus {
            g.validate()?;
            self.gpus.retain(|k| k.name != g.name);
            self.gpus.push(g);
        }
        Ok(())
    }

    pub fn model(&self, name: &str) -> Result<&ModelSpec, SimError> {
        let key = name.to_ascii_lowercase();
        self.models
            .iter()
            .find(|m| m.name == key || m.aliases.contains(&key))
            .ok_or_else(|| SimError::UnknownModel {
                name: name.to_string(),
                known: self
                    .models
                    .iter()
                    .map(|m| m.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn gpu(&self, name: &str) -> Result<&GpuSpec, SimError> {
        let key = name.to_ascii_lowercase();
        self.gpus
            .iter()
            .find(|g| g.name == key || g.aliases.contains(&key))
            .ok_or_else(|| SimError::UnknownGpu {
                name: name.to_string(),
                known: self
                    .gpus
                    .iter()
                    .map(|g| g.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    pub fn models(&self) -> &[ModelSpec] {
        &self.models
    }

    pub fn gpus(&self) -> &[GpuSpec] {
        &self.gpus
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_shapes_give_published_sizes() {
        let c = Catalog::builtin().unwrap();
        let l70 = c.model("llama-2-70b").unwrap();
        assert_eq!(l70.kv_bytes_per_token(), 327_680);
        assert!(
            (l70.params() / 1e9 - 68.98).abs() < 0.05,
            "{}",
            l70.params()
        );
        let l7 = c.model("llama-2-7b").unwrap();
        assert!((l7.params() / 1e9 - 6.74).abs() < 0.01, "{}", l7.params());
        let l3 = c.model("llama-3-8b").unwrap();
        assert!((l3.params() / 1e9 - 8.03).abs() < 0.01, "{}", l3.params());
        let smol = c.model("SmolLM2").unwrap();
        assert!(
            (smol.params() / 1e6 - 134.5).abs() < 1.0,
            "{}",
            smol.params()
        );
        let g43 = c.model("gpt-43b").unwrap();
        assert!(
            (g43.params() / 1e9 - 42.85).abs() < 0.05,
            "{}",
            g43.params()
        );
        assert_eq!(c.gpu("h100").unwrap().name, "h100-sxm");
        assert_eq!(c.gpu("h100").unwrap().flops_for("bf16").unwrap(), 989e12);
        assert_eq!(c.gpus().len(), 4);
        assert_eq!(c.models().len(), 7);
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let c = Catalog::builtin().unwrap();
        let e = c.model("llama-9-1t").unwrap_err().to_string();
        assert!(
            e.contains("unknown model \"llama-9-1t\"") && e.contains("llama-2-70b"),
            "{e}"
        );
        let e = c.gpu("tpu-v9").unwrap_err().to_string();
        assert!(
            e.contains("unknown GPU \"tpu-v9\"") && e.contains("h100-sxm"),
            "{e}"
        );
    }

    #[test]
    fn user_entries_extend_and_replace() {
        let mut c = Catalog::builtin().unwrap();
        let doc = r#"{"gpus": [{"name": "h100-sxm", "flops": {"bf16": 1e15}, "mem_bw": 3e12,
            "mem_bytes": 80e9, "link_bw": 450e9, "gpus_per_node": 8},
            {"name": "b200", "flops": {"bf16": 2.25e15}, "mem_bw": 8e12, "mem_bytes": 192e9,
            "link_bw": 900e9, "gpus_per_node": 8}]}"#;
        c.merge_str(doc, "test").unwrap();
        assert_eq!(c.gpu("b200").unwrap().mem_bytes, 192e9);
        assert_eq!(c.gpu("h100-sxm").unwrap().mem_bw, 3e12);
        assert_eq!(c.gpus().len(), 5);
        let bad = r#"{"models": [{"name": "x", "layers": 0, "hidden": 1, "heads": 1, "kv_heads": 1,
            "ffn": 1, "vocab": 1, "gated_ffn": true, "tied_embeddings": true, "dtype": "bf16",
            "max_context": 1}]}"#;
        assert!(matches!(
            c.merge_str(bad, "t"),
            Err(SimError::InvalidInput(_))
        ));
    }
}
