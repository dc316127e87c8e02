//! What the gRPC handlers, the KV receiver and the batch loop share: the reservation table
//! ([`Book`]) and a second mapping of the KV pool. Not the engine: the batch loop's thread owns
//! it, and the others reach it only through the loop's [`Inbox`].
//!
//! Nothing on a prompt's way to its first token waits for a decode step: Reserve leases blocks
//! from the engine's allocator, KV frames go into the leased blocks through the second mapping,
//! the commit is acknowledged once every frame is in place, and the loop hands the lease to the
//! engine (adopts the reservation) at its next step boundary. The table's lock is the only lock
//! here that more than one part takes, and nothing else is locked while it is held.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard, RwLock};
use tandem_engine::kv::BlockSource;
use tandem_engine::{Engine, Model};
use tandem_kv_transfer::{KvError, KvSink, ReservationInfo, ShmRegion, block_geometry};
use tandem_proto::v1;
use tonic::Status;

use crate::book::{Ask, Book};
pub use crate::book::{Phase, Reservation};
use crate::events::Failure;
use crate::inbox::Inbox;

/// State shared by every part of a decode worker.
pub struct Shared {
    book: Mutex<Book>,
    /// The engine's allocator: Reserve leases blocks from it without the engine.
    alloc: BlockSource,
    model: Arc<Model>,
    next_id: AtomicU64,
    /// Geometry as the wire states it, fixed for the life of the pool.
    pub geometry: v1::BlockGeometry,
    /// Whether the pool is the shm file prefill workers write into (no frames carry bytes).
    pub shm: bool,
    /// A second mapping of the engine's pool (the shm file, or the anonymous shared memory of a
    /// tcp pool), through which KV reaches reserved blocks while the engine uses others: frames
    /// copied in, the checksums of shm notices, and (remapped) each tcp connection's reads.
    view: RwLock<ShmRegion>,
    /// The batch loop's commands: what the engine holds is released there.
    inbox: Arc<Inbox>,
}

impl Shared {
    /// `view` maps the memory of `engine`'s pool; `inbox` is the loop's that will own `engine`.
    pub fn new(engine: &Engine, view: ShmRegion, shm: bool, inbox: Arc<Inbox>) -> Self {
        let model = engine.model().clone();
        let mut book = Book::new(engine.block_size(), model.config().max_context);
        // Over shm other processes write the blocks: the table fences them.
        if shm {
            match view.fence_map() {
                Ok(f) => book = book.with_fences(f),
                Err(e) => tracing::error!(error = %e, "the pool's fence table is not mapped"),
            }
        }
        Shared {
            book: Mutex::new(book),
            alloc: engine.allocator(),
            model,
            // Ids start at a process-specific point so that a stale id from a restarted worker at
            // the same address is not mistaken for a live one.
            next_id: AtomicU64::new(start_id()),
            geometry: block_geometry(engine.pool().geometry()),
            shm,
            view: RwLock::new(view),
            inbox,
        }
    }

    /// The reservation table. Nothing else is locked while it is held.
    pub fn book(&self) -> MutexGuard<'_, Book> {
        self.book.lock()
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn free_blocks(&self) -> usize {
        self.alloc.free_count()
    }

    pub fn total_blocks(&self) -> usize {
        self.alloc.total()
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
        let blocks = self.book().reserve(&self.alloc, id, ask)?;
        Ok((id, blocks))
    }

    /// Ends a reservation, from outside the batch loop: blocks the table holds go back now, and
    /// the loop releases the engine's sequence if the engine holds them. Returns the blocks the
    /// reservation held, `None` if it was unknown.
    pub fn end(&self, id: u64) -> Option<u32> {
        let removed = self.book().remove(id)?;
        if removed.in_engine {
            self.inbox.cancel(id);
        }
        Some(removed.blocks)
    }

    /// Ends a reservation from the batch loop, which owns `engine`. Returns the blocks it held.
    pub fn end_in(&self, engine: &mut Engine, id: u64) -> Option<u32> {
        let removed = self.book().remove(id);
        // Unknown to the table, the engine may still hold a sequence of that id.
        if removed.is_none_or(|r| r.in_engine)
            && engine.seq_len(id).is_some()
            && let Err(e) = engine.release(id)
        {
            tracing::debug!(reservation = id, error = %e, "sequence already gone");
        }
        removed.map(|r| r.blocks)
    }

