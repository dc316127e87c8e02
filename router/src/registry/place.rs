//! Placement: choosing the pair for a request from the candidate tables, and counting the work
//! against both workers until their heartbeats show it.

use std::time::{Duration, Instant};

use super::{ModelTables, Registry};
use crate::candidates::Candidates;
use crate::error::RouterError;
use crate::pending::Delta;
use crate::policy::Policy;
use crate::types::{Leg, Placement, RequestShape, Role};

impl Registry {
    /// Chooses a prefill and a decode worker for a request and counts the work against both until
    /// their heartbeats show it.
    pub fn place(&mut self, shape: &RequestShape, now: Instant) -> Result<Placement, RouterError> {
        if shape.prompt_tokens == 0 || shape.max_new_tokens == 0 {
            return Err(RouterError::InvalidArgument(
                "prompt_tokens and max_new_tokens must be at least 1".into(),
            ));
        }
        let tables = self.tables_for(&shape.model)?;
        let p = pick(&*self.policy, Leg::Prefill, &tables.prefill, shape)?;
        let d = pick(&*self.policy, Leg::Decode, &tables.decode, shape)?;
        let (p_slot, d_slot) = (tables.prefill.slot(p), tables.decode.slot(d));
        let p_load = tables.prefill.loads()[p];
        let d_load = tables.decode.loads()[d];
        if self.worker(p_slot).lease_deadline <= now || self.worker(d_slot).lease_deadline <= now {
            // A lease ran out since the last sweep: sweep now and decide again without it.
            self.expire(now);
            return self.place(shape, now);
        }
        let prompt = u64::from(shape.prompt_tokens);
        let retry_after = self.config.default_retry_after;
        if p_load.queued_prefill_tokens >= self.config.max_queued_prefill_tokens {
            return Err(RouterError::Overloaded {
                leg: Leg::Prefill,
                detail: format!("{} prompt tokens queued", p_load.queued_prefill_tokens),
                retry_after: drain_time(p_load.queued_prefill_tokens, p_load.prefill_tokens_per_s)
                    .unwrap_or(retry_after),
            });
        }
        let blocks = prompt.div_ceil(self.worker(d_slot).block_tokens(self.config.block_tokens));
        if d_load.free_kv_blocks < blocks {
            return Err(RouterError::Overloaded {
                leg: Leg::Decode,
                detail: format!(
                    "{blocks} KV blocks needed, {} free at most",
                    d_load.free_kv_blocks
                ),
                retry_after,
            });
        }
        let predicted_ttft = drain_time(
            p_load.queued_prefill_tokens.saturating_add(prompt),
            p_load.prefill_tokens_per_s,
        );
        let prefill_delta = Delta {
            prefill_tokens: prompt,
            prefill_seqs: 1,
            ..Delta::default()
        };
        let decode_delta = Delta {
            kv_blocks: blocks,
            decode_seqs: 1,
            ..Delta::default()
        };
        self.charge(p_slot, Leg::Prefill, p, prefill_delta, now);
        self.charge(d_slot, Leg::Decode, d, decode_delta, now);
        Ok(Placement {
            prefill: self.worker(p_slot).identity.clone(),
            decode: self.worker(d_slot).identity.clone(),
            predicted_ttft,
        })
    }

    fn tables_for(&self, model: &str) -> Result<&ModelTables, RouterError> {
        if model.is_empty() {
            let mut all = self.models.values();
            return match (all.next(), all.next()) {
                (Some(only), None) => Ok(only),
                (None, _) => Err(RouterError::NoWorkers(Leg::Prefill)),
                (Some(_), Some(_)) => Err(RouterError::InvalidArgument(
                    "several models are served: name one".into(),
                )),
            };
        }
        self.models
            .get(model)
            .ok_or_else(|| RouterError::UnknownModel(model.to_owned()))
    }

    /// Adds placed work to a worker and refreshes its entries in the candidate tables; `index` is
    /// its position in the `leg` table, known from the pick.
    fn charge(&mut self, slot: u32, leg: Leg, index: usize, delta: Delta, now: Instant) {
        let Some(w) = self.slots[slot as usize].as_mut() else {
            return;
        };
        w.pending.add(now, delta);
        let eff = w.effective();
        let Some(tables) = self.models.get_mut(&w.identity.model) else {
            return;
        };
        tables
            .leg(leg)
            .set(index, eff, self.policy.score(leg, &eff));
        if w.role == Role::Aggregated {
            let other = match leg {
                Leg::Prefill => Leg::Decode,
                Leg::Decode => Leg::Prefill,
            };
            let t = tables.leg(other);
            if let Ok(i) = t.position(&w.id) {
                t.set(i, eff, self.policy.score(other, &eff));
            }
        }
    }
}

/// Asks the policy for a candidate of one leg.
fn pick(
    policy: &dyn Policy,
    leg: Leg,
    candidates: &Candidates,
    shape: &RequestShape,
) -> Result<usize, RouterError> {
    if candidates.is_empty() {
        return Err(RouterError::NoWorkers(leg));
    }
    policy
        .pick(leg, candidates, shape)
        .filter(|&i| i < candidates.len())
        .ok_or_else(|| RouterError::Overloaded {
            leg,
            detail: format!("policy {} found no {leg} worker with room", policy.name()),
            retry_after: Duration::ZERO,
        })
}

/// Time to work through `tokens` at `tokens_per_s`; `None` until a speed has been measured.
fn drain_time(tokens: u64, tokens_per_s: f32) -> Option<Duration> {
    let secs = tokens as f64 / f64::from(tokens_per_s);
    (tokens_per_s > 0.0 && secs.is_finite()).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}
