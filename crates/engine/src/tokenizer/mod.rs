//! Tokenizer, chat template and incremental detokenizer.
//!
//! Encoding goes through the `tokenizers` crate (a BPE built from the GGUF's vocabulary and merges,
//! or a Hugging Face `tokenizer.json`). Decoding is our own and works on bytes: every id maps to
//! the raw bytes it stands for, and text is made from the concatenated bytes exactly as
//! `String::from_utf8_lossy` would make it. That single rule is what lets [`IncrementalDecoder`]
//! emit text token by token that always adds up to [`Tokenizer::decode`] of the whole sequence.

mod bytes;
mod gguf;
mod hf;
mod incremental;
mod special;
mod spm;
mod template;

pub use incremental::IncrementalDecoder;
pub use template::{CHATML_TEMPLATE, ChatMessage, ChatTemplate};

use crate::error::{EngineError, Result};
use bytes::Utf8Assembler;
use std::sync::Arc;

/// A model's tokenizer. Cloning is cheap (one `Arc`), so workers and decoders can each hold one.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.inner.bos)
            .field("add_bos", &self.inner.add_bos)
            .field("eos", &self.inner.eos_ids)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// Splits special tokens out of the text (`parse_special = true`).
    with_special: tokenizers::Tokenizer,
    /// The same tokenizer with special tokens treated as plain text (`parse_special = false`).
    plain: tokenizers::Tokenizer,
    /// The raw bytes of every id.
    pieces: Vec<Vec<u8>>,
    /// Ids that `decode(.., skip_special = true)` leaves out.
    special: Vec<bool>,
    bos: Option<u32>,
    add_bos: bool,
    eos_ids: Vec<u32>,
    /// SentencePiece vocabularies mark word starts with a space; the first one of a text is
    /// an artefact of encoding and is dropped on decode.
    strip_leading_space: bool,
    template: ChatTemplate,
}

/// What the GGUF and `tokenizer.json` loaders hand to [`Tokenizer::assemble`].
pub(crate) struct Parts {
    pub(crate) tokenizer: tokenizers::Tokenizer,
    pub(crate) pieces: Vec<Vec<u8>>,
    pub(crate) special: Vec<bool>,
    pub(crate) bos: Option<u32>,
    pub(crate) eos: Option<u32>,
    /// End-of-turn ids the file names explicitly (GGUF `eot`/`eom` ids).
    pub(crate) extra_eos: Vec<u32>,
    pub(crate) add_bos: bool,
    pub(crate) strip_leading_space: bool,
    pub(crate) chat_template: Option<String>,
}

