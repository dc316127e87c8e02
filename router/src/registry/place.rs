//! Placement with admission: the best candidate of each path (a prefill and a decode worker, or an
//! aggregated worker) from the candidate tables, its predicted latencies, the admission rule's
//! verdict, and the charge of admitted work against its workers until their heartbeats show it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_sim::admission::{
    Ask, Budget, Candidate, DecodeLoad, Prediction, PrefillLoad, RejectReason, Verdict, judge,
};

use super::Registry;
use crate::candidates::Candidates;
use crate::error::RouterError;
use crate::pending::Delta;
use crate::policy::Policy;
use crate::types::{Leg, Load, Placement, Predicted, RequestShape};
use tandem_proto::v1::WorkerIdentity;

/// Admission's answer for one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Placed, and charged to its workers.
    Placed(Placement),
    /// Nothing fits now, on the decode side; the request may wait until `until` and be decided
    /// again, or be refused for `reason` then.
    Wait {
        until: Instant,
        reason: RejectReason,
        predicted_ttft: Option<Duration>,
    },
}

/// What a decision is made for: the served model's key, its load regime, and the time.
struct At<'a> {
    model: &'a str,
    regime: u8,
    now: Instant,
}

/// One path a request could take, with what admission predicts for it.
struct Path {
    /// Slots and table indices: (prefill or aggregated, decode or the same aggregated).
    prompt: (Leg, u32, usize),
    decode: (u32, usize),
    aggregated: bool,
    d: DecodeLoad,
    kv_fits: bool,
    prediction: Option<Prediction>,
}

impl Registry {
    /// Chooses where a request runs, or refuses it; a request that would have to wait is refused
    /// (the router's task makes it wait instead, with [`Registry::decide`]).
    pub fn place(&mut self, shape: &RequestShape, now: Instant) -> Result<Placement, RouterError> {
        match self.decide(shape, now)? {
            Decision::Placed(p) => Ok(p),
            Decision::Wait {
                reason,
                predicted_ttft,
                ..
            } => Err(RouterError::Rejected {
                reason,
                detail: "no decode worker has room for the request within its budget".into(),
                retry_after: Some(self.config.default_retry_after),
                predicted_ttft,
            }),
        }
    }

    /// Decides a request: placed (and charged), to wait, or refused.
    pub fn decide(&mut self, shape: &RequestShape, now: Instant) -> Result<Decision, RouterError> {
        if shape.prompt_tokens == 0 || shape.max_new_tokens == 0 {
            return Err(RouterError::InvalidArgument(
                "prompt_tokens and max_new_tokens must be at least 1".into(),
            ));
        }
        let key = self.model_key(&shape.model)?;
        let Some(tables) = self.models.get(&key) else {
            return Err(RouterError::UnknownModel(shape.model.clone()));
        };
        let disagg = if tables.prefill.is_empty() || tables.decode.is_empty() {
            None
        } else {
            let p = pick(&*self.policy, Leg::Prefill, &tables.prefill, shape)?;
            let d = pick(&*self.policy, Leg::Decode, &tables.decode, shape)?;
            Some((tables.prefill.slot(p), p, tables.decode.slot(d), d))
        };
        let agg = if tables.aggregated.is_empty() {
            None
        } else {
            let a = pick(&*self.policy, Leg::Prefill, &tables.aggregated, shape)?;
            Some((tables.aggregated.slot(a), a))
        };
        if disagg.is_none() && agg.is_none() {
            let leg = if tables.prefill.is_empty() {
                Leg::Prefill
            } else {
                Leg::Decode
            };
            return Err(RouterError::NoWorkers(leg));
        }
        let lapsed = |r: &Self, slot: u32| r.worker(slot).lease_deadline <= now;
        if disagg.is_some_and(|(p, _, d, _)| lapsed(self, p) || lapsed(self, d))
            || agg.is_some_and(|(a, _)| lapsed(self, a))
        {
            // A lease ran out since the last sweep: sweep now and decide again without it.
            self.expire(now);
            return self.decide(shape, now);
        }
        let at = At {
            model: &key,
            regime: self.regime(&key, now),
            now,
        };
        let mut options: [Option<Path>; 2] = [None, None];
        if let Some((ps, pi, ds, di)) = disagg {
            let (p, d) = ((Leg::Prefill, ps, pi), (ds, di));
            options[0] = Some(self.option(&at, shape, p, d, false));
        }
        if let Some((a, ai)) = agg {
            let (p, d) = ((Leg::Decode, a, ai), (a, ai));
            options[1] = Some(self.option(&at, shape, p, d, true));
        }
        // Headroom: the path with the lower predicted TTFT bound, the disaggregated pair on a tie
        // or when neither can be predicted yet.
        let bound = |o: &Path| o.prediction.map_or(f64::INFINITY, |p| p.ttft_bound);
        let mut chosen = match options {
            [Some(a), Some(b)] => {
                if bound(&b) < bound(&a) {
                    b
                } else {
                    a
                }
            }
            [Some(a), None] | [None, Some(a)] => a,
            [None, None] => return Err(RouterError::NoWorkers(Leg::Prefill)),
        };
        let Some(prediction) = chosen.prediction else {
            return self.place_unpredicted(&key, shape, &chosen, now);
        };
        let ask = ask(shape);
        let rules = self.config.admission.rules;
        let predictor = &self.models[&key].predictor;
        let drain = predictor.decode_drain(&prediction, &chosen.d);
        let mut verdict = judge(&ask, &prediction, &chosen.d, chosen.kv_fits, drain, &rules);
        if matches!(verdict, Verdict::Wait { .. }) && !chosen.aggregated {
            // The policy's decode worker has no room for it: another may.
            if let Some(better) = self.roomier_decode(&at, shape, &chosen) {
                chosen = better;
                if let Some(p) = chosen.prediction {
                    let drain = self.models[&key].predictor.decode_drain(&p, &chosen.d);
                    verdict = judge(&ask, &p, &chosen.d, chosen.kv_fits, drain, &rules);
                }
            }
        }
        let prediction = chosen.prediction.unwrap_or(prediction);
        let predicted_ttft = Some(secs(prediction.ttft));
        match verdict {
            Verdict::Admit => Ok(Decision::Placed(self.charge_and_place(
                &key,
                shape,
                &chosen,
                Some(prediction),
                now,
            ))),
            Verdict::Wait { for_s } => Ok(Decision::Wait {
                until: now + secs(for_s),
                reason: if chosen.kv_fits {
                    RejectReason::ItlBudgetUnreachable
                } else {
                    RejectReason::TtftBudgetUnreachable
                },
                predicted_ttft,
            }),
            Verdict::Reject {
                reason,
                retry_after_s,
            } => Err(RouterError::Rejected {
                reason,
                detail: rejection_detail(reason, &ask, &prediction, retry_after_s.is_none()),
                retry_after: retry_after_s.map(secs),
                predicted_ttft,
            }),
        }
    }

