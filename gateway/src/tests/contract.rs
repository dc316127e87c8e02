//! The success paths: exact SSE sequences, whole bodies, usage, stop strings, small endpoints.
use serde_json::{Value, json};
use tandem_engine::FinishReason;
use tandem_engine::tokenizer::ChatMessage;

use super::*;

/// `<|im_end|>`: the model's EOS, a special token that decodes to nothing.
const IM_END: u32 = 2;

fn hello_script() -> Script {
    let hello = ids("Hello, world");
    assert_eq!(hello.len(), 3, "{hello:?}");
    Script::Items(vec![
        Ok(chunk(vec![hello[0]], None)),
        Ok(chunk(vec![hello[1], hello[2]], None)),
        Ok(chunk(vec![IM_END], Some(FinishReason::Stop))),
    ])
}

fn user_hi() -> Value {
    json!([{"role": "user", "content": "Hi"}])
}

#[tokio::test]
async fn chat_stream_is_the_exact_chunk_sequence() {
    let fake = FakeBackend::new(hello_script());
    let app = app(fake.clone());
    let body = json!({
        "model": MODEL, "messages": user_hi(), "stream": true,
        "stream_options": {"include_usage": true}, "max_tokens": 10, "temperature": 0,
    });
    let (status, headers, bytes) =
        send(&app, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "text/event-stream");
    let data = sse_data(&bytes);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let id = chunks[0]["id"].clone();
    assert!(
        chunks.iter().all(|c| c["id"] == id),
        "one id for every chunk"
    );
    let chunks: Vec<Value> = chunks
        .into_iter()
        .map(|c| strip_ids(c, "chatcmpl-"))
        .collect();
    let expected_prompt = {
        let t = tokenizer();
        let text = t
            .chat_template()
            .render(&[ChatMessage::new("user", "Hi")], true)
            .unwrap();
        t.encode(&text, true).unwrap()
    };
    let n = expected_prompt.len();
    let base = |choices: Value| json!({"object": "chat.completion.chunk", "model": MODEL, "choices": choices, "usage": null});
    let delta = |d: Value, f: Value| json!([{"index": 0, "delta": d, "logprobs": null, "finish_reason": f}]);
    assert_eq!(
        chunks,
        vec![
            base(delta(
                json!({"role": "assistant", "content": ""}),
                Value::Null
            )),
            base(delta(json!({"content": "Hello"}), Value::Null)),
            base(delta(json!({"content": ", world"}), Value::Null)),
            base(delta(json!({}), json!("stop"))),
            json!({"object": "chat.completion.chunk", "model": MODEL, "choices": [],
                   "usage": {"prompt_tokens": n, "completion_tokens": 4, "total_tokens": n + 4}}),
        ]
    );
    let req = fake.last_request();
    assert_eq!(req.model, MODEL);
    assert!(req.request_id.starts_with("chatcmpl-"));
    assert_eq!(req.prompt_tokens, expected_prompt);
    assert_eq!(req.sampling.max_tokens, 10);
    assert_eq!(
        req.sampling.stop_token_ids,
        tokenizer().eos_token_ids().to_vec()
    );
    assert_eq!(req.sampling.stop_token_ids, vec![2, 0]);
    assert!(req.sampling.is_greedy());
}

