//! Quantized blocks dequantized eight weights at a time in registers: the values
//! [`super::dequantize_row`] defines, for the f32 paths that need a weight row as floats.
use half::f16;
use wide::f32x8;

use super::quant::BlockFormat;

trait Format {
    const BYTES: usize;
    /// The block's 32 weights as four chunks of 8, in order.
    fn block(block: &[u8]) -> [f32x8; 4];
}

fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 32 nibbles of 16 bytes in weight order: low nibbles are weights 0..16, high ones 16..32.
#[inline(always)]
fn nibbles(qs: &[u8]) -> [[f32; 8]; 4] {
    let mut q = [0u8; 16];
    q.copy_from_slice(&qs[..16]);
    let lo: [u8; 16] = q.map(|b| b & 0x0f);
    let hi: [u8; 16] = q.map(|b| b >> 4);
    [
        std::array::from_fn(|i| lo[i] as f32),
        std::array::from_fn(|i| lo[8 + i] as f32),
        std::array::from_fn(|i| hi[i] as f32),
        std::array::from_fn(|i| hi[8 + i] as f32),
    ]
}

struct Q4_0;
impl Format for Q4_0 {
    const BYTES: usize = 18;
    #[inline(always)]
    fn block(block: &[u8]) -> [f32x8; 4] {
        let d = f32x8::splat(half_at(block, 0));
        let eight = f32x8::splat(8.0);
        // (q - 8) is exact in f32, as the integer subtraction of dequantize_row is.
        nibbles(&block[2..18]).map(|q| (f32x8::new(q) - eight) * d)
    }
}

struct Q4_1;
impl Format for Q4_1 {
    const BYTES: usize = 20;
    #[inline(always)]
    fn block(block: &[u8]) -> [f32x8; 4] {
        let (d, m) = (
            f32x8::splat(half_at(block, 0)),
            f32x8::splat(half_at(block, 2)),
        );
        nibbles(&block[4..20]).map(|q| f32x8::new(q) * d + m)
    }
}

struct Q8_0;
impl Format for Q8_0 {
    const BYTES: usize = 34;
    #[inline(always)]
    fn block(block: &[u8]) -> [f32x8; 4] {
        let d = f32x8::splat(half_at(block, 0));
        let q = &block[2..34];
        std::array::from_fn(|c| {
            f32x8::new(std::array::from_fn(|i| (q[c * 8 + i] as i8) as f32)) * d
        })
    }
}

/// Dequantizes one row (a whole number of blocks) into `out`: the values `dequantize_row` defines,
/// eight at a time.
pub(super) fn dequantize_into(format: BlockFormat, row: &[u8], out: &mut [f32]) {
    fn go<F: Format>(row: &[u8], out: &mut [f32]) {
        for (block, dst) in row.chunks_exact(F::BYTES).zip(out.chunks_exact_mut(32)) {
            for (c, v) in F::block(block).iter().enumerate() {
                dst[c * 8..c * 8 + 8].copy_from_slice(&v.to_array());
            }
        }
    }
    match format {
        BlockFormat::Q4_0 => go::<Q4_0>(row, out),
        BlockFormat::Q4_1 => go::<Q4_1>(row, out),
        BlockFormat::Q8_0 => go::<Q8_0>(row, out),
    }
}
