//! SentencePiece-style vocabularies (`tokenizer.ggml.model = llama`: Llama 1/2, Mistral, ...).
//!
//! llama.cpp tokenizes these by repeatedly merging the adjacent pair whose concatenation is the
//! highest-scoring token, falling back to `<0xAB>` byte tokens for characters not in the
//! vocabulary. A BPE whose merges are every (left, right) split of every token, ranked by the
//! score of the token they make, does the same; that is how it is built here.

use crate::error::{EngineError, Result};
use std::collections::HashMap;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace, Sequence};

/// SentencePiece's word-boundary mark.
const MARK: &str = "\u{2581}";

/// A BPE tokenizer equivalent to llama.cpp's SentencePiece tokenizer over this vocabulary.
/// With `add_space_prefix`, every text segment (the start, and after each special token) gets a
/// leading space, as llama.cpp does.
pub(super) fn sentencepiece_tokenizer(
    tokens: &[&str],
    scores: &[f32],
    unk: Option<u32>,
    add_space_prefix: bool,
) -> Result<tokenizers::Tokenizer> {
    let err = |m: String| EngineError::Tokenizer(m);
    if scores.len() != tokens.len() {
        return Err(err(format!(
            "{} scores for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (*t, i)).collect();
    let mut ranked: Vec<(f32, usize, &str, &str)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        for (at, _) in tok.char_indices().skip(1) {
            let (left, right) = tok.split_at(at);
            if index.contains_key(left) && index.contains_key(right) {
                ranked.push((scores[id], id, left, right));
            }
        }
    }
    // Highest score first; equal scores in id order, so the result does not depend on hashing.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges: Merges = ranked
        .into_iter()
        .map(|(_, _, l, r)| (l.to_owned(), r.to_owned()))
        .collect();
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| ((*t).to_owned(), i as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk.and_then(|u| tokens.get(u as usize)) {
        builder = builder.unk_token((*unk).to_owned());
    }
    let bpe = builder
        .build()
        .map_err(|e| err(format!("cannot build the SentencePiece model: {e}")))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    let replace = Replace::new(" ", MARK).map_err(|e| err(format!("space replacement: {e}")))?;
    let normalizer: NormalizerWrapper = if add_space_prefix {
        Sequence::new(vec![Prepend::new(MARK.to_owned()).into(), replace.into()]).into()
    } else {
        replace.into()
    };
    tokenizer
        .with_normalizer(Some(normalizer))
        .map_err(|e| err(format!("normalizer: {e}")))?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use crate::tokenizer::Tokenizer;
    use candle_core::quantized::gguf_file::Value;
    use std::collections::HashMap;

    fn tiny() -> HashMap<String, Value> {
        let toks = [
            "<unk>", "<s>", "</s>", "<0x0A>", "▁", "h", "i", "▁h", "hi", "▁hi",
        ];
        let types = [2, 3, 3, 6, 1, 1, 1, 1, 1, 1];
        let scores = [0.0, 0.0, 0.0, 0.0, -5.0, -6.0, -6.0, -3.0, -2.0, -1.0];
        HashMap::from([
            ("tokenizer.ggml.model".into(), Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(toks.iter().map(|s| Value::String((*s).into())).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(types.map(Value::I32).to_vec()),
            ),
            (
                "tokenizer.ggml.scores".into(),
                Value::Array(scores.map(Value::F32).to_vec()),
            ),
            ("tokenizer.ggml.unknown_token_id".into(), Value::U32(0)),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ])
    }

    #[test]
    fn merges_by_score_with_byte_fallback_and_bos() {
        let t = Tokenizer::from_gguf(&tiny()).unwrap();
        assert!(t.add_bos());
        // "▁hi▁hi\n": `hi` (-2) then `▁hi` (-1), twice; the newline falls back to its byte.
        assert_eq!(t.encode("hi hi\n", false).unwrap(), vec![1, 9, 9, 3]);
        // A space is prefixed again after a special token, as llama.cpp does.
        assert_eq!(t.encode("hi</s>hi", true).unwrap(), vec![1, 9, 2, 9]);
        // The prefixed space is dropped on decode; byte pieces become their byte.
        assert_eq!(t.decode(&[1, 9, 9, 3], true).unwrap(), "hi hi\n");
        assert_eq!(t.decode(&[9, 2, 9], false).unwrap(), "hi</s> hi");
        assert_eq!(t.eos_token_ids(), &[2]);
    }
}
