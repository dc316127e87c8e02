use std::time::Duration;

use tandem_engine::sampling::SamplingParams;
use tandem_kv_transfer::KvSink;
use tokio::sync::mpsc::UnboundedReceiver;

use super::*;
use crate::inbox::Joiner;
use crate::state::Sink;
use crate::state::tests::worker;

const PROMPT: u32 = 20;
const TOKENS: u32 = 24;
/// Most tokens the tiny model's context leaves after the prompt.
const LONG: u32 = 480;

/// A reservation of `PROMPT` positions for up to `tokens` more, whose KV (zeros) has arrived,
/// admitted for Decode.
fn admitted(s: &Arc<Shared>, tokens: u32) -> u64 {
    let (id, blocks) = s
        .reserve("r".into(), PROMPT, tokens, Duration::from_secs(60), 0)
        .unwrap();
    let sink = Sink(s.clone());
    let g = s.geometry;
    let zeros =
        vec![0u8; 2 * blocks.len() * (g.block_tokens * g.kv_heads * g.head_dim * 4) as usize];
    for layer in 0..g.num_layers {
        sink.write(id, layer, &blocks, &zeros).unwrap();
    }
    sink.complete(id, 0).unwrap();
    s.book().admit(id).unwrap();
    id
}

/// A batch loop on its own thread, with one sequence of up to `tokens` joined; its stream's
/// receiver.
fn started(
    tokens: u32,
) -> (
    Arc<Inbox>,
    u64,
    UnboundedReceiver<Event>,
    std::thread::JoinHandle<()>,
) {
    let (engine, s, inbox) = worker(64);
    let id = admitted(&s, tokens);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    inbox.join(Joiner {
        reservation_id: id,
        kv_tokens: PROMPT as usize,
        first_token: 5,
        generated_before: 1,
        sampling: SamplingParams::greedy(tokens),
        tx,
    });
    let (s2, i2) = (s.clone(), inbox.clone());
    let cfg = LoopConfig { step_tokens: 64 };
    let thread = std::thread::spawn(move || run(engine, s2, i2, Arc::default(), Vec::new(), cfg));
    (inbox, id, rx, thread)
}

/// Tokens from the stream until its finish (or `n` of them).
async fn tokens(rx: &mut UnboundedReceiver<Event>, n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    while out.len() < n {
        match rx.recv().await.unwrap() {
            Event::Token { token, finish, .. } => {
                out.push(token);
                if finish.is_some() {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    out
}

#[tokio::test]
async fn a_detached_sequence_stops_and_once_put_back_goes_on_as_if_never_taken_out() {
    let (inbox, _, mut rx, thread) = started(TOKENS);
    let undisturbed = tokens(&mut rx, usize::MAX).await;
    assert_eq!(
        undisturbed.len(),
        TOKENS as usize - 1,
        "the first token came before"
    );
    inbox.stop();
    thread.join().unwrap();

    let (inbox, id, mut rx, thread) = started(TOKENS);
    let mut got = tokens(&mut rx, 4).await;
    let d = inbox.detach(id).await.expect("running");
    // Out of the batch right after a token: its KV holds every position but the last token's.
    while let Ok(Event::Token { token, .. }) = rx.try_recv() {
        got.push(token);
    }
    assert_eq!(d.generated() as usize, 1 + got.len());
    assert_eq!(d.kv_tokens, PROMPT as usize + got.len());
    assert!(d.blocks.len() >= d.kv_tokens.div_ceil(16));
    assert!(inbox.snapshot(id).await.is_none(), "not in the batch");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rx.try_recv().is_err(), "no step while it is out");
    inbox.reattach(d);
    got.extend(tokens(&mut rx, usize::MAX).await);
    assert_eq!(got, undisturbed);
    inbox.stop();
    thread.join().unwrap();
}

#[tokio::test]
async fn a_snapshot_shows_the_kv_so_far_and_unknown_sequences_have_none() {
    // Long enough that it still runs when the snapshot is asked for (a short one could end first
    // on a busy machine).
    let (inbox, id, mut rx, thread) = started(LONG);
    let first = tokens(&mut rx, 2).await;
    let snap = inbox.snapshot(id).await.expect("running");
    assert!(snap.kv_tokens > PROMPT as usize + first.len() - 1);
    assert_eq!(snap.blocks.len(), snap.kv_tokens.div_ceil(16));
    assert!(snap.left < LONG);
    assert!(inbox.snapshot(id + 1).await.is_none());
    assert!(inbox.detach(id + 1).await.is_none());
    inbox.stop();
    thread.join().unwrap();
}
