//! A circuit breaker per worker, fed by what gateways saw of its calls: consecutive failures open
//! it (the worker gets no new work), a pause later it lets one probe through (half-open), and
//! enough successful probes close it again. A failure while half-open opens it for another pause.
//! Time is the caller's: the registry moves the breaker on at heartbeats and reports.

use std::time::{Duration, Instant};

/// When a breaker opens and closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open a closed breaker.
    pub failures: u32,
    /// How long an open breaker keeps new work away before a probe.
    pub open_for: Duration,
    /// Successful probes in a row that close a half-open breaker.
    pub successes: u32,
    /// A probe not reported within this long (its gateway gone) frees the way for another.
    pub probe_timeout: Duration,
}

impl Default for BreakerConfig {
    /// SGLang's gateway's defaults: 5 failures, 30 s open, 2 successes.
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            open_for: Duration::from_secs(30),
            successes: 2,
            probe_timeout: Duration::from_secs(30),
        }
    }
}

/// A breaker's state, as metrics and logs name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// `probe`: the deadline of the probe placed and not yet reported.
    HalfOpen {
        successes: u32,
        probe: Option<Instant>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Breaker {
    state: State,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: State::Closed { failures: 0 },
        }
    }
}

impl Breaker {
    pub fn state(&self) -> BreakerState {
        match self.state {
            State::Closed { .. } => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Moves on with time: an open breaker whose pause is over half-opens, and a probe past its
    /// deadline is given up.
    pub fn tick(&mut self, now: Instant) {
        match &mut self.state {
            State::Open { until } if now >= *until => {
                self.state = State::HalfOpen {
                    successes: 0,
                    probe: None,
                };
            }
            State::HalfOpen { probe, .. } if probe.is_some_and(|d| now >= d) => *probe = None,
            _ => {}
        }
    }

    /// Whether the worker may be given new work (as of the last [`Breaker::tick`]).
    pub fn admits(&self) -> bool {
        match self.state {
            State::Closed { .. } => true,
            State::Open { .. } => false,
            State::HalfOpen { probe, .. } => probe.is_none(),
        }
    }

    /// New work was placed on the worker; half-open, it is the probe, and no more goes there until
    /// it is reported. Returns whether that closed the way.
    pub fn placed(&mut self, now: Instant, config: &BreakerConfig) -> bool {
        match &mut self.state {
            State::HalfOpen { probe, .. } if probe.is_none() => {
                *probe = Some(now + config.probe_timeout);
                true
            }
            _ => false,
        }
    }

    /// A call to the worker succeeded or failed. Returns the new state when it changed.
    pub fn record(
        &mut self,
        ok: bool,
        now: Instant,
        config: &BreakerConfig,
    ) -> Option<BreakerState> {
        let before = self.state();
        let open = State::Open {
            until: now + config.open_for,
        };
        self.state = match (self.state, ok) {
            (State::Closed { .. }, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) => {
                let failures = failures.saturating_add(1);
                if failures >= config.failures.max(1) {
                    open
                } else {
                    State::Closed { failures }
                }
            }
            (State::HalfOpen { successes, .. }, true) => {
                let successes = successes.saturating_add(1);
                if successes >= config.successes.max(1) {
                    State::Closed { failures: 0 }
                } else {
                    State::HalfOpen {
                        successes,
                        probe: None,
                    }
                }
            }
            (State::HalfOpen { .. }, false) => open,
            // Calls placed before it opened report late: the pause stands.
            (s @ State::Open { .. }, _) => s,
        };
        let after = self.state();
        (after != before).then_some(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn config() -> BreakerConfig {
        BreakerConfig::default()
    }

    /// A breaker opened by five failures at `t0`, half-open after the pause with its probe
    /// placed.
    fn probing(c: &BreakerConfig, t0: Instant) -> Breaker {
        let mut b = Breaker::default();
        for _ in 0..5 {
            b.record(false, t0, c);
        }
        b.tick(t0 + 30 * S);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.admits());
        assert!(b.placed(t0 + 30 * S, c));
        b
    }

    #[test]
    fn five_failures_in_a_row_open_it_and_a_success_between_resets_the_count() {
        let (c, t0) = (config(), Instant::now());
        let mut b = Breaker::default();
        for _ in 0..4 {
            assert_eq!(b.record(false, t0, &c), None);
        }
        assert_eq!(b.record(true, t0, &c), None);
        for _ in 0..4 {
            assert_eq!(b.record(false, t0, &c), None);
            assert!(b.admits());
        }
        assert_eq!(b.record(false, t0, &c), Some(BreakerState::Open));
        assert!(!b.admits());
        // Late reports of calls placed before it opened change nothing.
        assert_eq!(b.record(true, t0 + S, &c), None);
        b.tick(t0 + 29 * S);
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[test]
    fn after_the_pause_one_probe_at_a_time_and_two_successes_close_it() {
        let (c, t0) = (config(), Instant::now());
        let mut b = probing(&c, t0);
        assert!(!b.admits(), "one probe at a time");
        assert!(!b.placed(t0 + 30 * S, &c));
        assert_eq!(b.record(true, t0 + 31 * S, &c), None);
        assert!(b.admits());
        b.placed(t0 + 31 * S, &c);
        assert_eq!(b.record(true, t0 + 32 * S, &c), Some(BreakerState::Closed));
        assert!(b.admits());
        // Closed again, it takes five new failures to open.
        for _ in 0..4 {
            b.record(false, t0 + 33 * S, &c);
        }
        assert!(b.admits());
    }

    #[test]
    fn a_failed_probe_opens_it_for_another_pause() {
        let (c, t0) = (config(), Instant::now());
        let mut b = probing(&c, t0);
        assert_eq!(b.record(false, t0 + 31 * S, &c), Some(BreakerState::Open));
        b.tick(t0 + 60 * S);
        assert_eq!(b.state(), BreakerState::Open);
        b.tick(t0 + 61 * S);
        assert_eq!(b.state(), BreakerState::HalfOpen);
    }

    #[test]
    fn a_probe_never_reported_frees_the_way_after_its_timeout() {
        let (c, t0) = (config(), Instant::now());
        let mut b = probing(&c, t0);
        b.tick(t0 + 59 * S);
        assert!(!b.admits());
        b.tick(t0 + 60 * S);
        assert!(b.admits());
    }
}
