//! Conversions between the wire types of `tandem.v1` and the router's own types. Wire values are
//! validated here, so the registry only ever sees well-formed input.

use std::time::Duration;

use tandem_proto::v1;

use tandem_sim::admission::StepSample;
use tandem_sim::perf::PrefillItem;

use crate::error::RouterError;
use crate::types::{
    Feedback, Load, Placement, Priority, RequestShape, Role, WorkerSet, WorkerState,
};

/// Parses a wire role; `UNSPECIFIED` and unknown values are refused.
pub fn role_from_proto(role: i32) -> Result<Role, RouterError> {
    match v1::WorkerRole::try_from(role) {
        Ok(v1::WorkerRole::Prefill) => Ok(Role::Prefill),
        Ok(v1::WorkerRole::Decode) => Ok(Role::Decode),
        Ok(v1::WorkerRole::Aggregated) => Ok(Role::Aggregated),
        Ok(v1::WorkerRole::Unspecified) | Err(_) => Err(RouterError::InvalidArgument(format!(
            "worker role {role} is not a role"
        ))),
    }
}

impl From<Role> for v1::WorkerRole {
    fn from(role: Role) -> Self {
        match role {
            Role::Prefill => v1::WorkerRole::Prefill,
            Role::Decode => v1::WorkerRole::Decode,
            Role::Aggregated => v1::WorkerRole::Aggregated,
        }
    }
}

/// Parses a wire state; `UNSPECIFIED` and unknown values are refused.
pub fn state_from_proto(state: i32) -> Result<WorkerState, RouterError> {
    match v1::WorkerState::try_from(state) {
        Ok(v1::WorkerState::Starting) => Ok(WorkerState::Starting),
        Ok(v1::WorkerState::Ready) => Ok(WorkerState::Ready),
        Ok(v1::WorkerState::Draining) => Ok(WorkerState::Draining),
        Ok(v1::WorkerState::Unspecified) | Err(_) => Err(RouterError::InvalidArgument(format!(
            "worker state {state} is not a state"
        ))),
    }
}

impl From<WorkerState> for v1::WorkerState {
    fn from(state: WorkerState) -> Self {
        match state {
            WorkerState::Starting => v1::WorkerState::Starting,
            WorkerState::Ready => v1::WorkerState::Ready,
            WorkerState::Draining => v1::WorkerState::Draining,
        }
    }
}

impl TryFrom<&v1::LoadReport> for Load {
    type Error = RouterError;

    fn try_from(r: &v1::LoadReport) -> Result<Self, RouterError> {
        let speed = |name: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(RouterError::InvalidArgument(format!(
                    "{name} must be finite and >= 0"
                )))
            }
        };
        if r.free_kv_blocks > r.total_kv_blocks {
            return Err(RouterError::InvalidArgument(
                "free_kv_blocks exceeds total_kv_blocks".into(),
            ));
        }
        Ok(Load {
            state: state_from_proto(r.state)?,
            queued_prefill_tokens: r.queued_prefill_tokens,
            running_seqs: r.running_seqs,
            waiting_seqs: r.waiting_seqs,
            free_kv_blocks: r.free_kv_blocks,
            total_kv_blocks: r.total_kv_blocks,
            prefill_tokens_per_s: speed("prefill_tokens_per_s", r.prefill_tokens_per_s)?,
            decode_tokens_per_s: speed("decode_tokens_per_s", r.decode_tokens_per_s)?,
            reservations: r.reservations,
            decode_context_tokens: r.decode_context_tokens,
            reserved_seqs: r.reserved_seqs,
            reserved_prompt_tokens: r.reserved_prompt_tokens,
            tightest_itl_budget_ms: r.tightest_itl_budget_ms,
        })
    }
}

/// The step samples of a load report, for admission's step-time fit. Malformed samples (chunk
/// lists of different lengths) are refused with the report.
pub fn steps_from_proto(r: &v1::LoadReport) -> Result<Vec<StepSample>, RouterError> {
    r.steps
        .iter()
        .take(MAX_STEPS_PER_REPORT)
        .map(|s| {
            if s.chunk_tokens.len() != s.chunk_cached_tokens.len() {
                return Err(RouterError::InvalidArgument(
                    "a step sample's chunk lists differ in length".into(),
                ));
            }
            let chunks: Vec<PrefillItem> = s
                .chunk_tokens
                .iter()
                .zip(&s.chunk_cached_tokens)
                .map(|(&new_tokens, &cached_tokens)| PrefillItem {
                    new_tokens,
                    cached_tokens,
                })
                .collect();
            Ok(StepSample::new(
                &chunks,
                s.decode_batch,
                s.decode_context_tokens,
                f64::from(s.duration_us) * 1e-6,
            ))
        })
        .collect()
}

