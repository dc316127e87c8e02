//! The router's one error type, and its mapping to gRPC status (the only place that maps it).

use std::time::Duration;

use tandem_proto::v1::{self, Rejection};
pub use tandem_sim::admission::RejectReason;

use crate::types::Leg;

/// Everything the router can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// No ready worker serves this leg for the model.
    #[error("no ready {0} worker")]
    NoWorkers(Leg),
    /// Every candidate for the leg is over its limit.
    #[error("{leg} workers overloaded: {detail}")]
    Overloaded {
        /// The leg that has no room.
        leg: Leg,
        /// What limit was hit, for logs and the client.
        detail: String,
        /// When a retry might succeed.
        retry_after: Duration,
    },
    /// Admission refused the request: it cannot meet its budget, or the queue is full.
    #[error("{detail}")]
    Rejected {
        /// Why, as the client's error code names it.
        reason: RejectReason,
        /// What admission found, for logs and the client.
        detail: String,
        /// When a retry is predicted to succeed; `None` when no wait would help.
        retry_after: Option<Duration>,
        /// The TTFT admission predicted on the best candidate, if it could predict.
        predicted_ttft: Option<Duration>,
    },
    /// A malformed request or registration.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No worker has ever registered the requested model.
    #[error("unknown model {0:?}")]
    UnknownModel(String),
    /// A heartbeat or deregistration from a worker not in the set (its lease may have lapsed).
    #[error("unknown worker {0:?}: register again")]
    UnknownWorker(String),
    /// The registry holds its configured maximum of workers.
    #[error("worker limit of {0} reached")]
    TooManyWorkers(usize),
    /// The router task's queue is full; retry shortly.
    #[error("router queue full")]
    Busy,
    /// The router task has stopped.
    #[error("router stopped")]
    Stopped,
    /// The gRPC server failed, or a connection to a remote router could not be made.
    #[error("router transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A remote router answered a call with an error status (passed on unchanged).
    #[error("router call failed: {}", .0.message())]
    Remote(#[from] tonic::Status),
}

impl RouterError {
    /// The in-band answer for refusals that a client handles by waiting or going elsewhere;
    /// `None` for errors that are failures of the call itself.
    pub fn rejection(&self) -> Option<Rejection> {
        use v1::RejectReason as Wire;
        let mut predicted = None;
        let (reason, retry_after) = match self {
            RouterError::NoWorkers(Leg::Prefill) => (Wire::NoPrefillWorker, None),
            RouterError::NoWorkers(Leg::Decode) => (Wire::NoDecodeWorker, None),
            RouterError::Overloaded {
                leg, retry_after, ..
            } => (
                match leg {
                    Leg::Prefill => Wire::PrefillOverloaded,
                    Leg::Decode => Wire::KvExhausted,
                },
                Some(*retry_after),
            ),
            RouterError::Rejected {
                reason,
                retry_after,
                predicted_ttft,
                ..
            } => {
                predicted = *predicted_ttft;
                let wire = match reason {
                    RejectReason::TtftBudgetUnreachable => Wire::TtftBudgetUnreachable,
                    RejectReason::ItlBudgetUnreachable => Wire::ItlBudgetUnreachable,
                    RejectReason::QueueFull => Wire::QueueFull,
                };
                (wire, *retry_after)
            }
            _ => return None,
        };
        let retry_after_ms = retry_after.map_or(0, |d| crate::convert::millis(d).max(1));
        Some(Rejection {
            reason: reason.into(),
            message: self.to_string(),
            retry_after_ms,
            predicted_ttft_ms: predicted.map(crate::convert::millis),
        })
    }
}

impl From<RouterError> for tonic::Status {
    fn from(e: RouterError) -> Self {
        use tonic::Code;
        let code = match &e {
            RouterError::NoWorkers(_) | RouterError::Stopped => Code::Unavailable,
            RouterError::Overloaded { .. }
            | RouterError::Rejected { .. }
            | RouterError::TooManyWorkers(_)
            | RouterError::Busy => Code::ResourceExhausted,
            RouterError::InvalidArgument(_) => Code::InvalidArgument,
            RouterError::UnknownModel(_) | RouterError::UnknownWorker(_) => Code::NotFound,
            RouterError::Transport(_) => Code::Unavailable,
            RouterError::Remote(status) => status.code(),
        };
        tonic::Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes() {
        let code = |e: RouterError| tonic::Status::from(e).code();
        assert_eq!(
            code(RouterError::NoWorkers(Leg::Decode)),
            tonic::Code::Unavailable
        );
        assert_eq!(
            code(RouterError::InvalidArgument("x".into())),
            tonic::Code::InvalidArgument
        );
        let over = RouterError::Overloaded {
            leg: Leg::Prefill,
            detail: "queue".into(),
            retry_after: Duration::from_millis(1500),
        };
        assert_eq!(code(over), tonic::Code::ResourceExhausted);
        assert_eq!(code(RouterError::Busy), tonic::Code::ResourceExhausted);
        assert_eq!(
            code(RouterError::UnknownWorker("w".into())),
            tonic::Code::NotFound
        );
        assert_eq!(code(RouterError::Stopped), tonic::Code::Unavailable);
    }

    #[test]
    fn rejections_carry_reason_and_retry_after() {
        let r = RouterError::Overloaded {
            leg: Leg::Decode,
            detail: "no blocks".into(),
            retry_after: Duration::from_millis(1500),
        }
        .rejection();
        let r = r.as_ref();
        assert_eq!(r.map(|r| r.reason()), Some(v1::RejectReason::KvExhausted));
        assert_eq!(r.map(|r| r.retry_after_ms), Some(1500));
        let none = RouterError::NoWorkers(Leg::Prefill).rejection();
        assert_eq!(
            none.map(|r| r.reason()),
            Some(v1::RejectReason::NoPrefillWorker)
        );
        assert!(RouterError::Busy.rejection().is_none());
        let budget = RouterError::Rejected {
            reason: RejectReason::QueueFull,
            detail: "full".into(),
            retry_after: Some(Duration::from_micros(300)),
            predicted_ttft: Some(Duration::from_millis(2500)),
        }
        .rejection();
        let budget = budget.as_ref();
        assert_eq!(
            budget.map(|r| r.reason()),
            Some(v1::RejectReason::QueueFull)
        );
        assert_eq!(
            budget.map(|r| r.retry_after_ms),
            Some(1),
            "rounded up, never 0"
        );
        assert_eq!(budget.and_then(|r| r.predicted_ttft_ms), Some(2500));
    }
}
