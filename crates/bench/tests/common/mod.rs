//! Scriptable local OpenAI-style servers for the end-to-end tests: raw HTTP/1.1 on tokio, one
//! request per connection, recording what each request asked for and when each chunk was written.
//! They also answer `GET /v1/models` and can shed load as Tandem's admission control does.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Good,
    Status500,
    Status400,
    /// Headers and three content chunks, then the socket is closed mid-body.
    DropMidStream,
    /// Two good chunks, then an event whose data is not JSON, then a normal end.
    Malformed,
    /// Two good chunks, then an OpenAI error object in the stream.
    ErrorEvent,
    /// Reads the request and never answers.
    Hang,
    /// HTTP 429 at once, with `Retry-After` when given and an OpenAI error body with this code
    /// (`None`: a plain-text body, as a proxy might send).
    Reject {
        code: Option<&'static str>,
        retry_after: Option<u32>,
    },
}

/// How the server answers `GET /v1/models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Models {
    /// A list with these ids.
    List(&'static [&'static str]),
    /// HTTP 500.
    Fail,
}

/// What the server saw of one request and did about it.
#[derive(Debug, Clone)]
pub struct Served {
    pub path: String,
    pub prompt_words: usize,
    pub max_tokens: u32,
    pub stream: bool,
    pub ignore_eos: bool,
    pub include_usage: bool,
    /// Content chunks sent, and the instant just before each was written.
    pub writes: Vec<Instant>,
    pub completion_tokens: u32,
    /// The body's `model`.
    pub model: String,
    /// The admission headers received.
    pub ttft_budget: Option<String>,
    pub itl_budget: Option<String>,
    pub priority: Option<String>,
}

#[derive(Clone, Copy)]
pub struct Script {
    /// Behaviour by request index (the number after the last `-` of `x-request-id`).
    pub plan: fn(usize) -> Behaviour,
    /// Pause between content chunks.
    pub spacing: Duration,
    /// Tokens each content chunk carries (`max_tokens` must be a multiple).
    pub tokens_per_chunk: u32,
    /// Pause before the first content chunk.
    pub first_delay: Duration,
    /// Sent as `x-tandem-predicted-ttft-ms` on every completion answer, admitted or rejected.
    pub predicted_ttft_ms: Option<u32>,
    pub models: Models,
}

fn good(_: usize) -> Behaviour {
    Behaviour::Good
}

impl Default for Script {
    fn default() -> Self {
        Self {
            plan: good,
            spacing: Duration::ZERO,
            tokens_per_chunk: 1,
            first_delay: Duration::ZERO,
            predicted_ttft_ms: None,
            models: Models::List(&["fake-model", "second-model"]),
        }
    }
}

pub struct Server {
    pub addr: SocketAddr,
    pub served: Arc<Mutex<HashMap<String, Served>>>,
    /// `GET /v1/models` calls answered.
    pub model_calls: Arc<AtomicUsize>,
}

impl Server {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn served(&self) -> HashMap<String, Served> {
        self.served.lock().expect("not poisoned").clone()
    }

    pub fn model_calls(&self) -> usize {
        self.model_calls.load(Ordering::SeqCst)
    }
}

pub async fn spawn(script: Script) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = Arc::new(Mutex::new(HashMap::new()));
    let model_calls = Arc::new(AtomicUsize::new(0));
    let (log, calls) = (served.clone(), model_calls.clone());
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (log, calls) = (log.clone(), calls.clone());
            tokio::spawn(async move {
                let _ = handle(sock, script, log, calls).await;
            });
        }
    });
    Server {
        addr,
        served,
        model_calls,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn http_chunk(data: &str) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

fn content_event(chat: bool, text: &str) -> String {
    let text = serde_json::Value::from(text);
    if chat {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":{text}}},\"finish_reason\":null}}]}}\n\n"
        )
    } else {
        format!(
            "data: {{\"id\":\"c\",\"object\":\"text_completion\",\"model\":\"m\",\"choices\":[{{\"index\":0,\"text\":{text},\"finish_reason\":null}}]}}\n\n"
        )
    }
}

