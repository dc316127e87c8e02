//! What the gRPC handlers, the KV receiver and the batch loop share: the engine, and apart from
//! it the reservation table ([`Book`]) and the frames staged for the pool ([`Staging`]).
//!
//! The batch loop holds the engine for one step at a time (its whole compute). Nothing on a
//! prompt's way to its first token waits for that: Reserve takes blocks from the engine's shared
//! allocator under the table's lock, KV frames that find the engine busy are staged, and the
//! commit is acknowledged once every frame is written or staged; the loop applies staged frames
//! and adopts new sequences into the engine at its step boundaries. Lock order, where two are
//! held: engine, then table, then staging or the allocator (each held for list operations only).
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};
use tandem_engine::{Engine, Model, SharedAllocator, lock_allocator};
use tandem_kv_transfer::{
    KvError, KvSink, ReservationInfo, ShmRegion, block_geometry, pool_checksum,
};
use tandem_proto::v1;
use tonic::Status;

use crate::book::{Ask, Book};
pub use crate::book::{Phase, Reservation};
use crate::staging::Staging;

/// Longest the batch loop defers its next step to threads waiting for the engine.
const WAITERS_FIRST: Duration = Duration::from_millis(2);

/// State shared by every part of a decode worker.
pub struct Shared {
    engine: Mutex<Engine>,
    /// Threads blocked in [`Shared::lock`]: the batch loop lets them in before its next step.
    waiting: AtomicUsize,
    book: Mutex<Book>,
    /// The engine's allocator: Reserve takes blocks from it without the engine.
    alloc: SharedAllocator,
    model: Arc<Model>,
    next_id: AtomicU64,
    /// Geometry as the wire states it, fixed for the life of the pool.
    pub geometry: v1::BlockGeometry,
    /// Whether the pool is the shm file prefill workers write into (no frames carry bytes).
    pub shm: bool,
    /// KV frames that found the engine busy.
    pub staging: Staging,
    /// A second mapping of the shm pool file, to check what prefill workers wrote into reserved
    /// blocks without the engine (which a step holds) while the engine uses other blocks.
    shm_view: Option<ShmRegion>,
    /// tcp with the pool in anonymous shared memory: a mapping of it that each KV connection
    /// remaps to read frames straight into reserved blocks.
    direct: Option<ShmRegion>,
}

impl Shared {
    pub fn new(engine: Engine, shm: bool) -> Self {
        let geometry = block_geometry(engine.pool().geometry());
        let model = engine.model().clone();
        let book = Book::new(engine.block_size(), model.config().max_context);
        Shared {
            alloc: engine.allocator(),
            engine: Mutex::new(engine),
            waiting: AtomicUsize::new(0),
            book: Mutex::new(book),
            model,
            // Ids start at a process-specific point so that a stale id from a restarted worker at
            // the same address is not mistaken for a live one.
            next_id: AtomicU64::new(start_id()),
            geometry,
            shm,
            staging: Staging::default(),
            shm_view: None,
            direct: None,
        }
    }

    /// Lets KV connections read tcp frames straight into the pool, through remaps of `view`, a
    /// mapping of the engine's own pool memory.
    pub fn with_direct(mut self, view: ShmRegion) -> Self {
        self.direct = Some(view);
        self
    }

    /// Checks shm notices against `view`, a mapping of the engine's own pool file.
    pub fn with_shm_view(mut self, view: ShmRegion) -> Self {
        self.shm_view = Some(view);
        self
    }

    /// The engine, waiting for a step in progress.
    pub fn lock(&self) -> MutexGuard<'_, Engine> {
        if let Some(g) = self.engine.try_lock() {
            return g;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let g = self.engine.lock();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        g
    }

