//! The real default model behind `LocalBackend`: honest tokens, compared with the engine's own
//! single-process loop run the way `tandem generate --chat` runs it.
use std::sync::Arc;

use serde_json::{Value, json};
use tandem_engine::tokenizer::ChatMessage;
use tandem_engine::{Engine, Flow, SamplingParams, generate};

use super::*;
use crate::LocalBackend;

const QUESTION: &str = "What is the capital of France?";

/// The default model and its tokenizer, loaded once for every test here.
fn model() -> (
    Arc<tandem_engine::Model>,
    tandem_engine::tokenizer::Tokenizer,
) {
    static M: std::sync::OnceLock<(
        Arc<tandem_engine::Model>,
        tandem_engine::tokenizer::Tokenizer,
    )> = std::sync::OnceLock::new();
    M.get_or_init(|| {
        let path = tandem_engine::testing::require_model_path();
        let loaded = tandem_engine::load(&path).unwrap_or_else(|e| panic!("{e}"));
        (Arc::new(loaded.model), loaded.tokenizer)
    })
    .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_backend_answers_paris_like_tandem_generate() {
    let (model, tok) = model();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_stops_the_local_engine() {
    use axum::body::Body;
    use axum::http::Request;
    use futures::StreamExt;
    use tower::ServiceExt;

    let (model, tok) = model();
    let ctx = model.config().max_context;
    let backend = Arc::new(LocalBackend::new(model, 512).unwrap());
    let app = app_with(GatewayConfig::new(MODEL, tok, ctx, backend.clone()));
    let long = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000,
                      "ignore_eos": true, "temperature": 0, "stream": true});
    let req = Request::builder()
        .method("POST")
        .uri("/v1/completions")
        .body(Body::from(long.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut frames = resp.into_body().into_data_stream();
    let first = frames.next().await.unwrap().unwrap();
    assert!(std::str::from_utf8(&first).unwrap().contains("\"text\""));
    drop(frames);
    // The engine serves one request at a time: when this one is answered, the first has ended.
    let short = json!({"model": MODEL, "prompt": "Hello", "max_tokens": 3, "ignore_eos": true, "temperature": 0});
    let (s, _, v) = post(&app, "/v1/completions", &short).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    let first_run = backend.tokens_generated() - 3;
    // Without cancellation the first request would have run all 2000 tokens; with it, it stops
    // once the 64-token channel between engine and client is full and the send fails.
    assert!(
        (1..200).contains(&first_run),
        "{first_run} tokens after the client left"
    );
}
