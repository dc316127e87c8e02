//! The disaggregated path in one process, on a tiny model: a router, prefill and decode workers
//! on loopback ports, and the gateway's backend driving both legs. Every output must equal a
//! single-engine run token for token.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tandem_engine::{Engine, Model, SamplingParams, generate};
use tandem_gateway::{Backend, DisaggBackend, DisaggConfig, GenerateRequest, TokenChunk};
use tandem_proto::v1;
use tandem_proto::v1::worker_control_client::WorkerControlClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

struct Cluster {
    backend: DisaggBackend,
    router: tandem_router::RouterHandle,
    router_addr: String,
    decode_addrs: Vec<String>,
    _stops: Vec<oneshot::Sender<()>>,
}

fn tiny() -> Arc<Model> {
    Arc::new(tandem_engine::tiny::tiny_model(7, true).unwrap().0)
}

async fn cluster(model: &Arc<Model>, prefills: usize, decodes: usize, shm: bool) -> Cluster {
    cluster_with(model, prefills, decodes, 0, shm).await
}

async fn cluster_with(
    model: &Arc<Model>,
    prefills: usize,
    decodes: usize,
    aggregated: usize,
    shm: bool,
) -> Cluster {
    let handle = tandem_router::spawn(
        tandem_router::RouterConfig::default(),
        Box::new(tandem_router::LeastLoaded),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let router_addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = oneshot::channel::<()>();
    let mut stops = vec![tx];
    tokio::spawn(tandem_router::serve(
        listener,
        async {
            let _ = rx.await;
        },
        handle.clone(),
    ));
    let mut decode_addrs = Vec::new();
    for i in 0..decodes + aggregated {
        let transport = if shm {
            let path = std::env::temp_dir().join(format!(
                "tandem-test-pool-{}-{i}-{}",
                std::process::id(),
                rand_suffix()
            ));
            tandem_decode_worker::KvTransport::Shm(path)
        } else {
            tandem_decode_worker::KvTransport::Tcp
        };
        let decode = Decode {
            kv_blocks: 64,
            transport,
            kv_advertise: None,
            aggregated: i >= decodes,
        };
        let (addr, stop) = decode.start(model, &router_addr).await;
        decode_addrs.push(addr);
        stops.push(stop);
    }
    for _ in 0..prefills {
        let cfg = tandem_prefill_worker::PrefillWorkerConfig {
            model_name: "tiny".into(),
            model: model.clone(),
            eos: Vec::new(),
            kv_blocks: 64,
            // Small steps, so that prompts over 24 tokens are chunked.
            step_tokens: 24,
            max_queued_tokens: 1 << 16,
            grpc_listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            advertise_host: "127.0.0.1".into(),
            router: Some(router_addr.clone()),
            // Stopped at once: these tests stop a worker to see it gone.
            drain_grace: Duration::ZERO,
        };
        let (tx, rx) = oneshot::channel::<()>();
        stops.push(tx);
        tokio::spawn(tandem_prefill_worker::run(cfg, async {
            let _ = rx.await;
        }));
    }
    let backend = DisaggBackend::new(handle.clone(), DisaggConfig::default());
    for _ in 0..200 {
        let set = handle.workers();
        if set.ready_for(tandem_router::Leg::Prefill) == prefills + aggregated
            && set.ready_for(tandem_router::Leg::Decode) == decodes + aggregated
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(backend.readiness().ready, "{:?}", backend.readiness());
    Cluster {
        backend,
        router: handle,
        router_addr,
        decode_addrs,
        _stops: stops,
    }
}

/// A decode worker on loopback, as the tests vary it.
struct Decode {
    kv_blocks: usize,
    transport: tandem_decode_worker::KvTransport,
    kv_advertise: Option<String>,
    aggregated: bool,
}

impl Decode {
    /// Starts it, registered with the router at `router_addr`; returns its gRPC address and
    /// what stops it.
    async fn start(self, model: &Arc<Model>, router_addr: &str) -> (String, oneshot::Sender<()>) {
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap().to_string();
        let cfg = tandem_decode_worker::DecodeWorkerConfig {
            model_name: "tiny".into(),
            model: model.clone(),
            eos: Vec::new(),
            kv_blocks: self.kv_blocks,
            transport: self.transport,
            grpc_listener: grpc,
            kv_listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            advertise_host: "127.0.0.1".into(),
            kv_advertise: self.kv_advertise,
            router: Some(router_addr.to_owned()),
            default_lease: Duration::from_secs(30),
            aggregated: self.aggregated,
            // Small steps, so that prompts over 24 tokens are chunked inside the batch.
            step_tokens: 24,
            drain_grace: Duration::ZERO,
        };
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(tandem_decode_worker::run(cfg, async {
            let _ = rx.await;
        }));
        (addr, tx)
    }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

fn reference(model: &Arc<Model>, prompt: &[u32], p: &SamplingParams) -> Vec<u32> {
    let mut engine = Engine::new(model.clone(), 64);
    generate(&mut engine, 1, prompt, p, &[], 512, |_| {
        tandem_engine::Flow::Continue
    })
    .unwrap()
    .tokens
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 7 + salt * 13 + 1) % 96)
        .collect()
}

async fn run(backend: &DisaggBackend, id: &str, prompt: &[u32], p: &SamplingParams) -> Vec<u32> {
    let req = GenerateRequest {
        request_id: id.into(),
        model: "tiny".into(),
        prompt_tokens: prompt.to_vec(),
        sampling: p.clone(),
        budget: Default::default(),
    };
    let mut stream = backend.generate(req).await.unwrap();
    let mut out = Vec::new();
    let mut finished = false;
    while let Some(chunk) = stream.next().await {
        let TokenChunk { tokens, finish } = chunk.unwrap();
        assert!(!finished, "a chunk after the finish");
        out.extend(tokens);
        finished = finish.is_some();
    }
    assert!(finished, "the stream ended without a finish reason");
    out
}

fn sampled(max: u32, seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: 20,
        top_p: 0.9,
        seed,
        ..SamplingParams::greedy(max)
    }
}

