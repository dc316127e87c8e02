//! [`LocalBackend`]: the whole model in this process, one request at a time. It is the
//! "single process" reference the disaggregated path is compared with, and what the HTTP tests
//! run a real model on.
//!
//! One worker thread owns the [`Engine`] and takes jobs from a bounded queue (no lock to share:
//! the thread is the only user). Each job runs [`generate`] and sends every token through a
//! bounded channel; when the receiver is dropped (the client left), the next send fails,
//! `on_token` answers [`Flow::Stop`] and the engine is free for the next job.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use futures::FutureExt;
use futures::future::BoxFuture;
use tandem_engine::generate::generate;
use tandem_engine::{Engine, ErrorClass, Flow, Model};
use tokio::sync::mpsc;

use crate::backend::{Backend, BackendError, GenerateRequest, Readiness, TokenChunk, TokenStream};

/// Requests waiting for the engine beyond the one running; more are refused with a 429.
pub const DEFAULT_QUEUE: usize = 64;
/// Tokens buffered between the engine and a slow client before the engine waits.
const TOKEN_BUFFER: usize = 64;

struct Job {
    req: GenerateRequest,
    tx: mpsc::Sender<Result<TokenChunk, BackendError>>,
}

/// The in-process backend.
pub struct LocalBackend {
    jobs: SyncSender<Job>,
    max_context: usize,
    generated: Arc<AtomicU64>,
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("max_context", &self.max_context)
            .finish_non_exhaustive()
    }
}

impl LocalBackend {
    /// Starts the engine thread over `model`, with a KV pool that holds one full context, and a
    /// prefill chunk of `prefill_chunk` tokens (as `tandem generate --prefill-chunk`).
    pub fn new(model: Arc<Model>, prefill_chunk: usize) -> Result<Self, BackendError> {
        let max_context = model.config().max_context;
        let blocks = (max_context + 1).div_ceil(tandem_engine::kv::BLOCK_SIZE);
        let engine = Engine::new(model, blocks);
        let (jobs, rx) = std::sync::mpsc::sync_channel(DEFAULT_QUEUE);
        let generated = Arc::new(AtomicU64::new(0));
        let counter = generated.clone();
        std::thread::Builder::new()
            .name("tandem-local-engine".into())
            .spawn(move || worker(engine, rx, prefill_chunk.max(1), &counter))
            .map_err(|e| BackendError::Internal(format!("cannot start the engine thread: {e}")))?;
        Ok(LocalBackend {
            jobs,
            max_context,
            generated,
        })
    }

    /// Tokens the engine has generated so far, over all requests (cancelled ones included, up
    /// to where they stopped).
    pub fn tokens_generated(&self) -> u64 {
        self.generated.load(Ordering::Relaxed)
    }
}

impl Backend for LocalBackend {
    fn generate(
        &self,
        req: GenerateRequest,
    ) -> BoxFuture<'static, Result<TokenStream, BackendError>> {
        let result = self.start(req);
        async move { result }.boxed()
    }

    fn readiness(&self) -> Readiness {
        Readiness {
            ready: true,
            detail: "in-process engine".into(),
        }
    }
}

impl LocalBackend {
    fn start(&self, req: GenerateRequest) -> Result<TokenStream, BackendError> {
        // Refuse here what `generate` would refuse, so such errors come before any token.
        req.sampling
            .validate()
            .map_err(|e| BackendError::Invalid(e.to_string()))?;
        let n = req.prompt_tokens.len();
        if n == 0 {
            return Err(BackendError::Invalid("the prompt is empty".into()));
        }
        if n + req.sampling.max_tokens as usize > self.max_context {
            return Err(BackendError::ContextLength(format!(
                "{n} prompt tokens plus max_tokens {} exceed the context of {}",
                req.sampling.max_tokens, self.max_context
            )));
        }
        let (tx, rx) = mpsc::channel(TOKEN_BUFFER);
        match self.jobs.try_send(Job { req, tx }) {
            Ok(()) => Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            }))),
            Err(TrySendError::Full(_)) => Err(BackendError::Overloaded {
                message: format!("{DEFAULT_QUEUE} requests are already waiting for the engine"),
                retry_after: None,
            }),
            Err(TrySendError::Disconnected(_)) => Err(BackendError::Unavailable(
                "the engine thread has stopped".into(),
            )),
        }
    }
}

fn worker(mut engine: Engine, jobs: Receiver<Job>, prefill_chunk: usize, generated: &AtomicU64) {
    let mut next_seq = 0u64;
    // Ends when every LocalBackend handle (the senders) is dropped.
    while let Ok(Job { req, tx }) = jobs.recv() {
        if tx.is_closed() {
            // The client left while the request was queued: nothing to compute for nobody.
            continue;
        }
        next_seq += 1;
        let p = &req.sampling;
        // EOS ids arrive in `stop_token_ids` (the gateway put them there unless ignore_eos), so
        // the engine needs no separate EOS list.
        let out = generate(
            &mut engine,
            next_seq,
            &req.prompt_tokens,
            p,
            &[],
            prefill_chunk,
            |t| {
                generated.fetch_add(1, Ordering::Relaxed);
                let chunk = TokenChunk {
                    tokens: vec![t],
                    finish: None,
                };
                match tx.blocking_send(Ok(chunk)) {
                    Ok(()) => Flow::Continue,
                    Err(_) => Flow::Stop,
                }
            },
        );
        // The last chunk carries only the finish reason: `on_token` cannot know whether its
        // token is the last one without repeating the engine's own stopping rules.
        let last = match out {
            Ok(g) => Ok(TokenChunk {
                tokens: Vec::new(),
                finish: Some(g.finish),
            }),
            Err(e) => Err(match e.class() {
                ErrorClass::InvalidInput => BackendError::Invalid(e.to_string()),
                ErrorClass::Exhausted => BackendError::Overloaded {
                    message: e.to_string(),
                    retry_after: None,
                },
                ErrorClass::Model | ErrorClass::Internal => BackendError::Internal(e.to_string()),
            }),
        };
        let _ = tx.blocking_send(last);
    }
}
