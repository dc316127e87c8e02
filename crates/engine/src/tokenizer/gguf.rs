//! The tokenizer a GGUF file carries in its metadata (`tokenizer.ggml.*`).

use super::bytes::{ByteLevelMap, sentencepiece_bytes};
use super::{Parts, Tokenizer};
use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;
// Type 6 (`<0xAB>` byte tokens) needs no case of its own: their piece text says their byte.

/// Llama 3's pre-tokenizer split (the `llama-bpe` pre-tokenizer of llama.cpp).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

type Metadata = HashMap<String, Value>;

fn err(msg: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(msg.into())
}

fn get<'a>(md: &'a Metadata, key: &str) -> Result<&'a Value> {
    md.get(key)
        .ok_or_else(|| err(format!("GGUF metadata has no `{key}`")))
}

fn as_str<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(err(format!(
            "`{key}` is {:?}, not a string",
            other.value_type()
        ))),
    }
}

fn as_int(v: &Value, key: &str) -> Result<i64> {
    let n = match *v {
        Value::U8(x) => x as i64,
        Value::I8(x) => x as i64,
        Value::U16(x) => x as i64,
        Value::I16(x) => x as i64,
        Value::U32(x) => x as i64,
        Value::I32(x) => x as i64,
        Value::I64(x) => x,
        Value::U64(x) => i64::try_from(x).map_err(|_| err(format!("`{key}` is out of range")))?,
        ref other => {
            return Err(err(format!(
                "`{key}` is {:?}, not an integer",
                other.value_type()
            )));
        }
    };
    Ok(n)
}

fn opt_id(md: &Metadata, key: &str) -> Result<Option<u32>> {
    match md.get(key) {
        None => Ok(None),
        Some(v) => {
            let n = as_int(v, key)?;
            // llama.cpp writes -1 (or u32::MAX) for "none".
            Ok(u32::try_from(n).ok().filter(|&id| id != u32::MAX))
        }
    }
}

