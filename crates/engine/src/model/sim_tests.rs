#![allow(clippy::unwrap_used)]

use std::sync::Mutex;

use super::*;
use crate::{Engine, Flow, Logits, Model, SamplingParams, StepItem, generate};

/// One recorded step: prefill chunks, decode batch, decode context.
type Shape = (Vec<(usize, usize)>, usize, usize);

/// Records every step's shape and answers a fixed duration.
#[derive(Debug, Default)]
struct Recording {
    steps: Mutex<Vec<Shape>>,
    each: Duration,
}

impl StepClock for Recording {
    fn step_time(&self, prefill: &[(usize, usize)], batch: usize, context: usize) -> Duration {
        self.steps
            .lock()
            .unwrap()
            .push((prefill.to_vec(), batch, context));
        self.each
    }
}

fn cfg() -> SimConfig {
    SimConfig {
        name: "sim-test".into(),
        layers: 3,
        vocab: 500,
        max_context: 256,
        simulated_kv_bytes_per_token: 3 * 2 * 8 * 128 * 2,
    }
}

fn model_with(clock: Arc<dyn StepClock>) -> Arc<Model> {
    Arc::new(Model::simulated(cfg(), clock).unwrap())
}

fn engine(blocks: usize) -> Engine {
    Engine::new(model_with(Arc::new(ZeroClock)), blocks)
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + salt * 11 + 5) % 500)
        .collect()
}

/// Greedy continuation of `prompt` for `n` tokens, alone on a fresh engine.
fn solo(prompt: &[u32], n: u32) -> Vec<u32> {
    let mut e = engine(64);
    generate(
        &mut e,
        1,
        prompt,
        &SamplingParams::greedy(n),
        &[],
        512,
        |_| Flow::Continue,
    )
    .unwrap()
    .tokens
}

#[test]
fn the_clock_is_asked_for_each_steps_shape() {
    let clock = Arc::new(Recording::default());
    let mut e = Engine::new(model_with(clock.clone()), 64);
    for id in [1, 2] {
        e.add_sequence(id).unwrap();
    }
    let (a, b) = (prompt(20, 0), prompt(7, 1));
    // A budget of 16: a's first 16 tokens, then a's last 4 with all 7 of b.
    e.prefill(&[(1, &a), (2, &b)], 16).unwrap();
    e.step(&[
        StepItem {
            seq: 1,
            tokens: &[3],
            logits: true,
        },
        StepItem {
            seq: 2,
            tokens: &[4],
            logits: true,
        },
    ])
    .unwrap();
    // A prompt chunk and a decode token in one step.
    e.add_sequence(3).unwrap();
    e.step(&[
        StepItem {
            seq: 3,
            tokens: &prompt(5, 2),
            logits: true,
        },
        StepItem {
            seq: 1,
            tokens: &[9],
            logits: true,
        },
    ])
    .unwrap();
    let steps = clock.steps.lock().unwrap().clone();
    assert_eq!(
        steps,
        vec![
            (vec![(0, 16)], 0, 0),
            (vec![(16, 4), (0, 7)], 0, 0),
            (vec![], 2, 21 + 8),
            (vec![(0, 5)], 1, 22),
        ]
    );
}

#[test]
fn a_step_takes_at_least_the_clocks_time_and_layers_finish_in_turn() {
    let each = Duration::from_millis(30);
    let clock = Arc::new(Recording {
        each,
        ..Default::default()
    });
    let mut e = Engine::new(model_with(clock), 16);
    e.add_sequence(1).unwrap();
    let p = prompt(10, 3);
    let t0 = Instant::now();
    let mut at = Vec::new();
    e.step_with(
        &[StepItem {
            seq: 1,
            tokens: &p,
            logits: true,
        }],
        |layer, _| {
            at.push((layer, t0.elapsed()));
            Ok(())
        },
    )
    .unwrap();
    // Sleeping never ends early, so these lower bounds hold on any machine.
    assert_eq!(
        at.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    for (layer, t) in &at {
        assert!(*t >= each.mul_f64((layer + 1) as f64 / 3.0), "{at:?}");
    }
    assert!(t0.elapsed() >= each);
}

#[test]
fn batch_and_chunking_give_the_same_logits_as_whole_prompts_alone() {
    let prompts: Vec<Vec<u32>> = [3, 17, 40, 1, 33]
        .iter()
        .enumerate()
        .map(|(i, n)| prompt(*n, i as u32))
        .collect();
    let alone: Vec<Logits> = prompts
        .iter()
        .map(|p| {
            let mut e = engine(64);
            e.add_sequence(1).unwrap();
            e.prefill(&[(1, p)], 512).unwrap().remove(0)
        })
        .collect();
    for budget in [1, 7, 16, 512] {
        let mut e = engine(64);
        let items: Vec<(u64, &[u32])> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| (i as u64, p.as_slice()))
            .collect();
        for (id, _) in &items {
            e.add_sequence(*id).unwrap();
        }
        assert_eq!(e.prefill(&items, budget).unwrap(), alone, "budget {budget}");
    }
    // Different prompts lead to different greedy tokens (the logits are not a constant). Two of
    // five hash-chosen ids in a vocabulary of 500 may coincide (a 2% chance, which the hash of
    // these prompts happens to hit); a constant would give one.
    let firsts: std::collections::HashSet<u32> = alone.iter().map(Logits::argmax).collect();
    assert!(firsts.len() >= prompts.len() - 1, "{firsts:?}");
}

