//! Quantized weights against activations rounded to 16 bits, with integer dot products.
//!
//! Each activation row is cut into blocks of 32 and each block rounded to `q = round(x / d)` (ties
//! to even) with `d = max|x| / 32767`: the rounding reads only that row, so it is the same whatever
//! else shares the batch. A weight block (Q4_0, Q4_1, Q8_0) is then dotted with an activation block
//! in integers, which is exact, and the blocks' scaled sums are accumulated in one fixed order:
//!
//! - per block `b`, eight integer partial sums `p[j] = Σ q_w[e]·q_x[e]` over
//!   `e ∈ {2j, 2j+1, 16+2j, 17+2j}` (what two `vpmaddwd` and one `vpaddd` leave in the lanes; at
//!   most 4·128·32767 < 2²⁴, so exact as floats too);
//! - `acc[j] = fma(d_w[b]·d_x[b], p[j], acc[j])` for the blocks in order;
//! - the result is `hsum(acc)`, plus, for the formats with an offset (`w = q·d + m`; Q4_0 is
//!   `m = -8·d`), the canonical [`super::dot`] of the blocks' offsets `m[b]` with the activation
//!   blocks' `d_x[b]·Σq_x`.
//!
//! The AVX2 kernel and the portable one compute exactly these operations, so every output element
//! is a function of its activation row and weight row alone, as everywhere in [`super`].
//!
//! Why 16 bits and not 8 as llama.cpp and candle round: this model's activations have outliers,
//! so an 8-bit step is coarse, and rounding is chaotic: a change of one part in 10⁷ in the
//! activations (f32 against f64) moves SmolLM2's logits by up to 1 through 30 layers, and greedy
//! outputs part ways wherever the top two logits are closer than that. With 16 bits the step is
//! 258 times finer and the engine keeps the exact arithmetic's greedy tokens (the fixtures test);
//! the integer products cost about as much as 8-bit ones (`vpmaddwd` on 16 pairs instead of
//! `vpmaddubsw` on 32, but no second widening step).
use std::ops::Range;

use super::quant::{BlockFormat, QK, half_at};

const QMAX: f32 = 32767.0;

/// Activation rows rounded to 16-bit blocks: `m` rows of `k / 32` blocks.
#[derive(Debug, Default)]
pub struct Q16Rows {
    /// `m × k` rounded values, row-major.
    q: Vec<i16>,
    /// `m × k/32` block scales `d`.
    d: Vec<f32>,
    /// `m × k/32` block sums `d · Σq`, for the weight formats with an offset.
    s: Vec<f32>,
    blocks: usize,
}

impl Q16Rows {
    /// Rounds the rows of `x` (each `k` wide, `k` a multiple of 32).
    pub fn quantize(x: &[f32], k: usize) -> Q16Rows {
        debug_assert!(k.is_multiple_of(QK) && x.len().is_multiple_of(k));
        let blocks_total = x.len() / QK;
        let mut out = Q16Rows {
            q: vec![0; x.len()],
            d: Vec::with_capacity(blocks_total),
            s: Vec::with_capacity(blocks_total),
            blocks: k / QK,
        };
        for (xb, qb) in x.chunks_exact(QK).zip(out.q.chunks_exact_mut(QK)) {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / QMAX;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qb.iter_mut().zip(xb) {
                // Within ±32767 by construction; the clamp guards rounding at the edge and NaN
                // (which casts to 0).
                *q = (v * id).round_ties_even().clamp(-QMAX, QMAX) as i16;
                sum += *q as i32;
            }
            out.d.push(d);
            out.s.push(d * sum as f32);
        }
        out
    }

    fn row(&self, r: usize) -> RowRef<'_> {
        let nb = self.blocks;
        RowRef {
            q: self.q[r * nb * QK..(r + 1) * nb * QK].as_chunks::<QK>().0,
            d: &self.d[r * nb..(r + 1) * nb],
            s: &self.s[r * nb..(r + 1) * nb],
        }
    }
}

#[derive(Clone, Copy)]
struct RowRef<'a> {
    q: &'a [[i16; QK]],
    d: &'a [f32],
    s: &'a [f32],
}

/// A weight block's scale and its 32 integer values.
fn scalar_block(format: BlockFormat, block: &[u8]) -> (f32, [i32; QK]) {
    let mut q = [0i32; QK];
    match format {
        BlockFormat::Q4_0 | BlockFormat::Q4_1 => {
            let qs = if format == BlockFormat::Q4_1 {
                &block[4..20]
            } else {
                &block[2..18]
            };
            for j in 0..16 {
                q[j] = (qs[j] & 0x0f) as i32;
                q[j + 16] = (qs[j] >> 4) as i32;
            }
        }
        BlockFormat::Q8_0 => {
            for (o, b) in q.iter_mut().zip(&block[2..34]) {
                *o = *b as i8 as i32;
            }
        }
    }
    (half_at(block, 0), q)
}

