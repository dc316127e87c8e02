/// Why the pool or its allocator refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("out of KV blocks: {needed} needed, {free} free")]
    OutOfBlocks { needed: usize, free: usize },
    #[error("block {0} is not allocated")]
    NotAllocated(u32),
    /// Bytes that do not fit the blocks, layer or geometry they are meant for.
    #[error("KV import: {0}")]
    Import(String),
    /// Memory of another size than the geometry needs.
    #[error("KV memory: {0}")]
    Memory(String),
}

pub type Result<T, E = PoolError> = std::result::Result<T, E>;
