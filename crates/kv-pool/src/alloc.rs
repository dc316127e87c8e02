use crate::{PoolError, Result};

/// Hands out block ids from a free list, with reference counts so that blocks can later be shared
/// (a cached prefix) and are freed only when the last holder lets go.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    refs: Vec<u16>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        // Pop from the end: block 0 is handed out first, which keeps tests and traces readable.
        BlockAllocator {
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
        }
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Takes `n` blocks, all or none.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.free.len() {
            return Err(PoolError::OutOfBlocks {
                needed: n,
                free: self.free.len(),
            });
        }
        let ids = self.free.split_off(self.free.len() - n);
        let ids: Vec<u32> = ids.into_iter().rev().collect();
        for &id in &ids {
            self.refs[id as usize] = 1;
        }
        Ok(ids)
    }

    /// Adds a holder to blocks that are already allocated.
    pub fn retain(&mut self, ids: &[u32]) -> Result<()> {
        self.check_allocated(ids)?;
        for &id in ids {
            self.refs[id as usize] = self.refs[id as usize].saturating_add(1);
        }
        Ok(())
    }

    /// Drops one holder of each block; a block whose last holder goes returns to the free list.
    pub fn release(&mut self, ids: &[u32]) -> Result<()> {
        self.check_allocated(ids)?;
        for &id in ids {
            let r = &mut self.refs[id as usize];
            *r -= 1;
            if *r == 0 {
                self.free.push(id);
            }
        }
        Ok(())
    }

    /// Every one of `ids` is allocated (checked before a change, so that a bad id changes nothing).
    fn check_allocated(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| self.ref_count(id) == 0) {
            Some(&id) => Err(PoolError::NotAllocated(id)),
            None => Ok(()),
        }
    }

    pub fn ref_count(&self, id: u32) -> u16 {
        self.refs.get(id as usize).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_distinct_blocks_until_exhausted() {
        let mut a = BlockAllocator::new(4);
        let x = a.allocate(3).expect("3 of 4");
        assert_eq!(x, vec![0, 1, 2]);
        let err = a.allocate(2).expect_err("only 1 left");
        assert!(matches!(err, PoolError::OutOfBlocks { needed: 2, free: 1 }));
        assert_eq!(a.free_count(), 1, "a failed allocation takes nothing");
        assert_eq!(a.allocate(1).expect("last"), vec![3]);
        assert_eq!(a.free_count(), 0);
    }

    #[test]
    fn freed_blocks_are_reused() {
        let mut a = BlockAllocator::new(2);
        let x = a.allocate(2).expect("all");
        a.release(&x[..1]).expect("release");
        assert_eq!(a.allocate(1).expect("reuse"), vec![0]);
    }

    #[test]
    fn shared_blocks_free_on_last_release() {
        let mut a = BlockAllocator::new(2);
        let x = a.allocate(1).expect("one");
        a.retain(&x).expect("retain");
        assert_eq!(a.ref_count(x[0]), 2);
        a.release(&x).expect("first");
        assert_eq!(a.free_count(), 1);
        a.release(&x).expect("second");
        assert_eq!(a.free_count(), 2);
    }

    #[test]
    fn double_free_and_unknown_ids_are_errors_not_panics() {
        let mut a = BlockAllocator::new(2);
        let x = a.allocate(1).expect("one");
        a.release(&x).expect("release");
        assert!(a.release(&x).is_err());
        assert!(a.release(&[99]).is_err());
        assert!(a.retain(&[1]).is_err());
        assert_eq!(a.free_count(), 2);
    }
}
