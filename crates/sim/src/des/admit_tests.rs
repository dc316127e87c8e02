use std::sync::Arc;

use super::*;
use crate::admission::{Priority, RejectReason};
use crate::des::{AdmissionConfig, PairChoice, Phase};
use crate::des::{InstanceSpec, SimConfig, run, simulate};
use crate::linear::LinearModel;
use crate::perf::Link;
use crate::stats::Slo;
use crate::workload::{Arrivals, Lengths, Workload};

fn inst(blocks: u64) -> InstanceSpec {
    InstanceSpec {
        // Prefill costs 1 ms per prompt token; a step with decoding sequences 8 ms plus 2 ms each.
        model: Arc::new(LinearModel {
            per_prompt_token: 1e-3,
            decode_step: 0.008,
            per_sequence: 0.002,
            kv_blocks: blocks,
            ..LinearModel::default()
        }),
        max_running: 1 << 20,
        max_batch_tokens: 100,
    }
}

/// `prefill` prefill instances and one decode instance of `blocks` KV blocks.
fn cluster(prefill: usize, blocks: u64) -> Cluster {
    Cluster::Disaggregated {
        prefill: (0..prefill).map(|_| inst(1000)).collect(),
        decode: vec![inst(blocks)],
        link: Link {
            bytes_per_s: 1e12,
            latency_s: 0.0,
        },
    }
}

fn budget(ttft: Option<f64>, itl: Option<f64>, priority: Priority) -> Budget {
    Budget {
        ttft,
        itl,
        priority,
    }
}

fn cfg(c: Cluster, arrivals: Arrivals, output: u32, n: usize, adm: Option<Budget>) -> SimConfig {
    SimConfig {
        cluster: c,
        workload: Workload {
            arrivals,
            input: Lengths::Fixed(100),
            output: Lengths::Fixed(output),
        },
        requests: n,
        seed: 3,
        warmup: 0.0,
        phase: Phase::Full,
        slo: Slo {
            ttft_s: 0.3,
            tpot_s: 1.0,
        },
        admission: adm.map(AdmissionConfig::new),
    }
}

fn close(a: f64, b: f64) {
    assert!((a - b).abs() < 1e-9, "{a} != {b}");
}

/// Request `i`'s admission status after the run.
fn statuses(c: &SimConfig) -> Vec<Status> {
    let sim = run(c).unwrap();
    let a = sim.adm.as_deref().unwrap();
    a.tickets.iter().map(|t| t.status).collect()
}

#[test]
fn at_low_load_admission_changes_nothing() {
    let b = budget(Some(0.5), Some(0.05), Priority::Standard);
    let arrivals = Arrivals::Poisson { rate: 2.0 };
    let off = simulate(&cfg(cluster(2, 1000), arrivals.clone(), 11, 400, None)).unwrap();
    let mut c = cfg(cluster(2, 1000), arrivals, 11, 400, Some(b));
    let on = simulate(&c).unwrap();
    assert_eq!((on.requests, on.rejected), (400, 0), "{:?}", on.rejections);
    assert!(on.rejections.is_empty());
    assert_eq!(
        (on.ttft, on.tpot, on.itl, on.e2e),
        (off.ttft, off.tpot, off.itl, off.e2e)
    );
    assert_eq!((on.attainment, on.span_s), (off.attainment, off.span_s));
    assert_eq!(off.ttft_over_predicted, None);
    // Alone on its instance, a prompt takes the one step predicted for it (the exposed KV
    // transfer is nil on this link).
    let ratio = on.ttft_over_predicted.unwrap();
    assert!(ratio.p50 <= 1.0 + 1e-9 && ratio.p50 > 0.99, "{ratio:?}");
    // Best fit rejects nothing either, but stacks prompts where the budget allows, so that its
    // latencies are its own.
    if let Some(a) = c.admission.as_mut() {
        a.choice = PairChoice::BestFit;
    }
    let packed = simulate(&c).unwrap();
    assert_eq!(packed.rejected, 0);
    assert!(
        packed.ttft.mean > on.ttft.mean && packed.ttft.max <= 0.5,
        "{:?}",
        packed.ttft
    );
}

