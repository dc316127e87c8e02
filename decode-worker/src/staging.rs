//! KV frames that arrive while the batch loop holds the engine.
//!
//! The engine lock is held for a whole decode step. A tcp transfer delivers one frame per layer,
//! and the loop hands the lock over fairly only between steps, so a frame that waits for the lock
//! costs the prompt up to a decode step; over 80 layers that was several decode steps added to
//! every time to first token while anything decoded (scripts/validate-sim.sh measured it). Instead
//! a frame that finds the engine busy is copied here, and a reservation's frames are applied, in
//! the order they arrived, the next time its transfer holds the lock: at a later frame that finds
//! the engine free, or at the commit, which waits for it once. The reservation checks the receiver
//! makes per frame use what the last locked lookup saw, for the same reason.
use std::collections::HashMap;

use parking_lot::Mutex;
use tandem_kv_transfer::ReservationInfo;

/// Most bytes held for all reservations; past it, a frame waits for the engine instead.
pub const STAGING_LIMIT: usize = 256 << 20;

/// One layer's K and V for some blocks, as the receiver checked it.
#[derive(Debug)]
pub struct StagedFrame {
    pub layer: u32,
    pub block_ids: Vec<u32>,
    pub payload: Vec<u8>,
}

#[derive(Debug, Default)]
struct Held {
    frames: HashMap<u64, Vec<StagedFrame>>,
    bytes: usize,
    /// Reservation facts as last seen under the engine lock, while the reservation fills.
    known: HashMap<u64, ReservationInfo>,
}

#[derive(Debug, Default)]
pub struct Staging {
    held: Mutex<Held>,
}

impl Staging {
    /// Keeps a copy of a frame; `false` (nothing kept) when that would pass [`STAGING_LIMIT`].
    pub fn stage(
        &self,
        reservation_id: u64,
        layer: u32,
        block_ids: &[u32],
        payload: &[u8],
    ) -> bool {
        let mut h = self.held.lock();
        if h.bytes + payload.len() > STAGING_LIMIT {
            return false;
        }
        h.bytes += payload.len();
        h.frames
            .entry(reservation_id)
            .or_default()
            .push(StagedFrame {
                layer,
                block_ids: block_ids.to_vec(),
                payload: payload.to_vec(),
            });
        true
    }

    /// The frames held for a reservation, oldest first; they are no longer held.
    pub fn take(&self, reservation_id: u64) -> Vec<StagedFrame> {
        let mut h = self.held.lock();
        let frames = h.frames.remove(&reservation_id).unwrap_or_default();
        h.bytes -= frames.iter().map(|f| f.payload.len()).sum::<usize>();
        frames
    }

    pub fn remember(&self, reservation_id: u64, info: &ReservationInfo) {
        self.held.lock().known.insert(reservation_id, info.clone());
    }

    pub fn known(&self, reservation_id: u64) -> Option<ReservationInfo> {
        self.held.lock().known.get(&reservation_id).cloned()
    }

    /// Forgets a reservation that committed or went away, with any frames still held for it.
    pub fn forget(&self, reservation_id: u64) {
        self.take(reservation_id);
        self.held.lock().known.remove(&reservation_id);
    }

    /// Forgets every reservation for which `filling` is false (released, expired). Run by the
    /// lease sweep.
    pub fn sweep(&self, filling: impl Fn(u64) -> bool) {
        let mut h = self.held.lock();
        h.known.retain(|id, _| filling(*id));
        let gone: Vec<u64> = h
            .frames
            .keys()
            .copied()
            .filter(|id| !filling(*id))
            .collect();
        for id in gone {
            if let Some(frames) = h.frames.remove(&id) {
                h.bytes -= frames.iter().map(|f| f.payload.len()).sum::<usize>();
            }
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.held.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_back_in_arrival_order_and_the_bytes_are_counted() {
        let s = Staging::default();
        assert!(s.stage(7, 0, &[1, 2], &[1; 10]));
        assert!(s.stage(8, 0, &[3], &[2; 5]));
        assert!(s.stage(7, 1, &[1, 2], &[3; 10]));
        assert_eq!(s.bytes(), 25);
        let f = s.take(7);
        assert_eq!(f.iter().map(|f| f.layer).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(f[1].payload, vec![3; 10]);
        assert_eq!(s.bytes(), 5);
        assert!(s.take(7).is_empty());
        s.sweep(|id| id != 8);
        assert_eq!(s.bytes(), 0);
        assert!(s.take(8).is_empty());
    }

    #[test]
    fn the_limit_refuses_rather_than_grows() {
        let s = Staging::default();
        let big = vec![0u8; STAGING_LIMIT / 2 + 1];
        assert!(s.stage(1, 0, &[0], &big));
        assert!(!s.stage(2, 0, &[0], &big));
        assert_eq!(s.bytes(), big.len());
    }
}