    /// The path through these workers, with its loads and prediction.
    fn option(
        &self,
        at: &At<'_>,
        shape: &RequestShape,
        prompt: (Leg, u32, usize),
        decode: (u32, usize),
        aggregated: bool,
    ) -> Path {
        let (model, now) = (at.model, at.now);
        let predictor = &self.models[model].predictor;
        let pw = self.worker(prompt.1);
        let dw = self.worker(decode.0);
        let (pe, de) = (pw.effective(), dw.effective());
        let step_tokens = pw.step_tokens(self.config.admission.step_tokens);
        let mut p = PrefillLoad {
            queued_tokens: 0,
            step_tokens,
            decode_batch: 0,
            decode_context: 0,
        };
        if aggregated {
            p.decode_batch = pe.running_seqs;
            p.decode_context = pe.decode_context_tokens;
        }
        // The reported queue, and what was placed since, has drained since the report.
        let model_of = if aggregated {
            &predictor.aggregated
        } else {
            &predictor.prefill
        };
        let rate = predictor.drained(model_of, &p, 1.0) as f64;
        p.queued_tokens =
            pw.pending
                .queued_now(pw.reported.queued_prefill_tokens, pw.reported_at, now, rate);
        let d = decode_load(
            &de,
            if aggregated && p.queued_tokens > 0 {
                step_tokens.saturating_sub(de.running_seqs)
            } else {
                0
            },
        );
        let blocks =
            u64::from(shape.prompt_tokens).div_ceil(dw.block_tokens(self.config.block_tokens));
        let candidate = if aggregated {
            Candidate::Aggregated {
                prefill: &p,
                decode: &d,
            }
        } else {
            Candidate::Disaggregated {
                prefill: &p,
                decode: &d,
            }
        };
        let prediction = predictor.predict(&candidate, shape.prompt_tokens, at.regime);
        Path {
            prompt,
            decode,
            aggregated,
            d,
            kv_fits: de.free_kv_blocks >= blocks,
            prediction,
        }
    }

