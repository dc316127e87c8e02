//! Who may write a block of a shared-memory pool. Over shm a prefill worker copies KV straight
//! into the decode worker's blocks, and the decode worker cannot take a mapping back: a writer
//! paused past its lease (or an attempt the gateway gave up on) could wake and copy into blocks
//! since handed to another sequence. So each block has a word in the pool file, after the KV,
//! naming the one reservation attempt that may write it, and a writer claims the word for each
//! copy and gives it back after:
//!
//! - the decode worker stamps a reservation's blocks with its attempt 0 when it leases them;
//! - a writer claims a block only while the word names its reservation and an attempt no newer
//!   than its own (a newer attempt takes the blocks over, and the older one is fenced from then
//!   on); the claim sets the word's writing bit until the copy ends;
//! - the decode worker seals the blocks when the KV is complete (before the engine adopts them:
//!   nobody writes a sealed block), or revokes them when the reservation ends unfilled. Either
//!   fails on a word whose writing bit is set: a seal then refuses the KV, and revoked blocks stay
//!   out of the allocator until the copy ends (a writer stopped for good mid-copy keeps that one
//!   block from being reused, never corrupts it).
//!
//! The words are atomics in memory both processes map; every change is a compare-and-swap, so
//! the writer's claim and the decode worker's seal or revoke cannot both succeed on one word.
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::{KvTransferError, Result};

/// The writing bit of a word.
const WRITING: u64 = 1;
/// A word no writer may claim: its block is free or its reservation ended.
const FREE: u64 = 0;
/// A word no writer may claim: its block's KV is complete and the engine's.
const SEALED: u64 = 2;
/// Bits of a word for the attempt (after the writing bit), and above them the reservation's tag.
const ATTEMPT_BITS: u32 = 15;
const TAG_SHIFT: u32 = ATTEMPT_BITS + 1;
/// Tags keep the reservation id's low 46 bits (its counting part) and set bit 46, so that no tag
/// is 0 and FREE and SEALED (tag 0) name no reservation.
const TAG_BITS: u32 = 46;

/// The right to write a reservation's blocks: its id (as Reserve answered) and the attempt (the
/// gateway's count of prefill retries into it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Writer {
    pub reservation_id: u64,
    pub attempt: u32,
}

impl Writer {
    fn word(self) -> u64 {
        let attempt = u64::from(self.attempt.min((1 << ATTEMPT_BITS) - 1));
        (tag(self.reservation_id) << TAG_SHIFT) | (attempt << 1)
    }
}

fn tag(reservation_id: u64) -> u64 {
    (reservation_id & ((1 << TAG_BITS) - 1)) | (1 << TAG_BITS)
}

fn tag_of(word: u64) -> u64 {
    word >> TAG_SHIFT
}

fn attempt_of(word: u64) -> u32 {
    ((word >> 1) & ((1 << ATTEMPT_BITS) - 1)) as u32
}

/// Whether `word` lets writer `w` start a copy (or attempt `w` be sealed): no copy in flight, and
/// it names `w`'s reservation with an attempt no newer than `w`'s.
fn open_to(word: u64, w: Writer) -> bool {
    word & WRITING == 0 && tag_of(word) == tag(w.reservation_id) && attempt_of(word) <= w.attempt
}

/// Bytes of the fence table of a pool of `num_blocks` blocks.
pub fn table_len(num_blocks: u32) -> u64 {
    8 * u64::from(num_blocks)
}

/// The fence table of one mapping of a pool file: a raw mapping of its own, so that the words are
/// never behind a Rust reference to bytes another process changes.
#[derive(Debug)]
pub struct Fences {
    map: MmapRaw,
    blocks: u32,
}

impl Fences {
    /// Maps the table of `blocks` words at `offset` in `file`.
    pub fn map(file: &std::fs::File, offset: u64, blocks: u32) -> Result<Self> {
        let map = MmapOptions::new()
            .offset(offset)
            .len(table_len(blocks) as usize)
            .map_raw(file)?;
        if map.as_ptr().align_offset(std::mem::align_of::<AtomicU64>()) != 0 {
            return Err(KvTransferError::Invalid(
                "fence table not aligned to 8 bytes".into(),
            ));
        }
        Ok(Fences { map, blocks })
    }

