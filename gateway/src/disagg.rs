//! The disaggregated backend: each request's two legs across the router's workers.
//!
//! 1. The router places the request on a prefill worker P and a decode worker D.
//! 2. D reserves the prompt's KV blocks under a lease.
//! 3. P computes the prompt and pushes its KV into those blocks layer by layer; it answers with
//!    the first token. If P fails or misses its deadline before answering, the prefill runs again
//!    on another prefill worker into the same reservation, with the attempt number raised so that
//!    D discards what the failed attempt sent.
//! 4. D decodes the rest and streams it.
//!
//! Dropping the returned stream (the client went away, or a stop string matched) drops the Decode
//! call, which makes D cancel the sequence, and releases the reservation explicitly as well.
use std::collections::HashMap;
use std::fmt::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, Stream, StreamExt};
use tandem_proto::v1;
use tandem_proto::v1::decode_service_client::DecodeServiceClient;
use tandem_proto::v1::prefill_service_client::PrefillServiceClient;
use tandem_router::{Feedback, Leg, RequestShape, RouterError, RouterLink};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::backend::{
    Admitted, Backend, BackendError, GenerateRequest, Readiness, TokenChunk, TokenStream,
};
use crate::metrics::{Histogram, LATENCY_BUCKETS};
use crate::retry::{RETRIES_BANKED, RetryBudget, backoff, jitter};
use crate::watchdog::{Watchdog, gap_for, prefill_gap_for};

/// Deadlines and retries of the two legs.
#[derive(Debug, Clone)]
pub struct DisaggConfig {
    /// Reserve and Release calls.
    pub control_timeout: Duration,
    /// One prefill attempt (the request's TTFT budget when it states none).
    pub prefill_timeout: Duration,
    /// The whole decode stream.
    pub decode_timeout: Duration,
    /// Attempts of a leg beyond the first, each on another worker the router chooses: a prefill
    /// that failed, or a reservation a decode worker could not make because it broke.
    pub prefill_retries: u32,
    /// Retries allowed per request, on average (a budget, [`RetryBudget`]).
    pub retry_ratio: f64,
    /// The first retry's backoff, doubled per attempt (half of it jittered)...
    pub retry_backoff: Duration,
    /// ...up to this.
    pub retry_backoff_cap: Duration,
    /// Lease asked for a reservation: long enough to cover every prefill attempt.
    pub lease: Duration,
    /// Times a stream may move to another decode worker after its own failed.
    pub max_migrations: u32,
}

impl Default for DisaggConfig {
    fn default() -> Self {
        DisaggConfig {
            control_timeout: Duration::from_secs(2),
            prefill_timeout: Duration::from_secs(30),
            decode_timeout: Duration::from_secs(600),
            prefill_retries: 2,
            retry_ratio: 0.2,
            retry_backoff: Duration::from_millis(20),
            retry_backoff_cap: Duration::from_secs(1),
            lease: Duration::from_secs(120),
            max_migrations: 2,
        }
    }
}

/// The backend over a router and its workers.
pub struct DisaggBackend {
    inner: Arc<Legs>,
}

pub(crate) struct Legs {
    pub(crate) router: RouterLink,
    pub(crate) config: DisaggConfig,
    channels: Mutex<HashMap<String, Channel>>,
    metrics: LegMetrics,
    retries: RetryBudget,
}

/// Where the time of the prefill leg went, from the prefill workers' own timings.
struct LegMetrics {
    queue: Histogram,
    compute: Histogram,
    transfer: Histogram,
    overlap: Histogram,
    kv_bytes: AtomicU64,
    retries: AtomicU64,
    /// Retries the budget refused.
    retries_refused: AtomicU64,
    /// Measured over predicted TTFT of admitted requests.
    ttft_ratio: Histogram,
    /// Streams moved to another decode worker: by their worker (migrated), after its failure.
    moved_migrated: AtomicU64,
    moved_failed: AtomicU64,
}

/// Buckets of measured/predicted ratios.
const RATIO_BUCKETS: &[f64] = &[0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0];