/// Samples read from one report at most; a worker sends 32.
const MAX_STEPS_PER_REPORT: usize = 64;

impl From<&Load> for v1::LoadReport {
    fn from(l: &Load) -> Self {
        v1::LoadReport {
            state: v1::WorkerState::from(l.state).into(),
            queued_prefill_tokens: l.queued_prefill_tokens,
            running_seqs: l.running_seqs,
            waiting_seqs: l.waiting_seqs,
            free_kv_blocks: l.free_kv_blocks,
            total_kv_blocks: l.total_kv_blocks,
            prefill_tokens_per_s: l.prefill_tokens_per_s,
            decode_tokens_per_s: l.decode_tokens_per_s,
            reservations: l.reservations,
            decode_context_tokens: l.decode_context_tokens,
            reserved_seqs: l.reserved_seqs,
            reserved_prompt_tokens: l.reserved_prompt_tokens,
            tightest_itl_budget_ms: l.tightest_itl_budget_ms,
            steps: Vec::new(),
        }
    }
}

impl TryFrom<v1::PlaceRequest> for RequestShape {
    type Error = RouterError;

    fn try_from(r: v1::PlaceRequest) -> Result<Self, RouterError> {
        if r.prompt_tokens == 0 || r.max_new_tokens == 0 {
            return Err(RouterError::InvalidArgument(
                "prompt_tokens and max_new_tokens must be at least 1".into(),
            ));
        }
        let budget = |ms: u32| (ms > 0).then(|| Duration::from_millis(u64::from(ms)));
        Ok(RequestShape {
            model: r.model,
            prompt_tokens: r.prompt_tokens,
            max_new_tokens: r.max_new_tokens,
            prefix_block_hashes: r.prefix_block_hashes,
            ttft_budget: budget(r.ttft_budget_ms),
            itl_budget: budget(r.itl_budget_ms),
            priority: priority_from_proto(r.priority),
            exclude: r.exclude_workers,
        })
    }
}

impl From<&Placement> for v1::Placement {
    fn from(p: &Placement) -> Self {
        v1::Placement {
            prefill: Some((*p.prefill).clone()),
            decode: Some((*p.decode).clone()),
            predicted_ttft_ms: p.predicted.map(|x| millis(x.ttft)),
            predicted_itl_us: p.predicted.map(|x| micros(x.itl)),
            raw_ttft_us: p.predicted.map_or(0, |x| micros(x.raw_ttft)),
            raw_itl_us: p.predicted.map_or(0, |x| micros(x.raw_itl)),
            load_regime: p.predicted.map_or(0, |x| u32::from(x.regime)),
            ticket: p.predicted.map_or(0, |x| x.ticket),
        }
    }
}

impl From<&WorkerSet> for v1::WorkerSet {
    fn from(set: &WorkerSet) -> Self {
        v1::WorkerSet {
            version: set.version,
            workers: set
                .workers
                .iter()
                .map(|w| v1::WorkerEntry {
                    identity: Some((*w.identity).clone()),
                    load: Some(v1::LoadReport::from(&w.load)),
                    lease_left_ms: millis(w.lease_left),
                })
                .collect(),
        }
    }
}

/// Milliseconds, saturating at `u32::MAX` (about 49 days).
pub(crate) fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// Microseconds, saturating at `u32::MAX` (about 71 minutes).
pub(crate) fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// The wire's priority: 1 and above critical, 0 standard, below 0 sheddable.
pub fn priority_from_proto(p: i32) -> Priority {
    match p {
        1.. => Priority::Critical,
        0 => Priority::Standard,
        _ => Priority::Sheddable,
    }
}

/// The wire form of a priority.
pub fn priority_to_proto(p: Priority) -> i32 {
    match p {
        Priority::Critical => 1,
        Priority::Standard => 0,
        Priority::Sheddable => -1,
    }
}

