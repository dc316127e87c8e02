use std::sync::Arc;

use super::*;
use crate::admission::calibrate::MIN_RATIOS;
use crate::linear::LinearModel;

/// Prefill steps cost 1 ms plus 0.1 ms a prompt token; decode steps 2 ms, plus 1 ms a sequence
/// and 1 us a token of context; a mixed step the sum of both.
pub(crate) const HAND: LinearModel = LinearModel {
    prefill_step: 1e-3,
    per_prompt_token: 1e-4,
    decode_step: 2e-3,
    per_sequence: 1e-3,
    per_context_token: 1e-6,
    kv_blocks: 1000,
};

pub(crate) fn hand() -> Predictor {
    let m = || StepModel::new(Some(Arc::new(HAND)));
    Predictor::new(m(), m(), m(), PredictorConfig::default())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn disaggregated_ttft_is_the_queue_ahead_then_the_prompt_in_step_sized_chunks() {
    let pr = hand();
    let p = PrefillLoad {
        queued_tokens: 1000,
        step_tokens: 512,
        ..PrefillLoad::default()
    };
    let d = DecodeLoad {
        batch: 3,
        context: 900,
        ..DecodeLoad::default()
    };
    let c = Candidate::Disaggregated {
        prefill: &p,
        decode: &d,
    };
    let got = pr.predict(&c, 200, 0).unwrap();
    // 1,200 tokens: two full steps of 512 (52.2 ms each), then 176 tokens (18.6 ms).
    assert!(close(got.ttft_raw, 0.123), "{got:?}");
    assert!(
        close(got.ttft, 0.123),
        "no measurements: the median factor is 1"
    );
    assert!(close(got.ttft_bound, 0.123 * 1.25), "the default margin");
    // Idle: the prompt alone, one step of 200 tokens.
    assert!(close(got.ttft_idle_bound, 0.021 * 1.25));
    // Four sequences attending to 900 + 201 tokens: 2 + 4 + 1.101 ms.
    assert!(close(got.itl_raw, 0.007101), "{got:?}");
    assert!(close(got.itl_idle_bound, (0.003 + 0.000201) * 1.25));
}

#[test]
fn aggregated_steps_carry_the_decode_batch_and_prompt_chunks() {
    let pr = hand();
    let p = PrefillLoad {
        queued_tokens: 0,
        step_tokens: 512,
        decode_batch: 12,
        decode_context: 1000,
    };
    let d = DecodeLoad {
        batch: 12,
        context: 1000,
        prefill_tokens_per_step: 500,
        tightest_itl: None,
    };
    let got = pr
        .predict(
            &Candidate::Aggregated {
                prefill: &p,
                decode: &d,
            },
            100,
            0,
        )
        .unwrap();
    // One step: 100 prompt tokens (11 ms) beside 12 sequences over 1,000 tokens (15 ms).
    assert!(close(got.ttft_raw, 0.011 + 0.015), "{got:?}");
    // A decode step with 500 prompt tokens beside 13 sequences over 1,101 tokens.
    assert!(close(got.itl_raw, 0.051 + 0.016101), "{got:?}");
}

#[test]
fn measured_ratios_move_the_point_and_the_bound() {
    let mut pr = hand();
    for i in 0..MIN_RATIOS {
        pr.observe(&Feedback {
            prompt_tokens: 100,
            predicted_ttft_raw: 0.016,
            // Measured 1.1x to 1.4x the prediction.
            measured_ttft: 0.016 * (1.1 + 0.02 * (i % 16) as f64),
            predicted_itl_raw: 0.01,
            measured_itl: Some(0.01),
            exposed_transfer: Some(0.005),
            regime: 2,
        });
        // The idle cluster measured as predicted.
        pr.observe(&Feedback {
            prompt_tokens: 100,
            predicted_ttft_raw: 0.1,
            measured_ttft: 0.1,
            predicted_itl_raw: 0.01,
            measured_itl: Some(0.01),
            exposed_transfer: Some(0.005),
            regime: 0,
        });
    }
    let p = PrefillLoad {
        step_tokens: 512,
        ..PrefillLoad::default()
    };
    let d = DecodeLoad::default();
    let c = Candidate::Disaggregated {
        prefill: &p,
        decode: &d,
    };
    let got = pr.predict(&c, 100, 2).unwrap();
    // 11 ms of compute plus 5 ms of exposed transfer (50 us a token).
    assert!(close(got.ttft_raw, 0.016), "{got:?}");
    assert!(close(got.ttft, pr.ttft.median(2, 0.016)));
    assert!(got.ttft > 0.016 * 1.1 && got.ttft_bound > got.ttft && got.ttft_bound <= 0.016 * 1.41);
    assert!(close(got.itl, got.itl_raw), "ITL measured as predicted");
    assert_eq!(got.regime, 2);
    // Idle requests were measured as predicted: their regime's factors are 1.
    let idle = pr.predict(&c, 100, 0).unwrap();
    assert!(
        close(idle.ttft, 0.016) && close(idle.ttft_bound, 0.016),
        "{idle:?}"
    );
}

#[test]
fn an_unfitted_decode_model_leaves_itl_unchecked() {
    let pr = Predictor::new(
        StepModel::new(Some(Arc::new(HAND))),
        StepModel::new(None),
        StepModel::new(None),
        PredictorConfig::default(),
    );
    let p = PrefillLoad {
        step_tokens: 512,
        ..PrefillLoad::default()
    };
    let d = DecodeLoad::default();
    let c = Candidate::Disaggregated {
        prefill: &p,
        decode: &d,
    };
    let got = pr.predict(&c, 100, 0).unwrap();
    assert!(close(got.ttft_raw, 0.011));
    assert_eq!(
        (got.itl_raw, got.itl_bound, got.itl_idle_bound),
        (0.0, 0.0, 0.0)
    );
}

#[test]
fn an_unfitted_model_predicts_nothing() {
    let pr = Predictor::new(
        StepModel::new(None),
        StepModel::new(None),
        StepModel::new(None),
        PredictorConfig::default(),
    );
    let (p, d) = (PrefillLoad::default(), DecodeLoad::default());
    let c = Candidate::Disaggregated {
        prefill: &p,
        decode: &d,
    };
    assert_eq!(pr.predict(&c, 10, 0), None);
}

#[test]
fn a_queue_reported_a_while_ago_has_drained_at_full_steps() {
    let pr = hand();
    let p = PrefillLoad {
        queued_tokens: 5000,
        step_tokens: 512,
        ..PrefillLoad::default()
    };
    // A full step of 512 tokens takes 52.2 ms; in 522 ms ten of them run.
    assert_eq!(pr.drained(&pr.prefill, &p, 0.522), 5120);
    assert_eq!(pr.drained(&pr.prefill, &p, 0.0), 0);
}

#[test]
fn queue_chunks_cover_the_tokens_exactly() {
    for tokens in [1u32, 7, 100, 511, 512, 4096] {
        for mean in [1.0, 50.0, 200.0, 1000.0, 10_000.0] {
            let mut out = [PrefillItem::fresh(0); MAX_CHUNKS];
            let n = queue_chunks(&mut out, tokens, mean);
            let sum: u32 = out[..n].iter().map(|c| c.new_tokens).sum();
            assert_eq!(sum, tokens, "tokens {tokens} mean {mean}");
            assert!((1..=MAX_CHUNKS).contains(&n));
        }
    }
}
