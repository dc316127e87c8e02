//! The batch loop's inbox: everything that reaches the engine from outside its thread comes in
//! here as a command (a sequence joining, a prompt to compute, a cancel, a migration's snapshot,
//! detach or reattach), and the loop takes them between two steps.
use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use tandem_engine::sampling::{FinishReason, SamplingParams};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::batch::Running;
use crate::events::{Event, Failure, Moved};

/// A committed reservation that asks to run.
pub struct Joiner {
    pub reservation_id: u64,
    /// Positions whose KV the reservation holds.
    pub kv_tokens: usize,
    /// The last token the stream's caller has (it has no KV yet: the next step takes it).
    pub first_token: u32,
    /// Tokens generated before this stream, `first_token` included.
    pub generated_before: u32,
    pub sampling: SamplingParams,
    pub tx: UnboundedSender<Event>,
}

/// Aggregated mode: a prompt to compute inside the running batch, into its own reservation.
pub struct PrefillJob {
    pub reservation_id: u64,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub cancel: Arc<AtomicBool>,
    /// Taken when answered.
    pub reply: Option<oneshot::Sender<Result<Prefilled, Failure>>>,
}

/// A computed prompt: its first token and when its compute started and ended.
#[derive(Debug, Clone, Copy)]
pub struct Prefilled {
    pub first_token: u32,
    pub finish: Option<FinishReason>,
    pub started: Instant,
    pub finished: Instant,
}

/// A running sequence's KV as it stands between two steps.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Positions with KV, and the blocks holding them (and maybe room beyond).
    pub kv_tokens: usize,
    pub blocks: Vec<u32>,
    /// Tokens it may still generate.
    pub left: u32,
}

/// A sequence taken out of the batch at a token boundary: the engine still holds its KV, and no
/// step touches it until it is put back ([`Inbox::reattach`]) or cancelled.
pub struct Detached {
    pub(crate) run: Running,
    pub kv_tokens: usize,
    pub blocks: Vec<u32>,
}

impl Detached {
    pub fn reservation_id(&self) -> u64 {
        self.run.id
    }

    /// Tokens generated so far, the last one sent included.
    pub fn generated(&self) -> u32 {
        self.run.seq.generated()
    }

    /// Ends its Decode stream: the sequence goes on at `to`. `false` if the stream's caller went
    /// away.
    pub fn end_stream(self, to: Moved) -> bool {
        self.run.tx.send(Event::Moved(to)).is_ok()
    }
}

/// The loop's inbox.
#[derive(Default)]
pub struct Inbox {
    queue: Mutex<Inboxed>,
    wake: Condvar,
}

#[derive(Default)]
pub(crate) struct Inboxed {
    pub(crate) joiners: VecDeque<Joiner>,
    pub(crate) prefills: VecDeque<PrefillJob>,
    pub(crate) cancels: Vec<u64>,
    pub(crate) snapshots: Vec<(u64, oneshot::Sender<Option<Snapshot>>)>,
    pub(crate) detaches: Vec<(u64, oneshot::Sender<Option<Detached>>)>,
    pub(crate) reattached: Vec<Detached>,
    pub(crate) stop: bool,
}

impl Inboxed {
    /// Nothing for the loop to do.
    pub(crate) fn is_empty(&self) -> bool {
        self.joiners.is_empty()
            && self.prefills.is_empty()
            && self.cancels.is_empty()
            && self.snapshots.is_empty()
            && self.detaches.is_empty()
            && self.reattached.is_empty()
            && !self.stop
    }
}

impl Inbox {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inboxed> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits, with the queue locked, until `busy()` or the queue has something.
    pub(crate) fn wait(&self, busy: bool) -> MutexGuard<'_, Inboxed> {
        let mut q = self.lock();
        while !busy && q.is_empty() {
            q = self.wake.wait(q).unwrap_or_else(PoisonError::into_inner);
        }
        q
    }

    fn push(&self, f: impl FnOnce(&mut Inboxed)) {
        f(&mut self.lock());
        self.wake.notify_one();
    }

    pub fn join(&self, j: Joiner) {
        self.push(|q| q.joiners.push_back(j));
    }

    pub fn prefill(&self, j: PrefillJob) {
        self.push(|q| q.prefills.push_back(j));
    }

    /// Wakes the loop, so that it looks at cancelled prefills.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    pub fn cancel(&self, reservation_id: u64) {
        self.push(|q| q.cancels.push(reservation_id));
    }

    pub fn stop(&self) {
        self.push(|q| q.stop = true);
    }

    /// The running sequence's KV as it stands after the step in progress; `None` when it is not
    /// running (yet, or any more).
    pub async fn snapshot(&self, reservation_id: u64) -> Option<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.push(|q| q.snapshots.push((reservation_id, tx)));
        rx.await.ok().flatten()
    }

    /// Takes the running sequence out of the batch after the step in progress (its last token
    /// sent); `None` when it is not running.
    pub async fn detach(&self, reservation_id: u64) -> Option<Detached> {
        let (tx, rx) = oneshot::channel();
        self.push(|q| q.detaches.push((reservation_id, tx)));
        rx.await.ok().flatten()
    }

    /// Puts a detached sequence back into the batch, where it goes on from its last token.
    pub fn reattach(&self, d: Detached) {
        self.push(|q| q.reattached.push(d));
    }

    /// The cancels waiting for the loop.
    #[cfg(test)]
    pub fn cancels(&self) -> Vec<u64> {
        self.lock().cancels.clone()
    }
}
