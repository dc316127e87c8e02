//! Faults through `tandem up`: a client that goes away, a prefill worker killed mid-request, a
//! decode worker killed or stopped under streams (they move) and restarted, bad requests and bad
//! KV frames, a router that goes away and comes back. Each gets its clear error, and a request
//! running beside it finishes unharmed; workers register again with the router that came back.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use prost::Message;
use serde_json::{Value, json};
use support::streams::{exited, streams_survive};
use support::{Up, generate, ids, info, post, post_raw, stream};
use tandem_proto::v1;
use tandem_proto::v1::decode_service_client::DecodeServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A streaming completion that runs for `n` tokens whatever the model says.
fn long_stream(model: &str, n: u32) -> Value {
    json!({"model": model, "prompt": "Once upon a time", "max_tokens": n,
           "ignore_eos": true, "temperature": 0, "stream": true})
}

/// Polls until `f` holds, for up to 20 s.
async fn eventually<F: AsyncFnMut() -> bool>(what: &str, mut f: F) {
    for _ in 0..400 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{what} never happened");
}

/// No reservation, sequence, block or queued prefill left on any worker.
async fn idle(up: &Up) -> bool {
    for (addr, _) in up.addrs(v1::WorkerRole::Decode).await {
        let l = info(&addr).await.load.unwrap();
        if l.running_seqs != 0 || l.reservations != 0 || l.free_kv_blocks != l.total_kv_blocks {
            return false;
        }
    }
    for (addr, _) in up.addrs(v1::WorkerRole::Prefill).await {
        let i = info(&addr).await;
        if i.prefill_requests != 0 || i.load.unwrap().queued_prefill_tokens != 0 {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_leaves_nothing_behind() {
    let up = Up::start(&["--worker-threads", "1"]);
    let s = stream(
        &up.url,
        "/v1/completions",
        &long_stream(&up.model, 2000),
        Some(3),
    )
    .await;
    assert_eq!((s.status, s.done), (200, false));
    // Something was held while it ran; after the drop, everything is given back.
    eventually("the workers going idle after the disconnect", async || {
        idle(&up).await
    })
    .await;
    // And the cluster still serves.
    let s = stream(&up.url, "/v1/completions", &long_stream(&up.model, 5), None).await;
    assert!(s.done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_prefill_worker_mid_request_still_completes_it_with_the_same_tokens() {
    let up = Up::start(&[
        "--prefill",
        "2",
        "--worker-threads",
        "1",
        "--step-tokens",
        "128",
    ]);
    // Long enough that its prefill takes a while, so that the kill lands during it.
    let prompt = "The history of computing is long and varied. ".repeat(120);
    let (_, want) = generate(&prompt, false, 8);
    let body = json!({"model": up.model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                      "return_token_ids": true});
    let url = up.url.clone();
    let request = tokio::spawn(async move { post(&url, "/v1/completions", &body).await });
    let prefills = up.addrs(v1::WorkerRole::Prefill).await;
    assert_eq!(prefills.len(), 2);
    let mut killed = None;
    for _ in 0..2000 {
        for (addr, pid) in &prefills {
            if info(addr).await.prefill_requests > 0 {
                killed = Some(*pid);
                break;
            }
        }
        if killed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = killed.expect("no prefill worker ever held the request");
    assert!(pid > 0);
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let (status, v) = request.await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(ids(&v["choices"][0]["token_ids"]), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_prefill_worker_fails_its_request_over_after_the_stall_gap_not_the_deadline() {
    let up = Up::start(&["--prefill", "2", "--worker-threads", "1"]);
    let prompt = "The history of computing is long and varied. ".repeat(4);
    let (_, want) = generate(&prompt, false, 8);
    let body = json!({"model": up.model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                      "return_token_ids": true});
    // Warm: the router predicts the prompt's TTFT from measured steps.
    let (status, v) = post(&up.url, "/v1/completions", &body).await;
    assert_eq!(
        (status, ids(&v["choices"][0]["token_ids"])),
        (200, want.clone())
    );
    let prefills = up.addrs(v1::WorkerRole::Prefill).await;
    let stopped = prefills[0].1.to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &stopped])
            .status()
            .unwrap()
    };
    signal("-STOP");
    // Four at once, before the stopped worker's lease lapses: the router spreads them, so some
    // go to the stopped worker. They stall past ten predicted TTFTs (4 s at least) and run on
    // the other; the prefill deadline (30 s) would come much later.
    let started = std::time::Instant::now();
    let requests: Vec<_> = (0..4)
        .map(|_| {
            let (url, body) = (up.url.clone(), body.clone());
            tokio::spawn(async move { post(&url, "/v1/completions", &body).await })
        })
        .collect();
    for r in requests {
        let (status, v) = r.await.unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(ids(&v["choices"][0]["token_ids"]), want);
    }
    let took = started.elapsed();
    signal("-CONT");
    assert!(took < Duration::from_secs(20), "{took:?}");
    let (_, metrics) = support::get(&up.url, "/metrics").await;
    let retried: u32 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tandem_retries_total{decision=\"retried\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=4).contains(&retried), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_a_killed_decode_worker_move_to_another_and_end_as_undisturbed() {
    let up = Up::start(&["--decode", "2", "--worker-threads", "1"]);
    streams_survive(&up.url, &up.addrs(v1::WorkerRole::Decode).await, "-KILL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_on_a_stopped_decode_worker_move_after_the_watchdog_and_end_as_undisturbed() {
    let up = Up::start(&["--decode", "2", "--worker-threads", "1"]);
    let victim = streams_survive(&up.url, &up.addrs(v1::WorkerRole::Decode).await, "-STOP").await;
    victim.exit.abort();
    std::process::Command::new("kill")
        .args(["-CONT", &victim.pid.to_string()])
        .status()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefill_worker_told_to_stop_finishes_its_queue_then_exits() {
    // Admission would hold back unbudgeted prompts predicted to wait past its 30 s horizon (a
    // debug build's four long prompts can be): all four must be at the worker when it stops.
    let up = Up::start(&["--worker-threads", "1", "--unbudgeted-horizon", "600s"]);
    let (addr, pid) = up
        .addrs(v1::WorkerRole::Prefill)
        .await
        .pop()
        .expect("a prefill worker");
    // Long prompts, so that all four wait in its queue when it is told to stop; it is the only
    // prefill worker, so each can only finish there.
    let long = "The lighthouse keeper climbed the stairs again, counting each one. ".repeat(80);
    let requests: Vec<_> = (0..4)
        .map(|i| {
            let body = json!({"model": up.model, "prompt": format!("{i}. {long}"),
                              "max_tokens": 8, "temperature": 0});
            let url = up.url.clone();
            tokio::spawn(async move { post(&url, "/v1/completions", &body).await })
        })
        .collect();
    eventually("four prompts at the prefill worker", async || {
        info(&addr).await.prefill_requests >= 4
    })
    .await;
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    for r in requests {
        let (status, v) = r.await.unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
    }
    eventually("the drained prefill worker exiting", async || exited(pid)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tandem_drain_stops_a_worker_found_by_its_id() {
    let up = Up::start(&["--worker-threads", "1"]);
    let drain = |id: &str| {
        std::process::Command::new(support::BIN)
            .args(["drain", id, "--router", &up.router])
            .output()
            .unwrap()
    };
    let out = drain("decode-99");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no worker \"decode-99\""), "{err}");
    for role in [v1::WorkerRole::Prefill, v1::WorkerRole::Decode] {
        let worker = up
            .workers()
            .await
            .into_iter()
            .filter_map(|w| w.identity)
            .find(|i| i.role == role as i32)
            .unwrap();
        let out = drain(&worker.worker_id);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Idle, it stops at once; `tandem up` starts it again.
        eventually("the drained worker exiting", async || exited(worker.pid)).await;
    }
    eventually("both workers serving again", async || {
        let w = up.workers().await;
        let ready = |w: &v1::WorkerEntry| {
            w.load
                .as_ref()
                .is_some_and(|l| l.state == v1::WorkerState::Ready as i32)
        };
        w.len() == 2 && w.iter().all(ready)
    })
    .await;
    let body = json!({"model": up.model, "prompt": "Hello", "max_tokens": 4, "temperature": 0});
    assert_eq!(post(&up.url, "/v1/completions", &body).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_its_stream_moves_leaves_nothing_behind() {
    let up = Up::start(&["--decode", "2", "--worker-threads", "1"]);
    // A long prompt: the move computes it again, which takes long enough to leave during.
    let prompt = "The history of computing is long and varied. ".repeat(100);
    let body = json!({"model": up.model, "prompt": prompt, "max_tokens": 2000,
                      "ignore_eos": true, "temperature": 0, "stream": true});
    let (cut, leave) = tokio::sync::oneshot::channel::<()>();
    let url = up.url.clone();
    let client = tokio::spawn(async move {
        let leave = async {
            let _ = leave.await;
        };
        support::stream_until(&url, "/v1/completions", &body, leave).await
    });
    let decodes = up.addrs(v1::WorkerRole::Decode).await;
    let mut running = None;
    for _ in 0..2000 {
        for (addr, pid) in &decodes {
            if info(addr).await.load.unwrap().running_seqs > 0 {
                running = Some(*pid);
            }
        }
        if running.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let pid = running.expect("no decode worker ever ran the stream");
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    // The stream is moving now: its prompt and tokens are being computed on the other pair.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let _ = cut.send(());
    assert!(client.await.unwrap() > 0);
    // Once the killed worker's lease has lapsed (3 s), every worker listed is idle.
    tokio::time::sleep(Duration::from_secs(4)).await;
    eventually(
        "the workers going idle after the client left mid-move",
        async || idle(&up).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_decode_worker_is_restarted_and_the_cluster_serves_again() {
    let up = Up::start(&["--worker-threads", "1"]);
    let prompt = "The capital of France is";
    let (_, want) = generate(prompt, false, 8);
    let body = json!({"model": up.model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                      "return_token_ids": true});
    let decodes = up.addrs(v1::WorkerRole::Decode).await;
    let [(_, pid)] = decodes[..] else {
        panic!("{decodes:?}")
    };
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    // A new decode worker (another pid) registers by itself, a second or so later.
    for _ in 0..600 {
        let now = up.addrs(v1::WorkerRole::Decode).await;
        if now.len() == 1 && now[0].1 != pid {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = up.addrs(v1::WorkerRole::Decode).await;
    assert!(now.len() == 1 && now[0].1 != pid, "{now:?} (killed {pid})");
    let mut answer = post(&up.url, "/v1/completions", &body).await;
    // Its lease may still list the dead worker for a moment: a 503 then, never a hang.
    for _ in 0..50 {
        if answer.0 == 200 {
            break;
        }
        assert_eq!(answer.0, 503, "{}", answer.1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        answer = post(&up.url, "/v1/completions", &body).await;
    }
    let (status, v) = answer;
    assert_eq!(status, 200, "{v}");
    assert_eq!(ids(&v["choices"][0]["token_ids"]), want);
}

fn error_of(v: &Value) -> (&str, Option<&str>) {
    (
        v["error"]["type"]
            .as_str()
            .unwrap_or_else(|| panic!("no error body: {v}")),
        v["error"]["code"].as_str(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_a_request_beside_them_finishes() {
    let up = Up::start(&["--worker-threads", "1"]);
    let url = up.url.clone();
    let beside = long_stream(&up.model, 48);
    let running = tokio::spawn(async move { stream(&url, "/v1/completions", &beside, None).await });
    let m = up.model.clone();
    let chat = "/v1/chat/completions";
    let user = json!([{"role": "user", "content": "hi"}]);
    let (s, v) = post_raw(&up.url, chat, "{\"model\": ").await;
    assert_eq!(
        (s, error_of(&v).0),
        (400, "invalid_request_error"),
        "malformed: {v}"
    );
    let (s, v) = post(
        &up.url,
        chat,
        &json!({"model": m, "messages": user, "max_tokens": "ten"}),
    )
    .await;
    assert_eq!(s, 400, "wrong type: {v}");
    let (s, v) = post(
        &up.url,
        chat,
        &json!({"model": "no-such-model", "messages": user}),
    )
    .await;
    assert_eq!((s, error_of(&v).1), (404, Some("model_not_found")), "{v}");
    let (s, v) = post(&up.url, chat, &json!({"model": m, "messages": []})).await;
    assert_eq!(s, 400, "empty messages: {v}");
    let huge = "hello ".repeat(10_000);
    let (s, v) = post(
        &up.url,
        "/v1/completions",
        &json!({"model": m, "prompt": huge}),
    )
    .await;
    assert_eq!(
        (s, error_of(&v).1),
        (400, Some("context_length_exceeded")),
        "{v}"
    );
    for bad in [json!(0), json!(-1)] {
        let (s, v) = post(
            &up.url,
            chat,
            &json!({"model": m, "messages": user, "max_tokens": bad}),
        )
        .await;
        assert_eq!(s, 400, "max_tokens {bad}: {v}");
    }
    let (s, v) = post(
        &up.url,
        chat,
        &json!({"model": m, "messages": user, "n": 2}),
    )
    .await;
    assert_eq!(s, 400, "n=2: {v}");
    let done = running.await.unwrap();
    assert!(
        done.done,
        "the stream beside the bad requests did not finish"
    );
    let last = done
        .events
        .iter()
        .rev()
        .find(|e| !e["choices"].as_array().unwrap().is_empty())
        .unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
}

/// A hand-made KV connection to a decode worker, to send what a prefill worker never would.
struct RawKv(TcpStream);

fn put(buf: &mut Vec<u8>, m: &impl Message) {
    buf.extend_from_slice(&(m.encoded_len() as u32).to_le_bytes());
    m.encode(buf).unwrap();
}

impl RawKv {
    async fn connect(addr: &str) -> RawKv {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = tandem_proto::KV_MAGIC.to_vec();
        put(
            &mut buf,
            &v1::KvHello {
                version: tandem_proto::KV_WIRE_VERSION,
                sender_worker_id: "raw".into(),
            },
        );
        s.write_all(&buf).await.unwrap();
        RawKv(s)
    }

    async fn send(&mut self, h: &v1::KvFrameHeader, payload: &[u8]) {
        let mut buf = Vec::new();
        put(&mut buf, h);
        buf.extend_from_slice(payload);
        self.0.write_all(&buf).await.unwrap();
    }

    async fn ack(&mut self) -> v1::KvAck {
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
        self.0.read_exact(&mut buf).await.unwrap();
        v1::KvAck::decode(buf.as_slice()).unwrap()
    }
}

fn frame(r: &v1::ReserveResponse, payload: &[u8]) -> v1::KvFrameHeader {
    let g = r.geometry.unwrap();
    v1::KvFrameHeader {
        request_id: "raw".into(),
        reservation_id: r.reservation_id,
        layer: 0,
        block_ids: vec![r.block_ids[0]],
        seq: 0,
        payload_len: payload.len() as u64,
        dtype: g.dtype,
        geometry: Some(g),
        checksum: crc32c(payload),
        last: false,
        attempt: 0,
    }
}

/// CRC-32C (Castagnoli), bit by bit: the tests check the receiver, not a shared implementation.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_kv_frames_are_refused_and_a_request_beside_them_finishes() {
    let up = Up::start(&["--worker-threads", "1"]);
    let url = up.url.clone();
    let beside = long_stream(&up.model, 48);
    let running = tokio::spawn(async move { stream(&url, "/v1/completions", &beside, None).await });
    let d = up
        .workers()
        .await
        .into_iter()
        .filter_map(|w| w.identity)
        .find(|i| i.role == v1::WorkerRole::Decode as i32)
        .unwrap();
    let mut decode = DecodeServiceClient::connect(format!("http://{}", d.grpc_addr))
        .await
        .unwrap();
    let reserve = |lease_ms| v1::ReserveRequest {
        request_id: "raw".into(),
        prompt_tokens: 20,
        max_new_tokens: 4,
        lease_ms,
        itl_budget_ms: 0,
    };
    let g = d.geometry.unwrap();
    let block_bytes = (g.block_tokens * g.kv_heads * g.head_dim * 4) as usize;
    let payload: Vec<u8> = (0..2 * block_bytes).map(|i| (i % 251) as u8).collect();

    // Corrupted: the checksum does not match the bytes.
    let r = decode.reserve(reserve(0)).await.unwrap().into_inner();
    let mut kv = RawKv::connect(&d.kv_endpoint).await;
    let mut h = frame(&r, &payload);
    h.checksum ^= 1;
    kv.send(&h, &payload).await;
    assert_eq!(kv.ack().await.error, v1::KvError::Corrupt as i32);
    let e = decode
        .commit(v1::CommitRequest {
            reservation_id: r.reservation_id,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");

    // Unknown reservation.
    let mut kv = RawKv::connect(&d.kv_endpoint).await;
    let mut h = frame(&r, &payload);
    h.reservation_id = r.reservation_id ^ 0xdead_0000;
    kv.send(&h, &payload).await;
    assert_eq!(kv.ack().await.error, v1::KvError::UnknownReservation as i32);

    // Expired: a 1 ms lease has lapsed by the time the frame arrives.
    let short = decode.reserve(reserve(1)).await.unwrap().into_inner();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut kv = RawKv::connect(&d.kv_endpoint).await;
    kv.send(&frame(&short, &payload), &payload).await;
    assert_eq!(kv.ack().await.error, v1::KvError::UnknownReservation as i32);

    // Truncated: half the payload, then the connection closes. Nothing commits.
    let r2 = decode.reserve(reserve(0)).await.unwrap().into_inner();
    let mut kv = RawKv::connect(&d.kv_endpoint).await;
    let h = frame(&r2, &payload);
    let mut buf = Vec::new();
    put(&mut buf, &h);
    buf.extend_from_slice(&payload[..payload.len() / 2]);
    kv.0.write_all(&buf).await.unwrap();
    drop(kv);
    let e = decode
        .commit(v1::CommitRequest {
            reservation_id: r2.reservation_id,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    // A Decode on it is refused the same way, and Release gives its blocks back.
    let e = decode
        .decode(v1::DecodeRequest {
            reservation_id: r2.reservation_id,
            first_token: 1,
            generated_before: 1,
            sampling: Some(v1::SamplingParams {
                max_tokens: 4,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .err()
        .unwrap();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    for id in [r.reservation_id, r2.reservation_id] {
        assert!(
            decode
                .release(v1::ReleaseRequest { reservation_id: id })
                .await
                .unwrap()
                .into_inner()
                .found
        );
    }

    let done = running.await.unwrap();
    assert!(done.done, "the stream beside the bad frames did not finish");
    assert!(!done.text().is_empty());
    eventually("the workers going idle", async || idle(&up).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_again_with_a_router_that_was_away() {
    let (first, addr) = support::procs::router("127.0.0.1:0");
    // A simulated worker: what is tested is its registration, not its engine.
    let mut worker = std::process::Command::new(support::BIN)
        .args(["decode-worker", "--router", &addr, "--exit-with-stdin"])
        .args([
            "--engine",
            "sim",
            "--sim-model",
            "llama-2-70b",
            "--sim-gpu",
            "h100",
        ])
        .args(["--tp", "4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let registered = async |addr: &str| {
        support::workers_of(addr)
            .await
            .into_iter()
            .filter_map(|w| w.identity)
            .map(|i| i.grpc_addr)
            .collect::<Vec<_>>()
    };
    let mut seen = Vec::new();
    eventually("the worker registering", async || {
        seen = registered(&addr).await;
        !seen.is_empty()
    })
    .await;
    drop(first);
    // Away for longer than a lease (3 s): the worker's heartbeats fail meanwhile.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_second, again) = support::procs::router(&addr);
    assert_eq!(again, addr);
    eventually(
        "the worker registering with the router that came back",
        async || registered(&addr).await == seen,
    )
    .await;
    let _ = worker.kill();
    let _ = worker.wait();
}
