//! KV cache transfer from prefill workers to decode workers.
//!
//! Two transports move one request's KV, layer by layer, into the blocks a decode worker reserved:
//!
//! - **tcp** ([`KvSender`] to [`serve`]): a framed stream on a dedicated, pooled connection per
//!   destination. Each frame is a `KvFrameHeader` and its raw payload (K of the listed blocks, then
//!   V), checked with CRC-32C. The receiver validates every frame (reservation, lease, block ids,
//!   geometry, length, checksum, sequence, duplicates, attempt) before the bytes reach the
//!   [`KvSink`], and answers with one `KvAck` per request: after the last frame, or at once on the
//!   first refused frame (the rest of that attempt's frames are then dropped silently). A layer of
//!   a long prompt is cut into frames of at most [`FRAME_BYTES`], so that each frame's bytes stay
//!   in cache between its checksum and its copy (sender), and between the socket, the checksum and
//!   the pool (receiver).
//!   When the sink's pool lives in shared memory ([`KvSink::direct`]; a decode worker's tcp pool
//!   is an anonymous [`ShmRegion`]), each connection maps it again and reads a frame's payload
//!   straight from the socket into the frame's blocks, summing it as it lands: one copy, from the
//!   kernel into the pool. The sink keeps those blocks from changing hands while a frame is being
//!   read into them ([`KvSink::begin_direct`], [`KvSink::end_direct`]). The sender keeps at most
//!   128 KiB unsent in its socket (TCP_NOTSENT_LOWAT), so that on loopback the receiving core does
//!   not end up transmitting the sender's queued bytes too.
//! - **shm** ([`ShmRegion`]): the decode worker's pool lives in a file under `/dev/shm` that the
//!   prefill worker maps and writes into directly; only a `ShmWriteNotice` per layer crosses the
//!   control socket ([`serve_with`] with [`Wire::Shm`], [`OutboundTransfer::notify_shm`]), and the
//!   receiver runs the same checks on the notices.
//!
//! # Why sharing the pool's memory across processes is sound in practice
//!
//! Two processes map the same bytes, and Rust cannot see the other one. The protocol makes the
//! accesses disjoint in time and space: a prefill worker writes only the blocks of a reservation the
//! decode worker granted it, and the decode worker never reads or writes a reserved block until the
//! transfer's last notice has been checked and the sequence committed; blocks outside a live
//! reservation are never written by a prefill worker. That holds for a writer that is late too (paused
//! past its lease, or an attempt the gateway retried elsewhere): every copy claims its block in the
//! pool file's fence table first ([`fence`]), and the decode worker seals a reservation's blocks
//! before the engine takes them and revokes them when it ends unfilled, keeping a block out of the
//! allocator while a copy into it is in flight. The writes become visible to the decode worker through the
//! socket round trip that carries the notice (a system call on both sides orders the memory
//! accesses). A misbehaving prefill worker can at worst put wrong numbers into blocks it was
//! granted; it cannot make the decode worker read torn memory that Rust relies on (f32 has no
//! invalid bit patterns).
//!
//! A tcp connection that reads straight into the pool is held to the same rules inside the decode
//! worker's process: it writes only blocks of a reservation that still takes frames of its
//! attempt; the blocks go back to the allocator only after its read ends, even if the reservation
//! is released meanwhile; a commit is refused while such a read is in progress (the prefill is
//! retried); and its writes reach the engine through the reservation table's lock, which the end
//! of the read and the commit both take.
#![deny(unsafe_code)]

mod checksum;
mod error;
pub mod fence;
mod progress;
mod receiver;
mod sender;
mod shm;
mod wire;

use std::sync::Arc;
use std::time::Instant;

pub use checksum::{Crc32c, crc32c};
pub use error::{KvTransferError, Result};
pub use fence::Writer;
pub use receiver::{Wire, serve, serve_with};
pub use sender::{
    FRAME_BYTES, KvSender, OutboundTransfer, STALL_TIMEOUT, TransferSpec, frame_checksums,
};
pub use shm::{ShmRegion, pool_checksum, shm_layout};
pub use tandem_proto::v1::{BlockGeometry, KvAck, KvDtype, KvError, ShmPoolLayout};
pub use wire::{block_bytes, dtype_size};

use tandem_kv_pool::KvGeometry;

/// What a decode worker knows about one reservation, as the receiver needs it.
#[derive(Debug, Clone)]
pub struct ReservationInfo {
    /// Reserved block ids; every (layer, block) of them must arrive once before commit.
    pub block_ids: Arc<[u32]>,
    /// The pool's block shape and element type; `num_layers` is the layers to expect.
    pub geometry: BlockGeometry,
    /// Lowest prefill attempt still accepted (frames of older attempts are refused).
    pub attempt: u32,
    /// When the lease lapses; frames after it are refused as for an unknown reservation.
    pub expires: Instant,
}

/// The decode worker's side of the receiver: where validated KV goes.
///
/// Methods are called from the receiver's connection tasks; they must be quick (a lookup, a copy).
pub trait KvSink: Send + Sync + 'static {
    /// The live reservation with this id, or `None` if unknown or released.
    fn reservation(&self, reservation_id: u64) -> Option<ReservationInfo>;
    /// Stores one layer's K and V of `block_ids` (payload laid out as `KvPool::export_layer`).
    /// Called only after every check, including the checksum, passed.
    fn write(
        &self,
        reservation_id: u64,
        layer: u32,
        block_ids: &[u32],
        payload: &[u8],
    ) -> Result<(), KvError>;
    /// CRC-32C of what lies in the pool for `block_ids` of `layer` (K of each block in list order,
    /// then V), for the shm transport's notices that carry a checksum. `None` skips the check.
    fn checksum(&self, _reservation_id: u64, _layer: u32, _block_ids: &[u32]) -> Option<u32> {
        None
    }
    /// Every (layer, block) of the reservation arrived intact for `attempt`: commit it.
    fn complete(&self, reservation_id: u64, attempt: u32) -> Result<(), KvError>;

    /// A mapping of the pool's memory for one tcp connection to read frames straight into (the
    /// pool in a [`ShmRegion`], this its [`ShmRegion::remap`]), or `None` to have each frame's
    /// bytes handed to [`KvSink::write`]. Asked once per connection.
    fn direct(&self) -> Option<ShmRegion> {
        None
    }

    /// Before a frame is read straight into `block_ids`: whether the reservation still takes
    /// frames of `attempt`; if so, its blocks must not change hands (be released to another
    /// reservation) until the matching [`KvSink::end_direct`], which the receiver always calls.
    fn begin_direct(&self, reservation_id: u64, attempt: u32) -> Result<(), KvError> {
        let _ = (reservation_id, attempt);
        Ok(())
    }

    /// The frame's bytes are in place (or the read failed): the blocks may change hands again.
    fn end_direct(&self, reservation_id: u64) {
        let _ = reservation_id;
    }
}

/// The wire's view of an engine pool's block shape (f32 elements).
pub fn block_geometry(g: &KvGeometry) -> BlockGeometry {
    BlockGeometry {
        block_tokens: g.block_size as u32,
        num_layers: g.layers as u32,
        kv_heads: g.kv_heads as u32,
        head_dim: g.head_dim as u32,
        dtype: KvDtype::F32.into(),
    }
}
