use crate::{BLOCK_SIZE, PoolError, Result};

/// The shape of a KV pool. Per layer, K then V, each `[num_blocks][block_size][kv_heads][head_dim]`
/// of f32: one block of one layer's K (or V) is contiguous, which makes a block the unit of transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvGeometry {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub num_blocks: usize,
}

impl KvGeometry {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, num_blocks: usize) -> Self {
        KvGeometry {
            layers,
            kv_heads,
            head_dim,
            block_size: BLOCK_SIZE,
            num_blocks,
        }
    }
    /// Floats in one block of one layer's K (the same for V).
    pub fn block_floats(&self) -> usize {
        self.block_size * self.kv_heads * self.head_dim
    }
    fn half_layer_floats(&self) -> usize {
        self.num_blocks * self.block_floats()
    }
    pub fn total_floats(&self) -> usize {
        self.layers * 2 * self.half_layer_floats()
    }
    /// KV bytes one token occupies across all layers.
    pub fn bytes_per_token(&self) -> usize {
        self.layers * 2 * self.kv_heads * self.head_dim * 4
    }
    /// Bytes of K and V of `blocks` blocks of one layer.
    pub fn layer_bytes(&self, blocks: usize) -> usize {
        2 * blocks * self.block_floats() * 4
    }
}

/// Memory that backs a pool: the heap by default; a shared-memory mapping when a prefill worker on
/// the same host writes into a decode worker's blocks directly.
pub trait KvMemory: Send + Sync + std::fmt::Debug {
    fn floats(&self) -> &[f32];
    fn floats_mut(&mut self) -> &mut [f32];
}

impl KvMemory for Vec<f32> {
    fn floats(&self) -> &[f32] {
        self
    }
    fn floats_mut(&mut self) -> &mut [f32] {
        self
    }
}

#[derive(Debug)]
pub struct KvPool {
    geom: KvGeometry,
    mem: Box<dyn KvMemory>,
}

impl KvPool {
    pub fn new(geom: KvGeometry) -> Self {
        KvPool {
            geom,
            mem: Box::new(vec![0f32; geom.total_floats()]),
        }
    }

    /// A pool over caller-provided memory, which must hold exactly `geom.total_floats()` floats.
    pub fn with_memory(geom: KvGeometry, mem: Box<dyn KvMemory>) -> Result<Self> {
        if mem.floats().len() != geom.total_floats() {
            return Err(PoolError::Memory(format!(
                "KV memory holds {} floats, the geometry needs {}",
                mem.floats().len(),
                geom.total_floats()
            )));
        }
        Ok(KvPool { geom, mem })
    }

    pub fn geometry(&self) -> &KvGeometry {
        &self.geom
    }

    fn offsets(&self, layer: usize) -> (usize, usize) {
        let half = self.geom.half_layer_floats();
        let k = layer * 2 * half;
        (k, k + half)
    }

