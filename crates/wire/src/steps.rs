//! The forward steps a worker measured since its last heartbeat, for the router's online fit of
//! step times: a uniform sample (reservoir) of at most [`StepLog::CAPACITY`] of them, so that a
//! heartbeat stays small however many steps ran.

use std::sync::Mutex;
use std::time::Duration;

use tandem_proto::v1;

/// Steps measured since the last [`StepLog::take`].
#[derive(Debug, Default)]
pub struct StepLog {
    inner: Mutex<Reservoir>,
}

#[derive(Debug, Default)]
struct Reservoir {
    samples: Vec<v1::StepSample>,
    seen: u64,
    rng: u64,
}

impl Reservoir {
    fn next(&mut self) -> u64 {
        // xorshift64*: only spreads which steps are kept.
        if self.rng == 0 {
            self.rng = 0x9E37_79B9_7F4A_7C15;
        }
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

impl StepLog {
    /// Most steps one report carries.
    pub const CAPACITY: usize = 32;

    /// Records a step: its prompt chunks as `(cached, new)` tokens, the sequences that generated a
    /// token and the context they attended to (summed), and its wall time.
    pub fn record(
        &self,
        chunks: impl Iterator<Item = (usize, usize)>,
        decode_batch: usize,
        decode_context: usize,
        took: Duration,
    ) {
        let mut r = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.seen += 1;
        let slot = if r.samples.len() < Self::CAPACITY {
            None
        } else {
            let j = r.next() % r.seen;
            match usize::try_from(j) {
                Ok(j) if j < Self::CAPACITY => Some(j),
                _ => return,
            }
        };
        let (mut tokens, mut cached) = (Vec::new(), Vec::new());
        for (c, n) in chunks {
            cached.push(u32::try_from(c).unwrap_or(u32::MAX));
            tokens.push(u32::try_from(n).unwrap_or(u32::MAX));
        }
        let sample = v1::StepSample {
            chunk_tokens: tokens,
            chunk_cached_tokens: cached,
            decode_batch: u32::try_from(decode_batch).unwrap_or(u32::MAX),
            decode_context_tokens: decode_context as u64,
            duration_us: u32::try_from(took.as_micros()).unwrap_or(u32::MAX),
        };
        match slot {
            None => r.samples.push(sample),
            Some(j) => r.samples[j] = sample,
        }
    }

    /// The steps recorded since the last call, and a fresh interval.
    pub fn take(&self) -> Vec<v1::StepSample> {
        let mut r = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        r.seen = 0;
        std::mem::take(&mut r.samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_carries_at_most_its_capacity_and_starts_afresh() {
        let log = StepLog::default();
        log.record(
            [(0, 100), (64, 28)].into_iter(),
            3,
            900,
            Duration::from_micros(2500),
        );
        let first = log.take();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].chunk_tokens, [100, 28]);
        assert_eq!(first[0].chunk_cached_tokens, [0, 64]);
        assert_eq!(
            (first[0].decode_batch, first[0].decode_context_tokens),
            (3, 900)
        );
        assert_eq!(first[0].duration_us, 2500);
        assert!(log.take().is_empty());
        for i in 0..1000 {
            log.record(std::iter::empty(), 1, i, Duration::from_micros(10));
        }
        let kept = log.take();
        assert_eq!(kept.len(), StepLog::CAPACITY);
        // A uniform sample of the thousand: not just the first 32.
        assert!(kept.iter().any(|s| s.decode_context_tokens >= 500));
    }
}
