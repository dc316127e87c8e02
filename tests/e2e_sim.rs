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

fn sim_up(time_scale: &str) -> Up {
    Up::start(&[
        "--engine",
        "sim",
        "--sim-model",
        "llama-2-70b",
        "--sim-gpu",
        "h100",
        "--tp",
        "4",
        "--prefill",
        "2",
        "--decode",
        "2",
        "--sim-time-scale",
        time_scale,
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_70b_cluster_streams_completions_to_the_end() {
    let up = sim_up("0.01");
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
    let up = sim_up("1");
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
