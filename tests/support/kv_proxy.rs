//! A KV link that can damage what crosses it: a proxy in front of a decode worker's KV endpoint
//! (the worker advertises it with `--kv-advertise`) that reads the prefill side's frames and, while
//! told to, flips one byte in the middle of each frame's payload, as a bad NIC or cable would.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prost::Message;
use tandem_proto::{KV_MAGIC, v1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct KvProxy {
    /// Where prefill workers dial.
    pub addr: String,
    /// Where it forwards to.
    to: Arc<Mutex<String>>,
    corrupt: Arc<AtomicBool>,
    corrupted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl KvProxy {
    /// Listens on `ip` (any port) and forwards each connection to `to` (which
    /// [`KvProxy::forward_to`] may set later, once the worker behind it is listening).
    pub async fn start(ip: &str, to: String) -> KvProxy {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let corrupt = Arc::new(AtomicBool::new(false));
        let corrupted = Arc::new(AtomicUsize::new(0));
        let target = Arc::new(Mutex::new(to));
        let (c, n, t) = (corrupt.clone(), corrupted.clone(), target.clone());
        let task = tokio::spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let to = t.lock().unwrap().clone();
                let (c, n) = (c.clone(), n.clone());
                tokio::spawn(async move {
                    if let Ok(up) = TcpStream::connect(&to).await {
                        let _ = (up.set_nodelay(true), down.set_nodelay(true));
                        let (mut down_rd, mut down_wr) = down.into_split();
                        let (mut up_rd, mut up_wr) = up.into_split();
                        let acks = tokio::spawn(async move {
                            let _ = tokio::io::copy(&mut up_rd, &mut down_wr).await;
                        });
                        let _ = frames(&mut down_rd, &mut up_wr, &c, &n).await;
                        let _ = up_wr.shutdown().await;
                        let _ = acks.await;
                    }
                });
            }
        });
        KvProxy {
            addr,
            to: target,
            corrupt,
            corrupted,
            task,
        }
    }

    /// Forwards connections made from now on to `to`.
    pub fn forward_to(&self, to: String) {
        *self.to.lock().unwrap() = to;
    }

    /// Damages every frame from now on (`true`), or none.
    pub fn corrupt(&self, on: bool) {
        self.corrupt.store(on, Ordering::SeqCst);
    }

    /// Frames damaged so far.
    pub fn corrupted(&self) -> usize {
        self.corrupted.load(Ordering::SeqCst)
    }
}

impl Drop for KvProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies a KV connection's sending side (magic, hello, then frame headers each followed by its
/// payload; see proto/tandem/v1/kv.proto), damaging payloads while `corrupt` is set.
async fn frames(
    rd: &mut (impl AsyncRead + Unpin),
    wr: &mut (impl AsyncWrite + Unpin),
    corrupt: &AtomicBool,
    corrupted: &AtomicUsize,
) -> std::io::Result<()> {
    let mut magic = [0u8; KV_MAGIC.len()];
    rd.read_exact(&mut magic).await?;
    wr.write_all(&magic).await?;
    let _hello = message(rd, wr).await?;
    let mut payload = Vec::new();
    loop {
        let header = message(rd, wr).await?;
        let h = v1::KvFrameHeader::decode(header.as_slice()).map_err(std::io::Error::other)?;
        payload.resize(h.payload_len as usize, 0);
        rd.read_exact(&mut payload).await?;
        if corrupt.load(Ordering::SeqCst) && !payload.is_empty() {
            let mid = payload.len() / 2;
            payload[mid] ^= 0x5a;
            corrupted.fetch_add(1, Ordering::SeqCst);
        }
        wr.write_all(&payload).await?;
    }
}

/// Copies one length-delimited message and returns its bytes.
async fn message(
    rd: &mut (impl AsyncRead + Unpin),
    wr: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    rd.read_exact(&mut len).await?;
    let mut buf = vec![0u8; u32::from_le_bytes(len) as usize];
    rd.read_exact(&mut buf).await?;
    wr.write_all(&len).await?;
    wr.write_all(&buf).await?;
    Ok(buf)
}
