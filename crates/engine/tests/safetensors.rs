//! A Hugging Face-layout checkpoint (config.json + safetensors, half-split RoPE) loads and computes
//! the same logits as the f64 reference.
mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use tandem_engine::kv::{KvGeometry, KvPool};
use tandem_engine::model::{SeqChunk, load_safetensors};
use tandem_engine::tiny::{tiny_config, tiny_model};

#[test]
fn hf_checkpoint_loads_and_matches_the_reference() {
    let (_, w) = tiny_model(5, false).expect("tiny weights");
    let mut c = tiny_config();
    c.rope_interleaved = false;
    let dir = std::env::temp_dir().join(format!("tandem-hf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.hidden, "intermediate_size": c.ffn, "num_hidden_layers": c.layers,
        "num_attention_heads": c.heads, "num_key_value_heads": c.kv_heads, "vocab_size": c.vocab,
        "max_position_embeddings": c.max_context, "rms_norm_eps": c.rms_eps, "rope_theta": c.rope_base,
        "tie_word_embeddings": true
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("config");
    let dev = Device::Cpu;
    // Stored in bf16 where the values survive it exactly would be too lossy: use f16 for one tensor
    // kind and f32 for the rest, so both conversion paths run. The reference uses the stored values.
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, data: &mut Vec<f32>, shape: &[usize], half: bool| {
        let x = Tensor::from_slice(data, shape, &dev).expect("tensor");
        let x = if half {
            x.to_dtype(DType::F16).expect("f16")
        } else {
            x
        };
        *data = x
            .to_dtype(DType::F32)
            .expect("f32")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec");
        t.insert(name, x);
    };
    let mut w = w;
    put(
        "model.embed_tokens.weight".into(),
        &mut w.embed,
        &[c.vocab, c.hidden],
        false,
    );
    put("model.norm.weight".into(), &mut w.norm, &[c.hidden], false);
    for (i, l) in w.layers.iter_mut().enumerate() {
        let p = |s: &str| format!("model.layers.{i}.{s}.weight");
        put(p("input_layernorm"), &mut l.attn_norm, &[c.hidden], false);
        put(
            p("post_attention_layernorm"),
            &mut l.ffn_norm,
            &[c.hidden],
            false,
        );
        put(
            p("self_attn.q_proj"),
            &mut l.wq,
            &[c.q_width(), c.hidden],
            true,
        );
        put(
            p("self_attn.k_proj"),
            &mut l.wk,
            &[c.kv_width(), c.hidden],
            true,
        );
        put(
            p("self_attn.v_proj"),
            &mut l.wv,
            &[c.kv_width(), c.hidden],
            false,
        );
        put(
            p("self_attn.o_proj"),
            &mut l.wo,
            &[c.hidden, c.q_width()],
            false,
        );
        put(p("mlp.gate_proj"), &mut l.w_gate, &[c.ffn, c.hidden], true);
        put(p("mlp.up_proj"), &mut l.w_up, &[c.ffn, c.hidden], false);
        put(p("mlp.down_proj"), &mut l.w_down, &[c.hidden, c.ffn], false);
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).expect("save");

    let model = load_safetensors(&dir).expect("load");
    assert!(!model.config().rope_interleaved);
    let tokens: Vec<u32> = (0..19).map(|i| (i * 13 + 2) % 96).collect();
    let mut pool = KvPool::new(KvGeometry::new(c.layers, c.kv_heads, c.head_dim, 2));
    let table = [1u32, 0];
    let chunk = SeqChunk {
        tokens: &tokens,
        start: 0,
        block_table: &table,
        logits: true,
        generated: false,
    };
    let got = model
        .forward(&[chunk], &mut pool, |_, _| Ok(()))
        .expect("forward")
        .remove(0);
    let want = common::reference_logits(&c, &w, &tokens, None)
        .pop()
        .expect("logits");
    let err = got
        .to_vec()
        .iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-4, "max logit error {err}");

    std::fs::write(dir.join("config.json"), r#"{"architectures":["GPT2LMHeadModel"],"model_type":"gpt2","hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,"num_attention_heads":1,"vocab_size":8}"#).expect("config");
    let err = load_safetensors(&dir).expect_err("unsupported architecture");
    assert!(err.to_string().contains("only Llama-family"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
