use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use tandem_engine::sampling::StopStrings;
use tandem_engine::tokenizer::{ChatMessage, IncrementalDecoder};
use tandem_engine::{Engine, Flow, SamplingParams, generate};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Model: a GGUF file or a safetensors checkpoint directory (default: the fetched SmolLM2).
    #[arg(long, env = "TANDEM_MODEL")]
    model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
    /// A system message to put before the prompt (with --chat).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed for sampling: the same seed gives the same output.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when this text appears (repeatable); the stop text is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Most prompt tokens per prefill step (longer prompts are chunked).
    #[arg(long, env = "TANDEM_PREFILL_CHUNK", default_value_t = 512)]
    prefill_chunk: usize,
    /// Compute threads (default: all cores).
    #[arg(long, env = "TANDEM_THREADS")]
    threads: Option<usize>,
    /// Print one JSON object (token ids, text, finish reason, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    crate::setup::compute_threads(args.threads)?;
    let (_, loaded) = crate::setup::load_model(args.model.as_ref())?;
    let tok = loaded.tokenizer;
    let text = if args.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        });
        tok.chat_template().render(&msgs, true)?
    } else {
        args.prompt.clone()
    };
    let prompt = tok.encode(&text, true)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop_token_ids: Vec::new(),
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
    };
    let model = Arc::new(loaded.model);
    let ctx = model.config().max_context;
    let blocks = (prompt.len() + args.max_tokens as usize + 1)
        .min(ctx)
        .div_ceil(tandem_engine::kv::BLOCK_SIZE);
    let mut engine = Engine::new(model, blocks);
    let mut detok = IncrementalDecoder::new(tok.clone(), true);
    let mut stops = StopStrings::new(args.stop.clone());
    let mut shown = String::new();
    let mut stdout = std::io::stdout().lock();
    let mut failed = None;
    let out = generate(
        &mut engine,
        1,
        &prompt,
        &params,
        tok.eos_token_ids(),
        args.prefill_chunk,
        |t| {
            let piece = match detok.push(t) {
                Ok(p) => p,
                Err(e) => {
                    failed = Some(e);
                    return Flow::Stop;
                }
            };
            let (emit, stopped) = stops.push(&piece);
            shown.push_str(&emit);
            if !args.json {
                let _ = stdout.write_all(emit.as_bytes());
                let _ = stdout.flush();
            }
            if stopped { Flow::Stop } else { Flow::Continue }
        },
    )?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    if out.finish != tandem_engine::FinishReason::Stop || args.stop.is_empty() {
        let (rest, _) = stops.push(&detok.finish()?);
        shown.push_str(&rest);
        shown.push_str(&stops.flush());
        if !args.json {
            let _ = stdout.write_all(rest.as_bytes());
        }
    }
    let prefill_tps = out.prompt_tokens as f64 / out.prefill_time.as_secs_f64().max(1e-9);
    let decode_n = out.tokens.len().saturating_sub(1);
    let decode_tps = decode_n as f64 / out.decode_time.as_secs_f64().max(1e-9);
    if args.json {
        let v = serde_json::json!({
            "prompt_ids": prompt,
            "tokens": out.tokens,
            "text": shown,
            "finish_reason": out.finish,
            "prompt_tokens": out.prompt_tokens,
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode_tps,
        });
        writeln!(stdout, "{v}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "prefill: {} tokens in {:.3}s ({prefill_tps:.1} tokens/s); decode: {decode_n} tokens in {:.3}s ({decode_tps:.1} tokens/s); finish: {:?}",
            out.prompt_tokens,
            out.prefill_time.as_secs_f64(),
            out.decode_time.as_secs_f64(),
            out.finish
        );
    }
    Ok(())
}
