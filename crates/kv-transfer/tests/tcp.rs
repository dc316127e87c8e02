//! The tcp transport end to end on loopback: a full transfer, and every kind of bad frame refused
//! with its own error while a transfer beside it completes. Every case runs twice: against a sink
//! that takes each frame's bytes into a heap pool (`heap::`), and against one whose connections
//! read frames straight into a mapped pool, as a decode worker's do (`direct::`).
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use support::{GEOM, RawClient, TestSink, payload, source, spec, start};
use tandem_kv_pool::{KvGeometry, KvPool};
use tandem_kv_transfer::{KvError, KvSender, KvTransferError, frame_checksums};
use tokio::io::AsyncWriteExt;

const LIVE: Duration = Duration::from_secs(60);
const SRC_BLOCKS: [u32; 5] = [0, 1, 2, 3, 4];

/// Sends all three layers of `SRC_BLOCKS` into `dst`, the last layer with `finish`.
async fn transfer(
    sender: &KvSender,
    addr: SocketAddr,
    id: u64,
    dst: &[u32],
    src: &KvPool,
) -> Result<u64, KvTransferError> {
    let mut t = sender.open(&addr.to_string(), spec(id)).await?;
    for layer in 0..2 {
        t.send_layer(layer, dst, &payload(src, layer as usize, &SRC_BLOCKS))
            .await?;
        tokio::task::yield_now().await;
    }
    let ack = t.finish(2, dst, &payload(src, 2, &SRC_BLOCKS)).await?;
    Ok(ack.frames_received)
}

fn assert_landed(sink: &TestSink, src: &KvPool, dst: &[u32]) {
    // Which way the bytes came: straight into the mapped pool, or handed to `write`.
    let writes = sink.writes.load(std::sync::atomic::Ordering::SeqCst);
    match sink.direct {
        Some(_) => assert_eq!(writes, 0, "a direct sink's frames went through write"),
        None => assert!(writes > 0, "a heap sink's frames never reached write"),
    }
    let pool = sink.pool.lock().unwrap();
    for layer in 0..GEOM.layers {
        let mut got = Vec::new();
        pool.export_layer(layer, dst, &mut got).unwrap();
        assert_eq!(got, payload(src, layer, &SRC_BLOCKS), "layer {layer}");
    }
}

async fn a_three_layer_five_block_transfer_lands_byte_identical() {
    let sink = TestSink::new();
    let (addr, _stop) = start(sink.clone()).await;
    let dst = [17, 3, 30, 8, 22];
    sink.reserve(5, &dst, LIVE);
    let src = source();
    let sender = KvSender::new("prefill-test");
    assert_eq!(transfer(&sender, addr, 5, &dst, &src).await.unwrap(), 3);
    assert_eq!(sink.completed(), vec![(5, 0)]);
    assert_landed(&sink, &src, &dst);
    // The pooled connection carries the next request too.
    sink.reserve(6, &[0, 1, 2, 4, 5], LIVE);
    assert_eq!(
        transfer(&sender, addr, 6, &[0, 1, 2, 4, 5], &src)
            .await
            .unwrap(),
        3
    );
    assert_eq!(sink.completed(), vec![(5, 0), (6, 0)]);
}

/// Runs `bad` while a good transfer runs on another connection; the good one must complete.
async fn beside_a_good_one<F, Fut>(bad: F) -> KvError
where
    F: FnOnce(SocketAddr, Arc<TestSink>) -> Fut,
    Fut: std::future::Future<Output = KvError>,
{
    let sink = TestSink::new();
    let (addr, _stop) = start(sink.clone()).await;
    let good_blocks = [30, 31, 32, 33, 34];
    sink.reserve(100, &good_blocks, LIVE);
    sink.reserve(1, &[1, 2, 3, 4, 5], LIVE);
    let src = source();
    let good = async {
        let sender = KvSender::new("good");
        transfer(&sender, addr, 100, &good_blocks, &src).await
    };
    let (error, good) = tokio::join!(bad(addr, sink.clone()), good);
    assert_eq!(good.unwrap(), 3);
    assert_eq!(
        sink.completed(),
        vec![(100, 0)],
        "only the good transfer commits"
    );
    assert_landed(&sink, &src, &good_blocks);
    error
}

