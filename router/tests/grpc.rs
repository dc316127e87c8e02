//! The RouterService over a real socket: register, heartbeat, watch, place, and a lease that
//! lapses. Leases run on the real clock here (paused time would race ahead while sockets are
//! read), so the test waits for events with generous limits rather than timing anything.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::Duration;

use tandem_proto::v1;
use tandem_proto::v1::router_service_client::RouterServiceClient;
use tandem_router::{LeastLoaded, RegistryConfig, RouterConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

const LEASE: Duration = Duration::from_millis(1000);
const PATIENCE: Duration = Duration::from_secs(20);

fn identity(id: &str, role: v1::WorkerRole) -> v1::WorkerIdentity {
    v1::WorkerIdentity {
        worker_id: id.into(),
        role: role.into(),
        grpc_addr: format!(
            "127.0.0.1:{}",
            if role == v1::WorkerRole::Prefill {
                1
            } else {
                2
            }
        ),
        kv_endpoint: "127.0.0.1:3".into(),
        kv_transport: v1::KvTransportKind::Tcp.into(),
        model: "smol".into(),
        ..v1::WorkerIdentity::default()
    }
}

fn load(queued: u64, free: u64) -> v1::LoadReport {
    v1::LoadReport {
        state: v1::WorkerState::Ready.into(),
        queued_prefill_tokens: queued,
        free_kv_blocks: free,
        total_kv_blocks: 100,
        ..v1::LoadReport::default()
    }
}

fn place_request(prompt: u32) -> v1::PlaceRequest {
    v1::PlaceRequest {
        request_id: "r1".into(),
        prompt_tokens: prompt,
        max_new_tokens: 8,
        ..v1::PlaceRequest::default()
    }
}

fn ids(set: &v1::WorkerSet) -> Vec<String> {
    set.workers
        .iter()
        .map(|w| w.identity.as_ref().unwrap().worker_id.clone())
        .collect()
}

/// Heartbeats `d0` until dropped, registering again if the router ever forgets it (as a real
/// worker does), so that a slow machine cannot make this test fail for the wrong worker.
fn keep_alive(mut client: RouterServiceClient<Channel>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let beat = v1::HeartbeatRequest {
                worker_id: "d0".into(),
                load: Some(load(0, 100)),
            };
            if let Err(status) = client.heartbeat(beat).await {
                assert_eq!(status.code(), tonic::Code::NotFound);
                let again = v1::RegisterRequest {
                    identity: Some(identity("d0", v1::WorkerRole::Decode)),
                    load: Some(load(0, 100)),
                };
                client.register(again).await.unwrap();
            }
            tokio::time::sleep(LEASE / 10).await;
        }
    })
}

