//! Classifying what went wrong with one HTTP exchange, and reading the start of an error body.

use http_body_util::BodyExt;

use crate::record::{ErrorClass, RequestError};

/// The start of an error answer kept for the report.
pub(crate) const ERROR_HEAD: usize = 1024;

pub(crate) fn err(class: ErrorClass, message: impl Into<String>) -> RequestError {
    RequestError {
        class,
        message: message.into(),
    }
}

/// The message of an error and all its sources, for the JSON report.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

pub(crate) fn hyper_class(e: &hyper::Error) -> ErrorClass {
    if e.is_parse() || e.is_parse_status() || e.is_user() {
        ErrorClass::Protocol
    } else {
        ErrorClass::Disconnected
    }
}

pub(crate) fn request_error(e: &hyper_util::client::legacy::Error) -> RequestError {
    let mut class = if e.is_connect() {
        ErrorClass::Connect
    } else {
        ErrorClass::Disconnected
    };
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if !e.is_connect() {
                class = hyper_class(h);
            }
            break;
        }
        src = s.source();
    }
    err(class, chain(e))
}

/// Up to `limit` bytes of the start of `body` (less when it ends or fails first).
pub(crate) async fn read_head(body: &mut hyper::body::Incoming, limit: usize) -> Vec<u8> {
    let mut head = Vec::new();
    while head.len() < limit {
        match body.frame().await {
            Some(Ok(f)) => head.extend_from_slice(f.data_ref().map_or(&[][..], |d| &d[..])),
            _ => break,
        }
    }
    head.truncate(limit);
    head
}
