//! Requests in flight as admission counts them for its load regime: each from its placement until
//! the end its own prediction gives it (first token, then a step per token). The count follows a
//! burst at once, without waiting for workers' reports, and nothing lost (a client gone, a gateway
//! that died) stays counted.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::calibrate::regime;
use super::predict::Prediction;

/// Most placements followed: beyond that the earliest to end are let go (a benchmark placing
/// without time passing must not grow it without bound).
const MAX_TRACKED: usize = 1 << 16;

/// The predicted ends of placements still in flight, in seconds on the caller's clock.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    /// Bits of non-negative seconds, which order as the numbers do.
    ends: BinaryHeap<Reverse<u64>>,
}

impl InFlight {
    /// A placement at `now_s` with this prediction, for a request of up to `new_tokens` tokens.
    pub fn placed(&mut self, now_s: f64, p: &Prediction, new_tokens: u32) {
        let life = p.ttft + p.itl * f64::from(new_tokens.saturating_sub(1));
        let end = now_s + if life.is_finite() { life.max(0.0) } else { 0.0 };
        if self.ends.len() >= MAX_TRACKED {
            self.ends.pop();
        }
        self.ends.push(Reverse(end.max(0.0).to_bits()));
    }

    /// Requests predicted to be still running at `now_s`.
    pub fn count(&mut self, now_s: f64) -> usize {
        let now = now_s.max(0.0).to_bits();
        while self.ends.peek().is_some_and(|Reverse(end)| *end <= now) {
            self.ends.pop();
        }
        self.ends.len()
    }

    /// The load regime at `now_s` of a cluster of `prefill`, `decode` and `aggregated` workers: a
    /// serving unit is a prefill and a decode worker, or an aggregated one.
    pub fn regime(&mut self, now_s: f64, prefill: usize, decode: usize, aggregated: usize) -> u8 {
        let units = ((prefill + decode) as f64 / 2.0 + aggregated as f64).max(1.0);
        regime(self.count(now_s) as f64 / units)
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
    fn a_placement_counts_until_its_predicted_end() {
        let mut f = InFlight::default();
        // 100 ms to the first token, then 9 more tokens at 10 ms: it ends at 1.19 s.
        f.placed(1.0, &pred(0.1, 0.01), 10);
        f.placed(1.0, &pred(0.5, 0.0), 1);
        assert_eq!(f.count(1.0), 2);
        assert_eq!(f.count(1.189), 2);
        assert_eq!(f.count(1.19), 1);
        assert_eq!(f.count(1.5), 0);
    }

    #[test]
    fn the_regime_counts_pairs_and_aggregated_workers_as_units() {
        let mut f = InFlight::default();
        assert_eq!(f.regime(0.0, 2, 2, 0), 0);
        f.placed(0.0, &pred(1.0, 0.0), 1);
        // One request on two pairs: half a request per unit.
        assert_eq!(f.regime(0.0, 2, 2, 0), 2);
        // On four aggregated workers, a quarter.
        assert_eq!(f.regime(0.0, 0, 0, 4), 1);
        assert_eq!(f.regime(1.0, 2, 2, 0), 0);
    }
}
