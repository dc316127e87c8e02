//! The decode worker's KV endpoint: accepts connections from prefill workers, validates every
//! frame or notice, hands the bytes to the [`KvSink`] and answers with `KvAck`s.
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tandem_proto::v1::{self, KvError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::progress::{FrameFacts, Transfers, Verdict};
use crate::wire::{put_message, read_message, read_preamble};
use crate::{Crc32c, KvSink, KvTransferError, Result, ShmRegion};

/// Which messages a KV listener takes from its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// `KvFrameHeader` and payload (the tcp transport).
    Tcp,
    /// `ShmWriteNotice` (the shm transport's control socket).
    Shm,
}

/// A refused frame's declared payload is skipped to stay in step with the stream; past this
/// length the stream is not worth trusting and the connection is closed instead.
const MAX_SKIP: u64 = 1 << 30;
/// Refused (reservation, attempt) pairs a connection remembers, to drop their later frames.
const REFUSED_MEMORY: usize = 256;

/// Serves the tcp transport on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    sink: Arc<dyn KvSink>,
) -> std::io::Result<()> {
    serve_with(listener, shutdown, sink, Wire::Tcp).await
}

/// Serves `wire` on `listener` until `shutdown` resolves; then stops accepting and closes every
/// connection (an unfinished transfer never commits, so its prefill worker sees the loss).
pub async fn serve_with(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    sink: Arc<dyn KvSink>,
    wire: Wire,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        sink,
        transfers: Mutex::new(Transfers::default()),
    });
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    conns.spawn(async move {
                        if let Err(e) = connection(stream, shared, wire).await {
                            debug!(%peer, error = %e, "kv connection closed");
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin.
                    warn!(error = %e, "kv accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.shutdown().await;
    Ok(())
}

struct Shared {
    sink: Arc<dyn KvSink>,
    transfers: Mutex<Transfers>,
}

impl Shared {
    fn transfers(&self) -> std::sync::MutexGuard<'_, Transfers> {
        // A panic while holding the lock leaves plain bookkeeping behind; keep serving.
        self.transfers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One connection's reused buffers and memory.
struct Conn {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    shared: Arc<Shared>,
    header: Vec<u8>,
    /// Payload buffer, grown to the largest frame seen and never shrunk or zeroed again.
    payload: Vec<u8>,
    out: Vec<u8>,
    refused: VecDeque<(u64, u32)>,
    /// This connection's own mapping of the sink's pool, when it has one: frames are read
    /// straight into their blocks (see [`KvSink::direct`]).
    direct: Option<ShmRegion>,
}

async fn connection(stream: tokio::net::TcpStream, shared: Arc<Shared>, wire: Wire) -> Result<()> {
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let sender = read_preamble(&mut rd).await?;
    debug!(%sender, "kv connection open");
    let direct = match wire {
        Wire::Tcp => shared.sink.direct(),
        Wire::Shm => None,
    };
    let mut c = Conn {
        rd,
        wr,
        shared,
        header: Vec::new(),
        payload: Vec::new(),
        out: Vec::new(),
        refused: VecDeque::new(),
        direct,
    };
    loop {
        let more = match wire {
            Wire::Tcp => c.frame().await?,
            Wire::Shm => c.notice().await?,
        };
        if !more {
            return Ok(());
        }
    }
}

/// Identity of the request a message belongs to, for acks.
struct Req<'a> {
    request_id: &'a str,
    reservation_id: u64,
    attempt: u32,
}

impl Conn {
    /// Handles one tcp frame; `false` at a clean end of stream.
    async fn frame(&mut self) -> Result<bool> {
        let Some(h) = read_message::<v1::KvFrameHeader, _>(&mut self.rd, &mut self.header).await?
        else {
            return Ok(false);
        };
        let req = Req {
            request_id: &h.request_id,
            reservation_id: h.reservation_id,
            attempt: h.attempt,
        };
        let facts = FrameFacts {
            reservation_id: h.reservation_id,
            attempt: h.attempt,
            layer: h.layer,
            block_ids: &h.block_ids,
            seq: h.seq,
            bytes: h.payload_len,
            dtype: h.dtype,
            geometry: h.geometry.as_ref(),
        };
        if !self.admit(&req, &facts).await? {
            self.skip(h.payload_len).await?;
            return Ok(true);
        }
        let read = if self.direct.is_some() {
            self.read_direct(&h).await
        } else {
            self.read_copied(&h).await
        };
        match read {
            Ok(crc) if crc == h.checksum => {}
            Ok(crc) => {
                let msg = format!("checksum {crc:#010x}, frame says {:#010x}", h.checksum);
                self.refuse(&req, KvError::Corrupt, &msg).await?;
                return Ok(true);
            }
            Err(Unread::Refused(error, msg)) => {
                self.refuse(&req, error, &msg).await?;
                self.skip(h.payload_len).await?;
                return Ok(true);
            }
            Err(Unread::Truncated(e)) => {
                self.shared.transfers().fail(h.reservation_id, h.attempt);
                let msg = format!("payload truncated: {e}");
                self.ack(&req, KvError::Corrupt, &msg).await?;
                return Err(KvTransferError::Protocol(msg));
            }
        }
        // A copied frame reaches the sink only now, its checksum checked.
        if self.direct.is_none() {
            let payload = &self.payload[..h.payload_len as usize];
            if let Err(e) = self
                .shared
                .sink
                .write(h.reservation_id, h.layer, &h.block_ids, payload)
            {
                self.refuse(&req, e, "the pool refused the write").await?;
                return Ok(true);
            }
        }
        if h.last {
            self.complete(&req).await?;
        }
        Ok(true)
    }

    /// An admitted frame's payload into this connection's buffer; returns its CRC-32C.
    async fn read_copied(&mut self, h: &v1::KvFrameHeader) -> std::result::Result<u32, Unread> {
        let len = h.payload_len as usize;
        if self.payload.len() < len {
            self.payload.resize(len, 0);
        }
        read_summing(&mut self.rd, &mut self.payload[..len])
            .await
            .map_err(Unread::Truncated)
    }

    /// An admitted frame's payload when the pool is mapped here: read straight into its blocks
    /// and summed as it lands ([`read_into`]); returns its CRC-32C. Bytes that fail the checksum
    /// stay in blocks of a reservation that is not committed (its attempt is refused), which a
    /// retry overwrites, as with the shm transport.
    async fn read_direct(&mut self, h: &v1::KvFrameHeader) -> std::result::Result<u32, Unread> {
        let sink = self.shared.sink.clone();
        if let Err(e) = sink.begin_direct(h.reservation_id, h.attempt) {
            let msg = "the reservation no longer takes frames".to_owned();
            return Err(Unread::Refused(e, msg));
        }
        // Ends the write however this future ends: done, failed, or dropped mid-read when the
        // server shuts down (a write left open would keep the blocks from ever changing hands).
        let _writing = Writing {
            sink,
            reservation_id: h.reservation_id,
        };
        let Some(region) = self.direct.as_mut() else {
            let msg = "no pool mapping for a direct frame".to_owned();
            return Err(Unread::Refused(KvError::BadBlock, msg));
        };
        let mut slices = region
            .block_slices_mut(h.layer as usize, &h.block_ids)
            .map_err(|e| Unread::Refused(KvError::BadBlock, e.to_string()))?;
        read_into(&mut self.rd, &mut slices)
            .await
            .map_err(Unread::Truncated)
    }

    /// Handles one shm notice; `false` at a clean end of stream.
    async fn notice(&mut self) -> Result<bool> {
        let Some(n) = read_message::<v1::ShmWriteNotice, _>(&mut self.rd, &mut self.header).await?
        else {
            return Ok(false);
        };
        let req = Req {
            request_id: &n.request_id,
            reservation_id: n.reservation_id,
            attempt: n.attempt,
        };
        let info = self.shared.sink.reservation(n.reservation_id);
        let geometry = info.as_ref().map(|i| i.geometry);
        let facts = FrameFacts {
            reservation_id: n.reservation_id,
            attempt: n.attempt,
            layer: n.layer,
            block_ids: &n.block_ids,
            seq: n.seq,
            bytes: n.bytes_written,
            // The pool's own geometry: the mapping was sized from the layout it published.
            dtype: geometry.map_or(0, |g| g.dtype),
            geometry: geometry.as_ref(),
        };
        if !self.admit(&req, &facts).await? {
            return Ok(true);
        }
        if n.checksum != 0 {
            let found = self
                .shared
                .sink
                .checksum(n.reservation_id, n.layer, &n.block_ids);
            if let Some(crc) = found.filter(|c| *c != n.checksum) {
                let msg = format!(
                    "pool holds checksum {crc:#010x}, notice says {:#010x}",
                    n.checksum
                );
                self.refuse(&req, KvError::Corrupt, &msg).await?;
                return Ok(true);
            }
        }
        if n.last {
            self.complete(&req).await?;
        }
        Ok(true)
    }

    /// Runs the header checks; `false` when the message's bytes are to be dropped.
    async fn admit(&mut self, req: &Req<'_>, facts: &FrameFacts<'_>) -> Result<bool> {
        if self.refused.contains(&(req.reservation_id, req.attempt)) {
            return Ok(false);
        }
        let info = self.shared.sink.reservation(req.reservation_id);
        let verdict = self
            .shared
            .transfers()
            .admit(facts, info.as_ref(), Instant::now());
        match verdict {
            Ok(Verdict::Accept) => Ok(true),
            Ok(Verdict::Discard) => Ok(false),
            Err((error, msg)) => {
                self.remember(req);
                self.ack(req, error, &msg).await?;
                Ok(false)
            }
        }
    }

    async fn complete(&mut self, req: &Req<'_>) -> Result<()> {
        let frames = self
            .shared
            .transfers()
            .frames(req.reservation_id, req.attempt);
        let finished = self
            .shared
            .transfers()
            .finish(req.reservation_id, req.attempt);
        let outcome = finished.and_then(|()| {
            let committed = self.shared.sink.complete(req.reservation_id, req.attempt);
            committed.map_err(|e| (e, "the pool refused the commit".to_owned()))
        });
        match outcome {
            Ok(()) => self.ack_frames(req, KvError::None, "", frames).await,
            Err((error, msg)) => {
                self.remember(req);
                self.ack(req, error, &msg).await
            }
        }
    }

    async fn refuse(&mut self, req: &Req<'_>, error: KvError, msg: &str) -> Result<()> {
        self.shared
            .transfers()
            .fail(req.reservation_id, req.attempt);
        self.remember(req);
        self.ack(req, error, msg).await
    }

    fn remember(&mut self, req: &Req<'_>) {
        if self.refused.len() == REFUSED_MEMORY {
            self.refused.pop_front();
        }
        self.refused.push_back((req.reservation_id, req.attempt));
    }

    async fn ack(&mut self, req: &Req<'_>, error: KvError, msg: &str) -> Result<()> {
        let frames = self
            .shared
            .transfers()
            .frames(req.reservation_id, req.attempt);
        self.ack_frames(req, error, msg, frames).await
    }

    async fn ack_frames(
        &mut self,
        req: &Req<'_>,
        error: KvError,
        msg: &str,
        frames_received: u64,
    ) -> Result<()> {
        if error != KvError::None {
            debug!(request_id = req.request_id, ?error, msg, "kv refused");
        }
        let ack = v1::KvAck {
            request_id: req.request_id.to_owned(),
            reservation_id: req.reservation_id,
            frames_received,
            error: error.into(),
            message: msg.to_owned(),
            attempt: req.attempt,
        };
        self.out.clear();
        put_message(&mut self.out, &ack);
        self.wr.write_all(&self.out).await?;
        Ok(())
    }

    /// Reads and drops a refused frame's payload.
    async fn skip(&mut self, len: u64) -> Result<()> {
        if len > MAX_SKIP {
            return Err(KvTransferError::Protocol(format!(
                "refused frame declares {len} bytes"
            )));
        }
        let mut sink = tokio::io::sink();
        let copied = tokio::io::copy(&mut (&mut self.rd).take(len), &mut sink).await?;
        if copied < len {
            return Err(KvTransferError::Protocol(
                "stream ended inside a refused frame".into(),
            ));
        }
        Ok(())
    }
}

/// Why a frame's payload was not read whole.
enum Unread {
    /// Refused before its bytes were read: they are still on the wire, to be skipped.
    Refused(KvError, String),
    /// The stream failed or ended inside the payload.
    Truncated(std::io::Error),
}

/// A frame being read straight into a reservation's blocks; dropping it tells the sink.
struct Writing {
    sink: Arc<dyn KvSink>,
    reservation_id: u64,
}

impl Drop for Writing {
    fn drop(&mut self) {
        self.sink.end_direct(self.reservation_id);
    }
}

/// Fills `slices` in order from `rd` and returns their CRC-32C: first what the buffered reader
/// already holds (the start of the frame, read along with its header), then straight from the
/// socket with vectored reads, so that the bytes are copied once, from the kernel into the pool.
/// Each read takes at most [`DIRECT_READ`] bytes and is summed right after it, while in cache.
async fn read_into(
    rd: &mut BufReader<OwnedReadHalf>,
    slices: &mut [&mut [u8]],
) -> std::io::Result<u32> {
    use tokio::io::AsyncBufRead;
    let mut crc = Crc32c::default();
    // Position: slice `i`, byte `off` within it. Sums the `n` bytes from there and moves past.
    let (mut i, mut off) = (0, 0);
    let mut advance = |i: &mut usize, off: &mut usize, mut n: usize, slices: &[&mut [u8]]| {
        while n > 0 && *i < slices.len() {
            let take = n.min(slices[*i].len() - *off);
            crc.update(&slices[*i][*off..*off + take]);
            n -= take;
            *off += take;
            if *off == slices[*i].len() {
                *i += 1;
                *off = 0;
            }
        }
    };
    let buffered = rd.buffer();
    let mut taken = 0;
    while taken < buffered.len() && i < slices.len() {
        let dst = &mut slices[i][off..];
        let n = dst.len().min(buffered.len() - taken);
        dst[..n].copy_from_slice(&buffered[taken..taken + n]);
        taken += n;
        advance(&mut i, &mut off, n, slices);
    }
    std::pin::Pin::new(&mut *rd).consume(taken);
    let inner = rd.get_ref();
    while i < slices.len() {
        let n = {
            let (first, rest) = slices[i..].split_at_mut(1);
            let first = &mut first[0][off..];
            let mut room = DIRECT_READ.saturating_sub(first.len());
            let mut iov = vec![std::io::IoSliceMut::new(first)];
            for s in rest {
                if room == 0 {
                    break;
                }
                let len = room.min(s.len());
                room -= len;
                let s = &mut s[..len];
                iov.push(std::io::IoSliceMut::new(s));
            }
            inner.readable().await?;
            match inner.try_read_vectored(&mut iov) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            }
        };
        advance(&mut i, &mut off, n, slices);
    }
    Ok(crc.value())
}

/// Most bytes one vectored read takes before they are summed: small enough that they are still in
/// the core's cache when summed (a whole 512 KiB frame read at once was summed at a third of the
/// in-cache rate on a Zen 5 core), large enough that system calls stay few.
const DIRECT_READ: usize = 128 * 1024;

/// Fills `buf` from `rd` and returns its CRC-32C, summing each piece right after it arrives, while
/// it is still in cache, rather than in a second pass over the whole frame.
async fn read_summing(rd: &mut BufReader<OwnedReadHalf>, buf: &mut [u8]) -> std::io::Result<u32> {
    const PIECE: usize = 256 * 1024;
    let mut crc = Crc32c::default();
    for piece in buf.chunks_mut(PIECE) {
        rd.read_exact(piece).await?;
        crc.update(piece);
    }
    Ok(crc.value())
}
