//! A performance model written by hand: fixed and per-unit step costs. What the tests of the
//! simulator, of admission and of the router predict with, so that their expected figures can be
//! worked out on paper; also a quick what-if model.

use crate::perf::{MemoryFit, PerfModel, StepShape};

/// A step with prompt tokens costs `prefill_step` plus `per_prompt_token` each; a step with
/// decoding sequences costs `decode_step` plus `per_sequence` and `per_context_token` each; a mixed
/// step costs both. Seconds. KV holds `kv_blocks` blocks of one byte per token.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LinearModel {
    pub prefill_step: f64,
    pub per_prompt_token: f64,
    pub decode_step: f64,
    pub per_sequence: f64,
    pub per_context_token: f64,
    pub kv_blocks: u64,
}

impl PerfModel for LinearModel {
    fn describe(&self) -> String {
        format!(
            "linear: prefill {} s + {} s/token, decode {} s + {} s/sequence + {} s/context token",
            self.prefill_step,
            self.per_prompt_token,
            self.decode_step,
            self.per_sequence,
            self.per_context_token
        )
    }

    fn tensor_parallel(&self) -> u32 {
        1
    }

    fn step_time(&self, s: &StepShape<'_>) -> f64 {
        let tokens: u32 = s.prefill.iter().map(|c| c.new_tokens).sum();
        let prefill = if tokens > 0 {
            self.prefill_step + self.per_prompt_token * f64::from(tokens)
        } else {
            0.0
        };
        let decode = if s.decode_batch > 0 {
            self.decode_step
                + self.per_sequence * f64::from(s.decode_batch)
                + self.per_context_token * s.decode_context as f64
        } else {
            0.0
        };
        prefill + decode
    }

    fn kv_bytes_per_token(&self) -> u64 {
        1
    }

    fn memory(&self) -> MemoryFit {
        MemoryFit {
            gpus: 1,
            weight_bytes_per_gpu: 0.0,
            kv_bytes_per_gpu: 0.0,
            kv_blocks: self.kv_blocks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::PrefillItem;

    #[test]
    fn a_mixed_step_costs_both_parts() {
        let m = LinearModel {
            prefill_step: 1e-3,
            per_prompt_token: 1e-4,
            decode_step: 2e-3,
            per_sequence: 1e-3,
            per_context_token: 1e-6,
            kv_blocks: 8,
        };
        let chunks = [PrefillItem::fresh(60), PrefillItem::fresh(40)];
        let t = m.step_time(&StepShape {
            prefill: &chunks,
            decode_batch: 3,
            decode_context: 1000,
        });
        assert!((t - (0.011 + 0.006)).abs() < 1e-12, "{t}");
        assert_eq!(m.step_time(&StepShape::default()), 0.0);
        assert_eq!(m.memory().kv_blocks, 8);
    }
}
