//! The reservation table: the blocks each incoming prompt holds and where it is in its life.
//!
//! Kept apart from the engine on purpose. A decode step holds the engine for its whole duration
//! (the native engine computes inside it, the sim engine sleeps its time), and Reserve, the KV
//! receiver's checks and its commit must not wait for it, as a GPU's reservations and KV writes do
//! not wait for its compute: each wait cost a prompt half a decode step on average, before its
//! first token (scripts/validate-sim.sh measured it). So blocks come from the engine's shared
//! allocator, this table owns them while the KV arrives, and the batch loop hands them to the
//! engine (adopts the reservation) at a step boundary, when the sequence starts to decode (or, in
//! aggregated mode, to prefill).
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tandem_engine::kv::{BlockLease, BlockSource, PoolError};
use tandem_kv_transfer::Writer;
use tandem_kv_transfer::fence::Fences;
use tonic::Status;

/// What a reservation is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Blocks reserved; KV arriving. Expires with its lease.
    Filling,
    /// Every layer of every block arrived for `attempt`; no more KV is taken. Still leased.
    Complete { attempt: u32 },
    /// Admitted to the running batch; the lease no longer applies.
    Running,
}

#[derive(Debug)]
pub struct Reservation {
    pub request_id: String,
    pub prompt_tokens: u32,
    pub max_new_tokens: u32,
    pub block_ids: Arc<[u32]>,
    /// The blocks, until the engine's sequence of the same id holds them (the batch loop
    /// adopted it): then `None`.
    pub lease: Option<BlockLease>,
    pub expires: Instant,
    pub phase: Phase,
    /// Frames of attempts below this are refused.
    pub min_attempt: u32,
    /// KV that was acknowledged could not be written into the pool: it must not decode.
    pub damaged: bool,
    /// KV connections reading a frame straight into these blocks right now.
    pub writers: u32,
    /// The sequence's inter-token latency budget in milliseconds; 0 for none.
    pub itl_budget_ms: u32,
}

/// What the reservations promise the batch: those still to join, their prompts, and the tightest
/// ITL budget among all.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outlook {
    pub waiting: u32,
    pub waiting_prompt_tokens: u64,
    pub tightest_itl_budget_ms: u32,
}

/// Why the table refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BookError {
    #[error(
        "a prompt of {prompt} tokens plus {new} new ones does not fit the context of {context}"
    )]
    TooLong {
        prompt: u32,
        new: u32,
        context: usize,
    },
    #[error("{need} KV blocks needed, {free} free")]
    OutOfBlocks { need: usize, free: usize },
    #[error("reservation {0} is unknown or expired")]
    Unknown(u64),
    #[error("the KV of reservation {0} has not fully arrived")]
    NotComplete(u64),
    #[error("reservation {0} is already decoding")]
    Running(u64),
    #[error("the KV of reservation {0} could not be written")]
    Damaged(u64),
}

impl From<BookError> for Status {
    fn from(e: BookError) -> Status {
        let msg = e.to_string();
        match e {
            BookError::TooLong { .. } => Status::invalid_argument(msg),
            BookError::OutOfBlocks { .. } => Status::resource_exhausted(msg),
            BookError::Unknown(_) => Status::not_found(msg),
            BookError::NotComplete(_) => Status::failed_precondition(msg),
            BookError::Running(_) => Status::already_exists(msg),
            BookError::Damaged(_) => Status::internal(msg),
        }
    }
}

/// A reservation that left the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Removed {
    pub blocks: u32,
    /// Its blocks belong to the engine's sequence, which the caller must release; otherwise
    /// they went back to the allocator.
    pub in_engine: bool,
}

/// A reservation's request, as Reserve states it.
#[derive(Debug, Clone)]
pub struct Ask {
    pub request_id: String,
    pub prompt_tokens: u32,
    pub max_new_tokens: u32,
    pub expires: Instant,
    /// Blocks that must stay free beyond the prompt's, so that running sequences can grow.
    pub headroom: usize,
}

