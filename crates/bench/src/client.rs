//! One request against the endpoint, timed chunk by chunk.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::admission::{self, Admission, Rejection};
use crate::args::ApiKind;
use crate::chunk::{parse_body, parse_event};
use crate::error::BenchError;
use crate::http_error::{ERROR_HEAD, chain, err, hyper_class, read_head, request_error};
use crate::prompt::PromptTokenizer;
use crate::record::{ErrorClass, RequestError, RequestRecord, TokenSource, Usage, apportion};
use crate::sse::SseParser;

/// A non-streaming answer larger than this is a protocol error, not something to buffer.
const MAX_BODY: usize = 64 << 20;
/// How long to keep reading after `[DONE]` for the body's end, so the connection can be reused.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// The most of a 429's body read for its error code.
const REJECT_HEAD: usize = 8 << 10;

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct Planned {
    pub index: usize,
    pub prompt: String,
    pub input_len: u32,
    pub max_tokens: u32,
}

/// The HTTP side of the load generator, shared by every request of a run.
pub(crate) struct Client {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    uri: Uri,
    api: ApiKind,
    model: String,
    stream: bool,
    auth: Option<HeaderValue>,
    /// The admission headers every request carries.
    admission: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    tokenizer: Option<Arc<dyn PromptTokenizer>>,
}

pub(crate) struct ClientConfig<'a> {
    pub url: &'a str,
    pub api: ApiKind,
    pub model: &'a str,
    pub stream: bool,
    pub api_key: Option<&'a str>,
    pub timeout: Duration,
    pub admission: Admission,
}

/// What has been seen of one answer so far; kept outside the timed future so a timeout keeps it.
struct Seen {
    send: Instant,
    chunks: Vec<Instant>,
    /// With a tokenizer: where each content chunk's text ends in `text`, counted in tokens once
    /// the answer is complete (tokenizing each chunk as it arrives took a fifth of the load
    /// generator's CPU at 64 streams, on the cores the servers it measures use).
    chunk_ends: Vec<usize>,
    text: String,
    usage: Option<Usage>,
    done_at: Option<Instant>,
    predicted_ttft_ms: Option<f64>,
    rejection: Option<Rejection>,
}

/// `url` checked and parsed: http, with a host.
pub(crate) fn base_uri(url: &str) -> Result<Uri, BenchError> {
    let base: Uri = url
        .parse()
        .map_err(|e| BenchError::InvalidArgs(format!("--url {url}: {e}")))?;
    if base.scheme_str() != Some("http") || base.host().is_none() {
        return Err(BenchError::InvalidArgs(format!(
            "--url {url}: only http://host[:port][/path] is supported"
        )));
    }
    Ok(base)
}

impl Client {
    pub(crate) fn new(
        cfg: &ClientConfig<'_>,
        tokenizer: Option<Arc<dyn PromptTokenizer>>,
    ) -> Result<Self, BenchError> {
        let base = base_uri(cfg.url)?;
        let uri = if matches!(base.path(), "" | "/") {
            let path = match cfg.api {
                ApiKind::Chat => "/v1/chat/completions",
                ApiKind::Completions => "/v1/completions",
            };
            format!("{}{path}", cfg.url.trim_end_matches('/'))
                .parse()
                .map_err(|e| BenchError::InvalidArgs(format!("--url {}: {e}", cfg.url)))?
        } else {
            base
        };
        let auth = cfg
            .api_key
            .map(|k| HeaderValue::from_str(&format!("Bearer {k}")))
            .transpose()
            .map_err(|_| BenchError::InvalidArgs("--api-key is not a valid header value".into()))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        let http = HttpClient::builder(TokioExecutor::new()).build(connector);
        Ok(Self {
            http,
            uri,
            api: cfg.api,
            model: cfg.model.to_string(),
            stream: cfg.stream,
            auth,
            admission: cfg.admission.headers()?,
            timeout: cfg.timeout,
            tokenizer,
        })
    }

    pub(crate) fn uri(&self) -> &Uri {
        &self.uri
    }

