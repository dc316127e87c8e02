//! What every loop that generates does after a step, in one place: sample the sequence's next
//! token, then decide whether it ends the sequence (a stop or end token, its token budget, the
//! model's context); and how a step's token budget is cut among prompts still being computed.
use std::ops::Range;

use crate::logits::Logits;
use crate::sampling::{FinishReason, SamplingParams, sample, token_finishes};

/// A generating sequence's sampling and counts.
#[derive(Debug, Clone)]
pub struct Sequence {
    sampling: SamplingParams,
    prompt_tokens: usize,
    generated: u32,
    max_context: usize,
}

impl Sequence {
    /// A sequence of `prompt_tokens` that has generated `generated` tokens so far, in a model
    /// of `max_context` positions.
    pub fn new(
        sampling: SamplingParams,
        prompt_tokens: usize,
        generated: u32,
        max_context: usize,
    ) -> Self {
        Sequence {
            sampling,
            prompt_tokens,
            generated,
            max_context,
        }
    }

    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// Tokens generated so far (the one the next sample draws is counted once accepted).
    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// Tokens it may still generate before its budget ends it.
    pub fn left(&self) -> u32 {
        self.sampling.max_tokens.saturating_sub(self.generated)
    }

    /// Samples the next token from the step's `logits` (seeded by its position among the
    /// generated, so that a sequence continued elsewhere draws the same) and accepts it.
    pub fn next(&mut self, logits: &Logits, eos: &[u32]) -> (u32, Option<FinishReason>) {
        let token = sample(logits, &self.sampling, u64::from(self.generated));
        (token, self.accept(token, eos))
    }

    /// Counts a generated `token`; returns why the sequence ends with it, if it does: a stop
    /// token or (unless ignored) an end token, then its budget of new tokens, then the context
    /// (no room for another position).
    pub fn accept(&mut self, token: u32, eos: &[u32]) -> Option<FinishReason> {
        self.generated += 1;
        let total = self.prompt_tokens + self.generated as usize;
        token_finishes(&self.sampling, eos, token, self.generated as usize)
            .or((total >= self.max_context).then_some(FinishReason::Length))
    }
}

/// A prompt being computed: positions `done` of `len`, and where a chunk must stop if it gets
/// there (`boundary`: the end of the part given as prompt, when generated tokens follow; else
/// `len`).
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    pub done: usize,
    pub len: usize,
    pub boundary: usize,
}

/// Cuts a step's `room` tokens among `prompts`, oldest first: each takes what is left of it, as
/// much as the room allows, stopping at its boundary. Returns each prompt's index and positions
/// this step computes (prompts the room does not reach are left out; at least one token goes).
pub fn plan_chunks(
    prompts: impl IntoIterator<Item = Pending>,
    room: usize,
) -> Vec<(usize, Range<usize>)> {
    let mut room = room.max(1);
    let mut out = Vec::new();
    for (i, p) in prompts.into_iter().enumerate() {
        if room == 0 {
            break;
        }
        let stop = if p.done < p.boundary {
            p.boundary
        } else {
            p.len
        };
        let n = stop.saturating_sub(p.done).min(room);
        if n == 0 {
            continue;
        }
        room -= n;
        out.push((i, p.done..p.done + n));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy(max_tokens: u32) -> SamplingParams {
        SamplingParams::greedy(max_tokens)
    }

    #[test]
    fn a_stop_token_then_the_budget_then_the_context_end_a_sequence() {
        let mut s = Sequence::new(greedy(3), 10, 0, 100);
        assert_eq!(s.accept(5, &[2]), None);
        assert_eq!(s.accept(2, &[2]), Some(FinishReason::Stop));
        assert_eq!(s.generated(), 2);
        assert_eq!(s.accept(5, &[2]), Some(FinishReason::Length), "3 of 3");
        // The context: 10 + 2 generated fill 12 positions.
        let mut c = Sequence::new(greedy(50), 10, 1, 12);
        assert_eq!(c.accept(5, &[2]), Some(FinishReason::Length));
        // An end token ignored: the budget decides.
        let mut p = greedy(2);
        p.ignore_eos = true;
        let mut i = Sequence::new(p, 10, 0, 100);
        assert_eq!(
            (i.accept(2, &[2]), i.accept(2, &[2])),
            (None, Some(FinishReason::Length))
        );
        // A stop token even where the end token is ignored, and before the budget.
        let mut p = greedy(1);
        (p.ignore_eos, p.stop_token_ids) = (true, vec![9]);
        assert_eq!(
            Sequence::new(p, 10, 0, 100).accept(9, &[2]),
            Some(FinishReason::Stop)
        );
    }

    #[test]
    fn next_samples_greedily_and_counts_the_token() {
        let mut s = Sequence::new(greedy(4), 3, 1, 100);
        let (t, f) = s.next(&Logits::Dense(vec![0.0, 3.0, 1.0]), &[7]);
        assert_eq!((t, f, s.generated(), s.left()), (1, None, 2, 2));
        assert_eq!(s.prompt_tokens(), 3);
    }

    #[test]
    fn chunks_fill_the_room_oldest_first_and_stop_at_a_boundary() {
        let p = |done, len, boundary| Pending {
            done,
            len,
            boundary,
        };
        assert_eq!(
            plan_chunks([p(0, 40, 40), p(0, 10, 10)], 24),
            vec![(0, 0..24)]
        );
        assert_eq!(
            plan_chunks([p(24, 40, 40), p(0, 10, 10), p(0, 5, 5)], 24),
            vec![(0, 24..40), (1, 0..8)]
        );
        // A replayed tail: the given part ends at 30, then the rest goes on its own.
        assert_eq!(
            plan_chunks([p(20, 40, 30), p(0, 10, 10)], 24),
            vec![(0, 20..30), (1, 0..10)]
        );
        assert_eq!(plan_chunks([p(30, 40, 30)], 24), vec![(0, 30..40)]);
        // No room still computes one token; a finished prompt takes none.
        assert_eq!(plan_chunks([p(5, 5, 5), p(0, 9, 9)], 0), vec![(1, 0..1)]);
    }
}
