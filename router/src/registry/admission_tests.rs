//! Admission inside the registry: predictions on loads whose answer is computed by hand, the
//! charge that makes concurrent decisions see each other, and the refusals.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_proto::v1::WorkerRole;

use super::tests::ident;
use tandem_sim::admission::{Coefficients, RejectReason, StepSample};
use tandem_sim::linear::LinearModel;
use tandem_sim::perf::PrefillItem;

use super::*;
use crate::policy::LeastLoaded;
use crate::types::{Priority, RequestShape};

const MS: Duration = Duration::from_millis(1);

/// Prefill steps cost 1 ms plus 1 ms per 10 prompt tokens; decode steps 2 ms plus 1 ms per
/// sequence (context is free); a mixed step the sum.
pub(crate) const HAND: LinearModel = LinearModel {
    prefill_step: 1e-3,
    per_prompt_token: 1e-4,
    decode_step: 2e-3,
    per_sequence: 1e-3,
    per_context_token: 0.0,
    kv_blocks: 1 << 20,
};

fn ready(queued: u64, free: u64) -> Load {
    super::tests::ready(queued, free, 0)
}

fn with_base() -> Registry {
    let config = RegistryConfig {
        admission: AdmissionConfig {
            base: Some(Arc::new(HAND)),
            ..AdmissionConfig::default()
        },
        ..RegistryConfig::default()
    };
    Registry::new(config, Box::new(LeastLoaded))
}

fn cluster(t0: Instant, prefill: &[u64], decode: &[u64]) -> Registry {
    let mut r = with_base();
    for (i, &q) in prefill.iter().enumerate() {
        r.register(
            ident(&format!("p{i}"), WorkerRole::Prefill),
            ready(q, 0),
            t0,
        )
        .unwrap();
    }
    for (i, &f) in decode.iter().enumerate() {
        r.register(ident(&format!("d{i}"), WorkerRole::Decode), ready(0, f), t0)
            .unwrap();
    }
    r
}

fn budgeted(prompt: u32, ttft_ms: u64) -> RequestShape {
    RequestShape {
        prompt_tokens: prompt,
        max_new_tokens: 16,
        ttft_budget: Some(Duration::from_millis(ttft_ms)),
        ..RequestShape::default()
    }
}

fn close(a: Duration, b: Duration) -> bool {
    a.abs_diff(b) <= Duration::from_micros(1)
}

#[test]
fn the_prediction_is_the_queue_ahead_and_the_prompt_in_steps() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[1000], &[100]);
    let p = r.place(&budgeted(200, 2000), t0).unwrap();
    let predicted = p.predicted.unwrap();
    // 1,200 tokens: two steps of 512 (52.2 ms each) and one of 176 (18.6 ms); no measurements yet,
    // so the median factor is 1. ITL: one sequence, 3 ms.
    assert!(close(predicted.ttft, 123 * MS), "{predicted:?}");
    assert!(close(predicted.raw_ttft, 123 * MS));
    assert!(close(predicted.itl, 3 * MS), "{predicted:?}");
}

#[test]
fn a_queue_reported_earlier_is_taken_to_have_drained() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[1000], &[100]);
    // 52.2 ms later a full step (512 tokens) is done: 488 are left.
    let p = r
        .place(&budgeted(200, 2000), t0 + Duration::from_micros(52_200))
        .unwrap();
    // 688 tokens: a step of 512 (52.2 ms), then 176 (18.6 ms).
    assert!(
        close(p.predicted_ttft().unwrap(), Duration::from_micros(70_800)),
        "{p:?}"
    );
}

#[test]
fn two_decisions_that_fit_alone_do_not_both_fit() {
    let t0 = Instant::now();
    // One prefill worker with 4,000 tokens queued: a 500-token prompt then finishes after nine
    // steps (459.8 ms); with the default margin (1.25) that is 575 ms, inside a 600 ms budget.
    let mut r = cluster(t0, &[4000], &[1000]);
    let first = r.place(&budgeted(500, 600), t0);
    assert!(first.is_ok(), "{first:?}");
    // The second sees the first's 500 tokens ahead of it: ten steps, over the budget.
    match r.place(&budgeted(500, 600), t0) {
        Err(RouterError::Rejected {
            reason: RejectReason::TtftBudgetUnreachable,
            retry_after,
            predicted_ttft,
            ..
        }) => {
            assert!(retry_after.unwrap() > Duration::ZERO);
            assert!(predicted_ttft.unwrap() > 500 * MS);
        }
        other => panic!("expected a TTFT refusal, got {other:?}"),
    }
}

