//! The Decode stream: chunks the batch loop produced while the stream's consumer was busy go out
//! merged into one message. With fast steps (small models, the `sim` engine, large batches) the
//! loop makes tokens faster than one gRPC message each can carry them; merging costs nothing when
//! the consumer keeps up (each message then carries the one token that was waiting).
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tandem_proto::v1;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::inbox::ChunkResult;

/// Most tokens merged into one message, so that a consumer far behind still gets steady messages
/// of bounded size.
pub const MAX_TOKENS_PER_CHUNK: usize = 256;

/// Merges waiting chunks; an error is never merged and ends what came before it.
#[derive(Debug)]
pub struct Coalesced {
    rx: UnboundedReceiver<ChunkResult>,
    /// What could not join the message just sent: the next one to send.
    held: Option<ChunkResult>,
}

impl Coalesced {
    pub fn new(rx: UnboundedReceiver<ChunkResult>) -> Self {
        Coalesced { rx, held: None }
    }
}

/// A stream's last message: a finish, or the sequence moved elsewhere.
fn last(c: &v1::DecodeChunk) -> bool {
    c.finish != v1::FinishReason::Unspecified as i32 || c.moved.is_some()
}

impl Stream for Coalesced {
    type Item = ChunkResult;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ChunkResult>> {
        let first = match self.held.take() {
            Some(held) => held,
            None => match self.rx.poll_recv(cx) {
                Poll::Ready(Some(c)) => c,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            },
        };
        let Ok(mut merged) = first else {
            return Poll::Ready(Some(first));
        };
        while !last(&merged) && merged.tokens.len() < MAX_TOKENS_PER_CHUNK {
            match self.rx.try_recv() {
                Ok(Ok(next))
                    if next.moved.is_none()
                        && merged.tokens.len() + next.tokens.len() <= MAX_TOKENS_PER_CHUNK =>
                {
                    merged.tokens.extend_from_slice(&next.tokens);
                    merged.finish = next.finish;
                    merged.completion_tokens = next.completion_tokens;
                }
                Ok(other) => {
                    self.held = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        Poll::Ready(Some(Ok(merged)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use tonic::Status;

    fn chunk(token: u32, n: u32, finish: v1::FinishReason) -> ChunkResult {
        Ok(v1::DecodeChunk {
            tokens: vec![token],
            finish: finish as i32,
            completion_tokens: n,
            moved: None,
        })
    }

    #[tokio::test]
    async fn waiting_chunks_go_out_as_one_and_the_stream_ends_after_the_last() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = Coalesced::new(rx);
        tx.send(chunk(10, 2, v1::FinishReason::Unspecified))
            .unwrap();
        let one = s.next().await.unwrap().unwrap();
        assert_eq!((one.tokens, one.completion_tokens), (vec![10], 2));
        for (i, t) in [11, 12, 13].into_iter().enumerate() {
            tx.send(chunk(t, 3 + i as u32, v1::FinishReason::Unspecified))
                .unwrap();
        }
        tx.send(chunk(14, 6, v1::FinishReason::Length)).unwrap();
        // Sent after the last chunk: not merged into it.
        tx.send(chunk(99, 7, v1::FinishReason::Unspecified))
            .unwrap();
        let merged = s.next().await.unwrap().unwrap();
        assert_eq!(merged.tokens, vec![11, 12, 13, 14]);
        assert_eq!(merged.completion_tokens, 6);
        assert_eq!(merged.finish, v1::FinishReason::Length as i32);
    }

    #[tokio::test]
    async fn an_error_is_sent_on_its_own_after_the_tokens_before_it() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = Coalesced::new(rx);
        tx.send(chunk(1, 2, v1::FinishReason::Unspecified)).unwrap();
        tx.send(chunk(2, 3, v1::FinishReason::Unspecified)).unwrap();
        tx.send(Err(Status::resource_exhausted("preempted")))
            .unwrap();
        drop(tx);
        assert_eq!(s.next().await.unwrap().unwrap().tokens, vec![1, 2]);
        let e = s.next().await.unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_move_goes_on_its_own_after_the_tokens_before_it() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = Coalesced::new(rx);
        tx.send(chunk(1, 2, v1::FinishReason::Unspecified)).unwrap();
        tx.send(chunk(2, 3, v1::FinishReason::Unspecified)).unwrap();
        let moved = v1::SequenceMoved {
            worker_id: "decode-2".into(),
            grpc_addr: "127.0.0.1:1".into(),
            reservation_id: 7,
            kv_tokens: 40,
        };
        tx.send(Ok(v1::DecodeChunk {
            completion_tokens: 3,
            moved: Some(moved.clone()),
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(s.next().await.unwrap().unwrap().tokens, vec![1, 2]);
        let last = s.next().await.unwrap().unwrap();
        assert_eq!((last.tokens.len(), last.moved), (0, Some(moved)));
    }

    #[tokio::test]
    async fn messages_hold_at_most_the_cap() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = Coalesced::new(rx);
        let n = MAX_TOKENS_PER_CHUNK as u32 + 10;
        for t in 0..n {
            tx.send(chunk(t, t + 2, v1::FinishReason::Unspecified))
                .unwrap();
        }
        drop(tx);
        let a = s.next().await.unwrap().unwrap();
        let b = s.next().await.unwrap().unwrap();
        assert_eq!(a.tokens.len(), MAX_TOKENS_PER_CHUNK);
        assert_eq!(
            b.tokens,
            (MAX_TOKENS_PER_CHUNK as u32..n).collect::<Vec<_>>()
        );
        assert_eq!(b.completion_tokens, n + 1);
        assert!(s.next().await.is_none());
    }
}