fn refused(r: Result<u64, KvTransferError>) -> KvError {
    match r {
        Err(KvTransferError::Refused { error, .. }) => error,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

async fn a_truncated_payload_is_corrupt() {
    let e = beside_a_good_one(|addr, _| async move {
        let mut raw = RawClient::connect(addr).await;
        let p = payload(&source(), 0, &[0]);
        let h = RawClient::header(1, 0, &[1], 0, &p);
        raw.send(&h, &p[..p.len() - 10]).await;
        raw.0.shutdown().await.unwrap();
        KvError::try_from(raw.ack().await.error).unwrap()
    })
    .await;
    assert_eq!(e, KvError::Corrupt);
}

async fn a_corrupted_checksum_is_corrupt_and_the_connection_serves_on() {
    let e = beside_a_good_one(|addr, sink| async move {
        let mut raw = RawClient::connect(addr).await;
        let p = payload(&source(), 0, &[0]);
        let mut h = RawClient::header(1, 0, &[1], 0, &p);
        h.checksum ^= 1;
        raw.send(&h, &p).await;
        let ack = raw.ack().await;
        // The same connection still takes another reservation's frames.
        sink.reserve(2, &[9], LIVE);
        let mut ok = RawClient::header(2, 0, &[9], 0, &p);
        ok.last = true;
        raw.send(&ok, &p).await;
        assert_eq!(
            raw.ack().await.error,
            i32::from(KvError::Incomplete),
            "layers 1 and 2 never came"
        );
        KvError::try_from(ack.error).unwrap()
    })
    .await;
    assert_eq!(e, KvError::Corrupt);
}

async fn an_unknown_reservation_is_refused() {
    let e = beside_a_good_one(|addr, _| async move {
        refused(transfer(&KvSender::new("bad"), addr, 77, &[1, 2, 3, 4, 5], &source()).await)
    })
    .await;
    assert_eq!(e, KvError::UnknownReservation);
}

async fn an_expired_reservation_is_refused() {
    let e = beside_a_good_one(|addr, sink| async move {
        sink.reserve(1, &[1, 2, 3, 4, 5], Duration::ZERO);
        refused(transfer(&KvSender::new("bad"), addr, 1, &[1, 2, 3, 4, 5], &source()).await)
    })
    .await;
    assert_eq!(e, KvError::UnknownReservation);
}

async fn a_frame_out_of_order_is_refused() {
    let e = beside_a_good_one(|addr, _| async move {
        let mut raw = RawClient::connect(addr).await;
        let p = payload(&source(), 0, &[0]);
        raw.send(&RawClient::header(1, 0, &[1], 0, &p), &p).await;
        raw.send(&RawClient::header(1, 1, &[1], 2, &p), &p).await;
        let ack = raw.ack().await;
        assert_eq!(ack.frames_received, 1);
        KvError::try_from(ack.error).unwrap()
    })
    .await;
    assert_eq!(e, KvError::OutOfOrder);
}

async fn a_duplicate_layer_and_block_is_refused() {
    let e = beside_a_good_one(|addr, _| async move {
        let sender = KvSender::new("bad");
        let src = source();
        let mut t = sender.open(&addr.to_string(), spec(1)).await.unwrap();
        t.send_layer(0, &[1, 2], &payload(&src, 0, &[0, 1]))
            .await
            .unwrap();
        t.send_layer(0, &[2], &payload(&src, 0, &[1]))
            .await
            .unwrap();
        refused(t.finish(1, &[], &[]).await.map(|a| a.frames_received))
    })
    .await;
    assert_eq!(e, KvError::BadBlock);
}

async fn a_block_outside_the_reservation_is_refused() {
    let e = beside_a_good_one(|addr, _| async move {
        refused(transfer(&KvSender::new("bad"), addr, 1, &[1, 2, 3, 4, 36], &source()).await)
    })
    .await;
    assert_eq!(e, KvError::BadBlock);
}

async fn a_geometry_mismatch_is_refused() {
    let e = beside_a_good_one(|addr, _| async move {
        let mut s = spec(1);
        s.geometry.kv_heads = 4;
        let sender = KvSender::new("bad");
        let mut t = sender.open(&addr.to_string(), s).await.unwrap();
        let p = vec![0u8; 2 * 16 * 4 * 4 * 4];
        t.send_layer(0, &[1], &p).await.unwrap();
        refused(t.finish(1, &[], &[]).await.map(|a| a.frames_received))
    })
    .await;
    assert_eq!(e, KvError::GeometryMismatch);
}

async fn a_retry_with_a_newer_attempt_replaces_the_failed_one() {
    let sink = TestSink::new();
    let (addr, _stop) = start(sink.clone()).await;
    let dst = [4, 5, 6, 7, 8];
    sink.reserve(9, &dst, LIVE);
    let src = source();
    let first = KvSender::new("p0");
    let mut t = first.open(&addr.to_string(), spec(9)).await.unwrap();
    t.send_layer(0, &dst, &payload(&src, 0, &SRC_BLOCKS))
        .await
        .unwrap();
    let second = KvSender::new("p1");
    let mut s = spec(9);
    s.attempt = 1;
    let mut r = second.open(&addr.to_string(), s).await.unwrap();
    for layer in 0..2 {
        r.send_layer(layer, &dst, &payload(&src, layer as usize, &SRC_BLOCKS))
            .await
            .unwrap();
    }
    // The first attempt goes on meanwhile; its frames are now stale.
    let _ = t.send_layer(1, &dst, &payload(&src, 1, &SRC_BLOCKS)).await;
    assert_eq!(
        r.finish(2, &dst, &payload(&src, 2, &SRC_BLOCKS))
            .await
            .unwrap()
            .frames_received,
        3
    );
    let stale = t.finish(2, &dst, &payload(&src, 2, &SRC_BLOCKS)).await;
    assert_eq!(
        refused(stale.map(|a| a.frames_received)),
        KvError::OutOfOrder
    );
    assert_eq!(sink.completed(), vec![(9, 1)]);
    assert_landed(&sink, &src, &dst);
}

async fn a_large_layer_goes_as_several_frames_and_lands_whole_with_either_side_summing() {
    // 64 KiB blocks: a frame holds FRAME_BYTES / 128 KiB = 4 of them, so 10 blocks make 3 frames.
    let g = KvGeometry {
        layers: 2,
        kv_heads: 8,
        head_dim: 128,
        block_size: 16,
        num_blocks: 12,
    };
    assert_eq!(
        tandem_kv_transfer::FRAME_BYTES / (2 * g.block_floats() * 4),
        4
    );
    let sink = TestSink::with_geometry(g);
    let (addr, _stop) = start(sink.clone()).await;
    let dst: Vec<u32> = (2..12).rev().collect();
    sink.reserve(3, &dst, LIVE);
    let mut src = KvPool::new(g);
    for l in 0..2 {
        let (k, v) = src.layer_mut(l);
        k.iter_mut()
            .chain(v.iter_mut())
            .enumerate()
            .for_each(|(i, x)| *x = (l * 7_000_000 + i) as f32);
    }
    let src_ids: Vec<u32> = (0..10).collect();
    let layer = |l: usize| {
        let mut out = Vec::new();
        src.export_layer(l, &src_ids, &mut out).unwrap();
        out
    };
    let mut s = spec(3);
    s.geometry = tandem_kv_transfer::block_geometry(&g);
    let sender = KvSender::new("p");
    let mut t = sender.open(&addr.to_string(), s.clone()).await.unwrap();
    t.send_layer(0, &dst, &layer(0)).await.unwrap();
    assert_eq!(t.seq(), 3);
    assert_eq!(
        t.finish(1, &dst, &layer(1)).await.unwrap().frames_received,
        6
    );
    {
        let pool = sink.pool.lock().unwrap();
        for l in 0..2 {
            let mut got = Vec::new();
            pool.export_layer(l, &dst, &mut got).unwrap();
            assert_eq!(got, layer(l), "layer {l}");
        }
    }

    // The same layers with the checksums their producer computed: three per layer, each the
    // CRC-32C of its frame's K bytes then V bytes (blocks 0-3, 4-7, 8-9).
    let sums = |l: usize| frame_checksums(&s.geometry, src_ids.len(), &layer(l)).unwrap();
    let bytes = layer(0);
    let (k, v) = bytes.split_at(bytes.len() / 2);
    let block = g.block_floats() * 4;
    let frame = |a: usize, b: usize| {
        let mut both = k[a * block..b * block].to_vec();
        both.extend_from_slice(&v[a * block..b * block]);
        crc32c::crc32c(&both)
    };
    assert_eq!(sums(0), vec![frame(0, 4), frame(4, 8), frame(8, 10)]);
    sink.reserve(4, &dst, LIVE);
    let mut s4 = s.clone();
    s4.reservation_id = 4;
    let mut t = sender.open(&addr.to_string(), s4).await.unwrap();
    t.send_layer_summed(0, &dst, &layer(0), &sums(0))
        .await
        .unwrap();
    let ack = t.finish_summed(1, &dst, &layer(1), &sums(1)).await.unwrap();
    assert_eq!(ack.frames_received, 6);
    assert!(sink.completed().contains(&(4, 0)));

    // A checksum that does not match its frame is refused as corrupt; a count that does not
    // match the frames is refused before anything is sent.
    sink.reserve(5, &dst, LIVE);
    let mut s5 = s.clone();
    s5.reservation_id = 5;
    let mut t = sender.open(&addr.to_string(), s5).await.unwrap();
    let r = t.send_layer_summed(0, &dst, &layer(0), &sums(0)[..2]).await;
    assert!(matches!(r, Err(KvTransferError::Invalid(_))), "{r:?}");
    assert_eq!(t.seq(), 0);
    let mut bad = sums(0);
    bad[1] ^= 1;
    t.send_layer_summed(0, &dst, &layer(0), &bad).await.unwrap();
    let r = t.finish_summed(1, &dst, &layer(1), &sums(1)).await;
    match r {
        Err(KvTransferError::Refused { error, .. }) => assert_eq!(error, KvError::Corrupt),
        other => panic!("expected a corrupt refusal, got {other:?}"),
    }
    assert!(!sink.completed().contains(&(5, 0)));
}

async fn a_payload_that_does_not_fit_its_blocks_is_refused_before_sending() {
    let sink = TestSink::new();
    let (addr, _stop) = start(sink.clone()).await;
    let sender = KvSender::new("p");
    let mut t = sender.open(&addr.to_string(), spec(1)).await.unwrap();
    let r = t.send_layer(0, &[1, 2], &[0u8; 100]).await;
    assert!(matches!(r, Err(KvTransferError::Invalid(_))), "{r:?}");
    assert_eq!(t.seq(), 0);
}

async fn an_oversized_header_or_a_bad_magic_closes_only_that_connection() {
    use tokio::io::AsyncReadExt;
    let sink = TestSink::new();
    let (addr, _stop) = start(sink.clone()).await;
    let mut raw = RawClient::connect(addr).await;
    raw.0
        .write_all(&(64 * 1024 + 1u32).to_le_bytes())
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        raw.0.read(&mut byte).await.unwrap(),
        0,
        "closed without an answer"
    );
    let mut bad = tokio::net::TcpStream::connect(addr).await.unwrap();
    bad.write_all(b"TKV2").await.unwrap();
    assert_eq!(bad.read(&mut byte).await.unwrap(), 0);
    // The endpoint itself serves on.
    sink.reserve(4, &[1, 2, 3, 4, 5], LIVE);
    assert_eq!(
        transfer(&KvSender::new("p"), addr, 4, &[1, 2, 3, 4, 5], &source())
            .await
            .unwrap(),
        3
    );
}

/// Each case as a test in module `$sink`, run against a sink that copies frames in
/// (`direct = false`) or one that has them read straight into its pool (`true`).
macro_rules! on_sink {
    ($sink:ident, $direct:literal, $($case:ident),*) => {
        mod $sink {
            $(#[tokio::test]
            async fn $case() {
                super::support::set_direct($direct);
                super::$case().await
            })*
        }
    };
}

macro_rules! on_both_sinks {
    ($($case:ident),* $(,)?) => {
        on_sink!(heap, false, $($case),*);
        on_sink!(direct, true, $($case),*);
    };
}

on_both_sinks!(
    a_three_layer_five_block_transfer_lands_byte_identical,
    a_truncated_payload_is_corrupt,
    a_corrupted_checksum_is_corrupt_and_the_connection_serves_on,
    an_unknown_reservation_is_refused,
    an_expired_reservation_is_refused,
    a_frame_out_of_order_is_refused,
    a_duplicate_layer_and_block_is_refused,
    a_block_outside_the_reservation_is_refused,
    a_geometry_mismatch_is_refused,
    a_retry_with_a_newer_attempt_replaces_the_failed_one,
    a_large_layer_goes_as_several_frames_and_lands_whole_with_either_side_summing,
    a_payload_that_does_not_fit_its_blocks_is_refused_before_sending,
    an_oversized_header_or_a_bad_magic_closes_only_that_connection,
);
