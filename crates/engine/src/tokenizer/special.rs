//! Which ids end generation.

/// Texts that chat and base models use to close a turn or a document. A special token with one of
/// these texts ends generation even when the file names another EOS (SmolLM2's base EOS is
/// `<|endoftext|>`, while its instruct turns end with `<|im_end|>`).
const END_MARKERS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
];

/// EOS first, then the explicitly named end ids, then special tokens whose text is an end marker,
/// in id order; no duplicates.
pub(crate) fn end_of_turn_ids(
    eos: Option<u32>,
    extra: &[u32],
    pieces: &[Vec<u8>],
    special: &[bool],
) -> Vec<u32> {
    let mut ids: Vec<u32> = Vec::new();
    let mut add = |id: u32| {
        if (id as usize) < pieces.len() && !ids.contains(&id) {
            ids.push(id);
        }
    };
    if let Some(id) = eos {
        add(id);
    }
    for &id in extra {
        add(id);
    }
    for (id, (piece, &is_special)) in pieces.iter().zip(special).enumerate() {
        if is_special && END_MARKERS.iter().any(|m| m.as_bytes() == piece.as_slice()) {
            add(id as u32);
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eos_first_then_markers_without_duplicates() {
        let pieces: Vec<Vec<u8>> = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "hello",
            "</s>",
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
        // `</s>` is ordinary text here, so it does not count.
        let special = [true, true, true, false, false];
        assert_eq!(
            end_of_turn_ids(Some(2), &[2, 99], &pieces, &special),
            vec![2, 0]
        );
        assert_eq!(end_of_turn_ids(None, &[], &pieces, &special), vec![0, 2]);
    }
}