async fn equivalence(prefills: usize, decodes: usize, shm: bool) {
    let model = tiny();
    let c = cluster(&model, prefills, decodes, shm).await;
    same_as_one_engine(&model, &c).await;
    check_leg_metrics(&model, &c);
}

async fn same_as_one_engine(model: &Arc<Model>, c: &Cluster) {
    // Lengths around block (16) and step (24) boundaries; 100 spans five steps.
    for (i, len) in [1usize, 5, 16, 17, 24, 40, 48, 100].into_iter().enumerate() {
        let p = prompt(len, i as u32);
        for params in [SamplingParams::greedy(12), sampled(9, i as u64)] {
            let want = reference(model, &p, &params);
            assert_eq!(want.len(), params.max_tokens as usize);
            let got = run(&c.backend, &format!("r{i}"), &p, &params).await;
            assert_eq!(got, want, "prompt of {len} tokens, {params:?}");
        }
    }
}

fn check_leg_metrics(model: &Arc<Model>, c: &Cluster) {
    // Every one of the 16 prefills reported its timings and KV bytes.
    let mut text = String::new();
    c.backend.render_metrics(&mut text);
    assert!(
        text.contains("tandem_kv_transfer_seconds_count 16\n"),
        "{text}"
    );
    assert!(
        text.contains("tandem_prefill_compute_seconds_count 16\n"),
        "{text}"
    );
    let bytes: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("tandem_kv_transfer_bytes_total "))
        .unwrap()
        .parse()
        .unwrap();
    // Each prompt's blocks, whole, for every layer: K and V of 16 tokens x kv_heads x head_dim.
    let c0 = model.config();
    let per_block = 2 * 16 * c0.kv_heads * c0.head_dim * 4 * c0.layers;
    let blocks: usize = [1usize, 5, 16, 17, 24, 40, 48, 100]
        .iter()
        .map(|l| l.div_ceil(16))
        .sum();
    assert_eq!(bytes, (2 * blocks * per_block) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_prefill_one_decode_over_tcp_equals_one_engine() {
    equivalence(1, 1, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefill_two_decode_over_shm_equals_one_engine() {
    equivalence(2, 2, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_aggregated_workers_equal_one_engine() {
    let model = tiny();
    let c = cluster_with(&model, 0, 0, 2, false).await;
    same_as_one_engine(&model, &c).await;
    // No KV crossed a wire: every prompt was computed where it decodes.
    let mut text = String::new();
    c.backend.render_metrics(&mut text);
    assert!(
        text.contains("tandem_kv_transfer_bytes_total 0\n"),
        "{text}"
    );
    assert!(
        text.contains("tandem_prefill_compute_seconds_count 16\n"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_requests_each_equal_their_solo_run() {
    let model = tiny();
    let c = Arc::new(cluster(&model, 2, 1, false).await);
    let mut tasks = Vec::new();
    for i in 0..16u32 {
        let c = c.clone();
        let p = prompt(3 + (i as usize * 11) % 70, i);
        let params = SamplingParams::greedy(4 + i % 9);
        let want = reference(&model, &p, &params);
        tasks.push(tokio::spawn(async move {
            assert_eq!(run(&c.backend, &format!("c{i}"), &p, &params).await, want);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn decode_load(addr: &str) -> v1::LoadReport {
    let mut client = WorkerControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .info(v1::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .load
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_frees_every_block_of_its_sequence() {
    let model = tiny();
    let c = cluster(&model, 1, 1, false).await;
    let total = decode_load(&c.decode_addrs[0]).await.total_kv_blocks;
    let req = GenerateRequest {
        request_id: "gone".into(),
        model: "tiny".into(),
        prompt_tokens: prompt(40, 3),
        sampling: SamplingParams {
            ignore_eos: true,
            ..SamplingParams::greedy(400)
        },
        budget: Default::default(),
    };
    let mut stream = c.backend.generate(req).await.unwrap();
    stream.next().await.unwrap().unwrap();
    stream.next().await.unwrap().unwrap();
    let mid = decode_load(&c.decode_addrs[0]).await;
    assert!(mid.free_kv_blocks < total, "{mid:?}");
    drop(stream);
    let mut load = mid;
    for _ in 0..100 {
        load = decode_load(&c.decode_addrs[0]).await;
        if load.free_kv_blocks == total && load.running_seqs == 0 && load.reservations == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        (load.free_kv_blocks, load.running_seqs, load.reservations),
        (total, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_worker_that_cannot_be_reached_is_retried_on_another() {
    let model = tiny();
    let c = cluster(&model, 1, 1, false).await;
    // A registered prefill worker whose address refuses connections (as a crashed process's
    // would, before its lease lapses), with no queue: placement prefers it.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let identity = v1::WorkerIdentity {
        worker_id: "prefill-dead".into(),
        role: v1::WorkerRole::Prefill.into(),
        grpc_addr: dead_addr,
        model: "tiny".into(),
        host: "127.0.0.1".into(),
        ..Default::default()
    };
    let load = tandem_router::Load {
        state: tandem_router::WorkerState::Ready,
        ..Default::default()
    };
    c.router.register(identity, load).await.unwrap();
    four_runs_equal_one_engine(&c, &model, 1).await;
}

/// Four requests of one prompt (made with `salt`), each equal to one engine's run.
async fn four_runs_equal_one_engine(c: &Cluster, model: &Arc<Model>, salt: u32) {
    let p = prompt(30, salt);
    let params = SamplingParams::greedy(6);
    let want = reference(model, &p, &params);
    for i in 0..4 {
        assert_eq!(
            run(&c.backend, &format!("s{salt}-{i}"), &p, &params).await,
            want
        );
    }
}

/// The gateway's count of retries, by decision.
fn retries(c: &Cluster, decision: &str) -> u64 {
    let mut text = String::new();
    c.backend.render_metrics(&mut text);
    let line = format!("tandem_retries_total{{decision=\"{decision}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .unwrap()
        .parse()
        .unwrap()
}

/// A closed port on loopback: connections to it are refused.
async fn closed_port() -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_that_cannot_be_reached_is_passed_over_for_another_pair() {
    let model = tiny();
    let c = cluster(&model, 1, 1, false).await;
    // A registered decode worker whose address refuses connections, with the most free blocks:
    // placement prefers it, and the reservation there fails.
    let identity = v1::WorkerIdentity {
        worker_id: "decode-dead".into(),
        role: v1::WorkerRole::Decode.into(),
        grpc_addr: closed_port().await,
        kv_endpoint: closed_port().await,
        model: "tiny".into(),
        host: "127.0.0.1".into(),
        ..Default::default()
    };
    let load = tandem_router::Load {
        state: tandem_router::WorkerState::Ready,
        free_kv_blocks: 1 << 20,
        total_kv_blocks: 1 << 20,
        ..Default::default()
    };
    c.router.register(identity, load).await.unwrap();
    four_runs_equal_one_engine(&c, &model, 2).await;
    // Once: reported, it takes no new work for a while.
    assert_eq!(retries(&c, "retried"), 1);
}

/// Runs the test of a decode worker whose KV endpoint is `kv` (preferred by placement, with the
/// most blocks): every request still ends as one engine's run, moved once.
async fn kv_endpoint_passed_over(kv: String) {
    let model = tiny();
    let c = cluster(&model, 1, 1, false).await;
    let decode = Decode {
        kv_blocks: 512,
        transport: tandem_decode_worker::KvTransport::Tcp,
        kv_advertise: Some(kv),
        aggregated: false,
    };
    let (_, stop) = decode.start(&model, &c.router_addr).await;
    for _ in 0..200 {
        if c.router.workers().ready_for(tandem_router::Leg::Decode) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.router.workers().ready_for(tandem_router::Leg::Decode), 2);
    four_runs_equal_one_engine(&c, &model, 3).await;
    // The failed transfer moved its request once; the worker took no new work after it.
    assert_eq!(retries(&c, "retried"), 1);
    drop(stop);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_whose_kv_endpoint_refuses_connections_is_passed_over() {
    // A cut KV network, as a closed port.
    kv_endpoint_passed_over(closed_port().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_worker_whose_kv_endpoint_stops_answering_is_passed_over() {
    // Accepts and then never reads nor acknowledges, as a stopped process would: the transfer
    // stalls, fails after its 2 s without progress, and the request moves on.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept().await {
            conns.push(c);
        }
    });
    let started = std::time::Instant::now();
    kv_endpoint_passed_over(addr).await;
    // One stall of 2 s, not the prefill's deadline of 30 s.
    assert!(started.elapsed() < Duration::from_secs(20));
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_workers_a_request_is_unavailable_and_the_backend_not_ready() {
    let handle = tandem_router::spawn(
        tandem_router::RouterConfig::default(),
        Box::new(tandem_router::LeastLoaded),
    );
    let backend = DisaggBackend::new(handle, DisaggConfig::default());
    let ready = backend.readiness();
    assert_eq!(
        (ready.ready, ready.detail.as_str()),
        (false, "0 prefill and 0 decode workers ready")
    );
    let req = GenerateRequest {
        request_id: "none".into(),
        model: "tiny".into(),
        prompt_tokens: vec![1, 2, 3],
        sampling: SamplingParams::greedy(4),
        budget: Default::default(),
    };
    match backend.generate(req).await {
        Err(tandem_gateway::BackendError::Unavailable(m)) => assert!(m.contains("no ready"), "{m}"),
        Err(e) => panic!("expected Unavailable, got {e:?}"),
        Ok(_) => panic!("expected Unavailable, got a stream"),
    }
}
