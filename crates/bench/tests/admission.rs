//! `run_bench` against a server with latency-budget admission control: 429 rejections are counted
//! apart from errors and never as good, the budget headers reach the server, its TTFT predictions
//! are compared with the measured TTFT, and the model defaults to the first of `/v1/models`.

mod common;

use std::time::Duration;

use common::{Behaviour, Models, Script, spawn};
use serde_json::{Value, json};
use tandem_bench::{BenchArgs, ErrorClass, Priority, run_bench};

fn args(url: &str, flags: &[&str]) -> BenchArgs {
    let mut all = vec!["bench", "--url", url, "--quiet", "--osl", "4", "--isl", "8"];
    all.extend_from_slice(flags);
    BenchArgs::try_parse_from(all).expect("valid flags")
}

fn shedding(index: usize) -> Behaviour {
    let reject = |code, retry_after| Behaviour::Reject { code, retry_after };
    match index % 8 {
        0 | 4 => Behaviour::Good,
        1 => reject(Some("ttft_budget_unreachable"), Some(2)),
        2 => reject(Some("queue_full"), Some(1)),
        3 => Behaviour::Status500,
        5 => reject(Some("itl_budget_unreachable"), None),
        6 => reject(None, Some(5)),
        _ => reject(Some("rate_limit_exceeded"), Some(3)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejections_are_counted_apart_from_errors_and_never_good() {
    let server = spawn(Script {
        plan: shedding,
        first_delay: Duration::from_millis(30),
        predicted_ttft_ms: Some(20),
        ..Script::default()
    })
    .await;
    let dir = std::env::temp_dir().join(format!("tandem-bench-admission-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json_path = dir.join("r.json");
    let flags = [
        "--requests",
        "16",
        "--concurrency",
        "4",
        "--goodput",
        "ttft:10000",
        "tpot:10000",
        "--json",
        json_path.to_str().expect("utf-8"),
    ];
    let report = run_bench(args(&server.url(), &flags), None)
        .await
        .expect("bench runs");
    let s = &report.runs[0].summary;
    // Every request is exactly one of admitted, rejected, failed.
    assert_eq!((s.requests, s.succeeded, s.failed), (16, 4, 2));
    assert_eq!((s.admission.admitted, s.admission.rejected), (4, 10));
    assert_eq!(s.errors.len(), 1);
    assert_eq!(s.errors_of(ErrorClass::Http5xx), 2);
    assert_eq!(s.errors_of(ErrorClass::Http4xx), 0);
    for code in [
        "ttft_budget_unreachable",
        "queue_full",
        "itl_budget_unreachable",
        "rate_limit_exceeded",
    ] {
        assert_eq!(s.admission.rejected_with(Some(code)), 2, "{code}");
    }
    assert_eq!(s.admission.rejected_with(None), 2);
    assert_eq!(s.admission.rejected_share, 10.0 / 16.0);
    // Only the admitted are measured as answers.
    assert_eq!(s.ttft_ms.as_ref().map(|d| d.count), Some(4));
    assert_eq!(s.total_output_tokens, 16);

    // Lenient objectives: every admitted request meets them, and nothing else does.
    let slo = s.slo.as_ref().expect("objectives given");
    assert_eq!(
        (slo.ttft_ms, slo.itl_ms, slo.e2e_ms),
        (Some(10000.0), Some(10000.0), None)
    );
    assert_eq!(slo.met, 4);
    assert_eq!(slo.attainment, 4.0 / 16.0);
    assert_eq!(slo.admitted_attainment, Some(1.0));
    assert_eq!(slo.goodput_rps, 4.0 / s.duration_s);

    // The server predicted 20 ms and took at least 30 ms: measured over predicted is at least 1.5.
    let ratio = s
        .admission
        .ttft_over_predicted
        .as_ref()
        .expect("predictions");
    assert_eq!(ratio.count, 4);
    assert!(ratio.min >= 1.5, "{ratio:?}");
    for r in &report.runs[0].records {
        let (rejected, code, retry, predicted) = match shedding(r.index) {
            Behaviour::Good => (false, None, None, Some(20.0)),
            Behaviour::Status500 => (false, None, None, None),
            Behaviour::Reject { code, retry_after } => {
                (true, code, retry_after.map(f64::from), Some(20.0))
            }
            other => panic!("unplanned {other:?}"),
        };
        assert_eq!(r.rejected, rejected, "request {}", r.index);
        assert_eq!(r.reject_code.as_deref(), code, "request {}", r.index);
        assert_eq!(r.retry_after_s, retry, "request {}", r.index);
        assert_eq!(r.predicted_ttft_ms, predicted, "request {}", r.index);
        if rejected {
            assert!(r.error.is_none() && r.first_token_s.is_none() && r.chunk_s.is_empty());
        }
        let want = r
            .ok()
            .then(|| r.ttft().map(|t| t * 1000.0 / 20.0))
            .flatten();
        assert_eq!(r.ttft_over_predicted(), want);
    }

    let table = report.to_string();
    eprintln!("{table}");
    for needle in [
        "ok 4  failed 2 (http_5xx 2)  rejected 10 (62.5%: itl_budget_unreachable 2, queue_full 2, \
         rate_limit_exceeded 2, ttft_budget_unreachable 2, unspecified 2)",
        "TTFT/predicted",
        "all 25.0% (of admitted 100.0%)",
    ] {
        assert!(table.contains(needle), "{needle} missing from\n{table}");
    }

    let j: Value =
        serde_json::from_slice(&std::fs::read(&json_path).expect("json written")).expect("json");
    let _ = std::fs::remove_dir_all(&dir);
    let sj = &j["runs"][0]["summary"];
    assert_eq!(sj["admitted"], 4);
    assert_eq!(sj["rejected"], 10);
    assert_eq!(sj["failed"], 2);
    assert_eq!(sj["errors"], json!({"http_5xx": 2}));
    assert_eq!(
        sj["rejections"],
        json!({
            "itl_budget_unreachable": 2,
            "queue_full": 2,
            "rate_limit_exceeded": 2,
            "ttft_budget_unreachable": 2,
            "unspecified": 2
        })
    );
    assert_eq!(sj["rejected_share"], 0.625);
    assert_eq!(sj["ttft_over_predicted"]["count"], 4);
    assert_eq!(sj["slo"]["admitted_attainment"], 1.0);
    assert_eq!(sj["slo"]["met"], 4);
    let recs = j["runs"][0]["records"].as_array().expect("records");
    let pick = |i: usize, keys: &[&str]| -> Vec<Value> {
        keys.iter().map(|k| recs[i][*k].clone()).collect()
    };
    let keys = [
        "rejected",
        "reject_code",
        "retry_after_s",
        "predicted_ttft_ms",
    ];
    assert_eq!(
        pick(0, &keys),
        vec![json!(false), Value::Null, Value::Null, json!(20.0)]
    );
    assert_eq!(
        pick(1, &keys),
        vec![
            json!(true),
            json!("ttft_budget_unreachable"),
            json!(2.0),
            json!(20.0)
        ]
    );
    assert_eq!(
        pick(3, &keys),
        vec![json!(false), Value::Null, Value::Null, Value::Null]
    );
    assert_eq!(recs[3]["error"]["class"], "http_5xx");
    assert_eq!(
        pick(5, &keys),
        vec![
            json!(true),
            json!("itl_budget_unreachable"),
            Value::Null,
            json!(20.0)
        ]
    );
    assert_eq!(
        pick(6, &keys),
        vec![json!(true), Value::Null, json!(5.0), json!(20.0)]
    );
    assert_eq!(recs[6]["error"], Value::Null);
}

#[tokio::test]
async fn budget_and_priority_headers_reach_the_server() {
    let server = spawn(Script::default()).await;
    let flags = [
        "--requests",
        "3",
        "--model",
        "explicit-model",
        "--ttft-budget",
        "450.5ms",
        "--itl-budget",
        "0.2ms",
        "--priority",
        "critical",
    ];
    let report = run_bench(args(&server.url(), &flags), None)
        .await
        .expect("bench runs");
    assert_eq!(report.runs[0].summary.succeeded, 3);
    let a = &report.config.admission;
    assert_eq!(
        (a.ttft_budget_ms, a.itl_budget_ms, a.priority),
        (Some(451), Some(1), Some(Priority::Critical))
    );
    assert_eq!(report.config.model, "explicit-model");
    assert!(!report.config.model_from_endpoint);
    // --model given: the model list is not asked for.
    assert_eq!(server.model_calls(), 0);
    let served = server.served();
    assert_eq!(served.len(), 3);
    for sv in served.values() {
        assert_eq!(sv.model, "explicit-model");
        assert_eq!(sv.ttft_budget.as_deref(), Some("451"));
        assert_eq!(sv.itl_budget.as_deref(), Some("1"));
        assert_eq!(sv.priority.as_deref(), Some("critical"));
    }
    assert!(
        report
            .to_string()
            .contains("budgets: TTFT 451 ms  ITL 1 ms  priority critical")
    );
}

fn every_other(index: usize) -> Behaviour {
    if index.is_multiple_of(2) {
        Behaviour::Good
    } else {
        Behaviour::Reject {
            code: Some("queue_full"),
            retry_after: Some(1),
        }
    }
}

#[tokio::test]
async fn whole_answers_are_rejected_alike_and_a_sweep_plots_rejections() {
    let server = spawn(Script {
        plan: every_other,
        models: Models::List(&["first", "second"]),
        predicted_ttft_ms: Some(1000),
        ..Script::default()
    })
    .await;
    let flags = [
        "--no-stream",
        "--requests",
        "4",
        "--sweep-concurrency",
        "1,2",
    ];
    let report = run_bench(args(&server.url(), &flags), None)
        .await
        .expect("bench runs");
    assert_eq!(report.config.model, "first");
    assert_eq!(server.model_calls(), 1);
    assert!(server.served().values().all(|sv| sv.model == "first"));
    for run in &report.runs {
        let s = &run.summary;
        assert_eq!((s.succeeded, s.failed, s.admission.rejected), (2, 0, 2));
        assert_eq!(s.admission.rejected_with(Some("queue_full")), 2);
        assert_eq!(
            s.admission.ttft_over_predicted.as_ref().map(|d| d.count),
            Some(2)
        );
        assert!(s.slo.is_none());
    }
    let svg = tandem_bench::render_svg(&report);
    assert!(svg.contains("Requests against offered load") && svg.contains(">rejected<"));
    assert!(!svg.contains(">goodput<"));
}

#[tokio::test]
async fn the_model_list_must_give_a_model() {
    for (models, says) in [
        (
            Models::Fail,
            "HTTP 500 Internal Server Error: {\"error\":\"no models\"}",
        ),
        (Models::List(&[]), "the model list is empty"),
    ] {
        let server = spawn(Script {
            models,
            ..Script::default()
        })
        .await;
        let e = run_bench(args(&server.url(), &["--requests", "2"]), None)
            .await
            .expect_err("no model")
            .to_string();
        assert_eq!(
            e,
            format!(
                "cannot find a model to ask for (pass --model): GET {}/v1/models: {says}",
                server.url()
            )
        );
        assert_eq!(server.model_calls(), 1);
        // Nothing was sent.
        assert!(server.served().is_empty());
    }
}

#[tokio::test]
async fn disagreeing_objectives_stop_the_benchmark() {
    let server = spawn(Script::default()).await;
    let flags = [
        "--slo-ttft",
        "1s",
        "--goodput",
        "ttft:500",
        "--requests",
        "2",
    ];
    let e = run_bench(args(&server.url(), &flags), None)
        .await
        .expect_err("disagree")
        .to_string();
    assert_eq!(
        e,
        "invalid arguments: --goodput ttft:500 disagrees with --slo-ttft 1s: give each objective once"
    );
    assert!(server.served().is_empty() && server.model_calls() == 0);
    // Agreeing spellings are one objective.
    let flags = [
        "--slo-itl",
        "2s",
        "--goodput",
        "tpot:2000",
        "e2el:60000",
        "--requests",
        "2",
    ];
    let report = run_bench(args(&server.url(), &flags), None)
        .await
        .expect("bench runs");
    let slo = report.runs[0].summary.slo.as_ref().expect("objectives");
    assert_eq!(
        (slo.itl_ms, slo.e2e_ms, slo.met),
        (Some(2000.0), Some(60000.0), 2)
    );
}
