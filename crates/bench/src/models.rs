//! The model to ask for when `--model` is not given: the first entry of the endpoint's
//! `GET /v1/models`, as vLLM's and SGLang's benchmarks do.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper::header::{AUTHORIZATION, HeaderValue};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::client::base_uri;
use crate::error::BenchError;
use crate::http_error::chain;

/// A model list larger than this is not one.
const MAX_LIST: usize = 4 << 20;
/// The longest wait for the list (less when `--timeout` is shorter).
const MAX_WAIT: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
struct ModelList {
    data: Vec<Model>,
}

#[derive(Deserialize)]
struct Model {
    id: String,
}

/// Where the model list of `url` is: `/v1/models` beside the API path when the URL has one
/// (`http://h/x/v1/chat/completions` gives `http://h/x/v1/models`), else under the root.
pub(crate) fn models_uri(url: &str) -> Result<Uri, BenchError> {
    let base = base_uri(url)?;
    let path = base.path();
    let prefix = match path.find("/v1/") {
        Some(i) => &path[..i],
        None if path.ends_with("/v1") => &path[..path.len() - 3],
        None => "",
    };
    let authority = base.authority().map_or("", |a| a.as_str());
    format!("http://{authority}{prefix}/v1/models")
        .parse()
        .map_err(|e| BenchError::InvalidArgs(format!("--url {url}: {e}")))
}

/// The first model id in a `/v1/models` body.
fn first_id(body: &[u8]) -> Result<String, String> {
    let list: ModelList = serde_json::from_slice(body).map_err(|e| {
        let head = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        format!("not a model list ({e}): {head}")
    })?;
    match list.data.into_iter().next() {
        Some(m) if !m.id.is_empty() => Ok(m.id),
        Some(_) => Err("the first model has an empty id".into()),
        None => Err("the model list is empty".into()),
    }
}

/// Asks the endpoint for its models once and returns the first one's id.
pub(crate) async fn first_model(
    url: &str,
    api_key: Option<&str>,
    timeout: Duration,
) -> Result<String, BenchError> {
    let uri = models_uri(url)?;
    let fail = |why: String| BenchError::NoModel(format!("GET {uri}: {why}"));
    let mut req = hyper::Request::get(uri.clone());
    if let Some(k) = api_key {
        let v = HeaderValue::from_str(&format!("Bearer {k}"))
            .map_err(|_| BenchError::InvalidArgs("--api-key is not a valid header value".into()))?;
        req = req.header(AUTHORIZATION, v);
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let http = HttpClient::builder(TokioExecutor::new()).build_http();
    let exchange = async {
        let resp = http.request(req).await.map_err(|e| chain(&e))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_LIST)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        if !status.is_success() {
            let head = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(format!("HTTP {status}: {head}"));
        }
        first_id(&body)
    };
    let wait = timeout.min(MAX_WAIT);
    match tokio::time::timeout(wait, exchange).await {
        Ok(Ok(id)) => Ok(id),
        Ok(Err(why)) => Err(fail(why)),
        Err(_) => Err(fail(format!("no answer within {wait:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_sits_beside_the_api_path() {
        let at = |u: &str| {
            models_uri(u)
                .map(|u| u.to_string())
                .unwrap_or_else(|e| e.to_string())
        };
        assert_eq!(at("http://h:8000"), "http://h:8000/v1/models");
        assert_eq!(at("http://h:8000/"), "http://h:8000/v1/models");
        assert_eq!(at("http://h/v1/chat/completions"), "http://h/v1/models");
        assert_eq!(
            at("http://h/proxy/v1/completions"),
            "http://h/proxy/v1/models"
        );
        assert_eq!(at("http://h/proxy/v1"), "http://h/proxy/v1/models");
        assert_eq!(at("http://h/generate"), "http://h/v1/models");
        assert!(at("https://h").contains("only http://"));
    }

    #[test]
    fn takes_the_first_id() {
        let body =
            br#"{"object":"list","data":[{"id":"SmolLM2","object":"model"},{"id":"other"}]}"#;
        assert_eq!(first_id(body), Ok("SmolLM2".to_string()));
        assert_eq!(
            first_id(br#"{"object":"list","data":[]}"#),
            Err("the model list is empty".to_string())
        );
        assert_eq!(
            first_id(br#"{"data":[{"id":""}]}"#),
            Err("the first model has an empty id".to_string())
        );
        let e = first_id(b"<html>").expect_err("not json");
        assert!(
            e.starts_with("not a model list") && e.ends_with("<html>"),
            "{e}"
        );
        assert!(first_id(br#"{"models":["a"]}"#).is_err());
    }
}
