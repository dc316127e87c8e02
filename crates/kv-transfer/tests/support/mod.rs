//! A decode worker's side for tests: reservations over a heap pool, and a receiver on port 0.
use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tandem_kv_pool::{KvGeometry, KvPool};
use tandem_kv_transfer::{
    KvError, KvSink, ReservationInfo, ShmRegion, TransferSpec, block_geometry, serve,
};
use tandem_proto::v1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const GEOM: KvGeometry = KvGeometry {
    layers: 3,
    kv_heads: 2,
    head_dim: 4,
    block_size: 16,
    num_blocks: 40,
};

#[derive(Debug)]
pub struct TestSink {
    pub geom: KvGeometry,
    pub pool: Mutex<KvPool>,
    pub reservations: Mutex<HashMap<u64, ReservationInfo>>,
    pub completed: Mutex<Vec<(u64, u32)>>,
    /// A mapping of the pool's memory that each connection remaps, when frames are read straight
    /// into the pool; `None`: frames go through `write`.
    pub direct: Option<ShmRegion>,
    /// Frames being read straight into blocks now (begin_direct minus end_direct).
    pub direct_in_flight: AtomicI64,
    /// Frames that went through `write`.
    pub writes: AtomicI64,
}

thread_local! {
    static DIRECT: Cell<bool> = const { Cell::new(false) };
}

/// Whether the sinks this thread makes next read frames straight into their pool. A
/// `#[tokio::test]` runs its whole body, spawned tasks included, on its own thread.
pub fn set_direct(direct: bool) {
    DIRECT.with(|d| d.set(direct));
}

impl TestSink {
    pub fn new() -> Arc<Self> {
        Self::with_geometry(GEOM)
    }

    pub fn with_geometry(geom: KvGeometry) -> Arc<Self> {
        let (pool, direct) = if DIRECT.with(Cell::get) {
            let (pool, view) = ShmRegion::anonymous_pool(&geom).unwrap();
            (pool, Some(view))
        } else {
            (KvPool::new(geom), None)
        };
        Arc::new(TestSink {
            geom,
            pool: Mutex::new(pool),
            reservations: Mutex::default(),
            completed: Mutex::default(),
            direct,
            direct_in_flight: AtomicI64::new(0),
            writes: AtomicI64::new(0),
        })
    }

    /// Reserves `blocks` for `id`, live for `ttl` (expired when `ttl` is zero).
    pub fn reserve(&self, id: u64, blocks: &[u32], ttl: Duration) {
        let info = ReservationInfo {
            block_ids: Arc::from(blocks.to_vec()),
            geometry: block_geometry(&self.geom),
            attempt: 0,
            expires: Instant::now() + ttl,
        };
        self.reservations.lock().unwrap().insert(id, info);
    }

    pub fn completed(&self) -> Vec<(u64, u32)> {
        self.completed.lock().unwrap().clone()
    }
}

impl KvSink for TestSink {
    fn reservation(&self, id: u64) -> Option<ReservationInfo> {
        self.reservations.lock().unwrap().get(&id).cloned()
    }
    fn write(&self, _id: u64, layer: u32, blocks: &[u32], payload: &[u8]) -> Result<(), KvError> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        let mut pool = self.pool.lock().unwrap();
        pool.import_layer(layer as usize, blocks, payload)
            .map_err(|_| KvError::BadBlock)
    }
    fn complete(&self, id: u64, attempt: u32) -> Result<(), KvError> {
        assert_eq!(
            self.direct_in_flight.load(Ordering::SeqCst),
            0,
            "a commit while a frame is being read into blocks"
        );
        self.completed.lock().unwrap().push((id, attempt));
        Ok(())
    }
    fn direct(&self) -> Option<ShmRegion> {
        self.direct.as_ref().map(|r| r.remap().unwrap())
    }
    fn begin_direct(&self, id: u64, _attempt: u32) -> Result<(), KvError> {
        assert!(
            self.direct.is_some(),
            "a direct frame on a sink without a mapping"
        );
        if !self.reservations.lock().unwrap().contains_key(&id) {
            return Err(KvError::UnknownReservation);
        }
        self.direct_in_flight.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn end_direct(&self, _id: u64) {
        let was = self.direct_in_flight.fetch_sub(1, Ordering::SeqCst);
        assert!(was > 0, "end_direct without begin_direct");
    }
}

/// Starts a receiver on 127.0.0.1:0; it stops when the returned sender is dropped.
pub async fn start(sink: Arc<TestSink>) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        async move {
            let _ = rx.await;
        },
        sink,
    ));
    (addr, tx)
}

/// A source pool whose every float is distinct, and the payload of `blocks` of `layer` in it.
pub fn source() -> KvPool {
    let mut p = KvPool::new(GEOM);
    for l in 0..GEOM.layers {
        let (k, v) = p.layer_mut(l);
        k.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = (l * 100_000 + i) as f32 + 0.25);
        v.iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = -((l * 100_000 + i) as f32) - 0.5);
    }
    p
}

pub fn payload(src: &KvPool, layer: usize, blocks: &[u32]) -> Vec<u8> {
    let mut out = Vec::new();
    src.export_layer(layer, blocks, &mut out).unwrap();
    out
}

pub fn spec(reservation_id: u64) -> TransferSpec {
    TransferSpec {
        request_id: format!("req-{reservation_id}"),
        reservation_id,
        attempt: 0,
        geometry: block_geometry(&GEOM),
    }
}

/// A hand-written client, to put on the wire what KvSender never would.
pub struct RawClient(pub TcpStream);

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> Self {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut buf = b"TKV1".to_vec();
        put(
            &mut buf,
            &v1::KvHello {
                version: 1,
                sender_worker_id: "raw".into(),
            },
        );
        s.write_all(&buf).await.unwrap();
        RawClient(s)
    }

    /// A correct header for `payload`, to be altered by the test.
    pub fn header(
        reservation_id: u64,
        layer: u32,
        blocks: &[u32],
        seq: u64,
        payload: &[u8],
    ) -> v1::KvFrameHeader {
        v1::KvFrameHeader {
            request_id: format!("raw-{reservation_id}"),
            reservation_id,
            layer,
            block_ids: blocks.to_vec(),
            seq,
            payload_len: payload.len() as u64,
            dtype: v1::KvDtype::F32.into(),
            geometry: Some(block_geometry(&GEOM)),
            checksum: crc32c::crc32c(payload),
            last: false,
            attempt: 0,
        }
    }

    pub async fn send(&mut self, h: &v1::KvFrameHeader, payload: &[u8]) {
        let mut buf = Vec::new();
        put(&mut buf, h);
        buf.extend_from_slice(payload);
        self.0.write_all(&buf).await.unwrap();
    }

    pub async fn ack(&mut self) -> v1::KvAck {
        let mut len = [0u8; 4];
        self.0.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
        self.0.read_exact(&mut buf).await.unwrap();
        v1::KvAck::decode(buf.as_slice()).unwrap()
    }
}

fn put(buf: &mut Vec<u8>, m: &impl Message) {
    buf.extend_from_slice(&(m.encoded_len() as u32).to_le_bytes());
    m.encode(buf).unwrap();
}
