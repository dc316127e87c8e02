//! The engine's mechanisms on a tiny random Llama: paged cache against full recomputation, batching,
//! chunking and KV transfer between two engines, all with exact expectations.
mod common;

use std::sync::Arc;

use tandem_engine::tiny::tiny_model;
use tandem_engine::{Engine, EngineError, Flow, SamplingParams, StepItem, generate};

fn engine(quantize: bool, blocks: usize) -> (Engine, tandem_engine::tiny::TinyWeights) {
    let (m, w) = tiny_model(1, quantize).expect("tiny model");
    (Engine::new(Arc::new(m), blocks), w)
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 31 + salt * 7 + 3) % 96)
        .collect()
}

/// Greedy continuation of `prompt` for `n` tokens, alone on a fresh engine.
fn solo(quantize: bool, prompt: &[u32], n: u32) -> Vec<u32> {
    let (mut e, _) = engine(quantize, 64);
    generate(
        &mut e,
        1,
        prompt,
        &SamplingParams::greedy(n),
        &[],
        512,
        |_| Flow::Continue,
    )
    .expect("generate")
    .tokens
}

#[test]
fn paged_decode_logits_equal_full_recomputation() {
    for quantize in [false, true] {
        let (mut e, w) = engine(quantize, 16);
        let cfg = e.model().config().clone();
        let mut tokens = prompt(21, 0);
        e.add_sequence(7).expect("add");
        let mut logits = e.prefill(&[(7, &tokens)], 8).expect("prefill").remove(0);
        for step in 0..12 {
            let reference = common::reference_logits(&cfg, &w, &tokens, quantize.then_some(21));
            let want = reference.last().expect("logits");
            let err = logits
                .to_vec()
                .iter()
                .zip(want)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            // With quantized weights the engine rounds a generated token's activations to 16 bits,
            // as the reference does; but a value the f32 engine and the f64 reference compute a
            // hair apart can land on either side of a rounding step (1/32767 of its block's
            // largest value), and each such value moves the logits by about that step times the
            // weights it meets.
            let bound = if quantize { 2e-3 } else { 1e-4 };
            assert!(
                err < bound,
                "quantize={quantize} step {step}: max logit error {err}"
            );
            let next = logits.argmax();
            tokens.push(next);
            logits = e
                .step(&[StepItem {
                    seq: 7,
                    tokens: &[next],
                    logits: true,
                }])
                .expect("decode")
                .remove(0);
        }
    }
}

#[test]
fn batch_of_different_lengths_decodes_exactly_as_each_alone() {
    for quantize in [false, true] {
        let prompts: Vec<Vec<u32>> = [3, 17, 40, 1, 33]
            .iter()
            .enumerate()
            .map(|(i, n)| prompt(*n, i as u32))
            .collect();
        let want: Vec<Vec<u32>> = prompts.iter().map(|p| solo(quantize, p, 10)).collect();

        let (mut e, _) = engine(quantize, 64);
        let ids: Vec<u64> = (100..100 + prompts.len() as u64).collect();
        for id in &ids {
            e.add_sequence(*id).expect("add");
        }
        let batch: Vec<(u64, &[u32])> = ids
            .iter()
            .copied()
            .zip(prompts.iter().map(Vec::as_slice))
            .collect();
        let first = e.prefill(&batch, 13).expect("prefill");
        let mut got: Vec<Vec<u32>> = first.iter().map(|l| vec![l.argmax()]).collect();
        for _ in 1..10 {
            let last: Vec<[u32; 1]> = got.iter().map(|g| [*g.last().expect("token")]).collect();
            let items: Vec<StepItem<'_>> = ids
                .iter()
                .zip(&last)
                .map(|(id, t)| StepItem {
                    seq: *id,
                    tokens: t,
                    logits: true,
                })
                .collect();
            for (g, l) in got.iter_mut().zip(e.step(&items).expect("step")) {
                g.push(l.argmax());
            }
        }
        assert_eq!(got, want, "quantize={quantize}");
    }
}