    #[allow(unsafe_code)]
    fn word(&self, block: u32) -> Result<&AtomicU64> {
        if block >= self.blocks {
            return Err(KvTransferError::Invalid(format!(
                "block {block} outside a pool of {}",
                self.blocks
            )));
        }
        // SAFETY: the mapping holds `blocks` aligned 8-byte words (checked in `map`) and lives as
        // long as `self`; every access to them, in this process and in the others that map the
        // file, is atomic.
        Ok(unsafe { AtomicU64::from_ptr(self.map.as_mut_ptr().cast::<u64>().add(block as usize)) })
    }

    /// Decode side, when it leases `blocks` to a reservation: only its attempt 0 (and later ones)
    /// may write them.
    pub fn stamp(&self, blocks: &[u32], reservation_id: u64) -> Result<()> {
        let w = Writer {
            reservation_id,
            attempt: 0,
        }
        .word();
        for &b in blocks {
            let before = self.word(b)?.swap(w, Ordering::AcqRel);
            if before & WRITING != 0 {
                // Revoked blocks with a copy in flight never reach the allocator.
                tracing::error!(block = b, "a leased block was still being written");
            }
        }
        Ok(())
    }

    /// Writer side: claims `block` for one copy. Fails once the reservation ended, its KV was
    /// sealed or a newer attempt took the block over.
    pub fn claim(&self, block: u32, w: Writer) -> Result<()> {
        let mine = w.word() | WRITING;
        self.word(block)?
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                open_to(cur, w).then_some(mine)
            })
            .map(drop)
            .map_err(|cur| fenced(block, w, cur))
    }

    /// Writer side: the copy into `block` ended (its bytes are visible to whoever next changes the
    /// word).
    pub fn release(&self, block: u32, w: Writer) {
        let mine = w.word();
        if let Ok(word) = self.word(block) {
            // Only the claimant changes a word whose writing bit is set.
            let _ =
                word.compare_exchange(mine | WRITING, mine, Ordering::Release, Ordering::Relaxed);
        }
    }

    /// Claims every block of `blocks` for one copy, or none (those claimed before a refusal are
    /// given back).
    pub fn claim_all(&self, blocks: &[u32], w: Writer) -> Result<()> {
        for (i, &b) in blocks.iter().enumerate() {
            if let Err(e) = self.claim(b, w) {
                self.release_all(&blocks[..i], w);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Gives back every block of `blocks` claimed for a copy.
    pub fn release_all(&self, blocks: &[u32], w: Writer) {
        for &b in blocks {
            self.release(b, w);
        }
    }

    /// Decode side, once every layer of attempt `w` arrived and before the engine adopts the
    /// blocks: no writer may touch them again. Fails if a newer attempt took a block over or a copy
    /// is in flight (the KV cannot be trusted then); blocks sealed before the failure stay sealed.
    pub fn seal(&self, blocks: &[u32], w: Writer) -> Result<()> {
        for &b in blocks {
            self.word(b)?
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                    (cur == SEALED || open_to(cur, w)).then_some(SEALED)
                })
                .map_err(|cur| fenced(b, w, cur))?;
        }
        Ok(())
    }

    /// Decode side, when a reservation ends unfilled: no attempt may write its blocks again.
    /// `false` while a copy into one of them is in flight (that block keeps its word: call again
    /// later; the others are revoked already).
    pub fn revoke(&self, blocks: &[u32], reservation_id: u64) -> bool {
        let mine = |cur: u64| tag_of(cur) == tag(reservation_id);
        let mut all = true;
        for &b in blocks {
            let Ok(word) = self.word(b) else {
                continue;
            };
            let revoked = word.fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (mine(cur) && cur & WRITING == 0).then_some(FREE)
            });
            // Refused on a word of its own: a copy is in flight (another's word is not its).
            if let Err(cur) = revoked
                && mine(cur)
            {
                all = false;
            }
        }
        all
    }
}

fn fenced(block: u32, w: Writer, word: u64) -> KvTransferError {
    let why = if word == FREE {
        "its reservation ended".to_owned()
    } else if word == SEALED {
        "its KV is complete".to_owned()
    } else if tag_of(word) != tag(w.reservation_id) {
        "it belongs to another reservation".to_owned()
    } else if attempt_of(word) > w.attempt {
        format!("attempt {} took it over", attempt_of(word))
    } else {
        "another copy into it is in flight".to_owned()
    };
    KvTransferError::Fenced(format!(
        "block {block} of reservation {} (attempt {}): {why}",
        w.reservation_id, w.attempt
    ))
}
