//! The scores a forward pass gives one position over the vocabulary.
//!
//! The native model computes one score per token id. The simulated model's scores are a floor with
//! a few peaks by construction (see `model::sim`); it hands them over in that form, so that neither
//! it nor the sampler touches every id of the vocabulary for each token, and the sampler computes
//! the same distribution (the softmax over all `vocab` ids, floor ids included) in time that does
//! not grow with the vocabulary. [`Logits::to_vec`] gives the dense form of either.

/// Most ids a [`Peaks`] lists.
pub const MAX_PEAKS: usize = 8;

/// One position's logits.
#[derive(Debug, Clone, PartialEq)]
pub enum Logits {
    /// One score per token id.
    Dense(Vec<f32>),
    /// `floor` for every id but a few.
    Peaks(Peaks),
}

/// Logits over `vocab` ids that are all `floor` except at most [`MAX_PEAKS`] listed ids. Fixed
/// size, so that a step makes them without allocating.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Peaks {
    vocab: u32,
    floor: f32,
    len: usize,
    /// Strictly ascending in `ids[..len]`; unused entries stay zero so that equal logits compare
    /// equal.
    ids: [u32; MAX_PEAKS],
    scores: [f32; MAX_PEAKS],
}

impl Peaks {
    /// Every id of a `vocab`-sized vocabulary at `floor`. `vocab` must be at least 1.
    pub fn new(vocab: usize, floor: f32) -> Self {
        assert!(vocab >= 1 && vocab <= u32::MAX as usize, "vocabulary size");
        Peaks {
            vocab: vocab as u32,
            floor,
            len: 0,
            ids: [0; MAX_PEAKS],
            scores: [0.0; MAX_PEAKS],
        }
    }

    /// Raises `id` to at least `score` (as `l[id] = l[id].max(score)` on the dense form). Panics
    /// if `id` is outside the vocabulary or a new id would exceed [`MAX_PEAKS`].
    pub fn raise(&mut self, id: u32, score: f32) {
        assert!(id < self.vocab, "token id {id} outside the vocabulary");
        let at = self.ids[..self.len].partition_point(|&i| i < id);
        if at < self.len && self.ids[at] == id {
            self.scores[at] = self.scores[at].max(score);
            return;
        }
        if score.is_nan() || score <= self.floor {
            // The floor already, or NaN (which `max` ignores).
            return;
        }
        assert!(self.len < MAX_PEAKS, "more than {MAX_PEAKS} peaks");
        self.ids.copy_within(at..self.len, at + 1);
        self.scores.copy_within(at..self.len, at + 1);
        self.ids[at] = id;
        self.scores[at] = score;
        self.len += 1;
    }

    pub fn vocab(&self) -> usize {
        self.vocab as usize
    }

    pub fn floor(&self) -> f32 {
        self.floor
    }

    /// The listed ids, ascending, with their scores.
    pub fn iter(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        self.ids[..self.len]
            .iter()
            .copied()
            .zip(self.scores[..self.len].iter().copied())
    }

    /// How many ids score the floor (are not listed).
    pub fn floor_count(&self) -> usize {
        self.vocab() - self.len
    }

    /// The lowest id that is not listed, if any.
    fn first_floor_id(&self) -> Option<u32> {
        let n = self.ids[..self.len]
            .iter()
            .enumerate()
            .take_while(|&(i, &id)| id == i as u32)
            .count() as u32;
        (n < self.vocab).then_some(n)
    }

    /// The highest score; the lowest id wins a tie, and NaN never wins.
    pub fn argmax(&self) -> u32 {
        let mut best: Option<(u32, f32)> = None;
        for (id, s) in self.iter() {
            if !s.is_nan() && best.is_none_or(|(_, b)| s > b) {
                best = Some((id, s));
            }
        }
        match (best, self.first_floor_id()) {
            (Some((id, s)), Some(f)) if self.floor > s || (self.floor == s && f < id) => f,
            (Some((id, _)), _) => id,
            (None, f) => f.unwrap_or(0),
        }
    }
}

impl Logits {
    /// Vocabulary size.
    pub fn len(&self) -> usize {
        match self {
            Logits::Dense(v) => v.len(),
            Logits::Peaks(p) => p.vocab(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The score of `id`.
    pub fn get(&self, id: u32) -> f32 {
        match self {
            Logits::Dense(v) => v[id as usize],
            Logits::Peaks(p) => p.iter().find(|&(i, _)| i == id).map_or(p.floor, |(_, s)| s),
        }
    }

    /// One score per id.
    pub fn to_vec(&self) -> Vec<f32> {
        match self {
            Logits::Dense(v) => v.clone(),
            Logits::Peaks(p) => {
                let mut v = vec![p.floor; p.vocab()];
                for (id, s) in p.iter() {
                    v[id as usize] = s;
                }
                v
            }
        }
    }

    /// The highest score; the lowest id wins a tie (greedy decoding).
    pub fn argmax(&self) -> u32 {
        match self {
            Logits::Dense(v) => crate::sampling::argmax(v),
            Logits::Peaks(p) => p.argmax(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::argmax;

    #[test]
    fn peaks_are_the_dense_form_with_max_updates() {
        let mut p = Peaks::new(10, 0.0);
        p.raise(7, 3.0);
        p.raise(2, 5.0);
        p.raise(7, 1.0);
        p.raise(4, -1.0);
        let l = Logits::Peaks(p);
        assert_eq!(
            l.to_vec(),
            vec![0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0]
        );
        assert_eq!(l.get(7), 3.0);
        assert_eq!(l.get(4), 0.0);
        assert_eq!(l.len(), 10);
        assert_eq!(p.iter().map(|(i, _)| i).collect::<Vec<_>>(), vec![2, 7]);
    }

    #[test]
    fn argmax_agrees_with_the_dense_form_on_ties_and_floors() {
        // (vocabulary, floor, peaks)
        type Case = (usize, f32, Vec<(u32, f32)>);
        let cases: Vec<Case> = vec![
            (10, 0.0, vec![(3, 2.0), (5, 2.0)]),
            (10, 0.0, vec![(0, -1.0)]),
            (4, 1.0, vec![(0, 2.0), (1, 3.0), (2, 3.0), (3, 2.0)]),
            (4, 0.5, vec![(0, 1.0), (1, 1.0), (3, 1.0)]),
            (4, 0.5, vec![(1, 1.0), (2, 1.0), (3, 0.5)]),
            (3, 0.0, vec![(2, 0.0)]),
            (6, 0.0, vec![]),
            (6, 0.0, vec![(4, f32::NAN)]),
        ];
        for (vocab, floor, peaks) in cases {
            let mut p = Peaks::new(vocab, floor);
            for (id, s) in &peaks {
                p.raise(*id, *s);
            }
            let l = Logits::Peaks(p);
            assert_eq!(l.argmax(), argmax(&l.to_vec()), "{peaks:?} over {floor}");
        }
    }
}