impl LegMetrics {
    fn record(&self, t: &v1::Timings, bytes: u64) {
        let us = Duration::from_micros;
        self.queue.observe(us(t.queue_wait_us));
        self.compute.observe(us(t.compute_us));
        self.transfer.observe(us(t.transfer_us));
        self.overlap.observe(us(t.transfer_overlap_us));
        self.kv_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl DisaggBackend {
    pub fn new(router: impl Into<RouterLink>, config: DisaggConfig) -> Self {
        DisaggBackend {
            inner: Arc::new(Legs {
                router: router.into(),
                retries: RetryBudget::new(config.retry_ratio, RETRIES_BANKED),
                config,
                channels: Mutex::new(HashMap::new()),
                metrics: LegMetrics {
                    queue: Histogram::new(LATENCY_BUCKETS),
                    compute: Histogram::new(LATENCY_BUCKETS),
                    transfer: Histogram::new(LATENCY_BUCKETS),
                    overlap: Histogram::new(LATENCY_BUCKETS),
                    kv_bytes: AtomicU64::new(0),
                    retries: AtomicU64::new(0),
                    retries_refused: AtomicU64::new(0),
                    ttft_ratio: Histogram::new(RATIO_BUCKETS),
                    moved_migrated: AtomicU64::new(0),
                    moved_failed: AtomicU64::new(0),
                },
            }),
        }
    }
}

impl Legs {
    /// A channel to a worker, made once per address (tonic reconnects it as needed).
    pub(crate) fn channel(&self, addr: &str) -> Result<Channel, BackendError> {
        let mut map = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let c = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| BackendError::Internal(format!("worker address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        map.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// Waits for a prefill call until the deadline; past `gap` (ten predicted TTFTs), it checks
    /// each second that the worker still heartbeats, and gives up on one that stopped (stopped,
    /// hung whole, cut off: its lease lapsed) rather than waiting out the deadline. A worker
    /// that heartbeats is making its way through a queue, however much longer than predicted.
    /// Returns the call's result and whether the worker stalled.
    async fn watch_prefill<F>(
        &self,
        call: F,
        worker_id: &str,
        gap: Duration,
    ) -> (Result<v1::PrefillResponse, Status>, bool)
    where
        F: Future<Output = Result<tonic::Response<v1::PrefillResponse>, Status>>,
    {
        let deadline = self.config.prefill_timeout;
        let started = tokio::time::Instant::now();
        let mut call = std::pin::pin!(call);
        let mut check = gap.min(deadline);
        loop {
            match tokio::time::timeout_at(started + check, &mut call).await {
                Ok(r) => return (r.map(tonic::Response::into_inner), false),
                Err(_) if check >= deadline => {
                    let s = Status::deadline_exceeded(format!("no answer within {deadline:?}"));
                    return (Err(s), false);
                }
                Err(_) if !self.router.workers().contains(worker_id) => {
                    let s = Status::unavailable(format!(
                        "no answer within {check:?}, and the worker stopped heartbeating"
                    ));
                    return (Err(s), true);
                }
                Err(_) => check = (check + Duration::from_secs(1)).min(deadline),
            }
        }
    }

    /// Whether a leg may be tried again: within the budget, after the backoff of `attempt`.
    async fn may_retry(&self, attempt: u32) -> bool {
        if !self.retries.withdraw() {
            self.metrics.retries_refused.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.metrics.retries.fetch_add(1, Ordering::Relaxed);
        let c = &self.config;
        let wait = backoff(attempt, c.retry_backoff, c.retry_backoff_cap, jitter());
        tokio::time::sleep(wait).await;
        true
    }

    async fn start(self: Arc<Self>, req: GenerateRequest) -> Result<Admitted, BackendError> {
        let prompt_tokens = req.prompt_tokens.len() as u32;
        let mut shape = RequestShape {
            model: req.model.clone(),
            prompt_tokens,
            max_new_tokens: req.sampling.max_tokens,
            ttft_budget: req.budget.ttft,
            itl_budget: req.budget.itl,
            priority: req.budget.priority,
            ..Default::default()
        };
        self.retries.deposit();
        let asked = Instant::now();
        let mut attempt = 0;
        // A decode worker that broke or stalled before reserving, or whose KV endpoint the
        // prefill could not reach, is passed over for another pair.
        let (placement, placed, unstarted, (decode, reservation, release), answer) = loop {
            let placement = self
                .router
                .place(shape.clone())
                .await
                .map_err(router_error)?;
            let placed = Instant::now();
            // Reports the placement's end when dropped, so that admission stops counting it in
            // flight: before the first token if reserve or prefill fails, after it when the
            // stream ends or is cut short.
            let unstarted = placement
                .predicted
                .map(|p| Measure::placed(&self.router, &req.model, prompt_tokens, &p));
            let decode = &placement.decode;
            let failure = match self
                .reserve(&req, prompt_tokens, req.sampling.max_tokens, decode)
                .await
            {
                Ok(reserved) => {
                    let prompt = &req.prompt_tokens;
                    match self.prefill(&req, prompt, 0, &placement, &reserved.1).await {
                        Ok(answer) => break (placement, placed, unstarted, reserved, answer),
                        // Its reservation is released as the guard drops.
                        Err(f) if f.kv_fault => f.error,
                        Err(f) => return Err(f.error),
                    }
                }
                Err(e @ (BackendError::Unavailable(_) | BackendError::Timeout(_))) => e,
                Err(e) => return Err(e),
            };
            if attempt >= self.config.prefill_retries || !self.may_retry(attempt).await {
                return Err(failure);
            }
            tracing::warn!(
                request = %req.request_id,
                worker = %decode.worker_id,
                error = %failure,
                "decode worker unusable; placing again without it"
            );
            shape.exclude.push(decode.worker_id.clone());
            attempt += 1;
        };
        // What admission predicted counts from its decision; the client also waited in its queue.
        let predicted_ttft = placement.predicted_ttft().map(|p| p + (placed - asked));
        let first_at = Instant::now();
        // The same measure reports the end from here, after the TTFT goes back now, so that
        // admission's calibration follows a burst as it happens.
        let measured = unstarted.map(|mut m| {
            let ttft = first_at - placed;
            if let Some(p) = placement.predicted
                && !p.ttft.is_zero()
            {
                self.metrics.ttft_ratio.observe(Duration::from_secs_f64(
                    ttft.as_secs_f64() / p.ttft.as_secs_f64(),
                ));
            }
            let exposed = answer.timings.as_ref().and_then(|t| {
                let left = t.transfer_us.saturating_sub(t.transfer_overlap_us);
                (placement.decode.role != v1::WorkerRole::Aggregated as i32)
                    .then(|| Duration::from_micros(left))
            });
            if let Some(end) = &m.feedback {
                self.router.feedback(Feedback {
                    ttft,
                    exposed_transfer: exposed,
                    ..end.clone()
                });
            }
            m.first_at = first_at;
            m
        });
        let first = TokenChunk {
            tokens: vec![answer.first_token],
            finish: tandem_wire::finish_from_proto(answer.finish),
        };
        if first.finish.is_some() {
            drop(measured);
            return Ok(Admitted {
                tokens: futures::stream::iter([Ok(first)]).boxed(),
                predicted_ttft,
            });
        }
        // The first token goes to the client now; the Decode stream opens behind it (the decode
        // worker answers Decode between two steps of its batch, so waiting for it here would add
        // up to a decode step to every time to first token).
        let rest = self.open_decode(
            decode,
            &req,
            (answer.first_token, 1, 0),
            (reservation.reservation_id, release),
            gap_for(placement.predicted.map(|p| p.itl)),
            None,
        );
        let decode_worker = placement.decode.worker_id.clone();
        let rest = crate::failover::Resumable::new(
            self.clone(),
            req,
            answer.first_token,
            decode_worker,
            rest,
        );
        let tokens = futures::stream::iter([Ok(first)]).chain(rest);
        let tokens = match measured {
            Some(mut m) => tokens.inspect(move |chunk| m.saw(chunk)).boxed(),
            None => tokens.boxed(),
        };
        Ok(Admitted {
            tokens,
            predicted_ttft,
        })
    }

    /// The Decode call on a reservation whose KV is in place, from `first` = (the last token the
    /// client was sent, tokens sent so far, positions of KV the reservation holds when not its
    /// prompt, else 0): opened when first polled, under the decode deadline and a watchdog of
    /// `gap`. `ticket`: a failover placement's end, reported when the leg is dropped.
    pub(crate) fn open_decode(
        &self,
        mut client: DecodeServiceClient<Channel>,
        req: &GenerateRequest,
        first: (u32, u32, u32),
        (reservation_id, release): (u64, ReleaseOnDrop),
        gap: Duration,
        ticket: Option<Measure>,
    ) -> DecodeRest {
        let timeout = self.config.decode_timeout;
        let mut call_req = tonic::Request::new(v1::DecodeRequest {
            request_id: req.request_id.clone(),
            reservation_id,
            first_token: first.0,
            sampling: Some(tandem_wire::sampling_to_proto(&req.sampling)),
            generated_before: first.1,
            kv_tokens: first.2,
        });
        call_req.set_timeout(timeout);
        let opening: DecodeOpening = Box::pin(async move { client.decode(call_req).await });
        DecodeRest {
            leg: DecodeLeg::Opening(opening),
            deadline: Box::pin(tokio::time::sleep(timeout)),
            release: Some(release),
            movable: false,
            _ticket: ticket,
            watchdog: Watchdog::new(gap),
            moved: None,
        }
    }

    /// Counts a stream moved to another decode worker.
    pub(crate) fn count_move(&self, migrated: bool) {
        let m = &self.metrics;
        let c = if migrated {
            &m.moved_migrated
        } else {
            &m.moved_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// A leg on the decode worker a stream's sequence migrated to: its reservation there holds
    /// the KV of every token sent but the last.
    pub(crate) fn continue_on(
        &self,
        req: &GenerateRequest,
        sent: &[u32],
        moved: &v1::SequenceMoved,
        gap: Duration,
    ) -> Result<DecodeRest, BackendError> {
        let last = *sent.last().ok_or_else(|| {
            BackendError::Internal("a stream migrated before its first token".into())
        })?;
        let client = DecodeServiceClient::new(self.channel(&moved.grpc_addr)?);
        let release = ReleaseOnDrop {
            client: Some(client.clone()),
            reservation_id: moved.reservation_id,
            timeout: self.config.control_timeout,
        };
        Ok(self.open_decode(
            client,
            req,
            (last, sent.len() as u32, moved.kv_tokens),
            (moved.reservation_id, release),
            gap,
            None,
        ))
    }

    /// Reserves the KV of `prompt_tokens` plus `max_new_tokens` on `decode`; the guard releases
    /// the reservation when dropped, unless its duty is taken.
    pub(crate) async fn reserve(
        &self,
        req: &GenerateRequest,
        prompt_tokens: u32,
        max_new_tokens: u32,
        decode: &v1::WorkerIdentity,
    ) -> Result<
        (
            DecodeServiceClient<Channel>,
            v1::ReserveResponse,
            ReleaseOnDrop,
        ),
        BackendError,
    > {
        let mut client = DecodeServiceClient::new(self.channel(&decode.grpc_addr)?);
        let reserve = v1::ReserveRequest {
            request_id: req.request_id.clone(),
            prompt_tokens,
            max_new_tokens,
            lease_ms: self.config.lease.as_millis() as u32,
            itl_budget_ms: req.budget.itl.map_or(0, |d| {
                u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
            }),
        };
        let reservation = call(
            self.config.control_timeout,
            client.reserve(timed(reserve, self.config.control_timeout)),
        )
        .await
        .map_err(|s| {
            // A Reserve unanswered within the control deadline: the worker stalled.
            if broke(&s) || s.code() == Code::DeadlineExceeded {
                self.router.report(&decode.worker_id, false);
            }
            status_error("decode worker", s)
        })?;
        // From here on the reservation is ours to free, whatever happens.
        let release = ReleaseOnDrop {
            client: Some(client.clone()),
            reservation_id: reservation.reservation_id,
            timeout: self.config.control_timeout,
        };
        Ok((client, reservation, release))
    }

    /// Runs the prefill of `prompt` (whose last `replayed` tokens were generated) into the
    /// reservation, on another worker each time a worker fails before answering.
    pub(crate) async fn prefill(
        &self,
        req: &GenerateRequest,
        prompt: &[u32],
        replayed: u32,
        placement: &tandem_router::Placement,
        reservation: &v1::ReserveResponse,
    ) -> Result<v1::PrefillResponse, PrefillFailed> {
        let decode = &placement.decode;
        // An aggregated decode worker computes the prompt itself, in its own batch.
        let mut worker = if decode.role == v1::WorkerRole::Aggregated as i32 {
            decode.clone()
        } else {
            placement.prefill.clone()
        };
        let mut tried = Vec::new();
        let mut attempt = 0u32;
        loop {
            let request = v1::PrefillRequest {
                request_id: req.request_id.clone(),
                prompt_tokens: prompt.to_vec(),
                sampling: Some(tandem_wire::sampling_to_proto(&req.sampling)),
                destination: Some(v1::KvDestination {
                    decode_worker_id: decode.worker_id.clone(),
                    kv_endpoint: reservation.kv_endpoint.clone(),
                    transport: reservation.transport,
                    reservation_id: reservation.reservation_id,
                    block_ids: reservation.block_ids.clone(),
                    geometry: reservation.geometry,
                    shm_layout: reservation.shm_layout.clone(),
                    attempt,
                }),
                priority: 0,
                replayed,
            };
            let channel = self
                .channel(&worker.grpc_addr)
                .map_err(PrefillFailed::from)?;
            let mut client = PrefillServiceClient::new(channel);
            let deadline = self.config.prefill_timeout;
            let gap = prefill_gap_for(placement.predicted.map(|p| p.ttft), deadline);
            let call = client.prefill(timed(request, deadline));
            let (result, stalled) = self.watch_prefill(call, &worker.worker_id, gap).await;
            let s = match result {
                Ok(answer) => {
                    if let Some(t) = &answer.timings {
                        self.metrics.record(t, answer.kv_bytes);
                    }
                    self.router.report(&worker.worker_id, true);
                    return Ok(answer);
                }
                Err(s) => s,
            };
            if tandem_wire::is_kv_fault(&s) {
                // The decode worker's end of the link failed, or the link did: another prefill
                // worker would push into the same place. The caller places the request again.
                self.router.report(&decode.worker_id, false);
                return Err(PrefillFailed {
                    error: status_error("KV transfer to the decode worker", s),
                    kv_fault: true,
                });
            }
            if broke(&s) || stalled {
                // It broke or stalled, rather than being full or slow: no new work for a while.
                self.router.report(&worker.worker_id, false);
            }
            if !retryable(&s)
                || attempt >= self.config.prefill_retries
                || !self.may_retry(attempt).await
            {
                return Err(status_error("prefill worker", s).into());
            }
            tracing::warn!(
                request = %req.request_id,
                worker = %worker.worker_id,
                status = %s.message(),
                "prefill failed; retrying on another worker"
            );
            tried.push(worker.worker_id.clone());
            let shape = RequestShape {
                model: req.model.clone(),
                prompt_tokens: prompt.len() as u32,
                max_new_tokens: 1,
                exclude: tried.clone(),
                ..RequestShape::default()
            };
            worker = self
                .router
                .place_prefill(shape)
                .await
                .map_err(|_| PrefillFailed::from(status_error("prefill worker", s)))?;
            attempt += 1;
        }
    }
}

impl Backend for DisaggBackend {
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<TokenStream, BackendError>> {
        let started = self.inner.clone().start(req);
        async move { started.await.map(|a| a.tokens) }.boxed()
    }

    fn generate_admitted(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<Admitted, BackendError>> {
        self.inner.clone().start(req).boxed()
    }

    fn readiness(&self) -> Readiness {
        let set = self.inner.router.workers();
        let (p, d) = (set.ready_for(Leg::Prefill), set.ready_for(Leg::Decode));
        Readiness {
            ready: p > 0 && d > 0,
            detail: format!("{p} prefill and {d} decode workers ready"),
        }
    }

    fn render_metrics(&self, out: &mut String) {
        let m = &self.inner.metrics;
        m.queue.render(
            out,
            "tandem_prefill_queue_seconds",
            "Prefill queue wait, as the prefill workers measured it.",
        );
        m.compute.render(
            out,
            "tandem_prefill_compute_seconds",
            "Prefill forward passes over the prompt, first token included.",
        );
        m.transfer.render(
            out,
            "tandem_kv_transfer_seconds",
            "From the first KV byte sent to the decode worker's acknowledgement.",
        );
        m.overlap.render(
            out,
            "tandem_kv_transfer_overlap_seconds",
            "The part of the KV transfer that ran while the prefill was still computing.",
        );
        m.ttft_ratio.render(
            out,
            "tandem_router_ttft_measured_over_predicted",
            "Measured time to first token over the one admission predicted, from its decision (a ratio, not seconds).",
        );
        self.inner.router.render_metrics(out);
        let bytes = m.kv_bytes.load(Ordering::Relaxed);
        let retries = m.retries.load(Ordering::Relaxed);
        let refused = m.retries_refused.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP tandem_kv_transfer_bytes_total KV payload bytes sent to decode workers.\n# TYPE tandem_kv_transfer_bytes_total counter\ntandem_kv_transfer_bytes_total {bytes}"
        );
        let (migrated, failed) = (
            m.moved_migrated.load(Ordering::Relaxed),
            m.moved_failed.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP tandem_stream_moves_total Streams that went on on another decode worker: moved by their worker with their KV (migrated), or recomputed there after it failed (failover).\n# TYPE tandem_stream_moves_total counter\ntandem_stream_moves_total{{cause=\"migrated\"}} {migrated}\ntandem_stream_moves_total{{cause=\"failover\"}} {failed}"
        );
        let _ = writeln!(
            out,
            "# HELP tandem_retries_total Legs tried again on another worker after a failure (a prefill, or a reservation on a broken decode worker), and those the retry budget refused.\n# TYPE tandem_retries_total counter\ntandem_retries_total{{decision=\"retried\"}} {retries}\ntandem_retries_total{{decision=\"refused_by_budget\"}} {refused}"
        );
    }
}

/// What an admitted request measures for admission's calibration after its first token: its mean
/// time per token, reported when it finishes; its end, without one, when it is cut short.
pub(crate) struct Measure {
    router: RouterLink,
    feedback: Option<Feedback>,
    first_at: Instant,
    /// Tokens seen so far, the prefill's first included.
    tokens: u32,
}

impl Measure {
    /// A placement's measure: until it sees tokens, it reports only the placement's end when
    /// dropped (all a failover's placement reports: what it measures is the stream's, reported by
    /// the first placement's own).
    pub(crate) fn placed(
        router: &RouterLink,
        model: &str,
        prompt_tokens: u32,
        p: &tandem_router::Predicted,
    ) -> Self {
        Measure {
            router: router.clone(),
            feedback: Some(Feedback {
                model: model.to_owned(),
                prompt_tokens,
                raw_ttft: p.raw_ttft,
                raw_itl: p.raw_itl,
                regime: p.regime,
                ticket: p.ticket,
                ..Feedback::default()
            }),
            first_at: Instant::now(),
            tokens: 0,
        }
    }
}

/// A request cut short (client gone, worker failed) still reports its end, without an ITL, so that
/// admission stops counting it in flight.
impl Drop for Measure {
    fn drop(&mut self) {
        if let Some(fb) = self.feedback.take() {
            self.router.feedback(fb);
        }
    }
}

impl Measure {
    fn saw(&mut self, chunk: &Result<TokenChunk, BackendError>) {
        let Ok(chunk) = chunk else { return };
        self.tokens = self.tokens.saturating_add(chunk.tokens.len() as u32);
        if chunk.finish.is_some()
            && let Some(mut fb) = self.feedback.take()
        {
            if self.tokens > 1 {
                fb.itl = Some(self.first_at.elapsed() / (self.tokens - 1));
            }
            self.router.feedback(fb);
        }
    }
}

/// Releases a reservation when dropped, unless disarmed; the call runs on its own task.
pub(crate) struct ReleaseOnDrop {
    client: Option<DecodeServiceClient<Channel>>,
    reservation_id: u64,
    timeout: Duration,
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        let Some(mut client) = self.client.take() else {
            return;
        };
        let (id, timeout) = (self.reservation_id, self.timeout);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let req = v1::ReleaseRequest { reservation_id: id };
                if let Err(s) = call(timeout, client.release(timed(req, timeout))).await {
                    tracing::debug!(reservation = id, status = %s.message(), "release failed");
                }
            });
        }
    }
}

/// A request that states its deadline to the server (grpc-timeout), so that a worker drops work
/// nobody waits for any more.
fn timed<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(timeout);
    r
}

/// A unary call, with its deadline also enforced here.
async fn call<T, F>(timeout: Duration, fut: F) -> Result<T, Status>
where
    F: Future<Output = Result<tonic::Response<T>, Status>>,
{
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within {timeout:?}"
        ))),
    }
}

