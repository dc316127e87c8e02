//! Every refusal: its status and its exact OpenAI error body.
use std::time::Duration;

use serde_json::{Value, json};

use super::*;

fn error(message: &str, kind: &str, param: Value, code: Value) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

fn invalid(message: &str, param: Value) -> Value {
    error(message, "invalid_request_error", param, Value::Null)
}

fn user_hi() -> Value {
    json!([{"role": "user", "content": "Hi"}])
}

#[tokio::test]
async fn unknown_model_is_404() {
    let fake = FakeBackend::new(Script::Items(vec![]));
    let app = app(fake.clone());
    let (s, _, v) = post(
        &app,
        "/v1/chat/completions",
        &json!({"model": "gpt-4", "messages": user_hi()}),
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(
        v,
        error(
            "The model `gpt-4` does not exist.",
            "invalid_request_error",
            json!("model"),
            json!("model_not_found")
        )
    );
    let (s, _, _) = send(&app, "GET", "/v1/models/gpt-4", "").await;
    assert_eq!(s, 404);
    assert!(
        fake.last.lock().unwrap().is_none(),
        "nothing reached the backend"
    );
}

#[tokio::test]
async fn malformed_json_and_wrong_types_are_openai_400s() {
    let app = app(FakeBackend::new(Script::Items(vec![])));
    let (s, h, b) = send(&app, "POST", "/v1/chat/completions", "{\"model\": ").await;
    assert_eq!(s, 400);
    assert_eq!(h["content-type"], "application/json");
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("We could not parse the JSON body of your request: "),
        "{v}"
    );
    let (s, _, v) = post(
        &app,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": user_hi(), "temperature": "hot"}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(
        v,
        invalid(
            "Invalid type for 'temperature': expected a number, but got a string instead.",
            json!("temperature")
        )
    );
    let (s, _, v) = post(
        &app,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": {"a": 1}}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(
        v,
        invalid(
            "Invalid type for 'prompt': expected a string, an array of one string, or an array of token ids, but got an object instead.",
            json!("prompt")
        )
    );
}

