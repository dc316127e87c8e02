//! HTTP contract tests: a scripted [`FakeBackend`] behind the real router, and the real model
//! behind [`crate::LocalBackend`].
mod cancel;
mod contract;
mod errors;
mod model;
mod prepare;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use serde_json::Value;
use tandem_engine::FinishReason;
use tandem_engine::tokenizer::Tokenizer;
use tokio::sync::Notify;
use tower::ServiceExt;

use crate::backend::{Backend, BackendError, GenerateRequest, Readiness, TokenChunk, TokenStream};
use crate::config::{AppState, GatewayConfig};

pub(crate) const MODEL: &str = "test-model";

/// The real model's tokenizer, loaded once (the model file must be fetched).
pub(crate) fn tokenizer() -> Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = tandem_engine::testing::require_model_path();
        tandem_engine::load_tokenizer(&path).unwrap_or_else(|e| panic!("{e}"))
    })
    .clone()
}

/// Ids of `text` as plain text (no special tokens, no BOS).
pub(crate) fn ids(text: &str) -> Vec<u32> {
    let t = tokenizer();
    let mut v = t.encode(text, false).unwrap();
    if t.add_bos() {
        v.remove(0);
    }
    v
}

pub(crate) fn chunk(tokens: Vec<u32>, finish: Option<FinishReason>) -> TokenChunk {
    TokenChunk { tokens, finish }
}

/// What the fake backend does with the next request.
pub(crate) enum Script {
    /// Refuses it before any token.
    Refuse(BackendError),
    /// Streams these items, then ends the stream.
    Items(Vec<Result<TokenChunk, BackendError>>),
    /// Streams these items, then never ends (until dropped).
    ItemsThenHang(Vec<Result<TokenChunk, BackendError>>),
    /// One token (the given id) every few milliseconds, forever.
    Endless(u32),
}

/// A backend that plays a script, remembers the last request and records when a stream it
/// handed out is dropped.
pub(crate) struct FakeBackend {
    script: Mutex<Option<Script>>,
    pub(crate) last: Mutex<Option<GenerateRequest>>,
    pub(crate) dropped: Arc<AtomicBool>,
    pub(crate) dropped_note: Arc<Notify>,
    /// Notified when a request reaches the backend.
    pub(crate) started: Arc<Notify>,
    pub(crate) ready: bool,
}

impl FakeBackend {
    pub(crate) fn new(script: Script) -> Arc<Self> {
        Arc::new(FakeBackend {
            script: Mutex::new(Some(script)),
            last: Mutex::new(None),
            dropped: Arc::new(AtomicBool::new(false)),
            dropped_note: Arc::new(Notify::new()),
            started: Arc::new(Notify::new()),
            ready: true,
        })
    }

    pub(crate) fn last_request(&self) -> GenerateRequest {
        self.last
            .lock()
            .unwrap()
            .clone()
            .expect("no request reached the backend")
    }

    pub(crate) fn was_dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }
}

/// Wraps a stream and records its drop.
struct DropRecorder<S> {
    inner: S,
    dropped: Arc<AtomicBool>,
    note: Arc<Notify>,
}

impl<S> Drop for DropRecorder<S> {
    fn drop(&mut self) {
        self.dropped.store(true, Ordering::SeqCst);
        self.note.notify_one();
    }
}

impl<S: Stream + Unpin> Stream for DropRecorder<S> {
    type Item = S::Item;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        self.inner.poll_next_unpin(cx)
    }
}

impl Backend for FakeBackend {
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<TokenStream, BackendError>> {
        *self.last.lock().unwrap() = Some(req);
        self.started.notify_one();
        let script = self.script.lock().unwrap().take();
        let (dropped, note) = (self.dropped.clone(), self.dropped_note.clone());
        let wrap = move |s: TokenStream| -> TokenStream {
            Box::pin(DropRecorder {
                inner: s,
                dropped,
                note,
            })
        };
        let result = match script {
            None => Err(BackendError::Internal("the script is spent".into())),
            Some(Script::Refuse(e)) => Err(e),
            Some(Script::Items(items)) => Ok(wrap(futures::stream::iter(items).boxed())),
            Some(Script::ItemsThenHang(items)) => Ok(wrap(
                futures::stream::iter(items)
                    .chain(futures::stream::pending())
                    .boxed(),
            )),
            Some(Script::Endless(id)) => Ok(wrap(
                futures::stream::unfold((), move |()| async move {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    Some((Ok(chunk(vec![id], None)), ()))
                })
                .boxed(),
            )),
        };
        async move { result }.boxed()
    }

    fn readiness(&self) -> Readiness {
        Readiness {
            ready: self.ready,
            detail: if self.ready {
                "1 fake worker".into()
            } else {
                "no decode worker".into()
            },
        }
    }
}

pub(crate) fn config(backend: Arc<dyn Backend>) -> GatewayConfig {
    GatewayConfig::new(MODEL, tokenizer(), 8192, backend)
}

pub(crate) fn app_with(cfg: GatewayConfig) -> Router {
    crate::router(AppState::new(cfg).unwrap())
}

pub(crate) fn app(backend: Arc<dyn Backend>) -> Router {
    app_with(config(backend))
}

/// Sends one request through the router and reads the whole response.
pub(crate) async fn send(
    app: &Router,
    method: &str,
    uri: &str,
    body: &str,
) -> (StatusCode, HeaderMap, Bytes) {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    (parts.status, parts.headers, bytes)
}

pub(crate) async fn post(app: &Router, uri: &str, body: &Value) -> (StatusCode, HeaderMap, Value) {
    let (s, h, b) = send(app, "POST", uri, &body.to_string()).await;
    let v = serde_json::from_slice(&b)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&b)));
    (s, h, v)
}

/// The `data:` payloads of an SSE body, in order.
pub(crate) fn sse_data(body: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(body).unwrap();
    assert!(text.ends_with("\n\n"), "{text:?}");
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_owned()
        })
        .collect()
}

/// A chunk with `id` and `created` checked and removed, for exact comparison.
pub(crate) fn strip_ids(mut v: Value, prefix: &str) -> Value {
    let id = v["id"].as_str().unwrap_or_else(|| panic!("no id in {v}"));
    assert!(id.starts_with(prefix), "{id}");
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let o = v.as_object_mut().unwrap();
    o.remove("id");
    o.remove("created");
    v
}
