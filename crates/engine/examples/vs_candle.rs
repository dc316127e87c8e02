//! Our engine beside candle's `quantized_llama` on the same GGUF file, in the same process:
//! prefill tokens/s for a 200-token prompt, single-stream decode tokens/s, and decode at batch 1,
//! 4, 16 and 32 (candle's beside ours; ours at 16 against 1 as the median of five rounds).
//!
//! cargo run --release -p tandem-engine --features candle-baseline --example vs_candle [-- MODEL]
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use tandem_engine::sampling::argmax;
use tandem_engine::{Engine, StepItem, load};

const TEXT: &str = "The history of the printing press begins long before Gutenberg. Carved wooden blocks \
were inked and pressed onto paper in China more than a thousand years earlier, and movable type made \
of clay, then of metal, followed. What changed in fifteenth-century Europe was the combination of an \
alloy that cast cleanly, an oil-based ink that clung to metal, and a screw press adapted from the \
making of wine and paper. Within fifty years, printing shops had opened in more than two hundred \
cities, and the cost of a book fell so far that ordinary merchants could own a small library. ";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(tandem_runtime_path);
    let loaded = load(&path)?;
    let mut prompt = Vec::new();
    while prompt.len() < 200 {
        prompt.extend(loaded.tokenizer.encode(TEXT, false)?);
    }
    prompt.truncate(200);
    let model = Arc::new(loaded.model);
    let decode_n = 48usize;

    let rounds = 5;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // `BATCH_ONLY=1` skips candle and the single-stream figures.
    let mut candle_for_batches = None;
    if std::env::var_os("BATCH_ONLY").is_none() {
        let mut file = std::fs::File::open(&path)?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file)?;
        let mut candle = ModelWeights::from_gguf(content, &mut file, &Device::Cpu)?;

        // Each round runs both engines back to back; on a shared machine the per-round ratio is steadier
        // than either side's best time, so the median ratio is the figure to read.
        let (mut ours_pf, mut ours_dec, mut cand_pf, mut cand_dec) =
            (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
        let (mut pf_ratios, mut dec_ratios) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            // Ours: prefill, then single-stream greedy decode.
            let mut e = Engine::new(model.clone(), (prompt.len() + decode_n).div_ceil(16) + 1);
            e.add_sequence(1)?;
            let t = Instant::now();
            let l = e.prefill(&[(1, &prompt)], 512)?;
            let o_pf = t.elapsed().as_secs_f64();
            let mut tok = l[0].argmax();
            let t = Instant::now();
            for _ in 0..decode_n {
                let l = e.step(&[StepItem {
                    seq: 1,
                    tokens: &[tok],
                    logits: true,
                }])?;
                tok = l[0].argmax();
            }
            let o_dec = t.elapsed().as_secs_f64();

            // candle's quantized_llama on the same file and tokens.
            let x = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
            let t = Instant::now();
            let logits = candle.forward(&x, 0)?;
            let c_pf = t.elapsed().as_secs_f64();
            let mut tok = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
            let t = Instant::now();
            for i in 0..decode_n {
                let x = Tensor::new(&[tok], &Device::Cpu)?.unsqueeze(0)?;
                let logits = candle.forward(&x, prompt.len() + i)?;
                tok = argmax(&logits.squeeze(0)?.to_vec1::<f32>()?);
            }
            let c_dec = t.elapsed().as_secs_f64();
            pf_ratios.push(c_pf / o_pf);
            dec_ratios.push(c_dec / o_dec);
            (ours_pf, ours_dec, cand_pf, cand_dec) = (
                ours_pf.min(o_pf),
                ours_dec.min(o_dec),
                cand_pf.min(c_pf),
                cand_dec.min(c_dec),
            );
        }
        let n = prompt.len() as f64;
        println!(
            "{rounds} rounds, {} threads; throughputs are each side's best, ratios the median of per-round ratios",
            rayon::current_num_threads()
        );
        println!(
            "prefill {} tokens: tandem {:.1} tok/s, candle quantized_llama {:.1} tok/s, ratio {:.2}x (goal >= 4x)",
            prompt.len(),
            n / ours_pf,
            n / cand_pf,
            median(&mut pf_ratios)
        );
        println!(
            "decode batch 1: tandem {:.1} tok/s, candle quantized_llama {:.1} tok/s, ratio {:.2}x (goal >= 1x)",
            decode_n as f64 / ours_dec,
            decode_n as f64 / cand_dec,
            median(&mut dec_ratios)
        );
        candle_for_batches = Some(candle);
    }

    // Our batched decode against batch 1: rounds that run batch 1 and batch 16 back to back (the
    // per-round ratio is steadier than either throughput on a shared machine), then batches 4
    // and 32 once for the shape of the curve.
    let batch_tps = |batch: usize| -> Result<f64, Box<dyn std::error::Error>> {
        let steps: usize = 32;
        let mut e = Engine::new(model.clone(), batch * (64 + steps).div_ceil(16) + batch);
        let ids: Vec<u64> = (1..=batch as u64).collect();
        for id in &ids {
            e.add_sequence(*id)?;
        }
        let prompts: Vec<(u64, &[u32])> = ids.iter().map(|id| (*id, &prompt[..64])).collect();
        let first = e.prefill(&prompts, 4096)?;
        let mut last: Vec<u32> = first.iter().map(|l| l.argmax()).collect();
        let t = Instant::now();
        for _ in 0..steps {
            e.greedy_step(&ids, &mut last)?;
        }
        Ok((batch * steps) as f64 / t.elapsed().as_secs_f64())
    };
    let (mut best1, mut best16, mut ratios) = (0f64, 0f64, Vec::new());
    for _ in 0..rounds {
        let (one, sixteen) = (batch_tps(1)?, batch_tps(16)?);
        (best1, best16) = (best1.max(one), best16.max(sixteen));
        ratios.push(sixteen / one);
    }
    let others: Vec<(usize, f64)> = [4usize, 32]
        .into_iter()
        .map(|b| Ok((b, batch_tps(b)?)))
        .collect::<Result<_, Box<dyn std::error::Error>>>()?;
    // candle's quantized_llama at the same batch sizes, after ours (run before them, its batches
    // left our batch-16 rounds 20% slower in the same process): the same 64-token prompt in
    // every row (its cache keeps one position for the whole batch) and 32 greedy steps. The prompt goes in one token per call: its
    // forward pass cannot take several tokens of several rows (the last position's slice of
    // a batch is not contiguous, and its quantized output layer refuses it).
    let mut candle_batched: Vec<(usize, f64)> = Vec::new();
    if let Some(candle) = candle_for_batches.as_mut() {
        for batch in [1usize, 4, 16, 32] {
            let steps = 32;
            let greedy = |logits: Tensor| -> candle_core::Result<Vec<u32>> {
                (0..batch)
                    .map(|b| Ok(argmax(&logits.get(b)?.to_vec1::<f32>()?)))
                    .collect()
            };
            let mut toks = vec![0u32; batch];
            for (i, &p) in prompt[..64].iter().enumerate() {
                let x = Tensor::new(vec![p; batch].as_slice(), &Device::Cpu)?.unsqueeze(1)?;
                toks = greedy(candle.forward(&x, i)?)?;
            }
            let t = Instant::now();
            for i in 0..steps {
                let x = Tensor::new(toks.as_slice(), &Device::Cpu)?.unsqueeze(1)?;
                toks = greedy(candle.forward(&x, 64 + i)?)?;
            }
            candle_batched.push((batch, (batch * steps) as f64 / t.elapsed().as_secs_f64()));
        }
    }
    let candle_at = |batch: usize| {
        candle_batched
            .iter()
            .find(|(b, _)| *b == batch)
            .map_or(String::new(), |(_, tps)| {
                format!(" (candle quantized_llama {tps:.1} tok/s)")
            })
    };
    println!(
        "decode batch  1: tandem {best1:.1} tok/s{}; batch 16: {best16:.1} tok/s{}; batch 16 against batch 1 {:.2}x \
         (median of {rounds} rounds, goal >= 4x; rounds sorted: {})",
        candle_at(1),
        candle_at(16),
        median(&mut ratios),
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    for (batch, tps) in others {
        println!(
            "decode batch {batch:2}: tandem {tps:.1} tok/s, {:.2}x the best batch 1{}",
            tps / best1,
            candle_at(batch)
        );
    }
    Ok(())
}

fn tandem_runtime_path() -> std::path::PathBuf {
    tandem_engine::testing::model_path()
}
