//! Decode step time at small batches (1, 2, 4, 5, 6, 7 and 8 sequences of a 40-token prompt, 16
//! greedy steps each), nine rounds that run every batch in turn; prints each batch's median step
//! and its tokens/s against batch 1's. The curve below and at a group of eight rows, where the q16
//! kernel takes rows one at a time, in fours, or as a group padded to eight.
//!
//! cargo run --release -p tandem-engine --example batch_steps
use std::sync::Arc;
use std::time::Instant;
use tandem_engine::{Engine, load};
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(tandem_engine::testing::model_path);
    let loaded = load(&path)?;
    let prompt: Vec<u32> = loaded.tokenizer.encode("The history of the printing press begins long before Gutenberg. Carved wooden blocks were inked and pressed onto paper in China more than a thousand years earlier, and movable type made of clay", false)?;
    let model = Arc::new(loaded.model);
    let batches = [1usize, 2, 4, 5, 6, 7, 8];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); batches.len()];
    for _ in 0..9 {
        for (bi, &batch) in batches.iter().enumerate() {
            let steps = 16;
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
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let m1 = med(&mut times[0].clone());
    for (bi, &batch) in batches.iter().enumerate() {
        let m = med(&mut times[bi]);
        println!(
            "batch {batch}: step {:.2} ms, {:.1} tok/s, {:.2}x batch 1's tokens/s",
            m * 1e3,
            batch as f64 / m,
            batch as f64 * m1 / m
        );
    }
    Ok(())
}