    /// The batch loop's lock for a step. The loop hands the lock over fairly after a step, but
    /// only to one waiter; whoever else waits (a KV write when staging is full, an shm checksum)
    /// would then wait a whole step more, each, so the loop first lets every waiter through (for
    /// at most [`WAITERS_FIRST`]).
    pub fn lock_for_step(&self) -> MutexGuard<'_, Engine> {
        let start = Instant::now();
        while self.waiting.load(Ordering::Acquire) > 0 && start.elapsed() < WAITERS_FIRST {
            std::thread::yield_now();
        }
        self.engine.lock()
    }

    /// The reservation table. Never held while waiting for the engine.
    pub fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock()
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn free_blocks(&self) -> usize {
        lock_allocator(&self.alloc).free_count()
    }

    pub fn total_blocks(&self) -> usize {
        lock_allocator(&self.alloc).total()
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
    ) -> Result<(u64, Arc<[u32]>), Status> {
        let id = self.next_id();
        let ask = Ask {
            request_id,
            prompt_tokens,
            max_new_tokens,
            expires: Instant::now() + lease,
            headroom,
        };
        let mut book = self.book();
        let blocks = book.reserve(&mut lock_allocator(&self.alloc), id, ask)?;
        Ok((id, blocks))
    }

    /// Ends a reservation wherever its blocks are. `engine` is the caller's guard if it holds the
    /// engine (the batch loop); otherwise the engine is locked only when its sequence holds the
    /// blocks. Returns the blocks the reservation held, `None` if it was unknown.
    pub fn end(&self, engine: Option<&mut Engine>, id: u64) -> Option<u32> {
        let removed = {
            let mut book = self.book();
            let removed = book.remove(&mut lock_allocator(&self.alloc), id);
            drop(self.staging.take(id));
            removed
        };
        match (removed, engine) {
            (Some(r), Some(engine)) if r.in_engine => release_seq(engine, id),
            (Some(r), None) if r.in_engine => release_seq(&mut self.lock(), id),
            // Unknown to the table: the engine may still hold a sequence of that id.
            (None, Some(engine)) if engine.seq_len(id).is_some() => release_seq(engine, id),
            _ => {}
        }
        removed.map(|r| r.blocks)
    }

    /// The lease sweep: drops reservations whose lease lapsed, and staged KV of any reservation
    /// that no longer holds its blocks.
    pub fn sweep(&self, now: Instant) {
        let in_engine = {
            let mut book = self.book();
            let gone = book.expire(&mut lock_allocator(&self.alloc), now);
            self.staging.sweep(|id| book.holds_blocks(id));
            gone
        };
        if !in_engine.is_empty() {
            let mut engine = self.lock();
            for id in in_engine {
                release_seq(&mut engine, id);
            }
        }
    }

    /// At a step boundary: writes every staged frame into the pool, so that committed KV is in
    /// place before its sequence joins the batch and staged memory is given back each step.
    pub fn apply_staged(&self, engine: &mut Engine) {
        if self.staging.is_empty() {
            return;
        }
        let mut book = self.book();
        for (id, frames) in self.staging.take_all() {
            if !book.holds_blocks(id) {
                continue;
            }
            for f in frames {
                if let Err(e) =
                    engine
                        .pool_mut()
                        .import_layer(f.layer as usize, &f.block_ids, &f.payload)
                {
                    // The receiver checked the frame against the reservation; this is a bug.
                    tracing::error!(reservation = id, error = %e, "staged KV frame not written");
                    if let Some(r) = book.get_mut(id) {
                        r.damaged = true;
                    }
                }
            }
        }
    }

    /// Hands an admitted reservation's blocks to the engine as sequence `id` with `len` positions
    /// of KV (the prompt it imported, or 0 for an aggregated prefill about to be computed).
    pub fn adopt(&self, engine: &mut Engine, id: u64, len: usize) -> Result<(), Status> {
        let mut book = self.book();
        let r = book
            .get_mut(id)
            .ok_or_else(|| Status::not_found(format!("reservation {id} is unknown or expired")))?;
        if r.damaged {
            return Err(Status::internal(format!(
                "the KV of reservation {id} could not be written"
            )));
        }
        if r.in_engine {
            // Computed here (aggregated): the engine's sequence already holds the prompt.
            return engine
                .commit(id, len)
                .map_err(|e| tandem_wire::engine_status(&e));
        }
        engine
            .adopt(id, r.block_ids.to_vec(), len)
            .map_err(|e| tandem_wire::engine_status(&e))?;
        r.in_engine = true;
        Ok(())
    }
}

