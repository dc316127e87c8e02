//! The simulator's plain state: requests, instances and events.

use std::cmp::{Ordering, Reverse};
use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};

use crate::workload::RequestSpec;

#[derive(Debug, Clone, Copy)]
pub(super) struct Req {
    pub arrival: f64,
    pub input: u32,
    pub output: u32,
    pub blocks: u64,
    /// Decode (or aggregated) instance holding its KV.
    pub inst: u32,
    /// Prompt tokens already computed (chunked prefill).
    pub done: u32,
    pub first: f64,
    pub finish: f64,
}

impl Req {
    pub fn new(r: RequestSpec, blocks: u64) -> Self {
        Req {
            arrival: r.arrival,
            input: r.input,
            output: r.output,
            blocks,
            inst: 0,
            done: 0,
            first: f64::NAN,
            finish: f64::NAN,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Arrival(u32),
    PrefillDone(u32),
    KvReady(u32),
    DecodeDone(u32),
    AggDone(u32),
    /// A request waiting in admission's queue must have left it by now.
    Deadline(u32),
}

/// Ordered by time, then by insertion, so that runs are reproducible.
#[derive(Debug, Clone, Copy)]
pub(super) struct Event {
    pub time: f64,
    pub seq: u64,
    pub kind: Kind,
}

impl PartialEq for Event {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    fn cmp(&self, o: &Self) -> Ordering {
        self.time.total_cmp(&o.time).then(self.seq.cmp(&o.seq))
    }
}

/// Sequences decoding together. A sequence that joined at step `s0` with `c0` tokens of context has
/// `c0 + (steps - s0)` now, so the batch's total context is kept from three running sums.
#[derive(Debug, Default)]
pub(super) struct DecodeSet {
    pub running: u32,
    pub steps: u64,
    sum_c0: u64,
    sum_s0: u64,
    /// (finishing step, request, c0, s0)
    finish: BinaryHeap<Reverse<(u64, u32, u64, u64)>>,
}

impl DecodeSet {
    pub fn context(&self) -> u64 {
        self.sum_c0 + u64::from(self.running) * self.steps - self.sum_s0
    }

    /// Adds a sequence with `c0` tokens of context that needs `remaining` more tokens (>= 1).
    pub fn add(&mut self, id: u32, c0: u64, remaining: u32) {
        self.running += 1;
        self.sum_c0 += c0;
        self.sum_s0 += self.steps;
        self.finish.push(Reverse((
            self.steps + u64::from(remaining),
            id,
            c0,
            self.steps,
        )));
    }

    /// Ends a step: every running sequence produced a token. Finished requests go to `out`.
    pub fn complete_step(&mut self, out: &mut Vec<u32>) {
        self.steps += 1;
        while let Some(&Reverse((at, id, c0, s0))) = self.finish.peek() {
            if at > self.steps {
                break;
            }
            self.finish.pop();
            self.running -= 1;
            self.sum_c0 -= c0;
            self.sum_s0 -= s0;
            out.push(id);
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct PrefillInst {
    /// Prompts not yet fully computed, FCFS; only the front one can be part-computed.
    pub queue: VecDeque<u32>,
    pub queued_tokens: u64,
    /// Prompt chunks in the current step: (request, tokens).
    pub chunks: Vec<(u32, u32)>,
    pub busy: bool,
    pub started: f64,
}

/// The ITL budgets of the sequences an instance holds (reserved or running), so that admission
/// reads the tightest. Keyed by the bits of a positive number, which order as the numbers do.
#[derive(Debug, Default)]
pub(super) struct ItlBudgets(BTreeMap<u64, u32>);

impl ItlBudgets {
    pub fn add(&mut self, seconds: f64) {
        *self.0.entry(seconds.to_bits()).or_insert(0) += 1;
    }

    pub fn remove(&mut self, seconds: f64) {
        if let Entry::Occupied(mut e) = self.0.entry(seconds.to_bits()) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
    }

    pub fn tightest(&self) -> Option<f64> {
        self.0.keys().next().map(|b| f64::from_bits(*b))
    }
}

#[derive(Debug)]
pub(super) struct DecodeInst {
    pub free_blocks: u64,
    /// Requests holding blocks here (reserved or running).
    pub holders: u32,
    /// Prompt tokens of the holders not yet in `set` (prefilling, in transfer, or ready).
    pub reserved_tokens: u64,
    pub itl: ItlBudgets,
    pub ready: VecDeque<u32>,
    pub set: DecodeSet,
    pub busy: bool,
}

impl DecodeInst {
    pub fn new(blocks: u64) -> Self {
        DecodeInst {
            free_blocks: blocks,
            holders: 0,
            reserved_tokens: 0,
            itl: ItlBudgets::default(),
            ready: VecDeque::new(),
            set: DecodeSet::default(),
            busy: false,
        }
    }
}

#[derive(Debug)]
pub(super) struct AggInst {
    pub free_blocks: u64,
    pub holders: u32,
    /// Prompt tokens of the holders not yet in `set`.
    pub reserved_tokens: u64,
    pub itl: ItlBudgets,
    /// Admitted requests whose prompt is not yet fully computed, FCFS.
    pub waiting: VecDeque<u32>,
    pub queued_tokens: u64,
    /// Requests in `waiting` with part of their prompt computed.
    pub partial: u32,
    /// Prompt chunks in the current step: (request, tokens).
    pub chunks: Vec<(u32, u32)>,
    /// Prefilled sequences waiting for a decode slot.
    pub ready: VecDeque<u32>,
    pub set: DecodeSet,
    pub busy: bool,
}

impl AggInst {
    pub fn new(blocks: u64) -> Self {
        AggInst {
            free_blocks: blocks,
            holders: 0,
            reserved_tokens: 0,
            itl: ItlBudgets::default(),
            waiting: VecDeque::new(),
            queued_tokens: 0,
            partial: 0,
            chunks: Vec::new(),
            ready: VecDeque::new(),
            set: DecodeSet::default(),
            busy: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_set_tracks_context_and_finishes_in_order() {
        let mut s = DecodeSet::default();
        s.add(1, 100, 2);
        s.add(2, 10, 1);
        assert_eq!(s.context(), 110);
        let mut out = Vec::new();
        s.complete_step(&mut out);
        assert_eq!(out, vec![2]);
        assert_eq!(s.context(), 101);
        s.add(3, 50, 3);
        assert_eq!(s.context(), 151);
        out.clear();
        s.complete_step(&mut out);
        assert_eq!(out, vec![1]);
        assert_eq!((s.running, s.context()), (1, 51));
    }

    #[test]
    fn the_tightest_itl_budget_follows_adds_and_removes() {
        let mut b = ItlBudgets::default();
        assert_eq!(b.tightest(), None);
        b.add(0.05);
        b.add(0.02);
        b.add(0.02);
        assert_eq!(b.tightest(), Some(0.02));
        b.remove(0.02);
        assert_eq!(
            b.tightest(),
            Some(0.02),
            "one of the two 20 ms budgets is left"
        );
        b.remove(0.02);
        assert_eq!(b.tightest(), Some(0.05));
        b.remove(0.3);
        b.remove(0.05);
        assert_eq!(b.tightest(), None);
    }
}
