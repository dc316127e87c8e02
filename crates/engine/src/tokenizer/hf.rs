//! The tokenizer of a safetensors checkpoint: Hugging Face `tokenizer.json`, with the chat
//! template and special-token names from `tokenizer_config.json`.

use super::bytes::{ByteLevelMap, sentencepiece_bytes};
use super::{Parts, Tokenizer};
use crate::error::{EngineError, Result};
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

fn read_json(path: &Path) -> Result<Json> {
    if !path.exists() {
        return Err(EngineError::MissingFile(path.to_path_buf()));
    }
    let text = std::fs::read_to_string(path).map_err(|source| EngineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| EngineError::InvalidModel {
        path: path.to_path_buf(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// How the decoder of a `tokenizer.json` turns pieces back into bytes.
#[derive(Debug, PartialEq)]
enum PieceStyle {
    ByteLevel,
    /// `▁` for spaces and `<0xAB>` byte fallback; `strip` drops the first leading space.
    SentencePiece {
        strip: bool,
    },
}

fn piece_style(decoder: &Json, path: &Path) -> Result<PieceStyle> {
    let kind = decoder.get("type").and_then(Json::as_str).unwrap_or("");
    let parts: Vec<&Json> = match kind {
        "Sequence" => decoder
            .get("decoders")
            .and_then(Json::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => vec![decoder],
    };
    let kinds: Vec<&str> = parts
        .iter()
        .map(|d| d.get("type").and_then(Json::as_str).unwrap_or(""))
        .collect();
    if kinds.contains(&"ByteLevel") {
        return Ok(PieceStyle::ByteLevel);
    }
    let replaces_mark = parts.iter().any(|d| {
        d.get("type").and_then(Json::as_str) == Some("Replace")
            && d.pointer("/pattern/String").and_then(Json::as_str) == Some("\u{2581}")
    });
    if kinds.contains(&"Metaspace") || replaces_mark {
        let strip = kinds.contains(&"Strip")
            || parts.iter().any(|d| {
                d.get("type").and_then(Json::as_str) == Some("Metaspace")
                    && d.get("prepend_scheme").and_then(Json::as_str) != Some("never")
            });
        return Ok(PieceStyle::SentencePiece { strip });
    }
    Err(EngineError::Tokenizer(format!(
        "{}: decoder {kinds:?} is not supported (ByteLevel or SentencePiece-style)",
        path.display()
    )))
}

/// A token named in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_name(config: &Json, key: &str) -> Option<String> {
    match config.get(key)? {
        Json::String(s) => Some(s.clone()),
        other => other
            .get("content")
            .and_then(Json::as_str)
            .map(str::to_owned),
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which `default` is the one.
fn chat_template(config: &Json) -> Option<String> {
    match config.get("chat_template")? {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(Json::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`; `tokenizer_config.json`, when given, supplies the
    /// chat template, `bos_token`, `eos_token` and `add_bos_token`. Without `add_bos_token` the
    /// BOS rule is read from the `tokenizer.json` post-processor (whether it prepends BOS).
    pub fn from_files(
        tokenizer_json: &Path,
        tokenizer_config_json: Option<&Path>,
    ) -> Result<Tokenizer> {
        let json = read_json(tokenizer_json)?;
        let config = match tokenizer_config_json {
            Some(p) => read_json(p)?,
            None => Json::Null,
        };
        let bad = |reason: String| EngineError::InvalidModel {
            path: PathBuf::from(tokenizer_json),
            reason,
        };
        let tokenizer = tokenizers::Tokenizer::from_bytes(json.to_string().as_bytes())
            .map_err(|e| bad(format!("not a tokenizer.json: {e}")))?;
        let style = piece_style(json.get("decoder").unwrap_or(&Json::Null), tokenizer_json)?;

        let added = tokenizer.get_added_tokens_decoder();
        let n = tokenizer.get_vocab_size(true);
        let map = ByteLevelMap::new();
        let mut pieces = Vec::with_capacity(n);
        let mut special = Vec::with_capacity(n);
        for id in 0..n as u32 {
            if let Some(tok) = added.get(&id) {
                pieces.push(tok.content.as_bytes().to_vec());
                special.push(tok.special);
                continue;
            }
            let piece = tokenizer.id_to_token(id).unwrap_or_default();
            pieces.push(match style {
                PieceStyle::ByteLevel => map.piece_bytes(&piece),
                PieceStyle::SentencePiece { .. } => sentencepiece_bytes(&piece),
            });
            special.push(false);
        }

        let id_of = |key: &str| token_name(&config, key).and_then(|t| tokenizer.token_to_id(&t));
        let bos = id_of("bos_token");
        let eos = id_of("eos_token");
        let add_bos = match config.get("add_bos_token").and_then(Json::as_bool) {
            Some(b) => b,
            None => match bos {
                Some(bos) => {
                    let probe = tokenizer
                        .encode_fast("a", true)
                        .map_err(|e| bad(format!("cannot encode: {e}")))?;
                    probe.get_ids().first() == Some(&bos)
                }
                None => false,
            },
        };
        Tokenizer::assemble(Parts {
            tokenizer,
            pieces,
            special,
            bos,
            eos,
            extra_eos: Vec::new(),
            add_bos,
            strip_leading_space: matches!(style, PieceStyle::SentencePiece { strip: true }),
            chat_template: chat_template(&config),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A byte-level BPE `tokenizer.json` as Hugging Face writes it, small enough to read.
    fn tiny_json() -> Json {
        json!({
            "version": "1.0",
            "added_tokens": [
                {"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true},
                {"id": 1, "content": "<|im_start|>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                              "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false,
                      "vocab": {"<|endoftext|>": 0, "<|im_start|>": 1, "h": 2, "i": 3, "hi": 4,
                                "Ġ": 5, "Ġhi": 6, "Ã": 7, "©": 8, "Ã©": 9},
                      "merges": ["h i", "Ġ hi", "Ã ©"]}
        })
    }

    fn write(dir: &Path, name: &str, v: &Json) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).unwrap();
        p
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tandem-tok-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn tokenizer_json_with_config() {
        let dir = temp_dir("cfg");
        let tj = write(&dir, "tokenizer.json", &tiny_json());
        let cfg = json!({"bos_token": "<|im_start|>", "eos_token": {"content": "<|endoftext|>"},
                         "chat_template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"});
        let cj = write(&dir, "tokenizer_config.json", &cfg);
        let t = Tokenizer::from_files(&tj, Some(&cj)).unwrap();
        assert_eq!(t.encode("hi hié", false).unwrap(), vec![4, 6, 9]);
        assert_eq!(
            t.decode(&[4, 6, 9, 0], false).unwrap(),
            "hi hié<|endoftext|>"
        );
        assert_eq!(t.decode(&[1, 4, 0], true).unwrap(), "hi");
        assert_eq!(t.bos_token_id(), Some(1));
        assert_eq!(t.eos_token_ids(), &[0]);
        assert!(!t.add_bos());
        let out = t
            .chat_template()
            .render(&[super::super::ChatMessage::new("user", "x")], false);
        assert_eq!(out.unwrap(), "<|im_start|>x<|endoftext|>");
    }

    #[test]
    fn bos_rule_from_the_post_processor() {
        let dir = temp_dir("bos");
        let mut j = tiny_json();
        j["post_processor"] = json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|im_start|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {"<|im_start|>": {"id": "<|im_start|>", "ids": [1],
                                                "tokens": ["<|im_start|>"]}}
        });
        let tj = write(&dir, "tokenizer.json", &j);
        let cj = write(
            &dir,
            "tokenizer_config.json",
            &json!({"bos_token": "<|im_start|>"}),
        );
        let t = Tokenizer::from_files(&tj, Some(&cj)).unwrap();
        assert!(t.add_bos());
        assert_eq!(t.encode("hi", false).unwrap(), vec![1, 4]);
        assert!(t.chat_template().is_fallback());
    }

    #[test]
    fn missing_and_broken_files() {
        let dir = temp_dir("bad");
        let missing = dir.join("nope.json");
        assert!(matches!(
            Tokenizer::from_files(&missing, None),
            Err(EngineError::MissingFile(p)) if p == missing
        ));
        let broken = dir.join("broken.json");
        std::fs::write(&broken, "{\"model\": 3}").unwrap();
        let e = Tokenizer::from_files(&broken, None).unwrap_err();
        assert!(matches!(e, EngineError::InvalidModel { .. }), "{e}");
    }

    #[test]
    fn sentencepiece_decoder_style() {
        let d = json!({"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]});
        let p = Path::new("t.json");
        assert_eq!(
            piece_style(&d, p).unwrap(),
            PieceStyle::SentencePiece { strip: true }
        );
        assert!(piece_style(&json!({"type": "WordPiece"}), p).is_err());
    }
}
