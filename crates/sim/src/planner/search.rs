//! The searches behind the planner: the highest rate a unit sustains, and instance counts.

use super::{Candidate, Mode, PlanInput, sim_config, simulate_candidate};
use crate::des::{Cluster, InstanceSpec, Phase, simulate};
use crate::error::SimError;
use crate::perf::{PerfModel, PrefillItem, blocks_for};
use crate::stats::SimReport;

/// The highest rate at which `meets` holds, from a guess near it: doubling to bracket, then seven
/// bisections (under 1% of the rate). 0 when even a fiftieth of the guess fails.
pub fn max_rate(
    guess: f64,
    mut meets: impl FnMut(f64) -> Result<bool, SimError>,
) -> Result<f64, SimError> {
    let mut lo = guess / 50.0;
    if !meets(lo)? {
        return Ok(0.0);
    }
    let mut hi = guess.max(lo * 2.0);
    let mut doublings = 0;
    while meets(hi)? {
        lo = hi;
        hi *= 2.0;
        doublings += 1;
        if doublings > 12 {
            return Ok(lo);
        }
    }
    for _ in 0..7 {
        let mid = 0.5 * (lo + hi);
        if meets(mid)? { lo = mid } else { hi = mid }
    }
    Ok(lo)
}

pub(super) fn cluster_requests(input: &PlanInput, rate: f64) -> usize {
    input.requests.max((rate * 120.0) as usize).min(40_000)
}

fn role_attainment(input: &PlanInput) -> f64 {
    // Each role gets half of the allowed misses, so that the joint share still meets the objective.
    1.0 - (1.0 - input.attainment) / 2.0
}

fn mean_lengths(input: &PlanInput) -> (f64, f64) {
    (input.workload.input.mean(), input.workload.output.mean())
}

fn prefill_guess(m: &dyn PerfModel, budget: u32, isl: f64) -> f64 {
    let per = (f64::from(budget) / isl).floor().max(1.0) as usize;
    let t = m.prefill_time(&vec![PrefillItem::fresh(isl as u32); per]);
    per as f64 / t
}

fn decode_guess(m: &dyn PerfModel, batch: u32, isl: f64, osl: f64) -> f64 {
    let ctx = (f64::from(batch) * (isl + osl / 2.0)) as u64;
    f64::from(batch) / ((osl - 1.0).max(1.0) * m.decode_step_time(batch, ctx))
}

fn batch_cap(input: &PlanInput, m: &dyn PerfModel) -> u32 {
    let need =
        blocks_for(u64::from(input.workload.input.max()) + u64::from(input.workload.output.max()));
    (m.memory().kv_blocks / need.max(1)).min(u64::from(u32::MAX)) as u32
}

/// Batch limits to try on a model: the grid's, below what its KV holds, plus that ceiling.
fn batches(input: &PlanInput, m: &dyn PerfModel) -> Vec<u32> {
    let cap = batch_cap(input, m);
    let mut v: Vec<u32> = input
        .grid
        .batches
        .iter()
        .copied()
        .filter(|&b| b <= cap)
        .collect();
    if cap > 0 && input.grid.batches.iter().any(|&b| b > cap) {
        v.push(cap);
    }
    v
}

struct Unit {
    tp: u32,
    knob: u32,
    rate: f64,
}

pub(super) fn disaggregated(
    input: &PlanInput,
    out: &mut Vec<Candidate>,
    binding: &mut Vec<String>,
) -> Result<(), SimError> {
    let (isl, osl) = mean_lengths(input);
    let target = role_attainment(input);
    let max_isl = input.workload.input.max();
    let mut budgets = vec![max_isl, 2 * max_isl, max_isl.max(8192)];
    budgets.sort_unstable();
    budgets.dedup();
    let mut pre = Vec::new();
    let mut dec = Vec::new();
    for &tp in &input.grid.tps {
        let Some(m) = input.source.at(tp) else {
            continue;
        };
        for &budget in &budgets {
            let unit = || InstanceSpec {
                model: m.clone(),
                max_running: 1,
                max_batch_tokens: budget,
            };
            let g = max_rate(prefill_guess(m.as_ref(), budget, isl), |r| {
                let c = Cluster::Disaggregated {
                    prefill: vec![unit()],
                    decode: vec![],
                    link: input.link,
                };
                let rep = simulate(&sim_config(input, c, Phase::PrefillOnly, r, input.requests))?;
                Ok(rep.ttft_attainment >= target)
            })?;
            if g > 0.0 {
                pre.push(Unit {
                    tp,
                    knob: budget,
                    rate: g,
                });
            }
        }
        for b in batches(input, m.as_ref()) {
            let unit = || InstanceSpec {
                model: m.clone(),
                max_running: b,
                max_batch_tokens: 1,
            };
            let g = max_rate(decode_guess(m.as_ref(), b, isl, osl), |r| {
                let c = Cluster::Disaggregated {
                    prefill: vec![],
                    decode: vec![unit()],
                    link: input.link,
                };
                let rep = simulate(&sim_config(input, c, Phase::DecodeOnly, r, input.requests))?;
                Ok(rep.tpot_attainment >= target)
            })?;
            if g > 0.0 {
                dec.push(Unit {
                    tp,
                    knob: b,
                    rate: g,
                });
            }
        }
    }
    if pre.is_empty() {
        binding.push("TTFT".into());
    }
    if dec.is_empty() {
        binding.push("ITL".into());
    }
    // Replicating a unit rounds up, so the best per-GPU unit is not always the cheapest cluster:
    // rank every pairing by the GPUs it needs at the target rate, then by its spare capacity.
    let count = |u: &Unit| (input.rate / u.rate).ceil().max(1.0) as u32;
    let mut pairs: Vec<(u32, f64, &Unit, &Unit)> = Vec::new();
    for p in &pre {
        for d in &dec {
            let gpus = count(p) * p.tp + count(d) * d.tp;
            let spare = (f64::from(count(p)) * p.rate).min(f64::from(count(d)) * d.rate);
            pairs.push((gpus, spare, p, d));
        }
    }
    pairs.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
    // One pairing per cluster shape (batch knobs aside), so that distinct shapes get settled.
    let mut shapes = Vec::new();
    pairs.retain(|(_, _, p, d)| {
        let key = (p.tp, count(p), d.tp, count(d));
        let new = !shapes.contains(&key);
        shapes.push(key);
        new
    });
    for &(_, _, p, d) in pairs.iter().take(4) {
        let c = Candidate {
            mode: Mode::Disaggregated,
            tp_prefill: p.tp,
            tp_decode: d.tp,
            prefill_instances: count(p),
            decode_instances: count(d),
            max_batch: d.knob,
            batch_tokens: p.knob,
            gpus: 0,
            at_rate: None,
            goodput_rps: None,
        };
        if let Some(c) = settle(input, c)? {
            out.push(c);
        }
    }
    Ok(())
}

