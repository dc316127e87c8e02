use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tandem_bench::{BenchArgs, PromptTokenizer, run_bench};
use tandem_engine::tokenizer::{IncrementalDecoder, Tokenizer};

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
    /// One encoding of the whole text; each token counts for the piece in which the text it
    /// decodes to ends (a token split across pieces counts once, where it became whole).
    fn count_pieces(&self, text: &str, ends: &[usize]) -> Vec<u32> {
        let mut counts = vec![0u32; ends.len()];
        let mut decoder = IncrementalDecoder::new(self.0.clone(), false);
        let mut out = String::with_capacity(text.len() + 8);
        let mut piece = 0;
        for id in self.encode(text) {
            if decoder.push_into(id, &mut out).is_err() {
                continue;
            }
            while piece + 1 < ends.len() && ends[piece] < out.len() {
                piece += 1;
            }
            if let Some(c) = counts.get_mut(piece) {
                *c += 1;
            }
        }
        counts
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_count_the_tokens_of_the_whole_text() {
        let path = tandem_engine::testing::require_model_path();
        let t = EngineTokenizer(tandem_engine::load_tokenizer(&path).expect("tokenizer loads"));
        let text = "The quick brown fox jumps over the lazy dog, naïvely: 東京 🙂!";
        let ids = t.encode(text);
        // Streamed as the gateway streams it: the text each token completes, one piece per token.
        let mut decoder = IncrementalDecoder::new(t.0.clone(), false);
        let mut out = String::new();
        let mut ends = Vec::new();
        for &id in &ids {
            decoder.push_into(id, &mut out).expect("in vocabulary");
            if ends.last() != Some(&out.len()) {
                ends.push(out.len());
            }
        }
        assert_eq!(out, text);
        let counts = t.count_pieces(&out, &ends);
        assert_eq!(counts.len(), ends.len());
        assert_eq!(counts.iter().sum::<u32>() as usize, ids.len());
        assert!(counts.iter().all(|&k| k >= 1), "{counts:?}");
        // Two pieces: every token counts in exactly one of them.
        let mid = text.find(" lazy").expect("present");
        let two = t.count_pieces(text, &[mid, text.len()]);
        assert_eq!(two.iter().sum::<u32>() as usize, ids.len());
        assert_eq!(two[0] as usize, t.encode(&text[..mid]).len());
    }
}
