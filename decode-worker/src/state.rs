//! Reservations and the engine they live in, shared by the gRPC handlers, the KV receiver and the
//! batch loop.
//!
//! One mutex guards the engine and the reservation table together: a reservation's blocks and the
//! engine's sequence for it must change as one. The batch loop holds it for one step at a time and
//! hands it over fairly after each step (a plain mutex would let the loop take it straight back
//! and starve KV writes, Reserve and heartbeats), so any of them waits at most one decode step.
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tandem_engine::Engine;
use tandem_kv_transfer::{KvError, KvSink, ReservationInfo, block_geometry, pool_checksum};
use tandem_proto::v1;

use crate::staging::Staging;

/// What a reservation is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Blocks reserved; KV arriving. Expires with its lease.
    Filling,
    /// Every layer of every block arrived for `attempt`; no more KV is taken. Still leased.
    Complete { attempt: u32 },
    /// In the running batch; the lease no longer applies.
    Running,
}

#[derive(Debug)]
pub struct Reservation {
    pub request_id: String,
    pub prompt_tokens: u32,
    pub max_new_tokens: u32,
    pub block_ids: Arc<[u32]>,
    pub expires: Instant,
    pub phase: Phase,
    /// Frames of attempts below this are refused.
    pub min_attempt: u32,
}

pub struct Inner {
    pub engine: Engine,
    pub reservations: HashMap<u64, Reservation>,
}

impl Inner {
    /// Frees a reservation's blocks (and its running sequence's, if it runs). Returns the blocks.
    pub fn release(&mut self, id: u64) -> Option<u32> {
        self.reservations.remove(&id)?;
        let blocks = self.engine.block_table(id).map_or(0, |b| b.len() as u32);
        if let Err(e) = self.engine.release(id) {
            tracing::error!(reservation = id, error = %e, "release of a known reservation failed");
        }
        Some(blocks)
    }

    /// Drops every reservation whose lease ran out before Decode started.
    pub fn expire(&mut self, now: Instant) -> usize {
        let lapsed: Vec<u64> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.phase != Phase::Running && r.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &lapsed {
            tracing::debug!(reservation = id, "lease lapsed");
            self.release(*id);
        }
        lapsed.len()
    }

    /// Blocks held by reservations that have not started decoding.
    pub fn reserved_blocks(&self) -> u64 {
        self.reservations
            .values()
            .filter(|r| r.phase != Phase::Running)
            .map(|r| r.block_ids.len() as u64)
            .sum()
    }
}

/// Longest the batch loop defers its next step to threads waiting for the engine.
const WAITERS_FIRST: Duration = Duration::from_millis(2);

/// State shared by every part of a decode worker.
pub struct Shared {
    inner: Mutex<Inner>,
    /// Threads blocked in [`Shared::lock`]: the batch loop lets them in before its next step.
    waiting: std::sync::atomic::AtomicUsize,
    next_id: AtomicU64,
    /// Geometry as the wire states it, fixed for the life of the pool.
    pub geometry: v1::BlockGeometry,
    /// Whether the pool is the shm file prefill workers write into (no frames carry bytes).
    pub shm: bool,
    /// KV frames that found the engine busy, and what the receiver last learned of reservations.
    pub staging: Staging,
}

impl Shared {
    pub fn new(engine: Engine, shm: bool) -> Self {
        let geometry = block_geometry(engine.pool().geometry());
        Shared {
            inner: Mutex::new(Inner {
                engine,
                reservations: HashMap::new(),
            }),
            // Ids start at a process-specific point so that a stale id from a restarted worker at
            // the same address is not mistaken for a live one.
            next_id: AtomicU64::new(start_id()),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            geometry,
            shm,
            staging: Staging::default(),
        }
    }

