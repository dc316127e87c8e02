//! Quick speed check of the native engine on a GGUF file, without the tokenizer.
use std::sync::Arc;
use std::time::Instant;

use tandem_engine::model::GgufFile;
use tandem_engine::sampling::argmax;
use tandem_engine::{Engine, StepItem};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into());
    let t = Instant::now();
    let model = Arc::new(GgufFile::open(path.as_ref())?.model()?);
    println!(
        "load {:.2}s, weights {} MB",
        t.elapsed().as_secs_f64(),
        model.weight_bytes() / 1_000_000
    );
    let prompt: Vec<u32> = (0..200u32).map(|i| (i * 37 + 11) % 40000 + 100).collect();
    let mut e = Engine::new(model, 4096);
    e.add_sequence(0)?;
    let batches: Vec<usize> = std::env::var("BATCHES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 4, 16, 32]);
    let steps: usize = std::env::var("STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let plen = if std::env::var("SKIP_PREFILL").is_ok() {
        1
    } else {
        200
    };
    let prompt_run = &prompt[..plen];
    let t = Instant::now();
    let l = e.prefill(&[(0, prompt_run)], 512)?;
    let dt = t.elapsed().as_secs_f64();
    println!(
        "prefill {plen} tokens: {:.3}s = {:.1} tok/s",
        dt,
        plen as f64 / dt
    );
    e.release(0)?;
    let _ = argmax(&l[0]);
    for batch in batches {
        let ids: Vec<u64> = (1..=batch as u64).collect();
        for id in &ids {
            e.add_sequence(*id)?;
            e.prefill(&[(*id, &prompt[..32])], 512)?;
        }
        let mut toks = vec![[5u32]; batch];
        let t = Instant::now();
        for _ in 0..steps {
            let items: Vec<StepItem> = ids
                .iter()
                .zip(&toks)
                .map(|(id, t)| StepItem {
                    seq: *id,
                    tokens: t,
                    logits: true,
                })
                .collect();
            let out = e.step(&items)?;
            for (t, l) in toks.iter_mut().zip(out) {
                t[0] = argmax(&l);
            }
        }
        let dt = t.elapsed().as_secs_f64();
        println!(
            "decode batch {batch}: {:.1} tok/s ({:.1} ms/step)",
            (batch * steps) as f64 / dt,
            dt * 1000.0 / steps as f64
        );
        for id in &ids {
            e.release(*id)?;
        }
    }
    Ok(())
}
