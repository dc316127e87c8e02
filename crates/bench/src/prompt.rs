//! Prompts of an exact length, cut from [`CORPUS`](crate::corpus) at a random offset.

use std::sync::Arc;

use crate::corpus::CORPUS;
use crate::rng::Rng;

/// The served model's tokenizer, as the load generator needs it: prompts are measured in the
/// model's own tokens. `encode` must not add special tokens (BOS): a prompt's length is the length
/// of its text.
pub trait PromptTokenizer: Send + Sync {
    /// Text to token ids.
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Token ids to text.
    fn decode(&self, ids: &[u32]) -> String;
    /// Estimated tokens of each piece of `text`, the pieces ending at the byte offsets `ends`
    /// (ascending, the last one `text.len()`). By default each piece is encoded on its own; a
    /// tokenizer that can tell where its tokens of the whole text end may count those instead
    /// (one encoding per response rather than one per streamed chunk).
    fn count_pieces(&self, text: &str, ends: &[usize]) -> Vec<u32> {
        let mut start = 0;
        ends.iter()
            .map(|&end| {
                let piece = text.get(start..end).unwrap_or("");
                start = end;
                self.encode(piece).len() as u32
            })
            .collect()
    }
}

/// Offsets tried before settling for the closest length found.
const OFFSET_TRIES: usize = 8;
/// Corrections of the window length tried at one offset.
const LENGTH_TRIES: usize = 12;

/// A built prompt and its measured length.
#[derive(Debug, Clone)]
pub struct Prompt {
    pub text: String,
    /// Its length in the unit of the source (tokens, or whitespace words without a tokenizer).
    pub len: u32,
}

/// Where prompts come from: token windows of the corpus, or word windows when no tokenizer is given.
pub(crate) enum PromptSource {
    Tokens {
        tokenizer: Arc<dyn PromptTokenizer>,
        ids: Vec<u32>,
    },
    Words {
        words: Vec<&'static str>,
    },
}

impl PromptSource {
    pub(crate) fn new(tokenizer: Option<Arc<dyn PromptTokenizer>>) -> Self {
        match tokenizer {
            Some(tokenizer) => {
                let ids = tokenizer.encode(CORPUS);
                if ids.is_empty() {
                    return Self::words();
                }
                Self::Tokens { tokenizer, ids }
            }
            None => Self::words(),
        }
    }

    fn words() -> Self {
        Self::Words {
            words: CORPUS.split_whitespace().collect(),
        }
    }

    /// The unit prompt lengths are measured in, for the report.
    pub(crate) fn unit(&self) -> &'static str {
        match self {
            Self::Tokens { .. } => "tokens",
            Self::Words { .. } => "whitespace words (no tokenizer given)",
        }
    }

    /// A prompt of `len` units at a random offset. With a tokenizer the window is re-measured after
    /// a decode/encode round trip and resized until the text encodes to exactly `len` tokens; if no
    /// offset converges the closest one is returned and its `len` says what it is.
    pub(crate) fn build(&self, len: u32, rng: &mut Rng) -> Prompt {
        match self {
            Self::Words { words } => {
                let start = rng.index(words.len());
                let mut text = String::with_capacity(len as usize * 6);
                for i in 0..len as usize {
                    if i > 0 {
                        text.push(' ');
                    }
                    text.push_str(words[(start + i) % words.len()]);
                }
                Prompt { text, len }
            }
            Self::Tokens { tokenizer, ids } => build_tokens(tokenizer.as_ref(), ids, len, rng),
        }
    }
}

fn window(ids: &[u32], start: usize, n: usize) -> Vec<u32> {
    (0..n).map(|i| ids[(start + i) % ids.len()]).collect()
}

fn build_tokens(tok: &dyn PromptTokenizer, ids: &[u32], len: u32, rng: &mut Rng) -> Prompt {
    let target = len as i64;
    let mut best: Option<Prompt> = None;
    for _ in 0..OFFSET_TRIES {
        let start = rng.index(ids.len());
        let mut n = target;
        let mut tried = Vec::with_capacity(LENGTH_TRIES);
        for _ in 0..LENGTH_TRIES {
            if n < 1 || tried.contains(&n) {
                break;
            }
            tried.push(n);
            let text = tok.decode(&window(ids, start, n as usize));
            let got = tok.encode(&text).len() as i64;
            if got == target {
                return Prompt { text, len };
            }
            let closer = best
                .as_ref()
                .is_none_or(|b| (i64::from(b.len) - target).abs() > (got - target).abs());
            if closer {
                best = Some(Prompt {
                    text,
                    len: got as u32,
                });
            }
            n += target - got;
        }
    }
    best.unwrap_or(Prompt {
        text: String::new(),
        len: 0,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// A toy subword tokenizer whose round trip is not the identity: words are split into pieces of
    /// at most three characters, and a piece that starts a word carries the leading space. A window
    /// that starts mid-word decodes without that space and re-encodes to a different split.
    #[derive(Default)]
    pub(crate) struct PieceTokenizer {
        vocab: Mutex<(HashMap<String, u32>, Vec<String>)>,
    }

    impl PieceTokenizer {
        fn id(&self, piece: String) -> u32 {
            let mut v = self.vocab.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(id) = v.0.get(&piece) {
                return *id;
            }
            let id = v.1.len() as u32;
            v.1.push(piece.clone());
            v.0.insert(piece, id);
            id
        }
    }

    impl PromptTokenizer for PieceTokenizer {
        fn encode(&self, text: &str) -> Vec<u32> {
            let mut out = Vec::new();
            for (w, word) in text.split(' ').filter(|w| !w.is_empty()).enumerate() {
                let chars: Vec<char> = word.chars().collect();
                for (i, piece) in chars.chunks(3).enumerate() {
                    let mut p: String = piece.iter().collect();
                    if i == 0 && (w > 0 || text.starts_with(' ')) {
                        p.insert(0, ' ');
                    }
                    out.push(self.id(p));
                }
            }
            out
        }

        fn decode(&self, ids: &[u32]) -> String {
            let v = self.vocab.lock().unwrap_or_else(|e| e.into_inner());
            ids.iter()
                .filter_map(|id| v.1.get(*id as usize).map(String::as_str))
                .collect()
        }
    }

    #[test]
    fn token_prompts_have_the_exact_length() {
        let tok: Arc<dyn PromptTokenizer> = Arc::new(PieceTokenizer::default());
        let src = PromptSource::new(Some(tok.clone()));
        assert_eq!(src.unit(), "tokens");
        let mut rng = Rng::new(5);
        for len in (1..400).chain([1000, 1500, 4000]) {
            let p = src.build(len, &mut rng);
            assert_eq!(p.len, len);
            assert_eq!(tok.encode(&p.text).len(), len as usize, "{:?}", p.text);
        }
    }

    #[test]
    fn word_prompts_count_words_and_vary_with_the_seed() {
        let src = PromptSource::new(None);
        assert!(src.unit().starts_with("whitespace words"));
        let a = src.build(50, &mut Rng::new(1));
        let b = src.build(50, &mut Rng::new(2));
        assert_eq!(a.text.split_whitespace().count(), 50);
        assert_eq!(a.len, 50);
        assert_ne!(a.text, b.text);
        assert_eq!(a.text, src.build(50, &mut Rng::new(1)).text);
        // Longer than the corpus: the window wraps around.
        assert_eq!(
            src.build(3000, &mut Rng::new(1))
                .text
                .split_whitespace()
                .count(),
            3000
        );
    }
}
