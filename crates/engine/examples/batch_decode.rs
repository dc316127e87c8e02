//! Batched greedy decode alone: `B` sequences (a comma-separated list runs each size in turn) of
//! a 40-token prompt, `STEPS` greedy steps each, `ROUNDS` rounds; prints each size's median step,
//! its tokens/s and its tokens/s against the first size's.
//! - one batch size to profile (`perf record`): `B=16 STEPS=64` (the defaults, one round);
//! - the small-batch curve, where the q16 kernel takes rows one at a time, in fours, or as a group
//!   padded to eight: `B=1,2,4,5,6,7,8 STEPS=16 ROUNDS=9`.
//!
//! cargo run --release -p tandem-engine --example batch_decode
use std::sync::Arc;
use std::time::Instant;

use tandem_engine::{Engine, load};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = tandem_engine::testing::model_path();
    let loaded = load(&path)?;
    let model = Arc::new(loaded.model);
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let batches: Vec<usize> = std::env::var("B")
        .unwrap_or_else(|_| "16".into())
        .split(',')
        .map(|b| b.trim().parse())
        .collect::<Result<_, _>>()?;
    let (steps, rounds) = (env("STEPS", 64), env("ROUNDS", 1).max(1));
    let prompt: Vec<u32> = loaded.tokenizer.encode("The history of the printing press begins long before Gutenberg. Carved wooden blocks were inked and pressed onto paper in China more than a thousand years earlier, and movable type made of clay", false)?;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); batches.len()];
    for _ in 0..rounds {
        for (bi, &batch) in batches.iter().enumerate() {
            let mut e = Engine::new(
                model.clone(),
                batch * (prompt.len() + steps).div_ceil(16) + batch,
            );
            let ids: Vec<u64> = (1..=batch as u64).collect();
            for id in &ids {
                e.add_sequence(*id)?;
            }
            let prompts: Vec<(u64, &[u32])> = ids.iter().map(|id| (*id, &prompt[..])).collect();
            let first = e.prefill(&prompts, 4096)?;
            let mut last: Vec<u32> = first.iter().map(|l| l.argmax()).collect();
            let t = Instant::now();
            for _ in 0..steps {
                e.greedy_step(&ids, &mut last)?;
            }
            times[bi].push(t.elapsed().as_secs_f64() / steps as f64);
        }
    }
    let medians: Vec<f64> = times
        .iter_mut()
        .map(|v| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        })
        .collect();
    for (&batch, &m) in batches.iter().zip(&medians) {
        println!(
            "batch {batch}: step {:.2} ms, {:.1} tok/s, {:.2}x batch {}'s tokens/s",
            m * 1e3,
            batch as f64 / m,
            batch as f64 * medians[0] / (m * batches[0] as f64),
            batches[0]
        );
    }
    Ok(())
}