/// The offsets `m` of a weight row's blocks (empty for formats without one).
fn offsets(format: BlockFormat, w: &[u8], out: &mut Vec<f32>) {
    out.clear();
    match format {
        BlockFormat::Q4_1 => out.extend(w.chunks_exact(20).map(|b| half_at(b, 2))),
        BlockFormat::Q4_0 => out.extend(w.chunks_exact(18).map(|b| -8.0 * half_at(b, 0))),
        BlockFormat::Q8_0 => {}
    }
}

/// The definition: one weight row against one activation row, portably.
fn dot_portable(format: BlockFormat, w: &[u8], x: RowRef<'_>, mins: &mut Vec<f32>) -> f32 {
    let mut acc = [0f32; 8];
    for (b, block) in w.chunks_exact(format.block_bytes()).enumerate() {
        let (d, q) = scalar_block(format, block);
        let scale = d * x.d[b];
        for (j, a) in acc.iter_mut().enumerate() {
            let p: i32 = [2 * j, 2 * j + 1, 16 + 2 * j, 17 + 2 * j]
                .iter()
                .map(|&e| q[e] * x.q[b][e] as i32)
                .sum();
            *a = scale.mul_add(p as f32, *a);
        }
    }
    offsets(format, w, mins);
    finish(acc, mins, x.s)
}

#[inline(always)]
fn finish(acc: [f32; 8], mins: &[f32], s: &[f32]) -> f32 {
    let main = super::hsum(wide::f32x8::new(acc));
    if mins.is_empty() {
        main
    } else {
        main + super::dot(mins, s)
    }
}

/// `out[(r - rows.start) * ld + j] = dot(x_r, w_j)` for the rows `rows` of `x` and the quantized
/// rows `w_j` of `wrows` (each `row_bytes` long, `x`'s number of blocks).
pub(super) fn rows_times_weights(
    format: BlockFormat,
    wrows: &[u8],
    row_bytes: usize,
    x: &Q16Rows,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    avx2::run(format, wrows, row_bytes, x, rows, out, ld);
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    portable_run(format, wrows, row_bytes, x, rows, out, ld);
}

#[cfg_attr(
    all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ),
    allow(dead_code)
)]
fn portable_run(
    format: BlockFormat,
    wrows: &[u8],
    row_bytes: usize,
    x: &Q16Rows,
    rows: Range<usize>,
    out: &mut [f32],
    ld: usize,
) {
    let mut mins = Vec::with_capacity(x.blocks);
    for r in rows.clone() {
        for (j, w) in wrows.chunks_exact(row_bytes).enumerate() {
            out[(r - rows.start) * ld + j] = dot_portable(format, w, x.row(r), &mut mins);
        }
    }
}