    /// The lease sweep: drops reservations whose lease lapsed; the batch loop releases those the
    /// engine holds (an aggregated prompt being computed).
    pub fn sweep(&self, now: Instant) {
        let in_engine = self.book().expire(now);
        for id in in_engine {
            self.inbox.cancel(id);
        }
    }

    /// Appends K then V of `blocks` of `layer` to `out`, read through the pool's second mapping:
    /// the blocks of a sequence the engine is not writing (full ones, or a detached sequence's).
    pub fn read_kv(&self, layer: u32, blocks: &[u32], out: &mut Vec<u8>) -> Result<(), Status> {
        self.view
            .read()
            .read_blocks(layer as usize, blocks, out)
            .map_err(|e| Status::internal(format!("reading KV to move: {e}")))
    }

    /// Hands an admitted reservation's blocks to the engine as sequence `id` with `len` positions
    /// of KV (the prompt it imported, or 0 for an aggregated prefill about to be computed).
    pub fn adopt(&self, engine: &mut Engine, id: u64, len: usize) -> Result<(), Failure> {
        let mut book = self.book();
        let r = book.get_mut(id).ok_or(Failure::Gone(id))?;
        let Some(lease) = r.lease.take() else {
            // Computed here (aggregated): the engine's sequence already holds the prompt.
            return engine.commit(id, len).map_err(|e| Failure::from(&e));
        };
        engine.adopt(id, lease, len).map_err(|(e, lease)| {
            r.lease = Some(lease);
            Failure::from(&e)
        })
    }
}

fn start_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Leave the low bits for counting; mix in the pid so two workers started together differ.
    (nanos ^ (u64::from(std::process::id()) << 40)) & !0xFFFF_FFFF | 1
}

