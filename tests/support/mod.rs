//! Shared by the end-to-end tests: a `tandem up` cluster in child processes on port 0, a small
//! HTTP client for the OpenAI API (JSON and SSE), and gRPC probes of the workers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tandem_proto::v1;

pub mod chaos;
pub mod hosts;
pub mod kv_proxy;
pub mod procs;
pub mod streams;

pub const BIN: &str = env!("CARGO_BIN_EXE_tandem");

/// The default model, which CI fetches; a missing model fails the test loudly.
pub fn model_path() -> std::path::PathBuf {
    tandem_engine::testing::require_model_path()
}

/// Clusters in one test binary run one at a time: on a 2-core machine, several at once would
/// only make each slower (and their heartbeats late).
static BUSY: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
static FREED: std::sync::Condvar = std::sync::Condvar::new();

/// The right to run a cluster; given back when dropped.
pub struct Permit;

impl Permit {
    pub fn take() -> Permit {
        let mut busy = BUSY
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while *busy {
            busy = FREED
                .wait(busy)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        *busy = true;
        Permit
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        *BUSY
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
        FREED.notify_one();
    }
}

/// A running `tandem up`; dropping it stops the whole cluster.
pub struct Up {
    _serial: Permit,
    child: Child,
    pub url: String,
    pub router: String,
    pub model: String,
}

impl Up {
    /// Starts `tandem up --port 0 --json <extra>` and waits until it reports ready.
    pub fn start(extra: &[&str]) -> Up {
        Up::start_with_env(extra, &[])
    }

    /// As [`Up::start`], with environment variables that its workers inherit too.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Up {
        let serial = Permit::take();
        let mut child = Command::new(BIN)
            .args(["up", "--port", "0", "--json", "--model"])
            .arg(model_path())
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting tandem up");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(240))
            .expect("tandem up did not report ready");
        let v: Value = serde_json::from_str(line.trim())
            .unwrap_or_else(|e| panic!("tandem up printed {line:?}: {e}"));
        Up {
            _serial: serial,
            child,
            url: v["url"].as_str().unwrap().to_owned(),
            router: v["router"].as_str().unwrap().to_owned(),
            model: v["model"].as_str().unwrap().to_owned(),
        }
    }

    /// The registered workers, as the router lists them.
    pub async fn workers(&self) -> Vec<v1::WorkerEntry> {
        workers_of(&self.router).await
    }