#[test]
fn batched_decode_equals_each_sequence_alone() {
    let prompts: Vec<Vec<u32>> = [3, 17, 40].iter().map(|n| prompt(*n, 9)).collect();
    let want: Vec<Vec<u32>> = prompts.iter().map(|p| solo(p, 10)).collect();
    let mut e = engine(64);
    let mut next = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        e.add_sequence(i as u64).unwrap();
        next.push(e.prefill(&[(i as u64, p)], 512).unwrap()[0].argmax());
    }
    let mut got: Vec<Vec<u32>> = next.iter().map(|t| vec![*t]).collect();
    for _ in 1..10 {
        let toks = next.clone();
        let items: Vec<StepItem<'_>> = toks
            .iter()
            .enumerate()
            .map(|(i, t)| StepItem {
                seq: i as u64,
                tokens: std::slice::from_ref(t),
                logits: true,
            })
            .collect();
        let logits = e.step(&items).unwrap();
        next = logits.iter().map(Logits::argmax).collect();
        for (g, t) in got.iter_mut().zip(&next) {
            g.push(*t);
        }
    }
    assert_eq!(got, want);
}

/// Prefills `p` on one engine, moves its KV to another (into different block ids, through the
/// byte format the transports carry, after `tamper` may change it) and decodes `n` tokens there.
fn moved(p: &[u32], n: usize, tamper: impl Fn(usize, &mut Vec<u8>)) -> Vec<u32> {
    let mut a = engine(64);
    a.add_sequence(1).unwrap();
    let mut tok = a.prefill(&[(1, p)], 512).unwrap()[0].argmax();
    let mut b = engine(64);
    b.add_sequence(50).unwrap();
    b.add_sequence(7).unwrap();
    b.reserve(50, 33).unwrap(); // so that sequence 7's blocks are not a's ids
    b.reserve(7, p.len()).unwrap();
    for layer in 0..3 {
        let mut bytes = Vec::new();
        a.export_layer(1, layer, &mut bytes).unwrap();
        tamper(layer, &mut bytes);
        b.import_layer(7, layer, &bytes).unwrap();
    }
    b.commit(7, p.len()).unwrap();
    let mut out = vec![tok];
    for _ in 1..n {
        let l = b
            .step(&[StepItem {
                seq: 7,
                tokens: &[tok],
                logits: true,
            }])
            .unwrap();
        tok = l[0].argmax();
        out.push(tok);
    }
    out
}

#[test]
fn kv_moved_to_another_engine_continues_identically_and_damage_shows() {
    let p = prompt(40, 4);
    let want = solo(&p, 24);
    assert_eq!(moved(&p, 24, |_, _| {}), want);
    // Layer 1's K of the first block (positions 0-15), far from the end of the prompt: later
    // positions read it, so the tokens change.
    let damaged = moved(&p, 24, |layer, bytes| {
        if layer == 1 {
            for b in bytes.iter_mut().take(16 * SIM_HEAD_DIM * 4).step_by(4) {
                *b ^= 0x40;
            }
        }
    });
    assert_ne!(damaged, want);
}

#[test]
fn the_pool_is_scaled_down_by_the_stated_factor() {
    let m = model_with(Arc::new(ZeroClock));
    let s = m.sim().unwrap();
    assert_eq!(m.engine_name(), "sim");
    assert_eq!(m.config().kv_bytes_per_token(), 3 * 2 * SIM_HEAD_DIM * 4);
    assert_eq!(s.kv_scale(), (3 * 2 * 8 * 128 * 2) as f64 / 48.0);
    let g = Engine::geometry_for(&m, 10);
    assert_eq!((g.layers, g.kv_heads, g.head_dim), (3, 1, SIM_HEAD_DIM));
}

#[test]
fn bad_steps_are_refused() {
    let mut e = engine(64);
    e.add_sequence(1).unwrap();
    let err = e
        .step(&[StepItem {
            seq: 1,
            tokens: &[500],
            logits: true,
        }])
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let err = e.prefill(&[(1, &prompt(257, 0))], 512).unwrap_err();
    assert!(err.to_string().contains("past the context of 256"), "{err}");
    let zero = SimConfig { layers: 0, ..cfg() };
    assert!(Model::simulated(zero, Arc::new(ZeroClock)).is_err());
}

#[test]
fn sampling_has_a_spread_to_choose_from() {
    let mut e = engine(16);
    e.add_sequence(1).unwrap();
    let l = e.prefill(&[(1, &prompt(9, 1))], 512).unwrap().remove(0);
    let mut high: Vec<f32> = l.to_vec().into_iter().filter(|x| *x > 0.0).collect();
    high.sort_by(|a, b| b.total_cmp(a));
    assert!(high.len() >= 4 && high[0] == 12.0, "{high:?}");
    let params = SamplingParams {
        temperature: 1.5,
        top_k: 6,
        ..SamplingParams::greedy(1)
    };
    let picks: std::collections::HashSet<u32> = (0..64)
        .map(|i| {
            crate::sampling::sample(
                &l,
                &SamplingParams {
                    seed: i,
                    ..params.clone()
                },
                0,
            )
        })
        .collect();
    assert!(picks.len() > 1, "{picks:?}");
}
