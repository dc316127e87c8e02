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

/// State shared by every part of a decode worker.
pub struct Shared {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    /// Geometry as the wire states it, fixed for the life of the pool.
    pub geometry: v1::BlockGeometry,
    /// Whether the pool is the shm file prefill workers write into (no frames carry bytes).
    pub shm: bool,
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
            geometry,
            shm,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
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

impl KvSink for Sink {
    fn reservation(&self, reservation_id: u64) -> Option<ReservationInfo> {
        let inner = self.0.lock();
        let r = inner.reservations.get(&reservation_id)?;
        if r.phase != Phase::Filling {
            return None;
        }
        Some(ReservationInfo {
            block_ids: r.block_ids.clone(),
            geometry: self.0.geometry,
            attempt: r.min_attempt,
            expires: r.expires,
        })
    }

    fn write(
        &self,
        reservation_id: u64,
        layer: u32,
        block_ids: &[u32],
        payload: &[u8],
    ) -> Result<(), KvError> {
        let mut inner = self.0.lock();
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
        let r = inner
            .reservations
            .get_mut(&reservation_id)
            .ok_or(KvError::UnknownReservation)?;
        if r.phase != Phase::Filling || attempt < r.min_attempt {
            return Err(KvError::UnknownReservation);
        }
        r.phase = Phase::Complete { attempt };
        Ok(())
    }
}
