//! The default model, SmolLM2-135M-Instruct (GGUF Q4_1): greedy output against an independent
//! implementation's fixtures, and clear errors for bad model files. The model must be fetched
//! (scripts/fetch-model.sh); without it these tests fail, they do not skip.
use std::sync::Arc;

use serde_json::Value;
use tandem_engine::testing::require_model_path;
use tandem_engine::{Engine, EngineError, Flow, Model, SamplingParams, generate, load};

fn fixtures() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/smollm2_q4_1.json"
    );
    let text = std::fs::read_to_string(path)
        .expect("fixtures file (made by scripts/fixtures/make_fixtures.py)");
    serde_json::from_str(&text).expect("fixtures JSON")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// The default model and the fixtures' generation cases (at least eight prompts).
fn model_and_cases() -> (Arc<Model>, Vec<Value>) {
    let loaded = load(&require_model_path()).expect("load the default model");
    let fx = fixtures();
    let cases = fx["generation"]
        .as_array()
        .expect("generation cases")
        .clone();
    assert!(cases.len() >= 8, "at least 8 prompts");
    (Arc::new(loaded.model), cases)
}

#[test]
fn greedy_generation_equals_the_independent_reference() {
    let (model, cases) = model_and_cases();
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        let want = ids(&case["greedy_ids"]);
        assert!(
            want.len() >= 32,
            "case {i}: the fixture holds at least 32 tokens"
        );
        let n = want.len() as u32;
        let mut engine = Engine::new(model.clone(), (prompt.len() + want.len()).div_ceil(16) + 1);
        let mut params = SamplingParams::greedy(n);
        params.ignore_eos = true;
        // Chunk at 128 so the long prompts also exercise chunked prefill.
        let got = generate(&mut engine, 1, &prompt, &params, &[], 128, |_| {
            Flow::Continue
        })
        .expect("generate")
        .tokens;
        if got != want {
            let at = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            failures.push(format!(
                "case {i} ({}): first difference at token {at}",
                case["name"]
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The same fixtures decoded together: each prompt twice (16 sequences of different lengths),
/// so that the batched kernels' grouped paths (two groups of eight rows in one 512-bit tile where
/// the CPU has it) produce every step. Each sequence must give its fixture's tokens exactly.
#[test]
fn batched_greedy_generation_equals_the_independent_reference() {
    let (model, cases) = model_and_cases();
    let prompts: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
    let wants: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["greedy_ids"])).collect();
    let steps = wants.iter().map(Vec::len).min().expect("cases");
    let seqs: Vec<usize> = (0..2 * cases.len()).map(|i| i % cases.len()).collect();
    let blocks: usize = seqs
        .iter()
        .map(|&c| (prompts[c].len() + steps).div_ceil(16) + 1)
        .sum();
    let mut engine = Engine::new(model, blocks);
    let ids_: Vec<u64> = (1..=seqs.len() as u64).collect();
    for id in &ids_ {
        engine.add_sequence(*id).expect("add a sequence");
    }
    let batch: Vec<(u64, &[u32])> = ids_
        .iter()
        .zip(&seqs)
        .map(|(id, &c)| (*id, &prompts[c][..]))
        .collect();
    let first = engine.prefill(&batch, 4096).expect("prefill");
    let mut last: Vec<u32> = first.iter().map(|l| l.argmax()).collect();
    let mut got: Vec<Vec<u32>> = last.iter().map(|t| vec![*t]).collect();
    for _ in 1..steps {
        engine
            .greedy_step(&ids_, &mut last)
            .expect("a batched step");
        for (g, t) in got.iter_mut().zip(&last) {
            g.push(*t);
        }
    }
    for (i, (g, &c)) in got.iter().zip(&seqs).enumerate() {
        assert_eq!(
            g[..],
            wants[c][..steps],
            "sequence {i} (case {c}, {}) in a batch of {}",
            cases[c]["name"],
            seqs.len()
        );
    }
}

#[test]
fn missing_truncated_and_foreign_files_are_clear_errors() {
    let dir = std::env::temp_dir().join(format!("tandem-bad-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let missing = dir.join("nope.gguf");
    assert!(matches!(load(&missing), Err(EngineError::MissingFile(_))));

    let foreign = dir.join("foreign.gguf");
    std::fs::write(&foreign, b"this is not a GGUF file at all").expect("write");
    let err = load(&foreign).expect_err("foreign file");
    assert!(matches!(err, EngineError::InvalidModel { .. }), "{err}");

    let real = std::fs::read(require_model_path()).expect("read model");
    let truncated = dir.join("truncated.gguf");
    std::fs::write(&truncated, &real[..real.len() / 2]).expect("write");
    let err = load(&truncated).expect_err("truncated file");
    assert!(matches!(err, EngineError::InvalidModel { .. }), "{err}");
    assert!(err.to_string().contains("truncated"), "{err}");

    let header_only = dir.join("header.gguf");
    std::fs::write(&header_only, &real[..1000]).expect("write");
    let err = load(&header_only).expect_err("cut inside the header");
    assert!(matches!(err, EngineError::InvalidModel { .. }), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn chat_prompt_through_the_template_yields_readable_text() {
    let loaded = load(&require_model_path()).expect("load");
    let tok = loaded.tokenizer;
    let msgs = [tandem_engine::tokenizer::ChatMessage::new(
        "user",
        "What is the capital of France?",
    )];
    let text = tok.chat_template().render(&msgs, true).expect("render");
    let prompt = tok.encode(&text, true).expect("encode");
    let mut engine = Engine::new(Arc::new(loaded.model), 16);
    let out = generate(
        &mut engine,
        1,
        &prompt,
        &SamplingParams::greedy(24),
        tok.eos_token_ids(),
        512,
        |_| Flow::Continue,
    )
    .expect("generate");
    let answer = tok.decode(&out.tokens, true).expect("decode");
    assert!(answer.contains("Paris"), "answer: {answer:?}");
}
