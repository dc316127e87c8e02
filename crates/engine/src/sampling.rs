//! Choosing the next token, and deciding when to stop.
//!
//! Randomness comes from `(seed, step)` alone, not from a generator's state, so a prefill worker can
//! draw the first token and a decode worker the rest (or a second decode worker after a failure) and
//! the output is the same as one process drawing them all.
use serde::{Deserialize, Serialize};

use crate::logits::{Logits, Peaks};
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

/// The highest logit; the lowest id wins a tie, and NaN never wins (all NaN: 0).
///
/// Two vectorized passes rather than one branchy one (a scalar loop with a branch per logit took
/// 30 us for a 49k vocabulary, as long as the rest of a `sim` step): the maximum in [`LANES`]
/// independent lanes, then the first block of logits that holds it, found with comparisons
/// or-ed across the block, and the first id in that block.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = max_logit(logits);
    let mut base = 0;
    for block in logits.chunks(ARGMAX_BLOCK) {
        if block.iter().fold(false, |hit, &l| hit | (l == max)) {
            let at = block.iter().position(|&l| l == max).unwrap_or(0);
            return (base + at) as u32;
        }
        base += block.len();
    }
    // Every logit is NaN (max_logit ignores NaN and answers -inf, which none equals).
    0
}

/// Logits per block of [`argmax`]'s search pass.
const ARGMAX_BLOCK: usize = 64;

/// Candidates tried before a full sort when only a nucleus is asked for.
const NUCLEUS_PREFILTER: usize = 1024;

/// Picks the next token for generated token number `step`.
///
/// Greedy and plain temperature sampling from [`Logits::Peaks`] (the simulated model) take time
/// independent of the vocabulary: the softmax over every id, floor ids included, is summed in
/// closed form. Top-k and top-p over them go through the dense form (one vocabulary-sized buffer
/// per token, as the dense path's candidate list already is).
pub fn sample(logits: &Logits, p: &SamplingParams, step: u64) -> u32 {
    match logits {
        Logits::Dense(v) => sample_dense(v, p, step),
        Logits::Peaks(peaks) if p.is_greedy() || peaks.vocab() <= 1 => peaks.argmax(),
        Logits::Peaks(peaks) if p.top_k == 0 && p.top_p >= 1.0 => draw_peaks(
            peaks,
            (1.0 / f64::from(p.temperature)) as f32,
            uniform(p.seed, step),
        ),
        Logits::Peaks(_) => sample_dense(&logits.to_vec(), p, step),
    }
}

/// Plain temperature over every id of `peaks`, in id order as [`draw_dense`] walks: the floor ids
/// between two listed ids are one run of equal weights, so the draw lands in a run arithmetically.
fn draw_peaks(peaks: &Peaks, inv_t: f32, u: f64) -> u32 {
    let has_floor = peaks.floor_count() > 0;
    let max = peaks
        .iter()
        .map(|(_, s)| s)
        .chain(has_floor.then_some(peaks.floor()))
        .fold(f32::NEG_INFINITY, f32::max);
    let wf = weight(peaks.floor(), max, inv_t);
    let total: f64 = peaks
        .iter()
        .map(|(_, s)| weight(s, max, inv_t))
        .sum::<f64>()
        + peaks.floor_count() as f64 * wf;
    let target = u * total;
    let mut cum = 0.0;
    let mut next = 0u32;
    let runs = peaks
        .iter()
        .map(|(id, s)| (id, Some(s)))
        .chain([(peaks.vocab() as u32, None)]);
    for (id, score) in runs {
        // The floor run next..id.
        let run = f64::from(id - next) * wf;
        if run > 0.0 && target < cum + run {
            let k = ((target - cum) / wf) as u32;
            return next + k.min(id - next - 1);
        }
        cum += run;
        if let Some(s) = score {
            let w = weight(s, max, inv_t);
            cum += w;
            if w > 0.0 && target < cum {
                return id;
            }
        }
        next = id + 1;
    }
    // Rounding left the draw past the total: it was at the very end.
    peaks.argmax()
}

/// As [`sample`], over one score per id.
pub fn sample_dense(logits: &[f32], p: &SamplingParams, step: u64) -> u32 {
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
    let k = if p.top_k > 0 {
        (p.top_k as usize).min(logits.len())
    } else {
        logits.len()
    };
    if k == logits.len() && p.top_p >= 1.0 {
        // Plain temperature over the whole vocabulary: no candidate list, no order.
        return draw_dense(logits, inv_t as f32, u);
    }
    let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
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
    let max = logits[sorted[0] as usize];
    let inv_t = inv_t as f32;
    let total = if all.len() == logits.len() {
        // The whole vocabulary, in some order: the dense sum is the same set, vectorized.
        block_sums(logits, max, inv_t)
            .iter()
            .map(|&b| f64::from(b))
            .sum()
    } else {
        all.iter()
            .map(|&i| weight(logits[i as usize], max, inv_t))
            .sum::<f64>()
    };
    let mut cum = 0.0;
    for (n, &i) in sorted.iter().enumerate() {
        cum += weight(logits[i as usize], max, inv_t) / total;
        if cum >= top_p as f64 {
            return Some(n + 1);
        }
    }
    None
}

