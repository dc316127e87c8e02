//! The shm transport's memory: a decode worker's KV pool in a shared-memory file, mapped by the
//! decode worker (which builds its `KvPool` on it) and by prefill workers on the same host (which
//! copy reserved blocks straight into it). See the crate docs for why the sharing is sound.
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use memmap2::MmapMut;
use tandem_kv_pool::{KvGeometry, KvMemory, KvPool};
use tandem_proto::v1::{self, ShmPoolLayout};

use crate::fence::{Fences, Writer, table_len};
use crate::{Crc32c, KvTransferError, Result, block_geometry};

const _: () = assert!(
    cfg!(target_endian = "little"),
    "the pool file holds little-endian f32"
);

/// The layout of a pool with geometry `g` in the file at `path`: exactly the engine pool's order
/// (per layer K then V, each `[num_blocks][block_size][kv_heads][head_dim]` f32), from offset 0,
/// then on the next page the fence table ([`crate::fence`]).
pub fn shm_layout(path: &Path, g: &KvGeometry) -> ShmPoolLayout {
    let block = (g.block_floats() * 4) as u64;
    let half = block * g.num_blocks as u64;
    let fence_offset = (g.total_floats() as u64 * 4).next_multiple_of(4096);
    ShmPoolLayout {
        path: path.to_string_lossy().into_owned(),
        file_len: fence_offset + table_len(g.num_blocks as u32),
        fence_offset,
        num_blocks: g.num_blocks as u32,
        geometry: Some(block_geometry(g)),
        base_offset: 0,
        layer_stride: 2 * half,
        kv_stride: half,
        block_stride: block,
    }
}

/// A mapping of a pool file. Implements [`KvMemory`] so that a `KvPool` can live in it.
#[derive(Debug)]
pub struct ShmRegion {
    map: MmapMut,
    /// Kept open so that [`ShmRegion::remap`] can map the same memory again.
    file: std::fs::File,
    layout: ShmPoolLayout,
    geom: KvGeometry,
    fences: Fences,
    /// The creator removes the file when it drops its mapping; other mappings stay valid.
    owner: Option<PathBuf>,
}

impl ShmRegion {
    /// Decode side: creates (or truncates) a zeroed pool file at `path` for geometry `geom`.
    pub fn create(path: impl AsRef<Path>, geom: &KvGeometry) -> Result<Self> {
        let path = path.as_ref();
        let layout = shm_layout(path, geom);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        commit_zeros(&file, layout.file_len)?;
        ShmRegion::mapped(file, layout, *geom, Some(path.to_owned()))
    }

    /// Maps `file`, which holds a pool of `layout`.
    fn mapped(
        file: std::fs::File,
        layout: ShmPoolLayout,
        geom: KvGeometry,
        owner: Option<PathBuf>,
    ) -> Result<Self> {
        let map = map(&file, layout.fence_offset)?;
        let fences = Fences::map(&file, layout.fence_offset, layout.num_blocks)?;
        Ok(ShmRegion {
            map,
            file,
            layout,
            geom,
            fences,
            owner,
        })
    }

