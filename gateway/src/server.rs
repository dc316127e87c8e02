//! The router, the small endpoints (`/health`, `/ready`, `/v1/models`, `/metrics`) and `serve`.
use std::future::Future;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde_json::json;

use crate::config::AppState;
use crate::error::{ApiError, GatewayError};
use crate::handlers::{chat_completions, completions};

/// Every route of the gateway, with request counting and the body limit.
pub fn router(state: AppState) -> Router {
    let limit = state.config().max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Serves `listener` until `shutdown` resolves, then stops accepting and lets in-flight requests
/// (streams included) finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    // Each SSE event goes out when written: Nagle's algorithm would hold a small write until the
    // client acknowledged the one before it.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY failed");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// Counts each answered request by route pattern (bounded) and status class.
async fn count(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let resp = next.run(req).await;
    state
        .metrics()
        .count_request(&endpoint, resp.status().as_u16());
    resp
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(state): State<AppState>) -> Response {
    let r = state.config().backend.readiness();
    let (status, word) = if r.ready {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
    };
    (status, Json(json!({"status": word, "detail": r.detail}))).into_response()
}

fn model_card(state: &AppState) -> serde_json::Value {
    json!({
        "id": state.config().model_name,
        "object": "model",
        "created": state.inner.started,
        "owned_by": "tandem",
        "max_model_len": state.config().max_context,
    })
}

async fn models(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": [model_card(&state)]}))
}

async fn model(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    if name == state.config().model_name {
        Json(model_card(&state)).into_response()
    } else {
        ApiError::model_not_found(&name).into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            let mut text = state.metrics().render();
            state.config().backend.render_metrics(&mut text);
            text
        },
    )
        .into_response()
}

async fn not_found(req: Request) -> ApiError {
    let mut e = ApiError::invalid(format!(
        "Unknown endpoint: {} {}",
        req.method(),
        req.uri().path()
    ));
    e.status = StatusCode::NOT_FOUND;
    e
}