#[test]
fn an_overloaded_cluster_sheds_and_what_it_admits_meets_its_budget() {
    // Two prefill instances serve 20 prompts/s; 40/s arrive.
    let b = budget(Some(0.3), None, Priority::Standard);
    let c = cfg(
        cluster(2, 1 << 20),
        Arrivals::Poisson { rate: 40.0 },
        3,
        4000,
        Some(b),
    );
    let r = simulate(&c).unwrap();
    assert!(
        r.rejected_share > 0.4 && r.rejected_share < 0.6,
        "{}",
        r.rejected_share
    );
    assert_eq!(r.rejections.len(), 1, "{:?}", r.rejections);
    assert_eq!(r.rejections["ttft_budget_unreachable"], r.rejected);
    let met = r.admitted_attainment.unwrap();
    assert!(met >= 0.99, "{met}");
    assert!((r.goodput_rps - 20.0).abs() < 2.0, "{}", r.goodput_rps);
    // Without admission almost nothing meets the budget.
    let off = simulate(&SimConfig {
        admission: None,
        ..c
    })
    .unwrap();
    assert!(off.attainment < 0.1, "{}", off.attainment);
}

#[test]
fn a_budget_below_an_idle_instance_rejects_everything_for_ttft() {
    let b = budget(Some(0.05), None, Priority::Critical);
    let r = simulate(&cfg(
        cluster(1, 1000),
        Arrivals::Constant { rate: 1.0 },
        11,
        20,
        Some(b),
    ))
    .unwrap();
    assert_eq!((r.requests, r.rejected, r.rejected_share), (20, 20, 1.0));
    assert_eq!(
        r.rejections.into_iter().collect::<Vec<_>>(),
        [("ttft_budget_unreachable".to_string(), 20)]
    );
    assert_eq!((r.attainment, r.admitted_attainment), (0.0, None));
    assert_eq!((r.throughput_rps, r.goodput_rps), (0.0, 0.0));
    assert_eq!(r.ttft_over_predicted, None);
    assert_eq!(r.ttft.max, 0.0);
}

#[test]
fn a_request_waits_for_kv_and_is_placed_when_it_frees() {
    // 111 tokens take 7 of the 10 blocks: one request at a time. The first prefills in 0.1 s and
    // decodes 10 tokens at 10 ms; the second, waiting, is placed at 0.2 and prefills by 0.3.
    let b = budget(Some(2.0), None, Priority::Standard);
    let c = cfg(
        cluster(1, 10),
        Arrivals::Trace(vec![0.0, 0.0]),
        11,
        2,
        Some(b),
    );
    let r = simulate(&c).unwrap();
    assert_eq!(r.rejected, 0);
    close(r.ttft.max, 0.3);
    let s = statuses(&c);
    assert!(
        matches!(s[1], Status::Placed { at, .. } if (at - 0.2).abs() < 1e-9),
        "{s:?}"
    );
}

#[test]
fn a_waiting_request_is_refused_at_its_deadline() {
    // 151 tokens take all 10 blocks and the first holds them until 0.6 s. The second, queued
    // behind a 100-token prompt, is predicted 0.2 s (the simulated router starts calibrated):
    // with 0.35 s of budget it may wait 0.15 s for KV, and is refused then.
    let b = budget(Some(0.35), None, Priority::Standard);
    let c = cfg(
        cluster(1, 10),
        Arrivals::Trace(vec![0.0, 0.0]),
        51,
        2,
        Some(b),
    );
    let s = statuses(&c);
    assert!(matches!(s[0], Status::Placed { at: 0.0, .. }), "{s:?}");
    match s[1] {
        Status::Rejected { reason, at } => {
            assert_eq!(reason, RejectReason::TtftBudgetUnreachable);
            close(at, 0.15);
        }
        other => panic!("{other:?}"),
    }
    let r = simulate(&c).unwrap();
    assert_eq!((r.requests, r.rejected), (2, 1));
    close(r.span_s, 0.6);
}

