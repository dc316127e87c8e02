//! What the batch loop tells a running sequence's stream and a computed prompt's caller, as plain
//! values: the loop knows no gRPC, and the messages and statuses are made of these here only.
use tandem_engine::sampling::FinishReason;
use tandem_engine::{EngineError, ErrorClass};
use tandem_proto::v1;
use tonic::Status;

/// One event of a running sequence, in the order they happen.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token sampled, with the count generated so far (it included) and, for the last, why the
    /// sequence ended.
    Token {
        token: u32,
        generated: u32,
        finish: Option<FinishReason>,
    },
    /// The sequence goes on on another decode worker (live migration); nothing follows.
    Moved(Moved),
    /// It ended with an error; nothing follows.
    Failed(Failure),
}

/// Where a migrated sequence continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Moved {
    pub worker_id: String,
    pub grpc_addr: String,
    pub reservation_id: u64,
    /// Positions of KV it took there.
    pub kv_tokens: u32,
    /// Tokens generated before the move.
    pub generated: u32,
}

/// Why the loop gave up on a sequence or a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The worker stops.
    Stopping,
    /// The KV cache was full and the sequence was the youngest: it gave its blocks back.
    Preempted,
    /// Its reservation was released or lapsed.
    Gone(u64),
    /// The engine refused it.
    Engine { class: ErrorClass, message: String },
}

impl From<&EngineError> for Failure {
    fn from(e: &EngineError) -> Self {
        Failure::Engine {
            class: e.class(),
            message: e.to_string(),
        }
    }
}

impl From<Failure> for Status {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Stopping => Status::unavailable("decode worker stopping"),
            Failure::Preempted => Status::resource_exhausted("KV cache full: sequence preempted"),
            Failure::Gone(id) => {
                Status::not_found(format!("reservation {id} was released or expired"))
            }
            Failure::Engine { class, message } => tandem_wire::class_status(class, message),
        }
    }
}

/// The Decode message of a run of token events (at least one), or of a move.
pub fn chunk(tokens: Vec<u32>, generated: u32, finish: Option<FinishReason>) -> v1::DecodeChunk {
    v1::DecodeChunk {
        tokens,
        finish: tandem_wire::finish_to_proto(finish).into(),
        completion_tokens: generated,
        moved: None,
    }
}

impl From<Moved> for v1::DecodeChunk {
    fn from(m: Moved) -> Self {
        v1::DecodeChunk {
            completion_tokens: m.generated,
            moved: Some(v1::SequenceMoved {
                worker_id: m.worker_id,
                grpc_addr: m.grpc_addr,
                reservation_id: m.reservation_id,
                kv_tokens: m.kv_tokens,
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_become_the_statuses_the_gateway_acts_on() {
        let code = |f: Failure| Status::from(f).code();
        assert_eq!(code(Failure::Stopping), tonic::Code::Unavailable);
        assert_eq!(code(Failure::Preempted), tonic::Code::ResourceExhausted);
        assert_eq!(code(Failure::Gone(3)), tonic::Code::NotFound);
        let e = EngineError::OutOfBlocks {
            needed: 10,
            free: 2,
        };
        assert_eq!(
            Status::from(Failure::from(&e)).code(),
            tandem_wire::engine_status(&e).code()
        );
    }
}