/// The KV receiver's view: frames land in the pool, inside the reservation's blocks.
pub struct Sink(pub Arc<Shared>);

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
        // Held as a direct read is, so that the blocks cannot change hands under the copy, which
        // takes no lock the table's users wait for.
        if !self.0.book().hold(reservation_id) {
            return Err(KvError::UnknownReservation);
        }
        let written = self
            .0
            .view
            .write()
            .write_blocks(layer as usize, block_ids, payload);
        self.0.book().end_write(reservation_id);
        written.map(|_| ()).map_err(|e| {
            // The receiver checked the frame against the reservation; this is a bug.
            tracing::error!(reservation = reservation_id, error = %e, "KV frame not written");
            KvError::BadBlock
        })
    }

    fn checksum(&self, reservation_id: u64, layer: u32, block_ids: &[u32]) -> Option<u32> {
        if !self.0.shm || !self.0.book().hold(reservation_id) {
            return None;
        }
        let sum = self.0.view.read().checksum(layer as usize, block_ids).ok();
        self.0.book().end_write(reservation_id);
        sum
    }

    fn complete(&self, reservation_id: u64, attempt: u32) -> Result<(), KvError> {
        let mut book = self.0.book();
        let fills = book.accepts_frames(reservation_id)
            && book
                .get(reservation_id)
                .is_some_and(|r| attempt >= r.min_attempt);
        if !fills {
            return Err(KvError::UnknownReservation);
        }
        if book.get(reservation_id).is_some_and(|r| r.writers > 0) {
            // An older attempt's frame is still being written into these blocks on another
            // connection: committing now could decode its bytes. The prefill is retried.
            return Err(KvError::Incomplete);
        }
        if let Err(e) = book.seal(reservation_id, attempt) {
            // Another attempt writes these blocks (or took them over): the KV cannot be trusted.
            tracing::warn!(reservation = reservation_id, error = %e, "KV not sealed");
            return Err(KvError::Incomplete);
        }
        book.complete(reservation_id, attempt);
        Ok(())
    }

    fn direct(&self) -> Option<ShmRegion> {
        if self.0.shm {
            return None;
        }
        match self.0.view.read().remap() {
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
        self.0.book().end_write(reservation_id);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An engine over a pool in anonymous shared memory, and what the worker shares beside it
    /// (no batch loop runs: the test owns the engine as the loop would).
    pub(crate) fn worker(blocks: usize) -> (Engine, Arc<Shared>, Arc<Inbox>) {
        let model = Arc::new(tandem_engine::tiny::tiny_model(7, false).unwrap().0);
        let geom = Engine::geometry_for(&model, blocks);
        let (pool, view) = ShmRegion::anonymous_pool(&geom).unwrap();
        let engine = Engine::with_pool(model, pool);
        let inbox = Arc::new(Inbox::default());
        let s = Arc::new(Shared::new(&engine, view, false, inbox.clone()));
        (engine, s, inbox)
    }

    fn layer_bytes(engine: &Engine, blocks: usize, fill: u8) -> Vec<u8> {
        vec![fill; engine.pool().geometry().layer_bytes(blocks)]
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
    async fn tcp_frames_read_straight_into_the_pool_are_in_the_blocks_the_engine_adopts() {
        let (mut engine, s, _) = worker(64);
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
            s.book().get(id).map(|r| (r.phase, r.writers)),
            Some((Phase::Complete { attempt: 0 }, 0))
        );
        assert_eq!(s.book().admit(id), Ok(20));
        s.adopt(&mut engine, id, 20).unwrap();
        for layer in 0..layers {
            assert_eq!(
                pool_layer(&engine, layer as usize, &blocks),
                payload(layer),
                "layer {layer}"
            );
        }
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    #[test]
    fn reserve_and_release_need_no_engine() {
        let (_engine, s, inbox) = worker(64);
        let (id, blocks) = s.reserve("r".into(), 20, 4, lease(), 0).unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(s.free_blocks(), 62);
        let e = s.reserve("big".into(), 500, 4, lease(), 40).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert_eq!(s.end(id), Some(2));
        assert_eq!(s.free_blocks(), 64);
        assert_eq!(s.end(id), None);
        assert!(inbox.cancels().is_empty(), "nothing for the loop to do");
    }

    #[test]
    fn frames_copied_through_the_view_land_in_the_blocks_the_engine_adopts() {
        let (mut engine, s, _) = worker(64);
        let (id, blocks) = s.reserve("r".into(), 20, 4, lease(), 0).unwrap();
        let sink = Sink(s.clone());
        let first = layer_bytes(&engine, blocks.len(), 1);
        let later = layer_bytes(&engine, blocks.len(), 2);
        assert_eq!(
            sink.reservation(id).map(|i| i.block_ids),
            Some(blocks.clone())
        );
        for layer in 0..s.geometry.num_layers {
            sink.write(id, layer, &blocks, &first).unwrap();
        }
        // A second write of layer 0 arrives later: it wins over the first.
        sink.write(id, 0, &blocks, &later).unwrap();
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
        // The Decode call admits it; the loop adopts it at its next step boundary.
        assert_eq!(s.book().admit(id), Ok(20));
        s.adopt(&mut engine, id, 20).unwrap();
        assert_eq!(engine.seq_len(id), Some(20));
        assert_eq!(engine.block_table(id), Some(&blocks[..]));
        assert_eq!(pool_layer(&engine, 0, &blocks), later);
        assert!(pool_layer(&engine, 1, &blocks).iter().all(|&b| b == 1));
        // Ended by the loop: the engine's sequence gives the blocks back.
        assert_eq!(s.end_in(&mut engine, id), Some(2));
        assert_eq!((engine.seq_len(id), s.free_blocks()), (None, 64));
    }

    #[test]
    fn a_released_or_lapsed_reservation_takes_no_frames_and_cannot_commit() {
        let (engine, s, _) = worker(64);
        let (id, blocks) = s.reserve("r".into(), 20, 4, lease(), 0).unwrap();
        let (short, _) = s
            .reserve("s".into(), 20, 4, Duration::from_millis(1), 0)
            .unwrap();
        let sink = Sink(s.clone());
        let payload = layer_bytes(&engine, blocks.len(), 3);
        sink.write(id, 0, &blocks, &payload).unwrap();
        s.end(id);
        assert_eq!(sink.complete(id, 0), Err(KvError::UnknownReservation));
        assert!(sink.reservation(id).is_none());
        assert_eq!(
            sink.write(id, 0, &blocks, &payload),
            Err(KvError::UnknownReservation)
        );
        s.sweep(Instant::now() + Duration::from_millis(5));
        assert!(s.book().get(short).is_none());
        assert_eq!(sink.complete(short, 0), Err(KvError::UnknownReservation));
        assert_eq!(s.free_blocks(), 64);
    }

    #[test]
    fn blocks_being_read_into_stay_leased_until_the_read_ends() {
        let (_engine, s, _) = worker(4);
        let (id, _) = s.reserve("r".into(), 32, 4, lease(), 0).unwrap();
        let sink = Sink(s.clone());
        sink.begin_direct(id, 0).unwrap();
        assert_eq!(
            sink.begin_direct(id, 0).map(|()| sink.end_direct(id)),
            Ok(())
        );
        // Released (a cancel, a lapsed lease) while a frame is still being read in.
        assert_eq!(s.end(id), Some(2));
        assert_eq!(s.free_blocks(), 2, "not handed to anyone while written");
        let e = s.reserve("next".into(), 64, 4, lease(), 0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
        assert_eq!(sink.begin_direct(id, 0), Err(KvError::UnknownReservation));
        sink.end_direct(id);
        assert_eq!(s.free_blocks(), 4);
        s.reserve("next".into(), 64, 4, lease(), 0).unwrap();
    }

    #[test]
    fn shm_notices_are_checked_through_the_view() {
        let model = Arc::new(tandem_engine::tiny::tiny_model(7, false).unwrap().0);
        let path = std::env::temp_dir().join(format!("tandem-state-{}.kv", std::process::id()));
        let geom = Engine::geometry_for(&model, 16);
        let region = ShmRegion::create(&path, &geom).unwrap();
        let layout = region.layout().clone();
        let pool = tandem_engine::kv::KvPool::with_memory(geom, Box::new(region)).unwrap();
        let engine = Engine::with_pool(model, pool);
        let view = ShmRegion::open(&layout).unwrap();
        let s = Arc::new(Shared::new(&engine, view, true, Arc::default()));
        let (id, blocks) = s.reserve("r".into(), 20, 4, lease(), 0).unwrap();
        let payload = layer_bytes(&engine, blocks.len(), 5);
        // A prefill worker's own mapping, as it writes a layer.
        let mut prefill = ShmRegion::open(&layout).unwrap();
        prefill.write_blocks(1, &blocks, &payload).unwrap();
        let want = prefill.checksum(1, &blocks).unwrap();
        let sink = Sink(s.clone());
        assert!(sink.direct().is_none(), "shm: no frames carry bytes");
        assert_eq!(sink.checksum(id, 1, &blocks), Some(want));
        assert_eq!(s.book().get(id).map(|r| r.writers), Some(0));
        sink.complete(id, 0).unwrap();
        assert_eq!(sink.checksum(id, 1, &blocks), None, "no longer filling");
        assert_eq!(pool_layer(&engine, 1, &blocks), payload);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_lapsed_aggregated_prefill_is_handed_to_the_loop_to_release() {
        let (mut engine, s, inbox) = worker(64);
        let (id, _) = s
            .reserve("a".into(), 20, 4, Duration::from_millis(1), 0)
            .unwrap();
        s.adopt(&mut engine, id, 0).unwrap();
        assert_eq!(engine.seq_len(id), Some(0));
        s.sweep(Instant::now() + Duration::from_millis(5));
        assert!(s.book().get(id).is_none());
        assert_eq!(
            inbox.cancels(),
            vec![id],
            "the engine holds it: the loop's to release"
        );
        assert_eq!(s.free_blocks(), 62);
        assert_eq!(s.end_in(&mut engine, id), None, "gone from the table");
        assert_eq!((engine.seq_len(id), s.free_blocks()), (None, 64));
    }
}
