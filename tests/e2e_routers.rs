//! A gateway that places through a standalone router (issues 18 and 21): `tandem router`, `tandem
//! gateway --router`, and a prefill worker and two decode workers registered with the router, on
//! loopback. Greedy output equals one engine's run; then, under load, the router is killed and
//! started again at its address 5 s later: every request ends cleanly with the tokens of its
//! undisturbed run (the gateway places on the last worker set it saw meanwhile), and the workers
//! register with the router again. Then two gateways share the router and one is killed under
//! load: the other's requests all end well, and no worker keeps decoding for the dead one.
//! `scripts/chaos.sh` runs it with more rounds (`CHAOS_ROUNDS`).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::chaos::{Running, account, undisturbed};
use support::procs::{gateway, router, worker};
use support::{generate, ids, post, workers_of};

/// Waits until the router at `addr` lists three workers.
async fn registered(addr: &str) {
    for _ in 0..2400 {
        if workers_of(addr).await.len() == 3 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the workers did not register with the router");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_serves_through_a_standalone_router_and_while_it_is_away() {
    let rounds = support::chaos::rounds();
    let (mut router_proc, addr) = router("127.0.0.1:0");
    let (_gateway, url, embedded) = gateway(&["--router", &addr]);
    assert_eq!(embedded, None, "a gateway with --router embeds no router");
    let _workers = [
        worker("prefill-worker", &addr, &[]),
        worker("decode-worker", &addr, &[]),
        worker("decode-worker", &addr, &[]),
    ];
    registered(&addr).await;
    let (status, models) = support::get(&url, "/v1/models").await;
    assert_eq!(status, 200, "{models}");
    let models: serde_json::Value = serde_json::from_str(&models).unwrap();
    let model = models["data"][0]["id"].as_str().unwrap().to_owned();

    let prompt = "The capital of France is";
    let body = json!({"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0,
                      "return_token_ids": true});
    let (status, v) = post(&url, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        ids(&v["choices"][0]["token_ids"]),
        generate(prompt, false, 16).1
    );

    let want = undisturbed(&url, &model).await;
    let mut failures = Vec::new();
    for round in 0..rounds {
        let name = "router away 5 s";
        let running = Running::start(&url, &model);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let at = Instant::now();
        drop(router_proc);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (again, back) = router(&addr);
        assert_eq!(back, addr);
        router_proc = again;
        let over = Instant::now();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let done = running.finish(name).await;
        failures.extend(account(round, name, &done, &want, at, over));
        registered(&addr).await;

        let name = "kill -9 of the other gateway";
        let (doomed, doomed_url, _) = gateway(&["--router", &addr]);
        let running = Running::start(&url, &model);
        let dying = Running::start(&doomed_url, &model);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let at = Instant::now();
        drop(doomed);
        tokio::time::sleep(Duration::from_secs(4)).await;
        let done = running.finish(name).await;
        failures.extend(account(round, name, &done, &want, at, at));
        let lost = dying.finish(name).await;
        println!(
            "round {round} {name}: its clients' {} requests, {} completed before the kill",
            lost.len(),
            lost.iter().filter(|d| d.clean).count()
        );
        idle_decoders(&addr).await;
    }
    assert!(failures.is_empty(), "{failures:#?}");
    drop(router_proc);
}

/// Waits until no decode worker runs a sequence: those of a dead gateway end with its streams.
async fn idle_decoders(router: &str) {
    let decoders: Vec<String> = workers_of(router)
        .await
        .into_iter()
        .filter_map(|w| w.identity)
        .filter(|i| i.role == tandem_proto::v1::WorkerRole::Decode as i32)
        .map(|i| i.grpc_addr)
        .collect();
    for _ in 0..100 {
        let mut running = 0;
        for d in &decoders {
            running += support::info(d).await.load.map_or(0, |l| l.running_seqs);
        }
        if running == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("decode workers still run sequences of a gateway that is gone");
}
