//! One batched decode matmul alone (`matmul_rounded`: `M` activation rows rounded to 16 bits
//! against an `N × K` Q4_1 weight), timed over `ITERS` calls in each of three rounds, on a pool of
//! `T` threads. `COPIES` > 1 cycles through that many weights so that they come from memory, not
//! the cache. Prints microseconds per call and billions of weight-activation products per second.
//! `TANDEM_VNNI=0` / `TANDEM_AVX512=0` pick the older kernels in the same binary.
//!
//! M=16 K=576 N=3072 cargo run --release -p tandem-engine --example q16_matmul
use std::time::Instant;

use tandem_engine::kernels::{BlockFormat, Weight, WeightData, matmul_rounded};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (m, k, n) = (env("M", 16), env("K", 576), env("N", 3072));
    let (copies, iters, threads) = (env("COPIES", 1).max(1), env("ITERS", 200), env("T", 2));
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let row_bytes = BlockFormat::Q4_1.row_bytes(k);
    let weights: Vec<Weight> = (0..copies)
        .map(|_| {
            // Each 20-byte block: scale and offset as f16 (small normal values), 16 bytes of nibbles.
            let bytes = (0..n * row_bytes)
                .map(|i| match i % 20 {
                    1 | 3 => 0x1c,
                    0 | 2 => 0,
                    _ => next() as u8,
                })
                .collect();
            Weight {
                n,
                k,
                data: WeightData::Quant {
                    format: BlockFormat::Q4_1,
                    bytes,
                },
            }
        })
        .collect();
    let x: Vec<f32> = (0..m * k)
        .map(|_| (next() % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let mut out = vec![0f32; m * n];
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    pool.install(|| {
        for round in 0..3 {
            let t = Instant::now();
            for i in 0..iters {
                matmul_rounded(&x, m, &weights[i % copies], &mut out);
            }
            let secs = t.elapsed().as_secs_f64() / iters.max(1) as f64;
            println!(
                "round {round}: {:.1} us per call, {:.1} G products/s (M={m} K={k} N={n}, {threads} threads)",
                secs * 1e6,
                (m * k * n) as f64 / secs / 1e9
            );
        }
    });
    std::hint::black_box(out);
    Ok(())
}
