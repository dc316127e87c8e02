//! Latency-budget admission control as the client sees it: the budget and priority headers each
//! request carries, and what a server that sheds load says back (a 429 with an OpenAI error body
//! and `Retry-After`, and its predicted TTFT on every answer).

use std::time::Duration;

use clap::ValueEnum;
use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue, RETRY_AFTER};
use serde::Serialize;

use crate::error::BenchError;

pub const TTFT_BUDGET: &str = "x-tandem-ttft-budget-ms";
pub const ITL_BUDGET: &str = "x-tandem-itl-budget-ms";
pub const PRIORITY: &str = "x-tandem-priority";
pub const PREDICTED_TTFT: &str = "x-tandem-predicted-ttft-ms";
/// A rejection code longer than this is cut: codes key a table, and a server could send anything.
const MAX_CODE: usize = 64;

/// Which requests a loaded server sheds first (`x-tandem-priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Shed last.
    Critical,
    /// The server's default.
    Standard,
    /// Shed first.
    Sheddable,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "critical",
            Self::Standard => "standard",
            Self::Sheddable => "sheddable",
        }
    }
}

/// A budget flag's value: a positive duration (`2s`, `450ms`).
pub fn parse_budget(s: &str) -> Result<Duration, String> {
    let d = crate::dist::parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("`{s}`: a budget must be positive"));
    }
    Ok(d)
}

/// A budget as its header carries it: whole milliseconds, rounded up, at least 1.
pub fn budget_ms(d: Duration) -> u64 {
    let ms = d.as_nanos().div_ceil(1_000_000).max(1);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

/// What every request of the benchmark asks of the server's admission control.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Admission {
    pub ttft_budget_ms: Option<u64>,
    pub itl_budget_ms: Option<u64>,
    pub priority: Option<Priority>,
}

impl Admission {
    /// The headers to send, built once for the whole run.
    pub(crate) fn headers(&self) -> Result<Vec<(HeaderName, HeaderValue)>, BenchError> {
        let mut out = Vec::new();
        let mut push = |name: &'static str, value: String| {
            let value = HeaderValue::from_str(&value)
                .map_err(|_| BenchError::Internal(format!("{name}: {value}")))?;
            out.push((HeaderName::from_static(name), value));
            Ok::<_, BenchError>(())
        };
        if let Some(ms) = self.ttft_budget_ms {
            push(TTFT_BUDGET, ms.to_string())?;
        }
        if let Some(ms) = self.itl_budget_ms {
            push(ITL_BUDGET, ms.to_string())?;
        }
        if let Some(p) = self.priority {
            push(PRIORITY, p.as_str().to_string())?;
        }
        Ok(out)
    }
}

/// A non-negative finite number of a header, or `None`.
fn number(headers: &HeaderMap, name: impl hyper::header::AsHeaderName) -> Option<f64> {
    let v: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
    (v.is_finite() && v >= 0.0).then_some(v)
}

/// The server's predicted time to first token, milliseconds.
pub fn predicted_ttft_ms(headers: &HeaderMap) -> Option<f64> {
    number(headers, PREDICTED_TTFT)
}

/// `Retry-After` in seconds (the HTTP-date form is not read).
pub fn retry_after_s(headers: &HeaderMap) -> Option<f64> {
    number(headers, RETRY_AFTER)
}

/// The `error.code` of an OpenAI error body (a string, or a number as its text), cut to 64
/// characters; `None` when the body is not one or has no code.
pub fn reject_code(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let code = match &v["error"]["code"] {
        serde_json::Value::String(s) if !s.is_empty() => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        _ => return None,
    };
    Some(code.chars().take(MAX_CODE).collect())
}

/// Why the server turned a request away, as its 429 said.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: Option<String>,
    pub retry_after_s: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_round_up_to_whole_milliseconds() {
        let ms = |s: &str| parse_budget(s).map(budget_ms);
        assert_eq!(ms("450ms"), Ok(450));
        assert_eq!(ms("2s"), Ok(2000));
        assert_eq!(ms("1.5ms"), Ok(2));
        assert_eq!(ms("0.2ms"), Ok(1));
        assert_eq!(ms("1us"), Ok(1));
        assert_eq!(ms("2000.0001ms"), Ok(2001));
        assert_eq!(budget_ms(Duration::from_nanos(1)), 1);
        assert_eq!(budget_ms(Duration::from_millis(7)), 7);
        assert!(parse_budget("0s").is_err());
        assert!(parse_budget("0").is_err());
        assert!(parse_budget("fast").is_err());
        assert!(parse_budget("-5ms").is_err());
    }

    #[test]
    fn headers_carry_what_was_asked() {
        let a = Admission {
            ttft_budget_ms: Some(450),
            itl_budget_ms: None,
            priority: Some(Priority::Sheddable),
        };
        let got: Vec<(String, String)> = a
            .headers()
            .expect("valid")
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
            .collect();
        assert_eq!(
            got,
            vec![
                (TTFT_BUDGET.to_string(), "450".to_string()),
                (PRIORITY.to_string(), "sheddable".to_string()),
            ]
        );
        assert!(Admission::default().headers().expect("valid").is_empty());
    }

    #[test]
    fn reads_the_answer_headers() {
        let mut h = HeaderMap::new();
        assert_eq!((predicted_ttft_ms(&h), retry_after_s(&h)), (None, None));
        h.insert(PREDICTED_TTFT, HeaderValue::from_static("1250"));
        h.insert(RETRY_AFTER, HeaderValue::from_static(" 3 "));
        assert_eq!(predicted_ttft_ms(&h), Some(1250.0));
        assert_eq!(retry_after_s(&h), Some(3.0));
        for bad in ["-1", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", "NaN", "inf"] {
            h.insert(RETRY_AFTER, HeaderValue::from_static(bad));
            assert_eq!(retry_after_s(&h), None, "{bad}");
        }
    }

    #[test]
    fn reads_the_error_code() {
        let body = br#"{"error":{"message":"TTFT budget of 100 ms cannot be met","type":"rate_limit_error","param":null,"code":"ttft_budget_unreachable"}}"#;
        assert_eq!(
            reject_code(body).as_deref(),
            Some("ttft_budget_unreachable")
        );
        assert_eq!(
            reject_code(br#"{"error":{"code":429}}"#).as_deref(),
            Some("429")
        );
        assert_eq!(reject_code(br#"{"error":{"code":null}}"#), None);
        assert_eq!(reject_code(br#"{"error":{"code":""}}"#), None);
        assert_eq!(reject_code(br#"{"error":"slow down"}"#), None);
        assert_eq!(reject_code(b"Too Many Requests"), None);
        let long = format!(r#"{{"error":{{"code":"{}"}}}}"#, "x".repeat(100));
        assert_eq!(reject_code(long.as_bytes()).map(|c| c.len()), Some(64));
    }
}
