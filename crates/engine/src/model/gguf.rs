//! Loading Llama-family models from GGUF files.
use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};

use super::{Layer, Model, ModelConfig, RopeTable};
use crate::kernels::{BlockFormat, Weight};
use crate::{EngineError, Result};

/// A GGUF file opened for reading: its header and metadata, and the file for tensor data.
pub struct GgufFile {
    path: PathBuf,
    file: File,
    len: u64,
    pub content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(EngineError::MissingFile(path.to_path_buf()));
        }
        let io = |source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let content = Content::read(&mut file).map_err(|e| EngineError::InvalidModel {
            path: path.to_path_buf(),
            reason: format!("not a readable GGUF file: {e}"),
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            file,
            len,
            content,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    fn invalid(&self, reason: String) -> EngineError {
        EngineError::InvalidModel {
            path: self.path.clone(),
            reason,
        }
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .meta(key)
            .ok_or_else(|| self.invalid(format!("metadata {key} is missing")))?;
        v.to_u64()
            .map(|x| x as usize)
            .or_else(|_| v.to_u32().map(|x| x as usize))
            .map_err(|e| self.invalid(format!("metadata {key}: {e}")))
    }

    fn meta_f32(&self, key: &str) -> Option<f32> {
        self.meta(key).and_then(|v| v.to_f32().ok())
    }

    /// (rows, cols) of a 2-D tensor, or (1, len) of a vector.
    fn dims(&self, name: &str) -> Result<(usize, usize)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.invalid(format!("tensor {name} is missing")))?;
        match info.shape.dims() {
            [k] => Ok((1, *k)),
            [n, k] => Ok((*n, *k)),
            d => Err(self.invalid(format!("tensor {name} has shape {d:?}"))),
        }
    }

    fn raw(&mut self, name: &str) -> Result<(GgmlDType, Vec<u8>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| self.invalid(format!("tensor {name} is missing")))?;
        let dtype = info.ggml_dtype;
        let elems = info.shape.elem_count();
        let size = elems / dtype.block_size() * dtype.type_size();
        let start = self.content.tensor_data_offset + info.offset;
        if start + size as u64 > self.len {
            return Err(self.invalid(format!(
                "truncated: tensor {name} needs bytes {start}..{} but the file has {}",
                start + size as u64,
                self.len
            )));
        }
        let mut buf = vec![0u8; size];
        let io = |source| EngineError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.seek(SeekFrom::Start(start)).map_err(io)?;
        self.file.read_exact(&mut buf).map_err(io)?;
        Ok((dtype, buf))
    }

    /// A weight in the form we compute on: block formats stay quantized, anything else becomes f32.
    pub fn weight(&mut self, name: &str) -> Result<Weight> {
        let (n, k) = self.dims(name)?;
        let (dtype, bytes) = self.raw(name)?;
        let format = match dtype {
            GgmlDType::Q4_0 => Some(BlockFormat::Q4_0),
            GgmlDType::Q4_1 => Some(BlockFormat::Q4_1),
            GgmlDType::Q8_0 => Some(BlockFormat::Q8_0),
            _ => None,
        };
        if let Some(format) = format.filter(|_| k % 32 == 0) {
            return Ok(Weight {
                n,
                k,
                data: crate::kernels::WeightData::Quant { format, bytes },
            });
        }
        Ok(Weight::f32(n, k, self.dequantized(name, dtype, bytes)?))
    }

    pub fn vector(&mut self, name: &str) -> Result<Vec<f32>> {
        let (dtype, bytes) = self.raw(name)?;
        self.dequantized(name, dtype, bytes)
    }

    fn dequantized(&self, name: &str, dtype: GgmlDType, bytes: Vec<u8>) -> Result<Vec<f32>> {
        if dtype == GgmlDType::F32 {
            return Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect());
        }
        let info = &self.content.tensor_infos[name];
        let mut cursor = std::io::Cursor::new(bytes);
        let fake = candle_core::quantized::gguf_file::TensorInfo {
            ggml_dtype: dtype,
            shape: info.shape.clone(),
            offset: 0,
        };
        let q = fake.read(&mut cursor, 0, &Device::Cpu)?;
        Ok(q.dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    pub fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads the model's configuration from the file's metadata.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self
            .meta("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .ok_or_else(|| self.invalid("metadata general.architecture is missing".into()))?;
        if arch != "llama" {
            return Err(EngineError::Unsupported(format!(
                "GGUF architecture {arch:?}: only Llama-family models (general.architecture = llama) are supported"
            )));
        }
        let p = |k: &str| format!("{arch}.{k}");
        let hidden = self.meta_usize(&p("embedding_length"))?;
        let heads = self.meta_usize(&p("attention.head_count"))?;
        let head_dim = self
            .meta_usize(&p("attention.key_length"))
            .unwrap_or(hidden / heads.max(1));
        let (vocab, _) = self.dims("token_embd.weight")?;
        let cfg = ModelConfig {
            name: self
                .meta("general.name")
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_else(|| self.path.display().to_string()),
            hidden,
            ffn: self.meta_usize(&p("feed_forward_length"))?,
            layers: self.meta_usize(&p("block_count"))?,
            heads,
            kv_heads: self
                .meta_usize(&p("attention.head_count_kv"))
                .unwrap_or(heads),
            head_dim,
            vocab,
            max_context: self.meta_usize(&p("context_length")).unwrap_or(4096),
            rms_eps: self
                .meta_f32(&p("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_base: self.meta_f32(&p("rope.freq_base")).unwrap_or(10_000.0),
            rope_interleaved: true,
        };
        if let Ok(rot) = self.meta_usize(&p("rope.dimension_count"))
            && rot != head_dim
        {
            return Err(EngineError::Unsupported(format!(
                "partial rotary ({rot} of {head_dim} dims)"
            )));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Loads the whole model.
    pub fn model(&mut self) -> Result<Model> {
        let cfg = self.config()?;
        let embed = self.weight("token_embd.weight")?;
        let lm_head = if self.has("output.weight") {
            Some(self.weight("output.weight")?)
        } else {
            None
        };
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let t = |s: &str| format!("blk.{i}.{s}.weight");
            let (q, k, v) = (
                self.weight(&t("attn_q"))?,
                self.weight(&t("attn_k"))?,
                self.weight(&t("attn_v"))?,
            );
            let (gate, up) = (self.weight(&t("ffn_gate"))?, self.weight(&t("ffn_up"))?);
            layers.push(Layer {
                attn_norm: self.vector(&t("attn_norm"))?,
                wqkv: stack_weights(&[q, k, v])?,
                wo: self.weight(&t("attn_output"))?,
                ffn_norm: self.vector(&t("ffn_norm"))?,
                w_gate_up: stack_weights(&[gate, up])?,
                w_down: self.weight(&t("ffn_down"))?,
            });
        }
        let norm = self.vector("output_norm.weight")?;
        let freq_factors = if self.has("rope_freqs.weight") {
            Some(self.vector("rope_freqs.weight")?)
        } else {
            None
        };
        let rope = RopeTable::new(
            cfg.head_dim,
            cfg.rope_base,
            cfg.max_context,
            freq_factors.as_deref(),
        );
        Model::new(cfg, embed, layers, norm, lm_head, rope)
    }
}

/// Stacks weights of one storage kind; mixed kinds (rare) are stacked as f32, which computes the same values.
pub fn stack_weights(parts: &[Weight]) -> Result<Weight> {
    Weight::stack(parts)
        .or_else(|| Weight::stack(&parts.iter().map(Weight::to_f32).collect::<Vec<_>>()))
        .ok_or_else(|| EngineError::Unsupported("projections of different input widths".into()))
}
