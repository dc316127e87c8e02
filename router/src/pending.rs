//! Work the router has placed on a worker that the worker's heartbeats may not show yet. Without it,
//! every request of a burst sees the same stale load and lands on the same worker.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::types::Load;

/// Most entries kept per worker; past it, new work is folded into the newest entry, which then
/// settles a little early (harmless: the next heartbeat reports it anyway).
const MAX_ENTRIES: usize = 1024;

/// What one placement adds to a worker's load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Delta {
    /// Prompt tokens queued by a prefill leg.
    pub prefill_tokens: u64,
    /// Prefill requests queued.
    pub prefill_seqs: u32,
    /// KV blocks reserved by a decode leg.
    pub kv_blocks: u64,
    /// Sequences that will run on a decode leg.
    pub decode_seqs: u32,
    /// Their prompt tokens: context the decode batch will attend to.
    pub decode_tokens: u64,
    /// The tightest ITL budget among them, milliseconds; 0 for none.
    pub itl_budget_ms: u32,
}

impl Delta {
    fn add(&mut self, other: Delta) {
        self.prefill_tokens = self.prefill_tokens.saturating_add(other.prefill_tokens);
        self.prefill_seqs = self.prefill_seqs.saturating_add(other.prefill_seqs);
        self.kv_blocks = self.kv_blocks.saturating_add(other.kv_blocks);
        self.decode_seqs = self.decode_seqs.saturating_add(other.decode_seqs);
        self.decode_tokens = self.decode_tokens.saturating_add(other.decode_tokens);
        self.itl_budget_ms = tighter(self.itl_budget_ms, other.itl_budget_ms);
    }
}

/// The tighter of two budgets in milliseconds, 0 meaning none.
pub(crate) fn tighter(a: u32, b: u32) -> u32 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

/// The recent placements of one worker and their sum.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    entries: VecDeque<(Instant, Delta)>,
    sum: Delta,
}

impl Pending {
    /// Records work placed at `at`.
    pub fn add(&mut self, at: Instant, delta: Delta) {
        self.sum.add(delta);
        let full = self.entries.len() >= MAX_ENTRIES;
        match self.entries.back_mut() {
            Some((_, last)) if full => last.add(delta),
            _ => self.entries.push_back((at, delta)),
        }
    }

    /// On a heartbeat received at `now`: work placed more than `lag` ago is taken to be in the
    /// report; the rest stays on top of it.
    pub fn settle(&mut self, now: Instant, lag: Duration) {
        let Some(cutoff) = now.checked_sub(lag) else {
            return;
        };
        let mut dropped = false;
        while let Some(&(at, _)) = self.entries.front() {
            if at > cutoff {
                break;
            }
            self.entries.pop_front();
            dropped = true;
        }
        if dropped {
            self.sum = Delta::default();
            for (_, d) in &self.entries {
                self.sum.add(*d);
            }
        }
    }

    /// Prompt tokens still queued now on a worker that reported `reported` tokens at `at` and
    /// computes `rate` tokens a second while it has any: one FCFS queue that drains between the
    /// report and each placement since, and after the last.
    pub fn queued_now(&self, reported: u64, at: Instant, now: Instant, rate: f64) -> u64 {
        let drain = |q: f64, from: Instant, to: Instant| {
            (q - rate * to.saturating_duration_since(from).as_secs_f64()).max(0.0)
        };
        let mut q = reported as f64;
        let mut t = at;
        for &(placed, d) in &self.entries {
            if d.prefill_tokens == 0 {
                continue;
            }
            if placed > t {
                q = drain(q, t, placed);
                t = placed;
            }
            q += d.prefill_tokens as f64;
        }
        drain(q, t, now.max(t)).round() as u64
    }