    /// The decode worker (other than the chosen one) with room for the request and the lowest
    /// predicted ITL, if any: a scan, run only when the policy's choice has no room.
    fn roomier_decode(&self, at: &At<'_>, shape: &RequestShape, chosen: &Path) -> Option<Path> {
        let tables = &self.models[at.model];
        let ask = ask(shape);
        let mut best: Option<Path> = None;
        for i in 0..tables.decode.len() {
            if i == chosen.decode.1 || shape.excludes(&tables.decode.worker_ids()[i]) {
                continue;
            }
            let slot = tables.decode.slot(i);
            if self.worker(slot).lease_deadline <= at.now {
                continue;
            }
            let o = self.option(at, shape, chosen.prompt, (slot, i), false);
            let Some(p) = o.prediction else { continue };
            let fits = o.kv_fits
                && tandem_sim::admission::decide::itl_limit(&ask, &o.d)
                    .is_none_or(|l| p.itl_bound <= l);
            let better = best
                .as_ref()
                .and_then(|b| b.prediction)
                .is_none_or(|b| p.itl_bound < b.itl_bound);
            if fits && better {
                best = Some(o);
            }
        }
        best
    }

    /// Before the router can predict (no profile, no measured steps yet): the old limits only.
    fn place_unpredicted(
        &mut self,
        model: &str,
        shape: &RequestShape,
        chosen: &Path,
        now: Instant,
    ) -> Result<Decision, RouterError> {
        let retry_after = self.config.default_retry_after;
        let pw = self.worker(chosen.prompt.1);
        let queued = pw.effective().queued_prefill_tokens;
        if queued >= self.config.max_queued_prefill_tokens {
            let speed = pw.effective().prefill_tokens_per_s;
            return Err(RouterError::Overloaded {
                leg: Leg::Prefill,
                detail: format!("{queued} prompt tokens queued"),
                retry_after: drain_time(queued, speed).unwrap_or(retry_after),
            });
        }
        if !chosen.kv_fits {
            let dw = self.worker(chosen.decode.0);
            return Err(RouterError::Overloaded {
                leg: Leg::Decode,
                detail: format!(
                    "{} KV blocks needed, {} free at most",
                    u64::from(shape.prompt_tokens)
                        .div_ceil(dw.block_tokens(self.config.block_tokens)),
                    dw.effective().free_kv_blocks
                ),
                retry_after,
            });
        }
        Ok(Decision::Placed(
            self.charge_and_place(model, shape, chosen, None, now),
        ))
    }

    fn charge_and_place(
        &mut self,
        model: &str,
        shape: &RequestShape,
        chosen: &Path,
        prediction: Option<Prediction>,
        now: Instant,
    ) -> Placement {
        let now_s = self.seconds(now);
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        if let (Some(t), Some(p)) = (self.models.get_mut(model), &prediction) {
            t.in_flight.placed(ticket, now_s, p, shape.max_new_tokens);
        }
        let prompt = u64::from(shape.prompt_tokens);
        let (ps, ds) = (chosen.prompt.1, chosen.decode.0);
        let blocks = prompt.div_ceil(self.worker(ds).block_tokens(self.config.block_tokens));
        self.charge(
            ps,
            Delta {
                prefill_tokens: prompt,
                prefill_seqs: 1,
                ..Delta::default()
            },
            now,
        );
        self.charge(
            ds,
            Delta {
                kv_blocks: blocks,
                decode_seqs: 1,
                decode_tokens: prompt,
                itl_budget_ms: shape.itl_budget.map_or(0, crate::convert::millis),
                ..Delta::default()
            },
            now,
        );
        let predicted = prediction.map(|p| Predicted {
            ttft: secs(p.ttft),
            itl: secs(p.itl),
            raw_ttft: secs(p.ttft_raw),
            raw_itl: secs(p.itl_raw),
            regime: p.regime,
            ticket,
        });
        Placement {
            prefill: self.worker(ps).identity.clone(),
            decode: self.worker(ds).identity.clone(),
            predicted,
        }
    }

    /// The served model a request names: its own name, or the only one served.
    pub(super) fn model_key(&self, model: &str) -> Result<String, RouterError> {
        if model.is_empty() {
            let mut all = self.models.keys();
            return match (all.next(), all.next()) {
                (Some(only), None) => Ok(only.clone()),
                (None, _) => Err(RouterError::NoWorkers(Leg::Prefill)),
                (Some(_), Some(_)) => Err(RouterError::InvalidArgument(
                    "several models are served: name one".into(),
                )),
            };
        }
        if self.models.contains_key(model) {
            Ok(model.to_owned())
        } else {
            Err(RouterError::UnknownModel(model.to_owned()))
        }
    }

    /// Adds placed work to a worker and refreshes its entry in the candidate tables.
    fn charge(&mut self, slot: u32, delta: Delta, now: Instant) {
        let breaker = self.config.breaker;
        let Some(w) = self.slots[slot as usize].as_mut() else {
            return;
        };
        w.pending.add(now, delta);
        // A half-open worker's first new request is its probe; it takes no more until reported.
        w.breaker.placed(now, &breaker);
        self.list(slot);
    }

