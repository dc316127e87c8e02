//! Placement policies. A policy ranks workers by a score computed when a worker's load changes
//! (a heartbeat, or work the router has just placed on it), so that a decision itself is a lookup.
//! Policies that need the request (prefix reuse, priorities) override `pick` and may scan.

use std::fmt;

use crate::candidates::Candidates;
use crate::types::{Leg, Load, RequestShape};

/// How the router chooses the worker for each leg. Object-safe: the router holds a
/// `Box<dyn Policy>`, so more policies drop in without touching the registry.
pub trait Policy: Send + Sync + fmt::Debug {
    /// Short name for logs and metrics labels.
    fn name(&self) -> &'static str;

    /// Rank of a worker with this effective load for `leg`; lower is better. Called on every load
    /// change, not per decision; must be a pure function of its arguments.
    fn score(&self, leg: Leg, load: &Load) -> u64;

    /// Index into `candidates` of the worker to use, or `None` to place nothing. `candidates` is
    /// never empty. The default takes the lowest score, ties to the lowest worker id, in O(1).
    fn pick(&self, leg: Leg, candidates: &Candidates, shape: &RequestShape) -> Option<usize> {
        let _ = (leg, shape);
        candidates.best()
    }
}

/// The default policy: prefill on the worker with the fewest queued prefill tokens; decode on the
/// worker with the most free KV blocks, then the fewest running sequences.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeastLoaded;

impl Policy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least_loaded"
    }

    fn score(&self, leg: Leg, load: &Load) -> u64 {
        match leg {
            Leg::Prefill => load.queued_prefill_tokens,
            Leg::Decode => {
                // More free blocks first, so their complement goes in the high half; running
                // sequences break ties in the low half. Pools beyond 2^32 blocks do not exist.
                let free = u32::try_from(load.free_kv_blocks).unwrap_or(u32::MAX);
                (u64::from(u32::MAX - free) << 32) | u64::from(load.running_seqs)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn load(queued: u64, free: u64, running: u32) -> Load {
        Load {
            queued_prefill_tokens: queued,
            free_kv_blocks: free,
            running_seqs: running,
            ..Load::default()
        }
    }

    fn pick(leg: Leg, loads: &[Load]) -> Option<usize> {
        let mut c = Candidates::default();
        for (i, l) in loads.iter().enumerate() {
            let score = LeastLoaded.score(leg, l);
            c.upsert(Arc::from(format!("w{i}")), i as u32, *l, score);
        }
        LeastLoaded.pick(leg, &c, &RequestShape::default())
    }

    #[test]
    fn prefill_takes_fewest_queued_tokens_ties_to_lowest_id() {
        let loads = [
            load(300, 0, 0),
            load(100, 0, 9),
            load(200, 0, 0),
            load(100, 0, 0),
        ];
        assert_eq!(pick(Leg::Prefill, &loads), Some(1));
    }

    #[test]
    fn decode_takes_most_free_blocks_then_fewest_running() {
        let loads = [
            load(0, 10, 0),
            load(0, 50, 4),
            load(0, 50, 2),
            load(0, 49, 0),
        ];
        assert_eq!(pick(Leg::Decode, &loads), Some(2));
        let equal = [load(0, 50, 2), load(0, 50, 2)];
        assert_eq!(pick(Leg::Decode, &equal), Some(0));
    }

    #[test]
    fn decode_score_orders_free_blocks_over_running() {
        let p = LeastLoaded;
        assert!(p.score(Leg::Decode, &load(0, 11, 1000)) < p.score(Leg::Decode, &load(0, 10, 0)));
        assert!(p.score(Leg::Decode, &load(0, 10, 1)) < p.score(Leg::Decode, &load(0, 10, 2)));
        assert_eq!(p.score(Leg::Decode, &load(0, u64::MAX, 0)), 0);
    }
}
