//! Running sequences that move between decode workers with their KV. A drain (SIGTERM) migrates a
//! worker's streams to another over tcp and shm: every stream goes on to its 200 tokens, equal to
//! an undisturbed run (greedy and seeded), nothing is recomputed, and the worker exits long before
//! its grace. Alone, a worker finishes its streams. A migration whose KV is damaged on the way
//! leaves its stream running where it was.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::Duration;

use support::kv_proxy::KvProxy;
use support::procs::{gateway, worker};
use support::streams::{streams_survive, streams_survive_with};
use support::{Up, counter, workers_of};
use tandem_proto::v1;

const MIGRATED: &str = "tandem_stream_moves_total{cause=\"migrated\"}";
const FAILED_OVER: &str = "tandem_stream_moves_total{cause=\"failover\"}";

/// SIGTERM of the decode worker running the most of four streams, under `tandem up` with a
/// second decode worker and KV over `transport`.
async fn a_drain_migrates_its_streams(transport: &str) {
    let up = Up::start(&[
        "--decode",
        "2",
        "--worker-threads",
        "1",
        "--drain-grace",
        "60s",
        "--transport",
        transport,
    ]);
    let decodes = up.addrs(v1::WorkerRole::Decode).await;
    let victim = streams_survive(&up.url, &decodes, "-TERM").await;
    let took = victim.exited().await;
    assert!(
        took < Duration::from_secs(10),
        "exited {took:?} after SIGTERM: its streams did not move"
    );
    let migrated = counter(&up.url, MIGRATED).await;
    let failed_over = counter(&up.url, FAILED_OVER).await;
    assert!(
        migrated >= 1.0 && failed_over == 0.0,
        "{migrated} streams migrated, {failed_over} recomputed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_decode_worker_migrates_its_streams_over_tcp() {
    a_drain_migrates_its_streams("tcp").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_decode_worker_migrates_its_streams_over_shm() {
    a_drain_migrates_its_streams("shm").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alone_a_decode_worker_told_to_stop_finishes_its_streams_then_exits() {
    let up = Up::start(&["--worker-threads", "1"]);
    // No other decode worker could take a stream: each ends on this one, then it exits, long
    // before its 30 s grace.
    let decodes = up.addrs(v1::WorkerRole::Decode).await;
    let victim = streams_survive(&up.url, &decodes, "-TERM").await;
    let took = victim.exited().await;
    assert!(took < Duration::from_secs(30), "exited after {took:?}");
    assert_eq!(counter(&up.url, MIGRATED).await, 0.0);
}

/// The TCP ports process `pid` listens on (`ss` from iproute2).
fn listening(pid: u32) -> Vec<String> {
    let out = Command::new("ss").args(["-Htlnp"]).output().unwrap();
    assert!(out.status.success(), "ss: {out:?}");
    let tag = format!("pid={pid},");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&tag))
        .filter_map(|l| l.split_whitespace().nth(3).map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_whose_kv_is_damaged_leaves_its_stream_running_where_it_was() {
    let _serial = support::Permit::take();
    let (_gateway, url, router) = gateway(&[]);
    let router = router.unwrap();
    // Each decode worker's KV goes through a proxy that can damage it.
    let proxies = [
        KvProxy::start("127.0.0.1", String::new()).await,
        KvProxy::start("127.0.0.1", String::new()).await,
    ];
    let _workers = [
        worker("prefill-worker", &router, &[]),
        worker(
            "decode-worker",
            &router,
            &["--drain-grace", "60s", "--kv-advertise", &proxies[0].addr],
        ),
        worker(
            "decode-worker",
            &router,
            &["--drain-grace", "60s", "--kv-advertise", &proxies[1].addr],
        ),
    ];
    let mut decodes = Vec::new();
    for _ in 0..2400 {
        let ws = workers_of(&router).await;
        decodes = ws
            .iter()
            .filter_map(|w| w.identity.clone())
            .filter(|i| i.role == v1::WorkerRole::Decode as i32)
            .collect::<Vec<_>>();
        if ws.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(decodes.len(), 2, "the decode workers did not register");
    // Each proxy forwards to its worker's KV listener: the one that is not its gRPC one.
    for d in &decodes {
        let p = proxies.iter().find(|p| p.addr == d.kv_endpoint).unwrap();
        let kv = listening(d.pid)
            .into_iter()
            .find(|a| *a != d.grpc_addr)
            .expect("a KV listener");
        p.forward_to(kv);
    }
    let addrs: Vec<(String, u32)> = decodes
        .iter()
        .map(|d| (d.grpc_addr.clone(), d.pid))
        .collect();
    let damaged = std::sync::Mutex::new(None);
    let victim = streams_survive_with(&url, &addrs, "-TERM", |victim| {
        // The other worker's KV is damaged from now on: what moves there is refused.
        let other = decodes.iter().find(|d| d.grpc_addr != victim).unwrap();
        let p = proxies
            .iter()
            .find(|p| p.addr == other.kv_endpoint)
            .unwrap();
        p.corrupt(true);
        *damaged.lock().unwrap() = Some(p);
    })
    .await;
    let damaged = damaged.into_inner().unwrap().unwrap();
    assert!(damaged.corrupted() > 0, "no migration was tried");
    // Every stream ended equal to its undisturbed run, none moved: those on the drained worker
    // finished there, which then exited.
    assert_eq!(counter(&url, MIGRATED).await, 0.0);
    assert_eq!(counter(&url, FAILED_OVER).await, 0.0);
    let took = victim.exited().await;
    assert!(
        took < Duration::from_secs(60),
        "exited {took:?} after SIGTERM"
    );
}