    /// The lease sweep: drops reservations whose lease lapsed, and staged KV of any reservation
    /// that no longer fills.
    pub fn sweep(&self, now: Instant) {
        let mut inner = self.lock();
        inner.expire(now);
        self.staging.sweep(|id| {
            inner
                .reservations
                .get(&id)
                .is_some_and(|r| r.phase == Phase::Filling)
        });
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        if let Some(g) = self.inner.try_lock() {
            return g;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let g = self.inner.lock();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        g
    }

    /// The batch loop's lock for a step. The loop hands the lock over fairly after a step, but
    /// only to one waiter; whoever else waits (Reserve, a KV commit, Decode's admission) would
    /// then wait a whole step more, each, so the loop first lets every waiter through (for at
    /// most [`WAITERS_FIRST`]).
    pub fn lock_for_step(&self) -> MutexGuard<'_, Inner> {
        let start = Instant::now();
        while self.waiting.load(Ordering::Acquire) > 0 && start.elapsed() < WAITERS_FIRST {
            std::thread::yield_now();
        }
        self.inner.lock()
    }

    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Reserves blocks for a prompt. `headroom` blocks must stay free beyond the prompt's, so that
    /// running sequences can still grow.
    pub fn reserve(
        &self,
        request_id: String,
        prompt_tokens: u32,
        max_new_tokens: u32,
        lease: Duration,
        headroom: usize,
    ) -> Result<(u64, Arc<[u32]>), tonic::Status> {
        let id = self.next_id();
        let mut inner = self.lock();
        let engine = &mut inner.engine;
        let ctx = engine.model().config().max_context;
        let total = prompt_tokens as usize + max_new_tokens as usize;
        if prompt_tokens == 0 || total > ctx {
            return Err(tonic::Status::invalid_argument(format!(
                "a prompt of {prompt_tokens} tokens plus {max_new_tokens} new ones does not fit the context of {ctx}"
            )));
        }
        let need = engine.blocks_for(prompt_tokens as usize);
        if need + headroom > engine.free_blocks() {
            return Err(tonic::Status::resource_exhausted(format!(
                "{need} KV blocks needed, {} free",
                engine.free_blocks().saturating_sub(headroom)
            )));
        }
        let blocks: Arc<[u32]> = engine
            .add_sequence(id)
            .and_then(|()| engine.reserve(id, prompt_tokens as usize).map(Arc::from))
            .map_err(|e| tandem_wire::engine_status(&e))?;
        inner.reservations.insert(
            id,
            Reservation {
                request_id,
                prompt_tokens,
                max_new_tokens,
                block_ids: blocks.clone(),
                expires: Instant::now() + lease,
                phase: Phase::Filling,
                min_attempt: 0,
            },
        );
        Ok((id, blocks))
    }
}

fn start_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Leave the low bits for counting; mix in the pid so two workers started together differ.
    (nanos ^ (u64::from(std::process::id()) << 40)) & !0xFFFF_FFFF | 1
}

/// The KV receiver's view: frames land in the engine's pool, inside the reservation's blocks.
pub struct Sink(pub Arc<Shared>);

impl Sink {
    fn lookup(&self, inner: &Inner, reservation_id: u64) -> Option<ReservationInfo> {
        let r = inner.reservations.get(&reservation_id)?;
        if r.phase != Phase::Filling {
            return None;
        }
        let info = ReservationInfo {
            block_ids: r.block_ids.clone(),
            geometry: self.0.geometry,
            attempt: r.min_attempt,
            expires: r.expires,
        };
        self.0.staging.remember(reservation_id, &info);
        Some(info)
    }

    /// Applies the frames staged for a reservation, in the order they arrived.
    fn flush(&self, inner: &mut Inner, reservation_id: u64) -> Result<(), KvError> {
        for f in self.0.staging.take(reservation_id) {
            write_now(inner, reservation_id, f.layer, &f.block_ids, &f.payload)?;
        }
        Ok(())
    }
}

fn write_now(
    inner: &mut Inner,
    reservation_id: u64,
    layer: u32,
    block_ids: &[u32],
    payload: &[u8],
) -> Result<(), KvError> {
    match inner.reservations.get(&reservation_id) {
        Some(r) if r.phase == Phase::Filling => {}
        _ => return Err(KvError::UnknownReservation),
    }
    inner
        .engine
        .pool_mut()
        .import_layer(layer as usize, block_ids, payload)
        .map_err(|_| KvError::BadBlock)
}

impl KvSink for Sink {
    fn reservation(&self, reservation_id: u64) -> Option<ReservationInfo> {
        if let Some(inner) = self.0.inner.try_lock() {
            return self.lookup(&inner, reservation_id);
        }
        // The engine is in a step: what the last lookup saw still holds while the reservation
        // fills (every write and the commit check again under the lock).
        if let Some(info) = self.0.staging.known(reservation_id) {
            return Some(info);
        }
        self.lookup(&self.0.lock(), reservation_id)
    }