fn release_seq(engine: &mut Engine, id: u64) {
    if let Err(e) = engine.release(id) {
        tracing::debug!(reservation = id, error = %e, "sequence already gone");
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
    /// Writes a reservation's staged frames, then `frame` if any, into the pool; on an error the
    /// reservation's staged frames are dropped.
    fn write_now(
        &self,
        engine: &mut Engine,
        reservation_id: u64,
        frame: Option<(u32, &[u32], &[u8])>,
    ) -> Result<(), KvError> {
        let staged = self.0.staging.take(reservation_id);
        let staged = staged
            .iter()
            .map(|f| (f.layer, f.block_ids.as_slice(), f.payload.as_slice()));
        for (layer, block_ids, payload) in staged.chain(frame) {
            engine
                .pool_mut()
                .import_layer(layer as usize, block_ids, payload)
                .map_err(|_| KvError::BadBlock)?;
        }
        Ok(())
    }
}

impl KvSink for Sink {
    fn reservation(&self, reservation_id: u64) -> Option<ReservationInfo> {
        let book = self.0.book();
        if !book.accepts_frames(reservation_id) {
            return None;
        }
        let r = book.get(reservation_id)?;
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
        let frame = Some((layer, block_ids, payload));
        // The table stays locked through each write, so that the blocks cannot be released
        // (and handed to another reservation) under it.
        if let Some(mut engine) = self.0.engine.try_lock() {
            let book = self.0.book();
            if !book.accepts_frames(reservation_id) {
                return Err(KvError::UnknownReservation);
            }
            return self.write_now(&mut engine, reservation_id, frame);
        }
        {
            // Staged under the table's lock, so that a commit or release cannot slip between
            // the check and the copy.
            let book = self.0.book();
            if !book.accepts_frames(reservation_id) {
                return Err(KvError::UnknownReservation);
            }
            if self
                .0
                .staging
                .stage(reservation_id, layer, block_ids, payload)
            {
                return Ok(());
            }
        }
        // Staging is full: wait for the engine.
        let mut engine = self.0.lock();
        let book = self.0.book();
        if !book.accepts_frames(reservation_id) {
            return Err(KvError::UnknownReservation);
        }
        self.write_now(&mut engine, reservation_id, frame)
    }

    fn checksum(&self, reservation_id: u64, layer: u32, block_ids: &[u32]) -> Option<u32> {
        if !self.0.shm {
            return None;
        }
        if let Some(view) = &self.0.shm_view {
            // The table stays locked while the blocks are read: they cannot change hands.
            let book = self.0.book();
            if !book.accepts_frames(reservation_id) {
                return None;
            }
            return view.checksum(layer as usize, block_ids).ok();
        }
        let engine = self.0.lock();
        self.0.book().get(reservation_id)?;
        pool_checksum(engine.pool(), layer as usize, block_ids)
    }

    fn complete(&self, reservation_id: u64, attempt: u32) -> Result<(), KvError> {
        // Not waiting for a step: what is staged stays for the loop's next step boundary.
        let engine = self.0.engine.try_lock();
        let mut book = self.0.book();
        let fills = book.accepts_frames(reservation_id)
            && book
                .get(reservation_id)
                .is_some_and(|r| attempt >= r.min_attempt);
        if !fills {
            return Err(KvError::UnknownReservation);
        }
        if book.get(reservation_id).is_some_and(|r| r.writers > 0) {
            // An older attempt's frame is still being read into these blocks on another
            // connection: committing now could decode its bytes. The prefill is retried.
            return Err(KvError::Incomplete);
        }
        if let Some(mut engine) = engine {
            self.write_now(&mut engine, reservation_id, None)?;
        }
        book.complete(reservation_id, attempt);
        Ok(())
    }

    fn direct(&self) -> Option<ShmRegion> {
        let view = self.0.direct.as_ref()?;
        match view.remap() {
            Ok(region) => Some(region),
            Err(e) => {
                tracing::warn!(error = %e, "KV pool not mapped for a connection; frames are copied");
                None
            }
        }
    }

    fn begin_direct(&self, reservation_id: u64, attempt: u32) -> Result<(), KvError> {
        if self.0.book().begin_write(reservation_id, attempt) {
            Ok(())
        } else {
            Err(KvError::UnknownReservation)
        }
    }

    fn end_direct(&self, reservation_id: u64) {
        let mut book = self.0.book();
        if let Some(blocks) = book.end_write(reservation_id)
            && let Err(e) = lock_allocator(&self.0.alloc).release(&blocks)
        {
            tracing::error!(reservation = reservation_id, error = %e, "blocks of a reservation were not allocated");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Arc<Shared> {
        let model = Arc::new(tandem_engine::tiny::tiny_model(7, false).unwrap().0);
        Arc::new(Shared::new(Engine::new(model, 64), false))
    }

    fn layer_bytes(s: &Shared, blocks: usize, fill: u8) -> Vec<u8> {
        vec![fill; s.lock().pool().geometry().layer_bytes(blocks)]
    }

    fn lease() -> Duration {
        Duration::from_secs(60)
    }

    fn pool_layer(engine: &Engine, layer: usize, blocks: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        engine.pool().export_layer(layer, blocks, &mut out).unwrap();
        out
    }

    #[tokio::test]
    // The engine's lock is held across the transfer on purpose, as a decode step would hold it:
    // frames that needed the engine would stage, or wait forever on this one thread.
    #[allow(clippy::await_holding_lock)]
    async fn tcp_frames_read_straight_into_a_mapped_pool_land_during_a_step_unstaged() {
        let model = Arc::new(tandem_engine::tiny::tiny_model(7, false).unwrap().0);
        let geom = Engine::geometry_for(&model, 64);
        let (pool, view) = ShmRegion::anonymous_pool(&geom).unwrap();
        let s = Arc::new(Shared::new(Engine::with_pool(model, pool), false).with_direct(view));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tandem_kv_transfer::serve(
            listener,
            async move {
                let _ = stopped.await;
            },
            Arc::new(Sink(s.clone())),
        ));
        let (id, blocks) = s.reserve("r".into(), 20, 4, lease(), 0).unwrap();
        let layers = s.geometry.num_layers;
        let payload = |layer: u32| {
            let n = s.geometry.block_tokens as usize
                * s.geometry.kv_heads as usize
                * s.geometry.head_dim as usize;
            // Distinct floats per layer, K and V, block and position.
            (0..2 * blocks.len() * n)
                .flat_map(|i| (layer as f32 * 1000.0 + i as f32).to_le_bytes())
                .collect::<Vec<u8>>()
        };
        let busy = s.lock(); // a decode step holds the engine throughout the transfer
        let sender = tandem_kv_transfer::KvSender::new("p");
        let spec = tandem_kv_transfer::TransferSpec {
            request_id: "r".into(),
            reservation_id: id,
            attempt: 0,
            geometry: s.geometry,
        };
        let mut t = sender.open(&addr, spec).await.unwrap();
        for layer in 0..layers - 1 {
            t.send_layer(layer, &blocks, &payload(layer)).await.unwrap();
        }
        let ack = t
            .finish(layers - 1, &blocks, &payload(layers - 1))
            .await
            .unwrap();
        assert_eq!(ack.frames_received, u64::from(layers));
        assert_eq!(
            s.staging.bytes(),
            0,
            "nothing copied aside: read into the pool"
        );
        assert_eq!(
            s.book().get(id).map(|r| (r.phase, r.writers)),
            Some((Phase::Complete { attempt: 0 }, 0))
        );
        drop(busy);
        {
            let engine = s.lock();
            for layer in 0..layers {
                assert_eq!(
                    pool_layer(&engine, layer as usize, &blocks),
                    payload(layer),
                    "layer {layer}"
                );
            }
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[test]
    fn reserve_and_release_do_not_wait_for_a_step() {
        let s = shared();
        let busy = s.lock(); // as a decode step holds it
        let (id, blocks) = s.reserve("r".into(), 20, 4, lease(), 0).unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(s.free_blocks(), 62);
        let e = s.reserve("big".into(), 500, 4, lease(), 40).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert_eq!(s.end(None, id), Some(2));
        assert_eq!(s.free_blocks(), 64);
        assert_eq!(s.end(None, id), None);
        drop(busy);
    }

    #[test]
    fn the_commit_is_acknowledged_during_a_step_and_applied_at_the_boundary() {
        let s = shared();
        let (id, blocks) = s.reserve("r".into(), 20, 4, lease(), 0).unwrap();
        let sink = Sink(s.clone());
        let first = layer_bytes(&s, blocks.len(), 1);
        let later = layer_bytes(&s, blocks.len(), 2);
        let mut busy = s.lock();
        assert_eq!(
            sink.reservation(id).map(|i| i.block_ids),
            Some(blocks.clone())
        );
        for layer in 0..s.geometry.num_layers {
            sink.write(id, layer, &blocks, &first).unwrap();
        }
        // A second write of layer 0 arrives later: it must win over the first.
        sink.write(id, 0, &blocks, &later).unwrap();
        assert!(s.staging.bytes() > 0);
        // Without waiting for the engine (this thread holds it: waiting would never end).
        sink.complete(id, 0).unwrap();
        assert_eq!(
            s.book().get(id).map(|r| r.phase),
            Some(Phase::Complete { attempt: 0 })
        );
        assert!(sink.reservation(id).is_none(), "no KV after the commit");
        assert_eq!(
            sink.write(id, 0, &blocks, &first),
            Err(KvError::UnknownReservation)
        );
        assert_eq!(sink.complete(id, 0), Err(KvError::UnknownReservation));
        // The Decode call admits it; the loop applies the frames, then adopts it.
        assert_eq!(s.book().admit(id), Ok(20));
        s.apply_staged(&mut busy);
        assert_eq!(s.staging.bytes(), 0);
        s.adopt(&mut busy, id, 20).unwrap();
        assert_eq!(busy.seq_len(id), Some(20));
        assert_eq!(busy.block_table(id), Some(&blocks[..]));
        assert_eq!(pool_layer(&busy, 0, &blocks), later);
        assert!(pool_layer(&busy, 1, &blocks).iter().all(|&b| b == 1));
        // Ended by the loop: the engine's sequence gives the blocks back.
        assert_eq!(s.end(Some(&mut busy), id), Some(2));
        assert_eq!((busy.seq_len(id), s.free_blocks()), (None, 64));
    }

    #[test]
    fn frames_that_find_the_engine_free_are_written_with_what_was_staged_before() {
        let s = shared();
        let (id, blocks) = s.reserve("r".into(), 20, 4, lease(), 0).unwrap();
        let sink = Sink(s.clone());
        let (first, later) = (layer_bytes(&s, 2, 1), layer_bytes(&s, 2, 3));
        {
            let _busy = s.lock();
            sink.write(id, 0, &blocks, &first).unwrap();
        }
        sink.write(id, 0, &blocks, &later).unwrap();
        assert_eq!(s.staging.bytes(), 0);
        assert!(pool_layer(&s.lock(), 0, &blocks).iter().all(|&b| b == 3));
        sink.complete(id, 0).unwrap();
    }

    #[test]
    fn staged_frames_of_a_released_or_lapsed_reservation_are_dropped_and_its_commit_fails() {
        let s = shared();
        let (id, blocks) = s.reserve("r".into(), 20, 4, lease(), 0).unwrap();
        let (short, _) = s
            .reserve("s".into(), 20, 4, Duration::from_millis(1), 0)
            .unwrap();
        let sink = Sink(s.clone());
        let payload = layer_bytes(&s, blocks.len(), 3);
        {
            let _busy = s.lock();
            sink.write(id, 0, &blocks, &payload).unwrap();
            let short_blocks = s.book().get(short).unwrap().block_ids.clone();
            sink.write(short, 0, &short_blocks, &payload).unwrap();
        }
        assert_eq!(s.staging.bytes(), 2 * payload.len());
        s.end(None, id);
        assert_eq!(s.staging.bytes(), payload.len());
        assert_eq!(sink.complete(id, 0), Err(KvError::UnknownReservation));
        assert!(sink.reservation(id).is_none());
        s.sweep(Instant::now() + Duration::from_millis(5));
        assert_eq!(s.staging.bytes(), 0);
        assert!(s.book().get(short).is_none());
        assert_eq!(s.free_blocks(), 64);
    }

    #[test]
    fn shm_notices_are_checked_during_a_step() {
        let model = Arc::new(tandem_engine::tiny::tiny_model(7, false).unwrap().0);
        let path = std::env::temp_dir().join(format!("tandem-state-{}.kv", std::process::id()));
        let geom = Engine::geometry_for(&model, 16);
        let region = ShmRegion::create(&path, &geom).unwrap();
        let layout = region.layout().clone();
        let pool = tandem_engine::kv::KvPool::with_memory(geom, Box::new(region)).unwrap();
        let s = Arc::new(
            Shared::new(Engine::with_pool(model, pool), true)
                .with_shm_view(ShmRegion::open(&layout).unwrap()),
        );
        let (id, blocks) = s.reserve("r".into(), 20, 4, lease(), 0).unwrap();
        let payload = layer_bytes(&s, blocks.len(), 5);
        // A prefill worker's own mapping, as it writes a layer.
        let mut prefill = ShmRegion::open(&layout).unwrap();
        prefill.write_blocks(1, &blocks, &payload).unwrap();
        let want = prefill.checksum(1, &blocks).unwrap();
        let sink = Sink(s.clone());
        let busy = s.lock();
        assert_eq!(sink.checksum(id, 1, &blocks), Some(want));
        sink.complete(id, 0).unwrap();
        assert_eq!(sink.checksum(id, 1, &blocks), None, "no longer filling");
        drop(busy);
    }

    #[test]
    fn a_lapsed_aggregated_prefill_leaves_the_engine_too() {
        let s = shared();
        let (id, _) = s
            .reserve("a".into(), 20, 4, Duration::from_millis(1), 0)
            .unwrap();
        s.adopt(&mut s.lock(), id, 0).unwrap();
        assert_eq!(s.lock().seq_len(id), Some(0));
        s.sweep(Instant::now() + Duration::from_millis(5));
        assert_eq!(s.lock().seq_len(id), None);
        assert_eq!(s.free_blocks(), 64);
    }
}