/// A prefill's failure; `kv_fault`: its KV transfer to the decode worker failed, so the request
/// needs another decode worker rather than another prefill worker.
pub(crate) struct PrefillFailed {
    pub(crate) error: BackendError,
    pub(crate) kv_fault: bool,
}

impl From<BackendError> for PrefillFailed {
    fn from(error: BackendError) -> Self {
        PrefillFailed {
            error,
            kv_fault: false,
        }
    }
}

/// Failures of a worker itself, which its breaker counts (not its being full or slow).
fn broke(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Aborted
    )
}

/// Failures that another prefill worker may not have: the worker died, is draining, is full, or
/// was too slow.
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::Unknown
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
            | Code::Internal
    )
}

fn status_error(who: &str, s: Status) -> BackendError {
    let msg = format!("{who}: {}", s.message());
    match s.code() {
        Code::InvalidArgument | Code::OutOfRange => {
            if s.message().contains("context") {
                BackendError::ContextLength(msg)
            } else {
                BackendError::Invalid(msg)
            }
        }
        Code::ResourceExhausted => BackendError::Overloaded {
            message: msg,
            retry_after: Some(Duration::from_secs(1)),
        },
        Code::Unavailable | Code::Unknown | Code::Aborted | Code::Cancelled => {
            BackendError::Unavailable(msg)
        }
        Code::DeadlineExceeded => BackendError::Timeout(msg),
        _ => BackendError::Internal(msg),
    }
}