#[test]
fn chunked_prefill_is_bit_identical_to_one_pass() {
    let p = prompt(50, 9);
    let mut all = Vec::new();
    for chunk in [1, 7, 16, 50] {
        let (mut e, _) = engine(true, 16);
        e.add_sequence(1).expect("add");
        let l = e.prefill(&[(1, &p)], chunk).expect("prefill").remove(0);
        all.push(l.to_vec().iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }
    assert!(all.windows(2).all(|w| w[0] == w[1]));
}

#[test]
fn kv_moved_to_another_engine_continues_with_the_same_tokens() {
    let p = prompt(37, 4);
    let want = solo(true, &p, 12);

    // Prefill on engine A, whose blocks are handed out from the start of its pool.
    let (mut a, _) = engine(true, 8);
    a.add_sequence(1).expect("add");
    let first = a.prefill(&[(1, &p)], 512).expect("prefill")[0].argmax();

    // Engine B has other sequences holding its first blocks, so the ids differ.
    let (mut b, _) = engine(true, 16);
    b.add_sequence(50).expect("add");
    b.reserve(50, 5 * 16).expect("occupy");
    b.add_sequence(2).expect("add");
    let table = b.reserve(2, p.len() + 12).expect("reserve").to_vec();
    assert_ne!(
        &table[..3],
        a.block_table(1).expect("table"),
        "different block ids"
    );
    let layers = a.model().config().layers;
    for layer in 0..layers {
        let mut bytes = Vec::new();
        a.export_layer(1, layer, &mut bytes).expect("export");
        b.import_layer(2, layer, &bytes).expect("import");
    }
    b.commit(2, p.len()).expect("commit");
    a.release(1).expect("release");

    let mut got = vec![first];
    for _ in 1..12 {
        let t = [*got.last().expect("token")];
        let l = b
            .step(&[StepItem {
                seq: 2,
                tokens: &t,
                logits: true,
            }])
            .expect("decode");
        got.push(l[0].argmax());
    }
    assert_eq!(got, want);
}

#[test]
fn release_returns_every_block() {
    let (mut e, _) = engine(false, 10);
    e.add_sequence(1).expect("add");
    e.prefill(&[(1, &prompt(40, 0))], 512).expect("prefill");
    assert_eq!(e.free_blocks(), 7);
    e.release(1).expect("release");
    assert_eq!(e.free_blocks(), 10);
    assert!(matches!(e.release(1), Err(EngineError::UnknownSequence(1))));
}

#[test]
fn blocks_taken_from_the_shared_allocator_are_adopted_and_counted_by_steps() {
    let (mut e, _) = engine(false, 10);
    let alloc = e.allocator();
    // Another owner (a decode worker's reservation) leases blocks while the engine runs.
    let mut short = alloc.lease(1, 0).expect("one");
    let taken = alloc.lease(3, 0).expect("three");
    let ids = taken.ids().to_vec();
    assert_eq!(e.free_blocks(), 6);
    let (err, back) = e
        .adopt(5, short, 40)
        .expect_err("40 positions need 3 blocks");
    assert!(matches!(err, EngineError::KvImport(_)), "{err}");
    short = back;
    assert_eq!(short.len(), 1, "handed back");
    drop(short);
    e.adopt(5, taken, 40).expect("adopt");
    assert_eq!((e.seq_len(5), e.block_table(5)), (Some(40), Some(&ids[..])));
    assert!(
        e.adopt(5, alloc.empty(), 0).is_err(),
        "an id is adopted once"
    );
    let other = tandem_engine::kv::BlockSource::new(4);
    assert!(
        e.adopt(6, other.lease(1, 0).expect("one"), 0).is_err(),
        "another pool's blocks"
    );
    // The rest goes elsewhere: a step that needs a block fails whole and takes nothing.
    let rest = alloc.lease(7, 0).expect("the rest");
    let t = prompt(9, 2);
    let r = e.step(&[StepItem {
        seq: 5,
        tokens: &t,
        logits: true,
    }]);
    assert!(
        matches!(r, Err(EngineError::OutOfBlocks { needed: 1, free: 0 })),
        "{r:?}"
    );
    assert_eq!(
        (e.seq_len(5), e.block_table(5).map(<[u32]>::len)),
        (Some(40), Some(3))
    );
    drop(rest);
    e.release(5).expect("release");
    assert_eq!(e.free_blocks(), 10);
}

#[test]
fn bad_input_is_an_error_and_changes_nothing() {
    let (mut e, _) = engine(false, 3);
    let greedy = SamplingParams::greedy(4);
    let r = generate(&mut e, 1, &[], &greedy, &[], 512, |_| Flow::Continue);
    assert!(
        matches!(r, Err(EngineError::InvalidRequest(_))),
        "empty prompt"
    );
    let r = generate(
        &mut e,
        1,
        &[1, 2],
        &SamplingParams::greedy(0),
        &[],
        512,
        |_| Flow::Continue,
    );
    assert!(
        matches!(r, Err(EngineError::InvalidRequest(_))),
        "max tokens 0"
    );
    e.add_sequence(1).expect("add");
    let r = e.step(&[StepItem {
        seq: 1,
        tokens: &[500],
        logits: true,
    }]);
    assert!(
        matches!(r, Err(EngineError::InvalidRequest(_))),
        "token outside the vocabulary"
    );
    let r = e.step(&[StepItem {
        seq: 1,
        tokens: &prompt(49, 0),
        logits: true,
    }]);
    assert!(
        matches!(r, Err(EngineError::OutOfBlocks { needed: 4, free: 3 })),
        "{r:?}"
    );
    assert_eq!(
        (e.free_blocks(), e.seq_len(1)),
        (3, Some(0)),
        "failed steps take nothing"
    );
    let r = e.step(&[StepItem {
        seq: 9,
        tokens: &[1],
        logits: true,
    }]);
    assert!(matches!(r, Err(EngineError::UnknownSequence(9))));
    assert_eq!(e.sequences(), 1);
}

#[test]
fn generation_stops_at_eos_and_max_tokens() {
    let p = prompt(5, 1);
    let free_run = solo(false, &p, 6);
    let (mut e, _) = engine(false, 8);
    let eos = [free_run[2]];
    let g = generate(&mut e, 1, &p, &SamplingParams::greedy(6), &eos, 512, |_| {
        Flow::Continue
    })
    .expect("gen");
    let stop_at = free_run
        .iter()
        .position(|t| *t == eos[0])
        .expect("eos in run");
    assert_eq!(g.tokens, free_run[..=stop_at].to_vec());
    assert_eq!(g.finish, tandem_engine::FinishReason::Stop);
    let mut p2 = SamplingParams::greedy(6);
    p2.ignore_eos = true;
    let g = generate(&mut e, 1, &p, &p2, &eos, 512, |_| Flow::Continue).expect("gen");
    assert_eq!(
        (g.tokens, g.finish),
        (free_run, tandem_engine::FinishReason::Length)
    );
    assert_eq!(e.sequences(), 0);
}
