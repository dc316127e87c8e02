//! Outlier ejection: a worker whose steps take much longer, against its role's model, than its
//! peers' is taken out of placement for a while (a throttled GPU, a bad link, a noisy
//! neighbour), as Envoy ejects an upstream slower than the rest of its cluster. The model's form
//! without its recent level is the yardstick: the level follows the latest steps, whoever's.
//! Its peers are the workers of the same model and role; at least three must have been measured,
//! and at most a third of them are out at once, so that a slow cluster is not emptied.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tandem_sim::admission::StepSample;

use super::Registry;
use crate::types::Role;

/// Steps per worker its pace is the median of.
const PACE_WINDOW: usize = 32;
/// Steps a worker needs before it is judged or counts as a peer.
const PACE_MIN: usize = 16;
/// How many times its peers' pace makes a worker an outlier.
pub const OUTLIER_FACTOR: f64 = 2.0;
/// Workers of a role that must have a pace before any is judged.
const MIN_PEERS: usize = 3;
/// How long an outlier takes no new work; it is judged afresh afterwards.
pub const EJECT_FOR: Duration = Duration::from_secs(30);
/// How long the peers' median pace is reused: a heartbeat costs a comparison, not a sort of
/// every worker's pace.
const PEERS_EVERY: Duration = Duration::from_secs(1);

/// A worker's recent steps, measured over what its role's model's form predicted for each, and
/// their median once there are enough.
#[derive(Debug, Default, Clone)]
pub(super) struct Pace {
    ratios: VecDeque<f64>,
    median: Option<f64>,
}

impl Pace {
    fn extend(&mut self, ratios: impl Iterator<Item = f64>) {
        for r in ratios.filter(|r| r.is_finite() && *r > 0.0) {
            if self.ratios.len() >= PACE_WINDOW {
                self.ratios.pop_front();
            }
            self.ratios.push_back(r);
        }
        self.median = (self.ratios.len() >= PACE_MIN).then(|| {
            let mut v: Vec<f64> = self.ratios.iter().copied().collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        });
    }
}

/// The median pace of a role's workers, recomputed at most every [`PEERS_EVERY`].
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Peers {
    median: Option<f64>,
    /// Workers with a pace, or out, when it was computed.
    paced: usize,
    at: Option<Instant>,
}

impl Registry {
    /// Records each step's pace against the form of the role's model.
    pub(super) fn observe_pace(&mut self, slot: u32, role: Role, steps: &[StepSample]) {
        let key = self.worker(slot).identity.model.clone();
        let Some(t) = self.models.get_mut(&key) else {
            return;
        };
        let model = t.step_model(role);
        let ratios: Vec<f64> = steps
            .iter()
            .filter_map(|s| Some(s.seconds / model.form_time(&s.shape())?))
            .collect();
        self.worker_mut(slot).pace.extend(ratios.into_iter());
    }

    /// The median pace of the workers of `model` and `role`, as of at most a second ago.
    fn peers(&mut self, model: &str, role: Role, now: Instant) -> Peers {
        let cached = self.models.get(model).map(|t| t.peers[role as usize]);
        if let Some(p) = cached
            && p.at
                .is_some_and(|at| now.saturating_duration_since(at) < PEERS_EVERY)
        {
            return p;
        }
        let (mut paces, mut out) = (Vec::new(), 0);
        for w in self.slots.iter().flatten() {
            if w.role != role || w.identity.model != model {
                continue;
            }
            paces.extend(w.pace.median);
            // Those out count as judged: a third of them may be out.
            out += usize::from(w.ejected_until.is_some());
        }
        paces.sort_by(f64::total_cmp);
        let peers = Peers {
            median: (paces.len() >= MIN_PEERS).then(|| paces[paces.len() / 2]),
            paced: paces.len() + out,
            at: Some(now),
        };
        if let Some(t) = self.models.get_mut(model) {
            t.peers[role as usize] = peers;
        }
        peers
    }

    /// Ejects the worker in `slot` if its pace is [`OUTLIER_FACTOR`] times its peers' median or
    /// more, unless a third of its role is out already; returns whether it did.
    pub(super) fn judge_pace(&mut self, slot: u32, now: Instant) -> bool {
        let w = self.worker(slot);
        let (role, model) = (w.role, w.identity.model.clone());
        let Some(pace) = w.pace.median else {
            return false;
        };
        if w.ejected_until.is_some() {
            return false;
        }
        let peers = self.peers(&model, role, now);
        let Some(median) = peers.median else {
            return false;
        };
        if peers.paced < MIN_PEERS || pace < OUTLIER_FACTOR * median {
            return false;
        }
        let out = self
            .slots
            .iter()
            .flatten()
            .filter(|w| w.role == role && w.identity.model == model && w.ejected_until.is_some())
            .count();
        if out >= peers.paced / MIN_PEERS {
            return false;
        }
        let w = self.worker_mut(slot);
        w.ejected_until = Some(now + EJECT_FOR);
        // Judged afresh on its return, not on the steps that ejected it.
        w.pace = Pace::default();
        tracing::warn!(
            worker = %w.id,
            pace = format!("{:.2}x", pace / median),
            "worker ejected for 30 s: its steps are slower than its peers'"
        );
        self.list(slot);
        true
    }