pub(crate) fn router_error(e: RouterError) -> BackendError {
    match e {
        RouterError::NoWorkers(_) => BackendError::Unavailable(e.to_string()),
        RouterError::Overloaded { retry_after, .. } => BackendError::Overloaded {
            message: e.to_string(),
            retry_after: Some(retry_after),
        },
        RouterError::Rejected {
            reason,
            retry_after,
            predicted_ttft,
            ..
        } => BackendError::Rejected {
            code: reason.code(),
            message: e.to_string(),
            retry_after,
            predicted_ttft,
        },
        RouterError::Busy => BackendError::Overloaded {
            message: e.to_string(),
            retry_after: Some(Duration::from_millis(100)),
        },
        RouterError::InvalidArgument(m) => BackendError::Invalid(m),
        // The gateway has already checked the name against the model it serves: no worker for it
        // has registered (yet, or any more), which is a missing worker, not a bad request.
        RouterError::UnknownModel(m) => {
            BackendError::Unavailable(format!("no ready worker serves model {m:?}"))
        }
        other => BackendError::Internal(other.to_string()),
    }
}

/// The Decode call, answered once the decode worker admits the sequence.
type DecodeOpening = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<tonic::Response<tonic::Streaming<v1::DecodeChunk>>, tonic::Status>,
            > + Send,
    >,
