//! A request's latency budgets and priority, from the `x-tandem-*` headers or the served model's
//! defaults, checked here so that a bad header gets a 400 naming it.

use std::time::Duration;

use axum::http::HeaderMap;
use tandem_router::Priority;

use crate::error::ApiError;

/// Header: time-to-first-token budget, whole milliseconds.
pub const TTFT_BUDGET_HEADER: &str = "x-tandem-ttft-budget-ms";
/// Header: inter-token latency budget, whole milliseconds.
pub const ITL_BUDGET_HEADER: &str = "x-tandem-itl-budget-ms";
/// Header: `critical`, `standard` (the default) or `sheddable`.
pub const PRIORITY_HEADER: &str = "x-tandem-priority";
/// Response header: the time to first token admission predicted, whole milliseconds.
pub const PREDICTED_TTFT_HEADER: &str = "x-tandem-predicted-ttft-ms";

/// Largest TTFT budget taken: ten minutes (longer is no budget, and a typo).
const MAX_TTFT_MS: u64 = 600_000;
/// Largest ITL budget taken: one minute per token.
const MAX_ITL_MS: u64 = 60_000;

/// What a request asks of admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budget {
    pub ttft: Option<Duration>,
    pub itl: Option<Duration>,
    pub priority: Priority,
}

/// The request's budget: its headers, else `defaults` (the served model's `--ttft-budget` and
/// `--itl-budget`).
pub fn from_headers(headers: &HeaderMap, defaults: Budget) -> Result<Budget, ApiError> {
    let ttft = millis(headers, TTFT_BUDGET_HEADER, MAX_TTFT_MS)?.or(defaults.ttft);
    let itl = millis(headers, ITL_BUDGET_HEADER, MAX_ITL_MS)?.or(defaults.itl);
    let priority = match header(headers, PRIORITY_HEADER)? {
        None => defaults.priority,
        Some(v) => Priority::parse(v).ok_or_else(|| {
            ApiError::invalid_param(
                PRIORITY_HEADER,
                format!(
                    "The header {PRIORITY_HEADER} must be critical, standard or sheddable, got {v:?}."
                ),
            )
        })?,
    };
    Ok(Budget {
        ttft,
        itl,
        priority,
    })
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    let mut values = headers.get_all(name).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::invalid_param(
            name,
            format!("The header {name} must be sent once."),
        ));
    }
    v.to_str().map(|s| Some(s.trim())).map_err(|_| {
        ApiError::invalid_param(name, format!("The header {name} must be ASCII text."))
    })
}

fn millis(headers: &HeaderMap, name: &str, max: u64) -> Result<Option<Duration>, ApiError> {
    let Some(v) = header(headers, name)? else {
        return Ok(None);
    };
    let bad = || {
        ApiError::invalid_param(
            name,
            format!(
                "The header {name} must be a whole number of milliseconds from 1 to {max}, got {v:?}."
            ),
        )
    };
    let ms: u64 = v.parse().map_err(|_| bad())?;
    if ms == 0 || ms > max {
        return Err(bad());
    }
    Ok(Some(Duration::from_millis(ms)))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn headers_override_the_models_defaults() {
        let defaults = Budget {
            ttft: Some(Duration::from_secs(2)),
            itl: Some(Duration::from_millis(100)),
            priority: Priority::Standard,
        };
        assert_eq!(from_headers(&HeaderMap::new(), defaults).unwrap(), defaults);
        let b = from_headers(
            &headers(&[
                (TTFT_BUDGET_HEADER, "450"),
                (ITL_BUDGET_HEADER, " 40 "),
                (PRIORITY_HEADER, "sheddable"),
            ]),
            defaults,
        )
        .unwrap();
        assert_eq!(b.ttft, Some(Duration::from_millis(450)));
        assert_eq!(b.itl, Some(Duration::from_millis(40)));
        assert_eq!(b.priority, Priority::Sheddable);
        assert_eq!(
            from_headers(&HeaderMap::new(), Budget::default()).unwrap(),
            Budget::default()
        );
    }

    #[test]
    fn bad_values_are_400s_naming_the_header() {
        let cases: &[(&'static str, &str)] = &[
            (TTFT_BUDGET_HEADER, "-5"),
            (TTFT_BUDGET_HEADER, "0"),
            (TTFT_BUDGET_HEADER, "soon"),
            (TTFT_BUDGET_HEADER, "1.5"),
            (TTFT_BUDGET_HEADER, "600001"),
            (TTFT_BUDGET_HEADER, "99999999999999999999999"),
            (ITL_BUDGET_HEADER, "0"),
            (ITL_BUDGET_HEADER, "60001"),
            (ITL_BUDGET_HEADER, ""),
            (PRIORITY_HEADER, "urgent"),
            (PRIORITY_HEADER, "CRITICAL"),
        ];
        for (name, value) in cases {
            let e = from_headers(&headers(&[(*name, value)]), Budget::default()).unwrap_err();
            assert_eq!(e.status.as_u16(), 400, "{name}: {value}");
            assert_eq!(e.param.as_deref(), Some(*name), "{name}: {value}");
            assert!(e.message.contains(name), "{}", e.message);
        }
        let twice = headers(&[(TTFT_BUDGET_HEADER, "5"), (TTFT_BUDGET_HEADER, "6")]);
        assert!(from_headers(&twice, Budget::default()).is_err());
    }
}
