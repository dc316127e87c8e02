//! `--engine native|sim` and the simulated model's flags, shared by the workers and `tandem up`.
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, ValueEnum};
use tandem_sim::engine::{SimEngine, SimSpec};

/// Which engine a worker runs.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// The model file's weights, computed on this machine's CPU.
    Native,
    /// Compute replaced by the performance model's time for --sim-model on --tp x --sim-gpu.
    Sim,
}

/// The engine and, for `sim`, what it simulates.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Engine: `native` (real model) or `sim` (simulated model, GPU and tensor parallelism: the
    /// same services, batchers and KV bookkeeping, with compute replaced by the model's time).
    #[arg(long, env = "TANDEM_ENGINE", value_enum, default_value = "native")]
    pub engine: EngineKind,
    /// Simulated model, by catalogue name (llama-2-70b, llama-3-8b, gpt-43b, ...); needed with
    /// --engine sim.
    #[arg(long, env = "TANDEM_SIM_MODEL")]
    pub sim_model: Option<String>,
    /// Simulated GPU, by catalogue name (h100, h200, a100-80gb, l40s).
    #[arg(long, env = "TANDEM_SIM_GPU", default_value = "h100")]
    pub sim_gpu: String,
    /// GPUs of each simulated worker (tensor parallelism).
    #[arg(long, env = "TANDEM_TP", default_value_t = 1)]
    pub tp: u32,
    /// Multiplies every simulated duration (1: the simulated GPUs' speed; 0: steps take no time,
    /// which leaves the control plane's own overhead).
    #[arg(long, env = "TANDEM_SIM_TIME_SCALE", default_value_t = 1.0)]
    pub sim_time_scale: f64,
    /// A JSON catalogue that adds to or overrides the built-in models and GPUs.
    #[arg(long, env = "TANDEM_SIM_CATALOG")]
    pub sim_catalog: Option<PathBuf>,
    /// A profile written by `tandem profile`: its fitted step times instead of the roofline's.
    #[arg(long, env = "TANDEM_SIM_PROFILE")]
    pub sim_profile: Option<PathBuf>,
}

impl EngineArgs {
    pub fn is_sim(&self) -> bool {
        self.engine == EngineKind::Sim
    }

    /// The simulated model for `--engine sim`, with `vocab` token ids (the serving tokenizer's).
    pub fn build_sim(&self, vocab: Option<usize>) -> anyhow::Result<SimEngine> {
        let model = self
            .sim_model
            .as_deref()
            .context("--engine sim needs --sim-model (llama-2-70b, llama-3-8b, gpt-43b, ...)")?;
        let spec = SimSpec {
            model,
            gpu: &self.sim_gpu,
            tp: self.tp,
            time_scale: self.sim_time_scale,
            vocab,
            catalog: self.sim_catalog.as_deref(),
            profile: self.sim_profile.as_deref(),
        };
        Ok(tandem_sim::engine::build(&spec)?)
    }

    /// The same flags for a child process.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = Vec::new();
        let engine = match self.engine {
            EngineKind::Native => "native",
            EngineKind::Sim => "sim",
        };
        out.extend(["--engine".into(), engine.into()]);
        if let Some(m) = &self.sim_model {
            out.extend(["--sim-model".into(), m.into()]);
        }
        out.extend(["--sim-gpu".into(), self.sim_gpu.clone().into()]);
        out.extend(["--tp".into(), self.tp.to_string().into()]);
        out.extend([
            "--sim-time-scale".into(),
            self.sim_time_scale.to_string().into(),
        ]);
        let paths = [
            ("--sim-catalog", &self.sim_catalog),
            ("--sim-profile", &self.sim_profile),
        ];
        for (flag, path) in paths {
            if let Some(p) = path {
                out.extend([flag.into(), p.clone().into_os_string()]);
            }
        }
        out
    }
}

/// The serving tokenizer's vocabulary size and end-of-sequence ids, when its file is there: a
/// simulated model produces ids of that vocabulary so that the gateway can detokenize them.
pub fn tokenizer_facts(path: &Path) -> anyhow::Result<Option<(usize, Vec<u32>)>> {
    if !path.exists() {
        return Ok(None);
    }
    let t = tandem_engine::load_tokenizer(path)
        .with_context(|| format!("reading the tokenizer of {}", path.display()))?;
    Ok(Some((t.vocab_size(), t.eos_token_ids().to_vec())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        engine: EngineArgs,
    }

    #[test]
    fn flags_pass_to_children_unchanged() {
        let cli = Cli::try_parse_from([
            "t",
            "--engine",
            "sim",
            "--sim-model",
            "llama-2-70b",
            "--tp",
            "4",
            "--sim-time-scale",
            "0.25",
            "--sim-catalog",
            "/x/c.json",
        ])
        .unwrap();
        let mut again = vec![OsString::from("t")];
        again.extend(cli.engine.to_args());
        let back = Cli::try_parse_from(again).unwrap();
        assert_eq!(format!("{:?}", back.engine), format!("{:?}", cli.engine));
        assert!(back.engine.is_sim());
        assert_eq!(back.engine.sim_time_scale, 0.25);
        let sim = back.engine.build_sim(Some(49152));
        assert!(sim.is_err(), "the catalogue file does not exist");
    }

    #[test]
    fn sim_needs_a_model_name() {
        let cli = Cli::try_parse_from(["t", "--engine", "sim"]).unwrap();
        let e = cli.engine.build_sim(None).unwrap_err().to_string();
        assert!(e.contains("--sim-model"), "{e}");
        let cli =
            Cli::try_parse_from(["t", "--engine", "sim", "--sim-model", "llama-2-7b"]).unwrap();
        let e = cli.engine.build_sim(None).unwrap();
        assert_eq!(e.model.config().layers, 32);
    }
}
