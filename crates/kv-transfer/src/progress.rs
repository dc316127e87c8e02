//! Per-reservation transfer progress on the receiving side: the checks that every frame (or shm
//! notice) passes before its bytes are taken, as a plain struct that the connections share.
use std::collections::HashMap;
use std::time::Instant;

use tandem_proto::v1::{self, KvError};

use crate::ReservationInfo;
use crate::wire::block_bytes;

/// What a frame claims, independent of the transport.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameFacts<'a> {
    pub reservation_id: u64,
    pub attempt: u32,
    pub layer: u32,
    pub block_ids: &'a [u32],
    pub seq: u64,
    /// Payload bytes (tcp) or bytes written (shm) the sender declares.
    pub bytes: u64,
    pub dtype: i32,
    pub geometry: Option<&'a v1::BlockGeometry>,
}

/// A refused frame: the error for the KvAck and its detail.
pub(crate) type Refusal = (KvError, String);

/// The verdict on a frame's header.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Take the payload.
    Accept,
    /// The transfer already failed: drop the frame without another ack.
    Discard,
}

#[derive(Debug)]
struct Transfer {
    attempt: u32,
    next_seq: u64,
    failed: bool,
    expires: Instant,
    /// Position of each reserved block id in the reservation.
    index: HashMap<u32, usize>,
    /// `received[layer * blocks + position]`.
    received: Vec<bool>,
    missing: usize,
}

/// Progress of every transfer in flight on one receiver.
#[derive(Debug, Default)]
pub(crate) struct Transfers {
    map: HashMap<u64, Transfer>,
}

impl Transfers {
    /// Checks a frame's header against the reservation (looked up by the caller) and, if it is
    /// accepted, records its seq and its (layer, block) pairs.
    pub fn admit(
        &mut self,
        f: &FrameFacts<'_>,
        info: Option<&ReservationInfo>,
        now: Instant,
    ) -> Result<Verdict, Refusal> {
        let id = f.reservation_id;
        let Some(info) = info else {
            self.map.remove(&id);
            return Err((
                KvError::UnknownReservation,
                format!("reservation {id} is unknown"),
            ));
        };
        if info.expires <= now {
            self.map.remove(&id);
            return Err((
                KvError::UnknownReservation,
                format!("reservation {id} has expired"),
            ));
        }
        let current = self
            .map
            .get(&id)
            .map_or(info.attempt, |t| t.attempt.max(info.attempt));
        if f.attempt < current {
            return Err((
                KvError::OutOfOrder,
                format!("attempt {} superseded by {current}", f.attempt),
            ));
        }
        if self.map.get(&id).is_none_or(|t| t.attempt < f.attempt) {
            self.gc(now);
            self.map.insert(id, Transfer::new(info, f.attempt));
        }
        let Some(t) = self.map.get_mut(&id) else {
            return Err((
                KvError::UnknownReservation,
                format!("reservation {id} vanished"),
            ));
        };
        t.expires = info.expires;
        if t.failed {
            return Ok(Verdict::Discard);
        }
        let checked = t.check(f, info);
        if checked.is_err() {
            t.failed = true;
        }
        checked.map(|()| Verdict::Accept)
    }

    /// Marks a transfer failed after its payload was refused (checksum, sink).
    pub fn fail(&mut self, reservation_id: u64, attempt: u32) {
        if let Some(t) = self
            .map
            .get_mut(&reservation_id)
            .filter(|t| t.attempt == attempt)
        {
            t.failed = true;
        }
    }

    /// Frames accepted so far for this attempt.
    pub fn frames(&self, reservation_id: u64, attempt: u32) -> u64 {
        self.map
            .get(&reservation_id)
            .filter(|t| t.attempt == attempt)
            .map_or(0, |t| t.next_seq)
    }

    /// After the last frame: `Ok` and forgets the transfer when every (layer, block) arrived.
    pub fn finish(&mut self, reservation_id: u64, attempt: u32) -> Result<(), Refusal> {
        let Some(t) = self
            .map
            .get_mut(&reservation_id)
            .filter(|t| t.attempt == attempt)
        else {
            return Err((
                KvError::UnknownReservation,
                format!("no transfer for {reservation_id}"),
            ));
        };
        if t.failed {
            return Err((KvError::Incomplete, "transfer failed earlier".into()));
        }
        if t.missing > 0 {
            t.failed = true;
            return Err((
                KvError::Incomplete,
                format!("{} (layer, block) pairs never arrived", t.missing),
            ));
        }
        self.map.remove(&reservation_id);
        Ok(())
    }

    fn gc(&mut self, now: Instant) {
        self.map.retain(|_, t| t.expires > now);
    }
}

impl Transfer {
    fn new(info: &ReservationInfo, attempt: u32) -> Self {
        let blocks = info.block_ids.len();
        let index = info
            .block_ids
            .iter()
            .enumerate()
            .map(|(i, b)| (*b, i))
            .collect();
        let pairs = info.geometry.num_layers as usize * blocks;
        Transfer {
            attempt,
            next_seq: 0,
            failed: false,
            expires: info.expires,
            index,
            received: vec![false; pairs],
            missing: pairs,
        }
    }

    fn check(&mut self, f: &FrameFacts<'_>, info: &ReservationInfo) -> Result<(), Refusal> {
        if f.seq != self.next_seq {
            return Err((
                KvError::OutOfOrder,
                format!("seq {} where {} was due", f.seq, self.next_seq),
            ));
        }
        let g = &info.geometry;
        if f.geometry != Some(g) || f.dtype != g.dtype {
            return Err((
                KvError::GeometryMismatch,
                format!(
                    "frame {:?} / dtype {} against pool {g:?}",
                    f.geometry, f.dtype
                ),
            ));
        }
        if f.layer >= g.num_layers {
            return Err((
                KvError::BadBlock,
                format!("layer {} of {}", f.layer, g.num_layers),
            ));
        }
        let block = block_bytes(g).unwrap_or(0) as u64;
        let want = 2 * f.block_ids.len() as u64 * block;
        if f.bytes != want {
            return Err((
                KvError::Corrupt,
                format!(
                    "{} bytes for {} blocks, {want} due",
                    f.bytes,
                    f.block_ids.len()
                ),
            ));
        }
        let row = f.layer as usize * self.index.len();
        for b in f.block_ids {
            let Some(&pos) = self.index.get(b) else {
                return Err((
                    KvError::BadBlock,
                    format!("block {b} is not in the reservation"),
                ));
            };
            if std::mem::replace(&mut self.received[row + pos], true) {
                return Err((
                    KvError::BadBlock,
                    format!("layer {} block {b} arrived twice", f.layer),
                ));
            }
            self.missing -= 1;
        }
        self.next_seq += 1;
        Ok(())
    }
}

#[cfg(test)]
#[path = "progress_tests.rs"]
mod tests;
