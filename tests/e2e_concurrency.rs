//! 32 concurrent streams of mixed lengths through `tandem up`: all complete, and each equals the
//! same request run alone.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use serde_json::{Value, json};
use support::{Up, post, stream};

fn body(model: &str, i: usize, streaming: bool) -> Value {
    // Prompts from a few words to a few hundred tokens; answers from 4 to 40 tokens.
    let topic = [
        "rivers", "stars", "bread", "engines", "music", "winter", "maps", "bees",
    ][i % 8];
    let prompt = format!("Tell me about {topic}. ").repeat(1 + (i * 7) % 40);
    let mut body = json!({"model": model, "prompt": prompt, "max_tokens": 4 + (i * 5) % 37,
                          "temperature": 0, "stream": streaming, "return_token_ids": true});
    if streaming {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_streams_each_equal_their_solo_run() {
    let up = Arc::new(Up::start(&["--worker-threads", "1"]));
    let mut tasks = Vec::new();
    for i in 0..32 {
        let up = up.clone();
        tasks.push(tokio::spawn(async move {
            let s = stream(&up.url, "/v1/completions", &body(&up.model, i, true), None).await;
            assert_eq!(s.status, 200);
            assert!(s.done, "stream {i} did not end with [DONE]");
            let usage = s.events.last().unwrap()["usage"].clone();
            (s.text(), usage)
        }));
    }
    let mut together = Vec::new();
    for t in tasks {
        together.push(t.await.unwrap());
    }
    for (i, (text, usage)) in together.into_iter().enumerate() {
        let (status, alone) = post(&up.url, "/v1/completions", &body(&up.model, i, false)).await;
        assert_eq!(status, 200, "{alone}");
        assert_eq!(
            text,
            alone["choices"][0]["text"].as_str().unwrap(),
            "request {i}"
        );
        assert_eq!(usage, alone["usage"], "request {i}");
        assert_eq!(
            alone["choices"][0]["token_ids"].as_array().unwrap().len() as u64,
            alone["usage"]["completion_tokens"].as_u64().unwrap()
        );
    }
}
