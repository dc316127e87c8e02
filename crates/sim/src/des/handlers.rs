//! Placement and the instances' step loops.

use super::admit::Role;
use super::state::Kind;
use super::{Cluster, InstanceSpec, Phase, Sim};
use crate::perf::{Link, PrefillItem, StepShape};

impl<'a> Sim<'a> {
    fn specs(&self) -> (&'a [InstanceSpec], &'a [InstanceSpec], Option<&'a Link>) {
        match &self.cfg.cluster {
            Cluster::Disaggregated {
                prefill,
                decode,
                link,
            } => (prefill, decode, Some(link)),
            Cluster::Aggregated { instances } => (instances, &[], None),
        }
    }

    /// Places waiting requests FCFS until the head finds no room.
    pub(super) fn admit_pending(&mut self) {
        while let Some(&id) = self.pending.front() {
            if !self.place(id) {
                break;
            }
            self.pending.pop_front();
        }
    }

    fn place(&mut self, id: u32) -> bool {
        let blocks = self.reqs[id as usize].blocks;
        if let Cluster::Aggregated { .. } = self.cfg.cluster {
            let Some(a) = self.agg_with_room(blocks) else {
                return false;
            };
            self.place_at(id, a, a);
            return true;
        }
        let mut d = 0;
        if self.cfg.phase != Phase::PrefillOnly {
            match self
                .policy_decode()
                .filter(|&d| self.decode[d].free_blocks >= blocks)
            {
                Some(x) => d = x,
                None => return false,
            }
        }
        let p = self.least_queued_prefill();
        self.place_at(id, p, d);
        true
    }

    /// Least queued prompt tokens among aggregated instances with room, then the most free blocks.
    fn agg_with_room(&self, blocks: u64) -> Option<usize> {
        (0..self.agg.len())
            .filter(|&i| self.agg[i].free_blocks >= blocks)
            .min_by(|&i, &j| {
                let (a, b) = (&self.agg[i], &self.agg[j]);
                a.queued_tokens
                    .cmp(&b.queued_tokens)
                    .then(b.free_blocks.cmp(&a.free_blocks))
            })
    }

    /// The router's default decode choice: the most free KV blocks, then the fewest sequences
    /// holding blocks, then the first. It has room for a request if any instance has.
    pub(super) fn policy_decode(&self) -> Option<usize> {
        (0..self.decode.len()).min_by(|&i, &j| {
            let (a, b) = (&self.decode[i], &self.decode[j]);
            b.free_blocks
                .cmp(&a.free_blocks)
                .then(a.holders.cmp(&b.holders))
        })
    }

    /// The prefill instance with the fewest queued prompt tokens, the first on a tie.
    pub(super) fn least_queued_prefill(&self) -> usize {
        (0..self.prefill.len())
            .min_by_key(|&i| self.prefill[i].queued_tokens)
            .unwrap_or(0)
    }

    /// Places a request: its KV reserved on decode instance `d` and its prompt queued on prefill
    /// instance `p` (aggregated: both on instance `d`). The caller has checked the room.
    pub(super) fn place_at(&mut self, id: u32, p: usize, d: usize) {
        let r = self.reqs[id as usize];
        let itl = self.itl_budget(id);
        if let Cluster::Aggregated { .. } = self.cfg.cluster {
            let inst = &mut self.agg[d];
            inst.free_blocks -= r.blocks;
            inst.holders += 1;
            inst.reserved_tokens += u64::from(r.input);
            if let Some(b) = itl {
                inst.itl.add(b);
            }
            inst.waiting.push_back(id);
            inst.queued_tokens += u64::from(r.input);
            self.reqs[id as usize].inst = d as u32;
            if !self.agg[d].busy {
                self.start_agg(d);
            }
            return;
        }
        if self.cfg.phase != Phase::PrefillOnly {
            let inst = &mut self.decode[d];
            inst.free_blocks -= r.blocks;
            inst.holders += 1;
            inst.reserved_tokens += u64::from(r.input);
            if let Some(b) = itl {
                inst.itl.add(b);
            }
            self.reqs[id as usize].inst = d as u32;
            if self.cfg.phase == Phase::DecodeOnly {
                self.reqs[id as usize].first = self.now;
                self.first_token(id);
                self.decode[d].ready.push_back(id);
                if !self.decode[d].busy {
                    self.start_decode(d);
                }
                return;
            }
        }
        let inst = &mut self.prefill[p];
        inst.queue.push_back(id);
        inst.queued_tokens += u64::from(r.input);
        if !inst.busy {
            self.start_prefill(p, true);
        }
    }