>;

/// Where the decode leg of a generation stands.
enum DecodeLeg {
    Opening(DecodeOpening),
    Streaming(Box<tonic::Streaming<v1::DecodeChunk>>),
    Done,
}

/// The tokens after the first: the Decode stream's messages until the one with a finish reason,
/// an error, or the deadline. One timer for the whole stream (a timeout per message put a timer
/// entry in and took it out of the runtime's wheel for every token).
pub(crate) struct DecodeRest {
    leg: DecodeLeg,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// Releases the reservation if the stream ends (or is dropped) before the decode worker
    /// finished the sequence itself.
    release: Option<ReleaseOnDrop>,
    /// Set when the stream ended because its decode worker failed (died, dropped the
    /// connection, went away mid-stream): another decode worker can take it over.
    movable: bool,
    /// A failover's placement, whose end admission hears when this leg is dropped.
    _ticket: Option<Measure>,
    /// Fails the leg when the worker sends nothing for longer than it should.
    watchdog: Watchdog,
    /// Where the sequence went, when its decode worker moved it (the leg then ends).
    moved: Option<v1::SequenceMoved>,
}

impl DecodeRest {
    /// Whether it ended because its decode worker failed, so that another can take it over.
    pub(crate) fn movable(&self) -> bool {
        self.movable
    }