    fn body(&self, p: &Planned) -> Bytes {
        let mut body = serde_json::json!({
            "model": self.model,
            "max_tokens": p.max_tokens,
            "ignore_eos": true,
            "stream": self.stream,
        });
        match self.api {
            ApiKind::Chat => {
                body["messages"] = serde_json::json!([{"role": "user", "content": p.prompt}]);
            }
            ApiKind::Completions => body["prompt"] = serde_json::Value::from(p.prompt.as_str()),
        }
        if self.stream {
            body["stream_options"] = serde_json::json!({"include_usage": true});
        }
        Bytes::from(body.to_string())
    }

    /// Sends `p` and times its answer. Never fails: a failure is recorded in the record.
    /// The chunks' token counts are estimates to settle after the run when `Pieces` come back.
    pub(crate) async fn send(
        &self,
        p: &Planned,
        run: usize,
        epoch: Instant,
    ) -> (RequestRecord, Option<Pieces>) {
        let body = self.body(p);
        let mut seen = Seen {
            send: Instant::now(),
            chunks: Vec::with_capacity(p.max_tokens as usize),
            chunk_ends: Vec::new(),
            text: String::new(),
            usage: None,
            done_at: None,
            predicted_ttft_ms: None,
            rejection: None,
        };
        let id = format!("bench-{run}-{}", p.index);
        let outcome = tokio::time::timeout(self.timeout, self.exchange(body, &id, &mut seen)).await;
        let error = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some(err(
                ErrorClass::Timeout,
                format!("no complete answer within {:?}", self.timeout),
            )),
        };
        let end = seen.done_at.unwrap_or_else(Instant::now);
        self.finish(p, seen, end, error, epoch)
    }

    async fn exchange(&self, body: Bytes, id: &str, seen: &mut Seen) -> Result<(), RequestError> {
        let mut req = Request::post(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("x-request-id", id);
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        for (name, value) in &self.admission {
            req = req.header(name, value.clone());
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| err(ErrorClass::Protocol, e.to_string()))?;
        seen.send = Instant::now();
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| request_error(&e))?;
        let status = resp.status();
        seen.predicted_ttft_ms = admission::predicted_ttft_ms(resp.headers());
        let retry_after_s = admission::retry_after_s(resp.headers());
        let mut body = resp.into_body();
        if status == StatusCode::TOO_MANY_REQUESTS {
            // Rejected from here on, whether or not its body (the code) comes in time.
            seen.done_at = Some(Instant::now());
            let rejection = seen.rejection.insert(Rejection {
                code: None,
                retry_after_s,
            });
            rejection.code = admission::reject_code(&read_head(&mut body, REJECT_HEAD).await);
            return Ok(());
        }
        if !status.is_success() {
            let head = read_head(&mut body, ERROR_HEAD).await;
            let class = match status.as_u16() {
                400..=499 => ErrorClass::Http4xx,
                500..=599 => ErrorClass::Http5xx,
                _ => ErrorClass::Protocol,
            };
            let text = String::from_utf8_lossy(&head).into_owned();
            return Err(err(class, format!("HTTP {status}: {text}")));
        }
        if !self.stream {
            return self.whole(body, seen).await;
        }
        let keep_text = self.tokenizer.is_some();
        let mut parser = SseParser::default();
        while seen.done_at.is_none() {
            let Some(frame) = body.frame().await else {
                return Err(err(ErrorClass::Disconnected, "stream ended before [DONE]"));
            };
            let frame = frame.map_err(|e| err(hyper_class(&e), chain(&e)))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let now = Instant::now();
            parser.push(&data, |event| {
                if seen.done_at.is_some() {
                    return Ok(());
                }
                let parsed = parse_event(event).map_err(|m| err(ErrorClass::Protocol, m))?;
                let Some(parsed) = parsed else {
                    seen.done_at = Some(now);
                    return Ok(());
                };
                if parsed.usage.is_some() {
                    seen.usage = parsed.usage;
                }
                if let Some(text) = parsed.content {
                    seen.chunks.push(now);
                    if keep_text {
                        seen.text.push_str(&text);
                        seen.chunk_ends.push(seen.text.len());
                    }
                }
                Ok(())
            })?;
        }
        // Read to the body's end so the connection goes back to the pool; the answer is complete.
        let _ = tokio::time::timeout(DRAIN_GRACE, async {
            while let Some(Ok(_)) = body.frame().await {}
        })
        .await;
        Ok(())
    }

    async fn whole(
        &self,
        mut body: hyper::body::Incoming,
        seen: &mut Seen,
    ) -> Result<(), RequestError> {
        let mut all = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| err(hyper_class(&e), chain(&e)))?;
            if let Some(d) = frame.data_ref() {
                all.extend_from_slice(d);
            }
            if all.len() > MAX_BODY {
                return Err(err(ErrorClass::Protocol, "answer larger than 64 MiB"));
            }
        }
        let now = Instant::now();
        let parsed = parse_body(&all).map_err(|m| err(ErrorClass::Protocol, m))?;
        seen.usage = parsed.usage;
        seen.text = parsed.content.map(|c| c.into_owned()).unwrap_or_default();
        seen.done_at = Some(now);
        Ok(())
    }

    fn finish(
        &self,
        p: &Planned,
        mut seen: Seen,
        end: Instant,
        error: Option<RequestError>,
        epoch: Instant,
    ) -> (RequestRecord, Option<Pieces>) {
        let at = |t: Instant| t.saturating_duration_since(epoch).as_secs_f64();
        let n = seen.chunks.len();
        // The per-chunk estimates: one each, or the tokenizer's count of each chunk's text, made
        // after the run (see `settle`). Not needed when the server's count is no more than the
        // chunks: each chunk then counts one whatever the estimates were.
        let one_each = seen
            .usage
            .is_some_and(|u| u.completion_tokens as usize <= n);
        let mut chunk_tokens = vec![1; n];
        // The server's count is the truth; the estimates are made to add up to it.
        if let Some(u) = seen.usage {
            apportion(&mut chunk_tokens, u.completion_tokens);
        }
        let (output_tokens, source) = match (seen.usage, &self.tokenizer) {
            (Some(u), _) => (u.completion_tokens, TokenSource::Usage),
            (None, Some(t)) => (t.encode(&seen.text).len() as u32, TokenSource::Tokenizer),
            (None, None) if self.stream => (chunk_tokens.iter().sum(), TokenSource::Chunks),
            (None, None) => (
                seen.text.split_whitespace().count() as u32,
                TokenSource::Words,
            ),
        };
        let pieces = (self.tokenizer.is_some() && !one_each && n > 0 && seen.chunk_ends.len() == n)
            .then(|| Pieces {
                text: std::mem::take(&mut seen.text),
                ends: std::mem::take(&mut seen.chunk_ends),
                total: seen.usage.map(|u| u.completion_tokens),
            });
        let first = if seen.rejection.is_some() {
            None
        } else if self.stream {
            seen.chunks.first().copied()
        } else {
            seen.done_at
        };
        let rejection = seen.rejection.take();
        let record = RequestRecord {
            index: p.index,
            input_len: p.input_len,
            max_tokens: p.max_tokens,
            send_s: at(seen.send),
            first_token_s: first.map(at),
            end_s: at(end),
            chunk_s: seen.chunks.into_iter().map(at).collect(),
            chunk_tokens,
            output_tokens,
            output_tokens_source: source,
            usage: seen.usage,
            // A rejection that then timed out reading its body is still a rejection.
            error: error.filter(|_| rejection.is_none()),
            rejected: rejection.is_some(),
            reject_code: rejection.as_ref().and_then(|r| r.code.clone()),
            retry_after_s: rejection.as_ref().and_then(|r| r.retry_after_s),
            predicted_ttft_ms: seen.predicted_ttft_ms,
        };
        (record, pieces)
    }

    /// Counts the chunks of `record` in the tokenizer's tokens, now that the run is over: one
    /// encoding per response, which during the run would take the CPU of the servers measured.
    pub(crate) fn settle(&self, record: &mut RequestRecord, pieces: Pieces) {
        let Some(t) = &self.tokenizer else {
            return;
        };
        let mut k: Vec<u32> = t
            .count_pieces(&pieces.text, &pieces.ends)
            .into_iter()
            .map(|k| k.max(1))
            .collect();
        if k.len() != record.chunk_tokens.len() {
            return;
        }
        if let Some(total) = pieces.total {
            apportion(&mut k, total);
        }
        record.chunk_tokens = k;
    }
}

/// A streamed answer's text and where each of its chunks ends, for [`Client::settle`].
pub(crate) struct Pieces {
    text: String,
    ends: Vec<usize>,
    /// The server's count of the answer's tokens.
    total: Option<u32>,
}
