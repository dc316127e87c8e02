//! The paged KV cache's memory, apart from any model or network: the shape of a pool of
//! fixed-size blocks per layer ([`KvGeometry`]), the pool over some memory ([`KvPool`]), and the
//! allocator ([`BlockSource`]) whose grants ([`BlockLease`]) give their blocks back when dropped.
//!
//! The engine computes into a pool; the KV transports write into one another process or thread
//! reserved; a decode worker's reservations, frames being written and running sequences each hold
//! a lease on the blocks they use, so that a block is free exactly when nothing holds it.
mod alloc;
mod error;
mod lease;
mod pool;

pub use alloc::BlockAllocator;
pub use error::{PoolError, Result};
pub use lease::{BlockLease, BlockSource};
pub use pool::{KvGeometry, KvMemory, KvPool};

/// Tokens per KV block: the unit of allocation and of transfer.
pub const BLOCK_SIZE: usize = 16;
