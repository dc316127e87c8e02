//! Retries of a failed leg, bounded twice: a budget that each request pays into, so that retries
//! add at most a fifth to what the workers are asked even when every call fails (a few are banked
//! so that a quiet gateway can retry its first failures), and a backoff that doubles per attempt
//! with jitter, so that the retries of one failure do not arrive together on the next worker.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Thousandths of a retry, so that the bank is one atomic.
const MILLI: u64 = 1000;
/// Retries a gateway's bank holds at most (and starts with): what it may retry at once however
/// few requests came before.
pub const RETRIES_BANKED: u32 = 10;

/// The retry budget: a bank of retries that each request adds `ratio` to, up to `banked`.
#[derive(Debug)]
pub struct RetryBudget {
    milli: AtomicU64,
    per_request: u64,
    most: u64,
}

impl RetryBudget {
    /// `ratio` retries per request (0.2: at most 20% extra calls), at most `banked` saved; the
    /// bank starts full.
    pub fn new(ratio: f64, banked: u32) -> Self {
        let most = u64::from(banked) * MILLI;
        RetryBudget {
            milli: AtomicU64::new(most),
            per_request: (ratio.clamp(0.0, 1.0) * MILLI as f64).round() as u64,
            most,
        }
    }

    /// A request arrived: it pays into the bank.
    pub fn deposit(&self) {
        let _ = self
            .milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some((m + self.per_request).min(self.most))
            });
    }

    /// Takes one retry from the bank; `false` when the budget is spent.
    pub fn withdraw(&self) -> bool {
        self.milli
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                m.checked_sub(MILLI)
            })
            .is_ok()
    }
}

/// Backoff before retry `attempt` (0 for the first): half of `base` doubled per attempt (at most
/// `cap`) for sure, the other half scaled by `unit` in [0, 1).
pub fn backoff(attempt: u32, base: Duration, cap: Duration, unit: f64) -> Duration {
    let full = base
        .saturating_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .min(cap);
    full / 2 + (full / 2).mul_f64(unit.clamp(0.0, 1.0))
}

/// A number in [0, 1) that differs from call to call: std's per-instance random hasher keys.
pub fn jitter() -> f64 {
    let h = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_fifth_of_requests_beyond_what_is_banked() {
        let b = RetryBudget::new(0.2, RETRIES_BANKED);
        // Banked: ten retries with no request at all.
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
        // Then one per five requests, and never more.
        let mut retries = 0;
        for _ in 0..100 {
            b.deposit();
            if b.withdraw() {
                retries += 1;
            }
        }
        assert_eq!(retries, 20);
        // A quiet spell refills the bank, to its cap only.
        for _ in 0..1000 {
            b.deposit();
        }
        assert_eq!((0..20).filter(|_| b.withdraw()).count(), 10);
    }

    #[test]
    fn backoff_doubles_per_attempt_up_to_the_cap_with_half_of_it_jittered() {
        let (base, cap) = (Duration::from_millis(20), Duration::from_millis(100));
        let ms = Duration::from_millis;
        assert_eq!(backoff(0, base, cap, 0.0), ms(10));
        assert_eq!(backoff(0, base, cap, 1.0), ms(20));
        assert_eq!(backoff(1, base, cap, 0.5), ms(30));
        assert_eq!(backoff(2, base, cap, 0.0), ms(40));
        assert_eq!(backoff(3, base, cap, 0.0), ms(50));
        assert_eq!(backoff(40, base, cap, 1.0), ms(100));
        let j: Vec<f64> = (0..64).map(|_| jitter()).collect();
        assert!(j.iter().all(|x| (0.0..1.0).contains(x)));
        assert!(j.windows(2).any(|w| w[0] != w[1]), "{j:?}");
    }
}
