//! The shm transport end to end: a prefill-side mapping writes the blocks, notices cross the
//! control socket, and the decode worker's pool (built on its own mapping) holds the bytes.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_kv_pool::{KvGeometry, KvPool};
use tandem_kv_transfer::{
    KvError, KvSender, KvSink, KvTransferError, ReservationInfo, ShmRegion, TransferSpec, Wire,
    Writer, block_geometry, pool_checksum, serve_with,
};
use tokio::net::TcpListener;

const G: KvGeometry = KvGeometry {
    layers: 3,
    kv_heads: 2,
    head_dim: 8,
    block_size: 16,
    num_blocks: 12,
};

struct ShmSink {
    pool: Mutex<KvPool>,
    reservations: Mutex<HashMap<u64, ReservationInfo>>,
    completed: Mutex<Vec<u64>>,
}

impl KvSink for ShmSink {
    fn reservation(&self, id: u64) -> Option<ReservationInfo> {
        self.reservations.lock().unwrap().get(&id).cloned()
    }
    fn write(&self, _: u64, _: u32, _: &[u32], _: &[u8]) -> Result<(), KvError> {
        Err(KvError::Corrupt)
    }
    fn checksum(&self, _: u64, layer: u32, block_ids: &[u32]) -> Option<u32> {
        pool_checksum(&self.pool.lock().unwrap(), layer as usize, block_ids)
    }
    fn complete(&self, id: u64, _: u32) -> Result<(), KvError> {
        self.completed.lock().unwrap().push(id);
        Ok(())
    }
}

#[tokio::test]
async fn blocks_written_into_the_mapping_commit_after_checked_notices() {
    let path = std::env::temp_dir().join(format!("tandem-kv-shm-e2e-{}", std::process::id()));
    let decode = ShmRegion::create(&path, &G).unwrap();
    let mut prefill = ShmRegion::open(decode.layout()).unwrap();
    // Leased as the decode worker leases them: only each reservation's writer may write.
    decode.fences().stamp(&[5, 2, 9], 1).unwrap();
    decode.fences().stamp(&[0], 2).unwrap();
    let writer = |reservation_id| Writer {
        reservation_id,
        attempt: 0,
    };
    let sink = Arc::new(ShmSink {
        pool: Mutex::new(KvPool::with_memory(G, Box::new(decode)).unwrap()),
        reservations: Mutex::default(),
        completed: Mutex::default(),
    });
    let expires = Instant::now() + Duration::from_secs(60);
    for (id, blocks) in [(1u64, vec![5u32, 2, 9]), (2, vec![0])] {
        let info = ReservationInfo {
            block_ids: Arc::from(blocks),
            geometry: block_geometry(&G),
            attempt: 0,
            expires,
        };
        sink.reservations.lock().unwrap().insert(id, info);
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve_with(
        listener,
        async move { drop(stopped.await) },
        sink.clone(),
        Wire::Shm,
    ));

    let mut src = KvPool::new(G);
    for l in 0..3 {
        let (k, v) = src.layer_mut(l);
        k.iter_mut()
            .chain(v.iter_mut())
            .enumerate()
            .for_each(|(i, x)| *x = (l * 10_000 + i) as f32 + 0.5);
    }
    let (src_blocks, dst) = ([0u32, 1, 2], [5u32, 2, 9]);
    let sender = KvSender::new("prefill-shm");
    let spec = |id| TransferSpec {
        request_id: format!("r{id}"),
        reservation_id: id,
        attempt: 0,
        geometry: block_geometry(&G),
    };
    let mut t = sender.open(&addr, spec(1)).await.unwrap();
    let mut notice = |l: usize| {
        let n = prefill
            .write_blocks_from(l, &dst, src.layer(l), &src_blocks, writer(1))
            .unwrap() as u64;
        (n, prefill.checksum(l, &dst).unwrap())
    };
    for l in 0..2u32 {
        let (n, crc) = notice(l as usize);
        t.notify_shm(l, &dst, n, crc).await.unwrap();
    }
    let (n, crc) = notice(2);
    assert_eq!(
        t.finish_shm(2, &dst, n, crc).await.unwrap().frames_received,
        3
    );
    assert_eq!(*sink.completed.lock().unwrap(), vec![1]);
    {
        let pool = sink.pool.lock().unwrap();
        for l in 0..3 {
            let (mut want, mut got) = (Vec::new(), Vec::new());
            src.export_layer(l, &src_blocks, &mut want).unwrap();
            pool.export_layer(l, &dst, &mut got).unwrap();
            assert_eq!(got, want, "layer {l}");
        }
    }

    // A notice whose checksum does not match what lies in the pool is refused.
    let t = sender.open(&addr, spec(2)).await.unwrap();
    let n = prefill
        .write_blocks_from(0, &[0], src.layer(0), &[0], writer(2))
        .unwrap() as u64;
    let crc = prefill.checksum(0, &[0]).unwrap() ^ 0x55;
    match t.finish_shm(0, &[0], n, crc).await {
        Err(KvTransferError::Refused { error, .. }) => assert_eq!(error, KvError::Corrupt),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(*sink.completed.lock().unwrap(), vec![1]);
}