    /// Where the sequence continues, once the leg ended because its decode worker moved it.
    pub(crate) fn take_moved(&mut self) -> Option<v1::SequenceMoved> {
        self.moved.take()
    }

    /// The watchdog's gap: how long the worker may send nothing.
    pub(crate) fn gap(&self) -> Duration {
        self.watchdog.gap()
    }

    fn end(&mut self, e: BackendError) -> Poll<Option<Result<TokenChunk, BackendError>>> {
        self.leg = DecodeLeg::Done;
        Poll::Ready(Some(Err(e)))
    }

    /// Ends on the decode worker's failure: `movable` unless the status says the request itself
    /// is at fault.
    fn failed(&mut self, s: Status) -> Poll<Option<Result<TokenChunk, BackendError>>> {
        self.movable = retryable(&s) && s.code() != Code::DeadlineExceeded;
        self.end(status_error("decode worker", s))
    }

    fn timed_out(&mut self) -> Poll<Option<Result<TokenChunk, BackendError>>> {
        self.end(BackendError::Timeout(
            "decode stream deadline passed".into(),
        ))
    }

    /// Nothing came: the deadline's error, or the watchdog's (the worker is failed for this
    /// stream, which may move), or still waiting.
    fn waiting(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<TokenChunk, BackendError>>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            return self.timed_out();
        }
        if self.watchdog.poll_starved(cx).is_ready() {
            self.movable = true;
            let gap = self.watchdog.gap();
            return self.end(BackendError::Unavailable(format!(
                "decode worker sent nothing for {gap:?}"
            )));
        }
        Poll::Pending
    }
}