/// The unnormalised probability of a logit: `e^((l - max) / T)`.
#[inline(always)]
fn weight(l: f32, max: f32, inv_t: f32) -> f64 {
    f64::from(exp_nonpos((l - max) * inv_t))
}

/// Draws from a candidate list (top-k or nucleus survivors) in the list's order.
fn draw(logits: &[f32], ids: &[u32], inv_t: f64, u: f64) -> u32 {
    let inv_t = inv_t as f32;
    let max = ids
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    let total: f64 = ids
        .iter()
        .map(|&i| weight(logits[i as usize], max, inv_t))
        .sum();
    let target = u * total;
    let mut cum = 0.0;
    for &i in ids {
        cum += weight(logits[i as usize], max, inv_t);
        if target < cum {
            return i;
        }
    }
    ids[ids.len() - 1]
}

/// Logits per block of the dense sampler; the block sums are the coarse index its draw walks.
const BLOCK: usize = 256;
/// Independent accumulators, so that sums and maxima vectorize and stay in a fixed order
/// (the same logits always give the same draw).
const LANES: usize = 8;

/// `e^x` for `x <= 0` in f32: relative error about 1e-6 near 0 and 1e-5 at the bottom of the
/// range, 0 below -87 (where f32 stops being normal). libm's scalar `exp` over the vocabulary was
/// most of a decode step once the model's own compute was gone (the `sim` engine at zero time);
/// sampling needs nothing closer, and [`exp8`] computes eight at once.
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    exp8([x; LANES])[0]
}

