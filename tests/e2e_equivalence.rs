//! Greedy output through `tandem up` equals `tandem generate`, token for token: 8 prompts (short,
//! long and chunked, chat, multi-turn), with 1P+1D and 2P+2D, over tcp and over shm, and with two
//! aggregated workers (chunked prefill inside the continuous batch, no KV transfer).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::{Arc, OnceLock};

use serde_json::{Value, json};
use support::{Up, chat, generate, ids, post};
use tandem_engine::tokenizer::ChatMessage;
use tandem_engine::{Engine, SamplingParams};

const MAX_TOKENS: u32 = 24;

/// A prompt of several hundred tokens: chunked by the 64-token prefill steps the clusters use.
fn long_text() -> String {
    let para = "Tandem splits inference into two phases. Prefill workers compute the prompt's \
                key-value cache, which is compute-bound work, and stream its blocks to decode \
                workers, which generate the answer one token at a time and are bound by memory \
                bandwidth. ";
    para.repeat(8)
}

enum Case {
    /// `/v1/completions` with this prompt; reference: `tandem generate --prompt`.
    Completion(String),
    /// `/v1/chat/completions` with one user message; reference: `tandem generate --chat`.
    Chat(String),
    /// A multi-turn conversation; reference: the same engine in this process.
    Conversation(Vec<(&'static str, &'static str)>),
}

fn cases() -> Vec<Case> {
    vec![
        Case::Completion("The capital of France is".into()),
        Case::Completion("1, 2, 3, 4,".into()),
        Case::Completion(long_text()),
        Case::Chat("What is the capital of France?".into()),
        Case::Chat("Write a haiku about the sea.".into()),
        Case::Chat("Translate 'good morning' into French and Japanese: ".into()),
        Case::Chat(format!("Summarise this in one sentence: {}", long_text())),
        Case::Conversation(vec![
            ("system", "You are a concise assistant."),
            ("user", "Name a primary colour."),
            ("assistant", "Red."),
            ("user", "Name another one, and say why."),
        ]),
    ]
}

/// Reference token ids per case, computed once for every cluster shape.
fn references() -> &'static Vec<(Vec<u32>, Vec<u32>)> {
    static REFS: OnceLock<Vec<(Vec<u32>, Vec<u32>)>> = OnceLock::new();
    REFS.get_or_init(|| {
        cases()
            .iter()
            .map(|c| match c {
                Case::Completion(p) => generate(p, false, MAX_TOKENS),
                Case::Chat(p) => generate(p, true, MAX_TOKENS),
                Case::Conversation(turns) => in_process(turns),
            })
            .collect()
    })
}

/// The single-process run for a conversation `tandem generate` cannot express.
fn in_process(turns: &[(&str, &str)]) -> (Vec<u32>, Vec<u32>) {
    let loaded = tandem_engine::load(&support::model_path()).unwrap();
    let tok = loaded.tokenizer;
    let msgs: Vec<ChatMessage> = turns
        .iter()
        .map(|(r, c)| ChatMessage::new(*r, *c))
        .collect();
    let prompt = tok
        .encode(&tok.chat_template().render(&msgs, true).unwrap(), true)
        .unwrap();
    let mut engine = Engine::new(Arc::new(loaded.model), 64);
    let out = tandem_engine::generate(
        &mut engine,
        1,
        &prompt,
        &SamplingParams::greedy(MAX_TOKENS),
        tok.eos_token_ids(),
        512,
        |_| tandem_engine::Flow::Continue,
    )
    .unwrap();
    (prompt, out.tokens)
}

async fn ask(up: &Up, case: &Case) -> (Vec<u32>, Vec<u32>) {
    let (path, body) = match case {
        Case::Completion(p) => (
            "/v1/completions",
            json!({"model": up.model, "prompt": p, "max_tokens": MAX_TOKENS,
                   "temperature": 0, "return_token_ids": true}),
        ),
        Case::Chat(p) => (
            "/v1/chat/completions",
            chat(
                &up.model,
                json!([{"role": "user", "content": p}]),
                MAX_TOKENS,
            ),
        ),
        Case::Conversation(turns) => {
            let msgs: Vec<Value> = turns
                .iter()
                .map(|(r, c)| json!({"role": r, "content": c}))
                .collect();
            (
                "/v1/chat/completions",
                chat(&up.model, json!(msgs), MAX_TOKENS),
            )
        }
    };
    let (status, v) = post(&up.url, path, &body).await;
    assert_eq!(status, 200, "{v}");
    (
        ids(&v["prompt_token_ids"]),
        ids(&v["choices"][0]["token_ids"]),
    )
}

async fn check(extra: &[&str]) {
    let refs = references();
    // Pool files on disk: CI containers often have a /dev/shm too small for the pool.
    let dir = std::env::temp_dir();
    let mut args = extra.to_vec();
    args.extend(["--shm-dir", dir.to_str().unwrap()]);
    // 256 MiB of KV per worker holds these prompts; the shm pool files are written out whole.
    let up = Arc::new(Up::start_with_env(&args, &[("TANDEM_KV_MEMORY_MB", "256")]));
    // All at once, so that the workers batch them and a 2P+2D cluster spreads them.
    let mut tasks = Vec::new();
    for (i, case) in cases().into_iter().enumerate() {
        let up = up.clone();
        tasks.push(tokio::spawn(async move { (i, ask(&up, &case).await) }));
    }
    for t in tasks {
        let (i, got) = t.await.unwrap();
        assert_eq!(got, refs[i], "case {i} with {extra:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_prefill_one_decode_over_tcp() {
    check(&[
        "--prefill",
        "1",
        "--decode",
        "1",
        "--transport",
        "tcp",
        "--step-tokens",
        "64",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_prefill_one_decode_over_shm() {
    check(&[
        "--prefill",
        "1",
        "--decode",
        "1",
        "--transport",
        "shm",
        "--step-tokens",
        "64",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefill_two_decode_over_tcp() {
    check(&[
        "--prefill",
        "2",
        "--decode",
        "2",
        "--transport",
        "tcp",
        "--step-tokens",
        "64",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefill_two_decode_over_shm() {
    check(&[
        "--prefill",
        "2",
        "--decode",
        "2",
        "--transport",
        "shm",
        "--step-tokens",
        "64",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_aggregated_workers() {
    check(&[
        "--prefill",
        "0",
        "--decode",
        "0",
        "--aggregated",
        "2",
        "--step-tokens",
        "64",
    ])
    .await;
}
