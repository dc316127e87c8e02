//! The `sim` engine's glue (cargo feature `engine`): the performance model as the engine's
//! [`StepClock`], and the simulated model and pool size for a catalogue model on `tp` GPUs.
//!
//! A worker running `--engine sim` builds its `tandem_engine::Model` here: its steps take the time
//! the roofline (or a measured profile) gives for the simulated model, GPUs and parallelism, and its
//! pool has as many 16-token blocks as the simulated GPUs' memory holds, each scaled down (see
//! `tandem_engine::SimModel` for what is simulated, what is real and what is not modelled).
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tandem_engine::{Model, SimConfig, StepClock};

use crate::catalog::Catalog;
use crate::error::SimError;
use crate::perf::{PerfModel, PrefillItem, StepShape};
use crate::profile::Profiled;
use crate::roofline::{Efficiency, Roofline};

/// A performance model's step time, multiplied by a time scale, as the engine's clock.
#[derive(Debug, Clone)]
pub struct PerfClock {
    perf: Arc<dyn PerfModel>,
    scale: f64,
}

impl PerfClock {
    /// `scale` multiplies every duration (0: steps take no time; 0.01: a hundred times faster).
    pub fn new(perf: Arc<dyn PerfModel>, scale: f64) -> Result<Self, SimError> {
        if !scale.is_finite() || scale < 0.0 {
            return Err(SimError::invalid(format!(
                "time scale {scale} must be a finite number of at least 0"
            )));
        }
        Ok(PerfClock { perf, scale })
    }
}

fn tokens(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl StepClock for PerfClock {
    fn step_time(
        &self,
        prefill: &[(usize, usize)],
        decode_batch: usize,
        decode_context: usize,
    ) -> Duration {
        let items: Vec<PrefillItem> = prefill
            .iter()
            .map(|&(cached, new)| PrefillItem {
                new_tokens: tokens(new),
                cached_tokens: tokens(cached),
            })
            .collect();
        let secs = self.perf.step_time(&StepShape {
            prefill: &items,
            decode_batch: tokens(decode_batch),
            decode_context: decode_context as u64,
        }) * self.scale;
        // A model that answers nonsense (NaN, negative) costs nothing rather than panicking.
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::ZERO)
    }
}

/// What `--engine sim` simulates.
#[derive(Debug, Clone)]
pub struct SimSpec<'a> {
    /// Catalogue model name (llama-2-70b, ...).
    pub model: &'a str,
    /// Catalogue GPU name (h100, ...).
    pub gpu: &'a str,
    /// GPUs of one instance (tensor parallelism).
    pub tp: u32,
    /// Multiplies every simulated duration.
    pub time_scale: f64,
    /// Token ids the model produces: the serving tokenizer's vocabulary (default: the catalogue's).
    pub vocab: Option<usize>,
    /// A JSON catalogue that adds to or overrides the built-in models and GPUs.
    pub catalog: Option<&'a Path>,
    /// A profile written by `tandem profile`: its fitted times instead of the roofline's.
    pub profile: Option<&'a Path>,
}

/// A simulated model and the pool size that goes with it.
#[derive(Debug)]
pub struct SimEngine {
    pub model: Model,
    /// KV capacity of the simulated instance, in 16-token blocks: the pool's size.
    pub kv_blocks: usize,
    /// One line for the log: the model, its time source, capacity and the KV scale factor.
    pub summary: String,
    /// The step times the model simulates, before the time scale.
    pub perf: Arc<dyn PerfModel>,
}