#[test]
fn a_budget_below_the_idle_prediction_is_refused_without_retry_after() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[0], &[100]);
    // 400 tokens alone take 41 ms (51.25 ms bounded): a 30 ms budget can never be met.
    match r.place(&budgeted(400, 30), t0) {
        Err(RouterError::Rejected {
            reason: RejectReason::TtftBudgetUnreachable,
            retry_after: None,
            detail,
            ..
        }) => assert!(detail.contains("idle"), "{detail}"),
        other => panic!("{other:?}"),
    }
    let itl = RequestShape {
        itl_budget: Some(2 * MS),
        ..budgeted(400, 2000)
    };
    assert!(matches!(
        r.place(&itl, t0),
        Err(RouterError::Rejected {
            reason: RejectReason::ItlBudgetUnreachable,
            retry_after: None,
            ..
        })
    ));
}

#[test]
fn running_sequences_keep_their_itl_budget() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[0], &[100, 100]);
    // d0 runs 5 sequences, one with a 9 ms budget: a sixth makes its step 8 ms, a seventh 9 ms
    // (within 9 ms x 1.25 only up to a 7.2 ms step). d1 runs 20 with no budget.
    let tight = Load {
        running_seqs: 5,
        tightest_itl_budget_ms: 9,
        ..ready(0, 100)
    };
    let busy = Load {
        running_seqs: 20,
        ..ready(0, 90)
    };
    r.heartbeat("d0", tight, t0).unwrap();
    r.heartbeat("d1", busy, t0).unwrap();
    // The policy prefers d0 (more free blocks), whose step would break the budget; d1 takes it.
    let p = r.place(&budgeted(32, 2000), t0).unwrap();
    assert_eq!(p.decode.worker_id, "d1");
    // With a budget of its own that d1's 23 ms step breaks, it must wait for room.
    let strict = RequestShape {
        itl_budget: Some(20 * MS),
        ..budgeted(32, 2000)
    };
    match r.decide(&strict, t0).unwrap() {
        Decision::Wait { until, reason, .. } => {
            assert_eq!(reason, RejectReason::ItlBudgetUnreachable);
            assert!(until > t0 && until < t0 + 2000 * MS);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn sheddable_work_is_refused_first() {
    let t0 = Instant::now();
    // 1,500 tokens ahead: a 100-token prompt is predicted at 166.2 ms (207.75 ms bounded).
    let mut r = cluster(t0, &[1500], &[100]);
    let shape = |priority| RequestShape {
        priority,
        ..budgeted(100, 250)
    };
    assert!(matches!(
        r.place(&shape(Priority::Sheddable), t0),
        Err(RouterError::Rejected { .. })
    ));
    assert!(r.place(&shape(Priority::Standard), t0).is_ok());
}

#[test]
fn the_path_with_the_lower_predicted_ttft_is_taken() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[2000], &[100]);
    r.register(ident("a0", WorkerRole::Aggregated), ready(0, 100), t0)
        .unwrap();
    let p = r.place(&budgeted(100, 2000), t0).unwrap();
    assert_eq!(
        (p.prefill.worker_id.as_str(), p.decode.worker_id.as_str()),
        ("a0", "a0")
    );
    // a0 now has 100 tokens queued; with 2,000 on p0 it still wins.
    r.heartbeat("a0", ready(3000, 100), t0).unwrap();
    let p = r.place(&budgeted(100, 2000), t0).unwrap();
    assert_eq!(p.prefill.worker_id, "p0");
}

#[test]
fn without_a_base_the_model_is_learned_from_reported_steps() {
    let t0 = Instant::now();
    let mut r = Registry::new(RegistryConfig::default(), Box::new(LeastLoaded));
    r.register(ident("p0", WorkerRole::Prefill), ready(0, 0), t0)
        .unwrap();
    r.register(ident("d0", WorkerRole::Decode), ready(0, 100), t0)
        .unwrap();
    let p = r.place(&budgeted(100, 2000), t0).unwrap();
    assert_eq!(p.predicted, None, "nothing measured: admitted unpredicted");
    let prefill: Vec<StepSample> = [64u32, 128, 256, 384, 512, 100, 200, 300]
        .iter()
        .map(|&n| StepSample::new(&[PrefillItem::fresh(n)], 0, 0, 1e-3 + 1e-4 * f64::from(n)))
        .collect();
    let decode: Vec<StepSample> = (1..=8u32)
        .map(|b| StepSample::new(&[], b, u64::from(b) * 100, 2e-3 + 1e-3 * f64::from(b)))
        .collect();
    r.observe_steps("p0", &prefill, t0);
    r.observe_steps("d0", &decode, t0);
    let view = r.admission();
    assert!(
        matches!(view[0].roles[0].coefficients, Coefficients::Linear { .. }),
        "{view:?}"
    );
    let p = r.place(&budgeted(100, 2000), t0).unwrap();
    // p0 still counts the first request's 100 tokens: 200 tokens in one step, 21 ms.
    let ttft = p.predicted_ttft().unwrap();
    assert!(
        ttft.abs_diff(21 * MS) < Duration::from_micros(50),
        "{ttft:?}"
    );
}

