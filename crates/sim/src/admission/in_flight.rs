//! Requests in flight as admission counts them: each from its placement until its gateway reports
//! its end (finished, cut short or failed), and among them those still waiting for their first
//! token, which the load regime counts. A report that never comes (a gateway that died) is covered
//! by a guard: a placement leaves the count at the latest [`GUARD_FACTOR`] times its predicted life
//! after it was placed, and never before [`GUARD_MIN_S`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

use super::calibrate::regime;
use super::predict::Prediction;

/// Most placements followed: beyond that the earliest guards run out first (a benchmark placing
/// without time passing must not grow it without bound).
const MAX_TRACKED: usize = 1 << 16;
/// A placement whose end is never reported leaves the count after this many times its predicted
/// life...
pub const GUARD_FACTOR: f64 = 4.0;
/// ...and no sooner than this, seconds.
pub const GUARD_MIN_S: f64 = 60.0;

/// Placements still in flight, by ticket, with the guards that let go of lost ones (in seconds on
/// the caller's clock).
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    live: HashSet<u64>,
    /// The live placements whose first token has not been reported.
    waiting: HashSet<u64>,
    /// (bits of the guard's time, ticket); bits of non-negative seconds order as the numbers do.
    guards: BinaryHeap<Reverse<(u64, u64)>>,
}

impl InFlight {
    /// Placement `ticket` at `now_s` with this prediction, for up to `new_tokens` tokens.
    pub fn placed(&mut self, ticket: u64, now_s: f64, p: &Prediction, new_tokens: u32) {
        let life = p.ttft + p.itl * f64::from(new_tokens.saturating_sub(1));
        let life = if life.is_finite() { life.max(0.0) } else { 0.0 };
        let guard = (now_s + (GUARD_FACTOR * life).max(GUARD_MIN_S)).max(0.0);
        if self.guards.len() >= MAX_TRACKED
            && let Some(Reverse((_, t))) = self.guards.pop()
        {
            self.live.remove(&t);
            self.waiting.remove(&t);
        }
        self.live.insert(ticket);
        self.waiting.insert(ticket);
        self.guards.push(Reverse((guard.to_bits(), ticket)));
    }

    /// Placement `ticket` sent its first token.
    pub fn first_token(&mut self, ticket: u64) {
        self.waiting.remove(&ticket);
    }

    /// Placement `ticket` ended.
    pub fn ended(&mut self, ticket: u64) {
        self.live.remove(&ticket);
        self.waiting.remove(&ticket);
    }

    /// Requests counted in flight as of the last [`InFlight::count`] (guards that ran out since
    /// are let go at the next).
    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// Of [`InFlight::len`], those waiting for their first token.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests in flight at `now_s`.
    pub fn count(&mut self, now_s: f64) -> usize {
        let now = now_s.max(0.0).to_bits();
        while let Some(&Reverse((guard, ticket))) = self.guards.peek() {
            if guard > now && self.live.contains(&ticket) {
                break;
            }
            self.guards.pop();
            if guard <= now {
                self.live.remove(&ticket);
                self.waiting.remove(&ticket);
            }
        }
        self.live.len()
    }

    /// The load regime at `now_s` of a cluster with `prefill` workers that compute prompts
    /// (prefill or aggregated): requests waiting for their first token per such worker. What
    /// the model leaves out of a TTFT grows with the prompts queued ahead; a decode batch, which
    /// the model predicts in full, would put a large cluster's normal load among its overloads.
    pub fn regime(&mut self, now_s: f64, prefill: usize) -> u8 {
        self.count(now_s);
        regime(self.waiting.len() as f64 / prefill.max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pred(ttft: f64, itl: f64) -> Prediction {
        Prediction {
            ttft,
            ttft_bound: ttft,
            ttft_idle_bound: ttft,
            itl,
            itl_bound: itl,
            itl_idle_bound: itl,
            ttft_raw: ttft,
            itl_raw: itl,
            regime: 0,
        }
    }

    #[test]
    fn a_placement_counts_until_its_end_is_reported() {
        let mut f = InFlight::default();
        f.placed(1, 1.0, &pred(0.1, 0.01), 10);
        f.placed(2, 1.0, &pred(0.5, 0.0), 1);
        assert_eq!(f.count(1.0), 2);
        // Running past its prediction, it still counts.
        assert_eq!(f.count(5.0), 2);
        f.ended(1);
        assert_eq!(f.count(5.0), 1);
        f.ended(1);
        f.ended(99);
        assert_eq!(f.count(5.0), 1);
    }

    #[test]
    fn a_lost_placement_leaves_at_its_guard() {
        let mut f = InFlight::default();
        // Predicted to live 100 s: its guard is at 400 s after its placement.
        f.placed(1, 0.0, &pred(100.0, 0.0), 1);
        // Predicted to live 0.6 s: the guard's minimum, 60 s.
        f.placed(2, 0.0, &pred(0.1, 0.05), 11);
        f.ended(2);
        f.placed(3, 0.0, &pred(0.1, 0.05), 11);
        assert_eq!(f.count(59.9), 2);
        assert_eq!(f.count(60.0), 1);
        assert_eq!(f.count(399.9), 1);
        assert_eq!(f.count(400.0), 0);
    }

    #[test]
    fn the_regime_counts_requests_waiting_for_their_first_token_per_prefill_worker() {
        let mut f = InFlight::default();
        assert_eq!(f.regime(0.0, 2), 0);
        f.placed(7, 0.0, &pred(1.0, 0.0), 1);
        f.placed(8, 0.0, &pred(1.0, 0.0), 1);
        // Two waiting on two prefill workers: one each.
        assert_eq!(f.regime(0.0, 2), 3);
        // On four, half.
        assert_eq!(f.regime(0.0, 4), 2);
        // A decoding request is in flight but no longer queued for a prefill.
        f.first_token(7);
        assert_eq!((f.count(0.0), f.regime(0.0, 4)), (2, 1));
        f.ended(8);
        assert_eq!((f.count(0.0), f.regime(0.0, 4)), (1, 0));
        // A guard that runs out lets go of a waiting request too.
        f.placed(9, 0.0, &pred(1.0, 0.0), 1);
        assert_eq!(f.regime(59.0, 4), 1);
        assert_eq!((f.count(60.0), f.regime(60.0, 4)), (0, 0));
    }
}