    /// One layer's K and V regions.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        let half = self.geom.half_layer_floats();
        let (k, v) = self.offsets(layer);
        let m = self.mem.floats();
        (&m[k..k + half], &m[v..v + half])
    }

    pub fn layer_mut(&mut self, layer: usize) -> (&mut [f32], &mut [f32]) {
        let half = self.geom.half_layer_floats();
        let (k, _) = self.offsets(layer);
        let region = &mut self.mem.floats_mut()[k..k + 2 * half];
        region.split_at_mut(half)
    }

    /// One layer's K and V regions to write, and the next layer's (if any) to read: the `sim`
    /// engine prefetches the next layer's slots while it writes this one.
    #[allow(clippy::type_complexity)]
    pub fn layer_mut_and_next(
        &mut self,
        layer: usize,
    ) -> ((&mut [f32], &mut [f32]), Option<(&[f32], &[f32])>) {
        let half = self.geom.half_layer_floats();
        let (k, _) = self.offsets(layer);
        let next = layer + 1 < self.geom.layers;
        let end = k + if next { 4 * half } else { 2 * half };
        let (this, rest) = self.mem.floats_mut()[k..end].split_at_mut(2 * half);
        let rest: &[f32] = rest;
        (this.split_at_mut(half), next.then(|| rest.split_at(half)))
    }

    fn check_blocks(&self, layer: usize, blocks: &[u32]) -> Result<()> {
        if layer >= self.geom.layers {
            return Err(PoolError::Import(format!("layer {layer} out of range")));
        }
        if let Some(b) = blocks.iter().find(|b| **b as usize >= self.geom.num_blocks) {
            return Err(PoolError::Import(format!("block {b} out of range")));
        }
        Ok(())
    }

    /// Appends the K of `blocks` then their V, as little-endian f32, to `out`.
    pub fn export_layer(&self, layer: usize, blocks: &[u32], out: &mut Vec<u8>) -> Result<()> {
        self.check_blocks(layer, blocks)?;
        let bf = self.geom.block_floats();
        let (k, v) = self.layer(layer);
        out.reserve(self.geom.layer_bytes(blocks.len()));
        for region in [k, v] {
            for &b in blocks {
                let src = &region[b as usize * bf..(b as usize + 1) * bf];
                for x in src {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        Ok(())
    }

    /// Writes bytes made by [`KvPool::export_layer`] into `blocks` (which may be other ids).
    pub fn import_layer(&mut self, layer: usize, blocks: &[u32], bytes: &[u8]) -> Result<()> {
        self.check_blocks(layer, blocks)?;
        let want = self.geom.layer_bytes(blocks.len());
        if bytes.len() != want {
            return Err(PoolError::Import(format!(
                "layer {layer}: {} bytes for {} blocks, expected {want}",
                bytes.len(),
                blocks.len()
            )));
        }
        let bf = self.geom.block_floats();
        let (half_bytes_k, half_bytes_v) = bytes.split_at(want / 2);
        let (k, v) = self.layer_mut(layer);
        for (region, src) in [(k, half_bytes_k), (v, half_bytes_v)] {
            for (&b, chunk) in blocks.iter().zip(src.chunks_exact(bf * 4)) {
                let dst = &mut region[b as usize * bf..(b as usize + 1) * bf];
                for (d, s) in dst.iter_mut().zip(chunk.chunks_exact(4)) {
                    *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_then_import_moves_blocks_between_pools() {
        let g = KvGeometry::new(2, 1, 8, 4);
        let mut a = KvPool::new(g);
        {
            let (k, v) = a.layer_mut(1);
            for (i, x) in k.iter_mut().enumerate() {
                *x = i as f32;
            }
            for (i, x) in v.iter_mut().enumerate() {
                *x = -(i as f32);
            }
        }
        let mut bytes = Vec::new();
        a.export_layer(1, &[2, 0], &mut bytes).expect("export");
        let mut b = KvPool::new(g);
        b.import_layer(1, &[1, 3], &bytes).expect("import");
        let bf = g.block_floats();
        let (ak, av) = a.layer(1);
        let (bk, bv) = b.layer(1);
        assert_eq!(&bk[bf..2 * bf], &ak[2 * bf..3 * bf]);
        assert_eq!(&bk[3 * bf..4 * bf], &ak[..bf]);
        assert_eq!(&bv[bf..2 * bf], &av[2 * bf..3 * bf]);
        assert!(
            b.layer(0).0.iter().all(|x| *x == 0.0),
            "other layers untouched"
        );
    }

    #[test]
    fn a_layer_and_the_next_are_the_regions_layer_gives() {
        let g = KvGeometry::new(2, 1, 2, 3);
        let mut p = KvPool::new(g);
        for layer in 0..2 {
            let (k, v) = p.layer_mut(layer);
            k.fill(layer as f32 * 10.0 + 1.0);
            v.fill(layer as f32 * 10.0 + 2.0);
        }
        let want: Vec<(Vec<f32>, Vec<f32>)> = (0..2)
            .map(|l| (p.layer(l).0.to_vec(), p.layer(l).1.to_vec()))
            .collect();
        let ((k, v), next) = p.layer_mut_and_next(0);
        assert_eq!((k.to_vec(), v.to_vec()), want[0]);
        let (nk, nv) = next.expect("layer 1 follows");
        assert_eq!((nk.to_vec(), nv.to_vec()), want[1]);
        let ((k, v), next) = p.layer_mut_and_next(1);
        assert_eq!((k.to_vec(), v.to_vec()), want[1]);
        assert!(next.is_none());
    }

    #[test]
    fn import_rejects_wrong_sizes_and_ids() {
        let g = KvGeometry::new(1, 1, 8, 2);
        let mut p = KvPool::new(g);
        assert!(p.import_layer(0, &[0], &[0u8; 10]).is_err());
        assert!(
            p.import_layer(0, &[5], &vec![0u8; g.layer_bytes(1)])
                .is_err()
        );
        assert!(
            p.import_layer(3, &[0], &vec![0u8; g.layer_bytes(1)])
                .is_err()
        );
    }
}