/// [`exp_nonpos`] on eight lanes, each step a loop over the lanes so that it compiles to vector
/// instructions.
#[inline(always)]
fn exp8(x: [f32; LANES]) -> [f32; LANES] {
    // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let mut t = [0f32; LANES];
    let mut r = [0f32; LANES];
    let mut out = [0f32; LANES];
    for j in 0..LANES {
        let c = if x[j] < -87.0 { -87.0 } else { x[j] };
        t[j] = c * std::f32::consts::LOG2_E;
    }
    for j in 0..LANES {
        r[j] = t[j] + MAGIC;
    }
    for j in 0..LANES {
        let f = (t[j] - (r[j] - MAGIC)) * std::f32::consts::LN_2;
        // e^f for |f| <= ln(2)/2, Taylor to the 7th power (truncation below 5e-9).
        let p = 1.0
            + f * (1.0
                + f * (1.0 / 2.0
                    + f * (1.0 / 6.0
                        + f * (1.0 / 24.0
                            + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
        // 2^n from the integer in r's low bits, placed in the exponent field.
        let two_n = f32::from_bits(
            r[j].to_bits()
                .wrapping_sub(MAGIC.to_bits())
                .wrapping_add(127)
                << 23,
        );
        // Below the range the lane is 0 (a mask, not a branch).
        let keep = 0u32.wrapping_sub(u32::from(x[j] >= -87.0));
        out[j] = f32::from_bits((p * two_n).to_bits() & keep);
    }
    out
}

fn max_logit(logits: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &l) in acc.iter_mut().zip(c) {
            *a = if l > *a { l } else { *a };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &l| if l > m { l } else { m })
}

/// The weight of each block of [`BLOCK`] logits.
fn block_sums(logits: &[f32], max: f32, inv_t: f32) -> Vec<f32> {
    logits
        .chunks(BLOCK)
        .map(|block| {
            let mut acc = [0.0f32; LANES];
            let chunks = block.chunks_exact(LANES);
            let rest = chunks.remainder();
            for c in chunks {
                let mut x = [0f32; LANES];
                for j in 0..LANES {
                    x[j] = (c[j] - max) * inv_t;
                }
                let w = exp8(x);
                for j in 0..LANES {
                    acc[j] += w[j];
                }
            }
            let tail: f32 = rest.iter().map(|&l| exp_nonpos((l - max) * inv_t)).sum();
            acc.iter().sum::<f32>() + tail
        })
        .collect()
}

/// Plain temperature sampling over the whole vocabulary without a candidate list: the block sums
/// find the block the draw lands in, then only that block is walked token by token.
fn draw_dense(logits: &[f32], inv_t: f32, u: f64) -> u32 {
    let max = max_logit(logits);
    let sums = block_sums(logits, max, inv_t);
    let total: f64 = sums.iter().map(|&b| f64::from(b)).sum();
    let target = u * total;
    let mut cum = 0.0;
    for (b, &sum) in sums.iter().enumerate() {
        let last_block = b + 1 == sums.len();
        if target >= cum + f64::from(sum) && !last_block {
            cum += f64::from(sum);
            continue;
        }
        let start = b * BLOCK;
        let mut last_nonzero = None;
        for (j, &l) in logits[start..(start + BLOCK).min(logits.len())]
            .iter()
            .enumerate()
        {
            let w = weight(l, max, inv_t);
            if w > 0.0 {
                last_nonzero = Some(start + j);
            }
            cum += w;
            if target < cum {
                return (start + j) as u32;
            }
        }
        // The walk's sum fell short of the block's by rounding: the draw was at its very end.
        if let Some(i) = last_nonzero {
            return i as u32;
        }
        break;
    }
    argmax(logits)
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

    /// Whether there are no stop strings (every text may be emitted as it comes).
    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
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
        assert_eq!(
            sample_dense(&[1.0, 3.0, 3.0], &SamplingParams::greedy(1), 0),
            1
        );
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let l = logits();
        let a: Vec<u32> = (0..50)
            .map(|s| sample_dense(&l, &params(1.0, 0, 0.9, 42), s))
            .collect();
        let b: Vec<u32> = (0..50)
            .map(|s| sample_dense(&l, &params(1.0, 0, 0.9, 42), s))
            .collect();
        let c: Vec<u32> = (0..50)
            .map(|s| sample_dense(&l, &params(1.0, 0, 0.9, 43), s))
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
            let t = sample_dense(&l, &params(5.0, 5, 1.0, 9), s);
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
            let t = sample_dense(&l, &params(1.0, 0, 0.7, 5), s) as usize;
            assert!(t < 2, "step {s} picked {t}");
            seen[t] = true;
        }
        assert_eq!(seen, [true, true], "both nucleus tokens are drawn");
    }

    #[test]
    fn top_p_with_a_large_vocabulary_uses_the_prefilter_and_agrees_with_the_full_sort() {
        let l = logits();
        for s in 0..100 {
            let t = sample_dense(&l, &params(0.7, 0, 0.5, 1), s);
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
    #[test]
    fn fast_exp_agrees_with_libm() {
        let mut x = -90.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = f64::from(exp_nonpos(x));
            if x < -87.0 {
                assert_eq!(got, 0.0, "{x}");
            } else {
                assert!((got - want).abs() <= 1e-5 * want, "e^{x}: {got} vs {want}");
            }
            x += 0.001;
        }
        assert_eq!(exp_nonpos(0.0), 1.0);
    }

    #[test]
    fn plain_temperature_follows_the_softmax() {
        // 1000 logits in 4 levels; the draw frequencies of each level match its probability.
        let l: Vec<f32> = (0..1000).map(|i| (i % 4) as f32 * 0.5).collect();
        let p = params(0.8, 0, 1.0, 11);
        let w: Vec<f64> = (0..4).map(|k| (k as f64 * 0.5 / 0.8).exp()).collect();
        let z: f64 = w.iter().sum();
        let n = 40_000;
        let mut count = [0usize; 4];
        for s in 0..n {
            count[sample_dense(&l, &p, s) as usize % 4] += 1;
        }
        for k in 0..4 {
            let want = w[k] / z;
            let got = count[k] as f64 / n as f64;
            // 5 standard deviations of a binomial proportion.
            let sd = (want * (1.0 - want) / n as f64).sqrt();
            assert!((got - want).abs() < 5.0 * sd, "level {k}: {got} vs {want}");
        }
    }

    #[test]
    fn plain_temperature_reaches_every_block_and_both_ends() {
        // Equal logits over 1000 tokens (4 blocks, the last one short): the draw u maps to token
        // floor(u * 1000), so the first and last tokens and every block are drawn.
        let l = vec![0.0f32; 1000];
        assert_eq!(draw_dense(&l, 1.0, 0.0), 0);
        assert_eq!(draw_dense(&l, 1.0, 0.999_999_9), 999);
        assert_eq!(draw_dense(&l, 1.0, 0.2561), 256);
        assert_eq!(draw_dense(&l, 1.0, 0.7681), 768);
        // A single dominant logit takes every draw, wherever it sits.
        let mut l = vec![-1000.0f32; 1000];
        l[777] = 0.0;
        for u in [0.0, 0.3, 0.999_999] {
            assert_eq!(draw_dense(&l, 1.0, u), 777);
        }
    }

    fn naive_argmax(l: &[f32]) -> u32 {
        let mut best: Option<usize> = None;
        for (i, &x) in l.iter().enumerate() {
            if !x.is_nan() && best.is_none_or(|b| x > l[b]) {
                best = Some(i);
            }
        }
        best.unwrap_or(0) as u32
    }

    #[test]
    fn argmax_in_lanes_finds_the_first_maximum_anywhere() {
        for n in [1usize, 7, 8, 9, 64, 1000, 1003] {
            for at in [0, n / 3, n - 1] {
                let mut l: Vec<f32> = (0..n).map(|i| ((i * 7919) % 101) as f32 / 101.0).collect();
                l[at] = 5.0;
                assert_eq!(argmax(&l), at as u32, "n {n} at {at}");
                // A tie later, in another lane and in the same lane: the first still wins.
                for other in [at + 1, at + 8] {
                    if other < n {
                        let mut t = l.clone();
                        t[other] = 5.0;
                        assert_eq!(argmax(&t), at as u32, "n {n} at {at} tie {other}");
                    }
                }
                let mut t = l.clone();
                t[n / 2] = f32::NAN;
                assert_eq!(argmax(&t), naive_argmax(&t), "n {n} NaN");
            }
        }
        assert_eq!(argmax(&[f32::NAN; 9]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 9]), 0);
        let mut l = [f32::NAN; 11];
        l[9] = f32::NEG_INFINITY;
        assert_eq!(argmax(&l), 9);
    }

    fn peaks(vocab: usize, floor: f32, listed: &[(u32, f32)]) -> Logits {
        let mut p = Peaks::new(vocab, floor);
        for &(id, s) in listed {
            p.raise(id, s);
        }
        Logits::Peaks(p)
    }

    #[test]
    fn peaks_draw_the_same_distribution_as_their_dense_form() {
        // The simulated model's shape: a few peaks over a floor, with the floor's total weight
        // comparable to the peaks' at temperature 1.
        let l = peaks(
            5000,
            0.0,
            &[(17, 9.0), (2500, 8.0), (4999, 7.5), (0, 6.0), (1234, 8.5)],
        );
        let dense = l.to_vec();
        let n = 20_000u64;
        let (mut agree, mut floor_draws) = (0, 0);
        let mut count = std::collections::HashMap::new();
        for s in 0..n {
            let p = params(1.0, 0, 1.0, 3);
            let a = sample(&l, &p, s);
            let b = sample_dense(&dense, &p, s);
            agree += usize::from(a == b);
            *count.entry(a).or_insert(0usize) += 1;
            floor_draws += usize::from(l.get(a) == 0.0);
        }
        // The same draw u lands on the same id but for f32 rounding of the dense block sums.
        assert!(agree as f64 > 0.99 * n as f64, "{agree} of {n}");
        let z: f64 = [9.0f64, 8.0, 7.5, 6.0, 8.5]
            .iter()
            .map(|x| (x - 9.0).exp())
            .sum::<f64>()
            + 4995.0 * (-9.0f64).exp();
        for (id, score) in [(17u32, 9.0f64), (1234, 8.5), (0, 6.0)] {
            let want = (score - 9.0).exp() / z;
            let got = count.get(&id).copied().unwrap_or(0) as f64 / n as f64;
            let sd = (want * (1.0 - want) / n as f64).sqrt();
            assert!((got - want).abs() < 5.0 * sd, "id {id}: {got} vs {want}");
        }
        let want = 4995.0 * (-9.0f64).exp() / z;
        let got = floor_draws as f64 / n as f64;
        let sd = (want * (1.0 - want) / n as f64).sqrt();
        assert!((got - want).abs() < 5.0 * sd, "floor: {got} vs {want}");
    }

    #[test]
    fn peaks_draws_reach_both_ends_and_every_run() {
        // Equal scores everywhere: u maps to id floor(u * vocab), as in the dense walk.
        let l = peaks(1000, 0.0, &[]);
        let p = |u: f64| draw_peaks(&Peaks::new(1000, 0.0), 1.0, u);
        assert_eq!(p(0.0), 0);
        assert_eq!(p(0.999_999_9), 999);
        assert_eq!(p(0.5001), 500);
        assert_eq!(l.argmax(), 0);
        // One dominant peak takes every draw.
        let mut d = Peaks::new(1000, -1000.0);
        d.raise(777, 0.0);
        for u in [0.0, 0.3, 0.999_999] {
            assert_eq!(draw_peaks(&d, 1.0, u), 777);
        }
        // Greedy, top-k and top-p take the peaks' dense semantics.
        let l = peaks(300, 0.0, &[(5, 3.0), (200, 4.0), (299, 2.0)]);
        assert_eq!(sample(&l, &SamplingParams::greedy(1), 0), 200);
        for s in 0..200 {
            let t = sample(&l, &params(2.0, 2, 1.0, 1), s);
            assert!(t == 5 || t == 200, "{t}");
            assert_eq!(
                sample(&l, &params(0.7, 0, 0.5, 4), s),
                sample_dense(&l.to_vec(), &params(0.7, 0, 0.5, 4), s)
            );
        }
    }
}
