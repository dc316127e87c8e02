//! The Decode stream: tokens the batch loop produced while the stream's consumer was busy go out
//! merged into one message. With fast steps (small models, the `sim` engine, large batches) the
//! loop makes tokens faster than one gRPC message each can carry them; merging costs nothing when
//! the consumer keeps up (each message then carries the one token that was waiting).
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tandem_proto::v1;
use tokio::sync::mpsc::UnboundedReceiver;
use tonic::Status;

use crate::events::{Event, chunk};

/// What a Decode stream sends.
pub type ChunkResult = Result<v1::DecodeChunk, Status>;

/// Most tokens merged into one message, so that a consumer far behind still gets steady messages
/// of bounded size.
pub const MAX_TOKENS_PER_CHUNK: usize = 256;

/// The batch loop's events of one sequence as Decode messages: waiting tokens merged, a move or an
/// error on its own after the tokens before it. The one place they become gRPC.
#[derive(Debug)]
pub struct Coalesced {
    rx: UnboundedReceiver<Event>,
    /// What could not join the message just sent: the next one to send.
    held: Option<Event>,
}

impl Coalesced {
    pub fn new(rx: UnboundedReceiver<Event>) -> Self {
        Coalesced { rx, held: None }
    }
}

impl Stream for Coalesced {
    type Item = ChunkResult;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ChunkResult>> {
        let first = match self.held.take() {
            Some(held) => held,
            None => match self.rx.poll_recv(cx) {
                Poll::Ready(Some(e)) => e,
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            },
        };
        let (mut tokens, mut generated, mut finish) = match first {
            Event::Token {
                token,
                generated,
                finish,
            } => (vec![token], generated, finish),
            Event::Moved(m) => return Poll::Ready(Some(Ok(m.into()))),
            Event::Failed(f) => return Poll::Ready(Some(Err(f.into()))),
        };
        while finish.is_none() && tokens.len() < MAX_TOKENS_PER_CHUNK {
            match self.rx.try_recv() {
                Ok(Event::Token {
                    token,
                    generated: g,
                    finish: f,
                }) => {
                    tokens.push(token);
                    generated = g;
                    finish = f;
                }
                Ok(other) => {
                    self.held = Some(other);
                    break;
                }
                Err(_) => break,
            }
        }
        Poll::Ready(Some(Ok(chunk(tokens, generated, finish))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Failure, Moved};
    use futures::StreamExt;
    use tandem_engine::sampling::FinishReason;

    fn token(token: u32, generated: u32, finish: Option<FinishReason>) -> Event {
        Event::Token {
            token,
            generated,
            finish,
        }
    }

    #[tokio::test]
    async fn waiting_tokens_go_out_as_one_message_and_the_stream_ends_after_the_last() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = Coalesced::new(rx);
        tx.send(token(10, 2, None)).unwrap();
        let one = s.next().await.unwrap().unwrap();
        assert_eq!((one.tokens, one.completion_tokens), (vec![10], 2));
        for (i, t) in [11, 12, 13].into_iter().enumerate() {
            tx.send(token(t, 3 + i as u32, None)).unwrap();
        }
        tx.send(token(14, 6, Some(FinishReason::Length))).unwrap();
        // Sent after the last token: not merged into it.
        tx.send(token(99, 7, None)).unwrap();
        let merged = s.next().await.unwrap().unwrap();
        assert_eq!(merged.tokens, vec![11, 12, 13, 14]);
        assert_eq!(merged.completion_tokens, 6);
        assert_eq!(merged.finish, v1::FinishReason::Length as i32);
    }

    #[tokio::test]
    async fn an_error_is_sent_on_its_own_after_the_tokens_before_it() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = Coalesced::new(rx);
        tx.send(token(1, 2, None)).unwrap();
        tx.send(token(2, 3, None)).unwrap();
        tx.send(Event::Failed(Failure::Preempted)).unwrap();
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
        tx.send(token(1, 2, None)).unwrap();
        tx.send(token(2, 3, None)).unwrap();
        tx.send(Event::Moved(Moved {
            worker_id: "decode-2".into(),
            grpc_addr: "127.0.0.1:1".into(),
            reservation_id: 7,
            kv_tokens: 40,
            generated: 3,
        }))
        .unwrap();
        assert_eq!(s.next().await.unwrap().unwrap().tokens, vec![1, 2]);
        let last = s.next().await.unwrap().unwrap();
        let want = v1::SequenceMoved {
            worker_id: "decode-2".into(),
            grpc_addr: "127.0.0.1:1".into(),
            reservation_id: 7,
            kv_tokens: 40,
        };
        assert_eq!(
            (last.tokens.len(), last.completion_tokens, last.moved),
            (0, 3, Some(want))
        );
    }

    #[tokio::test]
    async fn messages_hold_at_most_the_cap() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut s = Coalesced::new(rx);
        let n = MAX_TOKENS_PER_CHUNK as u32 + 10;
        for t in 0..n {
            tx.send(token(t, t + 2, None)).unwrap();
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
