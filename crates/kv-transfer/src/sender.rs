//! The prefill worker's side: one pooled connection per destination, frames written straight
//! from the caller's payload slice, acknowledgements routed back to their transfer.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_proto::v1::{self, KvError};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::wire::{block_bytes, put_message, read_message, write_parts, write_preamble};
use crate::{KvTransferError, Result};

/// Largest payload of one frame. A layer of a long prompt goes as several frames, so that each is
/// still in cache between its checksum and its copy into the socket (and, on the receiver, between
/// the socket and the pool).
pub const FRAME_BYTES: usize = 512 * 1024;

type Waiters = Arc<Mutex<HashMap<(u64, u32), oneshot::Sender<v1::KvAck>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Sends KV to decode workers over tcp, keeping one connection per destination for reuse.
pub struct KvSender {
    worker_id: String,
    ack_timeout: Duration,
    connect_timeout: Duration,
    conns: Mutex<HashMap<String, Arc<Conn>>>,
}

/// Which reservation a transfer fills; the same for every frame of it.
#[derive(Debug, Clone)]
pub struct TransferSpec {
    /// The gateway's request id.
    pub request_id: String,
    /// The decode worker's reservation (ReserveResponse.reservation_id).
    pub reservation_id: u64,
    /// Prefill attempt into this reservation (KvDestination.attempt).
    pub attempt: u32,
    /// The destination pool's block shape, as KvDestination.geometry gives it.
    pub geometry: v1::BlockGeometry,
}

struct Conn {
    dest: String,
    writer: tokio::sync::Mutex<Writer>,
    waiters: Waiters,
    broken: Arc<AtomicBool>,
    reader: JoinHandle<()>,
}

