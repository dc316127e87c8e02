use super::*;
use serde_json::json;

fn chat(v: Value) -> Result<Parsed, ApiError> {
    parse(Kind::Chat, v.to_string().as_bytes())
}

fn completion(v: Value) -> Result<Parsed, ApiError> {
    parse(Kind::Completion, v.to_string().as_bytes())
}

fn err(r: Result<Parsed, ApiError>) -> (String, Option<String>) {
    let e = r.unwrap_err();
    assert_eq!(e.status.as_u16(), 400, "{e:?}");
    (e.message, e.param)
}

#[test]
fn chat_defaults_and_content_parts() {
    let p = chat(json!({
        "model": "m",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        ],
        "unknown_field": {"ignored": true},
    }))
    .unwrap();
    assert_eq!(
        p,
        Parsed {
            model: "m".into(),
            input: Input::Messages(vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "a\nb"),
            ]),
            max_tokens: None,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
            stop: vec![],
            stream: false,
            include_usage: false,
            ignore_eos: false,
            return_token_ids: false,
        }
    );
}

#[test]
fn sampling_fields_are_read() {
    let p = completion(json!({
        "model": "m", "prompt": ["hi"], "max_tokens": 5, "max_completion_tokens": 7,
        "temperature": 0, "top_p": 0.5, "top_k": 40, "seed": -1, "stop": "\n",
        "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true,
        "n": 1, "user": "u",
    }))
    .unwrap();
    assert_eq!(p.input, Input::Text("hi".into()));
    assert_eq!(p.max_tokens, Some(7));
    assert_eq!((p.temperature, p.top_p, p.top_k), (0.0, 0.5, 40));
    assert_eq!(p.seed, Some(u64::MAX));
    assert_eq!(p.stop, vec!["\n".to_string()]);
    assert!(p.stream && p.include_usage && p.ignore_eos);
}

#[test]
fn token_id_prompts() {
    let p = completion(json!({"model": "m", "prompt": [1, 2, 3]})).unwrap();
    assert_eq!(p.input, Input::Tokens(vec![1, 2, 3]));
    let p = completion(json!({"model": "m", "prompt": [[4, 5]]})).unwrap();
    assert_eq!(p.input, Input::Tokens(vec![4, 5]));
    let (m, _) = err(completion(json!({"model": "m", "prompt": [1, -2]})));
    assert_eq!(
        m,
        "prompt[1] must be a token id (an integer from 0 to 4294967295)."
    );
}

#[test]
fn range_errors_name_the_field() {
    let base = |k: &str, v: Value| {
        let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        b[k] = v;
        chat(b)
    };
    assert_eq!(
        err(base("max_tokens", json!(0))),
        (
            "max_tokens must be at least 1, got 0.".into(),
            Some("max_tokens".into())
        )
    );
    assert_eq!(
        err(base("max_completion_tokens", json!(-3))).0,
        "max_completion_tokens must be at least 1, got -3."
    );
    assert_eq!(
        err(base("temperature", json!(2.5))).0,
        "temperature must be between 0 and 2, got 2.5."
    );
    assert_eq!(
        err(base("temperature", json!(-0.1))).0,
        "temperature must be between 0 and 2, got -0.1."
    );
    assert_eq!(
        err(base("top_p", json!(0))).0,
        "top_p must be greater than 0 and at most 1, got 0."
    );
    assert_eq!(err(base("top_p", json!(1.5))).1, Some("top_p".to_string()));
    assert_eq!(
        err(base("n", json!(2))).0,
        "n = 2 is not supported: this server returns exactly one choice per request (n = 1)."
    );
    assert_eq!(
        err(base("stop", json!(["a", "b", "c", "d", "e"]))).0,
        "stop may hold at most 4 strings, got 5."
    );
    assert_eq!(
        err(base("stream_options", json!({"include_usage": true}))).0,
        "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    );
}

#[test]
fn type_errors_name_the_field() {
    let (m, p) = err(chat(json!({"model": "m", "messages": "hi"})));
    assert_eq!(
        (m.as_str(), p.as_deref()),
        (
            "Invalid type for 'messages': expected an array, but got a string instead.",
            Some("messages")
        )
    );
    let (m, _) = err(chat(
        json!({"model": "m", "messages": [{"role": "user", "content": 5}]}),
    ));
    assert_eq!(
        m,
        "Invalid type for 'messages[0].content': expected a string or an array of content parts, but got a number instead."
    );
    let (m, _) = err(chat(
        json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "5"}),
    ));
    assert_eq!(
        m,
        "Invalid type for 'max_tokens': expected an integer, but got a string instead."
    );
    let (m, _) = err(chat(json!({"model": 3, "messages": []})));
    assert_eq!(
        m,
        "Invalid type for 'model': expected a string, but got a number instead."
    );
}

#[test]
fn empty_and_missing_inputs() {
    assert_eq!(
        err(chat(json!({"model": "m", "messages": []}))).0,
        "'messages' must contain at least one message."
    );
    assert_eq!(
        err(completion(json!({"model": "m", "prompt": ""}))).0,
        "The prompt must not be empty."
    );
    assert_eq!(
        err(completion(json!({"model": "m", "prompt": []}))).0,
        "The prompt must not be empty."
    );
    assert_eq!(
        err(completion(json!({"model": "m", "prompt": ["a", "b"]}))).0,
        "Batched prompts are not supported: send one prompt per request."
    );
    assert_eq!(
        err(completion(json!({"prompt": "a"}))).0,
        "You must provide a model parameter ('model')."
    );
    assert_eq!(
        err(chat(
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
        ))
        .0,
        "Content parts of type 'image_url' are not supported; only 'text' parts are."
    );
}
