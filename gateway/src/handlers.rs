//! `POST /v1/chat/completions` and `POST /v1/completions`.
use std::time::Instant;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tracing::{Instrument, info_span};

use crate::backend::GenerateRequest;
use crate::config::{AppState, unix_now};
use crate::error::ApiError;
use crate::generation::Generation;
use crate::ids::request_id;
use crate::prepare::prepare;
use crate::request::{Kind, parse};
use crate::response::Meta;
use crate::sse::events;

pub(crate) async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, Kind::Chat, body).await
}

pub(crate) async fn completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    handle(state, Kind::Completion, body).await
}

async fn handle(state: AppState, kind: Kind, body: Result<Bytes, BytesRejection>) -> Response {
    let arrived = Instant::now();
    let id = request_id(match kind {
        Kind::Chat => "chatcmpl",
        Kind::Completion => "cmpl",
    });
    let span = info_span!("generate", request_id = %id);
    match run(state, kind, body, id, arrived).instrument(span).await {
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
    body: Result<Bytes, BytesRejection>,
    id: String,
    arrived: Instant,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| ApiError::from_status(r.status(), r.body_text()))?;
    let req = parse(kind, &body)?;
    let cfg = state.config();
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
    let tokens = cfg
        .backend
        .generate(GenerateRequest {
            request_id: id.clone(),
            model: req.model.clone(),
            prompt_tokens: prepared.prompt_tokens,
            sampling: prepared.sampling,
        })
        .await?;
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
        return Ok((headers, Body::from_stream(events(meta, generation))).into_response());
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
            return Ok(Json(body).into_response());
        }
    }
    Err(ApiError::internal(
        "the generation ended without a finish reason",
    ))
}
