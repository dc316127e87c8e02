//! Token pieces as raw bytes, and a UTF-8 assembler that turns a byte stream into text exactly as
//! `String::from_utf8_lossy` would turn the whole stream, while holding back a character that is
//! still incomplete. Decoding at the byte level (rather than asking `tokenizers` for a lossy string)
//! is what lets the incremental decoder be O(1) per token and still agree with a full decode.

use std::collections::HashMap;

/// GPT-2's byte-level alphabet: every byte gets a printable character so BPE never sees spaces
/// or control bytes. Bytes that are already printable (and not a space) stand for themselves; the
/// others take code points from 256 upwards, in byte order.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let code = if printable {
            b as u32
        } else {
            let c = next;
            next += 1;
            c
        };
        // Every code point here is below 512, so it is a valid char.
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

/// The inverse of GPT-2's byte-level alphabet.
pub(crate) struct ByteLevelMap {
    char_to_byte: HashMap<char, u8>,
}

impl ByteLevelMap {
    pub(crate) fn new() -> Self {
        let char_to_byte = byte_to_char_table()
            .iter()
            .enumerate()
            .map(|(b, &c)| (c, b as u8))
            .collect();
        Self { char_to_byte }
    }

    /// The bytes a byte-level vocabulary piece stands for. A character outside the alphabet
    /// (which a well-formed vocabulary does not contain) keeps its own UTF-8 bytes, so nothing
    /// is silently lost.
    pub(crate) fn piece_bytes(&self, piece: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(piece.len());
        for c in piece.chars() {
            match self.char_to_byte.get(&c) {
                Some(&b) => out.push(b),
                None => {
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        out
    }
}

/// The bytes of a SentencePiece-style piece: `<0xAB>` byte-fallback pieces are that byte, and
/// the word-boundary mark `▁` is a space.
pub(crate) fn sentencepiece_bytes(piece: &str) -> Vec<u8> {
    if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>'))
        && hex.len() == 2
        && let Ok(b) = u8::from_str_radix(hex, 16)
    {
        return vec![b];
    }
    piece.replace('\u{2581}', " ").into_bytes()
}

/// Turns bytes into text as they arrive. Invalid sequences become U+FFFD exactly where
/// `from_utf8_lossy` would put them; an incomplete character at the end is held until the next
/// bytes complete it (or `finish` gives up on it).
#[derive(Debug, Default, Clone)]
pub(crate) struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    /// Appends `bytes` and moves every character that is now final into `out`.
    pub(crate) fn push(&mut self, bytes: &[u8], out: &mut String) {
        self.pending.extend_from_slice(bytes);
        self.drain(out, false);
    }

    /// Flushes what is left: an incomplete tail becomes one U+FFFD, as in `from_utf8_lossy`.
    pub(crate) fn finish(&mut self, out: &mut String) {
        self.drain(out, true);
    }

    fn drain(&mut self, out: &mut String, at_end: bool) {
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid_up_to` guarantees this prefix is valid UTF-8.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &after[n..];
                        }
                        None if at_end => {
                            out.push('\u{FFFD}');
                            rest = &[];
                            break;
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assemble(chunks: &[&[u8]]) -> Vec<String> {
        let mut a = Utf8Assembler::default();
        let mut outs = Vec::new();
        for c in chunks {
            let mut s = String::new();
            a.push(c, &mut s);
            outs.push(s);
        }
        let mut s = String::new();
        a.finish(&mut s);
        outs.push(s);
        outs
    }

    #[test]
    fn byte_level_alphabet_round_trips_every_byte() {
        let map = ByteLevelMap::new();
        let table = byte_to_char_table();
        for b in 0..=255u8 {
            assert_eq!(map.piece_bytes(&table[b as usize].to_string()), vec![b]);
        }
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(map.piece_bytes("Ġworld"), b" world".to_vec());
    }

    #[test]
    fn sentencepiece_pieces() {
        assert_eq!(sentencepiece_bytes("<0x0A>"), vec![b'\n']);
        assert_eq!(sentencepiece_bytes("\u{2581}the"), b" the".to_vec());
        assert_eq!(sentencepiece_bytes("<0xZZ>"), b"<0xZZ>".to_vec());
    }

    #[test]
    fn holds_an_emoji_until_complete() {
        let e = "😀".as_bytes();
        let outs = assemble(&[&e[..1], &e[1..3], &e[3..], b"!"]);
        assert_eq!(outs, vec!["", "", "😀", "!", ""]);
    }

    #[test]
    fn invalid_bytes_match_lossy() {
        let stream: &[u8] = b"a\xff\xe2\x82b\xf0\x9f";
        let outs = assemble(&[&stream[..2], &stream[2..4], &stream[4..]]);
        assert_eq!(outs.concat(), String::from_utf8_lossy(stream));
        assert_eq!(outs, vec!["a\u{FFFD}", "", "\u{FFFD}b", "\u{FFFD}"]);
    }
}