impl Reservation {
    /// The engine holds the blocks, as the sequence of the same id: the batch loop adopted it.
    pub fn in_engine(&self) -> bool {
        self.lease.is_none()
    }
}

#[derive(Debug)]
pub struct Book {
    reservations: HashMap<u64, Reservation>,
    /// Leases of reservations that left the table while a KV connection was still reading a
    /// frame into their blocks, and how many such readers remain: dropped when the last one
    /// ends, not before, so that no other sequence can be handed blocks being written.
    orphans: HashMap<u64, (BlockLease, u32)>,
    /// Over shm, who may write each block ([`tandem_kv_transfer::fence`]).
    fences: Option<Fences>,
    /// Leases of reservations that ended unfilled while another process was copying into one of
    /// their blocks: they go back once the copy ends ([`Book::expire`] checks again).
    quarantine: Vec<(u64, BlockLease)>,
    block_size: usize,
    max_context: usize,
}

impl Book {
    pub fn new(block_size: usize, max_context: usize) -> Self {
        Book {
            reservations: HashMap::new(),
            orphans: HashMap::new(),
            fences: None,
            quarantine: Vec::new(),
            block_size: block_size.max(1),
            max_context,
        }
    }

    /// Other processes write the blocks (shm): stamp, seal and revoke them in `fences`.
    pub fn with_fences(mut self, fences: Fences) -> Self {
        self.fences = Some(fences);
        self
    }

    pub fn get(&self, id: u64) -> Option<&Reservation> {
        self.reservations.get(&id)
    }

    pub fn get_mut(&mut self, id: u64) -> Option<&mut Reservation> {
        self.reservations.get_mut(&id)
    }

    /// Leases blocks for a prompt, all or none.
    pub fn reserve(
        &mut self,
        source: &BlockSource,
        id: u64,
        ask: Ask,
    ) -> Result<Arc<[u32]>, BookError> {
        let total = ask.prompt_tokens as usize + ask.max_new_tokens as usize;
        if ask.prompt_tokens == 0 || total > self.max_context {
            return Err(BookError::TooLong {
                prompt: ask.prompt_tokens,
                new: ask.max_new_tokens,
                context: self.max_context,
            });
        }
        let need = (ask.prompt_tokens as usize).div_ceil(self.block_size);
        let lease = source.lease(need, ask.headroom).map_err(|e| match e {
            PoolError::OutOfBlocks { needed, free } => {
                BookError::OutOfBlocks { need: needed, free }
            }
            _ => BookError::OutOfBlocks { need, free: 0 },
        })?;
        let blocks: Arc<[u32]> = lease.ids().into();
        if let Some(f) = &self.fences
            && let Err(e) = f.stamp(&blocks, id)
        {
            tracing::error!(reservation = id, error = %e, "blocks not stamped");
        }
        self.reservations.insert(
            id,
            Reservation {
                request_id: ask.request_id,
                prompt_tokens: ask.prompt_tokens,
                max_new_tokens: ask.max_new_tokens,
                block_ids: blocks.clone(),
                lease: Some(lease),
                expires: ask.expires,
                phase: Phase::Filling,
                min_attempt: 0,
                damaged: false,
                writers: 0,
                itl_budget_ms: 0,
            },
        );
        Ok(blocks)
    }

    /// Whether KV frames may land in the reservation's blocks: it fills, and the table still owns
    /// them.
    pub fn accepts_frames(&self, id: u64) -> bool {
        self.reservations
            .get(&id)
            .is_some_and(|r| r.phase == Phase::Filling && !r.in_engine())
    }

    /// Whether frames staged for it may still be applied: the table owns its blocks. A completed
    /// reservation's staged frames wait for the batch loop's next step boundary.
    pub fn holds_blocks(&self, id: u64) -> bool {
        self.reservations.get(&id).is_some_and(|r| !r.in_engine())
    }

