//! Length-delimited protobuf messages on a KV connection (see `proto/tandem/v1/kv.proto`).
use prost::Message;
use tandem_proto::{KV_MAGIC, KV_MAX_HEADER_LEN, KV_WIRE_VERSION, v1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{KvTransferError, Result};

/// Appends `msg` as a u32 little-endian length and its encoding to `buf`.
pub(crate) fn put_message(buf: &mut Vec<u8>, msg: &impl Message) {
    let len = msg.encoded_len();
    buf.reserve(4 + len);
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    // Encoding into a Vec cannot run out of room: it grows.
    let _ = msg.encode(buf);
}

/// Reads one message into `buf` (reused), or `None` at a clean end of stream between messages.
pub(crate) async fn read_message<M, R>(r: &mut R, buf: &mut Vec<u8>) -> Result<Option<M>>
where
    M: Message + Default,
    R: AsyncRead + Unpin,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len);
    if len > KV_MAX_HEADER_LEN {
        return Err(KvTransferError::Protocol(format!(
            "message of {len} bytes over the limit"
        )));
    }
    buf.clear();
    buf.resize(len as usize, 0);
    r.read_exact(buf).await?;
    M::decode(buf.as_slice())
        .map(Some)
        .map_err(|e| KvTransferError::Protocol(format!("undecodable message: {e}")))
}

/// Writes the magic and the hello that open a KV connection.
pub(crate) async fn write_preamble<W: AsyncWrite + Unpin>(
    w: &mut W,
    worker_id: &str,
) -> Result<()> {
    let mut buf = KV_MAGIC.to_vec();
    let hello = v1::KvHello {
        version: KV_WIRE_VERSION,
        sender_worker_id: worker_id.to_owned(),
    };
    put_message(&mut buf, &hello);
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads and checks the magic and the hello; returns the sender's worker id.
pub(crate) async fn read_preamble<R: AsyncRead + Unpin>(r: &mut R) -> Result<String> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).await?;
    if magic != KV_MAGIC {
        return Err(KvTransferError::Protocol(format!("bad magic {magic:?}")));
    }
    let mut buf = Vec::new();
    let hello: v1::KvHello = read_message(r, &mut buf)
        .await?
        .ok_or_else(|| KvTransferError::Protocol("closed before the hello".into()))?;
    if hello.version != KV_WIRE_VERSION {
        return Err(KvTransferError::Protocol(format!(
            "wire version {}",
            hello.version
        )));
    }
    Ok(hello.sender_worker_id)
}

/// Writes `parts` in order with vectored writes: one syscall for a small frame, and no copy of the
/// payload into a staging buffer for a large one.
pub(crate) async fn write_parts<W: AsyncWrite + Unpin>(w: &mut W, parts: [&[u8]; 3]) -> Result<()> {
    let mut parts = parts;
    let mut i = 0;
    while i < parts.len() {
        let bufs =
            [0, 1, 2].map(|j| std::io::IoSlice::new(parts.get(i + j).copied().unwrap_or(&[])));
        let mut n = w.write_vectored(&bufs).await?;
        if n == 0 && parts[i..].iter().any(|p| !p.is_empty()) {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero).into());
        }
        while i < parts.len() && (n > 0 || parts[i].is_empty()) {
            let take = n.min(parts[i].len());
            parts[i] = &parts[i][take..];
            n -= take;
            if parts[i].is_empty() {
                i += 1;
            }
        }
    }
    Ok(())
}

/// Bytes of one element of `dtype`, or `None` for an unknown or unset type.
pub fn dtype_size(dtype: i32) -> Option<usize> {
    match v1::KvDtype::try_from(dtype).ok()? {
        v1::KvDtype::F32 => Some(4),
        v1::KvDtype::F16 | v1::KvDtype::Bf16 => Some(2),
        v1::KvDtype::Unspecified => None,
    }
}

/// Bytes of one block of one layer's K (the same for V) in geometry `g`.
pub fn block_bytes(g: &v1::BlockGeometry) -> Option<usize> {
    let elems = g.block_tokens as usize * g.kv_heads as usize * g.head_dim as usize;
    Some(elems * dtype_size(g.dtype)?)
}