impl Tokenizer {
    pub(crate) fn assemble(parts: Parts) -> Result<Self> {
        let n = parts.pieces.len();
        let check = |what: &str, id: Option<u32>| match id {
            Some(id) if id as usize >= n => Err(EngineError::Tokenizer(format!(
                "{what} token id {id} is outside the vocabulary of {n}"
            ))),
            _ => Ok(()),
        };
        check("BOS", parts.bos)?;
        check("EOS", parts.eos)?;
        if parts.add_bos && parts.bos.is_none() {
            return Err(EngineError::Tokenizer(
                "the model asks for a BOS token but names none".into(),
            ));
        }
        let eos_ids =
            special::end_of_turn_ids(parts.eos, &parts.extra_eos, &parts.pieces, &parts.special);
        let text = |id: Option<u32>| {
            id.map(|i| String::from_utf8_lossy(&parts.pieces[i as usize]).into_owned())
                .unwrap_or_default()
        };
        let template = ChatTemplate::new(
            parts.chat_template.as_deref(),
            &text(parts.bos),
            &text(parts.eos),
        )?;
        let mut plain = parts.tokenizer.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            inner: Arc::new(Inner {
                with_special: parts.tokenizer,
                plain,
                pieces: parts.pieces,
                special: parts.special,
                bos: parts.bos,
                add_bos: parts.add_bos,
                eos_ids,
                strip_leading_space: parts.strip_leading_space,
                template,
            }),
        })
    }

    /// Encodes `text` to ids. With `parse_special`, the text of a special token (such as
    /// `<|im_start|>`) becomes that token; without it, it is tokenized as ordinary text, which is
    /// what user-supplied text needs.
    ///
    /// BOS rule: when [`Tokenizer::add_bos`] is true, the result starts with the BOS id, and
    /// otherwise nothing is added; no other token (EOS, separators) is ever added. Call `encode`
    /// once per whole prompt, not per piece of it, or BOS appears more than once.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let tok = if parse_special {
            &self.inner.with_special
        } else {
            &self.inner.plain
        };
        let encoding = tok
            .encode_fast(text, false)
            .map_err(|e| EngineError::Tokenizer(format!("encoding failed: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if self.inner.add_bos
            && let Some(bos) = self.inner.bos
        {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text. With `skip_special`, special tokens (BOS, EOS, `<|im_start|>`...)
    /// are left out. Bytes that do not form valid UTF-8 become U+FFFD. An id outside the
    /// vocabulary is an error.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let mut out = String::new();
        let mut utf8 = Utf8Assembler::default();
        let mut at_start = true;
        for &id in ids {
            if let Some(bytes) = self.piece_for_decode(id, skip_special, &mut at_start)? {
                utf8.push(bytes, &mut out);
            }
        }
        utf8.finish(&mut out);
        Ok(out)
    }

    /// The bytes `id` adds to decoded text (`None` when skipped). `at_start` tracks whether any
    /// text came before, for SentencePiece's leading space.
    pub(crate) fn piece_for_decode(
        &self,
        id: u32,
        skip_special: bool,
        at_start: &mut bool,
    ) -> Result<Option<&[u8]>> {
        let inner = &self.inner;
        let bytes = inner.pieces.get(id as usize).ok_or_else(|| {
            EngineError::Tokenizer(format!(
                "token id {id} is outside the vocabulary of {}",
                inner.pieces.len()
            ))
        })?;
        let special = inner.special[id as usize];
        if special && skip_special {
            return Ok(None);
        }
        let mut bytes = bytes.as_slice();
        if *at_start && !special {
            if inner.strip_leading_space
                && let Some(rest) = bytes.strip_prefix(b" ")
            {
                bytes = rest;
            }
            *at_start = false;
        }
        Ok(Some(bytes))
    }

    /// Whether [`Tokenizer::encode`] starts every text with the BOS token (the model's choice:
    /// GGUF `tokenizer.ggml.add_bos_token`, or the `tokenizer.json` post-processor).
    pub fn add_bos(&self) -> bool {
        self.inner.add_bos
    }

    /// The BOS id, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos
    }

    /// Ids that end generation, EOS first. The rule, as in llama.cpp: the model's EOS id, the
    /// end-of-turn and end-of-message ids a GGUF names (`tokenizer.ggml.eot_token_id`,
    /// `tokenizer.ggml.eom_token_id`), and every special token whose text is a known end-of-turn
    /// or end-of-text marker (`<|im_end|>`, `<|eot_id|>`, `<|eom_id|>`, `<|end|>`,
    /// `<end_of_turn>`, `<|endoftext|>`, `<|end_of_text|>`, `</s>`). No duplicates.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.inner.eos_ids
    }

    /// Number of ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.pieces.len()
    }

    /// The id of a token given by its text as the vocabulary spells it (byte-level form for
    /// ordinary GPT-2 pieces, e.g. `Ġworld`; plain text for special tokens).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.with_special.token_to_id(token)
    }

    /// Whether `id` is a special (control) token. Ids outside the vocabulary are not.
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .special
            .get(id as usize)
            .copied()
            .unwrap_or(false)
    }

    /// The model's chat template, or ChatML when it has none.
    pub fn chat_template(&self) -> &ChatTemplate {
        &self.inner.template
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::Tokenizer;
    use candle_core::quantized::gguf_file;

    /// The real model's tokenizer; panics (failing the test) when the model is not fetched.
    pub(crate) fn smollm2() -> Tokenizer {
        let path = crate::testing::require_model_path();
        let mut file =
            std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let content = gguf_file::Content::read(&mut file)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Tokenizer::from_gguf(&content.metadata).unwrap_or_else(|e| panic!("{e}"))
    }
}