#[tokio::test]
async fn register_heartbeat_watch_place_and_lapse() {
    let config = RouterConfig {
        registry: RegistryConfig {
            lease: LEASE,
            heartbeat_interval: LEASE / 10,
            ..RegistryConfig::default()
        },
        sweep_interval: Duration::from_millis(20),
        ..RouterConfig::default()
    };
    let handle = tandem_router::spawn(config, Box::new(LeastLoaded));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(tandem_router::serve(
        listener,
        async move {
            let _ = stopped.await;
        },
        handle,
    ));
    let mut client = RouterServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    for (id, role, l) in [
        ("p0", v1::WorkerRole::Prefill, load(0, 0)),
        ("d0", v1::WorkerRole::Decode, load(0, 100)),
    ] {
        let req = v1::RegisterRequest {
            identity: Some(identity(id, role)),
            load: Some(l),
        };
        let granted = client.register(req).await.unwrap().into_inner();
        assert_eq!(granted.worker_id, id);
        assert_eq!(granted.lease_ms, 1000);
        assert_eq!(granted.heartbeat_interval_ms, 100);
    }
    let bad = v1::RegisterRequest {
        identity: None,
        load: None,
    };
    assert_eq!(
        client.register(bad).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    let mut watch = client
        .watch_workers(v1::WatchWorkersRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(ids(&first), ["d0", "p0"]);

    let beat = v1::HeartbeatRequest {
        worker_id: "p0".into(),
        load: Some(load(10, 0)),
    };
    assert_eq!(
        client.heartbeat(beat).await.unwrap().into_inner().lease_ms,
        1000
    );
    let stranger = v1::HeartbeatRequest {
        worker_id: "x".into(),
        load: Some(load(0, 0)),
    };
    assert_eq!(
        client.heartbeat(stranger).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    let placed = client.place(place_request(20)).await.unwrap().into_inner();
    match placed.outcome {
        Some(v1::place_response::Outcome::Placed(p)) => {
            assert_eq!(p.prefill.unwrap().worker_id, "p0");
            assert_eq!(p.decode.unwrap().worker_id, "d0");
            assert_eq!(p.predicted_ttft_ms, None, "p0 has measured no speed");
        }
        other => panic!("expected a placement, got {other:?}"),
    }
    let empty = client.place(place_request(0)).await.unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);

    // p0 stops heartbeating; d0 keeps going. The watch must show p0 leaving and d0 staying.
    let beats = keep_alive(client.clone());
    let left = tokio::time::timeout(PATIENCE, async {
        loop {
            let set = watch.message().await.unwrap().unwrap();
            if !ids(&set).contains(&"p0".to_string()) {
                return set;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(ids(&left), ["d0"]);
    assert!(left.version > first.version);

    let refused = client.place(place_request(20)).await.unwrap().into_inner();
    match refused.outcome {
        Some(v1::place_response::Outcome::Rejected(r)) => {
            assert_eq!(r.reason(), v1::RejectReason::NoPrefillWorker);
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    let gone = v1::HeartbeatRequest {
        worker_id: "p0".into(),
        load: Some(load(0, 0)),
    };
    assert_eq!(
        client.heartbeat(gone).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    beats.abort();
    let dereg = v1::DeregisterRequest {
        worker_id: "d0".into(),
    };
    assert!(client.deregister(dereg).await.unwrap().into_inner().found);

    // Shutdown ends the watch stream, so the server is not held up by it.
    stop.send(()).unwrap();
    let ended = tokio::time::timeout(PATIENCE, async {
        while watch.message().await.ok().flatten().is_some() {}
    });
    ended.await.unwrap();
    tokio::time::timeout(PATIENCE, server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn keep_registered_joins_reports_and_leaves_on_shutdown() {
    use tandem_router::{Load, RequestShape, RouterClient, RouterError, WorkerState};

    let config = RouterConfig {
        registry: RegistryConfig {
            heartbeat_interval: Duration::from_millis(20),
            ..RegistryConfig::default()
        },
        ..RouterConfig::default()
    };
    let handle = tandem_router::spawn(config, Box::new(LeastLoaded));
    let mut sets = handle.subscribe();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = tokio::spawn(tandem_router::serve(
        listener,
        std::future::pending(),
        handle,
    ));

    let deadline = Duration::from_secs(5);
    let client = RouterClient::connect(&addr, deadline).await.unwrap();
    let (leave, left) = oneshot::channel::<()>();
    let ready = |free| Load {
        state: WorkerState::Ready,
        free_kv_blocks: free,
        total_kv_blocks: 100,
        ..Load::default()
    };
    let worker = tokio::spawn(tandem_router::keep_registered(
        client.clone(),
        identity("d0", v1::WorkerRole::Decode),
        move || v1::LoadReport::from(&ready(100)),
        async move {
            let _ = left.await;
        },
    ));
    let joined = tokio::time::timeout(PATIENCE, sets.wait_for(|s| s.workers.len() == 1));
    let joined = joined.await.unwrap().unwrap().clone();
    assert_eq!(joined.workers[0].identity.worker_id, "d0");

    // A remote placement sees d0 but no prefill worker: the rejection comes back as the error an
    // embedded router gives.
    let mut remote = client.clone();
    let shape = RequestShape {
        prompt_tokens: 4,
        max_new_tokens: 4,
        ..RequestShape::default()
    };
    let refused = remote.place(&shape).await.unwrap_err();
    assert!(
        matches!(refused, RouterError::NoWorkers(tandem_router::Leg::Prefill)),
        "{refused}"
    );
    let p0 = identity("p0", v1::WorkerRole::Prefill);
    remote
        .register(p0, v1::LoadReport::from(&ready(0)))
        .await
        .unwrap();
    let placed = remote.place(&shape).await.unwrap();
    assert_eq!(
        (
            placed.prefill.worker_id.as_str(),
            placed.decode.worker_id.as_str()
        ),
        ("p0", "d0")
    );
    assert!(remote.deregister("p0").await.unwrap());

    // The router forgets d0 (as after a restart): the loop registers it again. Versions since
    // `joined`: p0 joins, p0 leaves, d0 leaves, d0 joins again (heartbeats change nothing).
    assert!(remote.deregister("d0").await.unwrap());
    let again = |s: &std::sync::Arc<tandem_router::WorkerSet>| {
        s.version >= joined.version + 4 && s.workers.len() == 1
    };
    let back = tokio::time::timeout(PATIENCE, sets.wait_for(again));
    assert_eq!(
        back.await.unwrap().unwrap().workers[0].identity.worker_id,
        "d0"
    );

    leave.send(()).unwrap();
    tokio::time::timeout(PATIENCE, worker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let gone = tokio::time::timeout(PATIENCE, sets.wait_for(|s| s.workers.is_empty()));
    gone.await.unwrap().unwrap();
    server.abort();
}
