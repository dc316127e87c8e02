//! A stream's watchdog on the gap between tokens: a decode worker that sends nothing for longer
//! than it should (stopped, deadlocked, cut off without the connection closing) is failed for that
//! stream, which then moves to another worker.
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Least gap a watchdog waits for, whatever the prediction: below it, a busy but healthy worker
/// (a long prefill beside its batch, a scheduler hiccup) would be failed.
pub const MIN_GAP: Duration = Duration::from_millis(1500);
/// Predicted steps a worker may miss before it is failed.
const MISSED_STEPS: u32 = 10;

/// The gap allowed for a worker whose step is predicted to take `itl` (if known).
pub fn gap_for(itl: Option<Duration>) -> Duration {
    itl.map_or(MIN_GAP, |t| (t * MISSED_STEPS).max(MIN_GAP))
}

/// Least time a prefill attempt is given before its worker's heartbeats are checked: past the KV
/// transfer's own stall timeout (2 s, `tandem_kv_transfer::STALL_TIMEOUT`), so that a transfer
/// that stopped is reported as such (and the request moves to another decode worker) before the
/// prefill worker is blamed, and past a worker's 3 s lease, so that a stopped one has lapsed.
pub const MIN_PREFILL_GAP: Duration = Duration::from_secs(4);
/// Predicted TTFTs a prefill may take before its worker's heartbeats are checked.
const MISSED_PREFILLS: u32 = 10;

/// The time a prefill attempt predicted to answer in `ttft` (if known) is given, at most `cap`
/// (the prefill deadline).
pub fn prefill_gap_for(ttft: Option<Duration>, cap: Duration) -> Duration {
    ttft.map_or(cap, |t| (t * MISSED_PREFILLS).max(MIN_PREFILL_GAP))
        .min(cap)
}

pub(crate) struct Watchdog {
    gap: Duration,
    last: Instant,
    /// Wakes at the earliest moment the gap could have passed; moved on only when it fires, so
    /// that a token costs a clock read, not a timer reset.
    timer: Pin<Box<Sleep>>,
}

impl Watchdog {
    pub(crate) fn new(gap: Duration) -> Self {
        let now = Instant::now();
        Watchdog {
            gap,
            last: now,
            timer: Box::pin(tokio::time::sleep_until(now + gap)),
        }
    }

    pub(crate) fn gap(&self) -> Duration {
        self.gap
    }

    /// The worker sent something.
    pub(crate) fn fed(&mut self) {
        self.last = Instant::now();
    }

    /// Ready once `gap` has passed since the last feed (or the start).
    pub(crate) fn poll_starved(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match self.timer.as_mut().poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(()) => {
                    let due = self.last + self.gap;
                    if Instant::now() >= due {
                        return Poll::Ready(());
                    }
                    self.timer.as_mut().reset(due);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gap_is_ten_predicted_steps_and_at_least_one_and_a_half_seconds() {
        assert_eq!(gap_for(None), MIN_GAP);
        assert_eq!(gap_for(Some(Duration::from_millis(50))), MIN_GAP);
        assert_eq!(
            gap_for(Some(Duration::from_millis(300))),
            Duration::from_secs(3)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn starves_only_after_a_whole_gap_without_a_feed() {
        let mut w = Watchdog::new(Duration::from_secs(2));
        let starved = |w: &mut Watchdog| {
            let waker = futures::task::noop_waker();
            w.poll_starved(&mut Context::from_waker(&waker)).is_ready()
        };
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(!starved(&mut w));
        w.fed();
        // 2.5 s from the start, 1 s after the feed: the timer fires and moves on.
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert!(!starved(&mut w));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(!starved(&mut w));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(starved(&mut w));
    }

    #[test]
    fn a_prefill_gets_ten_predicted_ttfts_at_least_four_seconds_at_most_its_deadline() {
        let (ms, cap) = (Duration::from_millis, Duration::from_secs(30));
        assert_eq!(prefill_gap_for(None, cap), cap);
        assert_eq!(prefill_gap_for(Some(ms(100)), cap), MIN_PREFILL_GAP);
        assert_eq!(prefill_gap_for(Some(ms(700)), cap), ms(7000));
        assert_eq!(prefill_gap_for(Some(ms(5000)), cap), cap);
    }
}
