//! The real default model behind `LocalBackend`: honest tokens, compared with the engine's own
//! single-process loop run the way `tandem generate --chat` runs it.
use std::sync::Arc;

use serde_json::{Value, json};
use tandem_engine::tokenizer::ChatMessage;
use tandem_engine::{Engine, Flow, SamplingParams, generate};

use super::*;
use crate::LocalBackend;

const QUESTION: &str = "What is the capital of France?";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_backend_answers_paris_like_tandem_generate() {
    let path = tandem_engine::testing::require_model_path();
    let loaded = tandem_engine::load(&path).unwrap();
    let tok = loaded.tokenizer;
    let model = Arc::new(loaded.model);
    let ctx = model.config().max_context;

    // The reference: what `tandem generate --chat --max-tokens 8` computes.
    let prompt = {
        let text = tok
            .chat_template()
            .render(&[ChatMessage::new("user", QUESTION)], true)
            .unwrap();
        tok.encode(&text, true).unwrap()
    };
    let mut engine = Engine::new(model.clone(), (prompt.len() + 9).div_ceil(16));
    let reference = generate(
        &mut engine,
        1,
        &prompt,
        &SamplingParams::greedy(8),
        tok.eos_token_ids(),
        512,
        |_| Flow::Continue,
    )
    .unwrap();
    let ref_text = tok.decode(&reference.tokens, true).unwrap();

    let backend = Arc::new(LocalBackend::new(model, 512).unwrap());
    let app = app_with(GatewayConfig::new(MODEL, tok.clone(), ctx, backend));
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
                      "max_tokens": 8, "temperature": 0});
    let (s, _, v) = post(&app, "/v1/chat/completions", &body).await;
    assert_eq!(s, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(text, ref_text);
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], reference.tokens.len());
    let finish = if reference.finish == tandem_engine::FinishReason::Stop {
        "stop"
    } else {
        "length"
    };
    assert_eq!(v["choices"][0]["finish_reason"], finish);

    // Streamed, the pieces add up to the same text.
    let mut body = body;
    body["stream"] = json!(true);
    let (s, _, bytes) = send(&app, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(s, 200);
    let data = sse_data(&bytes);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let streamed: String = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(streamed, ref_text);
}