/// Builds the simulated model for `spec`: its clock, its KV geometry and its pool size.
pub fn build(spec: &SimSpec<'_>) -> Result<SimEngine, SimError> {
    let cat = Catalog::with_user_file(spec.catalog)?;
    let m = cat.model(spec.model)?;
    let gpu = cat.gpu(spec.gpu)?;
    // The roofline also checks that tp is valid and the weights leave room for KV.
    let roofline = Roofline::new(m, gpu, spec.tp, Efficiency::CALIBRATED)?;
    let capacity = roofline.memory().kv_blocks;
    let perf: Arc<dyn PerfModel> = match spec.profile {
        None => Arc::new(roofline),
        Some(path) => {
            let p = Profiled::from_file(path)?;
            if p.tensor_parallel() != spec.tp {
                return Err(SimError::invalid(format!(
                    "the profile {} was taken at tp={}, not tp={}",
                    path.display(),
                    p.tensor_parallel(),
                    spec.tp
                )));
            }
            Arc::new(p)
        }
    };
    let kv_blocks = usize::try_from(capacity)
        .map_err(|_| SimError::invalid(format!("{capacity} KV blocks do not fit in memory")))?;
    let sim = SimConfig {
        name: m.name.clone(),
        layers: m.layers as usize,
        vocab: spec.vocab.unwrap_or(m.vocab as usize),
        max_context: m.max_context as usize,
        simulated_kv_bytes_per_token: m.kv_bytes_per_token(),
    };
    let clock = PerfClock::new(perf.clone(), spec.time_scale)?;
    let model = Model::simulated(sim, Arc::new(clock))
        .map_err(|e| SimError::invalid(format!("simulated model {}: {e}", m.name)))?;
    let scale = model.sim().map_or(1.0, |s| s.kv_scale());
    let summary = format!(
        "sim engine: {}; KV capacity {kv_blocks} blocks of 16 tokens; KV bytes scaled down {scale:.0}x \
         ({} simulated bytes per token carried as {}); time scale {}",
        perf.describe(),
        m.kv_bytes_per_token(),
        model.config().kv_bytes_per_token(),
        spec.time_scale
    );
    Ok(SimEngine {
        model,
        kv_blocks,
        summary,
        perf,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(model: &str, tp: u32) -> SimSpec<'_> {
        SimSpec {
            model,
            gpu: "h100",
            tp,
            time_scale: 1.0,
            vocab: None,
            catalog: None,
            profile: None,
        }
    }

    #[test]
    fn llama_2_70b_on_four_h100s() {
        let e = build(&spec("llama-2-70b", 4)).unwrap();
        let cat = Catalog::builtin().unwrap();
        let r = Roofline::new(
            cat.model("llama-2-70b").unwrap(),
            cat.gpu("h100").unwrap(),
            4,
            Efficiency::CALIBRATED,
        )
        .unwrap();
        assert_eq!(e.kv_blocks as u64, r.memory().kv_blocks);
        let c = e.model.config();
        assert_eq!((c.layers, c.vocab, c.max_context), (80, 32000, 4096));
        assert_eq!(e.model.engine_name(), "sim");
        // 327,680 bytes per token carried as 80 layers x K and V x 2 floats x 4 bytes.
        assert_eq!(c.kv_bytes_per_token(), 1280);
        assert_eq!(e.model.sim().unwrap().kv_scale(), 256.0);
        assert!(e.summary.contains("scaled down 256x"), "{}", e.summary);
        let with_vocab = build(&SimSpec {
            vocab: Some(49152),
            ..spec("llama-2-70b", 4)
        })
        .unwrap();
        assert_eq!(with_vocab.model.config().vocab, 49152);
    }

    #[test]
    fn the_clock_is_the_models_time_scaled() {
        let cat = Catalog::builtin().unwrap();
        let r: Arc<dyn PerfModel> = Arc::new(
            Roofline::new(
                cat.model("llama-2-70b").unwrap(),
                cat.gpu("h100").unwrap(),
                4,
                Efficiency::CALIBRATED,
            )
            .unwrap(),
        );
        let items = [PrefillItem {
            new_tokens: 100,
            cached_tokens: 28,
        }];
        let want = r.step_time(&StepShape {
            prefill: &items,
            decode_batch: 3,
            decode_context: 900,
        });
        let full = PerfClock::new(r.clone(), 1.0).unwrap();
        let tenth = PerfClock::new(r.clone(), 0.1).unwrap();
        let zero = PerfClock::new(r.clone(), 0.0).unwrap();
        assert_eq!(
            full.step_time(&[(28, 100)], 3, 900),
            Duration::from_secs_f64(want)
        );
        assert_eq!(
            tenth.step_time(&[(28, 100)], 3, 900),
            Duration::from_secs_f64(want * 0.1)
        );
        assert_eq!(zero.step_time(&[(28, 100)], 3, 900), Duration::ZERO);
        // A decode step of a 70B model on four H100s is tens of milliseconds, not zero.
        assert!(full.step_time(&[], 64, 64 * 600) > Duration::from_millis(10));
        assert!(PerfClock::new(r.clone(), -1.0).is_err());
        assert!(PerfClock::new(r, f64::NAN).is_err());
    }

    #[test]
    fn bad_names_and_shapes_are_clear_errors() {
        let e = build(&spec("llama-9-1t", 4)).unwrap_err().to_string();
        assert!(e.contains("unknown model"), "{e}");
        let e = build(&SimSpec {
            gpu: "tpu",
            ..spec("llama-2-70b", 4)
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown GPU"), "{e}");
        // 138 GB of weights do not fit one 80 GB GPU.
        let e = build(&spec("llama-2-70b", 1)).unwrap_err();
        assert!(matches!(e, SimError::DoesNotFit { .. }), "{e}");
        let e = build(&spec("llama-2-70b", 3)).unwrap_err().to_string();
        assert!(e.contains("power of two"), "{e}");
    }
}
