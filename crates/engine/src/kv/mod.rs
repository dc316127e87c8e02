//! The paged KV cache: a pool of fixed-size blocks per layer and the allocator that hands them
//! out, from `tandem-kv-pool` (which the KV transports share without the engine).
pub use tandem_kv_pool::{
    BLOCK_SIZE, BlockAllocator, BlockLease, BlockSource, KvGeometry, KvMemory, KvPool, PoolError,
};