#[tokio::test]
async fn completion_stream_without_usage() {
    let fake = FakeBackend::new(Script::Items(vec![
        Ok(chunk(ids(" Paris"), None)),
        Ok(chunk(ids(" is"), Some(FinishReason::Length))),
    ]));
    let app = app(fake.clone());
    let body = json!({"model": MODEL, "prompt": "The capital of France is", "stream": true, "max_tokens": 2});
    let (status, _, bytes) = send(&app, "POST", "/v1/completions", &body.to_string()).await;
    assert_eq!(status, 200);
    let data = sse_data(&bytes);
    assert_eq!(data.len(), 4, "{data:?}");
    assert_eq!(data[3], "[DONE]");
    let c: Vec<Value> = data[..3]
        .iter()
        .map(|d| strip_ids(serde_json::from_str(d).unwrap(), "cmpl-"))
        .collect();
    let choice = |text: &str, f: Value| {
        json!({"object": "text_completion", "model": MODEL,
               "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": f}]})
    };
    assert_eq!(
        c,
        vec![
            choice(" Paris", Value::Null),
            choice(" is", Value::Null),
            choice("", json!("length")),
        ]
    );
    // The same tokenization as `tandem generate` without --chat.
    let req = fake.last_request();
    assert_eq!(
        req.prompt_tokens,
        tokenizer()
            .encode("The capital of France is", true)
            .unwrap()
    );
    assert!(!req.sampling.ignore_eos);
}

#[tokio::test]
async fn chat_body_with_usage() {
    let fake = FakeBackend::new(hello_script());
    let app = app(fake.clone());
    let body = json!({"model": MODEL, "messages": user_hi(), "max_completion_tokens": 5});
    let (status, _, v) = post(&app, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200);
    let n = fake.last_request().prompt_tokens.len();
    assert_eq!(
        strip_ids(v, "chatcmpl-"),
        json!({
            "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello, world"},
                         "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": n, "completion_tokens": 4, "total_tokens": n + 4},
        })
    );
    assert_eq!(fake.last_request().sampling.max_tokens, 5);
}

#[tokio::test]
async fn completion_body_with_token_prompt_and_ignore_eos() {
    let fake = FakeBackend::new(hello_script());
    let app = app(fake.clone());
    let body = json!({"model": MODEL, "prompt": [19556, 28], "ignore_eos": true,
                      "temperature": 0.7, "seed": 42});
    let (status, _, v) = post(&app, "/v1/completions", &body).await;
    assert_eq!(status, 200);
    assert_eq!(
        strip_ids(v, "cmpl-"),
        json!({
            "object": "text_completion", "model": MODEL,
            "choices": [{"index": 0, "text": "Hello, world", "logprobs": null, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6},
        })
    );
    let req = fake.last_request();
    assert_eq!(req.prompt_tokens, vec![19556, 28]);
    assert!(req.sampling.stop_token_ids.is_empty() && req.sampling.ignore_eos);
    assert_eq!((req.sampling.temperature, req.sampling.seed), (0.7, 42));
    // No max_tokens: the rest of the context.
    assert_eq!(req.sampling.max_tokens, 8192 - 2);
}

#[tokio::test]
async fn stop_string_across_tokens_cuts_text_and_drops_the_stream() {
    // "Hello" "," " world" then nothing more: the stop "o, w" spans three tokens.
    let hello = ids("Hello, world");
    let fake = FakeBackend::new(Script::ItemsThenHang(
        hello.iter().map(|&t| Ok(chunk(vec![t], None))).collect(),
    ));
    let app = app(fake.clone());
    let body =
        json!({"model": MODEL, "messages": user_hi(), "stream": true, "stop": ["o, w", "zzz"]});
    let (status, _, bytes) = send(&app, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(status, 200);
    let data = sse_data(&bytes);
    let contents: Vec<Value> = data
        .iter()
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0].clone())
        .map(|c| json!([c["delta"], c["finish_reason"]]))
        .collect();
    assert_eq!(
        contents,
        vec![
            json!([{"role": "assistant", "content": ""}, null]),
            json!([{"content": "Hell"}, null]),
            json!([{}, "stop"]),
        ]
    );
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    // The stream would never have ended on its own: the stop string dropped it.
    assert!(fake.was_dropped());
    assert_eq!(fake.last_request().sampling.stop, vec!["o, w", "zzz"]);
}