    /// Prefill side: maps the pool a decode worker published, after checking that the file and
    /// the layout agree and that every block lies inside the file.
    pub fn open(layout: &ShmPoolLayout) -> Result<Self> {
        let g = layout
            .geometry
            .ok_or_else(|| invalid("layout has no geometry"))?;
        if g.dtype != i32::from(v1::KvDtype::F32) {
            return Err(invalid("only f32 pools can be mapped"));
        }
        let geom = KvGeometry {
            layers: g.num_layers as usize,
            kv_heads: g.kv_heads as usize,
            head_dim: g.head_dim as usize,
            block_size: g.block_tokens as usize,
            num_blocks: layout.num_blocks as usize,
        };
        let canonical = shm_layout(Path::new(&layout.path), &geom);
        if *layout != canonical {
            return Err(invalid(&format!(
                "layout {layout:?} is not the pool layout {canonical:?}"
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&layout.path)?;
        let len = file.metadata()?.len();
        if len != layout.file_len {
            return Err(invalid(&format!(
                "file holds {len} bytes, layout says {}",
                layout.file_len
            )));
        }
        ShmRegion::mapped(file, layout.clone(), geom, None)
    }

    /// A pool in anonymous shared memory (a memfd: no file name, gone with its last mapping and
    /// descriptor), for a decode worker whose KV arrives over tcp: the engine's pool lives in one
    /// mapping and each KV connection reads frames straight into its blocks through another
    /// ([`ShmRegion::remap`]), with no copy out of a receive buffer. Zero pages are not
    /// committed up front, as a heap pool's are not.
    pub fn anonymous(geom: &KvGeometry) -> Result<Self> {
        use nix::sys::memfd::{MFdFlags, memfd_create};
        let layout = shm_layout(Path::new(""), geom);
        let fd = memfd_create("tandem-kv-pool", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| KvTransferError::Io(std::io::Error::from(e)))?;
        let file = std::fs::File::from(fd);
        file.set_len(layout.file_len)?;
        ShmRegion::mapped(file, layout, *geom, None)
    }

    /// An engine pool of geometry `geom` in anonymous shared memory, and a second mapping of it to
    /// hand a KV receiver ([`crate::KvSink::direct`] returns its remaps).
    pub fn anonymous_pool(geom: &KvGeometry) -> Result<(KvPool, ShmRegion)> {
        let region = ShmRegion::anonymous(geom)?;
        let view = region.remap()?;
        let pool = KvPool::with_memory(*geom, Box::new(region))
            .map_err(|e| invalid(&format!("pool on its mapping: {e}")))?;
        Ok((pool, view))
    }

    /// Another mapping of the same memory: what one process writes through either, the other
    /// sees. Each KV connection of a decode worker holds its own, so that it can read a frame into
    /// reserved blocks without a lock while the engine uses others (see the crate docs).
    pub fn remap(&self) -> Result<Self> {
        let file = self.file.try_clone()?;
        ShmRegion::mapped(file, self.layout.clone(), self.geom, None)
    }

    /// The bytes of K of `block_ids` of `layer` in list order, then of their V, as one mutable
    /// slice each: where a frame's payload (laid out as `KvPool::export_layer` makes it) goes.
    /// An error for a layer or block outside the pool, or a block listed twice.
    pub fn block_slices_mut(&mut self, layer: usize, block_ids: &[u32]) -> Result<Vec<&mut [u8]>> {
        let ranges = self
            .payload_ranges(layer, block_ids)
            .collect::<Result<Vec<_>>>()?;
        // Split the mapping at each range, in address order, then put the pieces back in
        // payload order.
        let mut order: Vec<usize> = (0..ranges.len()).collect();
        order.sort_by_key(|&i| ranges[i].start);
        let mut pieces: Vec<Option<&mut [u8]>> = (0..ranges.len()).map(|_| None).collect();
        let mut rest: &mut [u8] = &mut self.map;
        let mut at = 0;
        for i in order {
            let r = &ranges[i];
            if r.start < at {
                return Err(invalid(&format!(
                    "a block of layer {layer} is listed twice"
                )));
            }
            let tail = std::mem::take(&mut rest);
            let (_, tail) = tail.split_at_mut(r.start - at);
            let (piece, tail) = tail.split_at_mut(r.len());
            pieces[i] = Some(piece);
            rest = tail;
            at = r.end;
        }
        Ok(pieces.into_iter().flatten().collect())
    }

    /// The layout to publish to prefill workers (KvDestination.shm_layout).
    pub fn layout(&self) -> &ShmPoolLayout {
        &self.layout
    }

    /// The pool geometry the file was sized for.
    pub fn geometry(&self) -> &KvGeometry {
        &self.geom
    }

    /// Who may write each block ([`crate::fence`]).
    pub fn fences(&self) -> &Fences {
        &self.fences
    }

    /// The fence table mapped again, for an owner that needs no KV bytes (the decode worker's
    /// reservation table).
    pub fn fence_map(&self) -> Result<Fences> {
        Fences::map(&self.file, self.layout.fence_offset, self.layout.num_blocks)
    }

    /// The byte ranges of K of `block_ids` of `layer` in list order, then of their V: a payload's
    /// order (`KvPool::export_layer`'s).
    fn payload_ranges<'a>(
        &'a self,
        layer: usize,
        block_ids: &'a [u32],
    ) -> impl Iterator<Item = Result<std::ops::Range<usize>>> + 'a {
        (0..2).flat_map(move |kv| {
            block_ids
                .iter()
                .map(move |&b| self.block_range(layer, kv, b))
        })
    }

    fn block_range(&self, layer: usize, kv: usize, block: u32) -> Result<std::ops::Range<usize>> {
        if layer >= self.geom.layers || block as usize >= self.geom.num_blocks {
            return Err(invalid(&format!(
                "layer {layer} block {block} outside the pool"
            )));
        }
        let l = &self.layout;
        let start = l.base_offset as usize
            + layer * l.layer_stride as usize
            + kv * l.kv_stride as usize
            + block as usize * l.block_stride as usize;
        Ok(start..start + self.geom.block_floats() * 4)
    }

    /// [`ShmRegion::write_blocks`] as writer `w` of another process's pool: the blocks claimed
    /// for the copy ([`crate::fence`]), all of them or none.
    pub fn write_blocks_as(
        &mut self,
        layer: usize,
        block_ids: &[u32],
        payload: &[u8],
        w: Writer,
    ) -> Result<usize> {
        self.as_writer(block_ids, w, |r| r.write_blocks(layer, block_ids, payload))
    }

    /// Runs `copy` with `blocks` claimed for writer `w` ([`crate::fence`]): all of them or none,
    /// given back after.
    fn as_writer(
        &mut self,
        blocks: &[u32],
        w: Writer,
        copy: impl FnOnce(&mut Self) -> Result<usize>,
    ) -> Result<usize> {
        self.fences.claim_all(blocks, w)?;
        let written = copy(self);
        self.fences.release_all(blocks, w);
        written
    }

    /// Copies a payload laid out as `KvPool::export_layer` makes it (K of `block_ids` in order,
    /// then V) into those blocks of `layer`. Returns the bytes written. For this process's own
    /// pool; a writer into another's uses [`ShmRegion::write_blocks_as`].
    pub fn write_blocks(
        &mut self,
        layer: usize,
        block_ids: &[u32],
        payload: &[u8],
    ) -> Result<usize> {
        let block = self.geom.block_floats() * 4;
        if payload.len() != 2 * block * block_ids.len() {
            return Err(invalid(&format!(
                "{} bytes for {} blocks",
                payload.len(),
                block_ids.len()
            )));
        }
        let ranges = self
            .payload_ranges(layer, block_ids)
            .collect::<Result<Vec<_>>>()?;
        for (r, chunk) in ranges.into_iter().zip(payload.chunks_exact(block)) {
            self.map[r].copy_from_slice(chunk);
        }
        Ok(payload.len())
    }

    /// Copies blocks `src_blocks` of a source pool's layer (`src_k`, `src_v` as `KvPool::layer`
    /// returns them) into blocks `dst_blocks` of `layer` as writer `w`, with no staging buffer.
    /// The blocks are claimed for the whole layer's copy ([`crate::fence`]), all of them or none,
    /// so that K and V each go in one pass over the blocks (claimed one block at a time, K and V
    /// of each block in turn, the copy ran about 10% slower). Returns the bytes written.
    pub fn write_blocks_from(
        &mut self,
        layer: usize,
        dst_blocks: &[u32],
        src: (&[f32], &[f32]),
        src_blocks: &[u32],
        w: Writer,
    ) -> Result<usize> {
        if dst_blocks.len() != src_blocks.len() {
            return Err(invalid(
                "source and destination block lists differ in length",
            ));
        }
        self.as_writer(dst_blocks, w, |r| {
            r.copy_blocks(layer, dst_blocks, src, src_blocks)
        })
    }

    fn copy_blocks(
        &mut self,
        layer: usize,
        dst_blocks: &[u32],
        src: (&[f32], &[f32]),
        src_blocks: &[u32],
    ) -> Result<usize> {
        let bf = self.geom.block_floats();
        for (kv, region) in [src.0, src.1].into_iter().enumerate() {
            for (&d, &s) in dst_blocks.iter().zip(src_blocks) {
                let from = region
                    .get(s as usize * bf..(s as usize + 1) * bf)
                    .ok_or_else(|| invalid(&format!("source block {s} outside its pool")))?;
                let r = self.block_range(layer, kv, d)?;
                let floats = self.floats_mut();
                floats[r.start / 4..r.end / 4].copy_from_slice(from);
            }
        }
        Ok(2 * bf * 4 * dst_blocks.len())
    }

    /// Appends K of `block_ids` of `layer` in list order, then their V, to `out`: a payload as
    /// `KvPool::export_layer` lays it out (a decode worker reading a running sequence's blocks to
    /// move them, while its engine computes others).
    pub fn read_blocks(&self, layer: usize, block_ids: &[u32], out: &mut Vec<u8>) -> Result<()> {
        out.reserve(2 * self.geom.block_floats() * 4 * block_ids.len());
        for r in self.payload_ranges(layer, block_ids) {
            out.extend_from_slice(&self.map[r?]);
        }
        Ok(())
    }

    /// CRC-32C of K of `block_ids` of `layer` in list order, then their V (as a notice carries).
    pub fn checksum(&self, layer: usize, block_ids: &[u32]) -> Result<u32> {
        let mut crc = Crc32c::default();
        for r in self.payload_ranges(layer, block_ids) {
            crc.update(&self.map[r?]);
        }
        Ok(crc.value())
    }

    /// The raw bytes of the whole pool.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for ShmRegion {
    fn drop(&mut self) {
        if let Some(path) = &self.owner {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Maps the KV part of a pool file: its first `len` bytes (the fence table after them is mapped
/// on its own, [`Fences`], and only ever reached through atomics).
#[allow(unsafe_code)]
fn map(file: &std::fs::File, len: u64) -> Result<MmapMut> {
    let len = usize::try_from(len).map_err(|_| invalid("pool larger than the address space"))?;
    // SAFETY: the file is a KV pool that only this protocol's processes open. Other processes
    // change its bytes while mapped, which the crate docs' rule confines to blocks this process does
    // not read or write at that time; its length never changes after creation (nobody truncates it).
    Ok(unsafe { memmap2::MmapOptions::new().len(len).map_mut(file)? })
}

impl KvMemory for ShmRegion {
    #[allow(unsafe_code)]
    fn floats(&self) -> &[f32] {
        // SAFETY: every bit pattern is a valid f32; align_to only yields the aligned middle part,
        // and a mapping starts on a page boundary with a length that is a multiple of 4.
        let (head, floats, tail) = unsafe { self.map.align_to::<f32>() };
        debug_assert!(head.is_empty() && tail.is_empty());
        // The KV only, not the fence table after it.
        &floats[..self.geom.total_floats()]
    }

    #[allow(unsafe_code)]
    fn floats_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `floats`; writing any f32 leaves valid bytes behind.
        let (head, floats, tail) = unsafe { self.map.align_to_mut::<f32>() };
        debug_assert!(head.is_empty() && tail.is_empty());
        let kv = self.geom.total_floats();
        &mut floats[..kv]
    }
}

/// CRC-32C of K of `block_ids` of `layer` in list order, then their V, read from a pool (the decode
/// worker's [`crate::KvSink::checksum`] for shm notices). `None` for a layer or block outside it.
pub fn pool_checksum(pool: &KvPool, layer: usize, block_ids: &[u32]) -> Option<u32> {
    let g = pool.geometry();
    if layer >= g.layers {
        return None;
    }
    let bf = g.block_floats();
    let (k, v) = pool.layer(layer);
    let mut crc = Crc32c::default();
    let mut bytes = [0u8; 4096];
    for region in [k, v] {
        for &b in block_ids {
            let block = region.get(b as usize * bf..(b as usize + 1) * bf)?;
            for floats in block.chunks(bytes.len() / 4) {
                for (d, x) in bytes.chunks_exact_mut(4).zip(floats) {
                    d.copy_from_slice(&x.to_le_bytes());
                }
                crc.update(&bytes[..floats.len() * 4]);
            }
        }
    }
    Some(crc.value())
}

fn invalid(msg: &str) -> KvTransferError {
    KvTransferError::Invalid(msg.to_owned())
}

#[cfg(test)]
#[path = "shm_tests.rs"]
mod tests;

/// Writes the file's zeros for real instead of extending it sparsely: a tmpfs smaller than the pool
/// (a container's 64 MiB /dev/shm) then fails here with ENOSPC, a clear error at start-up, instead
/// of killing the process with SIGBUS at the first write past its end; and the pool's pages are
/// committed before the first request, not faulted in while it decodes.
fn commit_zeros(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let chunk = vec![0u8; 1 << 20];
    let mut w = std::io::BufWriter::with_capacity(0, file);
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        w.write_all(&chunk[..n]).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "reserving a {len}-byte KV pool file: {e} (is its file system big enough?)"
                ),
            )
        })?;
        left -= n as u64;
    }
    w.flush()
}
