//! The `sim` engine's own CPU cost per decoded token at zero simulated time, on the pool of a
//! Llama-2-70B on 4 H100s (80 layers, about 28,000 blocks): the forward step (KV writes and
//! logits) and sampling, for a batch of decoding sequences. What `scripts/bench-overhead.sh`
//! measures end to end, without the serving path around it.
//!
//! cargo build --release --workspace --examples && target/release/examples/sim_step
//! (BATCH, STEPS, BLOCKS, TEMP override the defaults 64, 256, 28000, 1.0; TEMP=0 is greedy).
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_engine::sampling::{argmax, sample, sample_dense};
use tandem_engine::{Engine, Model, SamplingParams, SimConfig, StepItem, ZeroClock};

fn env(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let batch = env("BATCH", 64.0) as usize;
    let steps = env("STEPS", 256.0) as usize;
    let blocks = env("BLOCKS", 28_000.0) as usize;
    let cfg = SimConfig {
        name: "llama-2-70b".into(),
        layers: 80,
        vocab: 49_152,
        max_context: 4096,
        simulated_kv_bytes_per_token: 327_680,
    };
    let model = Arc::new(Model::simulated(cfg, Arc::new(ZeroClock))?);
    let mut e = Engine::new(model, blocks);
    let params = SamplingParams {
        temperature: env("TEMP", 1.0) as f32,
        seed: 7,
        ..SamplingParams::greedy(u32::MAX)
    };
    // Spread the sequences over the pool as a long-running worker would: every sequence's
    // blocks are taken after a gap of other blocks.
    let gap = (blocks / batch).saturating_sub(16 + steps / 16 + 1);
    let mut last = Vec::new();
    for s in 0..batch as u64 {
        let filler = 1_000_000 + s;
        e.add_sequence(filler)?;
        e.reserve(filler, gap * 16)?;
        e.add_sequence(s)?;
        let prompt: Vec<u32> = (0..128).map(|i| (i * 31 + s as u32 * 7) % 49_152).collect();
        let l = e.prefill(&[(s, &prompt)], 512)?;
        last.push(sample(&l[0], &params, 0));
    }
    let (mut fwd, mut samp) = (Duration::ZERO, Duration::ZERO);
    for step in 1..=steps as u64 {
        let tokens: Vec<[u32; 1]> = last.iter().map(|t| [*t]).collect();
        let items: Vec<StepItem<'_>> = tokens
            .iter()
            .enumerate()
            .map(|(s, t)| StepItem {
                seq: s as u64,
                tokens: t,
                logits: true,
            })
            .collect();
        let t0 = Instant::now();
        let logits = e.step(&items)?;
        let t1 = Instant::now();
        for (t, l) in last.iter_mut().zip(&logits) {
            *t = sample(l, &params, step);
        }
        fwd += t1 - t0;
        samp += t1.elapsed();
    }
    let n = (batch * steps) as f64;
    println!(
        "batch {batch}, {steps} steps, {blocks} blocks: forward {:.2} us/token, sampling {:.2} us/token (temperature {})",
        fwd.as_secs_f64() * 1e6 / n,
        samp.as_secs_f64() * 1e6 / n,
        params.temperature
    );
    // The dense paths the native model's logits take, on the same vocabulary.
    let dense: Vec<f32> = (0..49_152u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 20) as f32 / 4096.0)
        .collect();
    let reps = 2000u32;
    let t = Instant::now();
    let mut acc = 0u32;
    for r in 0..reps {
        acc = acc.wrapping_add(argmax(&dense[(r % 8) as usize..]));
    }
    let am = t.elapsed().as_secs_f64() * 1e6 / f64::from(reps);
    let t = Instant::now();
    for r in 0..reps {
        acc = acc.wrapping_add(sample_dense(&dense, &params, u64::from(r)));
    }
    let sd = t.elapsed().as_secs_f64() * 1e6 / f64::from(reps);
    println!("dense 49k vocabulary: argmax {am:.2} us, sample {sd:.2} us ({acc})");
    Ok(())
}
