//! The disaggregated path on the `sim` engine (time scale 0): the same workers, batchers and KV
//! transports as the native engine, carrying the simulated model's scaled-down KV. Every output
//! must equal a single sim engine's, token for token, which holds only if every KV byte arrived.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tandem_engine::{Engine, Model, SamplingParams, SimConfig, ZeroClock, generate};
use tandem_gateway::{Backend, DisaggBackend, DisaggConfig, GenerateRequest, TokenChunk};
use tandem_proto::v1;
use tandem_proto::v1::worker_control_client::WorkerControlClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const BLOCKS: usize = 96;

fn sim_model() -> Arc<Model> {
    let cfg = SimConfig {
        name: "sim-test".into(),
        layers: 12,
        vocab: 1000,
        max_context: 1024,
        simulated_kv_bytes_per_token: 12 * 2 * 8 * 128 * 2,
    };
    Arc::new(Model::simulated(cfg, Arc::new(ZeroClock)).unwrap())
}

struct Cluster {
    backend: DisaggBackend,
    grpc_addrs: Vec<String>,
    _stops: Vec<oneshot::Sender<()>>,
}

fn stop_pair() -> (
    oneshot::Sender<()>,
    impl Future<Output = ()> + Send + 'static,
) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async {
        let _ = rx.await;
    })
}

async fn cluster(model: &Arc<Model>, shm: bool) -> Cluster {
    let handle = tandem_router::spawn(
        tandem_router::RouterConfig::default(),
        Box::new(tandem_router::LeastLoaded),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let router = listener.local_addr().unwrap().to_string();
    let (tx, stopped) = stop_pair();
    let mut stops = vec![tx];
    tokio::spawn(tandem_router::serve(listener, stopped, handle.clone()));
    let decode_grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let prefill_grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc_addrs = vec![
        prefill_grpc.local_addr().unwrap().to_string(),
        decode_grpc.local_addr().unwrap().to_string(),
    ];
    let transport = if shm {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        tandem_decode_worker::KvTransport::Shm(
            std::env::temp_dir().join(format!("tandem-sim-pool-{}-{nanos}", std::process::id())),
        )
    } else {
        tandem_decode_worker::KvTransport::Tcp
    };
    let decode = tandem_decode_worker::DecodeWorkerConfig {
        model_name: "sim-test".into(),
        model: model.clone(),
        eos: Vec::new(),
        kv_blocks: BLOCKS,
        transport,
        grpc_listener: decode_grpc,
        kv_listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        advertise_host: "127.0.0.1".into(),
        kv_advertise: None,
        router: Some(router.clone()),
        default_lease: Duration::from_secs(30),
        aggregated: false,
        step_tokens: 512,
        drain_grace: Duration::ZERO,
    };
    let (tx, stopped) = stop_pair();
    stops.push(tx);
    tokio::spawn(tandem_decode_worker::run(decode, stopped));
    let prefill = tandem_prefill_worker::PrefillWorkerConfig {
        model_name: "sim-test".into(),
        model: model.clone(),
        eos: Vec::new(),
        kv_blocks: BLOCKS,
        // Prompts over 24 tokens are chunked.
        step_tokens: 24,
        max_queued_tokens: 1 << 16,
        grpc_listener: prefill_grpc,
        advertise_host: "127.0.0.1".into(),
        router: Some(router),
        // Stopped at once: these tests stop a worker to see it gone.
        drain_grace: Duration::ZERO,
    };
    let (tx, stopped) = stop_pair();
    stops.push(tx);
    tokio::spawn(tandem_prefill_worker::run(prefill, stopped));
    let backend = DisaggBackend::new(handle.clone(), DisaggConfig::default());
    for _ in 0..200 {
        let set = handle.workers();
        if set.ready_for(tandem_router::Leg::Prefill) == 1
            && set.ready_for(tandem_router::Leg::Decode) == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(backend.readiness().ready, "{:?}", backend.readiness());
    Cluster {
        backend,
        grpc_addrs,
        _stops: stops,
    }
}

fn reference(model: &Arc<Model>, prompt: &[u32], p: &SamplingParams) -> Vec<u32> {
    let mut engine = Engine::new(model.clone(), BLOCKS);
    generate(&mut engine, 1, prompt, p, &[], 512, |_| {
        tandem_engine::Flow::Continue
    })
    .unwrap()
    .tokens
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 31 + salt * 17 + 2) % 1000)
        .collect()
}

async fn run(backend: &DisaggBackend, id: &str, prompt: &[u32], p: &SamplingParams) -> Vec<u32> {
    let req = GenerateRequest {
        request_id: id.into(),
        model: "sim-test".into(),
        prompt_tokens: prompt.to_vec(),
        sampling: p.clone(),
        budget: Default::default(),
    };
    let mut stream = backend.generate(req).await.unwrap();
    let mut out = Vec::new();
    let mut finished = false;
    while let Some(chunk) = stream.next().await {
        let TokenChunk { tokens, finish } = chunk.unwrap();
        out.extend(tokens);
        finished = finish.is_some();
    }
    assert!(finished, "the stream ended without a finish reason");
    out
}

async fn engine_name(addr: &str) -> String {
    let mut client = WorkerControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    client
        .info(v1::InfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .engine
}

async fn equivalence(shm: bool) {
    let model = sim_model();
    let c = cluster(&model, shm).await;
    for addr in &c.grpc_addrs {
        assert_eq!(engine_name(addr).await, "sim");
    }
    let lens = [1usize, 16, 17, 40, 100];
    for (i, len) in lens.into_iter().enumerate() {
        let p = prompt(len, i as u32);
        let sampled = SamplingParams {
            temperature: 0.9,
            top_k: 5,
            seed: i as u64,
            ..SamplingParams::greedy(20)
        };
        for params in [SamplingParams::greedy(30), sampled] {
            let want = reference(&model, &p, &params);
            assert_eq!(want.len(), params.max_tokens as usize);
            let got = run(&c.backend, &format!("r{i}"), &p, &params).await;
            assert_eq!(got, want, "prompt of {len} tokens, {params:?}");
        }
    }
    if !shm {
        // The scaled-down KV went over the wire for real: every prompt's blocks, every layer.
        let mut text = String::new();
        c.backend.render_metrics(&mut text);
        let bytes: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tandem_kv_transfer_bytes_total "))
            .unwrap()
            .parse()
            .unwrap();
        let per_block = (16 * model.config().kv_bytes_per_token()) as u64;
        let blocks: u64 = lens.iter().map(|l| l.div_ceil(16) as u64).sum();
        assert_eq!(bytes, 2 * blocks * per_block);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_one_prefill_one_decode_over_tcp_equals_one_engine() {
    equivalence(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_one_prefill_one_decode_over_shm_equals_one_engine() {
    equivalence(true).await;
}
