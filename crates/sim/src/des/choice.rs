//! The candidates admission judges a request on, built from the simulated instances' exact state
//! as the router builds them from heartbeats ([`PrefillLoad`], [`DecodeLoad`]), the pair choice
//! ([`PairChoice`]) and the verdict.

use crate::admission::decide::{itl_limit, usable_ttft};
use crate::admission::{
    Ask, Budget, Candidate, DecodeLoad, Prediction, PrefillLoad, RejectReason, Verdict, judge,
};

use super::admit::AdmState;
use super::admit_config::PairChoice;
use super::{Cluster, Sim};

/// What admission decided for a request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Decision {
    /// Place it on prefill instance `p` and decode instance `d` (aggregated: both `d`).
    Place {
        p: usize,
        d: usize,
        prediction: Prediction,
    },
    /// Queue it until `until` at the latest, then refuse it for `reason`.
    Wait {
        until: f64,
        reason: RejectReason,
    },
    Reject(RejectReason),
    /// No prediction can be made yet.
    Unpredicted,
}

/// One pair of instances with its loads and prediction for a request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Path {
    pub p: usize,
    pub d: usize,
    pub decode: DecodeLoad,
    pub kv_fits: bool,
    pub prediction: Option<Prediction>,
}

impl Sim<'_> {
    /// Request `id` on prefill instance `p` and decode instance `d` (aggregated: instance `d`).
    ///
    /// A decode instance's batch is every sequence holding KV there (running, ready to join, or
    /// reserved while its prompt is computed or its KV moves), its context theirs (prompt tokens
    /// for those not yet running), as the router reads running plus reserved work.
    pub(super) fn path(&self, a: &AdmState, regime: u8, id: u32, p: usize, d: usize) -> Path {
        let r = &self.reqs[id as usize];
        let (prefill, decode, kv_fits, aggregated) = match &self.cfg.cluster {
            Cluster::Aggregated { instances } => {
                let inst = &self.agg[d];
                let step_tokens = instances[d].max_batch_tokens;
                let context = inst.set.context();
                let prefill = PrefillLoad {
                    queued_tokens: inst.queued_tokens,
                    step_tokens,
                    decode_batch: inst.set.running,
                    decode_context: context,
                };
                let decode = DecodeLoad {
                    batch: inst.holders,
                    context: context + inst.reserved_tokens,
                    prefill_tokens_per_step: if inst.queued_tokens > 0 {
                        step_tokens.saturating_sub(inst.set.running)
                    } else {
                        0
                    },
                    tightest_itl: inst.itl.tightest(),
                };
                (prefill, decode, inst.free_blocks >= r.blocks, true)
            }
            Cluster::Disaggregated { prefill, .. } => {
                let inst = &self.decode[d];
                let load = PrefillLoad {
                    queued_tokens: self.prefill[p].queued_tokens,
                    step_tokens: prefill[p].max_batch_tokens,
                    decode_batch: 0,
                    decode_context: 0,
                };
                let decode = DecodeLoad {
                    batch: inst.holders,
                    context: inst.set.context() + inst.reserved_tokens,
                    prefill_tokens_per_step: 0,
                    tightest_itl: inst.itl.tightest(),
                };
                (load, decode, inst.free_blocks >= r.blocks, false)
            }
        };
        let candidate = if aggregated {
            Candidate::Aggregated {
                prefill: &prefill,
                decode: &decode,
            }
        } else {
            Candidate::Disaggregated {
                prefill: &prefill,
                decode: &decode,
            }
        };
        Path {
            p,
            d,
            decode,
            kv_fits,
            prediction: a.predictor.predict(&candidate, r.input, regime),
        }
    }

    /// Admission's decision for request `id` with `budget` (its TTFT budget less any time it has
    /// waited), as the router's `Registry::decide` makes it.
    pub(super) fn decide(&self, a: &AdmState, regime: u8, id: u32, budget: Budget) -> Decision {
        let r = &self.reqs[id as usize];
        let ask = Ask {
            prompt_tokens: r.input,
            max_new_tokens: r.output,
            budget,
        };
        let aggregated = matches!(self.cfg.cluster, Cluster::Aggregated { .. });
        let mut chosen = match (aggregated, a.cfg.choice) {
            (true, _) => {
                let i = (0..self.agg.len())
                    .min_by_key(|&i| self.agg[i].queued_tokens)
                    .unwrap_or(0);
                self.path(a, regime, id, i, i)
            }
            (false, PairChoice::Headroom) => {
                let d = self.policy_decode().unwrap_or(0);
                self.path(a, regime, id, self.least_queued_prefill(), d)
            }
            (false, PairChoice::BestFit) => self.best_fit(a, regime, id, &ask),
        };
        let Some(prediction) = chosen.prediction else {
            return Decision::Unpredicted;
        };
        let rules = &a.cfg.rules;
        let drain = a.predictor.decode_drain(&prediction, &chosen.decode);
        let mut verdict = judge(
            &ask,
            &prediction,
            &chosen.decode,
            chosen.kv_fits,
            drain,
            rules,
        );
        if matches!(verdict, Verdict::Wait { .. })
            && !aggregated
            && a.cfg.choice == PairChoice::Headroom
            && let Some(better) = self.roomier_decode(a, regime, id, &ask, &chosen)
        {
            // The policy's decode instance has no room for it: another may.
            chosen = better;
            if let Some(p) = chosen.prediction {
                verdict = judge(&ask, &p, &chosen.decode, chosen.kv_fits, drain, rules);
            }
        }
        let prediction = chosen.prediction.unwrap_or(prediction);
        match verdict {
            Verdict::Admit => Decision::Place {
                p: chosen.p,
                d: chosen.d,
                prediction,
            },
            Verdict::Wait { for_s } => Decision::Wait {
                until: self.now + for_s,
                reason: if chosen.kv_fits {
                    RejectReason::ItlBudgetUnreachable
                } else {
                    RejectReason::TtftBudgetUnreachable
                },
            },
            Verdict::Reject { reason, .. } => Decision::Reject(reason),
        }
    }

    /// Whether a path has KV room and keeps its decode instance within the ITL limit.
    fn decode_fits(ask: &Ask, o: &Path) -> Option<Prediction> {
        let p = o.prediction?;
        (o.kv_fits && itl_limit(ask, &o.decode).is_none_or(|l| p.itl_bound <= l)).then_some(p)
    }

    /// The decode instance other than the chosen one with room for the request and the lowest
    /// predicted ITL, if any (the router's scan when its policy's choice has no room).
    fn roomier_decode(
        &self,
        a: &AdmState,
        regime: u8,
        id: u32,
        ask: &Ask,
        chosen: &Path,
    ) -> Option<Path> {
        let mut best: Option<(Path, f64)> = None;
        for i in (0..self.decode.len()).filter(|&i| i != chosen.d) {
            let o = self.path(a, regime, id, chosen.p, i);
            if let Some(p) = Self::decode_fits(ask, &o)
                && best.is_none_or(|(_, b)| p.itl_bound < b)
            {
                best = Some((o, p.itl_bound));
            }
        }
        best.map(|(o, _)| o)
    }

    /// Best fit: the decode instance with room and the longest predicted step within the ITL
    /// limit, then the prefill instance with the most queued tokens still predicted within the
    /// TTFT budget. Where none qualifies, the router's choice, which the verdict then refuses or
    /// makes wait.
    fn best_fit(&self, a: &AdmState, regime: u8, id: u32, ask: &Ask) -> Path {
        let p0 = self.least_queued_prefill();
        let mut decode: Option<(usize, f64)> = None;
        for d in 0..self.decode.len() {
            if let Some(p) = Self::decode_fits(ask, &self.path(a, regime, id, p0, d))
                && decode.is_none_or(|(_, t)| p.itl_bound > t)
            {
                decode = Some((d, p.itl_bound));
            }
        }
        let d = decode
            .map(|(d, _)| d)
            .or_else(|| self.policy_decode())
            .unwrap_or(0);
        let usable = usable_ttft(ask, &a.cfg.rules);
        let mut prefill: Option<(usize, u64)> = None;
        for p in 0..self.prefill.len() {
            let queued = self.prefill[p].queued_tokens;
            let meets = self
                .path(a, regime, id, p, d)
                .prediction
                .is_some_and(|x| x.ttft_bound <= usable);
            if meets && prefill.is_none_or(|(_, q)| queued > q) {
                prefill = Some((p, queued));
            }
        }
        self.path(a, regime, id, prefill.map_or(p0, |(p, _)| p), d)
    }
}