fn str_array<'a>(md: &'a Metadata, key: &str) -> Result<Vec<&'a str>> {
    let arr = get(md, key)?
        .to_vec()
        .map_err(|_| err(format!("`{key}` is not an array")))?;
    arr.iter().map(|v| as_str(v, key)).collect()
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF file's metadata (as read by
    /// `candle_core::quantized::gguf_file::Content::read`). Supported: `tokenizer.ggml.model =
    /// gpt2` (byte-level BPE) with the pre-tokenizers `smollm` (digits split one by one, then
    /// GPT-2's split), `gpt2` and `default` (GPT-2's split) and `llama-bpe` (Llama 3's split);
    /// and `tokenizer.ggml.model = llama` (SentencePiece-style, merged by score).
    /// Anything else is an `EngineError::Tokenizer` that names what the file asks for.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Tokenizer> {
        let model = as_str(get(md, "tokenizer.ggml.model")?, "tokenizer.ggml.model")?;
        let sentencepiece = match model {
            "gpt2" => false,
            "llama" => true,
            other => {
                return Err(err(format!(
                    "tokenizer model `{other}` is not supported (`gpt2` byte-level BPE or `llama` SentencePiece)"
                )));
            }
        };
        let tokens = str_array(md, "tokenizer.ggml.tokens")?;
        let types: Vec<i64> = match md.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|_| err("`tokenizer.ggml.token_type` is not an array"))?
                .iter()
                .map(|t| as_int(t, "tokenizer.ggml.token_type"))
                .collect::<Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        if types.len() != tokens.len() {
            return Err(err(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let add_space_prefix = match md.get("tokenizer.ggml.add_space_prefix") {
            Some(v) => v
                .to_bool()
                .map_err(|_| err("`tokenizer.ggml.add_space_prefix` is not a bool"))?,
            None => true,
        };
        let mut tokenizer = if sentencepiece {
            let scores: Vec<f32> = get(md, "tokenizer.ggml.scores")?
                .to_vec()
                .map_err(|_| err("`tokenizer.ggml.scores` is not an array"))?
                .iter()
                .map(|v| {
                    v.to_f32()
                        .map_err(|_| err("`tokenizer.ggml.scores` holds a non-f32"))
                })
                .collect::<Result<_>>()?;
            let unk = opt_id(md, "tokenizer.ggml.unknown_token_id")?;
            super::spm::sentencepiece_tokenizer(&tokens, &scores, unk, add_space_prefix)?
        } else {
            byte_level_bpe(md, &tokens)?
        };

        let map = ByteLevelMap::new();
        let mut pieces = Vec::with_capacity(tokens.len());
        let mut special = Vec::with_capacity(tokens.len());
        let mut control = Vec::new();
        let mut user = Vec::new();
        for (tok, &ty) in tokens.iter().zip(&types) {
            // Control and user-defined tokens are stored as their text, not in byte-level form.
            let raw = ty == TYPE_CONTROL || ty == TYPE_USER_DEFINED || ty == TYPE_UNKNOWN;
            pieces.push(if raw {
                tok.as_bytes().to_vec()
            } else if sentencepiece {
                sentencepiece_bytes(tok)
            } else {
                map.piece_bytes(tok)
            });
            special.push(ty == TYPE_CONTROL || ty == TYPE_UNKNOWN);
            match ty {
                TYPE_CONTROL => control.push(AddedToken::from(*tok, true)),
                TYPE_USER_DEFINED => user.push(AddedToken::from(*tok, false).normalized(false)),
                _ => {}
            }
        }
        tokenizer
            .add_special_tokens(control)
            .map_err(|e| err(format!("cannot add control tokens: {e}")))?;
        tokenizer
            .add_tokens(user)
            .map_err(|e| err(format!("cannot add user-defined tokens: {e}")))?;

        let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
            Some(v) => v
                .to_bool()
                .map_err(|_| err("`tokenizer.ggml.add_bos_token` is not a bool"))?,
            // llama.cpp's defaults: SentencePiece vocabularies add BOS, BPE ones do not.
            None => sentencepiece,
        };
        let extra_eos = [
            opt_id(md, "tokenizer.ggml.eot_token_id")?,
            opt_id(md, "tokenizer.ggml.eom_token_id")?,
        ]
        .into_iter()
        .flatten()
        .collect();
        let chat_template = match md.get("tokenizer.chat_template") {
            Some(v) => Some(as_str(v, "tokenizer.chat_template")?.to_owned()),
            None => None,
        };
        Tokenizer::assemble(Parts {
            tokenizer,
            pieces,
            special,
            bos: opt_id(md, "tokenizer.ggml.bos_token_id")?,
            eos: opt_id(md, "tokenizer.ggml.eos_token_id")?,
            extra_eos,
            add_bos,
            strip_leading_space: sentencepiece && add_space_prefix,
            chat_template,
        })
    }
}