    /// Another prefill worker for a prompt whose prefill failed: the policy's choice among the
    /// model's prefill workers that are none of `shape.exclude`, charged with the prompt. Only
    /// prefill workers qualify: an aggregated worker computes prompts into its own reservations.
    pub fn place_prefill(
        &mut self,
        shape: &RequestShape,
        now: Instant,
    ) -> Result<Arc<WorkerIdentity>, RouterError> {
        let key = self.model_key(&shape.model)?;
        let Some(tables) = self.models.get(&key) else {
            return Err(RouterError::UnknownModel(shape.model.clone()));
        };
        let i = pick(&*self.policy, Leg::Prefill, &tables.prefill, shape)?;
        let slot = tables.prefill.slot(i);
        if self.worker(slot).lease_deadline <= now {
            self.expire(now);
            return self.place_prefill(shape, now);
        }
        let delta = Delta {
            prefill_tokens: u64::from(shape.prompt_tokens),
            prefill_seqs: 1,
            ..Delta::default()
        };
        self.charge(slot, delta, now);
        Ok(self.worker(slot).identity.clone())
    }
}

/// What admission is asked for a request.
pub(crate) fn ask(shape: &RequestShape) -> Ask {
    Ask {
        prompt_tokens: shape.prompt_tokens,
        max_new_tokens: shape.max_new_tokens,
        budget: ask_budget(shape),
    }
}

/// A request's budgets as admission reads them.
pub(crate) fn ask_budget(shape: &RequestShape) -> Budget {
    Budget {
        ttft: shape.ttft_budget.map(|d| d.as_secs_f64()),
        itl: shape.itl_budget.map(|d| d.as_secs_f64()),
        priority: shape.priority,
    }
}

/// A decode worker's load as admission reads it: the batch and context once everything reserved
/// on it (placed, prefilling) has joined.
fn decode_load(l: &Load, prefill_tokens_per_step: u32) -> DecodeLoad {
    DecodeLoad {
        batch: l.running_seqs.saturating_add(l.reserved_seqs),
        context: l
            .decode_context_tokens
            .saturating_add(l.reserved_prompt_tokens),
        prefill_tokens_per_step,
        tightest_itl: (l.tightest_itl_budget_ms > 0)
            .then(|| f64::from(l.tightest_itl_budget_ms) / 1000.0),
    }
}

fn rejection_detail(reason: RejectReason, ask: &Ask, p: &Prediction, idle: bool) -> String {
    let ms = |s: f64| (s * 1000.0).round();
    match (reason, idle) {
        (RejectReason::TtftBudgetUnreachable, true) => format!(
            "the TTFT budget of {} ms is below what an idle worker gives this prompt ({} ms)",
            ask.budget.ttft.map_or(0.0, ms),
            ms(p.ttft_idle_bound)
        ),
        (RejectReason::TtftBudgetUnreachable, false) => format!(
            "the predicted time to first token ({} ms, up to {} ms) exceeds the budget of {} ms",
            ms(p.ttft),
            ms(p.ttft_bound),
            ask.budget.ttft.map_or(0.0, ms)
        ),
        (RejectReason::ItlBudgetUnreachable, true) => format!(
            "the ITL budget of {} ms is below one decode step on an idle worker ({} ms)",
            ask.budget.itl.map_or(0.0, ms),
            ms(p.itl_idle_bound)
        ),
        (RejectReason::ItlBudgetUnreachable, false) => format!(
            "no decode worker can take the sequence within its ITL budget or those it runs \
             (predicted step {} ms)",
            ms(p.itl_bound)
        ),
        (RejectReason::QueueFull, _) => "the admission queue is full".into(),
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
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
    let i = policy
        .pick(leg, candidates, shape)
        .filter(|&i| i < candidates.len())
        .ok_or_else(|| RouterError::Overloaded {
            leg,
            detail: format!("policy {} found no {leg} worker with room", policy.name()),
            retry_after: Duration::ZERO,
        })?;
    let ids = candidates.worker_ids();
    if !shape.excludes(&ids[i]) {
        return Ok(i);
    }
    // A failover: the best score among the others (a scan, run only then).
    candidates
        .scores()
        .iter()
        .enumerate()
        .filter(|(j, _)| !shape.excludes(&ids[*j]))
        .min_by_key(|(j, s)| (**s, *j))
        .map(|(j, _)| j)
        .ok_or(RouterError::NoWorkers(leg))
}

/// Time to work through `tokens` at `tokens_per_s`; `None` until a speed has been measured.
fn drain_time(tokens: u64, tokens_per_s: f32) -> Option<Duration> {
    let secs = tokens as f64 / f64::from(tokens_per_s);
    (tokens_per_s > 0.0 && secs.is_finite()).then(|| Duration::from_secs_f64(secs.min(86_400.0)))
}
