//! KV frames that arrive while the batch loop holds the engine.
//!
//! The engine lock is held for a whole decode step, and the pool lives in the engine. A tcp
//! transfer delivers one frame per layer; a frame that waited for the lock would cost the prompt
//! up to a decode step, and over 80 layers that was several decode steps added to every time to
//! first token while anything decoded (scripts/validate-sim.sh measured it). Instead a frame that
//! finds the engine busy is copied here, and a reservation's frames are applied, in the order they
//! arrived, by whoever next holds the engine: a later frame of its transfer that finds it free, a
//! commit that finds it free, or else the batch loop at its next step boundary, before the
//! sequence can join the batch. The commit does not wait for them to be applied.
use std::collections::HashMap;

use parking_lot::Mutex;

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

    /// Every frame held, by reservation (each oldest first); none are held any more.
    pub fn take_all(&self) -> Vec<(u64, Vec<StagedFrame>)> {
        let mut h = self.held.lock();
        h.bytes = 0;
        h.frames.drain().collect()
    }

    /// Whether any frame is held.
    pub fn is_empty(&self) -> bool {
        self.held.lock().frames.is_empty()
    }

    /// Forgets every reservation for which `live` is false (released, expired). Run by the
    /// lease sweep.
    pub fn sweep(&self, live: impl Fn(u64) -> bool) {
        let mut h = self.held.lock();
        let gone: Vec<u64> = h.frames.keys().copied().filter(|id| !live(*id)).collect();
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
        assert!(s.stage(9, 2, &[4], &[4; 3]));
        assert!(s.stage(9, 3, &[4], &[5; 3]));
        let all = s.take_all();
        assert_eq!(all.len(), 1);
        assert_eq!(
            all[0].1.iter().map(|f| f.layer).collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(s.is_empty());
        assert_eq!(s.bytes(), 0);
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
