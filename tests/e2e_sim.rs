//! `tandem up --engine sim`: a simulated Llama-2-70B on TP4 H100s behind the real gateway, router,
//! workers and KV transport.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{Up, info, post, stream};
use tandem_proto::v1;
use tandem_sim::engine::{SimSpec, build};
use tandem_sim::perf::PerfModel;

/// A simulated Llama-2-70B cluster on TP4 H100s: `prefill` and `decode` worker processes, simulated
/// times scaled by `time_scale`, and any further `tandem up` flags.
fn sim_up(time_scale: &str, prefill: &str, decode: &str, extra: &[&str]) -> Up {
    let mut args = vec![
        "--engine",
        "sim",
        "--sim-model",
        "llama-2-70b",
        "--sim-gpu",
        "h100",
        "--tp",
        "4",
        "--prefill",
        prefill,
        "--decode",
        decode,
        "--sim-time-scale",
        time_scale,
    ];
    args.extend_from_slice(extra);
    Up::start(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_70b_cluster_streams_completions_to_the_end() {
    let up = sim_up("0.01", "2", "2", &[]);
    assert_eq!(up.model, "llama-2-70b");
    // Every worker runs the sim engine; decode pools hold the simulated GPUs' KV capacity.
    let want = build(&SimSpec {
        model: "llama-2-70b",
        gpu: "h100",
        tp: 4,
        time_scale: 1.0,
        vocab: None,
        catalog: None,
        profile: None,
    })
    .unwrap();
    for role in [v1::WorkerRole::Prefill, v1::WorkerRole::Decode] {
        let addrs = up.addrs(role).await;
        assert_eq!(addrs.len(), 2);
        for (addr, _) in addrs {
            let i = info(&addr).await;
            assert_eq!(i.engine, "sim");
            if role == v1::WorkerRole::Decode {
                assert_eq!(i.load.unwrap().total_kv_blocks as usize, want.kv_blocks);
            }
        }
    }
    for n in 0..3 {
        let body = json!({
            "model": up.model,
            "messages": [{"role": "user", "content": format!("Question {n}: what is a GPU?")}],
            "max_tokens": 24,
            "stream": true,
        });
        let s = stream(&up.url, "/v1/chat/completions", &body, None).await;
        assert_eq!(s.status, 200);
        assert!(s.done, "the stream did not end with [DONE]");
        let finish = s
            .events
            .iter()
            .filter_map(|e| e["choices"][0]["finish_reason"].as_str())
            .next_back();
        assert!(matches!(finish, Some("length" | "stop")), "{:?}", s.events);
        assert!(!s.text().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_takes_at_least_the_simulated_time() {
    let up = sim_up("1", "2", "2", &[]);
    let body = json!({
        "model": up.model,
        "prompt": "Once upon a time",
        "max_tokens": 16,
        "temperature": 0,
        "return_token_ids": true,
    });
    let t0 = Instant::now();
    let (status, v) = post(&up.url, "/v1/completions", &body).await;
    let took = t0.elapsed();
    assert_eq!(status, 200, "{v}");
    let generated = v["usage"]["completion_tokens"].as_u64().unwrap();
    let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(generated >= 1);
    // Each token after the first is one decode step of the simulated model: sleeping never ends
    // early, so the request cannot be faster than that (a lower bound, safe on any machine).
    let cat = tandem_sim::catalog::Catalog::builtin().unwrap();
    let r = tandem_sim::roofline::Roofline::new(
        cat.model("llama-2-70b").unwrap(),
        cat.gpu("h100").unwrap(),
        4,
        tandem_sim::roofline::Efficiency::CALIBRATED,
    )
    .unwrap();
    let step = Duration::from_secs_f64(r.decode_step_time(1, prompt));
    let prefill = Duration::from_secs_f64(
        r.prefill_time(&[tandem_sim::perf::PrefillItem::fresh(prompt as u32)]),
    );
    assert!(step > Duration::from_millis(5), "{step:?}");
    let floor = prefill + step * (generated as u32 - 1);
    assert!(took >= floor, "{took:?} < {floor:?}");
}

/// A bench run's summary and the simulator's replay of it.
struct Replayed {
    measured: serde_json::Value,
    simulated: serde_json::Value,
}

impl Replayed {
    /// Asserts that the medians of `metric` (`ttft_ms`, `itl_ms`) agree within 10%.
    fn assert_close(&self, metric: &str, what: &str) {
        let (m, s) = (
            self.measured[metric]["p50"].as_f64().unwrap(),
            self.simulated[metric]["p50"].as_f64().unwrap(),
        );
        eprintln!(
            "{what}: {metric} p50 sim engine {m:.1} ms, DES {s:.1} ms, ratio {:.3}",
            s / m
        );
        assert!(
            (s / m - 1.0).abs() <= 0.10,
            "{what}: {metric} p50 sim engine {m:.1} ms, DES {s:.1} ms"
        );
    }
}

/// Runs `tandem bench` against `up`, then `tandem plan --simulate` replaying the very requests it
/// sent.
fn bench_and_replay(up: &Up, scale: &str, osl: &str, rate: &str, n: &str) -> Replayed {
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let bench = dir.join(format!("tandem-des-e2e-{pid}-{osl}.json"));
    let status = std::process::Command::new(support::BIN)
        .args([
            "bench",
            "--url",
            &up.url,
            "--model",
            &up.model,
            "--api",
            "completions",
        ])
        .args([
            "--isl",
            "normal:200,75,50,400",
            "--osl",
            osl,
            "--rate",
            rate,
        ])
        .args([
            "--arrival",
            "poisson",
            "--requests",
            n,
            "--seed",
            "1",
            "--quiet",
        ])
        .arg("--tokenizer")
        .arg(support::model_path())
        .arg("--json")
        .arg(&bench)
        .status()
        .unwrap();
    assert!(status.success());
    let out = std::process::Command::new(support::BIN)
        .args(["plan", "--model", "llama-2-70b", "--gpu", "h100", "--json"])
        .args(["--simulate", "prefill=1,decode=1,tp=4,step-tokens=512"])
        .args(["--time-scale", scale, "--replay"])
        .arg(&bench)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let measured: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&bench).unwrap()).unwrap();
    let _ = std::fs::remove_file(&bench);
    let simulated: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let measured = measured["runs"][0]["summary"].clone();
    assert_eq!(measured["failed"], 0, "{measured}");
    Replayed {
        measured,
        simulated,
    }
}

/// The discrete-event simulator and the `sim` engine agree (issue 4): the same cluster (one
/// prefill and one decode worker, Llama-2-70B on four H100s each, 512 prompt tokens per step) and
/// the same requests give medians within 10%. The simulated times are scaled (6x, and 12x under
/// decoding, where first tokens come sooner) so that the control plane's own milliseconds (tens
/// in a debug build on a loaded machine) stay small beside them.
///
/// TTFT is checked with one-token answers (prefill alone), then TTFT and ITL together under a
/// decoding load: a prompt's first token must not wait for the decode step in progress (Reserve
/// and the KV commit do not take the engine that a step holds; see BENCHMARKS.md, "The simulator
/// against the sim engine").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_predicts_the_sim_engine_within_ten_percent() {
    tokio::task::spawn_blocking(|| {
        let scale = "6";
        let up = sim_up(scale, "1", "1", &["--step-tokens", "512"]);
        // About 70% of the prefill worker's capacity at this scale: prompts queue and batch.
        bench_and_replay(&up, scale, "1", "4", "48").assert_close("ttft_ms", "prefill only");
        drop(up);
        let scale = "12";
        let up = sim_up(scale, "1", "1", &["--step-tokens", "512"]);
        // Prompts arrive while earlier answers decode (about 6 sequences in the batch).
        let decoding = bench_and_replay(&up, scale, "16", "1", "16");
        decoding.assert_close("ttft_ms", "while decoding");
        decoding.assert_close("itl_ms", "while decoding");
    })
    .await
    .unwrap();
}
