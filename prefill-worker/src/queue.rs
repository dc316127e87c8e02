//! The prefill queue: jobs handed from gRPC handlers to the batcher thread, and the counters the
//! heartbeat reports.
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use tandem_engine::sampling::{FinishReason, SamplingParams};
use tandem_proto::v1;
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

/// One layer's KV for some of a request's blocks, on its way to the transfer task.
pub enum LayerMsg {
    /// tcp: the bytes, laid out as `KvPool::export_layer` makes them, and the checksum of each
    /// frame they go as (`frame_checksums`, summed by the batcher right after the export, while
    /// the bytes are in its cache; empty when the destination's geometry could not cut them, and
    /// the sender then sums them itself and reports the error).
    Bytes {
        layer: u32,
        dst: Vec<u32>,
        bytes: Vec<u8>,
        checksums: Vec<u32>,
        last: bool,
    },
    /// shm: already written into the destination pool.
    Written {
        layer: u32,
        dst: Vec<u32>,
        bytes: u64,
        checksum: u32,
        last: bool,
    },
}

/// What the batcher reports when a prompt is computed.
#[derive(Debug, Clone, Copy)]
pub struct Computed {
    pub first_token: u32,
    pub finish: Option<FinishReason>,
    pub started: Instant,
    pub finished: Instant,
}

/// A prompt waiting for or in the batcher.
pub struct Job {
    pub request_id: String,
    pub prompt: Vec<u32>,
    /// The last `replayed` prompt tokens were generated (a decode failover's replay).
    pub replayed: usize,
    pub sampling: SamplingParams,
    pub destination: v1::KvDestination,
    pub arrived: Instant,
    pub cancel: Arc<AtomicBool>,
    pub layers: mpsc::UnboundedSender<LayerMsg>,
    pub done: oneshot::Sender<Result<Computed, Status>>,
}

/// Counters shared by the batcher, the handlers and the heartbeat.
#[derive(Default)]
pub struct Counters {
    /// Prompt tokens queued or in a running prefill, not yet computed.
    pub queued_tokens: AtomicU64,
    /// Jobs in the batcher's active set.
    pub running: AtomicU32,
    /// Jobs in the queue.
    pub waiting: AtomicU32,
    /// Prompt tokens per second (f32 bits, moving average).
    pub tokens_per_s: AtomicU32,
    /// Steps measured since the last heartbeat.
    pub steps: tandem_wire::StepLog,
}

/// The queue between handlers and the batcher.
#[derive(Default)]
pub struct Queue {
    jobs: Mutex<QueueInner>,
    wake: Condvar,
    pub counters: Counters,
}

#[derive(Default)]
struct QueueInner {
    jobs: VecDeque<Job>,
    stop: bool,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueInner> {
        self.jobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn push(&self, job: Job) {
        self.counters
            .queued_tokens
            .fetch_add(job.prompt.len() as u64, Ordering::Relaxed);
        let mut q = self.lock();
        q.jobs.push_back(job);
        self.counters
            .waiting
            .store(q.jobs.len() as u32, Ordering::Relaxed);
        drop(q);
        self.wake.notify_one();
    }

    /// Wakes the batcher, so that it looks at cancellations.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    pub fn stop(&self) {
        self.lock().stop = true;
        self.wake.notify_one();
    }

    /// Takes the queued jobs that `admit` accepts, in order, stopping at the first it refuses.
    /// Blocks while there is nothing to do and `idle` says the batcher has nothing running.
    /// Returns `None` once stopped.
    pub fn take(&self, idle: bool, mut admit: impl FnMut(&Job) -> bool) -> Option<Vec<Job>> {
        let mut q = self.lock();
        while idle && q.jobs.is_empty() && !q.stop {
            q = self
                .wake
                .wait(q)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if q.stop {
            return None;
        }
        let mut out = Vec::new();
        while let Some(j) = q.jobs.front() {
            if !j.cancel.load(Ordering::Relaxed) && !admit(j) {
                break;
            }
            if let Some(j) = q.jobs.pop_front() {
                out.push(j);
            }
        }
        self.counters
            .waiting
            .store(q.jobs.len() as u32, Ordering::Relaxed);
        Some(out)
    }

    /// Drains the queue at shutdown.
    pub fn drain(&self) -> Vec<Job> {
        self.lock().jobs.drain(..).collect()
    }
}
