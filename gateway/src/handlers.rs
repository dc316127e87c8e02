//! `POST /v1/chat/completions` and `POST /v1/completions`.
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use tracing::{Instrument, info_span};

use crate::backend::GenerateRequest;
use crate::budget::{self, PREDICTED_TTFT_HEADER};
use crate::config::{AppState, unix_now};
use crate::error::{ApiError, predicted_ms};
use crate::generation::Generation;
use crate::ids::request_id;
use crate::prepare::prepare;
use crate::request::{Kind, parse};
use crate::response::Meta;
use crate::sse::events;

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, Kind::Chat, &headers, body).await
}

pub(crate) async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, Kind::Completion, &headers, body).await
}

async fn handle(
    state: AppState,
    kind: Kind,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let id = request_id(match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    });
    let span = info_span!("generate", request_id = %id);
    match run(state, kind, headers, body, id, arrived)
        .instrument(span)
        .await
    {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(status = e.status.as_u16(), message = %e.message, "request refused");
            e.into_response()
        }
    }
}

async fn run(
    state: AppState,
    kind: Kind,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    id: String,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::from_status(r.status(), r.body_text()))?;
    let req = parse(kind, &body)?;
    let cfg = state.config();
    let budget = budget::from_headers(headers, cfg.default_budget)?;
    if req.model != cfg.model_name {
        return Err(ApiError::model_not_found(&req.model));
    }
    // Templating and tokenizing a long prompt takes milliseconds of CPU: keep it off the
    // threads that drive connections.
    let prepared = {
        let tok = cfg.tokenizer.clone();
        let (ctx, default_max) = (cfg.max_context, cfg.default_max_tokens);
        let req = req.clone();
        tokio::task::spawn_blocking(move || prepare(&tok, ctx, default_max, &req))
            .await
            .map_err(|e| ApiError::internal(format!("tokenization task failed: {e}")))??
    };
    let prompt_len = prepared.prompt_tokens.len();
    let prompt_ids = req.return_token_ids.then(|| prepared.prompt_tokens.clone());
    // The prediction counts from the backend's receipt; the client's wait began at arrival.
    let before_backend = arrived.elapsed();
    let with_wait = |p: Option<Duration>| p.map(|p| p + before_backend);
    let admitted = cfg
        .backend
        .generate_admitted(GenerateRequest {
            request_id: id.clone(),
            model: req.model.clone(),
            prompt_tokens: prepared.prompt_tokens,
            sampling: prepared.sampling,
            budget,
        })
        .await
        .map_err(|e| {
            let mut e = ApiError::from(e);
            e.predicted_ttft = with_wait(e.predicted_ttft);
            e
        })?;
    let predicted =
        with_wait(admitted.predicted_ttft).map(|p| (PREDICTED_TTFT_HEADER, predicted_ms(p)));
    let tokens = admitted.tokens;
    state.metrics().add_prompt_tokens(prompt_len);
    let meta = Meta {
        kind,
        id,
        created: unix_now(),
        model: req.model,
        include_usage: req.include_usage,
    };
    let mut generation = Generation::new(
        state.clone(),
        tokens,
        cfg.tokenizer.clone(),
        req.stop,
        prompt_len,
        arrived,
    );
    if req.stream {
        let headers = [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ];
        let mut resp = (headers, Body::from_stream(events(meta, generation))).into_response();
        if let Some((name, value)) = predicted {
            resp.headers_mut().insert(name, value);
        }
        return Ok(resp);
    }
    let mut text = String::new();
    while let Some(piece) = generation.next().await {
        let piece = piece?;
        text.push_str(&piece.text);
        if let Some(finish) = piece.finish {
            let mut body = meta.body(
                &text,
                finish,
                generation.prompt_tokens,
                generation.completion_tokens,
            );
            if let Some(ids) = prompt_ids {
                body["prompt_token_ids"] = ids.into();
                body["choices"][0]["token_ids"] = generation.token_ids.clone().into();
            }
            let mut resp = Json(body).into_response();
            if let Some((name, value)) = predicted {
                resp.headers_mut().insert(name, value);
            }
            return Ok(resp);
        }
    }
    Err(ApiError::internal(
        "the generation ended without a finish reason",
    ))
}
