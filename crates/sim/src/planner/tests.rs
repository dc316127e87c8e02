use super::*;
use crate::catalog::Catalog;
use crate::workload::{Arrivals, Lengths};

fn input(
    model: &str,
    isl: u32,
    osl: u32,
    rate: f64,
    ttft: f64,
    tpot: f64,
    grid: Grid,
) -> PlanInput {
    let c = Catalog::builtin().unwrap();
    PlanInput {
        source: ModelSource::Roofline {
            model: Box::new(c.model(model).unwrap().clone()),
            gpu: Box::new(c.gpu("h100").unwrap().clone()),
            eff: Efficiency::CALIBRATED,
        },
        workload: Workload {
            arrivals: Arrivals::Poisson { rate },
            input: Lengths::Fixed(isl),
            output: Lengths::Fixed(osl),
        },
        rate,
        slo: Slo {
            ttft_s: ttft,
            tpot_s: tpot,
        },
        attainment: 0.9,
        link: Link::infiniband_ndr(),
        requests: 600,
        seed: 3,
        grid,
    }
}

fn small_grid() -> Grid {
    Grid {
        tps: vec![1, 2],
        batches: vec![16, 64],
        modes: vec![Mode::Disaggregated],
        max_instances: 6,
    }
}

#[test]
fn planner_pick_reaches_95_percent_of_exhaustive_best() {
    let inp = input("llama-3-8b", 1024, 128, 40.0, 0.4, 0.02, small_grid());
    let p = plan(&inp).unwrap();
    let pick = p.recommended.goodput_per_gpu().unwrap();
    // Every grid configuration that serves the target rate: (GPUs, goodput per GPU).
    let mut found: Vec<(u32, f64)> = Vec::new();
    for tp_p in [1, 2] {
        for tp_d in [1, 2] {
            for np in 1..=3 {
                for nd in 1..=3 {
                    for b in [16, 64] {
                        for budget in [1024, 2048, 8192] {
                            let c = Candidate {
                                mode: Mode::Disaggregated,
                                tp_prefill: tp_p,
                                tp_decode: tp_d,
                                prefill_instances: np,
                                decode_instances: nd,
                                max_batch: b,
                                batch_tokens: budget,
                                gpus: np * tp_p + nd * tp_d,
                                at_rate: None,
                                goodput_rps: None,
                            };
                            let g = search::cluster_goodput(&inp, &c).unwrap().unwrap_or(0.0);
                            if g >= inp.rate {
                                found.push((c.gpus, g / f64::from(c.gpus)));
                            }
                        }
                    }
                }
            }
        }
    }
    // The question is the fewest GPUs for the rate; among those, the highest goodput per GPU.
    // (A larger cluster can reach a higher goodput per GPU through pooling, but serves a rate the
    // user did not ask for.)
    let fewest = found.iter().map(|f| f.0).min().unwrap();
    let best = found
        .iter()
        .filter(|f| f.0 == fewest)
        .map(|f| f.1)
        .fold(0.0, f64::max);
    assert!(
        inp.rate / f64::from(p.recommended.gpus) >= 0.95 * inp.rate / f64::from(fewest),
        "{fewest} {:?}",
        p.recommended
    );
    assert!(
        pick >= 0.95 * best,
        "planner {pick:.3} per GPU, exhaustive best {best:.3}: {:?}",
        p.recommended
    );
}

#[test]
fn impossible_objectives_name_the_binding_one() {
    let e = plan(&input(
        "llama-2-70b",
        4000,
        100,
        1.0,
        0.05,
        1.0,
        Grid::default(),
    ))
    .unwrap_err();
    assert!(
        matches!(&e, SimError::Infeasible { binding, .. } if binding == "TTFT"),
        "{e}"
    );
    let e = plan(&input(
        "llama-2-70b",
        128,
        100,
        1.0,
        5.0,
        0.001,
        Grid::default(),
    ))
    .unwrap_err();
    assert!(
        matches!(&e, SimError::Infeasible { binding, .. } if binding == "ITL"),
        "{e}"
    );
    assert!(
        e.to_string().contains("the binding objective is ITL"),
        "{e}"
    );
    let e = plan(&input(
        "llama-2-70b",
        128,
        100,
        -1.0,
        5.0,
        0.1,
        Grid::default(),
    ))
    .unwrap_err();
    assert!(e.to_string().contains("must be positive"), "{e}");
}

#[test]
fn max_rate_finds_the_threshold() {
    let g = max_rate(10.0, |r| Ok(r <= 23.0)).unwrap();
    assert!(g <= 23.0 && g > 23.0 * 0.99, "{g}");
    assert_eq!(max_rate(10.0, |_| Ok(false)).unwrap(), 0.0);
}