struct Writer {
    wr: OwnedWriteHalf,
    head: Vec<u8>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl KvSender {
    /// A sender that names itself `worker_id` in each connection's hello.
    pub fn new(worker_id: impl Into<String>) -> Self {
        KvSender {
            worker_id: worker_id.into(),
            ack_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// How long [`OutboundTransfer::finish`] waits for the final acknowledgement (default 30 s).
    pub fn with_ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Starts a transfer to `dest` ("host:port"), dialling a connection if none is open or the
    /// pooled one broke.
    pub async fn open(&self, dest: &str, spec: TransferSpec) -> Result<OutboundTransfer> {
        let conn = self.connection(dest).await?;
        let (tx, rx) = oneshot::channel();
        lock(&conn.waiters).insert((spec.reservation_id, spec.attempt), tx);
        let header = v1::KvFrameHeader {
            request_id: spec.request_id.clone(),
            reservation_id: spec.reservation_id,
            dtype: spec.geometry.dtype,
            geometry: Some(spec.geometry),
            attempt: spec.attempt,
            ..Default::default()
        };
        Ok(OutboundTransfer {
            conn,
            spec,
            seq: 0,
            ack: rx,
            refused: None,
            header,
            timeout: self.ack_timeout,
        })
    }

    async fn connection(&self, dest: &str) -> Result<Arc<Conn>> {
        let healthy = |c: &&Arc<Conn>| !c.broken.load(Ordering::Acquire);
        if let Some(c) = lock(&self.conns).get(dest).filter(healthy) {
            return Ok(c.clone());
        }
        // Dial without holding the pool, so that one unreachable destination delays no other.
        let conn = Arc::new(self.dial(dest).await?);
        let mut conns = lock(&self.conns);
        if let Some(c) = conns.get(dest).filter(healthy) {
            return Ok(c.clone()); // another transfer dialled first; ours closes on drop
        }
        conns.insert(dest.to_owned(), conn.clone());
        Ok(conn)
    }

    async fn dial(&self, dest: &str) -> Result<Conn> {
        let dial = tokio::time::timeout(self.connect_timeout, TcpStream::connect(dest));
        let stream = dial
            .await
            .map_err(|_| KvTransferError::Timeout(self.connect_timeout))??;
        stream.set_nodelay(true)?;
        let (rd, mut wr) = stream.into_split();
        write_preamble(&mut wr, &self.worker_id).await?;
        let waiters: Waiters = Arc::default();
        let broken = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(read_acks(rd, waiters.clone(), broken.clone()));
        Ok(Conn {
            dest: dest.to_owned(),
            writer: tokio::sync::Mutex::new(Writer {
                wr,
                head: Vec::with_capacity(1024),
            }),
            waiters,
            broken,
            reader,
        })
    }
}

/// Routes each KvAck to its transfer; when the connection ends, every waiting transfer learns it.
async fn read_acks(rd: OwnedReadHalf, waiters: Waiters, broken: Arc<AtomicBool>) {
    let mut rd = BufReader::new(rd);
    let mut buf = Vec::new();
    while let Ok(Some(ack)) = read_message::<v1::KvAck, _>(&mut rd, &mut buf).await {
        if let Some(tx) = lock(&waiters).remove(&(ack.reservation_id, ack.attempt)) {
            let _ = tx.send(ack);
        }
    }
    broken.store(true, Ordering::Release);
    lock(&waiters).clear();
}

/// One request's transfer into one reservation: frames numbered from 0, then a final ack.
pub struct OutboundTransfer {
    conn: Arc<Conn>,
    spec: TransferSpec,
    seq: u64,
    ack: oneshot::Receiver<v1::KvAck>,
    refused: Option<v1::KvAck>,
    /// Reused for every frame so that a frame costs no allocation.
    header: v1::KvFrameHeader,
    timeout: Duration,
}

impl OutboundTransfer {
    /// Frames (or notices) sent so far.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Sends one layer's K and V for `block_ids`, laid out as `KvPool::export_layer` makes them.
    /// Fails at once if the receiver has already refused this transfer.
    pub async fn send_layer(
        &mut self,
        layer: u32,
        block_ids: &[u32],
        payload: &[u8],
    ) -> Result<()> {
        self.frame(layer, block_ids, payload, false).await
    }

    /// Sends the last frame (which may carry no blocks) and waits for the receiver's verdict.
    pub async fn finish(
        mut self,
        layer: u32,
        block_ids: &[u32],
        payload: &[u8],
    ) -> Result<v1::KvAck> {
        self.frame(layer, block_ids, payload, true).await?;
        self.wait_ack().await
    }

    /// shm: tells the receiver that `layer` of `block_ids` was written into its pool.
    pub async fn notify_shm(
        &mut self,
        layer: u32,
        block_ids: &[u32],
        bytes: u64,
        checksum: u32,
    ) -> Result<()> {
        self.notice(layer, block_ids, bytes, checksum, false).await
    }

    /// shm: the last notice, then the receiver's verdict.
    pub async fn finish_shm(
        mut self,
        layer: u32,
        block_ids: &[u32],
        bytes: u64,
        checksum: u32,
    ) -> Result<v1::KvAck> {
        self.notice(layer, block_ids, bytes, checksum, true).await?;
        self.wait_ack().await
    }

    /// Sends a layer as frames of at most [`FRAME_BYTES`]: each frame's checksum pass leaves its
    /// bytes in cache for the socket copy that follows, on both sides.
    async fn frame(
        &mut self,
        layer: u32,
        block_ids: &[u32],
        payload: &[u8],
        last: bool,
    ) -> Result<()> {
        self.check_refused()?;
        let block = block_bytes(&self.spec.geometry)
            .filter(|b| *b > 0)
            .ok_or_else(|| {
                KvTransferError::Invalid(format!("geometry {:?}", self.spec.geometry))
            })?;
        let n = block_ids.len();
        if payload.len() != 2 * n * block {
            let msg = format!("{} payload bytes for {n} blocks of {block}", payload.len());
            return Err(KvTransferError::Invalid(msg));
        }
        let (k, v) = payload.split_at(n * block);
        // As few frames as FRAME_BYTES allows, of equal size (no runt frame at the end).
        let frames = n.div_ceil((FRAME_BYTES / (2 * block)).max(1)).max(1);
        let per = n.div_ceil(frames).max(1);
        for f in 0..frames {
            let (a, b) = (f * per, ((f + 1) * per).min(n));
            let (k, v) = (&k[a * block..b * block], &v[a * block..b * block]);
            self.frame_part(layer, &block_ids[a..b], k, v, last && f + 1 == frames)
                .await?;
        }
        Ok(())
    }

    async fn frame_part(
        &mut self,
        layer: u32,
        block_ids: &[u32],
        k: &[u8],
        v: &[u8],
        last: bool,
    ) -> Result<()> {
        let h = &mut self.header;
        h.layer = layer;
        h.block_ids.clear();
        h.block_ids.extend_from_slice(block_ids);
        h.seq = self.seq;
        h.payload_len = (k.len() + v.len()) as u64;
        h.checksum = crc32c::crc32c_append(crc32c::crc32c(k), v);
        h.last = last;
        let mut w = self.conn.writer.lock().await;
        let w = &mut *w;
        w.head.clear();
        put_message(&mut w.head, &self.header);
        self.write(&mut w.wr, [&w.head, k, v]).await?;
        self.seq += 1;
        Ok(())
    }

    async fn notice(
        &mut self,
        layer: u32,
        block_ids: &[u32],
        bytes: u64,
        checksum: u32,
        last: bool,
    ) -> Result<()> {
        self.check_refused()?;
        let n = v1::ShmWriteNotice {
            request_id: self.spec.request_id.clone(),
            reservation_id: self.spec.reservation_id,
            layer,
            block_ids: block_ids.to_vec(),
            seq: self.seq,
            bytes_written: bytes,
            checksum,
            last,
            attempt: self.spec.attempt,
        };
        let mut w = self.conn.writer.lock().await;
        let w = &mut *w;
        w.head.clear();
        put_message(&mut w.head, &n);
        self.write(&mut w.wr, [&w.head, &[], &[]]).await?;
        self.seq += 1;
        Ok(())
    }

    async fn write(&self, wr: &mut OwnedWriteHalf, parts: [&[u8]; 3]) -> Result<()> {
        if self.conn.broken.load(Ordering::Acquire) {
            return Err(KvTransferError::ConnectionLost(self.conn.dest.clone()));
        }
        if let Err(e) = write_parts(wr, parts).await {
            // Half a frame may be on the wire: nothing more can follow it on this connection.
            self.conn.broken.store(true, Ordering::Release);
            return Err(e);
        }
        Ok(())
    }

    fn check_refused(&mut self) -> Result<()> {
        if self.refused.is_none() {
            match self.ack.try_recv() {
                Ok(ack) => self.refused = Some(ack),
                Err(oneshot::error::TryRecvError::Empty) => {}
                Err(oneshot::error::TryRecvError::Closed) => {
                    return Err(KvTransferError::ConnectionLost(self.conn.dest.clone()));
                }
            }
        }
        self.refused
            .as_ref()
            .map_or(Ok(()), |ack| Err(refusal(ack)))
    }

    async fn wait_ack(mut self) -> Result<v1::KvAck> {
        let ack = match self.refused.take() {
            Some(ack) => ack,
            None => match tokio::time::timeout(self.timeout, &mut self.ack).await {
                Err(_) => return Err(KvTransferError::Timeout(self.timeout)),
                Ok(Err(_)) => return Err(KvTransferError::ConnectionLost(self.conn.dest.clone())),
                Ok(Ok(ack)) => ack,
            },
        };
        if ack.error == i32::from(KvError::None) {
            Ok(ack)
        } else {
            Err(refusal(&ack))
        }
    }
}

impl Drop for OutboundTransfer {
    fn drop(&mut self) {
        lock(&self.conn.waiters).remove(&(self.spec.reservation_id, self.spec.attempt));
    }
}

fn refusal(ack: &v1::KvAck) -> KvTransferError {
    KvTransferError::Refused {
        error: KvError::try_from(ack.error).unwrap_or(KvError::Corrupt),
        message: ack.message.clone(),
        frames_received: ack.frames_received,
    }
}
