//! A worker's drain, asked for by its stop signal (SIGTERM, Ctrl-C) or the `Drain` RPC: it takes
//! no new work at once (its heartbeats say DRAINING, so the router places nothing more on it, and
//! a Reserve or Prefill that still arrives is refused as UNAVAILABLE, which a gateway places
//! elsewhere), lets what it holds finish within a grace period, then stops. What is still running
//! then ends with UNAVAILABLE: a gateway moves such a stream to another decode worker.
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Shared by a worker's services (which refuse new work while it drains) and its `run`.
#[derive(Clone, Debug)]
pub struct Drain {
    grace: Duration,
    /// The grace of the drain asked for, once one is.
    asked: Arc<watch::Sender<Option<Duration>>>,
}

/// How often a draining worker looks whether it is idle.
const POLL: Duration = Duration::from_millis(20);

impl Drain {
    /// A worker whose drains last at most `grace` unless the `Drain` RPC says otherwise.
    pub fn new(grace: Duration) -> Self {
        Drain {
            grace,
            asked: Arc::new(watch::channel(None).0),
        }
    }

    /// Whether the worker takes no new work.
    pub fn draining(&self) -> bool {
        self.asked.borrow().is_some()
    }

    /// Asks for a drain whose grace is `grace_ms` (0: the worker's own); a drain already asked
    /// for keeps its grace.
    pub fn ask(&self, grace_ms: u32) {
        let grace = match grace_ms {
            0 => self.grace,
            ms => Duration::from_millis(u64::from(ms)),
        };
        self.asked.send_if_modified(|g| {
            let first = g.is_none();
            if first {
                *g = Some(grace);
            }
            first
        });
    }

    /// Resolves once a drain is asked for (at once if one was).
    pub async fn asked(&self) {
        let mut asked = self.asked.subscribe();
        let _ = asked.wait_for(Option::is_some).await;
    }

    /// Waits for `stop` or a drain asked for otherwise, then until `idle()` holds or the drain's
    /// grace has passed; the worker stops when this returns.
    pub async fn run(&self, stop: impl Future<Output = ()>, idle: impl Fn() -> bool) {
        let mut asked = self.asked.subscribe();
        tokio::select! {
            () = stop => self.ask(0),
            _ = asked.wait_for(Option::is_some) => {}
        }
        let grace = self.asked.borrow().unwrap_or(self.grace);
        let began = Instant::now();
        tracing::info!(
            ?grace,
            "draining: no new work; what is in flight may finish"
        );
        loop {
            if idle() {
                tracing::info!(after = ?began.elapsed(), "drained");
                return;
            }
            if began.elapsed() >= grace {
                tracing::warn!(?grace, "drain grace over with work in flight; stopping it");
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stop_drains_until_idle() {
        let drain = Drain::new(Duration::from_secs(30));
        let idle = Arc::new(AtomicBool::new(false));
        let t0 = Instant::now();
        let done = {
            let (d, idle) = (drain.clone(), idle.clone());
            tokio::spawn(async move { d.run(async {}, || idle.load(Ordering::SeqCst)).await })
        };
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(drain.draining(), "new work is refused from the stop on");
        assert!(!done.is_finished());
        idle.store(true, Ordering::SeqCst);
        done.await.unwrap();
        let took = t0.elapsed();
        assert!(took >= Duration::from_secs(3) && took <= Duration::from_secs(3) + POLL);
    }

    #[tokio::test(start_paused = true)]
    async fn work_still_in_flight_at_the_grace_is_left() {
        let drain = Drain::new(Duration::from_secs(5));
        let t0 = Instant::now();
        drain.run(async {}, || false).await;
        let took = t0.elapsed();
        assert!(took >= Duration::from_secs(5) && took <= Duration::from_secs(5) + POLL);
    }

    #[tokio::test(start_paused = true)]
    async fn the_rpc_drains_without_a_stop_and_its_grace_holds() {
        let drain = Drain::new(Duration::from_secs(30));
        assert!(!drain.draining());
        let t0 = Instant::now();
        let done = {
            let d = drain.clone();
            tokio::spawn(async move { d.run(std::future::pending(), || false).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!done.is_finished(), "nothing asked for a drain yet");
        drain.ask(2_000);
        // A second ask does not change the drain under way.
        drain.ask(0);
        done.await.unwrap();
        let took = t0.elapsed();
        assert!(took >= Duration::from_secs(3) && took <= Duration::from_secs(3) + POLL);
    }
}
