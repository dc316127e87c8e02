//! The performance model's interface: what one engine step costs, how much KV a token takes and
//! what fits in memory. The router (TTFT prediction), the `sim` engine and the discrete-event
//! simulator all call it through `dyn PerfModel`, so it stays object-safe and synchronous.

use std::fmt;

/// One prompt's share of a prefill step: tokens computed now, after `cached` tokens whose KV is
/// already present (a prefix-cache hit, or the earlier chunks of a chunked prefill).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PrefillItem {
    pub new_tokens: u32,
    pub cached_tokens: u32,
}

impl PrefillItem {
    pub fn fresh(tokens: u32) -> Self {
        PrefillItem {
            new_tokens: tokens,
            cached_tokens: 0,
        }
    }
}

/// One forward pass of an instance: prompt chunks and decoding sequences batched together.
/// `decode_context` is the sum over decoding sequences of the tokens each attends to.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepShape<'a> {
    pub prefill: &'a [PrefillItem],
    pub decode_batch: u32,
    pub decode_context: u64,
}

/// What one instance (all its tensor-parallel GPUs together) holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemoryFit {
    pub gpus: u32,
    pub weight_bytes_per_gpu: f64,
    pub kv_bytes_per_gpu: f64,
    /// Paged KV capacity of the instance, in blocks of [`BLOCK_TOKENS`] tokens.
    pub kv_blocks: u64,
}

/// Tokens per KV block, as in the engines' paged pools.
pub const BLOCK_TOKENS: u32 = 16;

/// Blocks a sequence of `tokens` tokens occupies.
pub fn blocks_for(tokens: u64) -> u64 {
    tokens.div_ceil(u64::from(BLOCK_TOKENS))
}

/// A link KV travels over between a prefill and a decode instance.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Bytes per second in one direction.
    pub bytes_per_s: f64,
    /// Fixed cost per transfer, seconds.
    pub latency_s: f64,
}

impl Link {
    /// InfiniBand NDR, 400 Gb/s per port (one port per GPU on a DGX H100).
    pub fn infiniband_ndr() -> Self {
        Link {
            bytes_per_s: 50e9,
            latency_s: 5e-6,
        }
    }
}

/// Time and memory of one engine instance (a model on `tensor_parallel` GPUs). All times in seconds.
pub trait PerfModel: Send + Sync + fmt::Debug {
    /// A short description: model, hardware, parallelism, and where the numbers come from.
    fn describe(&self) -> String;

    /// GPUs in the instance.
    fn tensor_parallel(&self) -> u32;

    /// Duration of one forward pass.
    fn step_time(&self, step: &StepShape<'_>) -> f64;

    /// Bytes of K and V for one token, summed over layers and heads (the whole instance).
    fn kv_bytes_per_token(&self) -> u64;

    /// Weights and KV capacity.
    fn memory(&self) -> MemoryFit;

    /// A prefill step over these prompts.
    fn prefill_time(&self, prompts: &[PrefillItem]) -> f64 {
        self.step_time(&StepShape {
            prefill: prompts,
            decode_batch: 0,
            decode_context: 0,
        })
    }

    /// A decode step for `batch` sequences attending to `context_tokens` tokens in all.
    fn decode_step_time(&self, batch: u32, context_tokens: u64) -> f64 {
        self.step_time(&StepShape {
            prefill: &[],
            decode_batch: batch,
            decode_context: context_tokens,
        })
    }

    /// A decode step's time relative to [`Self::decode_step_time`], drawn from how the measured
    /// steps of `batch` sequences spread: `u`, uniform in [0, 1), picks the quantile. 1 (no spread)
    /// unless the model has measured one.
    fn decode_spread(&self, _batch: u32, _u: f64) -> f64 {
        1.0
    }

    /// A prefill step's time in a served disaggregated pair relative to [`Self::prefill_time`],
    /// with the decode worker beside it decoding (`beside_decode`) or idle, and the step started by
    /// a prompt arriving at an idle prefill worker (`after_idle`) or straight after the previous
    /// step. 1 unless the model has measured it (`tandem profile --served`).
    fn served_prefill_factor(&self, _beside_decode: bool, _after_idle: bool) -> f64 {
        1.0
    }

    /// Time to move the KV of `tokens` tokens over `link`.
    fn kv_transfer_time(&self, tokens: u64, link: &Link) -> f64 {
        link.latency_s + (tokens * self.kv_bytes_per_token()) as f64 / link.bytes_per_s
    }
}
