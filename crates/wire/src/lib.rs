//! Conversions between the engine's types and the `tandem.v1` wire types, in one place for every
//! worker and the gateway, so that a request means the same thing on each side of a call.
#![forbid(unsafe_code)]

pub mod steps;

pub use steps::StepLog;

use tandem_engine::sampling::{FinishReason, SamplingParams};
use tandem_engine::{EngineError, ErrorClass};
use tandem_proto::v1;
use tonic::Status;

/// The engine's sampling parameters for a request's wire form. A missing seed becomes 0: the
/// gateway always sets one for sampled requests, and greedy decoding ignores it.
pub fn sampling_from_proto(p: &v1::SamplingParams) -> SamplingParams {
    SamplingParams {
        temperature: p.temperature,
        top_k: p.top_k,
        // 0 means "not set" on the wire and "no nucleus cut" in the engine.
        top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
        seed: p.seed.unwrap_or(0),
        max_tokens: p.max_tokens,
        stop_token_ids: p.stop_token_ids.clone(),
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
    }
}

/// The wire form of the engine's sampling parameters.
pub fn sampling_to_proto(p: &SamplingParams) -> v1::SamplingParams {
    v1::SamplingParams {
        temperature: p.temperature,
        top_p: p.top_p,
        top_k: p.top_k,
        seed: Some(p.seed),
        max_tokens: p.max_tokens,
        stop_token_ids: p.stop_token_ids.clone(),
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
    }
}

/// The wire's finish reason (UNSPECIFIED for a sequence still running).
pub fn finish_to_proto(f: Option<FinishReason>) -> v1::FinishReason {
    match f {
        None => v1::FinishReason::Unspecified,
        Some(FinishReason::Stop) => v1::FinishReason::Stop,
        Some(FinishReason::Length) => v1::FinishReason::Length,
    }
}

/// The engine's finish reason from the wire (`None` for UNSPECIFIED and CANCELLED).
pub fn finish_from_proto(f: i32) -> Option<FinishReason> {
    match v1::FinishReason::try_from(f) {
        Ok(v1::FinishReason::Stop) => Some(FinishReason::Stop),
        Ok(v1::FinishReason::Length) => Some(FinishReason::Length),
        _ => None,
    }
}

/// The gRPC status for an engine error, by its class.
pub fn engine_status(e: &EngineError) -> Status {
    class_status(e.class(), e.to_string())
}

/// The status of an engine error of `class` with message `msg` (one carried as plain values).
pub fn class_status(class: ErrorClass, msg: String) -> Status {
    match class {
        ErrorClass::InvalidInput => Status::invalid_argument(msg),
        ErrorClass::Exhausted => Status::resource_exhausted(msg),
        ErrorClass::Model => Status::failed_precondition(msg),
        ErrorClass::Internal => Status::internal(msg),
    }
}

/// gRPC metadata a prefill worker sets on a failure of its KV transfer to the decode worker (not
/// of its own compute), so that the gateway moves the request to another decode worker rather
/// than to another prefill worker into the same unreachable one.
pub const KV_FAULT: &str = "tandem-kv-fault";

/// Marks `s` as a KV transfer's failure ([`KV_FAULT`]).
pub fn mark_kv_fault(mut s: Status) -> Status {
    s.metadata_mut()
        .insert(KV_FAULT, tonic::metadata::MetadataValue::from_static("1"));
    s
}

/// Whether `s` is a KV transfer's failure ([`KV_FAULT`]).
pub fn is_kv_fault(s: &Status) -> bool {
    s.metadata().contains_key(KV_FAULT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_survives_the_wire_and_unset_top_p_means_no_cut() {
        let mut p = SamplingParams::greedy(7);
        p.temperature = 0.7;
        p.top_k = 40;
        p.top_p = 0.9;
        p.seed = 42;
        p.stop_token_ids = vec![2, 3];
        p.stop = vec!["\n\n".into()];
        p.ignore_eos = true;
        assert_eq!(sampling_from_proto(&sampling_to_proto(&p)), p);
        let unset = v1::SamplingParams {
            max_tokens: 3,
            ..Default::default()
        };
        assert_eq!(sampling_from_proto(&unset), SamplingParams::greedy(3));
    }

    #[test]
    fn finish_reasons_round_trip_and_cancelled_is_not_a_finish() {
        for f in [None, Some(FinishReason::Stop), Some(FinishReason::Length)] {
            assert_eq!(finish_from_proto(finish_to_proto(f).into()), f);
        }
        assert_eq!(finish_from_proto(v1::FinishReason::Cancelled.into()), None);
    }

    #[test]
    fn engine_errors_map_to_the_status_their_class_names() {
        let e = EngineError::OutOfBlocks { needed: 3, free: 1 };
        assert_eq!(engine_status(&e).code(), tonic::Code::ResourceExhausted);
        let e = EngineError::InvalidRequest("empty".into());
        assert_eq!(engine_status(&e).code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn a_kv_fault_is_marked_on_the_status_and_read_back() {
        let s = Status::unavailable("KV transfer failed");
        assert!(!is_kv_fault(&s));
        let s = mark_kv_fault(s);
        assert!(is_kv_fault(&s));
        assert_eq!(s.code(), tonic::Code::Unavailable);
    }
}
