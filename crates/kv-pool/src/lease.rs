//! Blocks as values: a [`BlockLease`] holds its blocks until it is dropped, whoever drops it and
//! whenever, so that no list of who holds what has to be kept right by hand.
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::{BlockAllocator, PoolError, Result};

/// An allocator that several owners draw from at any time (a decode worker's reservations while
/// its engine steps). Cloning shares it.
#[derive(Debug, Clone)]
pub struct BlockSource(Arc<Mutex<BlockAllocator>>);

impl BlockSource {
    pub fn new(num_blocks: usize) -> Self {
        BlockSource(Arc::new(Mutex::new(BlockAllocator::new(num_blocks))))
    }

    /// Every holder keeps the lock for a few list operations, none of which can leave the
    /// allocator half changed, so a holder that panicked left it consistent.
    fn lock(&self) -> MutexGuard<'_, BlockAllocator> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn free_count(&self) -> usize {
        self.lock().free_count()
    }

    pub fn total(&self) -> usize {
        self.lock().total()
    }

    /// Holders of block `id` (0 when free).
    pub fn ref_count(&self, id: u32) -> u16 {
        self.lock().ref_count(id)
    }

    /// Takes `n` blocks, all or none, leaving at least `keep_free` free for others (running
    /// sequences that must still grow).
    pub fn lease(&self, n: usize, keep_free: usize) -> Result<BlockLease> {
        let mut alloc = self.lock();
        let free = alloc.free_count();
        if n + keep_free > free {
            return Err(PoolError::OutOfBlocks {
                needed: n,
                free: free.saturating_sub(keep_free),
            });
        }
        let ids = alloc.allocate(n)?;
        drop(alloc);
        Ok(BlockLease {
            source: self.clone(),
            ids,
        })
    }

    /// A lease of no blocks yet, to grow.
    pub fn empty(&self) -> BlockLease {
        BlockLease {
            source: self.clone(),
            ids: Vec::new(),
        }
    }
}

/// Blocks held until this value is dropped. Another hold on the same blocks ([`BlockLease::share`])
/// keeps them from the free list until it is dropped too.
#[derive(Debug)]
pub struct BlockLease {
    source: BlockSource,
    ids: Vec<u32>,
}

impl BlockLease {
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Whether it draws from `source`.
    pub fn is_from(&self, source: &BlockSource) -> bool {
        Arc::ptr_eq(&self.source.0, &source.0)
    }

    /// Holds at least `n` blocks, taking what is missing all or none.
    pub fn grow_to(&mut self, n: usize) -> Result<()> {
        if n > self.ids.len() {
            let more = self.source.lock().allocate(n - self.ids.len())?;
            self.ids.extend(more);
        }
        Ok(())
    }

    /// Gives back every block past the first `n`.
    pub fn truncate(&mut self, n: usize) {
        if n < self.ids.len() {
            let tail = self.ids.split_off(n);
            release(&self.source, &tail);
        }
    }

    /// Another hold on the same blocks, for someone who must keep them from changing hands
    /// while it works on them (a KV frame being read into them) even if this lease goes first.
    pub fn share(&self) -> BlockLease {
        let shared = self.source.lock().retain(&self.ids);
        // A lease's blocks are allocated for as long as it lives.
        debug_assert!(shared.is_ok(), "{shared:?}");
        BlockLease {
            source: self.source.clone(),
            ids: self.ids.clone(),
        }
    }
}

impl Drop for BlockLease {
    fn drop(&mut self) {
        release(&self.source, &self.ids);
    }
}

fn release(source: &BlockSource, ids: &[u32]) {
    if ids.is_empty() {
        return;
    }
    let released = source.lock().release(ids);
    // Only a lease gives blocks back, and only its own: they are allocated.
    debug_assert!(released.is_ok(), "{released:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_gives_its_blocks_back_when_dropped() {
        let s = BlockSource::new(4);
        let a = s.lease(3, 0).unwrap();
        assert_eq!((a.ids(), s.free_count()), (&[0, 1, 2][..], 1));
        assert_eq!(
            s.lease(2, 0).unwrap_err(),
            PoolError::OutOfBlocks { needed: 2, free: 1 }
        );
        assert_eq!(s.free_count(), 1, "a refusal takes nothing");
        drop(a);
        assert_eq!(s.free_count(), 4);
    }

    #[test]
    fn keep_free_is_left_to_others() {
        let s = BlockSource::new(4);
        assert_eq!(
            s.lease(3, 2).unwrap_err(),
            PoolError::OutOfBlocks { needed: 3, free: 2 }
        );
        let a = s.lease(2, 2).unwrap();
        assert_eq!((a.len(), s.free_count()), (2, 2));
    }

    #[test]
    fn shared_blocks_go_back_when_the_last_holder_drops_whichever_it_is() {
        for first_goes_first in [true, false] {
            let s = BlockSource::new(4);
            let a = s.lease(2, 0).unwrap();
            let b = a.share();
            assert_eq!((b.ids(), s.ref_count(0), s.free_count()), (a.ids(), 2, 2));
            let (first, last) = if first_goes_first { (a, b) } else { (b, a) };
            drop(first);
            assert_eq!((s.free_count(), s.ref_count(0)), (2, 1), "still held");
            drop(last);
            assert_eq!(
                (s.free_count(), s.ref_count(0)),
                (4, 0),
                "back exactly once"
            );
            // Nothing was released twice: all four can be leased again, and no more.
            let all = s.lease(4, 0).unwrap();
            assert!(s.lease(1, 0).is_err());
            drop(all);
        }
    }

    #[test]
    fn a_lease_grows_all_or_none_and_truncates() {
        let s = BlockSource::new(4);
        let mut a = s.empty();
        assert!(a.is_empty() && a.is_from(&s) && !a.is_from(&BlockSource::new(1)));
        a.grow_to(2).unwrap();
        a.grow_to(1).unwrap();
        assert_eq!(a.len(), 2, "never shrinks by growing");
        assert!(a.grow_to(5).is_err());
        assert_eq!(
            (a.len(), s.free_count()),
            (2, 2),
            "a failed growth takes nothing"
        );
        a.grow_to(4).unwrap();
        a.truncate(1);
        assert_eq!((a.ids(), s.free_count()), (&[0][..], 3));
        drop(a);
        assert_eq!(s.free_count(), 4);
    }
}