/// A byte-level BPE from the vocabulary and `tokenizer.ggml.merges`, with the pre-tokenizer that
/// `tokenizer.ggml.pre` names.
fn byte_level_bpe(md: &Metadata, tokens: &[&str]) -> Result<tokenizers::Tokenizer> {
    let pre = match md.get("tokenizer.ggml.pre") {
        Some(v) => as_str(v, "tokenizer.ggml.pre")?,
        None => "default",
    };
    let merges: Merges = str_array(md, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| err(format!("merge `{m}` has no space")))
        })
        .collect::<Result<_>>()?;
    let (pre_tokenizer, ignore_merges) = pre_tokenizer_for(pre)?;
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t).to_owned(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| err(format!("cannot build the BPE model: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    Ok(tokenizer)
}

/// The pre-tokenizer for a llama.cpp pre-tokenizer name, and whether BPE takes a whole word that
/// is in the vocabulary as is (Llama 3 does).
fn pre_tokenizer_for(pre: &str) -> Result<(PreTokenizerWrapper, bool)> {
    let gpt2 = || ByteLevel::new(false, true, true);
    match pre {
        "smollm" => Ok((
            Sequence::new(vec![Digits::new(true).into(), gpt2().into()]).into(),
            false,
        )),
        "gpt2" | "default" => Ok((gpt2().into(), false)),
        "llama-bpe" | "llama3" => {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| err(format!("Llama 3 split regex: {e}")))?;
            Ok((
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into(),
                true,
            ))
        }
        other => Err(err(format!(
            "pre-tokenizer `{other}` is not supported (supported: smollm, gpt2, default, llama-bpe)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_support::smollm2;

    fn tiny(pre: &str, model: &str) -> Metadata {
        let arr = |v: &[&str]| Value::Array(v.iter().map(|s| Value::String((*s).into())).collect());
        HashMap::from([
            ("tokenizer.ggml.model".into(), Value::String(model.into())),
            ("tokenizer.ggml.pre".into(), Value::String(pre.into())),
            (
                "tokenizer.ggml.tokens".into(),
                arr(&["<eos>", "a", "b", "ab", "1", "2", "Ġ", "Ġab"]),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array([3, 1, 1, 1, 1, 1, 1, 1].map(Value::I32).to_vec()),
            ),
            ("tokenizer.ggml.merges".into(), arr(&["a b", "Ġ ab"])),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        ])
    }

    #[test]
    fn tiny_vocabulary_encodes_and_decodes() {
        let t = Tokenizer::from_gguf(&tiny("smollm", "gpt2")).unwrap();
        assert_eq!(t.encode("ab ab12", false).unwrap(), vec![3, 7, 4, 5]);
        assert_eq!(t.encode("ab<eos>", true).unwrap(), vec![3, 0]);
        assert_eq!(t.decode(&[3, 7, 0], false).unwrap(), "ab ab<eos>");
        assert_eq!(t.decode(&[3, 7, 0], true).unwrap(), "ab ab");
        assert_eq!(t.eos_token_ids(), &[0]);
        assert!(t.chat_template().is_fallback());
    }

    #[test]
    fn unsupported_model_and_pre_tokenizer_are_clear_errors() {
        let e = Tokenizer::from_gguf(&tiny("smollm", "bert")).unwrap_err();
        assert!(e.to_string().contains("`bert` is not supported"), "{e}");
        let e = Tokenizer::from_gguf(&tiny("qwen2", "gpt2")).unwrap_err();
        assert!(e.to_string().contains("`qwen2` is not supported"), "{e}");
        let mut md = tiny("smollm", "gpt2");
        md.remove("tokenizer.ggml.merges");
        let e = Tokenizer::from_gguf(&md).unwrap_err();
        assert!(e.to_string().contains("tokenizer.ggml.merges"), "{e}");
    }

    #[test]
    fn smollm2_hello_world() {
        let t = smollm2();
        assert_eq!(
            t.encode("Hello, world", false).unwrap(),
            vec![19556, 28, 905]
        );
        assert_eq!(t.decode(&[19556, 28, 905], false).unwrap(), "Hello, world");
        assert_eq!(t.vocab_size(), 49152);
        assert!(!t.add_bos());
        assert_eq!(t.bos_token_id(), Some(1));
    }

    #[test]
    fn smollm2_digits_are_split_one_by_one() {
        let t = smollm2();
        let ids = t.encode("12345", false).unwrap();
        assert_eq!(ids.len(), 5);
        assert_eq!(t.decode(&ids, false).unwrap(), "12345");
    }

    #[test]
    fn smollm2_special_tokens() {
        let t = smollm2();
        assert_eq!(t.token_to_id("<|im_start|>"), Some(1));
        assert_eq!(t.token_to_id("<|im_end|>"), Some(2));
        let ids = t.encode("<|im_start|>user\nHi<|im_end|>", true).unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        let plain = t.encode("<|im_start|>", false).unwrap();
        assert!(plain.len() > 1 && !plain.contains(&1), "{plain:?}");
        assert!(t.is_special(1) && t.is_special(0) && !t.is_special(19556));
        // EOS in this file is <|im_end|>; <|endoftext|> also ends text.
        assert_eq!(t.eos_token_ids(), &[2, 0]);
        assert_eq!(t.decode(&ids, true).unwrap(), "user\nHi");
    }

    #[test]
    fn smollm2_chat_template_is_the_models_own() {
        let t = smollm2();
        let tpl = t.chat_template();
        assert!(!tpl.is_fallback());
        let out = tpl
            .render(&[crate::tokenizer::ChatMessage::new("user", "Hi")], true)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
