//! `run_bench` against servers that fail in each way: every failure is counted under its class and
//! the run finishes.

mod common;

use std::time::Duration;

use common::{Behaviour, Script, spawn};
use tandem_bench::{BenchArgs, ErrorClass, run_bench};

fn args(url: &str, flags: &[&str]) -> BenchArgs {
    let mut all = vec!["bench", "--url", url, "--quiet", "--osl", "6", "--isl", "8"];
    all.extend_from_slice(flags);
    BenchArgs::try_parse_from(all).expect("valid flags")
}

fn mixed(index: usize) -> Behaviour {
    match index % 6 {
        0 => Behaviour::Good,
        1 => Behaviour::Status500,
        2 => Behaviour::DropMidStream,
        3 => Behaviour::Malformed,
        4 => Behaviour::Status400,
        _ => Behaviour::ErrorEvent,
    }
}

#[tokio::test]
async fn each_failure_is_counted_under_its_class() {
    let server = spawn(Script {
        plan: mixed,
        spacing: Duration::from_millis(1),
        tokens_per_chunk: 1,
        ..Script::default()
    })
    .await;
    let report = run_bench(
        args(&server.url(), &["--requests", "12", "--concurrency", "3"]),
        None,
    )
    .await
    .expect("bench finishes");
    let s = &report.runs[0].summary;
    assert_eq!((s.requests, s.succeeded, s.failed), (12, 2, 10));
    assert_eq!(s.errors_of(ErrorClass::Http5xx), 2);
    assert_eq!(s.errors_of(ErrorClass::Http4xx), 2);
    assert_eq!(s.errors_of(ErrorClass::Disconnected), 2);
    // A malformed chunk and an error event are both protocol failures.
    assert_eq!(s.errors_of(ErrorClass::Protocol), 4);
    for r in &report.runs[0].records {
        let class = r.error.as_ref().map(|e| e.class);
        let want = match mixed(r.index) {
            Behaviour::Good => None,
            Behaviour::Status500 => Some(ErrorClass::Http5xx),
            Behaviour::Status400 => Some(ErrorClass::Http4xx),
            Behaviour::DropMidStream => Some(ErrorClass::Disconnected),
            _ => Some(ErrorClass::Protocol),
        };
        assert_eq!(class, want, "request {}: {:?}", r.index, r.error);
    }
    // The two good answers are measured as usual.
    assert_eq!(s.ttft_ms.as_ref().map(|d| d.count), Some(2));
    assert_eq!(s.total_output_tokens, 12);
    assert!(report.to_string().contains("http_5xx 2"));
}

fn hang(_: usize) -> Behaviour {
    Behaviour::Hang
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let server = spawn(Script {
        plan: hang,
        spacing: Duration::ZERO,
        tokens_per_chunk: 1,
        ..Script::default()
    })
    .await;
    let report = run_bench(
        args(
            &server.url(),
            &[
                "--requests",
                "3",
                "--concurrency",
                "3",
                "--timeout",
                "200ms",
            ],
        ),
        None,
    )
    .await
    .expect("bench finishes");
    let s = &report.runs[0].summary;
    assert_eq!((s.failed, s.errors_of(ErrorClass::Timeout)), (3, 3));
    assert_eq!(s.request_throughput, 0.0);
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let url = format!("http://{addr}");
    let report = run_bench(args(&url, &["--requests", "3", "--model", "m"]), None)
        .await
        .expect("bench finishes");
    let s = &report.runs[0].summary;
    assert_eq!((s.failed, s.errors_of(ErrorClass::Connect)), (3, 3));
    // Without --model the benchmark needs the model list first, and stops without it.
    let e = run_bench(args(&url, &["--requests", "3"]), None)
        .await
        .expect_err("no model to ask for")
        .to_string();
    assert!(
        e.starts_with(&format!(
            "cannot find a model to ask for (pass --model): GET {url}/v1/models: "
        )),
        "{e}"
    );
}

#[tokio::test]
async fn bad_flags_are_an_error_not_a_run() {
    for flags in [
        &["--url", "https://x"][..],
        &["--url", "not a url"],
        &["--rate=-1"],
        &["--timeout", "0s"],
        &["--burstiness=-2"],
    ] {
        let mut all = vec!["bench", "--quiet"];
        all.extend_from_slice(flags);
        let a = BenchArgs::try_parse_from(all).expect("parses");
        assert!(run_bench(a, None).await.is_err(), "{flags:?}");
    }
}
