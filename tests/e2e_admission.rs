//! Latency-budget admission through `tandem up`: bad budget headers, budgets no worker can meet,
//! overload answered with 429s while the admitted keep their budget, nothing refused below
//! capacity, and an ITL budget that keeps a burst of new requests off a running stream.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Answer, Up, send};

const TTFT: &str = "x-tandem-ttft-budget-ms";
const ITL: &str = "x-tandem-itl-budget-ms";
const PRIORITY: &str = "x-tandem-priority";
const PREDICTED: &str = "x-tandem-predicted-ttft-ms";

fn chat(model: &str, words: usize, max_tokens: u32, stream: bool) -> Value {
    let content =
        "Tell me about the rivers and the mountains of the north. ".repeat(words / 10 + 1);
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
    })
}

fn code(a: &Answer) -> &str {
    a.events[0]["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_budgets_are_400s_and_unreachable_ones_429s_at_once() {
    let up = Up::start(&[]);
    let body = chat(&up.model, 20, 4, false);
    for (name, value) in [
        (TTFT, "-5"),
        (TTFT, "0"),
        (TTFT, "soon"),
        (TTFT, "86400000"),
        (ITL, "0"),
        (ITL, "1e3"),
        (PRIORITY, "urgent"),
    ] {
        let a = send(&up.url, "/v1/chat/completions", &body, &[(name, value)]).await;
        assert_eq!(a.status, 400, "{name}: {value}: {:?}", a.events);
        assert_eq!(a.events[0]["error"]["param"], name, "{name}: {value}");
    }
    // The prefill worker timed its warm-up prompts: one millisecond is below what an idle worker
    // gives any prompt, and no wait would help.
    let a = send(&up.url, "/v1/chat/completions", &body, &[(TTFT, "1")]).await;
    assert_eq!(a.status, 429, "{:?}", a.events);
    assert_eq!(code(&a), "ttft_budget_unreachable");
    assert!(a.header("retry-after").is_none());
    assert!(a.header(PREDICTED).unwrap().parse::<u64>().unwrap() > 1);
    assert!(
        a.ttft < Duration::from_secs(1),
        "refused at once, not after a wait"
    );
    // A generous budget is admitted and told its prediction.
    let a = send(&up.url, "/v1/chat/completions", &body, &[(TTFT, "30000")]).await;
    assert_eq!(a.status, 200, "{:?}", a.events);
    assert!(a.header(PREDICTED).unwrap().parse::<u64>().is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_with_retry_after_and_the_admitted_keep_their_budget() {
    let up = Arc::new(Up::start(&[]));
    let body = chat(&up.model, 60, 4, true);
    // What one prompt alone is predicted to take sizes the budget, whatever this host's speed:
    // eight of them (with the margin admission keeps, room for about five queued prompts).
    let alone = send(&up.url, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(alone.status, 200, "{:?}", alone.events);
    let one: u64 = alone.header(PREDICTED).unwrap().parse().unwrap();
    let budget = (8 * one).max(50);
    let budget_header = budget.to_string();
    let within = Duration::from_millis(budget);
    // Below capacity, one at a time: nothing is refused (and the predictions calibrate).
    for _ in 0..8 {
        let a = send(
            &up.url,
            "/v1/chat/completions",
            &body,
            &[(TTFT, &budget_header)],
        )
        .await;
        assert_eq!(a.status, 200, "{:?}", a.events);
        assert!(a.header(PREDICTED).is_some());
    }
    // Then 40 at once: five budgets' worth of prefill on one worker.
    let mut tasks = Vec::new();
    for _ in 0..40 {
        let (up, body, b) = (up.clone(), body.clone(), budget_header.clone());
        tasks.push(tokio::spawn(async move {
            send(&up.url, "/v1/chat/completions", &body, &[(TTFT, &b)]).await
        }));
    }
    let mut admitted = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let a = t.await.unwrap();
        assert!(
            a.header(PREDICTED).is_some(),
            "every answer states its prediction"
        );
        match a.status {
            200 => admitted.push(a.ttft),
            429 => {
                refused += 1;
                assert_eq!(code(&a), "ttft_budget_unreachable", "{:?}", a.events);
                let after: u64 = a.header("retry-after").unwrap().parse().unwrap();
                assert!(after >= 1);
                assert!(a.ttft < within, "refused at once");
            }
            other => panic!("status {other}: {:?}", a.events),
        }
    }
    assert!(
        refused >= 10 && admitted.len() >= 2,
        "{refused} refused, {admitted:?}"
    );
    let late = admitted.iter().filter(|t| **t > within).count();
    // The bound is a high quantile of what was measured, not a promise on each request: allow
    // one in ten over here (the benchmark measures the 99% over hundreds).
    assert!(
        late * 10 <= admitted.len(),
        "{late} of {} admitted over the {budget} ms budget: {admitted:?}",
        admitted.len()
    );
    // Every admitted stream has ended and said so: admission counts none in flight.
    let mut in_flight = String::new();
    for _ in 0..50 {
        let (_, metrics) = support::get(&up.url, "/metrics").await;
        in_flight = metrics
            .lines()
            .filter(|l| l.starts_with("tandem_router_in_flight{"))
            .collect::<Vec<_>>()
            .join("\n");
        if in_flight.ends_with(" 0") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        in_flight.starts_with("tandem_router_in_flight{") && in_flight.ends_with(" 0"),
        "{in_flight}"
    );
}

/// A profile whose decode step grows 10 ms a sequence, so that a second sequence visibly breaks a
/// 15 ms ITL budget; prompts cost 1 ms plus 20 us a token.
fn steep_profile(dir: &std::path::Path) -> std::path::PathBuf {
    let prefill: Vec<Value> = [32u32, 64, 128, 256, 512]
        .iter()
        .map(|&n| json!({"prompt_lens": [n], "seconds": 0.001 + 2e-5 * f64::from(n)}))
        .collect();
    let decode: Vec<Value> = [1u32, 2, 4, 8]
        .iter()
        .map(|&b| json!({"batch": b, "context_tokens": 100 * b, "seconds": 0.01 * f64::from(b)}))
        .collect();
    let profile = json!({
        "format": 1, "model": "llama-2-70b", "hardware": "test", "engine": "native",
        "tensor_parallel": 4, "kv_bytes_per_token": 327_680, "kv_blocks": 28_000,
        "weight_bytes": 138_000_000_000u64, "prefill": prefill, "decode": decode,
    });
    let path = dir.join("steep.json");
    std::fs::write(&path, profile.to_string()).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_itl_budget_keeps_a_burst_of_new_requests_off_a_running_stream() {
    let dir = std::env::temp_dir().join(format!("tandem-itl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let profile = steep_profile(&dir);
    let up = Arc::new(Up::start(&[
        "--engine",
        "sim",
        "--sim-model",
        "llama-2-70b",
        "--tp",
        "4",
        "--sim-profile",
        profile.to_str().unwrap(),
    ]));
    // One stream alone decodes at 10 ms a token: its 15 ms budget admits it (12.5 ms bounded).
    let running = tokio::spawn({
        let up = up.clone();
        async move {
            send(
                &up.url,
                "/v1/chat/completions",
                &chat(&up.model, 20, 80, true),
                &[(ITL, "15"), (TTFT, "5000")],
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let mut burst = Vec::new();
    for _ in 0..4 {
        let up = up.clone();
        burst.push(tokio::spawn(async move {
            send(
                &up.url,
                "/v1/chat/completions",
                &chat(&up.model, 20, 4, true),
                &[(TTFT, "5000")],
            )
            .await
        }));
    }
    let stream = running.await.unwrap();
    let stream_done = started.elapsed();
    assert_eq!(stream.status, 200, "{:?}", stream.events);
    let tokens = stream
        .events
        .iter()
        .filter(|e| e["choices"][0]["delta"]["content"].is_string())
        .count();
    assert!(tokens >= 70, "{tokens} tokens");
    for b in burst {
        let a = b.await.unwrap();
        assert_eq!(a.status, 200, "{:?}", a.events);
        // Each waited in the router's queue until the stream had finished (its first token came
        // after the stream's last), rather than joining the batch and slowing it to 20 ms a step.
        assert!(
            a.ttft >= stream_done.saturating_sub(Duration::from_millis(50)),
            "admitted after {:?}, the stream ended after {stream_done:?}",
            a.ttft
        );
    }
    let (_, metrics) = support::get(&up.url, "/metrics").await;
    let queued: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("tandem_router_admission_total{decision=\"queued\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(queued, 4, "{metrics}");
    let _ = std::fs::remove_dir_all(&dir);
}