    fn write(
        &self,
        reservation_id: u64,
        layer: u32,
        block_ids: &[u32],
        payload: &[u8],
    ) -> Result<(), KvError> {
        let mut inner = match self.0.inner.try_lock() {
            Some(inner) => inner,
            None if self
                .0
                .staging
                .stage(reservation_id, layer, block_ids, payload) =>
            {
                return Ok(());
            }
            None => self.0.lock(),
        };
        let written = self
            .flush(&mut inner, reservation_id)
            .and_then(|()| write_now(&mut inner, reservation_id, layer, block_ids, payload));
        if written.is_err() {
            drop(inner);
            self.0.staging.forget(reservation_id);
        }
        written
    }

    fn checksum(&self, reservation_id: u64, layer: u32, block_ids: &[u32]) -> Option<u32> {
        if !self.0.shm {
            return None;
        }
        let inner = self.0.lock();
        inner.reservations.get(&reservation_id)?;
        pool_checksum(inner.engine.pool(), layer as usize, block_ids)
    }

    fn complete(&self, reservation_id: u64, attempt: u32) -> Result<(), KvError> {
        let mut inner = self.0.lock();
        let committed = self.flush(&mut inner, reservation_id).and_then(|()| {
            let r = inner
                .reservations
                .get_mut(&reservation_id)
                .ok_or(KvError::UnknownReservation)?;
            if r.phase != Phase::Filling || attempt < r.min_attempt {
                return Err(KvError::UnknownReservation);
            }
            r.phase = Phase::Complete { attempt };
            Ok(())
        });
        drop(inner);
        self.0.staging.forget(reservation_id);
        committed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        let model = Arc::new(tandem_engine::tiny::tiny_model(7, false).unwrap().0);
        Arc::new(Shared::new(Engine::new(model, 64), false))
    }

    fn layer_bytes(inner: &Inner, blocks: usize, fill: u8) -> Vec<u8> {
        vec![fill; inner.engine.pool().geometry().layer_bytes(blocks)]
    }

    #[test]
    fn frames_that_find_the_engine_busy_are_staged_and_land_at_the_commit_in_order() {
        let s = shared();
        let (id, blocks) = s
            .reserve("r".into(), 20, 4, Duration::from_secs(60), 0)
            .unwrap();
        let sink = Sink(s.clone());
        // The first frame's lookup takes the lock; later ones are answered from what it saw.
        assert!(sink.reservation(id).is_some());
        let busy = s.lock();
        // The engine is held (as by a decode step): lookups and writes return at once. Without
        // staging this thread would wait for itself here.
        assert_eq!(
            sink.reservation(id).map(|i| i.block_ids),
            Some(blocks.clone())
        );
        for layer in 0..s.geometry.num_layers {
            let first = layer_bytes(&busy, blocks.len(), 1);
            sink.write(id, layer, &blocks, &first).unwrap();
        }
        // A second write of layer 0 arrives later: it must win over the first.
        let later = layer_bytes(&busy, blocks.len(), 2);
        sink.write(id, 0, &blocks, &later).unwrap();
        assert!(s.staging.bytes() > 0);
        drop(busy);
        sink.complete(id, 0).unwrap();
        assert_eq!(s.staging.bytes(), 0);
        let inner = s.lock();
        assert_eq!(
            inner.reservations[&id].phase,
            Phase::Complete { attempt: 0 }
        );
        let mut out = Vec::new();
        inner
            .engine
            .pool()
            .export_layer(0, &blocks, &mut out)
            .unwrap();
        assert_eq!(out, later);
        out.clear();
        inner
            .engine
            .pool()
            .export_layer(1, &blocks, &mut out)
            .unwrap();
        assert!(out.iter().all(|&b| b == 1));
    }

    #[test]
    fn staged_frames_of_a_released_reservation_are_dropped_and_its_commit_fails() {
        let s = shared();
        let (id, blocks) = s
            .reserve("r".into(), 20, 4, Duration::from_secs(60), 0)
            .unwrap();
        let sink = Sink(s.clone());
        let payload = layer_bytes(&s.lock(), blocks.len(), 3);
        {
            let _busy = s.lock();
            sink.write(id, 0, &blocks, &payload).unwrap();
        }
        assert_eq!(s.staging.bytes(), payload.len());
        s.lock().release(id);
        s.sweep(Instant::now());
        assert_eq!(s.staging.bytes(), 0);
        assert_eq!(sink.complete(id, 0), Err(KvError::UnknownReservation));
        assert!(sink.reservation(id).is_none());
    }
}