#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod avx2 {
    use std::ops::Range;

    use safe_arch::{
        add_i32_m256i, bitand_m128i, convert_to_i16_m256i_from_i8_m128i,
        convert_to_i16_m256i_from_u8_m128i, convert_to_m256_from_i32_m256i, fused_mul_add_m256,
        m128i, m256, m256i, mul_i16_horizontal_add_m256i, set_splat_i8_m128i, set_splat_m256,
        shr_imm_u16_m128i, zeroed_m256,
    };

    use super::{BlockFormat, Q16Rows, RowRef, finish, half_at, offsets};

    /// A weight block in registers: its scale and its values as 16-bit integers, weights 0..16
    /// then 16..32.
    #[derive(Clone, Copy)]
    struct WBlock {
        d: f32,
        lo: m256i,
        hi: m256i,
    }

    trait Fmt {
        const BYTES: usize;
        fn load(block: &[u8]) -> WBlock;
    }

    #[inline(always)]
    fn bytes16(s: &[u8]) -> m128i {
        let mut a = [0u8; 16];
        a.copy_from_slice(&s[..16]);
        m128i::from(a)
    }

    #[inline(always)]
    fn nibbles(qs: &[u8], d: f32) -> WBlock {
        let v = bytes16(qs);
        let mask = set_splat_i8_m128i(0x0f);
        WBlock {
            d,
            lo: convert_to_i16_m256i_from_u8_m128i(bitand_m128i(v, mask)),
            hi: convert_to_i16_m256i_from_u8_m128i(bitand_m128i(shr_imm_u16_m128i::<4>(v), mask)),
        }
    }

    struct Q4_0;
    impl Fmt for Q4_0 {
        const BYTES: usize = 18;
        #[inline(always)]
        fn load(block: &[u8]) -> WBlock {
            nibbles(&block[2..18], half_at(block, 0))
        }
    }

    struct Q4_1;
    impl Fmt for Q4_1 {
        const BYTES: usize = 20;
        #[inline(always)]
        fn load(block: &[u8]) -> WBlock {
            nibbles(&block[4..20], half_at(block, 0))
        }
    }

    struct Q8_0;
    impl Fmt for Q8_0 {
        const BYTES: usize = 34;
        #[inline(always)]
        fn load(block: &[u8]) -> WBlock {
            WBlock {
                d: half_at(block, 0),
                lo: convert_to_i16_m256i_from_i8_m128i(bytes16(&block[2..18])),
                hi: convert_to_i16_m256i_from_i8_m128i(bytes16(&block[18..34])),
            }
        }
    }

    /// The accumulators of an R × C tile: R activation rows against C weight rows.
    #[inline(always)]
    fn tile<F: Fmt, const R: usize, const C: usize>(
        wr: [&[u8]; C],
        xr: [RowRef<'_>; R],
    ) -> [[m256; C]; R] {
        let nb = xr[0].d.len();
        let mut acc = [[zeroed_m256(); C]; R];
        for b in 0..nb {
            let at = b * F::BYTES;
            let w: [WBlock; C] = std::array::from_fn(|j| F::load(&wr[j][at..at + F::BYTES]));
            for i in 0..R {
                let (xq, dx) = (&xr[i].q[b], xr[i].d[b]);
                let mut a = [0i16; 16];
                a.copy_from_slice(&xq[..16]);
                let xlo = m256i::from(a);
                a.copy_from_slice(&xq[16..]);
                let xhi = m256i::from(a);
                for j in 0..C {
                    let p = add_i32_m256i(
                        mul_i16_horizontal_add_m256i(w[j].lo, xlo),
                        mul_i16_horizontal_add_m256i(w[j].hi, xhi),
                    );
                    acc[i][j] = fused_mul_add_m256(
                        set_splat_m256(w[j].d * dx),
                        convert_to_m256_from_i32_m256i(p),
                        acc[i][j],
                    );
                }
            }
        }
        acc
    }

    pub(super) fn run(
        format: BlockFormat,
        wrows: &[u8],
        row_bytes: usize,
        x: &Q16Rows,
        rows: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        match format {
            BlockFormat::Q4_0 => run_fmt::<Q4_0>(format, wrows, row_bytes, x, rows, out, ld),
            BlockFormat::Q4_1 => run_fmt::<Q4_1>(format, wrows, row_bytes, x, rows, out, ld),
            BlockFormat::Q8_0 => run_fmt::<Q8_0>(format, wrows, row_bytes, x, rows, out, ld),
        }
    }

    fn run_fmt<F: Fmt>(
        format: BlockFormat,
        wrows: &[u8],
        row_bytes: usize,
        x: &Q16Rows,
        rows: Range<usize>,
        out: &mut [f32],
        ld: usize,
    ) {
        let n = wrows.len() / row_bytes;
        let mut mins: [Vec<f32>; 4] = std::array::from_fn(|_| Vec::with_capacity(x.blocks));
        let mut j = 0;
        // Columns outside, rows inside: a group of weight rows stays in L1 while every activation
        // row passes, and its offsets are read once. Tiles keep their accumulators in registers
        // (3 × 2 and 1 × 4 fit the sixteen of AVX2 with the weights and activations beside them).
        macro_rules! cols_of {
            ($c:literal, [$($r:literal),*]) => {
                while n - j >= $c {
                    let wr: [&[u8]; $c] = std::array::from_fn(|t| {
                        &wrows[(j + t) * row_bytes..(j + t + 1) * row_bytes]
                    });
                    for t in 0..$c {
                        offsets(format, wr[t], &mut mins[t]);
                    }
                    let mut r = rows.start;
                    $(
                        while rows.end - r >= $r {
                            let xr: [RowRef<'_>; $r] = std::array::from_fn(|i| x.row(r + i));
                            let acc = tile::<F, $r, $c>(wr, xr);
                            for i in 0..$r {
                                let o = (r - rows.start + i) * ld + j;
                                for t in 0..$c {
                                    out[o + t] = finish(acc[i][t].into(), &mins[t], xr[i].s);
                                }
                            }
                            r += $r;
                        }
                    )*
                    j += $c;
                }
            };
        }
        if rows.len() == 1 {
            cols_of!(4, [1]);
        } else {
            cols_of!(2, [3, 2, 1]);
        }
        cols_of!(1, [4, 2, 1]);
    }
}

#[cfg(test)]
mod tests {
    use half::f16;

    use super::*;

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    fn random_rows(format: BlockFormat, n: usize, k: usize, seed: &mut u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        for _ in 0..n * k / QK {
            let d = (lcg(seed) % 1000) as f32 / 50_000.0 + 1e-4;
            bytes.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            if format == BlockFormat::Q4_1 {
                let m = -((lcg(seed) % 1000) as f32) / 10_000.0;
                bytes.extend_from_slice(&f16::from_f32(m).to_le_bytes());
            }
            let len = if format == BlockFormat::Q8_0 { 32 } else { 16 };
            bytes.extend((0..len).map(|_| lcg(seed) as u8));
        }
        bytes
    }

    fn random_x(len: usize, seed: &mut u64) -> Vec<f32> {
        (0..len)
            .map(|_| (lcg(seed) % 20_001) as f32 / 10_000.0 - 1.0)
            .collect()
    }

    #[test]
    fn activations_round_each_block_to_its_own_scale() {
        let mut x = vec![0f32; 64];
        x[0] = 2.0;
        x[1] = -1.0;
        x[2] = 0.25;
        x[40] = -3.0;
        let q = Q16Rows::quantize(&x, 64);
        assert_eq!(q.d, vec![2.0 / 32767.0, 3.0 / 32767.0]);
        assert_eq!(&q.q[..3], &[32767, -16384, 4096]);
        assert_eq!(q.q[40], -32767);
        assert_eq!(q.s[0], q.d[0] * (32767 - 16384 + 4096) as f32);
        // An all-zero block has scale 0 and rounds to zeros, never NaN; NaN rounds to 0.
        let z = Q16Rows::quantize(&[0.0; 32], 32);
        assert_eq!((z.d[0], z.s[0]), (0.0, 0.0));
        assert!(z.q.iter().all(|v| *v == 0));
        let mut nan = [1.0f32; 32];
        nan[3] = f32::NAN;
        assert_eq!(Q16Rows::quantize(&nan, 32).q[3], 0);
    }

    #[test]
    fn every_kernel_gives_the_portable_value_bit_for_bit() {
        let mut seed = 5;
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            for &(n, k) in &[(9usize, 64usize), (7, 576), (4, 32)] {
                let w = random_rows(format, n, k, &mut seed);
                let rb = format.row_bytes(k);
                for m in [1usize, 2, 3, 5, 8, 11] {
                    let x = Q16Rows::quantize(&random_x(m * k, &mut seed), k);
                    let mut got = vec![0f32; m * n];
                    rows_times_weights(format, &w, rb, &x, 0..m, &mut got, n);
                    let mut want = vec![0f32; m * n];
                    portable_run(format, &w, rb, &x, 0..m, &mut want, n);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{format:?} n={n} k={k} m={m}");
                    // A range of rows writes those rows only, from the start of `out`.
                    if m > 2 {
                        let mut part = vec![0f32; (m - 2) * n];
                        rows_times_weights(format, &w, rb, &x, 2..m, &mut part, n);
                        assert_eq!(bits(&part), bits(&want[2 * n..]));
                    }
                }
            }
        }
    }

    #[test]
    fn integer_dot_equals_the_exact_product_of_the_rounded_values() {
        let mut seed = 9;
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            let k = 128;
            let w = random_rows(format, 3, k, &mut seed);
            let x = Q16Rows::quantize(&random_x(k, &mut seed), k);
            let mut out = vec![0f32; 3];
            rows_times_weights(format, &w, format.row_bytes(k), &x, 0..1, &mut out, 3);
            let mut wf = vec![0f32; k];
            for (j, row) in w.chunks_exact(format.row_bytes(k)).enumerate() {
                super::super::dequantize_row(format, row, &mut wf);
                let want: f64 = (0..k)
                    .map(|e| wf[e] as f64 * x.q[e] as f64 * x.d[e / QK] as f64)
                    .sum();
                let scale: f64 = wf.iter().map(|v| v.abs() as f64).sum();
                assert!(
                    (out[j] as f64 - want).abs() <= 1e-6 * scale.max(1.0),
                    "{format:?} row {j}: {} vs {want}",
                    out[j]
                );
            }
        }
    }
}
