//! Batched greedy decode alone, for profiling (`perf record`) one batch size: `B=16 STEPS=64`
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
    let (batch, steps) = (env("B", 16), env("STEPS", 64));
    let prompt: Vec<u32> = loaded.tokenizer.encode("The history of the printing press begins long before Gutenberg. Carved wooden blocks were inked and pressed onto paper in China more than a thousand years earlier.", false)?;
    let mut e = Engine::new(model, batch * (prompt.len() + steps).div_ceil(16) + batch);
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
    let dt = t.elapsed().as_secs_f64();
    println!(
        "batch {batch}: {:.1} tok/s, {:.2} ms/step",
        (batch * steps) as f64 / dt,
        dt * 1e3 / steps as f64
    );
    Ok(())
}
