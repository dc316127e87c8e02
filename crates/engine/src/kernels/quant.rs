//! GGUF block formats we compute on directly. Others are dequantized once at load.
use half::f16;

/// A quantized row format: blocks of 32 weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockFormat {
    /// d (f16), 16 bytes of nibbles: w = (q - 8) * d.
    Q4_0,
    /// d (f16), m (f16), 16 bytes of nibbles: w = q * d + m.
    Q4_1,
    /// d (f16), 32 signed bytes: w = q * d.
    Q8_0,
}

pub const QK: usize = 32;

impl BlockFormat {
    pub fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
        }
    }

    pub fn row_bytes(self, k: usize) -> usize {
        k / QK * self.block_bytes()
    }
}

/// The little-endian f16 at `b[at..at + 2]`, as f32: a block's scale or offset.
pub(super) fn half_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dequantizes one row of `out.len()` weights (a multiple of 32) from `row`.
pub fn dequantize_row(format: BlockFormat, row: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    for (block, dst) in row.chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
        match format {
            BlockFormat::Q4_0 => {
                let d = half_at(block, 0);
                let qs = &block[2..18];
                for j in 0..16 {
                    dst[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                    dst[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
            BlockFormat::Q4_1 => {
                let d = half_at(block, 0);
                let m = half_at(block, 2);
                let qs = &block[4..20];
                for j in 0..16 {
                    dst[j] = (qs[j] & 0x0f) as f32 * d + m;
                    dst[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
            BlockFormat::Q8_0 => {
                let d = half_at(block, 0);
                for (o, q) in dst.iter_mut().zip(&block[2..34]) {
                    *o = (*q as i8) as f32 * d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_dequantization_gives_the_scalar_values() {
        let mut seed = 17u64;
        let mut byte = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        };
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let mut row = Vec::new();
            for _ in 0..6 {
                row.extend_from_slice(&f16::from_f32(0.37).to_le_bytes());
                if format == BlockFormat::Q4_1 {
                    row.extend_from_slice(&f16::from_f32(-1.25).to_le_bytes());
                }
                let n = if format == BlockFormat::Q8_0 { 32 } else { 16 };
                row.extend((0..n).map(|_| byte()));
            }
            let (mut a, mut b) = (vec![0f32; 192], vec![0f32; 192]);
            dequantize_row(format, &row, &mut a);
            super::super::fused::dequantize_into(format, &row, &mut b);
            assert_eq!(a, b, "{format:?}");
        }
    }

    #[test]
    fn q4_1_block_decodes_low_then_high_nibbles() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16 {
            b[4 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let mut out = [0f32; 32];
        dequantize_row(BlockFormat::Q4_1, &b, &mut out);
        for j in 0..16 {
            assert_eq!(out[j], j as f32 * 0.5 - 1.0);
            assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn q8_0_and_q4_0_are_signed() {
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        b[2] = (-3i8) as u8;
        b[3] = 5;
        let mut out = [0f32; 32];
        dequantize_row(BlockFormat::Q8_0, &b, &mut out);
        assert_eq!(&out[..3], &[-6.0, 10.0, 0.0]);
        let mut b = vec![0u8; 18];
        b[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
        b[2] = 0x0f;
        dequantize_row(BlockFormat::Q4_0, &b, &mut out);
        assert_eq!((out[0], out[16], out[1]), (7.0, -8.0, -8.0));
    }
}