#[tokio::test]
async fn stop_string_in_a_whole_body() {
    let fake = FakeBackend::new(hello_script());
    let app = app(fake.clone());
    let body = json!({"model": MODEL, "prompt": "x", "stop": ","});
    let (status, _, v) = post(&app, "/v1/completions", &body).await;
    assert_eq!(status, 200);
    assert_eq!(v["choices"][0]["text"], "Hello");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn models_health_ready_and_metrics() {
    let fake = FakeBackend::new(hello_script());
    let app = app(fake.clone());
    let (s, _, b) = send(&app, "GET", "/v1/models", "").await;
    assert_eq!(s, 200);
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], MODEL);
    assert_eq!(v["data"][0]["object"], "model");
    assert_eq!(v["data"][0]["owned_by"], "tandem");
    let (s, _, b) = send(&app, "GET", "/health", "").await;
    assert_eq!((s.as_u16(), &b[..]), (200, &br#"{"status":"ok"}"#[..]));
    let (s, _, b) = send(&app, "GET", "/ready", "").await;
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap(),
        json!({"status": "ready", "detail": "1 fake worker"})
    );

    let body = json!({"model": MODEL, "messages": user_hi()});
    let (s, _, _) = post(&app, "/v1/chat/completions", &body).await;
    assert_eq!(s, 200);
    let (s, _, _) = post(
        &app,
        "/v1/chat/completions",
        &json!({"model": "nope", "messages": user_hi()}),
    )
    .await;
    assert_eq!(s, 404);
    let n = fake.last_request().prompt_tokens.len();
    let (s, h, b) = send(&app, "GET", "/metrics", "").await;
    assert_eq!(s, 200);
    assert_eq!(
        h["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = String::from_utf8(b.to_vec()).unwrap();
    for line in [
        "tandem_gateway_requests_total{endpoint=\"/v1/chat/completions\",status=\"2xx\"} 1"
            .to_string(),
        "tandem_gateway_requests_total{endpoint=\"/v1/chat/completions\",status=\"4xx\"} 1"
            .to_string(),
        "tandem_gateway_requests_total{endpoint=\"/v1/models\",status=\"2xx\"} 1".to_string(),
        format!("tandem_gateway_prompt_tokens_total {n}"),
        "tandem_gateway_completion_tokens_total 4".to_string(),
        "tandem_gateway_requests_in_flight 0".to_string(),
        "tandem_gateway_time_to_first_token_seconds_count 1".to_string(),
        "tandem_gateway_inter_token_latency_seconds_count 2".to_string(),
        "tandem_gateway_e2e_latency_seconds_count 1".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
}

#[tokio::test]
async fn not_ready_is_503_with_the_detail() {
    let fake = Arc::new(FakeBackend {
        ready: false,
        ..Arc::into_inner(FakeBackend::new(Script::Items(vec![]))).unwrap()
    });
    let app = app(fake);
    let (s, _, b) = send(&app, "GET", "/ready", "").await;
    assert_eq!(s, 503);
    assert_eq!(
        serde_json::from_slice::<Value>(&b).unwrap(),
        json!({"status": "not_ready", "detail": "no decode worker"})
    );
    let (s, _, _) = send(&app, "GET", "/health", "").await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn return_token_ids_gives_the_prompt_and_every_generated_id() {
    let fake = FakeBackend::new(hello_script());
    let app = app(fake.clone());
    let body = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 10, "return_token_ids": true});
    let (status, _, v) = post(&app, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["prompt_token_ids"],
        json!(fake.last_request().prompt_tokens)
    );
    let mut want = ids("Hello, world");
    want.push(IM_END);
    assert_eq!(v["choices"][0]["token_ids"], json!(want));
    assert_eq!(v["choices"][0]["text"], "Hello, world");
    // Without the flag, the body stays OpenAI's.
    let fake = FakeBackend::new(hello_script());
    let body = json!({"model": MODEL, "prompt": "Hi", "max_tokens": 10});
    let (_, _, v) = post(&app_with(config(fake)), "/v1/completions", &body).await;
    assert!(v.get("prompt_token_ids").is_none() && v["choices"][0].get("token_ids").is_none());
}
