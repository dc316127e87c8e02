//! The load regime admission calibrates its predictions in ([`InFlight`]), per served model.

use std::time::Instant;

use super::Registry;

impl Registry {
    /// The load regime of model `key` at `now`.
    pub(super) fn regime(&mut self, key: &str, now: Instant) -> u8 {
        let now_s = self.seconds(now);
        let Some(t) = self.models.get_mut(key) else {
            return 0;
        };
        let prompts = t.prefill.len() + t.aggregated.len();
        t.in_flight.regime(now_s, prompts)
    }

    /// Seconds since the registry's epoch: the clock admission's models keep time by.
    pub(super) fn seconds(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.epoch).as_secs_f64()
    }
}
