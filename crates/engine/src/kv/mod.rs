//! The paged KV cache: a pool of fixed-size blocks per layer, and the allocator that hands them out.
mod alloc;
mod pool;

pub use alloc::BlockAllocator;
pub use pool::{KvGeometry, KvMemory, KvPool};

/// Tokens per KV block: the unit of allocation and of transfer.
pub const BLOCK_SIZE: usize = 16;
