//! `tandem bench` against `tandem up`: 20 requests all succeed, every token count matches the usage
//! the server returned, and the ITL the report gives is the one the stream's chunk times imply.
#![allow(clippy::unwrap_used)]

mod support;

use serde_json::Value;
use support::{BIN, Up, model_path};

#[test]
fn tandem_bench_against_tandem_up_counts_every_token_and_times_the_stream() {
    let up = Up::start(&["--worker-threads", "1"]);
    let out = std::env::temp_dir().join(format!("tandem-bench-e2e-{}.json", std::process::id()));
    let status = std::process::Command::new(BIN)
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
            "24",
            "--osl",
            "6",
            "--concurrency",
            "4",
            "--requests",
            "20",
        ])
        .args(["--warmup", "0", "--quiet", "--tokenizer"])
        .arg(model_path())
        .arg("--json")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let report: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out);
    let run = &report["runs"][0];
    assert_eq!(run["summary"]["succeeded"], 20, "{}", run["summary"]);
    assert_eq!(run["summary"]["failed"], 0);
    let records = run["records"].as_array().unwrap();
    assert_eq!(records.len(), 20);
    let mut gaps = Vec::new();
    for r in records {
        // Fixed-length outputs (ignore_eos): every request got its 6 tokens, as the server says.
        assert_eq!(r["output_tokens"], 6, "{r}");
        assert_eq!(r["usage"]["completion_tokens"], r["output_tokens"], "{r}");
        let chunks: Vec<f64> = r["chunk_s"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_f64().unwrap())
            .collect();
        let tokens: Vec<u64> = r["chunk_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap())
            .collect();
        assert_eq!(tokens.iter().sum::<u64>(), 6, "{r}");
        assert_eq!(r["first_token_s"].as_f64().unwrap(), chunks[0]);
        assert!(
            chunks.windows(2).all(|w| w[0] <= w[1])
                && *chunks.last().unwrap() <= r["end_s"].as_f64().unwrap()
        );
        // A chunk of k tokens after a gap g counts k inter-token gaps of g / k.
        for (w, &k) in chunks.windows(2).zip(&tokens[1..]) {
            gaps.extend(std::iter::repeat_n(
                1000.0 * (w[1] - w[0]) / k as f64,
                k as usize,
            ));
        }
    }
    gaps.sort_by(f64::total_cmp);
    let itl = &run["summary"]["itl_ms"];
    let max = *gaps.last().unwrap();
    assert!(
        (itl["max"].as_f64().unwrap() - max).abs() <= 1e-9 * max,
        "{itl} vs {max}"
    );
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    assert!(
        (itl["mean"].as_f64().unwrap() - mean).abs() < 1e-6 * mean.max(1.0),
        "{itl} vs {mean}"
    );
}