    /// Over shm, before the KV of `attempt` is complete: no writer may touch the blocks again.
    /// Fails if another attempt took a block over or is copying into one.
    pub fn seal(&self, id: u64, attempt: u32) -> Result<(), String> {
        let (Some(f), Some(r)) = (&self.fences, self.reservations.get(&id)) else {
            return Ok(());
        };
        let w = Writer {
            reservation_id: id,
            attempt,
        };
        f.seal(&r.block_ids, w).map_err(|e| e.to_string())
    }

    /// Blocks kept out of the allocator until a copy into them ends.
    pub fn quarantined(&self) -> usize {
        self.quarantine.iter().map(|(_, l)| l.len()).sum()
    }

    /// Every layer of every block arrived for `attempt`; `false` if the reservation does not
    /// fill (unknown, already complete) or the attempt is too old.
    pub fn complete(&mut self, id: u64, attempt: u32) -> bool {
        match self.reservations.get_mut(&id) {
            Some(r) if r.phase == Phase::Filling && attempt >= r.min_attempt => {
                r.phase = Phase::Complete { attempt };
                true
            }
            _ => false,
        }
    }

    /// Lets a complete reservation start decoding; returns its prompt length.
    pub fn admit(&mut self, id: u64) -> Result<usize, BookError> {
        let r = self
            .reservations
            .get_mut(&id)
            .ok_or(BookError::Unknown(id))?;
        match r.phase {
            Phase::Complete { .. } if r.damaged => Err(BookError::Damaged(id)),
            Phase::Complete { .. } => {
                r.phase = Phase::Running;
                Ok(r.prompt_tokens as usize)
            }
            Phase::Filling => Err(BookError::NotComplete(id)),
            Phase::Running => Err(BookError::Running(id)),
        }
    }

    /// A KV connection is about to read a frame of `attempt` straight into the reservation's
    /// blocks: `false` if it no longer takes frames (or not of that attempt). Otherwise the
    /// blocks stay out of the allocator until the matching [`Book::end_write`].
    pub fn begin_write(&mut self, id: u64, attempt: u32) -> bool {
        self.reservations
            .get(&id)
            .is_some_and(|r| attempt >= r.min_attempt)
            && self.hold(id)
    }

    /// As [`Book::begin_write`] for a frame whose attempt the receiver checked already, or a
    /// read of the blocks (an shm notice's checksum): `false` if the reservation no longer
    /// takes frames.
    pub fn hold(&mut self, id: u64) -> bool {
        let takes = self.accepts_frames(id);
        match self.reservations.get_mut(&id) {
            Some(r) if takes => {
                r.writers += 1;
                true
            }
            _ => false,
        }
    }

    /// The frame's read ended. If the reservation left the table meanwhile and this was its last
    /// reader, its blocks go back now.
    pub fn end_write(&mut self, id: u64) {
        if let Some(r) = self.reservations.get_mut(&id) {
            r.writers = r.writers.saturating_sub(1);
            return;
        }
        let Some((_, readers)) = self.orphans.get_mut(&id) else {
            tracing::error!(reservation = id, "end of a KV write nobody began");
            return;
        };
        *readers -= 1;
        if *readers == 0
            && let Some((lease, _)) = self.orphans.remove(&id)
        {
            self.retire(id, lease);
        }
    }

    /// Takes a reservation out of the table. Blocks the table leased go back now, or, while a KV
    /// connection still reads a frame into them, when it ends ([`Book::end_write`]).
    pub fn remove(&mut self, id: u64) -> Option<Removed> {
        let r = self.reservations.remove(&id)?;
        let removed = Removed {
            blocks: r.block_ids.len() as u32,
            in_engine: r.in_engine(),
        };
        if let Some(lease) = r.lease {
            if r.writers > 0 {
                self.orphans.insert(id, (lease, r.writers));
            } else {
                self.retire(id, lease);
            }
        }
        Some(removed)
    }

    /// The blocks of reservation `id`, which left the table unfilled, go back to the allocator:
    /// over shm once no other process may write them (revoked), or later, from the quarantine,
    /// while a copy into one of them is still in flight.
    fn retire(&mut self, id: u64, lease: BlockLease) {
        if let Some(f) = &self.fences
            && !f.revoke(lease.ids(), id)
        {
            tracing::warn!(reservation = id, "a late copy into its blocks is in flight");
            self.quarantine.push((id, lease));
        }
    }

