//! Errors: [`GatewayError`] for the gateway's own start-up and serving, and [`ApiError`], the
//! OpenAI error body every failed request gets, with the one mapping from [`BackendError`] to an
//! HTTP status.
use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tandem_engine::EngineError;

use crate::backend::BackendError;
use crate::budget::PREDICTED_TTFT_HEADER;

/// Why the gateway could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// Loading the tokenizer or reading the model's configuration failed.
    #[error("model: {0}")]
    Model(#[from] EngineError),
    /// The configuration is unusable (empty model name, zero context...).
    #[error("configuration: {0}")]
    Config(String),
    /// The listener failed.
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

/// An error as an OpenAI client expects it:
/// `{"error": {"message", "type", "param", "code"}}` under the matching status.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status it is answered with.
    pub status: StatusCode,
    /// What went wrong, for a person.
    pub message: String,
    /// OpenAI's error type: `invalid_request_error`, `rate_limit_error`, `server_error`...
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`...).
    pub code: Option<&'static str>,
    /// Sent as `Retry-After` (whole seconds, at least 1) with a 429.
    pub retry_after: Option<Duration>,
    /// Sent as `x-tandem-predicted-ttft-ms` with an admission refusal.
    pub predicted_ttft: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
            predicted_ttft: None,
        }
    }

    /// 400 `invalid_request_error`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming the field at fault.
    pub fn invalid_param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message).with_param(param)
    }

    /// 404 `model_not_found`.
    pub fn model_not_found(model: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("The model `{model}` does not exist."),
        )
        .with_param("model");
        e.code = Some("model_not_found");
        e
    }

    /// 400 `context_length_exceeded`.
    pub fn context_length(message: impl Into<String>) -> Self {
        let mut e = Self::invalid(message);
        e.code = Some("context_length_exceeded");
        e
    }

    /// 500 `server_error`.
    pub fn internal(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message);
        e.code = Some("internal_error");
        e
    }

    /// A body-reading failure that axum reports with its own status (413 for an oversize body).
    pub fn from_status(status: StatusCode, message: impl Into<String>) -> Self {
        if status.is_server_error() {
            Self::internal(message)
        } else {
            Self::new(status, "invalid_request_error", message)
        }
    }

    /// Names the request field at fault.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    /// The JSON body, also sent as an SSE event when a stream fails after it started.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Invalid(m) => ApiError::invalid(m),
            BackendError::ContextLength(m) => ApiError::context_length(m),
            BackendError::Overloaded {
                message,
                retry_after,
            } => {
                let mut a =
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
                a.code = Some("rate_limit_exceeded");
                a.retry_after = retry_after;
                a
            }
            BackendError::Rejected {
                code,
                message,
                retry_after,
                predicted_ttft,
            } => {
                let mut a =
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message);
                a.code = Some(code);
                a.retry_after = retry_after;
                a.predicted_ttft = predicted_ttft;
                a
            }
            BackendError::Unavailable(m) => {
                let mut a = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", m);
                a.code = Some("service_unavailable");
                a
            }
            BackendError::Timeout(m) => {
                let mut a = ApiError::new(StatusCode::GATEWAY_TIMEOUT, "server_error", m);
                a.code = Some("timeout");
                a
            }
            BackendError::Internal(m) => ApiError::internal(m),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(after) = self.retry_after {
            // Retry-After takes whole seconds; round up so a client never retries too early.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if let Some(p) = self.predicted_ttft {
            resp.headers_mut()
                .insert(PREDICTED_TTFT_HEADER, predicted_ms(p));
        }
        resp
    }
}

/// The `x-tandem-predicted-ttft-ms` value: whole milliseconds, rounded.
pub(crate) fn predicted_ms(d: Duration) -> HeaderValue {
    let ms = (d.as_secs_f64() * 1000.0).round();
    HeaderValue::from(if ms.is_finite() { ms as u64 } else { u64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overloaded_is_429_with_retry_after_rounded_up() {
        let e: ApiError = BackendError::Overloaded {
            message: "busy".into(),
            retry_after: Some(Duration::from_millis(1500)),
        }
        .into();
        let resp = e.clone().into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "busy", "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}})
        );
    }

    #[test]
    fn an_admission_refusal_names_its_reason_and_prediction() {
        let e: ApiError = BackendError::Rejected {
            code: "ttft_budget_unreachable",
            message: "too slow".into(),
            retry_after: Some(Duration::from_millis(2100)),
            predicted_ttft: Some(Duration::from_micros(2_345_600)),
        }
        .into();
        let resp = e.clone().into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "3");
        assert_eq!(resp.headers()[PREDICTED_TTFT_HEADER], "2346");
        assert_eq!(e.body()["error"]["code"], "ttft_budget_unreachable");
        let no_wait: ApiError = BackendError::Rejected {
            code: "itl_budget_unreachable",
            message: "never".into(),
            retry_after: None,
            predicted_ttft: None,
        }
        .into();
        let resp = no_wait.into_response();
        assert!(resp.headers().get(header::RETRY_AFTER).is_none());
        assert!(resp.headers().get(PREDICTED_TTFT_HEADER).is_none());
    }

    #[test]
    fn every_backend_error_has_its_status() {
        let cases = [
            (BackendError::Invalid("x".into()), 400),
            (BackendError::ContextLength("x".into()), 400),
            (BackendError::Unavailable("x".into()), 503),
            (BackendError::Timeout("x".into()), 504),
            (BackendError::Internal("x".into()), 500),
        ];
        for (e, status) in cases {
            assert_eq!(ApiError::from(e).status.as_u16(), status);
        }
        assert_eq!(
            ApiError::from(BackendError::ContextLength("x".into())).code,
            Some("context_length_exceeded")
        );
    }
}
