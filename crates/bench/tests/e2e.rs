//! `run_bench` against a well-behaved local SSE server started by the test.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Behaviour, Script, spawn};
use tandem_bench::{BenchArgs, PromptTokenizer, TokenSource, run_bench};

fn good(_: usize) -> Behaviour {
    Behaviour::Good
}

fn args(url: &str, flags: &[&str]) -> BenchArgs {
    let mut all = vec!["bench", "--url", url, "--quiet"];
    all.extend_from_slice(flags);
    BenchArgs::try_parse_from(all).expect("valid flags")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_streamed_requests_match_the_server() {
    let spacing = Duration::from_millis(2);
    let server = spawn(Script {
        plan: good,
        spacing,
        tokens_per_chunk: 1,
        ..Script::default()
    })
    .await;
    let dir = std::env::temp_dir().join(format!("tandem-bench-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (json, plot) = (dir.join("r.json"), dir.join("r.svg"));
    let a = args(
        &server.url(),
        &[
            "--requests",
            "20",
            "--concurrency",
            "4",
            "--isl",
            "30",
            "--osl",
            "uniform:5-12",
            "--seed",
            "1",
            "--slo-ttft",
            "10s",
            "--slo-itl",
            "10s",
            "--json",
            json.to_str().expect("utf-8"),
            "--plot",
            plot.to_str().expect("utf-8"),
        ],
    );
    let report = run_bench(a, None).await.expect("bench runs");
    assert_eq!(report.runs.len(), 1);
    let run = &report.runs[0];
    let s = &run.summary;
    assert_eq!((s.requests, s.succeeded, s.failed), (20, 20, 0));
    assert_eq!(
        report.config.prompt_unit,
        "whitespace words (no tokenizer given)"
    );
    assert_eq!(
        report.config.url,
        format!("{}/v1/chat/completions", server.url())
    );

    // No --model: the first of the server's /v1/models, asked once.
    assert_eq!(report.config.model, "fake-model");
    assert!(report.config.model_from_endpoint);
    assert_eq!(server.model_calls(), 1);
    assert_eq!((s.admission.admitted, s.admission.rejected), (20, 0));
    assert_eq!(s.admission.ttft_over_predicted, None);

    let served = server.served();
    assert_eq!(served.len(), 20);
    let mut total = 0u64;
    let mut itl_samples = 0usize;
    for r in &run.records {
        let sv = &served[&format!("bench-1-{}", r.index)];
        assert_eq!(sv.path, "/v1/chat/completions");
        assert_eq!(sv.model, "fake-model");
        // No budget flags: no admission headers.
        assert_eq!(
            (&sv.ttft_budget, &sv.itl_budget, &sv.priority),
            (&None, &None, &None)
        );
        assert!(sv.stream && sv.ignore_eos && sv.include_usage);
        assert_eq!(sv.prompt_words, 30);
        assert_eq!(r.input_len, 30);
        assert!((5..=12).contains(&r.max_tokens));
        assert_eq!(sv.max_tokens, r.max_tokens);
        // Token counts are the server's usage, one per chunk.
        assert_eq!(r.output_tokens_source, TokenSource::Usage);
        assert_eq!(
            r.usage.map(|u| u.completion_tokens),
            Some(sv.completion_tokens)
        );
        assert_eq!(r.output_tokens, sv.completion_tokens);
        assert_eq!(r.chunk_s.len(), sv.writes.len());
        assert_eq!(r.chunk_s.len() as u32, r.max_tokens);
        total += u64::from(r.output_tokens);
        // ITL: one sample per token after the first; they sum to first-to-last chunk time.
        let itls: Vec<f64> = r.itls().collect();
        assert_eq!(itls.len(), r.chunk_s.len() - 1);
        let span = r.chunk_s[r.chunk_s.len() - 1] - r.chunk_s[0];
        assert!((itls.iter().sum::<f64>() - span).abs() < 1e-9);
        itl_samples += itls.len();
        // Causality against the server's clock (same process, same monotonic clock): no chunk is
        // seen before the server began writing it. 1 µs covers the float round trip of the times.
        let slack = Duration::from_micros(1);
        for (seen, written) in r.chunk_s.iter().zip(&sv.writes) {
            assert!(run.epoch + Duration::from_secs_f64(*seen) + slack >= *written);
        }
        // The role-only chunk is not the first token; the first token is the first content chunk.
        assert_eq!(r.first_token_s, Some(r.chunk_s[0]));
        assert!(r.send_s <= r.chunk_s[0] && r.chunk_s[r.chunk_s.len() - 1] <= r.end_s);
        let tpot = r.tpot().expect("at least five tokens");
        let ttft = r.ttft().expect("streamed");
        assert!((tpot * f64::from(r.output_tokens - 1) - (r.e2e() - ttft)).abs() < 1e-9);
    }
    assert_eq!(s.total_output_tokens, total);
    assert_eq!(s.itl_ms.as_ref().map(|d| d.count), Some(itl_samples));
    assert_eq!(s.tpot_ms.as_ref().map(|d| d.count), Some(20));
    let slo = s.slo.as_ref().expect("objectives given");
    assert_eq!((slo.met, slo.attainment), (20, 1.0));

    let table = report.to_string();
    eprintln!("{table}");
    for needle in [
        "TTFT (ms)",
        "ITL (ms)",
        "TPOT (ms)",
        "E2E (ms)",
        "ok 20",
        "goodput",
    ] {
        assert!(table.contains(needle), "{needle} missing from\n{table}");
    }
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("json written")).expect("valid json");
    let recs = j["runs"][0]["records"].as_array().expect("records");
    assert_eq!(recs.len(), 20);
    assert_eq!(
        recs[0]["chunk_s"].as_array().map(Vec::len),
        Some(run.records[0].chunk_s.len())
    );
    assert_eq!(j["runs"][0]["summary"]["succeeded"], 20);
    assert_eq!(j["runs"][0]["summary"]["admitted"], 20);
    assert_eq!(j["runs"][0]["summary"]["rejected"], 0);
    assert_eq!(j["runs"][0]["summary"]["slo"]["admitted_attainment"], 1.0);
    assert_eq!(j["config"]["model"], "fake-model");
    for key in ["reject_code", "retry_after_s", "predicted_ttft_ms"] {
        assert_eq!(recs[0].get(key), Some(&serde_json::Value::Null), "{key}");
    }
    assert_eq!(recs[0]["rejected"], false);
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(
        svg.starts_with("<svg") && svg.contains("TTFT CDF") && svg.trim_end().ends_with("</svg>")
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn completions_without_streaming() {
    let server = spawn(Script {
        plan: good,
        spacing: Duration::ZERO,
        tokens_per_chunk: 1,
        ..Script::default()
    })
    .await;
    let a = args(
        &server.url(),
        &[
            "--api",
            "completions",
            "--no-stream",
            "--requests",
            "5",
            "--workload",
            "long-answer",
        ],
    );
    let report = run_bench(a, None).await.expect("bench runs");
    let run = &report.runs[0];
    assert_eq!(run.summary.succeeded, 5);
    let served = server.served();
    for r in &run.records {
        let sv = &served[&format!("bench-1-{}", r.index)];
        assert_eq!(sv.path, "/v1/completions");
        assert!(!sv.stream && !sv.include_usage);
        assert_eq!((sv.prompt_words, sv.max_tokens), (50, 256));
        assert_eq!(r.output_tokens, 256);
        assert!(r.chunk_s.is_empty());
        assert_eq!(r.first_token_s, Some(r.end_s));
        assert_eq!(r.itls().count(), 0);
    }
}

#[tokio::test]
async fn sweeps_repeat_the_prompts_and_warmup_is_separate() {
    let server = spawn(Script {
        plan: good,
        spacing: Duration::ZERO,
        tokens_per_chunk: 1,
        ..Script::default()
    })
    .await;
    let a = args(
        &server.url(),
        &[
            "--sweep-rates",
            "200,400",
            "--arrival",
            "constant",
            "--requests",
            "6",
            "--warmup",
            "2",
            "--isl",
            "uniform:10-90",
            "--osl",
            "3",
            "--seed",
            "9",
        ],
    );
    let report = run_bench(a, None).await.expect("bench runs");
    assert_eq!(report.runs.len(), 2);
    let svg = tandem_bench::render_svg(&report);
    assert!(svg.contains("TTFT against throughput") && svg.contains("ITL against throughput"));
    eprintln!("{report}");
    assert_eq!(report.runs[1].summary.rate, Some(400.0));
    assert!(report.to_string().contains("== sweep =="));
    let served = server.served();
    assert_eq!(served.len(), 2 + 6 + 6);
    assert!(served.contains_key("bench-0-0") && served.contains_key("bench-0-1"));
    for i in 0..6 {
        let (a, b) = (
            &served[&format!("bench-1-{i}")],
            &served[&format!("bench-2-{i}")],
        );
        assert_eq!(a.prompt_words, b.prompt_words);
        assert_eq!(a.prompt_words as u32, report.runs[0].records[i].input_len);
    }
}

#[tokio::test]
async fn duration_mode_follows_the_schedule() {
    let server = spawn(Script {
        plan: good,
        spacing: Duration::ZERO,
        tokens_per_chunk: 1,
        ..Script::default()
    })
    .await;
    // Constant arrivals 50 ms apart inside 300 ms: sends at 0, 50, ..., 250 ms.
    let a = args(
        &server.url(),
        &[
            "--rate",
            "20",
            "--arrival",
            "constant",
            "--duration",
            "300ms",
            "--osl",
            "2",
        ],
    );
    let report = run_bench(a, None).await.expect("bench runs");
    assert_eq!(report.runs[0].summary.requests, 6);
    assert_eq!(report.runs[0].summary.succeeded, 6);
    assert_eq!(server.served().len(), 6);
}

/// Whitespace words as tokens.
#[derive(Default)]
struct WordTokenizer {
    vocab: Mutex<(HashMap<String, u32>, Vec<String>)>,
}

impl PromptTokenizer for WordTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        let mut v = self.vocab.lock().expect("not poisoned");
        text.split_whitespace()
            .map(|w| {
                if let Some(id) = v.0.get(w) {
                    return *id;
                }
                let id = v.1.len() as u32;
                v.1.push(w.to_string());
                v.0.insert(w.to_string(), id);
                id
            })
            .collect()
    }

    fn decode(&self, ids: &[u32]) -> String {
        let v = self.vocab.lock().expect("not poisoned");
        let words: Vec<&str> = ids
            .iter()
            .filter_map(|i| v.1.get(*i as usize).map(String::as_str))
            .collect();
        words.join(" ")
    }
}

#[tokio::test]
async fn multi_token_chunks_are_attributed_by_the_tokenizer() {
    let server = spawn(Script {
        plan: good,
        spacing: Duration::from_millis(1),
        tokens_per_chunk: 2,
        ..Script::default()
    })
    .await;
    let a = args(
        &server.url(),
        &["--requests", "4", "--isl", "40", "--osl", "8"],
    );
    let tok: Arc<dyn PromptTokenizer> = Arc::new(WordTokenizer::default());
    let report = run_bench(a, Some(tok)).await.expect("bench runs");
    assert_eq!(report.config.prompt_unit, "tokens");
    assert_eq!(report.config.prompts_inexact, 0);
    for r in &report.runs[0].records {
        // Four chunks of two tokens: usage 8, and the three later chunks give two samples each.
        assert_eq!(r.chunk_s.len(), 4);
        assert_eq!(r.chunk_tokens, vec![2, 2, 2, 2]);
        assert_eq!(r.output_tokens, 8);
        assert_eq!(r.itls().count(), 6);
        assert_eq!(r.input_len, 40);
    }
    let served = server.served();
    assert!(served.values().all(|s| s.prompt_words == 40));
    assert_eq!(
        report.runs[0].summary.itl_ms.as_ref().map(|d| d.count),
        Some(24)
    );
}