#[test]
fn a_running_sequences_itl_budget_makes_the_next_wait() {
    // The first sequence's ITL budget is 11 ms: alone its steps take 10 ms; with a second
    // sequence 12 ms, so the second waits until the first ends.
    let replay = |b0: Budget, b1: Budget| {
        Arrivals::Replay(vec![
            RequestSpec {
                arrival: 0.0,
                input: 100,
                output: 11,
                budget: Some(b0),
            },
            RequestSpec {
                arrival: 0.0,
                input: 100,
                output: 11,
                budget: Some(b1),
            },
        ])
    };
    let tight = budget(Some(2.0), Some(0.011), Priority::Standard);
    let loose = budget(Some(2.0), None, Priority::Standard);
    let c = cfg(cluster(1, 1000), replay(tight, loose), 11, 2, Some(loose));
    let s = statuses(&c);
    assert!(
        matches!(s[1], Status::Placed { at, .. } if (at - 0.2).abs() < 1e-9),
        "{s:?}"
    );
    close(simulate(&c).unwrap().ttft.max, 0.3);
    // Without the first one's budget, both run together.
    let c = cfg(cluster(1, 1000), replay(loose, loose), 11, 2, Some(loose));
    let s = statuses(&c);
    assert!(matches!(s[1], Status::Placed { at: 0.0, .. }), "{s:?}");
}

#[test]
fn a_full_queue_evicts_less_urgent_work_and_refuses_as_urgent_work() {
    let at = |arrival: f64, priority: Priority| RequestSpec {
        arrival,
        input: 100,
        output: 11,
        budget: Some(budget(Some(2.0), None, priority)),
    };
    let arrivals = Arrivals::Replay(vec![
        at(0.0, Priority::Standard),
        at(0.0, Priority::Standard),
        at(0.01, Priority::Critical),
        at(0.02, Priority::Standard),
    ]);
    let mut c = cfg(cluster(1, 10), arrivals, 11, 4, None);
    let mut adm = AdmissionConfig::new(Budget::default());
    adm.queue = 1;
    c.admission = Some(adm);
    let s = statuses(&c);
    let rejected = |s: Status| match s {
        Status::Rejected { reason, at } => Some((reason, at)),
        _ => None,
    };
    assert!(matches!(s[0], Status::Placed { at: 0.0, .. }), "{s:?}");
    assert_eq!(rejected(s[1]), Some((RejectReason::QueueFull, 0.01)));
    assert!(
        matches!(s[2], Status::Placed { at, .. } if (at - 0.2).abs() < 1e-9),
        "{s:?}"
    );
    assert_eq!(rejected(s[3]), Some((RejectReason::QueueFull, 0.02)));
    let r = simulate(&c).unwrap();
    assert_eq!(r.rejections["queue_full"], 2);
}

#[test]
fn best_fit_packs_prompts_onto_the_busiest_instance_within_budget() {
    // Prompts of 100 ms each on four prefill instances. Headroom gives each prompt an idle
    // instance; best fit stacks the second behind the first (predicted 0.2 s, within 0.3 s) and the third behind the second, which has started by then.
    let b = budget(Some(0.3), None, Priority::Standard);
    let arrivals = Arrivals::Trace(vec![0.0, 0.05, 0.12]);
    let mut c = cfg(cluster(4, 1000), arrivals, 2, 3, Some(b));
    let headroom = simulate(&c).unwrap();
    close(headroom.ttft.max, 0.1);
    if let Some(a) = c.admission.as_mut() {
        a.choice = PairChoice::BestFit;
    }
    let packed = simulate(&c).unwrap();
    assert_eq!(packed.rejected, 0);
    close(packed.ttft.max, 0.18);
    close(packed.ttft.mean, (0.1 + 0.15 + 0.18) / 3.0);
}