    /// One prefill step, as the prefill worker's batcher makes it: prompts oldest first, each
    /// taking what is left of the step's token budget, so that the last prompt in a step may be
    /// chunked and finish in a later step (its earlier chunks then count as cached context).
    ///
    /// `after_idle`: the step is started by a prompt arriving at the idle instance (else straight
    /// after the instance's previous step), for the model's served-prefill factor.
    fn start_prefill(&mut self, p: usize, after_idle: bool) {
        let spec = &self.specs().0[p];
        let mut items = std::mem::take(&mut self.scratch_items);
        items.clear();
        let inst = &mut self.prefill[p];
        inst.chunks.clear();
        let mut room = spec.max_batch_tokens.max(1);
        for &id in &inst.queue {
            if room == 0 {
                break;
            }
            let r = &self.reqs[id as usize];
            let chunk = (r.input - r.done).min(room);
            room -= chunk;
            items.push(PrefillItem {
                new_tokens: chunk,
                cached_tokens: r.done,
            });
            inst.chunks.push((id, chunk));
        }
        if inst.chunks.is_empty() {
            inst.busy = false;
        } else {
            inst.busy = true;
            inst.started = self.now;
            let beside_decode = self.decode.iter().any(|d| d.busy);
            let dt = spec.model.prefill_time(&items)
                * spec.model.served_prefill_factor(beside_decode, after_idle);
            self.schedule(self.now + dt, Kind::PrefillDone(p as u32));
            self.observe_step(Role::Prefill, &items, 0, 0, dt);
        }
        self.scratch_items = items;
    }

    pub(super) fn on_prefill_done(&mut self, p: usize) {
        let (pspecs, _, link) = self.specs();
        let chunks = std::mem::take(&mut self.prefill[p].chunks);
        let dt = self.now - self.prefill[p].started;
        let mut freed = false;
        for &(id, chunk) in &chunks {
            self.prefill[p].queued_tokens -= u64::from(chunk);
            let r = &mut self.reqs[id as usize];
            r.done += chunk;
            if r.done < r.input {
                continue;
            }
            // Chunks are taken oldest first, so a finished prompt is at the front.
            self.prefill[p].queue.pop_front();
            r.first = self.now;
            if let Some(a) = self.adm.as_deref_mut() {
                a.in_flight.first_token(u64::from(id));
            }
            if self.cfg.phase == Phase::PrefillOnly {
                r.finish = self.now;
            } else if r.output <= 1 {
                r.finish = self.now;
                let d = &mut self.decode[r.inst as usize];
                d.free_blocks += r.blocks;
                d.holders -= 1;
                d.reserved_tokens -= u64::from(r.input);
                freed = true;
                self.finished(id);
            } else if let Some(link) = link {
                // Layer-wise transfer overlaps the prefill; only what exceeds it shows.
                let kv = pspecs[p].model.kv_transfer_time(u64::from(r.input), link);
                let exposed = (kv - dt).max(link.latency_s);
                self.schedule(self.now + exposed, Kind::KvReady(id));
                self.note_exposed(id, exposed);
            }
        }
        self.prefill[p].chunks = chunks;
        self.start_prefill(p, false);
        if freed {
            self.admit_pending();
        }
        self.retry_waiting();
    }

    pub(super) fn start_decode(&mut self, d: usize) {
        let spec = &self.specs().1[d];
        let inst = &mut self.decode[d];
        while inst.set.running < spec.max_running {
            let Some(id) = inst.ready.pop_front() else {
                break;
            };
            let r = &self.reqs[id as usize];
            inst.reserved_tokens -= u64::from(r.input);
            inst.set.add(
                id,
                u64::from(r.input) + 1,
                r.output.saturating_sub(1).max(1),
            );
        }
        if inst.set.running == 0 {
            inst.busy = false;
            return;
        }
        inst.busy = true;
        let (b, ctx) = (inst.set.running, inst.set.context());
        let dt = spec.model.decode_step_time(b, ctx)
            * spec.model.decode_spread(b, self.spread_rng.uniform());
        self.steps.push((self.now, dt, b));
        self.schedule(self.now + dt, Kind::DecodeDone(d as u32));
        self.observe_step(Role::Decode, &[], b, ctx, dt);
    }