impl From<&v1::FeedbackRequest> for Feedback {
    fn from(r: &v1::FeedbackRequest) -> Self {
        let us = |v: u32| Duration::from_micros(u64::from(v));
        let some = |v: u32| (v > 0).then(|| us(v));
        Feedback {
            model: r.model.clone(),
            prompt_tokens: r.prompt_tokens,
            raw_ttft: us(r.raw_ttft_us),
            raw_itl: us(r.raw_itl_us),
            ttft: us(r.measured_ttft_us),
            itl: some(r.measured_itl_us),
            exposed_transfer: some(r.exposed_transfer_us),
            regime: u8::try_from(r.load_regime).unwrap_or(u8::MAX),
            ticket: r.ticket,
        }
    }
}

impl From<&Feedback> for v1::FeedbackRequest {
    fn from(f: &Feedback) -> Self {
        v1::FeedbackRequest {
            model: f.model.clone(),
            prompt_tokens: f.prompt_tokens,
            raw_ttft_us: micros(f.raw_ttft),
            raw_itl_us: micros(f.raw_itl),
            measured_ttft_us: micros(f.ttft),
            measured_itl_us: f.itl.map_or(0, micros),
            exposed_transfer_us: f.exposed_transfer.map_or(0, micros),
            load_regime: u32::from(f.regime),
            ticket: f.ticket,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_round_trips_and_bad_reports_are_refused() {
        let load = Load {
            state: WorkerState::Draining,
            queued_prefill_tokens: 7,
            running_seqs: 2,
            waiting_seqs: 1,
            free_kv_blocks: 3,
            total_kv_blocks: 9,
            prefill_tokens_per_s: 1.5,
            decode_tokens_per_s: 2.5,
            reservations: 4,
            decode_context_tokens: 300,
            reserved_seqs: 1,
            reserved_prompt_tokens: 40,
            tightest_itl_budget_ms: 100,
        };
        let wire = v1::LoadReport::from(&load);
        assert_eq!(Load::try_from(&wire).ok(), Some(load));
        let no_state = v1::LoadReport {
            state: 0,
            ..wire.clone()
        };
        assert!(Load::try_from(&no_state).is_err());
        let nan = v1::LoadReport {
            prefill_tokens_per_s: f32::NAN,
            ..wire.clone()
        };
        assert!(Load::try_from(&nan).is_err());
        let overfull = v1::LoadReport {
            free_kv_blocks: 10,
            ..wire
        };
        assert!(Load::try_from(&overfull).is_err());
    }

    #[test]
    fn step_samples_and_priorities() {
        let report = v1::LoadReport {
            steps: vec![v1::StepSample {
                chunk_tokens: vec![100, 28],
                chunk_cached_tokens: vec![0, 64],
                decode_batch: 3,
                decode_context_tokens: 900,
                duration_us: 2500,
            }],
            ..v1::LoadReport::default()
        };
        let steps = steps_from_proto(&report).unwrap();
        assert_eq!(steps.len(), 1);
        let s = steps[0];
        assert_eq!(s.chunks().len(), 2);
        assert_eq!(
            (s.chunks()[1].new_tokens, s.chunks()[1].cached_tokens),
            (28, 64)
        );
        assert_eq!((s.decode_batch, s.decode_context), (3, 900));
        assert!((s.seconds - 0.0025).abs() < 1e-12);
        let mut bad = report.clone();
        bad.steps[0].chunk_cached_tokens.pop();
        assert!(steps_from_proto(&bad).is_err());
        assert_eq!(priority_from_proto(5), Priority::Critical);
        assert_eq!(priority_from_proto(0), Priority::Standard);
        assert_eq!(priority_from_proto(-3), Priority::Sheddable);
        for p in Priority::ALL {
            assert_eq!(priority_from_proto(priority_to_proto(p)), p);
        }
    }

    #[test]
    fn roles_and_shapes() {
        assert_eq!(
            role_from_proto(v1::WorkerRole::Decode.into()).ok(),
            Some(Role::Decode)
        );
        assert!(role_from_proto(0).is_err());
        assert!(role_from_proto(99).is_err());
        let req = v1::PlaceRequest {
            prompt_tokens: 5,
            max_new_tokens: 3,
            ttft_budget_ms: 250,
            ..v1::PlaceRequest::default()
        };
        let shape = RequestShape::try_from(req.clone()).ok();
        assert_eq!(
            shape.as_ref().map(|s| s.ttft_budget),
            Some(Some(Duration::from_millis(250)))
        );
        assert_eq!(shape.map(|s| s.itl_budget), Some(None));
        let empty = v1::PlaceRequest {
            prompt_tokens: 0,
            ..req
        };
        assert!(RequestShape::try_from(empty).is_err());
    }
}