#[test]
fn feedback_calibrates_what_clients_are_told() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[0], &[100]);
    for _ in 0..32 {
        let fb = Feedback {
            model: "m".into(),
            prompt_tokens: 100,
            raw_ttft: 10 * MS,
            raw_itl: 3 * MS,
            ttft: 12 * MS,
            itl: Some(3 * MS),
            exposed_transfer: None,
            regime: 0,
            ticket: 0,
        };
        r.feedback(&fb).unwrap();
    }
    let p = r
        .place(&budgeted(100, 2000), t0)
        .unwrap()
        .predicted
        .unwrap();
    // 11 ms predicted, measured 1.2x what was predicted.
    assert!(close(p.raw_ttft, 11 * MS));
    assert!(close(p.ttft, Duration::from_micros(13_200)), "{p:?}");
    assert!(
        r.feedback(&Feedback::default()).is_err(),
        "no prediction to compare with"
    );
}

#[test]
fn a_burst_s_delays_do_not_refuse_the_idle_cluster() {
    let t0 = Instant::now();
    let mut r = cluster(t0, &[0, 0], &[100, 100]);
    let fb = |raw_ms: u32, ttft_ms: u32, regime: u8| Feedback {
        model: "m".into(),
        prompt_tokens: 100,
        raw_ttft: raw_ms * MS,
        raw_itl: 3 * MS,
        ttft: ttft_ms * MS,
        itl: Some(3 * MS),
        exposed_transfer: None,
        regime,
        ticket: 0,
    };
    // Busy (two to four requests waiting per prefill worker): every request took 40 ms longer
    // than predicted.
    // Idle: as predicted.
    for i in 0..16 {
        r.feedback(&fb(10 + i, 50 + i, 4)).unwrap();
        r.feedback(&fb(10 + i, 10 + i, 0)).unwrap();
    }
    // A 11 ms prediction on the idle cluster is bounded at 11 ms, within a 20 ms budget.
    let p = r.place(&budgeted(100, 20), t0).unwrap().predicted.unwrap();
    assert_eq!(p.regime, 0);
    assert!(close(p.ttft, 11 * MS), "{p:?}");
    // Seven more placements make it busy: the next one is bounded by the busy regime's 40 ms
    // delay, which no wait can make up within 20 ms.
    let mut tickets = vec![p.ticket];
    for _ in 0..7 {
        let p = r
            .place(&budgeted(100, 2000), t0)
            .unwrap()
            .predicted
            .unwrap();
        tickets.push(p.ticket);
    }
    match r.place(&budgeted(100, 20), t0) {
        Err(RouterError::Rejected { reason, .. }) => {
            assert_eq!(reason, RejectReason::TtftBudgetUnreachable)
        }
        other => panic!("{other:?}"),
    }
    // Their first tokens reported, they decode and no longer count: the regime is idle again
    // (the queues they were charged to stay until the workers' reports show them gone).
    tickets.push(
        r.place(&budgeted(100, 2000), t0)
            .unwrap()
            .predicted
            .unwrap()
            .ticket,
    );
    for &ticket in &tickets {
        r.feedback(&Feedback {
            ticket,
            ..fb(11, 11, 4)
        })
        .unwrap();
    }
    let view = &r.admission()[0];
    assert_eq!((view.in_flight, view.awaiting_first_token), (9, 0));
    let p = r
        .place(&budgeted(100, 2000), t0)
        .unwrap()
        .predicted
        .unwrap();
    assert_eq!(p.regime, 0);
    // Their ends reported (TTFT 0), they leave the count of those in flight.
    for ticket in tickets {
        let end = Feedback {
            ttft: Duration::ZERO,
            ticket,
            ..fb(11, 11, 4)
        };
        r.feedback(&end).unwrap();
    }
    let view = &r.admission()[0];
    assert_eq!((view.in_flight, view.awaiting_first_token), (1, 1));
}
