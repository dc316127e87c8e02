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
use crate::{Crc32c, KvTransferError, Result};

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
    stall_timeout: Duration,
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
            stall_timeout: STALL_TIMEOUT,
            // A reachable peer answers a dial in milliseconds; a cut link must fail the prefill
            // soon enough for the request to move to another decode worker within its budget.
            connect_timeout: Duration::from_secs(1),
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// The longest a transfer waits without progress: for a frame's write to leave, and for the
    /// acknowledgement after the last ([`STALL_TIMEOUT`] by default).
    pub fn with_stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
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
            timeout: self.stall_timeout,
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
        if let Err(e) = limit_unsent(&stream, UNSENT_LIMIT) {
            tracing::debug!(error = %e, "TCP_NOTSENT_LOWAT not set");
        }
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

/// Most bytes a KV connection keeps written but not yet sent in its socket (TCP_NOTSENT_LOWAT):
/// the sender waits in its own write for the window to open, instead of queueing a whole layer in
/// the kernel. Without a limit, on loopback, each window update the receiver sent made the
/// receiver's core transmit the sender's queued bytes and then take them in again: the receiving
/// core did both ends' TCP work (a fifth of its time in a profile), and a 4,096-token prompt's
/// transfer ran at 0.8-0.9x a plain socket copy. At one 512 KiB frame it still did in two runs of
/// four; at 64 or 128 KiB in none, 1.15-1.56x (`kv_bandwidth`, BENCHMARKS.md).
const UNSENT_LIMIT: usize = 128 * 1024;

/// How long a transfer may make no progress before it fails: a receiver that stopped (a hung or
/// stopped process, a cut link) fails the prefill within it, with a KV fault the gateway moves the
/// request on for, rather than at the prefill's 30 s deadline. A live receiver drains a frame in
/// well under a millisecond and acknowledges within a decode step.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(2);

/// Sets TCP_NOTSENT_LOWAT: at most `bytes` written but not yet sent stay in the socket.
#[cfg(target_os = "linux")]
fn limit_unsent(stream: &TcpStream, bytes: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a pointer to a live c_int, on a
    // descriptor that `stream` owns and keeps open for the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&raw const value).cast::<libc::c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn limit_unsent(_stream: &TcpStream, _bytes: usize) -> std::io::Result<()> {
    Ok(())
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

/// How one layer's payload (K of its blocks, then V) is cut into frames: as few as [`FRAME_BYTES`]
/// allows, of equal size (no runt frame at the end); each frame carries K then V of its blocks.
struct Frames {
    count: usize,
    blocks: usize,
    per: usize,
    block: usize,
}

impl Frames {
    fn new(geometry: &v1::BlockGeometry, blocks: usize, payload: &[u8]) -> Result<Self> {
        let block = block_bytes(geometry)
            .filter(|b| *b > 0)
            .ok_or_else(|| KvTransferError::Invalid(format!("geometry {geometry:?}")))?;
        if payload.len() != 2 * blocks * block {
            let msg = format!(
                "{} payload bytes for {blocks} blocks of {block}",
                payload.len()
            );
            return Err(KvTransferError::Invalid(msg));
        }
        let count = blocks.div_ceil((FRAME_BYTES / (2 * block)).max(1)).max(1);
        let per = blocks.div_ceil(count).max(1);
        Ok(Frames {
            count,
            blocks,
            per,
            block,
        })
    }

    /// Frame `f`'s block range (indexes into the layer's block list), its K bytes and its V bytes.
    fn part<'p>(
        &self,
        f: usize,
        payload: &'p [u8],
    ) -> (std::ops::Range<usize>, &'p [u8], &'p [u8]) {
        let (a, b) = (f * self.per, ((f + 1) * self.per).min(self.blocks));
        let (k, v) = payload.split_at(self.blocks * self.block);
        let bytes = a * self.block..b * self.block;
        (a..b, &k[bytes.clone()], &v[bytes])
    }

    fn checksum(&self, f: usize, payload: &[u8]) -> u32 {
        let (_, k, v) = self.part(f, payload);
        let mut crc = Crc32c::default();
        crc.update(k);
        crc.update(v);
        crc.value()
    }
}

/// The checksum of each frame that [`OutboundTransfer::send_layer`] would cut `payload` (one
/// layer's K and V of `blocks` blocks, as `KvPool::export_layer` lays them out) into. Computed by
/// whoever produced the payload, right after writing it, and handed to
/// [`OutboundTransfer::send_layer_summed`].
pub fn frame_checksums(
    geometry: &v1::BlockGeometry,
    blocks: usize,
    payload: &[u8],
) -> Result<Vec<u32>> {
    let frames = Frames::new(geometry, blocks, payload)?;
    Ok((0..frames.count)
        .map(|f| frames.checksum(f, payload))
        .collect())
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
        self.frame(layer, block_ids, payload, None, false).await
    }

    /// Sends the last frame (which may carry no blocks) and waits for the receiver's verdict.
    pub async fn finish(
        mut self,
        layer: u32,
        block_ids: &[u32],
        payload: &[u8],
    ) -> Result<v1::KvAck> {
        self.frame(layer, block_ids, payload, None, true).await?;
        self.wait_ack().await
    }

    /// [`Self::send_layer`] with the frames' checksums already computed by [`frame_checksums`]
    /// where the payload was produced, while its bytes were in cache: the transfer's path then
    /// only writes. Checksums that do not match the bytes make the receiver refuse the transfer.
    pub async fn send_layer_summed(
        &mut self,
        layer: u32,
        block_ids: &[u32],
        payload: &[u8],
        checksums: &[u32],
    ) -> Result<()> {
        self.frame(layer, block_ids, payload, Some(checksums), false)
            .await
    }

    /// [`Self::finish`] with checksums from [`frame_checksums`].
    pub async fn finish_summed(
        mut self,
        layer: u32,
        block_ids: &[u32],
        payload: &[u8],
        checksums: &[u32],
    ) -> Result<v1::KvAck> {
        self.frame(layer, block_ids, payload, Some(checksums), true)
            .await?;
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

    /// Sends a layer as frames of at most [`FRAME_BYTES`]: each frame's checksum pass (when the
    /// caller brought none) leaves its bytes in cache for the socket copy that follows.
    async fn frame(
        &mut self,
        layer: u32,
        block_ids: &[u32],
        payload: &[u8],
        checksums: Option<&[u32]>,
        last: bool,
    ) -> Result<()> {
        self.check_refused()?;
        let frames = Frames::new(&self.spec.geometry, block_ids.len(), payload)?;
        if let Some(sums) = checksums.filter(|s| s.len() != frames.count) {
            let msg = format!("{} checksums for {} frames", sums.len(), frames.count);
            return Err(KvTransferError::Invalid(msg));
        }
        for f in 0..frames.count {
            let (blocks, k, v) = frames.part(f, payload);
            let crc = checksums.map_or_else(|| frames.checksum(f, payload), |s| s[f]);
            let ids = &block_ids[blocks];
            self.frame_part(layer, ids, k, v, crc, last && f + 1 == frames.count)
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
        checksum: u32,
        last: bool,
    ) -> Result<()> {
        let h = &mut self.header;
        h.layer = layer;
        h.block_ids.clear();
        h.block_ids.extend_from_slice(block_ids);
        h.seq = self.seq;
        h.payload_len = (k.len() + v.len()) as u64;
        h.checksum = checksum;
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
        let written = match tokio::time::timeout(self.timeout, write_parts(wr, parts)).await {
            Ok(written) => written,
            Err(_) => Err(KvTransferError::Timeout(self.timeout)),
        };
        if let Err(e) = written {
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
