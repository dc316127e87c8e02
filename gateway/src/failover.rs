//! Mid-stream decode failover: when a stream's decode worker fails, the stream moves to another
//! one and the client sees no break.
//!
//! The gateway keeps the prompt, the tokens already sent and the sampling parameters. To move, it
//! asks the router for a pair without the failed decode worker(s), reserves on the new one, has a
//! prefill worker compute the prompt plus every sent token but the last (those as generated tokens
//! compute, so the KV is what the failed worker held), and opens Decode with the last sent token
//! and the count sent. Each draw of a sampled token is a function of (seed, position), so the
//! stream continues with the tokens it would have had: greedy and seeded sampling alike.
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use futures::{FutureExt, Stream};
use tandem_router::{Priority, RequestShape};

use crate::backend::{BackendError, GenerateRequest, TokenChunk};
use crate::disagg::{DecodeRest, Legs, Measure, router_error};

/// The decode part of a stream (every token after the prefill's first), moved to another decode
/// worker each time its own fails, up to the configured number of moves.
pub(crate) struct Resumable {
    legs: Arc<Legs>,
    req: Arc<GenerateRequest>,
    /// Every token the client has been sent, the prefill's first included.
    sent: Vec<u32>,
    /// Decode workers this stream ran on, the current one last.
    workers: Vec<String>,
    /// Of those moves, the ones its decode worker made (migrations, not failures).
    migrated: usize,
    state: State,
}

enum State {
    Running(Box<DecodeRest>),
    /// Moving: resolves to the new leg and its decode worker.
    Moving(BoxFuture<'static, Result<(DecodeRest, String), BackendError>>),
    Done,
}

impl Resumable {
    pub(crate) fn new(
        legs: Arc<Legs>,
        req: GenerateRequest,
        first_token: u32,
        decode_worker: String,
        rest: DecodeRest,
    ) -> Self {
        Resumable {
            legs,
            req: Arc::new(req),
            sent: vec![first_token],
            workers: vec![decode_worker],
            migrated: 0,
            state: State::Running(Box::new(rest)),
        }
    }
}

impl Stream for Resumable {
    type Item = Result<TokenChunk, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Done => return Poll::Ready(None),
                State::Moving(moving) => match moving.as_mut().poll(cx) {
                    Poll::Ready(Ok((rest, worker))) => {
                        tracing::info!(
                            request = %this.req.request_id,
                            worker = %worker,
                            after = this.sent.len(),
                            "stream resumed on another decode worker"
                        );
                        this.workers.push(worker);
                        this.state = State::Running(Box::new(rest));
                    }
                    Poll::Ready(Err(e)) => {
                        this.state = State::Done;
                        return Poll::Ready(Some(Err(e)));
                    }
                    Poll::Pending => return Poll::Pending,
                },
                State::Running(rest) => match Pin::new(&mut **rest).poll_next(cx) {
                    Poll::Ready(Some(Ok(chunk))) => {
                        this.sent.extend_from_slice(&chunk.tokens);
                        if chunk.finish.is_some() {
                            this.state = State::Done;
                            if let Some(w) = this.workers.last() {
                                this.legs.router.report(w, true);
                            }
                        }
                        return Poll::Ready(Some(Ok(chunk)));
                    }
                    Poll::Ready(Some(Err(e))) => {
                        let most = this.legs.config.max_migrations;
                        let movable = rest.movable();
                        let moves = this.workers.len().saturating_sub(1 + this.migrated);
                        if !movable || moves >= most as usize {
                            this.state = State::Done;
                            let e = if movable {
                                BackendError::Unavailable(format!(
                                    "{e} (the stream moved {most} times already; --max-migrations)"
                                ))
                            } else {
                                e
                            };
                            return Poll::Ready(Some(Err(e)));
                        }
                        tracing::warn!(
                            request = %this.req.request_id,
                            worker = this.workers.last().map_or("", String::as_str),
                            error = %e,
                            after = this.sent.len(),
                            "decode worker failed mid-stream; moving the stream"
                        );
                        if let Some(w) = this.workers.last() {
                            this.legs.router.report(w, false);
                        }
                        this.legs.count_move(false);
                        let legs = this.legs.clone();
                        let (req, sent) = (this.req.clone(), this.sent.clone());
                        let exclude = this.workers.clone();
                        // The failed leg goes first: its reservation is released now.
                        this.state = State::Moving(legs.resume(req, sent, exclude).boxed());
                    }
                    Poll::Ready(None) => {
                        let Some(moved) = rest.take_moved() else {
                            this.state = State::Done;
                            return Poll::Ready(None);
                        };
                        tracing::info!(
                            request = %this.req.request_id,
                            from = this.workers.last().map_or("", String::as_str),
                            to = %moved.worker_id,
                            after = this.sent.len(),
                            "stream migrated to another decode worker"
                        );
                        this.migrated += 1;
                        this.legs.count_move(true);
                        let gap = rest.gap();
                        let next = this.legs.continue_on(&this.req, &this.sent, &moved, gap);
                        let worker = moved.worker_id;
                        this.state =
                            State::Moving(async move { next.map(|r| (r, worker)) }.boxed());
                    }
                    Poll::Pending => return Poll::Pending,
                },
            }
        }
    }
}

impl Legs {
    /// A new decode leg for a stream that has sent `sent` (at least one token), on a pair whose
    /// decode worker is none of `exclude`.
    async fn resume(
        self: Arc<Self>,
        req: Arc<GenerateRequest>,
        sent: Vec<u32>,
        exclude: Vec<String>,
    ) -> Result<(DecodeRest, String), BackendError> {
        let Some((&last, before)) = sent.split_last() else {
            return Err(BackendError::Internal(
                "a stream moved before its first token".into(),
            ));
        };
        let mut prompt = req.prompt_tokens.clone();
        prompt.extend_from_slice(before);
        let replayed = before.len() as u32;
        let left = req.sampling.max_tokens.saturating_sub(replayed).max(1);
        let shape = RequestShape {
            model: req.model.clone(),
            prompt_tokens: prompt.len() as u32,
            max_new_tokens: left,
            itl_budget: req.budget.itl,
            // A stream already admitted and running goes first when it must wait.
            priority: Priority::Critical,
            exclude,
            ..RequestShape::default()
        };
        let placement = self.router.place(shape).await.map_err(router_error)?;
        let ticket = placement
            .predicted
            .map(|p| Measure::placed(&self.router, &req.model, prompt.len() as u32, &p));
        let (decode, reservation, release) = self
            .reserve(&req, prompt.len() as u32, left, &placement.decode)
            .await?;
        // Its first token is not used: the next one is sampled by the decode worker, at its
        // position.
        self.prefill(&req, &prompt, replayed, &placement, &reservation)
            .await
            .map_err(|f| f.error)?;
        let rest = self.open_decode(
            decode,
            &req,
            (last, sent.len() as u32, 0),
            (reservation.reservation_id, release),
            crate::watchdog::gap_for(placement.predicted.map(|p| p.itl)),
            ticket,
        );
        Ok((rest, placement.decode.worker_id.clone()))
    }
}
