//! Our tokenizer and chat template against fixtures made by an independent implementation
//! (llama.cpp's tokenizer, Python jinja2; see scripts/fixtures/make_fixtures.py).

use candle_core::quantized::gguf_file;
use serde::Deserialize;
use std::path::PathBuf;
use tandem_engine::tokenizer::{ChatMessage, Tokenizer};

#[derive(Deserialize)]
struct Fixture {
    model: ModelInfo,
    tokenization: Vec<TokenCase>,
    generation: Vec<GenerationCase>,
}

#[derive(Deserialize)]
struct ModelInfo {
    file: String,
    size_bytes: u64,
}

#[derive(Deserialize)]
struct TokenCase {
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct GenerationCase {
    name: String,
    kind: String,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    prompt_text: String,
    prompt_ids: Vec<u32>,
}

fn fixture() -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/smollm2_q4_1.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The real model's tokenizer, after checking the fixture was made from the same file.
fn tokenizer(fx: &Fixture) -> Tokenizer {
    let path = tandem_engine::testing::require_model_path();
    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        size,
        fx.model.size_bytes,
        "{} is not the file the fixtures were made from ({})",
        path.display(),
        fx.model.file
    );
    let mut file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let content =
        gguf_file::Content::read(&mut file).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tokenizer::from_gguf(&content.metadata).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn tokenization_matches_llama_cpp() {
    let fx = fixture();
    let tok = tokenizer(&fx);
    assert!(fx.tokenization.len() >= 20, "too few tokenization cases");
    let mut failures = Vec::new();
    for case in &fx.tokenization {
        let ids = tok.encode(&case.text, case.parse_special).unwrap();
        if ids != case.ids {
            failures.push(format!(
                "{:?} (special {}): ours {ids:?}, llama.cpp {:?}",
                case.text, case.parse_special, case.ids
            ));
        }
        let back = tok.decode(&case.ids, false).unwrap();
        if back != case.text {
            failures.push(format!("{:?} decodes back as {back:?}", case.text));
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn prompts_render_and_encode_like_the_reference() {
    let fx = fixture();
    let tok = tokenizer(&fx);
    assert_eq!(fx.generation.len(), 8);
    let mut chats = 0;
    for case in &fx.generation {
        let ids = match case.kind.as_str() {
            "chat" => {
                chats += 1;
                let text = tok.chat_template().render(&case.messages, true).unwrap();
                assert_eq!(
                    text, case.prompt_text,
                    "{}: rendered chat prompt",
                    case.name
                );
                tok.encode(&text, true).unwrap()
            }
            "text" => tok.encode(&case.prompt_text, false).unwrap(),
            other => panic!("{}: unknown kind {other}", case.name),
        };
        assert_eq!(ids, case.prompt_ids, "{}: prompt ids", case.name);
    }
    assert_eq!(chats, 2, "the fixtures hold two chat prompts");
}