pub(super) fn aggregated(
    input: &PlanInput,
    out: &mut Vec<Candidate>,
    binding: &mut Vec<String>,
) -> Result<(), SimError> {
    let (isl, osl) = mean_lengths(input);
    let mut units = Vec::new();
    for &tp in &input.grid.tps {
        let Some(m) = input.source.at(tp) else {
            continue;
        };
        for b in batches(input, m.as_ref()) {
            for chunk in [512, 2048] {
                let budget = b + chunk;
                let unit = InstanceSpec {
                    model: m.clone(),
                    max_running: b,
                    max_batch_tokens: budget,
                };
                let guess = 1.0
                    / (1.0 / prefill_guess(m.as_ref(), budget, isl)
                        + 1.0 / decode_guess(m.as_ref(), b, isl, osl));
                let g = max_rate(guess, |r| {
                    let c = Cluster::Aggregated {
                        instances: vec![unit.clone()],
                    };
                    let rep = simulate(&sim_config(input, c, Phase::Full, r, input.requests))?;
                    Ok(rep.attainment >= input.attainment)
                })?;
                if g > 0.0 {
                    units.push((
                        Unit {
                            tp,
                            knob: b,
                            rate: g,
                        },
                        budget,
                    ));
                }
            }
        }
    }
    if units.is_empty() {
        binding.push("TTFT or ITL on aggregated instances".into());
    }
    let gpus_for = |u: &Unit| (input.rate / u.rate).ceil().max(1.0) as u32 * u.tp;
    units.sort_by(|a, b| {
        gpus_for(&a.0)
            .cmp(&gpus_for(&b.0))
            .then(b.0.rate.total_cmp(&a.0.rate))
    });
    for (u, budget) in units.iter().take(3) {
        let c = Candidate {
            mode: Mode::Aggregated,
            tp_prefill: u.tp,
            tp_decode: u.tp,
            prefill_instances: (input.rate / u.rate).ceil().max(1.0) as u32,
            decode_instances: 0,
            max_batch: u.knob,
            batch_tokens: *budget,
            gpus: 0,
            at_rate: None,
            goodput_rps: None,
        };
        if let Some(c) = settle(input, c)? {
            out.push(c);
        }
    }
    Ok(())
}

fn gpus(c: &Candidate) -> u32 {
    c.prefill_instances * c.tp_prefill + c.decode_instances * c.tp_decode
}

fn passes(input: &PlanInput, c: &Candidate) -> Result<Option<SimReport>, SimError> {
    let rep = simulate_candidate(input, c, input.rate)?;
    Ok(rep.filter(|r| r.attainment >= input.attainment))
}

/// Adds instances until the whole cluster meets the objectives at the target rate, then removes
/// any it can spare (per-role sizing ignores the pooling of many instances, which helps).
fn settle(input: &PlanInput, mut c: Candidate) -> Result<Option<Candidate>, SimError> {
    let total = |c: &Candidate| c.prefill_instances + c.decode_instances;
    let mut rep = None;
    for _ in 0..12 {
        if total(&c) > input.grid.max_instances {
            return Ok(None);
        }
        let Some(r) = simulate_candidate(input, &c, input.rate)? else {
            return Ok(None);
        };
        if r.attainment >= input.attainment {
            rep = Some(r);
            break;
        }
        let grow_prefill = c.mode == Mode::Aggregated || r.ttft_attainment < r.tpot_attainment;
        if grow_prefill {
            c.prefill_instances += 1
        } else {
            c.decode_instances += 1
        }
    }
    let Some(mut rep) = rep else { return Ok(None) };
    for side in [0, 1] {
        loop {
            let mut t = c.clone();
            let n = if side == 0 {
                &mut t.prefill_instances
            } else {
                &mut t.decode_instances
            };
            if *n <= 1 {
                break;
            }
            *n -= 1;
            match passes(input, &t)? {
                Some(r) => {
                    c = t;
                    rep = r;
                }
                None => break,
            }
        }
    }
    c.gpus = gpus(&c);
    c.at_rate = Some(rep);
    Ok(Some(c))
}

pub(super) fn cluster_goodput(input: &PlanInput, c: &Candidate) -> Result<Option<f64>, SimError> {
    if c.cluster(input).is_none() {
        return Ok(None);
    }
    let g = max_rate(input.rate, |r| {
        let rep = simulate_candidate(input, c, r)?;
        Ok(rep.is_some_and(|x| x.attainment >= input.attainment))
    })?;
    Ok(Some(g))
}
