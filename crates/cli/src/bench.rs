use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tandem_bench::{BenchArgs, PromptTokenizer, run_bench};
use tandem_engine::tokenizer::Tokenizer;

#[derive(Args, Debug)]
pub struct BenchCmd {
    #[command(flatten)]
    args: BenchArgs,
    /// Model file (or checkpoint directory) whose tokenizer sizes prompts to exact token counts
    /// (default: the fetched SmolLM2 if present; without one, lengths count whitespace words).
    #[arg(long, env = "TANDEM_BENCH_TOKENIZER")]
    tokenizer: Option<PathBuf>,
}

/// Prompt lengths in the served model's own tokens: no special tokens added.
struct EngineTokenizer(Tokenizer);

impl PromptTokenizer for EngineTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = self.0.encode(text, false).unwrap_or_default();
        if self.0.add_bos() && ids.first().copied() == self.0.bos_token_id() {
            ids.remove(0);
        }
        ids
    }
    fn decode(&self, ids: &[u32]) -> String {
        self.0.decode(ids, false).unwrap_or_default()
    }
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    let path = cmd
        .tokenizer
        .or_else(|| Some(tandem_runtime::default_model_path()).filter(|p| p.exists()));
    let tokenizer: Option<Arc<dyn PromptTokenizer>> = match path {
        Some(p) => {
            let t = tandem_engine::load_tokenizer(&p)
                .with_context(|| format!("loading the tokenizer of {}", p.display()))?;
            Some(Arc::new(EngineTokenizer(t)))
        }
        None => None,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(run_bench(cmd.args, tokenizer))?;
    println!("{report}");
    Ok(())
}
