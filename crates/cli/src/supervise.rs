//! `tandem up` keeps its workers running: one that exits is started again after a pause that
//! doubles with each quick exit (so that a worker that cannot start does not spin a core), and the
//! cluster regains its capacity by itself.
use std::time::Duration;

use tokio::process::Child;
use tokio::time::Instant;

/// Pauses before a restart.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// After the first quick exit.
    pub first: Duration,
    /// At most.
    pub max: Duration,
    /// A worker that ran this long before exiting starts again after `first`.
    pub healthy_after: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_secs(1),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
        }
    }
}

/// One worker process of the cluster and its restart state.
pub struct Worker {
    /// What the log calls it: prefill, decode or aggregated.
    pub role: &'static str,
    pub index: usize,
    /// `None` between an exit and its restart.
    pub child: Option<Child>,
    started: Instant,
    /// Exits in a row, each before `healthy_after`.
    quick_exits: u32,
    restart_at: Option<Instant>,
}

impl Worker {
    pub fn new(role: &'static str, index: usize, child: Child, now: Instant) -> Self {
        Worker {
            role,
            index,
            child: Some(child),
            started: now,
            quick_exits: 0,
            restart_at: None,
        }
    }

    /// Notes an exit (or a failed start) at `now`; returns the pause before the next start.
    fn exited(&mut self, now: Instant, b: &Backoff) -> Duration {
        self.child = None;
        if now.saturating_duration_since(self.started) >= b.healthy_after {
            self.quick_exits = 0;
        }
        let pause = b
            .first
            .saturating_mul(1 << self.quick_exits.min(16))
            .min(b.max);
        self.quick_exits = self.quick_exits.saturating_add(1);
        self.restart_at = Some(now + pause);
        pause
    }

    fn due(&self, now: Instant) -> bool {
        self.child.is_none() && self.restart_at.is_some_and(|t| now >= t)
    }

    fn started(&mut self, child: Child, now: Instant) {
        self.child = Some(child);
        self.started = now;
        self.restart_at = None;
    }
}

/// Watches the workers for ever: restarts each one that exits, with `spawn(role, index)`.
pub async fn supervise(
    workers: &mut [Worker],
    spawn: impl Fn(&'static str, usize) -> anyhow::Result<Child>,
    backoff: Backoff,
) {
    loop {
        let now = Instant::now();
        for w in workers.iter_mut() {
            match w.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => {
                    let pause = w.exited(now, &backoff);
                    if status.success() {
                        // A drain (SIGTERM, `tandem drain`) ends in a clean exit: a restart.
                        tracing::info!(
                            role = w.role,
                            index = w.index,
                            "worker drained and stopped; starting it again in {pause:?}"
                        );
                    } else {
                        tracing::warn!(
                            role = w.role,
                            index = w.index,
                            %status,
                            "worker exited; restarting it in {pause:?}"
                        );
                    }
                }
                Some(Ok(None)) => {}
                Some(Err(e)) => {
                    tracing::warn!(role = w.role, index = w.index, error = %e, "worker status");
                }
                None if w.due(now) => match spawn(w.role, w.index) {
                    Ok(child) => {
                        tracing::warn!(
                            role = w.role,
                            index = w.index,
                            pid = child.id(),
                            "worker restarted"
                        );
                        w.started(child, now);
                    }
                    Err(e) => {
                        let pause = w.exited(now, &backoff);
                        tracing::warn!(
                            role = w.role,
                            index = w.index,
                            error = %e,
                            "worker did not start; trying again in {pause:?}"
                        );
                    }
                },
                None => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited_worker(now: Instant) -> Worker {
        Worker {
            role: "decode",
            index: 0,
            child: None,
            started: now,
            quick_exits: 0,
            restart_at: None,
        }
    }

    #[test]
    fn quick_exits_double_the_pause_up_to_the_cap_and_a_healthy_run_resets_it() {
        let b = Backoff::default();
        let t0 = Instant::now();
        let mut w = exited_worker(t0);
        let s = Duration::from_secs;
        let mut now = t0;
        let mut pauses = Vec::new();
        for _ in 0..7 {
            now += s(2);
            let p = w.exited(now, &b);
            assert!(!w.due(now + p - Duration::from_millis(1)));
            assert!(w.due(now + p));
            pauses.push(p.as_secs());
            w.started = now + p;
            now += p;
        }
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30]);
        // A minute of running: the next exit pauses for one second again.
        now += s(60);
        assert_eq!(w.exited(now, &b), s(1));
        // Started again, it exits after a second: a quick exit, twice the pause.
        w.started = now + s(1);
        assert_eq!(w.exited(now + s(2), &b), s(2));
    }
}