impl Stream for DecodeRest {
    type Item = Result<TokenChunk, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match &mut this.leg {
                DecodeLeg::Done => return Poll::Ready(None),
                DecodeLeg::Opening(open) => match open.as_mut().poll(cx) {
                    Poll::Ready(Ok(response)) => {
                        this.leg = DecodeLeg::Streaming(Box::new(response.into_inner()));
                    }
                    Poll::Ready(Err(s)) => return this.failed(s),
                    Poll::Pending => return this.waiting(cx),
                },
                DecodeLeg::Streaming(stream) => {
                    return match Pin::new(&mut **stream).poll_next(cx) {
                        Poll::Ready(Some(Ok(chunk))) => {
                            this.watchdog.fed();
                            let finish = tandem_wire::finish_from_proto(chunk.finish);
                            if chunk.moved.is_some() {
                                // The worker released its reservation as it handed the KV over;
                                // the stream goes on where `moved` says.
                                if let Some(g) = this.release.as_mut() {
                                    g.client = None;
                                }
                                this.moved = chunk.moved;
                                this.leg = DecodeLeg::Done;
                                if chunk.tokens.is_empty() {
                                    return Poll::Ready(None);
                                }
                            }
                            if finish.is_some() {
                                // D freed the sequence itself when it finished.
                                if let Some(g) = this.release.as_mut() {
                                    g.client = None;
                                }
                                this.leg = DecodeLeg::Done;
                            }
                            Poll::Ready(Some(Ok(TokenChunk {
                                tokens: chunk.tokens,
                                finish,
                            })))
                        }
                        Poll::Ready(Some(Err(s))) => this.failed(s),
                        Poll::Ready(None) => {
                            this.movable = true;
                            this.end(BackendError::Unavailable(
                                "decode stream ended without a finish reason".into(),
                            ))
                        }
                        Poll::Pending => this.waiting(cx),
                    };
                }
            }
        }
    }
}