#[tokio::test]
async fn range_and_shape_errors() {
    let app = app(FakeBackend::new(Script::Items(vec![])));
    let chat = |extra: Value| {
        let mut b = json!({"model": MODEL, "messages": user_hi()});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let cases = [
        (
            chat(json!({"n": 2})),
            invalid(
                "n = 2 is not supported: this server returns exactly one choice per request (n = 1).",
                json!("n"),
            ),
        ),
        (
            chat(json!({"messages": []})),
            invalid(
                "'messages' must contain at least one message.",
                json!("messages"),
            ),
        ),
        (
            chat(json!({"max_tokens": 0})),
            invalid("max_tokens must be at least 1, got 0.", json!("max_tokens")),
        ),
        (
            chat(json!({"max_tokens": -5})),
            invalid(
                "max_tokens must be at least 1, got -5.",
                json!("max_tokens"),
            ),
        ),
        (
            chat(json!({"temperature": 2.5})),
            invalid(
                "temperature must be between 0 and 2, got 2.5.",
                json!("temperature"),
            ),
        ),
        (
            chat(json!({"top_p": 0})),
            invalid(
                "top_p must be greater than 0 and at most 1, got 0.",
                json!("top_p"),
            ),
        ),
        (
            chat(json!({"stop": ["a", "b", "c", "d", "e"]})),
            invalid("stop may hold at most 4 strings, got 5.", json!("stop")),
        ),
    ];
    for (body, expected) in cases {
        let (s, _, v) = post(&app, "/v1/chat/completions", &body).await;
        assert_eq!((s.as_u16(), &v), (400, &expected), "{body}");
    }
    let (s, _, v) = post(
        &app,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": ""}),
    )
    .await;
    assert_eq!(
        (s.as_u16(), v),
        (
            400,
            invalid("The prompt must not be empty.", json!("prompt"))
        )
    );
}

#[tokio::test]
async fn context_length_exceeded() {
    let fake = FakeBackend::new(Script::Items(vec![Ok(chunk(
        vec![2],
        Some(tandem_engine::FinishReason::Stop),
    ))]));
    let mut cfg = config(fake.clone());
    cfg.max_context = 16;
    let app = app_with(cfg);
    // 5 prompt tokens + 12 > 16.
    let prompt = "one two three four five";
    assert_eq!(tokenizer().encode(prompt, true).unwrap().len(), 5);
    let (s, _, v) = post(
        &app,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 12}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(
        v,
        error(
            "This model's maximum context length is 16 tokens. However, you requested 17 tokens (5 in the prompt, 12 for the completion). Please reduce the length of the prompt or the completion.",
            "invalid_request_error",
            json!("max_tokens"),
            json!("context_length_exceeded")
        )
    );
    let long = "word ".repeat(20);
    let (s, _, v) = post(
        &app,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": long}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["param"], "prompt");
    assert!(fake.last.lock().unwrap().is_none());
    // Exactly full: 5 + 11 = 16 is accepted.
    let (s, _, _) = post(
        &app,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": prompt, "max_tokens": 11}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(fake.last_request().sampling.max_tokens, 11);
}

#[tokio::test]
async fn backend_refusals_map_to_statuses() {
    let cases = [
        (
            BackendError::Overloaded {
                message: "all decode workers are full".into(),
                retry_after: Some(Duration::from_secs(3)),
            },
            429,
            error(
                "all decode workers are full",
                "rate_limit_error",
                Value::Null,
                json!("rate_limit_exceeded"),
            ),
        ),
        (
            BackendError::Unavailable("no prefill worker is ready".into()),
            503,
            error(
                "no prefill worker is ready",
                "server_error",
                Value::Null,
                json!("service_unavailable"),
            ),
        ),
        (
            BackendError::Timeout("prefill missed its deadline".into()),
            504,
            error(
                "prefill missed its deadline",
                "server_error",
                Value::Null,
                json!("timeout"),
            ),
        ),
        (
            BackendError::Internal("bug".into()),
            500,
            error("bug", "server_error", Value::Null, json!("internal_error")),
        ),
        (
            BackendError::ContextLength("too long".into()),
            400,
            error(
                "too long",
                "invalid_request_error",
                Value::Null,
                json!("context_length_exceeded"),
            ),
        ),
    ];
    for (e, status, body) in cases {
        let app = app(FakeBackend::new(Script::Refuse(e)));
        let req = json!({"model": MODEL, "messages": user_hi(), "stream": true});
        let (s, h, v) = post(&app, "/v1/chat/completions", &req).await;
        assert_eq!((s.as_u16(), &v), (status, &body));
        assert_eq!(
            h.get("retry-after").map(|v| v.to_str().unwrap()),
            (status == 429).then_some("3")
        );
    }
}

#[tokio::test]
async fn error_after_the_stream_started_is_an_sse_error_event() {
    let fake = FakeBackend::new(Script::Items(vec![
        Ok(chunk(ids("Hello"), None)),
        Err(BackendError::Unavailable("decode worker lost".into())),
    ]));
    let app = app(fake);
    let body = json!({"model": MODEL, "messages": user_hi(), "stream": true});
    let (s, _, bytes) = send(&app, "POST", "/v1/chat/completions", &body.to_string()).await;
    assert_eq!(s, 200);
    let data = sse_data(&bytes);
    assert_eq!(data.len(), 3, "{data:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&data[1]).unwrap()["choices"][0]["delta"]["content"],
        "Hello"
    );
    assert_eq!(
        serde_json::from_str::<Value>(&data[2]).unwrap(),
        error(
            "decode worker lost",
            "server_error",
            Value::Null,
            json!("service_unavailable")
        )
    );
}

#[tokio::test]
async fn error_in_a_whole_body_request_is_its_status() {
    let fake = FakeBackend::new(Script::Items(vec![
        Ok(chunk(ids("Hello"), None)),
        Err(BackendError::Timeout("decode missed its deadline".into())),
    ]));
    let app = app(fake);
    let (s, _, v) = post(
        &app,
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": user_hi()}),
    )
    .await;
    assert_eq!(s, 504);
    assert_eq!(v["error"]["message"], "decode missed its deadline");
}

#[tokio::test]
async fn oversize_body_is_413_and_unknown_path_404() {
    let mut cfg = config(FakeBackend::new(Script::Items(vec![])));
    cfg.max_body_bytes = 64;
    let app = app_with(cfg);
    let big = json!({"model": MODEL, "prompt": "x".repeat(100)});
    let (s, _, v) = post(&app, "/v1/completions", &big).await;
    assert_eq!(s, 413);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (s, _, v) = post(&app, "/v1/nothing", &json!({})).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"]["message"], "Unknown endpoint: POST /v1/nothing");
}