    /// Addresses of the workers of one role.
    pub async fn addrs(&self, role: v1::WorkerRole) -> Vec<(String, u32)> {
        self.workers()
            .await
            .into_iter()
            .filter_map(|w| w.identity)
            .filter(|i| i.role == role as i32)
            .map(|i| (i.grpc_addr, i.pid))
            .collect()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // SIGTERM lets it stop its workers; they also stop when its pipes close.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The workers registered with the router at `router` (host:port).
pub async fn workers_of(router: &str) -> Vec<v1::WorkerEntry> {
    let mut client =
        v1::router_service_client::RouterServiceClient::connect(format!("http://{router}"))
            .await
            .unwrap();
    let mut stream = client
        .watch_workers(v1::WatchWorkersRequest::default())
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap().workers
}

/// One worker's Info.
pub async fn info(addr: &str) -> v1::InfoResponse {
    let mut c = v1::worker_control_client::WorkerControlClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.info(v1::InfoRequest {}).await.unwrap().into_inner()
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn request(url: &str, path: &str, body: Bytes) -> hyper::Request<Full<Bytes>> {
    hyper::Request::post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap()
}

/// POSTs raw bytes; returns the status and the body as JSON (or as a JSON string if not JSON).
pub async fn post_raw(url: &str, path: &str, body: impl Into<Bytes>) -> (u16, Value) {
    let resp = client()
        .request(request(url, path, body.into()))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v)
}

/// POSTs a JSON body.
pub async fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    post_raw(url, path, serde_json::to_vec(body).unwrap()).await
}

/// GETs a path; returns the status and the body text.
pub async fn get(url: &str, path: &str) -> (u16, String) {
    let req = hyper::Request::get(format!("{url}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The first model the gateway at `url` lists.
pub async fn model_name(url: &str) -> String {
    let (status, body) = get(url, "/v1/models").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"][0]["id"].as_str().unwrap().to_owned()
}

/// A counter's value in the Prometheus text at `url`/metrics (0 when absent).
pub async fn counter(url: &str, series: &str) -> f64 {
    let (_, text) = get(url, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// A streamed response: every `data:` event as JSON, and whether `[DONE]` ended it.
pub struct Streamed {
    /// 0 when no response came (the connection could not be made or broke first).
    pub status: u16,
    pub events: Vec<Value>,
    pub done: bool,
    /// The longest wait between two events, or before the first after the response began.
    pub longest_gap: Duration,
    /// From sending the request to its first event.
    pub first_event: Option<Duration>,
}

impl Streamed {
    /// The text of every chunk's first choice, concatenated.
    pub fn text(&self) -> String {
        self.events
            .iter()
            .filter_map(|e| e["choices"].get(0))
            .filter_map(|c| c["delta"]["content"].as_str().or(c["text"].as_str()))
            .collect()
    }
}

/// POSTs a streaming request and reads it to the end (or, with `stop_after`, drops the
/// connection after that many events).
pub async fn stream(url: &str, path: &str, body: &Value, stop_after: Option<usize>) -> Streamed {
    let sent = Instant::now();
    let no_answer = Streamed {
        status: 0,
        events: Vec::new(),
        done: false,
        longest_gap: Duration::ZERO,
        first_event: None,
    };
    let Ok(resp) = client()
        .request(request(url, path, serde_json::to_vec(body).unwrap().into()))
        .await
    else {
        return no_answer;
    };
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    let mut buf = String::new();
    let mut events = Vec::new();
    let mut done = false;
    let (mut last, mut longest_gap) = (Instant::now(), Duration::ZERO);
    let mut first_event = None;
    // A connection that breaks ends the stream unfinished (`done` stays false).
    while let Some(Ok(frame)) = body.frame().await {
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.push_str(std::str::from_utf8(data).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for line in event.lines() {
                let Some(payload) = line.strip_prefix("data: ") else {
                    continue;
                };
                if payload == "[DONE]" {
                    done = true;
                } else {
                    events.push(serde_json::from_str(payload).unwrap());
                    first_event.get_or_insert_with(|| sent.elapsed());
                    longest_gap = longest_gap.max(last.elapsed());
                    last = Instant::now();
                }
            }
        }
        if stop_after.is_some_and(|n| events.len() >= n) {
            return Streamed {
                status,
                events,
                done,
                longest_gap,
                first_event,
            };
        }
    }
    Streamed {
        status,
        events,
        done,
        longest_gap,
        first_event,
    }
}

/// POSTs a streaming request and reads it until `cut` completes (or the response ends), then
/// drops the connection; returns the body frames read.
pub async fn stream_until(
    url: &str,
    path: &str,
    body: &Value,
    cut: impl std::future::Future<Output = ()>,
) -> usize {
    let resp = client()
        .request(request(url, path, serde_json::to_vec(body).unwrap().into()))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut cut = std::pin::pin!(cut);
    let mut frames = 0;
    loop {
        tokio::select! {
            () = &mut cut => return frames,
            f = body.frame() => match f {
                Some(Ok(_)) => frames += 1,
                _ => return frames,
            },
        }
    }
}

/// A greedy chat request with token ids in the answer.
pub fn chat(model: &str, messages: Value, max_tokens: u32) -> Value {
    json!({
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "return_token_ids": true,
    })
}

/// The prompt and output token ids of `tandem generate --json` (the single-process reference).
pub fn generate(prompt: &str, chat: bool, max_tokens: u32) -> (Vec<u32>, Vec<u32>) {
    let mut cmd = Command::new(BIN);
    cmd.args(["generate", "--json", "--model"])
        .arg(model_path())
        .args(["--prompt", prompt, "--max-tokens", &max_tokens.to_string()]);
    if chat {
        cmd.arg("--chat");
    }
    let out = cmd.output().expect("running tandem generate");
    assert!(
        out.status.success(),
        "tandem generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (ids(&v["prompt_ids"]), ids(&v["tokens"]))
}

/// A JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array of token ids: {v}"))
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// A response's status, headers, time to its first body bytes (for a stream: the first token's
/// event) and body (a stream's events, or the JSON body as one event).
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub ttft: Duration,
    pub events: Vec<Value>,
}

impl Answer {
    /// A header's value as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// POSTs `body` with extra `headers`; reads a stream's events (or a JSON body) to the end.
pub async fn send(url: &str, path: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let mut req = request(url, path, serde_json::to_vec(body).unwrap().into());
    for (k, v) in headers {
        req.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            hyper::header::HeaderValue::from_str(v).unwrap(),
        );
    }
    let t0 = Instant::now();
    let resp = client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut raw = Vec::new();
    let mut ttft = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if let Some(data) = frame.data_ref() {
            ttft.get_or_insert_with(|| t0.elapsed());
            raw.extend_from_slice(data);
        }
    }
    let text = String::from_utf8_lossy(&raw);
    let events = if text.starts_with("data: ") {
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|p| *p != "[DONE]")
            .map(|p| serde_json::from_str(p).unwrap())
            .collect()
    } else {
        vec![serde_json::from_str(&text).unwrap_or(Value::String(text.into_owned()))]
    };
    Answer {
        status,
        headers,
        ttft: ttft.unwrap_or_else(|| t0.elapsed()),
        events,
    }
}
