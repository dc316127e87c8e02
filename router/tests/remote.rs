//! A gateway's link to a standalone router over a real socket: placements and reports go to the
//! router; while it is away, the link places on the last worker set it saw; when a router is back
//! at the address, the link follows its set. Real clock (leases of 3 s), generous limits.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::Duration;

use tandem_proto::v1;
use tandem_proto::v1::router_service_client::RouterServiceClient;
use tandem_router::{
    LeastLoaded, Leg, RemoteRouter, RequestShape, RouterConfig, RouterError, RouterLink,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

fn identity(id: &str, role: v1::WorkerRole) -> v1::WorkerIdentity {
    v1::WorkerIdentity {
        worker_id: id.into(),
        role: role.into(),
        grpc_addr: format!("127.0.0.1:{}", id.len()),
        kv_endpoint: "127.0.0.1:3".into(),
        kv_transport: v1::KvTransportKind::Tcp.into(),
        model: "smol".into(),
        ..v1::WorkerIdentity::default()
    }
}

fn load() -> v1::LoadReport {
    v1::LoadReport {
        state: v1::WorkerState::Ready.into(),
        free_kv_blocks: 100,
        total_kv_blocks: 100,
        ..v1::LoadReport::default()
    }
}

/// A router serving at `addr` until the returned sender is dropped.
async fn router(addr: &str) -> (String, oneshot::Sender<()>) {
    let handle = tandem_router::spawn(RouterConfig::default(), Box::new(LeastLoaded));
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(tandem_router::serve(
        listener,
        async move {
            let _ = stopped.await;
        },
        handle,
    ));
    (addr, stop)
}

/// Workers `p` and `d` of the router at `addr`, heartbeating until the task is aborted.
fn workers(addr: &str, p: &'static str, d: &'static str) -> tokio::task::JoinHandle<()> {
    let url = format!("http://{addr}");
    tokio::spawn(async move {
        let mut client = RouterServiceClient::connect(url).await.unwrap();
        loop {
            for (id, role) in [(p, v1::WorkerRole::Prefill), (d, v1::WorkerRole::Decode)] {
                let beat = v1::HeartbeatRequest {
                    worker_id: id.into(),
                    load: Some(load()),
                };
                if client.heartbeat(beat).await.is_err() {
                    let join = v1::RegisterRequest {
                        identity: Some(identity(id, role)),
                        load: Some(load()),
                    };
                    let _ = client.register(join).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

fn shape() -> RequestShape {
    RequestShape {
        model: "smol".into(),
        prompt_tokens: 16,
        max_new_tokens: 8,
        ..RequestShape::default()
    }
}

/// The pair `link` places on, waiting up to 20 s for it to be `want`.
async fn places_on(link: &RouterLink, want: (&str, &str)) {
    let mut got = None;
    for _ in 0..200 {
        if let Ok(p) = link.place(shape()).await {
            let pair = (p.prefill.worker_id.clone(), p.decode.worker_id.clone());
            if pair == (want.0.to_owned(), want.1.to_owned()) {
                return;
            }
            got = Some(pair);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("placed on {got:?}, never on {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn places_through_the_router_then_on_the_last_set_while_it_is_away_then_through_it_again() {
    let (addr, stop) = router("127.0.0.1:0").await;
    let first = workers(&addr, "p0", "d0");
    let remote = RemoteRouter::new(
        std::slice::from_ref(&addr),
        RouterConfig::default(),
        Box::new(LeastLoaded),
    )
    .unwrap();
    let link = RouterLink::Remote(remote);
    places_on(&link, ("p0", "d0")).await;
    let again = link
        .place_prefill(RequestShape {
            exclude: vec!["d0".into()],
            ..shape()
        })
        .await
        .unwrap();
    assert_eq!(again.worker_id, "p0");

    // A failure reported keeps new work off the worker, at the router and in the link's copy.
    link.report("d0", false);
    tokio::time::sleep(Duration::from_millis(200)).await;
    match link.place(shape()).await {
        Err(RouterError::NoWorkers(Leg::Decode)) => {}
        other => panic!("placed on a worker reported failed: {other:?}"),
    }

    // The router goes away: the last set known still serves (d0's report has worn off by then).
    drop(stop);
    first.abort();
    tokio::time::sleep(Duration::from_secs(1)).await;
    places_on(&link, ("p0", "d0")).await;
    assert_eq!(link.workers().ready_for(Leg::Decode), 1);

    // A router comes back at the same address with other workers: the link follows its set.
    let (back, _stop) = router(&addr).await;
    assert_eq!(back, addr);
    let _second = workers(&addr, "p1", "d1");
    places_on(&link, ("p1", "d1")).await;
    // And its copy of the set drops the workers that router does not list (after a grace for
    // workers registering again with a restarted router).
    let ids = || -> Vec<String> {
        let mut v: Vec<String> = link
            .workers()
            .workers
            .iter()
            .map(|w| w.identity.worker_id.clone())
            .collect();
        v.sort();
        v
    };
    for _ in 0..200 {
        if ids() == ["d1", "p1"] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the old workers stayed: {:?}", ids());
}
