//! Choosing the next token, and deciding when to stop.
//!
//! Randomness comes from `(seed, step)` alone, not from a generator's state, so a prefill worker can
//! draw the first token and a decode worker the rest (or a second decode worker after a failure) and
//! the output is the same as one process drawing them all.
use serde::{Deserialize, Serialize};

use crate::{EngineError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no limit.
    pub top_k: u32,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
    pub max_tokens: u32,
    pub stop_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl SamplingParams {
    pub fn greedy(max_tokens: u32) -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            max_tokens,
            stop_token_ids: Vec::new(),
            stop: Vec::new(),
            ignore_eos: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(EngineError::InvalidRequest(m.into()));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p must be in (0, 1]");
        }
        if self.max_tokens == 0 {
            return bad("max_tokens must be at least 1");
        }
        if self.stop.iter().any(String::is_empty) {
            return bad("stop strings must not be empty");
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform draw in [0, 1) for generated token number `step` (0 is the first) of a request.
pub fn uniform(seed: u64, step: u64) -> f64 {
    (splitmix(seed ^ splitmix(step)) >> 11) as f64 / (1u64 << 53) as f64
}

/// The highest logit; the lowest id wins a tie.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Candidates tried before a full sort when only a nucleus is asked for.
const NUCLEUS_PREFILTER: usize = 1024;

/// Picks the next token for generated token number `step`.
pub fn sample(logits: &[f32], p: &SamplingParams, step: u64) -> u32 {
    if p.is_greedy() || logits.len() <= 1 {
        return argmax(logits);
    }
    let inv_t = 1.0 / p.temperature as f64;
    let u = uniform(p.seed, step);
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
    let k = if p.top_k > 0 {
        (p.top_k as usize).min(ids.len())
    } else {
        ids.len()
    };
    if k < ids.len() {
        ids.select_nth_unstable_by(k - 1, by_logit);
        ids.truncate(k);
    }
    if p.top_p >= 1.0 {
        // Plain temperature: no order is needed, walk the candidates as they are.
        ids.sort_unstable();
        return draw(logits, &ids, inv_t, u);
    }
    if ids.len() > NUCLEUS_PREFILTER {
        let mut head = ids.clone();
        head.select_nth_unstable_by(NUCLEUS_PREFILTER - 1, by_logit);
        head.truncate(NUCLEUS_PREFILTER);
        head.sort_unstable_by(by_logit);
        if let Some(n) = nucleus_len(logits, &ids, &head, inv_t, p.top_p) {
            head.truncate(n);
            return draw(logits, &head, inv_t, u);
        }
    }
    ids.sort_unstable_by(by_logit);
    let all = ids.clone();
    let n = nucleus_len(logits, &all, &ids, inv_t, p.top_p).unwrap_or(ids.len());
    ids.truncate(n);
    draw(logits, &ids, inv_t, u)
}

/// How many of `sorted` (a prefix of `all` by logit) make up the nucleus, or None if they don't reach it.
fn nucleus_len(
    logits: &[f32],
    all: &[u32],
    sorted: &[u32],
    inv_t: f64,
    top_p: f32,
) -> Option<usize> {
    let max = logits[sorted[0] as usize] as f64;
    let total: f64 = all
        .iter()
        .map(|&i| ((logits[i as usize] as f64 - max) * inv_t).exp())
        .sum();
    let mut cum = 0.0;
    for (n, &i) in sorted.iter().enumerate() {
        cum += ((logits[i as usize] as f64 - max) * inv_t).exp() / total;
        if cum >= top_p as f64 {
            return Some(n + 1);
        }
    }
    None
}

fn draw(logits: &[f32], ids: &[u32], inv_t: f64, u: f64) -> u32 {
    let max = ids
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let w: Vec<f64> = ids
        .iter()
        .map(|&i| ((logits[i as usize] as f64 - max) * inv_t).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let target = u * total;
    let mut cum = 0.0;
    for (&i, wi) in ids.iter().zip(&w) {
        cum += wi;
        if target < cum {
            return i;
        }
    }
    ids[ids.len() - 1]
}

/// Why a generation ended, in OpenAI's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// max_tokens or the context limit.
    Length,
}

/// Decides whether a generated token ends the sequence (token-level rules; stop strings are text
/// and are matched by [`StopStrings`]).
pub fn token_finishes(
    p: &SamplingParams,
    eos: &[u32],
    token: u32,
    generated: usize,
) -> Option<FinishReason> {
    if p.stop_token_ids.contains(&token) || (!p.ignore_eos && eos.contains(&token)) {
        return Some(FinishReason::Stop);
    }
    if generated >= p.max_tokens as usize {
        return Some(FinishReason::Length);
    }
    None
}

/// Matches stop strings across streamed text pieces: text that could still turn into a stop string
/// is held back, and nothing from a stop string on is ever emitted.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops,
            pending: String::new(),
        }
    }

    /// Adds `text`; returns what may be emitted now and whether a stop string was found.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return (out, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.pending, s))
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        (out, false)
    }

    /// What is left when the sequence ends without a stop string.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `stop`, on a char boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = (stop.len().saturating_sub(1)).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n)
                && stop
                    .as_bytes()
                    .starts_with(&text.as_bytes()[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            seed,
            ..SamplingParams::greedy(8)
        }
    }

    fn logits() -> Vec<f32> {
        (0..2000)
            .map(|i| ((i * 7919) % 1000) as f32 / 100.0)
            .collect()
    }

    #[test]
    fn greedy_picks_the_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(sample(&[1.0, 3.0, 3.0], &SamplingParams::greedy(1), 0), 1);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let l = logits();
        let a: Vec<u32> = (0..50)
            .map(|s| sample(&l, &params(1.0, 0, 0.9, 42), s))
            .collect();
        let b: Vec<u32> = (0..50)
            .map(|s| sample(&l, &params(1.0, 0, 0.9, 42), s))
            .collect();
        let c: Vec<u32> = (0..50)
            .map(|s| sample(&l, &params(1.0, 0, 0.9, 43), s))
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_never_leaves_the_k_best() {
        let l = logits();
        let mut order: Vec<u32> = (0..l.len() as u32).collect();
        order.sort_by(|a, b| l[*b as usize].total_cmp(&l[*a as usize]).then(a.cmp(b)));
        let allowed = &order[..5];
        for s in 0..500 {
            let t = sample(&l, &params(5.0, 5, 1.0, 9), s);
            assert!(allowed.contains(&t), "step {s} picked {t}");
        }
    }

    #[test]
    fn top_p_never_leaves_the_nucleus() {
        // Probabilities 0.5, 0.25, 0.125, ...: top_p 0.7 keeps exactly the first two.
        let l: Vec<f32> = (0..30)
            .map(|i| -(i as f32) * std::f32::consts::LN_2)
            .collect();
        let mut seen = [false; 2];
        for s in 0..400 {
            let t = sample(&l, &params(1.0, 0, 0.7, 5), s) as usize;
            assert!(t < 2, "step {s} picked {t}");
            seen[t] = true;
        }
        assert_eq!(seen, [true, true], "both nucleus tokens are drawn");
    }

    #[test]
    fn top_p_with_a_large_vocabulary_uses_the_prefilter_and_agrees_with_the_full_sort() {
        let l = logits();
        for s in 0..100 {
            let t = sample(&l, &params(0.7, 0, 0.5, 1), s);
            assert!(l[t as usize] >= 9.0, "step {s}: logit {}", l[t as usize]);
        }
    }

    #[test]
    fn stop_tokens_eos_and_length() {
        let mut p = SamplingParams::greedy(3);
        p.stop_token_ids = vec![7];
        assert_eq!(token_finishes(&p, &[2], 7, 1), Some(FinishReason::Stop));
        assert_eq!(token_finishes(&p, &[2], 2, 1), Some(FinishReason::Stop));
        assert_eq!(token_finishes(&p, &[2], 5, 3), Some(FinishReason::Length));
        assert_eq!(token_finishes(&p, &[2], 5, 2), None);
        p.ignore_eos = true;
        assert_eq!(token_finishes(&p, &[2], 2, 1), None);
    }

    #[test]
    fn stop_strings_hold_back_partial_matches_and_cut_at_the_stop() {
        let mut s = StopStrings::new(vec!["END".into(), "\n\n".into()]);
        assert_eq!(s.push("hello E"), ("hello ".to_string(), false));
        assert_eq!(s.push("N"), (String::new(), false));
        assert_eq!(s.push("Dless"), (String::new(), true));
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("EN"), (String::new(), false));
        assert_eq!(s.push("X é"), ("ENX é".to_string(), false));
        assert_eq!(s.push("E"), (String::new(), false));
        assert_eq!(s.flush(), "E");
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(SamplingParams::greedy(0).validate().is_err());
        assert!(params(-1.0, 0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0, 0.0, 0).validate().is_err());
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0, 1.0, 0).validate().is_ok());
    }
}