    /// The reported load with the pending work added.
    pub fn apply(&self, reported: &Load) -> Load {
        let d = self.sum;
        Load {
            queued_prefill_tokens: reported
                .queued_prefill_tokens
                .saturating_add(d.prefill_tokens),
            waiting_seqs: reported.waiting_seqs.saturating_add(d.prefill_seqs),
            free_kv_blocks: reported.free_kv_blocks.saturating_sub(d.kv_blocks),
            running_seqs: reported.running_seqs.saturating_add(d.decode_seqs),
            reservations: reported.reservations.saturating_add(d.decode_seqs),
            reserved_prompt_tokens: reported
                .reserved_prompt_tokens
                .saturating_add(d.decode_tokens),
            tightest_itl_budget_ms: tighter(reported.tightest_itl_budget_ms, d.itl_budget_ms),
            ..*reported
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn tokens(n: u64) -> Delta {
        Delta {
            prefill_tokens: n,
            prefill_seqs: 1,
            ..Delta::default()
        }
    }

    #[test]
    fn apply_adds_queued_work_and_takes_blocks() {
        let mut p = Pending::default();
        let t0 = Instant::now();
        p.add(t0, tokens(100));
        p.add(
            t0,
            Delta {
                kv_blocks: 7,
                decode_seqs: 1,
                decode_tokens: 100,
                itl_budget_ms: 80,
                ..Delta::default()
            },
        );
        p.add(
            t0,
            Delta {
                decode_seqs: 1,
                decode_tokens: 5,
                itl_budget_ms: 0,
                ..Delta::default()
            },
        );
        let reported = Load {
            queued_prefill_tokens: 50,
            free_kv_blocks: 5,
            running_seqs: 2,
            ..Load::default()
        };
        let eff = p.apply(&reported);
        assert_eq!(eff.queued_prefill_tokens, 150);
        assert_eq!(eff.waiting_seqs, 1);
        assert_eq!(eff.free_kv_blocks, 0, "saturates rather than wrapping");
        assert_eq!(eff.running_seqs, 4);
        assert_eq!(eff.reservations, 2);
        // Placed sequences count as running (above); their prompts as reserved context.
        assert_eq!((eff.reserved_seqs, eff.reserved_prompt_tokens), (0, 105));
        assert_eq!(
            eff.tightest_itl_budget_ms, 80,
            "a budget-less placement changes nothing"
        );
        let tighter_reported = Load {
            tightest_itl_budget_ms: 50,
            ..reported
        };
        assert_eq!(p.apply(&tighter_reported).tightest_itl_budget_ms, 50);
    }

    #[test]
    fn the_queue_drains_between_placements() {
        let mut p = Pending::default();
        let t0 = Instant::now();
        // 1,000 tokens reported at t0, draining at 1,000 a second.
        assert_eq!(p.queued_now(1000, t0, t0 + 400 * MS, 1000.0), 600);
        assert_eq!(p.queued_now(1000, t0, t0 + 2000 * MS, 1000.0), 0);
        // 300 placed at 1.5 s, when the reported 1,000 are gone: 300 then, 100 at 1.7 s.
        p.add(t0 + 1500 * MS, tokens(300));
        assert_eq!(p.queued_now(1000, t0, t0 + 1700 * MS, 1000.0), 100);
        // 200 more placed at 1.6 s, on top of the 200 left.
        p.add(t0 + 1600 * MS, tokens(200));
        assert_eq!(p.queued_now(1000, t0, t0 + 1600 * MS, 1000.0), 400);
        assert_eq!(p.queued_now(1000, t0, t0 + 1700 * MS, 1000.0), 300);
        // No measured speed: nothing drains.
        assert_eq!(p.queued_now(1000, t0, t0 + 1700 * MS, 0.0), 1500);
    }

    #[test]
    fn settle_drops_work_older_than_the_lag_only() {
        let mut p = Pending::default();
        let t0 = Instant::now();
        p.add(t0, tokens(1));
        p.add(t0 + 100 * MS, tokens(10));
        p.add(t0 + 300 * MS, tokens(100));
        p.settle(t0 + 350 * MS, 250 * MS);
        assert_eq!(p.apply(&Load::default()).queued_prefill_tokens, 100);
        p.settle(t0 + 549 * MS, 250 * MS);
        assert_eq!(p.apply(&Load::default()).queued_prefill_tokens, 100);
        p.settle(t0 + 550 * MS, 250 * MS);
        assert_eq!(p.apply(&Load::default()).queued_prefill_tokens, 0);
    }

    #[test]
    fn entries_are_bounded_and_nothing_is_lost() {
        let mut p = Pending::default();
        let t0 = Instant::now();
        for _ in 0..(MAX_ENTRIES + 10) {
            p.add(t0, tokens(1));
        }
        assert_eq!(p.entries.len(), MAX_ENTRIES);
        assert_eq!(
            p.apply(&Load::default()).queued_prefill_tokens,
            MAX_ENTRIES as u64 + 10
        );
    }
}
