//! A tiny Llama with random weights, built in memory from a seed: fast tests of every mechanism
//! without a model file.
use crate::Result;
use crate::kernels::{BlockFormat, Weight, WeightData};
use crate::model::{Layer, Model, ModelConfig, RopeTable};

pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        name: "tiny-llama".into(),
        hidden: 64,
        ffn: 128,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        vocab: 96,
        max_context: 512,
        rms_eps: 1e-5,
        rope_base: 10_000.0,
        rope_interleaved: true,
    }
}

/// The tiny model's weights as plain f32 arrays (`[out][in]` row-major), for reference implementations.
#[derive(Debug, Clone)]
pub struct TinyWeights {
    pub embed: Vec<f32>,
    pub layers: Vec<TinyLayer>,
    pub norm: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct TinyLayer {
    pub attn_norm: Vec<f32>,
    pub wq: Vec<f32>,
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
    pub wo: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Vec<f32>,
    pub w_up: Vec<f32>,
    pub w_down: Vec<f32>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

/// Builds the tiny model from `seed`. With `quantize`, linear weights are stored as Q4_1 blocks
/// (and the reference weights are their dequantized values), exercising the quantized path.
pub fn tiny_model(seed: u64, quantize: bool) -> Result<(Model, TinyWeights)> {
    let c = tiny_config();
    let mut rng = Rng(seed ^ 0x5eed);
    let lin = |rng: &mut Rng, n: usize, k: usize| rng.vec(n * k, 1.0 / (k as f32).sqrt() * 1.7);
    let norm =
        |rng: &mut Rng, n: usize| (0..n).map(|_| 1.0 + 0.2 * rng.next()).collect::<Vec<f32>>();
    let embed = rng.vec(c.vocab * c.hidden, 1.0);
    let mut layers = Vec::new();
    for _ in 0..c.layers {
        layers.push(TinyLayer {
            attn_norm: norm(&mut rng, c.hidden),
            wq: lin(&mut rng, c.q_width(), c.hidden),
            wk: lin(&mut rng, c.kv_width(), c.hidden),
            wv: lin(&mut rng, c.kv_width(), c.hidden),
            wo: lin(&mut rng, c.hidden, c.q_width()),
            ffn_norm: norm(&mut rng, c.hidden),
            w_gate: lin(&mut rng, c.ffn, c.hidden),
            w_up: lin(&mut rng, c.ffn, c.hidden),
            w_down: lin(&mut rng, c.hidden, c.ffn),
        });
    }
    let mut w = TinyWeights {
        embed,
        layers,
        norm: norm(&mut rng, c.hidden),
    };
    let mk = |data: &mut Vec<f32>, n: usize, k: usize| -> Weight {
        if quantize {
            let q = quantize_q4_1(data, n, k);
            *data = q.to_f32().as_f32().map(<[f32]>::to_vec).unwrap_or_default();
            q
        } else {
            Weight::f32(n, k, data.clone())
        }
    };
    let mut model_layers = Vec::new();
    for l in &mut w.layers {
        let q = mk(&mut l.wq, c.q_width(), c.hidden);
        let k = mk(&mut l.wk, c.kv_width(), c.hidden);
        let v = mk(&mut l.wv, c.kv_width(), c.hidden);
        let g = mk(&mut l.w_gate, c.ffn, c.hidden);
        let u = mk(&mut l.w_up, c.ffn, c.hidden);
        model_layers.push(Layer {
            attn_norm: l.attn_norm.clone(),
            wqkv: crate::model::stack_weights(&[q, k, v])?,
            wo: mk(&mut l.wo, c.hidden, c.q_width()),
            ffn_norm: l.ffn_norm.clone(),
            w_gate_up: crate::model::stack_weights(&[g, u])?,
            w_down: mk(&mut l.w_down, c.hidden, c.ffn),
        });
    }
    let embed = Weight::f32(c.vocab, c.hidden, w.embed.clone());
    let rope = RopeTable::new(c.head_dim, c.rope_base, c.max_context, None);
    let model = Model::new(c, embed, model_layers, w.norm.clone(), None, rope)?;
    Ok((model, w))
}

/// Quantizes rows to Q4_1 the way llama.cpp does (min and scale per block of 32).
pub fn quantize_q4_1(data: &[f32], n: usize, k: usize) -> Weight {
    let mut bytes = Vec::with_capacity(n * k / 32 * 20);
    for block in data.chunks_exact(32) {
        let min = block.iter().copied().fold(f32::INFINITY, f32::min);
        let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = (max - min) / 15.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        bytes.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        bytes.extend_from_slice(&half::f16::from_f32(min).to_le_bytes());
        for j in 0..16 {
            let lo = (((block[j] - min) * id + 0.5) as u8).min(15);
            let hi = (((block[j + 16] - min) * id + 0.5) as u8).min(15);
            bytes.push(lo | (hi << 4));
        }
    }
    Weight {
        n,
        k,
        data: WeightData::Quant {
            format: BlockFormat::Q4_1,
            bytes,
        },
    }
}