    pub(super) fn on_decode_done(&mut self, d: usize) {
        let mut out = std::mem::take(&mut self.scratch_ids);
        out.clear();
        self.decode[d].set.complete_step(&mut out);
        for &id in &out {
            let r = &mut self.reqs[id as usize];
            r.finish = self.now;
            self.decode[d].free_blocks += r.blocks;
            self.decode[d].holders -= 1;
            self.finished(id);
        }
        let freed = !out.is_empty();
        self.scratch_ids = out;
        self.start_decode(d);
        if freed {
            self.admit_pending();
        }
        self.retry_waiting();
    }

    pub(super) fn start_agg(&mut self, a: usize) {
        let spec = &self.specs().0[a];
        let mut items = std::mem::take(&mut self.scratch_items);
        items.clear();
        let inst = &mut self.agg[a];
        while inst.set.running < spec.max_running {
            let Some(id) = inst.ready.pop_front() else {
                break;
            };
            let r = &self.reqs[id as usize];
            inst.reserved_tokens -= u64::from(r.input);
            inst.set.add(
                id,
                u64::from(r.input) + 1,
                r.output.saturating_sub(1).max(1),
            );
        }
        let mut budget = spec.max_batch_tokens.saturating_sub(inst.set.running);
        let mut active = inst.set.running + inst.partial + inst.ready.len() as u32;
        inst.chunks.clear();
        for &id in &inst.waiting {
            let r = &self.reqs[id as usize];
            let rem = r.input - r.done;
            let chunk = rem.min(budget);
            if chunk == 0 {
                break;
            }
            if r.done == 0 {
                if active >= spec.max_running {
                    break;
                }
                active += 1;
                inst.partial += 1;
            }
            items.push(PrefillItem {
                new_tokens: chunk,
                cached_tokens: r.done,
            });
            inst.chunks.push((id, chunk));
            budget -= chunk;
            if chunk < rem {
                break;
            }
        }
        let b = inst.set.running;
        if b == 0 && items.is_empty() {
            inst.busy = false;
        } else {
            inst.busy = true;
            let step = StepShape {
                prefill: &items,
                decode_batch: b,
                decode_context: inst.set.context(),
            };
            let dt = spec.model.step_time(&step);
            let ctx = step.decode_context;
            if b > 0 {
                self.steps.push((self.now, dt, b));
            }
            self.schedule(self.now + dt, Kind::AggDone(a as u32));
            self.observe_step(Role::Aggregated, &items, b, ctx, dt);
        }
        self.scratch_items = items;
    }

    pub(super) fn on_agg_done(&mut self, a: usize) {
        let mut out = std::mem::take(&mut self.scratch_ids);
        out.clear();
        self.agg[a].set.complete_step(&mut out);
        let chunks = std::mem::take(&mut self.agg[a].chunks);
        for &(id, chunk) in &chunks {
            let inst = &mut self.agg[a];
            let r = &mut self.reqs[id as usize];
            r.done += chunk;
            inst.queued_tokens -= u64::from(chunk);
            if r.done == r.input {
                r.first = self.now;
                if let Some(a) = self.adm.as_deref_mut() {
                    a.in_flight.first_token(u64::from(id));
                }
                inst.partial -= 1;
                inst.waiting.pop_front();
                if r.output <= 1 {
                    inst.reserved_tokens -= u64::from(r.input);
                    out.push(id);
                } else {
                    inst.ready.push_back(id);
                }
            }
        }
        self.agg[a].chunks = chunks;
        for &id in &out {
            let r = &mut self.reqs[id as usize];
            r.finish = self.now;
            self.agg[a].free_blocks += r.blocks;
            self.agg[a].holders -= 1;
            self.finished(id);
        }
        let freed = !out.is_empty();
        self.scratch_ids = out;
        self.start_agg(a);
        if freed {
            self.admit_pending();
        }
        self.retry_waiting();
    }
}