fn fixed(status: &str, extra_headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra_headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

async fn models(sock: &mut TcpStream, models: Models) -> std::io::Result<()> {
    let answer = match models {
        Models::List(ids) => {
            let data: Vec<serde_json::Value> = ids
                .iter()
                .map(|id| serde_json::json!({"id": id, "object": "model", "owned_by": "test"}))
                .collect();
            let body = serde_json::json!({"object": "list", "data": data}).to_string();
            fixed("200 OK", "", &body)
        }
        Models::Fail => fixed("500 Internal Server Error", "", "{\"error\":\"no models\"}"),
    };
    sock.write_all(answer.as_bytes()).await
}

async fn handle(
    mut sock: TcpStream,
    script: Script,
    log: Arc<Mutex<HashMap<String, Served>>>,
    model_calls: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("").to_string();
    if head.starts_with("GET ") && path == "/v1/models" {
        model_calls.fetch_add(1, Ordering::SeqCst);
        return models(&mut sock, script.models).await;
    }
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let len: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let id = header("x-request-id").unwrap_or_default();
    while buf.len() < head_end + len {
        let n = sock.read(&mut tmp).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    let body: serde_json::Value =
        serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
    let chat = body.get("messages").is_some();
    let prompt = if chat {
        body["messages"][0]["content"].as_str().unwrap_or("")
    } else {
        body["prompt"].as_str().unwrap_or("")
    };
    let max_tokens = body["max_tokens"].as_u64().unwrap_or(16) as u32;
    let stream = body["stream"].as_bool().unwrap_or(false);
    let index: usize = id
        .rsplit('-')
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let behaviour = (script.plan)(index);
    let mut served = Served {
        path,
        prompt_words: prompt.split_whitespace().count(),
        max_tokens,
        stream,
        ignore_eos: body["ignore_eos"].as_bool() == Some(true),
        include_usage: body["stream_options"]["include_usage"].as_bool() == Some(true),
        writes: Vec::new(),
        completion_tokens: max_tokens,
        model: body["model"].as_str().unwrap_or("").to_string(),
        ttft_budget: header("x-tandem-ttft-budget-ms"),
        itl_budget: header("x-tandem-itl-budget-ms"),
        priority: header("x-tandem-priority"),
    };
    let result = respond(&mut sock, script, behaviour, chat, &mut served).await;
    log.lock().expect("not poisoned").insert(id, served);
    result
}

async fn respond(
    sock: &mut TcpStream,
    script: Script,
    behaviour: Behaviour,
    chat: bool,
    served: &mut Served,
) -> std::io::Result<()> {
    let predicted = script.predicted_ttft_ms.map_or(String::new(), |ms| {
        format!("x-tandem-predicted-ttft-ms: {ms}\r\n")
    });
    match behaviour {
        Behaviour::Status500 => {
            let body = "{\"error\":\"boom\"}";
            return sock
                .write_all(fixed("500 Internal Server Error", "", body).as_bytes())
                .await;
        }
        Behaviour::Status400 => {
            let body = "{\"error\":\"bad\"}";
            return sock
                .write_all(fixed("400 Bad Request", "", body).as_bytes())
                .await;
        }
        Behaviour::Reject { code, retry_after } => {
            let mut headers = predicted;
            if let Some(s) = retry_after {
                headers.push_str(&format!("Retry-After: {s}\r\n"));
            }
            let answer = match code {
                Some(code) => {
                    let body = serde_json::json!({"error": {
                        "message": "the latency budget cannot be met",
                        "type": "rate_limit_error",
                        "param": null,
                        "code": code,
                    }});
                    fixed("429 Too Many Requests", &headers, &body.to_string())
                }
                None => format!(
                    "HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\n{headers}Content-Length: 17\r\nConnection: close\r\n\r\nToo Many Requests"
                ),
            };
            return sock.write_all(answer.as_bytes()).await;
        }
        Behaviour::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return Ok(());
        }
        _ => {}
    }
    let k = script.tokens_per_chunk.max(1);
    let chunks = served.max_tokens / k;
    let piece: String = (0..k).map(|i| format!("w{i} ")).collect();
    let usage = format!(
        "{{\"prompt_tokens\":{},\"completion_tokens\":{}}}",
        served.prompt_words, served.max_tokens
    );
    if !served.stream {
        let text = serde_json::Value::from(piece.repeat(chunks as usize));
        let body = if chat {
            format!(
                "{{\"choices\":[{{\"message\":{{\"role\":\"assistant\",\"content\":{text}}}}}],\"usage\":{usage}}}"
            )
        } else {
            format!("{{\"choices\":[{{\"text\":{text}}}],\"usage\":{usage}}}")
        };
        if !script.first_delay.is_zero() {
            tokio::time::sleep(script.first_delay).await;
        }
        return sock
            .write_all(fixed("200 OK", &predicted, &body).as_bytes())
            .await;
    }
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{predicted}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    sock.write_all(head.as_bytes()).await?;
    if chat {
        // A role-only first chunk, as vLLM sends: it must not count as the first token.
        let role = "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n";
        sock.write_all(&http_chunk(role)).await?;
    }
    if !script.first_delay.is_zero() {
        tokio::time::sleep(script.first_delay).await;
    }
    for i in 0..chunks {
        if i > 0 && !script.spacing.is_zero() {
            tokio::time::sleep(script.spacing).await;
        }
        let bad_at = matches!(behaviour, Behaviour::Malformed | Behaviour::ErrorEvent) && i == 2;
        if bad_at {
            let event = if behaviour == Behaviour::Malformed {
                "data: {\"choices\": [ {oops\n\n"
            } else {
                "data: {\"error\":{\"message\":\"engine failed\",\"code\":500}}\n\n"
            };
            sock.write_all(&http_chunk(event)).await?;
            continue;
        }
        if behaviour == Behaviour::DropMidStream && i == 3 {
            sock.flush().await?;
            return Ok(());
        }
        served.writes.push(Instant::now());
        sock.write_all(&http_chunk(&content_event(chat, &piece)))
            .await?;
    }
    let tail = format!("data: {{\"choices\":[],\"usage\":{usage}}}\n\ndata: [DONE]\n\n");
    sock.write_all(&http_chunk(&tail)).await?;
    sock.write_all(b"0\r\n\r\n").await?;
    sock.flush().await
}