    /// The workers out of placement for being slower than their peers, by id.
    pub fn ejected(&self) -> Vec<std::sync::Arc<str>> {
        self.slots
            .iter()
            .flatten()
            .filter(|w| w.ejected_until.is_some())
            .map(|w| w.id.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tandem_proto::v1::WorkerRole;
    use tandem_sim::perf::PrefillItem;

    use super::*;
    use crate::policy::LeastLoaded;
    use crate::registry::admission_tests::HAND;
    use crate::registry::tests::{ident, ready};
    use crate::registry::{AdmissionConfig, RegistryConfig};
    use crate::types::RequestShape;

    fn registry(t0: Instant, prefill: usize) -> Registry {
        let config = RegistryConfig {
            admission: AdmissionConfig {
                base: Some(Arc::new(HAND)),
                ..AdmissionConfig::default()
            },
            ..RegistryConfig::default()
        };
        let mut r = Registry::new(config, Box::new(LeastLoaded));
        for i in 0..prefill {
            let id = ident(&format!("p{i}"), WorkerRole::Prefill);
            r.register(id, ready(0, 0, 0), t0).unwrap();
        }
        r.register(ident("d0", WorkerRole::Decode), ready(0, 1000, 0), t0)
            .unwrap();
        r
    }

    /// Sixteen 100-token prefill steps (11 ms each by the model) taking `slower` times that.
    fn steps(slower: f64) -> Vec<StepSample> {
        (0..PACE_MIN)
            .map(|_| StepSample::new(&[PrefillItem::fresh(100)], 0, 0, 11e-3 * slower))
            .collect()
    }

    /// Beats every worker at `now`, as their leases want.
    fn beat(r: &mut Registry, n: usize, now: Instant) {
        for i in 0..n {
            r.heartbeat(&format!("p{i}"), ready(0, 0, 0), now).unwrap();
        }
        r.heartbeat("d0", ready(0, 1000, 0), now).unwrap();
    }

    fn prefill_of(r: &mut Registry, now: Instant) -> String {
        let shape = RequestShape {
            prompt_tokens: 16,
            max_new_tokens: 4,
            ..RequestShape::default()
        };
        r.place(&shape, now).unwrap().prefill.worker_id.clone()
    }

    /// Reports of `slower` per worker, each a second after the last, heartbeats between.
    fn report(r: &mut Registry, slower: &[f64], t0: Instant) -> Instant {
        let mut now = t0;
        for (i, &x) in slower.iter().enumerate() {
            now = t0 + Duration::from_secs(1 + i as u64);
            beat(r, slower.len(), now);
            r.observe_steps(&format!("p{i}"), &steps(x), now);
        }
        now
    }

    #[test]
    fn a_worker_three_times_slower_than_its_peers_is_ejected_for_a_while() {
        let t0 = Instant::now();
        let mut r = registry(t0, 4);
        let now = report(&mut r, &[1.0, 1.1, 0.9, 3.0], t0);
        assert_eq!(r.ejected(), vec![Arc::<str>::from("p3")]);
        // Least queued first, p3 is never chosen while out.
        let mut chosen: Vec<String> = (0..8).map(|_| prefill_of(&mut r, now)).collect();
        chosen.sort();
        chosen.dedup();
        assert_eq!(chosen, ["p0", "p1", "p2"]);
        // Back after the pause, with a fresh pace to be judged on.
        let s = Duration::from_secs;
        for k in 1..30 {
            beat(&mut r, 4, now + s(k));
        }
        assert_eq!(r.ejected().len(), 1);
        let back = now + s(30);
        beat(&mut r, 4, back);
        assert!(r.ejected().is_empty());
        let mut chosen: Vec<String> = (0..8).map(|_| prefill_of(&mut r, back)).collect();
        chosen.sort();
        chosen.dedup();
        assert_eq!(chosen, ["p0", "p1", "p2", "p3"]);
    }

    #[test]
    fn too_few_peers_or_a_uniformly_slow_role_eject_nobody() {
        let t0 = Instant::now();
        let mut r = registry(t0, 2);
        report(&mut r, &[1.0, 5.0], t0);
        assert!(r.ejected().is_empty(), "two workers are no peers");
        let mut r = registry(t0, 3);
        report(&mut r, &[4.0, 4.0, 4.0], t0);
        assert!(
            r.ejected().is_empty(),
            "all slow: the model is off, not a worker"
        );
        // Of seven, two may be out at a time, though three are outliers.
        let mut r = registry(t0, 7);
        report(&mut r, &[1.0, 1.0, 1.0, 1.0, 3.0, 5.0, 4.0], t0);
        let mut out = r.ejected();
        out.sort();
        assert_eq!(out, vec![Arc::<str>::from("p4"), Arc::<str>::from("p5")]);
    }
}
