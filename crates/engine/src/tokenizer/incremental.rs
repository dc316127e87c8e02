//! Streaming detokenization.

use super::Tokenizer;
use super::bytes::Utf8Assembler;
use crate::error::Result;

/// Turns ids into text one at a time, for streaming. Each `push` returns the text that became
/// final with that id: never half a UTF-8 character (bytes of a character split across tokens are
/// held until it is complete) and never a character lost. The concatenation of every `push` and
/// `finish` equals `Tokenizer::decode` of all the ids with the same `skip_special`.
///
/// Cost per id is the size of its piece plus at most three held bytes, whatever the length of the
/// sequence so far.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    at_start: bool,
    utf8: Utf8Assembler,
}

impl IncrementalDecoder {
    /// A decoder at the start of a text. With `skip_special`, special tokens produce no text.
    pub fn new(tokenizer: Tokenizer, skip_special: bool) -> Self {
        Self {
            tokenizer,
            skip_special,
            at_start: true,
            utf8: Utf8Assembler::default(),
        }
    }

    /// Adds one id and returns the text it completed (possibly empty). An id outside the
    /// vocabulary is an error and leaves the decoder as it was.
    pub fn push(&mut self, id: u32) -> Result<String> {
        let mut out = String::new();
        self.push_into(id, &mut out)?;
        Ok(out)
    }

    /// As [`IncrementalDecoder::push`], appending the text to `out` (no allocation per id).
    pub fn push_into(&mut self, id: u32, out: &mut String) -> Result<()> {
        if let Some(bytes) =
            self.tokenizer
                .piece_for_decode(id, self.skip_special, &mut self.at_start)?
        {
            self.utf8.push(bytes, out);
        }
        Ok(())
    }

    /// Ends the text: returns what was held back (an incomplete character becomes U+FFFD).
    pub fn finish(mut self) -> Result<String> {
        let mut out = String::new();
        self.utf8.finish(&mut out);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_support::smollm2;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn tok() -> &'static Tokenizer {
        static T: OnceLock<Tokenizer> = OnceLock::new();
        T.get_or_init(smollm2)
    }

    fn streamed(t: &Tokenizer, ids: &[u32], skip_special: bool) -> (Vec<String>, String) {
        let mut d = IncrementalDecoder::new(t.clone(), skip_special);
        let mut parts: Vec<String> = ids.iter().map(|&id| d.push(id).unwrap()).collect();
        parts.push(d.finish().unwrap());
        let whole = parts.concat();
        (parts, whole)
    }

    /// Ids whose pieces are fragments of multi-byte characters: accents, CJK and emoji that the
    /// byte-level BPE cuts across tokens.
    fn fragment_ids() -> Vec<u32> {
        let t = tok();
        let text = "é ü ñ 你好世界 日本語 😀🎉👍🏽 ∑ Ω ß";
        let mut ids = t.encode(text, false).unwrap();
        ids.retain(|&id| std::str::from_utf8(&t.inner.pieces[id as usize]).is_err());
        assert!(
            ids.len() >= 5,
            "expected split characters in {text:?}, got {ids:?}"
        );
        ids
    }

    #[test]
    fn emoji_split_across_tokens_is_held_then_emitted_whole() {
        let t = tok();
        let ids = t.encode("ok 🎉!", false).unwrap();
        let (parts, whole) = streamed(t, &ids, false);
        assert_eq!(whole, "ok 🎉!");
        assert!(parts.iter().all(|p| !p.contains('\u{FFFD}')), "{parts:?}");
        assert!(parts.iter().any(|p| p.contains('🎉')), "{parts:?}");
    }

    #[test]
    fn special_tokens_follow_skip_special() {
        let t = tok();
        let ids = t.encode("<|im_start|>user\nhé<|im_end|>", true).unwrap();
        assert_eq!(streamed(t, &ids, true).1, "user\nhé");
        assert_eq!(streamed(t, &ids, false).1, "<|im_start|>user\nhé<|im_end|>");
    }

    #[test]
    fn out_of_vocabulary_id_is_an_error() {
        let mut d = IncrementalDecoder::new(tok().clone(), false);
        assert!(d.push(49152).is_err());
        assert_eq!(d.push(19556).unwrap(), "Hello");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        #[test]
        fn pushes_add_up_to_decode(
            picks in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>(), 0u32..49152), 0..48),
            skip in any::<bool>(),
        ) {
            let t = tok();
            let frags = fragment_ids();
            let ids: Vec<u32> = picks
                .iter()
                .map(|(frag, idx, any_id)| if *frag { frags[idx.index(frags.len())] } else { *any_id })
                .collect();
            let (parts, whole) = streamed(t, &ids, skip);
            let full = t.decode(&ids, skip).unwrap();
            prop_assert_eq!(&whole, &full);
            // What was streamed so far is always a prefix of the final text: a character split
            // across tokens is never emitted as U+FFFD that a later token would have completed.
            let mut so_far = String::new();
            for p in &parts {
                so_far.push_str(p);
                prop_assert!(full.starts_with(&so_far), "{:?} is not a prefix of {:?}", so_far, full);
            }
        }
    }
}
