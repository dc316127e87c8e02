//! Quantized rows dotted with activations without a dequantized copy: each 8-weight chunk is
//! dequantized in registers and used by every activation row of the tile. The weights take exactly
//! the values [`super::dequantize_row`] gives and the FMAs run in the canonical order, so the result
//! is bit-identical to dequantizing first.
use wide::f32x8;

use super::quant::{BlockFormat, half_at};

trait Format {
    const BYTES: usize;
    /// The block's 32 weights as four chunks of 8, in order.
    fn block(block: &[u8]) -> [f32x8; 4];
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

/// An R × C tile: R activation rows against C quantized weight rows, R·C independent FMA chains.
#[inline(always)]
fn tile<F: Format, const R: usize, const C: usize>(
    wr: [&[u8]; C],
    xr: [&[f32]; R],
) -> [[f32; C]; R] {
    let blocks = wr[0].len() / F::BYTES;
    let xs: [&[[f32; 8]]; R] = std::array::from_fn(|i| &xr[i].as_chunks::<8>().0[..blocks * 4]);
    let mut acc = [[f32x8::ZERO; C]; R];
    for b in 0..blocks {
        for j in 0..C {
            let w = F::block(&wr[j][b * F::BYTES..(b + 1) * F::BYTES]);
            for (c, wc) in w.iter().enumerate() {
                for i in 0..R {
                    acc[i][j] = f32x8::new(xs[i][b * 4 + c]).mul_add(*wc, acc[i][j]);
                }
            }
        }
    }
    let mut out = [[0f32; C]; R];
    for i in 0..R {
        for j in 0..C {
            out[i][j] = super::hsum(acc[i][j]);
        }
    }
    out
}

/// `out[r][j] = dot(x_r, w_j)` for the rows of `x` (each `k` wide) and quantized rows `w_j` (each
/// `row_bytes` long) of `wrows`, `out` holding one segment per row; `k` is a multiple of 32.
pub(super) fn quant_block(
    format: BlockFormat,
    wrows: &[u8],
    row_bytes: usize,
    x: &[f32],
    k: usize,
    out: &mut [&mut [f32]],
) {
    match format {
        BlockFormat::Q4_0 => run::<Q4_0>(wrows, row_bytes, x, k, out),
        BlockFormat::Q4_1 => run::<Q4_1>(wrows, row_bytes, x, k, out),
        BlockFormat::Q8_0 => run::<Q8_0>(wrows, row_bytes, x, k, out),
    }
}

fn run<F: Format>(wrows: &[u8], row_bytes: usize, x: &[f32], k: usize, out: &mut [&mut [f32]]) {
    let m = x.len() / k;
    let n = wrows.len() / row_bytes;
    let mut r = 0;
    macro_rules! rows_of {
        ($r:literal, $c:literal) => {
            while m - r >= $r {
                let xr: [&[f32]; $r] = std::array::from_fn(|i| &x[(r + i) * k..(r + i + 1) * k]);
                let mut j = 0;
                while n - j >= $c {
                    let wr: [&[u8]; $c] = std::array::from_fn(|t| {
                        &wrows[(j + t) * row_bytes..(j + t + 1) * row_bytes]
                    });
                    let v = tile::<F, $r, $c>(wr, xr);
                    for i in 0..$r {
                        out[r + i][j..j + $c].copy_from_slice(&v[i]);
                    }
                    j += $c;
                }
                while j < n {
                    let v = tile::<F, $r, 1>([&wrows[j * row_bytes..(j + 1) * row_bytes]], xr);
                    for i in 0..$r {
                        out[r + i][j] = v[i][0];
                    }
                    j += 1;
                }
                r += $r;
            }
        };
    }
    // Each output is one FMA chain (4 cycles a step); a few chains per tile hide that latency behind
    // the dequantization, and more would spill the accumulators.
    rows_of!(8, 1);
    rows_of!(4, 1);
    rows_of!(2, 2);
    rows_of!(1, 4);
}