    /// Drops every reservation whose lease ran out before it started decoding. Returns those
    /// whose blocks the engine holds (an aggregated prefill), for the caller to release there.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        if let Some(f) = &self.fences {
            self.quarantine
                .retain(|(id, lease)| !f.revoke(lease.ids(), *id));
        }
        let lapsed: Vec<u64> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.phase != Phase::Running && r.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut in_engine = Vec::new();
        for id in lapsed {
            tracing::debug!(reservation = id, "lease lapsed");
            if self.remove(id).is_some_and(|r| r.in_engine) {
                in_engine.push(id);
            }
        }
        in_engine
    }

    /// Reservations decoding (their sequences run in the batch, or are about to join it).
    pub fn running(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .reservations
            .iter()
            .filter(|(_, r)| r.phase == Phase::Running)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// Reservations that have not started decoding.
    pub fn pending(&self) -> u32 {
        self.outlook().waiting
    }

    /// What the reservations promise the batch.
    pub fn outlook(&self) -> Outlook {
        let mut o = Outlook::default();
        for r in self.reservations.values() {
            if r.phase != Phase::Running {
                o.waiting += 1;
                o.waiting_prompt_tokens += u64::from(r.prompt_tokens);
            }
            if r.itl_budget_ms > 0
                && (o.tightest_itl_budget_ms == 0 || r.itl_budget_ms < o.tightest_itl_budget_ms)
            {
                o.tightest_itl_budget_ms = r.itl_budget_ms;
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ask(prompt_tokens: u32, expires: Instant) -> Ask {
        Ask {
            request_id: "r".into(),
            prompt_tokens,
            max_new_tokens: 8,
            expires,
            headroom: 0,
        }
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn over_shm_blocks_a_late_copy_is_writing_stay_out_of_the_allocator_until_it_ends() {
        use tandem_engine::kv::KvGeometry;
        use tandem_kv_transfer::ShmRegion;
        let geom = KvGeometry {
            layers: 1,
            kv_heads: 1,
            head_dim: 4,
            block_size: 16,
            num_blocks: 8,
        };
        let pool = ShmRegion::anonymous(&geom).unwrap();
        let prefill = pool.remap().unwrap();
        let alloc = BlockSource::new(8);
        let mut book = Book::new(16, 128).with_fences(pool.fence_map().unwrap());
        let blocks = book.reserve(&alloc, 9, ask(40, later())).unwrap();
        assert_eq!((blocks.len(), alloc.free_count()), (3, 5));
        // The prefill worker is in the middle of a copy into the second block when the
        // reservation ends (a cancel, a lapsed lease).
        let w = Writer {
            reservation_id: 9,
            attempt: 0,
        };
        prefill.fences().claim(blocks[1], w).unwrap();
        book.remove(9).unwrap();
        assert_eq!((book.quarantined(), alloc.free_count()), (3, 5));
        book.expire(Instant::now());
        assert_eq!(book.quarantined(), 3, "still copying");
        // The copy ends: the next sweep gives the blocks back, and the writer may not start
        // another copy into any of them.
        prefill.fences().release(blocks[1], w);
        book.expire(Instant::now());
        assert_eq!((book.quarantined(), alloc.free_count()), (0, 8));
        assert!(
            blocks
                .iter()
                .all(|&b| prefill.fences().claim(b, w).is_err())
        );
        // Ended while a notice's checksum was read from its blocks, with a copy in flight: the
        // read's end retires it the same way.
        let blocks = book.reserve(&alloc, 11, ask(20, later())).unwrap();
        let w = Writer {
            reservation_id: 11,
            attempt: 0,
        };
        prefill.fences().claim(blocks[0], w).unwrap();
        assert!(book.hold(11));
        book.remove(11).unwrap();
        book.end_write(11);
        assert_eq!((book.quarantined(), alloc.free_count()), (2, 6));
        prefill.fences().release(blocks[0], w);
        book.expire(Instant::now());
        assert_eq!((book.quarantined(), alloc.free_count()), (0, 8));
        // A reservation whose KV arrived is sealed: no attempt writes it any more.
        let blocks = book.reserve(&alloc, 10, ask(20, later())).unwrap();
        book.seal(10, 0).unwrap();
        assert!(book.complete(10, 0));
        let w = Writer {
            reservation_id: 10,
            attempt: 1,
        };
        assert!(prefill.fences().claim(blocks[0], w).is_err());
    }

    #[test]
    fn the_outlook_counts_what_waits_to_join_and_the_tightest_budget() {
        let alloc = BlockSource::new(16);
        let mut book = Book::new(16, 128);
        assert_eq!(book.outlook(), Outlook::default());
        book.reserve(&alloc, 1, ask(20, later())).unwrap();
        book.reserve(&alloc, 2, ask(40, later())).unwrap();
        book.reserve(&alloc, 3, ask(5, later())).unwrap();
        book.get_mut(1).unwrap().itl_budget_ms = 80;
        book.get_mut(2).unwrap().itl_budget_ms = 50;
        // Reservation 2 runs: it no longer waits, but its budget still binds the batch.
        book.get_mut(2).unwrap().phase = Phase::Running;
        let o = book.outlook();
        assert_eq!((o.waiting, o.waiting_prompt_tokens), (2, 25));
        assert_eq!(o.tightest_itl_budget_ms, 50);
        assert_eq!(book.pending(), 2);
    }

    #[test]
    fn reserve_takes_whole_blocks_or_refuses_with_the_free_count() {
        let alloc = BlockSource::new(4);
        let mut book = Book::new(16, 128);
        let blocks = book.reserve(&alloc, 1, ask(20, later())).unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(alloc.free_count(), 2);
        let e = book.reserve(&alloc, 2, ask(40, later())).unwrap_err();
        assert_eq!(e, BookError::OutOfBlocks { need: 3, free: 2 });
        assert_eq!(Status::from(e).code(), tonic::Code::ResourceExhausted);
        let mut headroom = ask(20, later());
        headroom.headroom = 1;
        assert_eq!(
            book.reserve(&alloc, 3, headroom).unwrap_err(),
            BookError::OutOfBlocks { need: 2, free: 1 }
        );
        let e = book.reserve(&alloc, 4, ask(125, later())).unwrap_err();
        assert_eq!(Status::from(e).code(), tonic::Code::InvalidArgument);
        assert_eq!(alloc.free_count(), 2, "refusals take nothing");
        assert!(book.get(2).is_none());
    }

    #[test]
    fn blocks_being_written_go_back_only_when_the_last_write_ends() {
        let alloc = BlockSource::new(4);
        let mut book = Book::new(16, 128);
        book.reserve(&alloc, 1, ask(20, later())).unwrap();
        book.get_mut(1).unwrap().min_attempt = 1;
        assert!(!book.begin_write(1, 0), "a stale attempt writes nothing");
        assert!(!book.begin_write(9, 1), "an unknown reservation");
        assert!(book.begin_write(1, 1));
        assert!(book.begin_write(1, 2));
        assert_eq!(book.get(1).unwrap().writers, 2);
        book.end_write(1);
        assert_eq!(book.get(1).unwrap().writers, 1);
        // Released (a cancel, a lapsed lease) while one frame is still being read in.
        assert_eq!(book.remove(1).unwrap().blocks, 2);
        assert_eq!(alloc.free_count(), 2, "not handed out while written");
        assert!(!book.begin_write(1, 1), "gone for new frames");
        book.end_write(1);
        assert_eq!(
            alloc.free_count(),
            4,
            "the last write's end hands the blocks back"
        );
        book.end_write(1);
        assert_eq!(alloc.free_count(), 4, "nothing left to hand back");
        // A reservation that completed no longer takes frames.
        book.reserve(&alloc, 2, ask(20, later())).unwrap();
        assert!(book.complete(2, 0));
        assert!(!book.begin_write(2, 0));
        book.remove(2);
        assert_eq!(alloc.free_count(), 4);
    }

    #[test]
    fn a_reservation_fills_completes_once_and_is_admitted_once() {
        let alloc = BlockSource::new(4);
        let mut book = Book::new(16, 128);
        book.reserve(&alloc, 1, ask(20, later())).unwrap();
        assert!(book.accepts_frames(1) && book.holds_blocks(1));
        assert_eq!(book.admit(1), Err(BookError::NotComplete(1)));
        assert!(book.complete(1, 0));
        assert!(!book.complete(1, 0), "complete once");
        assert!(!book.accepts_frames(1), "no KV after the commit");
        assert!(book.holds_blocks(1), "staged frames may still land");
        assert_eq!(book.admit(1), Ok(20));
        assert_eq!(book.admit(1), Err(BookError::Running(1)));
        assert!(!book.complete(7, 0));
        assert_eq!(book.admit(7), Err(BookError::Unknown(7)));
    }

    #[test]
    fn old_attempts_and_damaged_kv_are_refused() {
        let alloc = BlockSource::new(4);
        let mut book = Book::new(16, 128);
        book.reserve(&alloc, 1, ask(20, later())).unwrap();
        book.get_mut(1).unwrap().min_attempt = 2;
        assert!(!book.complete(1, 1));
        assert!(book.complete(1, 2));
        book.get_mut(1).unwrap().damaged = true;
        assert_eq!(book.admit(1), Err(BookError::Damaged(1)));
    }

    #[test]
    fn removal_frees_what_the_table_owns_and_reports_what_the_engine_owns() {
        let alloc = BlockSource::new(4);
        let mut book = Book::new(16, 128);
        book.reserve(&alloc, 1, ask(20, later())).unwrap();
        book.reserve(&alloc, 2, ask(10, later())).unwrap();
        assert_eq!(alloc.free_count(), 1);
        assert_eq!(
            book.remove(1),
            Some(Removed {
                blocks: 2,
                in_engine: false
            })
        );
        assert_eq!(alloc.free_count(), 3);
        // The engine's sequence holds the lease now.
        let engine_holds = book.get_mut(2).unwrap().lease.take();
        assert!(!book.accepts_frames(2) && !book.holds_blocks(2));
        assert_eq!(
            book.remove(2),
            Some(Removed {
                blocks: 1,
                in_engine: true
            })
        );
        assert_eq!(alloc.free_count(), 3, "the engine gives those back");
        assert_eq!(book.remove(2), None);
        drop(engine_holds);
        assert_eq!(alloc.free_count(), 4);
    }

    #[test]
    fn leases_lapse_before_decoding_only() {
        let alloc = BlockSource::new(8);
        let mut book = Book::new(16, 128);
        let now = Instant::now();
        let soon = now + Duration::from_millis(10);
        for id in 1..=4 {
            book.reserve(&alloc, id, ask(16, soon)).unwrap();
        }
        book.reserve(&alloc, 5, ask(16, later())).unwrap();
        assert!(book.complete(2, 0));
        assert!(book.complete(3, 0));
        assert_eq!(book.admit(3), Ok(16));
        let engine_holds = book.get_mut(4).unwrap().lease.take();
        assert_eq!(book.pending(), 4);
        assert_eq!(book.running(), vec![3]);
        assert!(book.expire(now).is_empty(), "not yet");
        assert_eq!(book.expire(soon), vec![4]);
        assert!(book.get(1).is_none() && book.get(2).is_none());
        assert!(book.get(3).is_some(), "a running sequence has no lease");
        assert!(book.get(5).is_some());
        // 1 and 2 came back; 4's block is the engine's to give back.
        assert_eq!(alloc.free_count(), 8 - 3);
        assert_eq!(book.pending(), 1);
        drop(engine_holds);
        assert_eq!(alloc.free_count(), 8 - 2);
    }
}
