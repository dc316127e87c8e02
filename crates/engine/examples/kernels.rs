//! Matmul kernel throughput on the shapes of SmolLM2 (GFLOP/s): f32 weights, Q4_1 weights computed
//! exactly (prompt tokens) and Q4_1 on 16-bit rounded activations (`q4_1r`, generated tokens).
//! `M=rows` picks one batch size, `W=f32|q4_1|q4_1r` one kind, `REPS=n` the repetitions, `N` and
//! `K` the shape (default 1536 x 576, the MLP's gate).
use std::time::Instant;

use tandem_engine::kernels::{Weight, matmul, matmul_rounded};
use tandem_engine::tiny::quantize_q4_1;

fn main() {
    let env = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
    };
    let (n, k) = (env("N").unwrap_or(1536), env("K").unwrap_or(576));
    let w: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let f = Weight::f32(n, k, w.clone());
    let q = quantize_q4_1(&w, n, k);
    let (only, reps_env) = (env("M"), env("REPS"));
    for m in [1usize, 4, 16, 200] {
        if only.is_some_and(|o| o != m) {
            continue;
        }
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 13) % 97) as f32 / 97.0).collect();
        let mut out = vec![0f32; m * n];
        type Mm = fn(&[f32], usize, &Weight, &mut [f32]);
        let kinds: [(&str, &Weight, Mm); 3] = [
            ("f32", &f, matmul),
            ("q4_1", &q, matmul),
            ("q4_1r", &q, matmul_rounded),
        ];
        for (name, wt, mm) in kinds {
            if std::env::var("W").is_ok_and(|w| w != name) {
                continue;
            }
            let reps = reps_env.unwrap_or((2000 / m).max(5));
            mm(&x, m, wt, &mut out);
            let t = Instant::now();
            for _ in 0..reps {
                mm(&x, m, wt, &mut out);
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "m={m:4} {name:6} {:8.1} us  {:6.1} GFLOP/s",
                dt * 1e6,
                2.0 * (m * n * k) as f64 / dt / 1e9
            );
        }
    }
}
