//! Quantized weights against activations rounded to 16 bits, with integer dot products.
//!
//! Each activation row is cut into blocks of 32 and each block rounded to `q = round(x / d)` (ties
//! to even) with `d = max|x| / 32767`: the rounding reads only that row, so it is the same whatever
//! else shares the batch. A weight block (Q4_0, Q4_1, Q8_0) is then dotted with an activation block
//! in integers, which is exact whatever the order, and one output element is, by definition:
//!
//! - `acc = 0`; for the blocks `b` in order, with `P[b] = Σ q_w[e]·q_x[e]` the block's exact integer
//!   dot product (converted to `f32` once):
//!   - `acc = fma(d_w[b]·d_x[b], P[b], acc)`;
//!   - for the formats with an offset (`w = q·d + m`; Q4_0 is `m = -8·d`):
//!     `acc = fma(m[b], s_x[b], acc)`, with `s_x[b] = d_x[b]·Σq_x` the activation block's sum;
//! - the result is `acc`.
//!
//! One chain of scalar operations per output element, with nothing in it that depends on how the
//! work is laid out: the AVX2 kernels put eight output columns (one activation row) or eight
//! activation rows (one weight row) in the lanes of a vector and run that chain in every lane, and
//! the portable kernel runs it one element at a time; a test checks that they agree bit for bit.
//! Every output element is a function of its activation row and weight row alone, as everywhere in
//! [`super`].
//!
//! Why 16 bits and not 8 as llama.cpp and candle round: this model's activations have outliers,
//! so an 8-bit step is coarse, and rounding is chaotic: a change of one part in 10⁷ in the
//! activations (f32 against f64) moves SmolLM2's logits by up to 1 through 30 layers, and greedy
//! outputs part ways wherever the top two logits are closer than that. With 16 bits the step is
//! 258 times finer and the engine keeps the exact arithmetic's greedy tokens (the fixtures test).
//! `vpmaddwd` multiplies 16 pairs and adds them in twos, so a block costs two of them; where the
//! CPU has AVX-512 VNNI, batches of 16 rows split each value into bytes instead and multiply four
//! at a time with `vpdpbusd` ([`tandem_avx512::rows16_bytes`]), the same exact integer products.
use std::ops::Range;

use super::quant::{BlockFormat, QK, half_at};

const QMAX: f32 = 32767.0;
/// Activation rows per transposed group (the lanes of an AVX2 vector).
const GROUP: usize = 8;
/// A last group of at least this many rows is padded to eight with zero rows and goes through the
/// batched kernel too (its products for the padding are computed and dropped). The
/// `batch_decode` example's small-batch curve, decode steps alone and padded: 5 rows 24 against
/// 28 ms (four and one are cheaper), 6 rows 28-30 against 25-28 ms, 7 rows 32 against 26-29 ms.
const PAD_FROM: usize = 6;
/// Pairs of values in a block.
const PAIRS: usize = QK / 2;

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
    /// Groups of eight rows (rows `8g..8g+8`), transposed for the batched kernel: the whole
    /// groups, and a last group of `PAD_FROM` to seven rows padded with zero rows.
    groups: usize,
    /// Per group, block and pair `t` the eight rows' values `2t` (low half) and `2t+1` (high half)
    /// packed in an `i32`: `[group][block][pair][row]`.
    xt: Vec<i32>,
    /// The same values split into bytes for the AVX-512 VNNI tile, where the CPU has it
    /// ([`tandem_avx512::Quads`]): per group, block and quad `t` the eight rows' low bytes of values
    /// `4t..4t + 4` (`ql`) and high bytes (`qh`), `[group][block][quad][row]`, and per group and
    /// block `128 · Σ` of each row's high bytes (`qhs`). Empty elsewhere.
    ql: Vec<i32>,
    qh: Vec<i32>,
    qhs: Vec<i32>,
    /// Per group and block the eight rows' `d` and `s`: `[group][block][row]`.
    dt: Vec<f32>,
    st: Vec<f32>,
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
            ..Q16Rows::default()
        };
        for (xb, qb) in x.chunks_exact(QK).zip(out.q.chunks_exact_mut(QK)) {
            let xb: &[f32; QK] = xb.try_into().expect("chunks_exact gives QK values");
            let qb: &mut [i16; QK] = qb.try_into().expect("chunks_exact gives QK values");
            let (d, sum) = round_block(xb, qb);
            out.d.push(d);
            out.s.push(d * sum as f32);
        }
        out.transpose_groups(x.len() / k.max(1));
        out
    }

    fn transpose_groups(&mut self, rows: usize) {
        const QUADS: usize = tandem_avx512::QUADS;
        let nb = self.blocks;
        self.groups = rows / GROUP + usize::from(rows % GROUP >= PAD_FROM);
        let bytes = self.groups >= 2 && tandem_avx512::bytes_available();
        self.xt = vec![0; self.groups * nb * PAIRS * GROUP];
        self.dt = vec![0.0; self.groups * nb * GROUP];
        self.st = vec![0.0; self.groups * nb * GROUP];
        if bytes {
            self.ql = vec![0; self.groups * nb * QUADS * GROUP];
            self.qh = vec![0; self.groups * nb * QUADS * GROUP];
            self.qhs = vec![0; self.groups * nb * GROUP];
        }
        // Padding rows stay zero in every layout (all their values and bytes are 0).
        for r in 0..rows.min(self.groups * GROUP) {
            let (g, i) = (r / GROUP, r % GROUP);
            let blocks = self.q[r * nb * QK..(r + 1) * nb * QK].as_chunks::<QK>().0;
            for (b, q) in blocks.iter().enumerate() {
                let gb = g * nb + b;
                let xt: &mut [i32; PAIRS * GROUP] = (&mut self.xt
                    [gb * PAIRS * GROUP..(gb + 1) * PAIRS * GROUP])
                    .try_into()
                    .expect("a block's pairs");
                for (t, pair) in q.as_chunks::<2>().0.iter().enumerate() {
                    xt[t * GROUP + i] =
                        (pair[0] as u16 as u32 | (pair[1] as u16 as u32) << 16) as i32;
                }
                self.dt[gb * GROUP + i] = self.d[r * nb + b];
                self.st[gb * GROUP + i] = self.s[r * nb + b];
                if bytes {
                    let (lo, hi, hsum) = split_block(q);
                    let at = gb * QUADS * GROUP;
                    let ql: &mut [i32; QUADS * GROUP] = (&mut self.ql[at..at + QUADS * GROUP])
                        .try_into()
                        .expect("a block's quads");
                    let qh: &mut [i32; QUADS * GROUP] = (&mut self.qh[at..at + QUADS * GROUP])
                        .try_into()
                        .expect("a block's quads");
                    for t in 0..QUADS {
                        ql[t * GROUP + i] = lo[t];
                        qh[t * GROUP + i] = hi[t];
                    }
                    self.qhs[gb * GROUP + i] = 128 * hsum;
                }
            }
        }
    }

    /// Rows rounded.
    fn rows(&self) -> usize {
        self.d.len() / self.blocks.max(1)
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

/// Rounds one block of activations to 16 bits: returns its scale `d` and the sum of its values.
/// The definition, one value at a time.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2"), allow(dead_code))]
fn round_block_portable(x: &[f32; QK], q: &mut [i16; QK]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / QMAX;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in q.iter_mut().zip(x) {
        // Within ±32767 by construction; the clamp guards rounding at the edge and NaN (which
        // casts to 0).
        *q = (v * id).round_ties_even().clamp(-QMAX, QMAX) as i16;
        sum += *q as i32;
    }
    (d, sum)
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
fn round_block(x: &[f32; QK], q: &mut [i16; QK]) -> (f32, i32) {
    round_block_portable(x, q)
}

/// [`round_block_portable`] eight values at a time, with the same operations in every lane: the
/// maximum ignores NaN as `f32::max` does (`vmaxps` returns its second operand when the first is
/// NaN), products and rounding (to nearest, ties to even) are IEEE's, NaN lanes become 0 as the
/// cast makes them, and the rounded values, exact integers within ±32767, convert exactly.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
fn round_block(x: &[f32; QK], q: &mut [i16; QK]) -> (f32, i32) {
    use safe_arch::{
        add_i32_m256i, bitand_m256, cmp_op_mask_m256, convert_to_i32_m256i_from_m256, m256, m256i,
        max_m256, min_m256, mul_m256, pack_i32_to_i16_m256i, round_m256, set_splat_m256,
        shuffle_ai_i64_all_m256i, zeroed_m256, zeroed_m256i,
    };
    let v: [m256; 4] = std::array::from_fn(|i| {
        let mut a = [0f32; 8];
        a.copy_from_slice(&x[i * 8..i * 8 + 8]);
        m256::from(a)
    });
    let abs_mask = m256::from([f32::from_bits(0x7fff_ffff); 8]);
    let mut vmax = zeroed_m256();
    for vi in v {
        vmax = max_m256(bitand_m256(vi, abs_mask), vmax);
    }
    let lanes: [f32; 8] = vmax.into();
    let amax = lanes.iter().fold(0f32, |a, l| a.max(*l));
    let d = amax / QMAX;
    let id = set_splat_m256(if d > 0.0 { 1.0 / d } else { 0.0 });
    let (lo, hi) = (set_splat_m256(-QMAX), set_splat_m256(QMAX));
    let mut sum = zeroed_m256i();
    let ints: [m256i; 4] = std::array::from_fn(|i| {
        let r = round_m256::<{ safe_arch::round_op!(Nearest) }>(mul_m256(v[i], id));
        // NaN compares unequal to itself: those lanes become +0.0, which converts to 0 (before
        // the clamp, whose `vmaxps` would turn NaN into its bound).
        let r = bitand_m256(
            r,
            cmp_op_mask_m256::<{ safe_arch::cmp_op!(EqualOrdered) }>(r, r),
        );
        let r = min_m256(max_m256(r, lo), hi);
        let n = convert_to_i32_m256i_from_m256(r);
        sum = add_i32_m256i(sum, n);
        n
    });
    // `vpackssdw` interleaves 128-bit halves; the quadword shuffle puts the values back in order.
    for (h, pair) in ints.chunks_exact(2).enumerate() {
        let packed =
            shuffle_ai_i64_all_m256i::<0b11_01_10_00>(pack_i32_to_i16_m256i(pair[0], pair[1]));
        let vals: [i16; 16] = packed.into();
        q[h * 16..h * 16 + 16].copy_from_slice(&vals);
    }
    let s: [i32; 8] = sum.into();
    (d, s.iter().sum())
}

/// A block's 32 rounded values split into bytes, `x = 256·h + l`: the low bytes four to an `i32`
/// (values `4t..4t + 4` in quad `t`, little-endian), the high bytes likewise, and `Σh` (the high
/// bytes as signed). The definition, one value at a time.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "avx2"), allow(dead_code))]
fn split_block_portable(q: &[i16; QK]) -> ([i32; 8], [i32; 8], i32) {
    let quad = |f: &dyn Fn(i16) -> u8, t: usize| {
        i32::from_le_bytes(std::array::from_fn(|e| f(q[4 * t + e])))
    };
    let lo = std::array::from_fn(|t| quad(&|v| v as u16 as u8, t));
    let hi = std::array::from_fn(|t| quad(&|v| (v >> 8) as u8, t));
    (lo, hi, q.iter().map(|&v| (v >> 8) as i32).sum())
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
fn split_block(q: &[i16; QK]) -> ([i32; 8], [i32; 8], i32) {
    split_block_portable(q)
}

/// [`split_block_portable`] with AVX2: a mask or an arithmetic shift per half, packed to bytes
/// (exact: low bytes 0..=255, high bytes -128..=127), the quadword shuffle putting the values
/// back in order, and the high bytes summed by `vpmaddwd` against ones.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
fn split_block(q: &[i16; QK]) -> ([i32; 8], [i32; 8], i32) {
    use safe_arch::{
        add_i32_m256i, bitand_m256i, m256i, mul_i16_horizontal_add_m256i, pack_i16_to_i8_m256i,
        pack_i16_to_u8_m256i, set_splat_i16_m256i, shr_imm_i16_m256i, shuffle_ai_i64_all_m256i,
    };
    let half = |h: usize| {
        let mut a = [0i16; 16];
        a.copy_from_slice(&q[h * 16..h * 16 + 16]);
        m256i::from(a)
    };
    let (v0, v1) = (half(0), half(1));
    let low = set_splat_i16_m256i(0xff);
    let lo = pack_i16_to_u8_m256i(bitand_m256i(v0, low), bitand_m256i(v1, low));
    let (h0, h1) = (shr_imm_i16_m256i::<8>(v0), shr_imm_i16_m256i::<8>(v1));
    let hi = pack_i16_to_i8_m256i(h0, h1);
    let ones = set_splat_i16_m256i(1);
    let sums: [i32; 8] = add_i32_m256i(
        mul_i16_horizontal_add_m256i(h0, ones),
        mul_i16_horizontal_add_m256i(h1, ones),
    )
    .into();
    (
        shuffle_ai_i64_all_m256i::<0b11_01_10_00>(lo).into(),
        shuffle_ai_i64_all_m256i::<0b11_01_10_00>(hi).into(),
        sums.iter().sum(),
    )
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

/// A weight block's offset `m` (`w = q·d + m`), for the formats with one.
#[inline(always)]
fn offset(format: BlockFormat, block: &[u8]) -> Option<f32> {
    match format {
        BlockFormat::Q4_1 => Some(half_at(block, 2)),
        BlockFormat::Q4_0 => Some(-8.0 * half_at(block, 0)),
        BlockFormat::Q8_0 => None,
    }
}

/// The definition: one weight row against one activation row, portably.
fn dot_portable(format: BlockFormat, w: &[u8], x: RowRef<'_>) -> f32 {
    let mut acc = 0f32;
    for (b, block) in w.chunks_exact(format.block_bytes()).enumerate() {
        let (d, q) = scalar_block(format, block);
        let p: i32 = (0..QK).map(|e| q[e] * x.q[b][e] as i32).sum();
        acc = (d * x.d[b]).mul_add(p as f32, acc);
        if let Some(m) = offset(format, block) {
            acc = m.mul_add(x.s[b], acc);
        }
    }
    acc
}

/// `out[r - rows.start][j] = dot(x_r, w_j)` for the rows `rows` of `x` and the quantized rows
/// `w_j` of `wrows` (each `row_bytes` long, `x`'s number of blocks): `out` holds one output
/// segment per row, so that a task can own a run of columns of every row in place.
pub(super) fn rows_times_weights(
    format: BlockFormat,
    wrows: &[u8],
    row_bytes: usize,
    x: &Q16Rows,
    rows: Range<usize>,
    out: &mut [&mut [f32]],
) {
    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    avx2::run(format, wrows, row_bytes, x, rows, out);
    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    portable_run(format, wrows, row_bytes, x, rows, out);
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
    out: &mut [&mut [f32]],
) {
    for r in rows.clone() {
        for (j, w) in wrows.chunks_exact(row_bytes).enumerate() {
            out[r - rows.start][j] = dot_portable(format, w, x.row(r));
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

    use half::f16;
    use safe_arch::{
        add_horizontal_i32_m256i, add_i32_m256i, bitand_m128i, convert_to_i16_m256i_from_i8_m128i,
        convert_to_i16_m256i_from_u8_m128i, convert_to_m256_from_i32_m256i, fused_mul_add_m256,
        m128i, m256, m256i, mul_i16_horizontal_add_m256i, mul_m256, permute2z_m256i,
        set_splat_i8_m128i, set_splat_i32_m256i, set_splat_m256, shr_imm_u16_m128i,
        shuffle_ai_i64_all_m256i, shuffle_av_i8z_half_m256i, zeroed_m256, zeroed_m256i,
    };

    use super::{BlockFormat, GROUP, PAIRS, Q16Rows, QK, RowRef, half_at, offset};

    /// A weight block's 32 values as 16-bit integers: weights 0..16, then 16..32.
    type Values = [m256i; 2];

    trait Fmt {
        const FORMAT: BlockFormat;
        const BYTES: usize;
        fn values(block: &[u8]) -> Values;
        #[inline(always)]
        fn d(block: &[u8]) -> f32 {
            half_at(block, 0)
        }
        #[inline(always)]
        fn m(block: &[u8]) -> f32 {
            offset(Self::FORMAT, block).unwrap_or(0.0)
        }
        const OFFSET: bool;
        /// How [`tandem_avx512::rows16_bytes`] reads the block's values, and where they start.
        const VALUES: tandem_avx512::Values;
        const VALUES_AT: usize;
        /// Where the tile finds the block's offset (its scale is always the first two bytes).
        const OFFSET_FROM: tandem_avx512::Offset;
    }

    #[inline(always)]
    fn bytes16(s: &[u8]) -> m128i {
        let mut a = [0u8; 16];
        a.copy_from_slice(&s[..16]);
        m128i::from(a)
    }

    #[inline(always)]
    fn nibbles(qs: &[u8]) -> Values {
        let v = bytes16(qs);
        let mask = set_splat_i8_m128i(0x0f);
        [
            convert_to_i16_m256i_from_u8_m128i(bitand_m128i(v, mask)),
            convert_to_i16_m256i_from_u8_m128i(bitand_m128i(shr_imm_u16_m128i::<4>(v), mask)),
        ]
    }

    struct Q4_0;
    impl Fmt for Q4_0 {
        const FORMAT: BlockFormat = BlockFormat::Q4_0;
        const OFFSET_FROM: tandem_avx512::Offset = tandem_avx512::Offset::MinusEightScales;
        const VALUES: tandem_avx512::Values = tandem_avx512::Values::Nibbles;
        const VALUES_AT: usize = 2;
        const BYTES: usize = 18;
        const OFFSET: bool = true;
        #[inline(always)]
        fn values(block: &[u8]) -> Values {
            nibbles(&block[2..18])
        }
    }

    struct Q4_1;
    impl Fmt for Q4_1 {
        const FORMAT: BlockFormat = BlockFormat::Q4_1;
        const OFFSET_FROM: tandem_avx512::Offset = tandem_avx512::Offset::Stored;
        const VALUES: tandem_avx512::Values = tandem_avx512::Values::Nibbles;
        const VALUES_AT: usize = 4;
        const BYTES: usize = 20;
        const OFFSET: bool = true;
        #[inline(always)]
        fn values(block: &[u8]) -> Values {
            nibbles(&block[4..20])
        }
    }

    struct Q8_0;
    impl Fmt for Q8_0 {
        const FORMAT: BlockFormat = BlockFormat::Q8_0;
        const OFFSET_FROM: tandem_avx512::Offset = tandem_avx512::Offset::None;
        const VALUES: tandem_avx512::Values = tandem_avx512::Values::Bytes;
        const VALUES_AT: usize = 2;
        const BYTES: usize = 34;
        const OFFSET: bool = false;
        #[inline(always)]
        fn values(block: &[u8]) -> Values {
            [
                convert_to_i16_m256i_from_i8_m128i(bytes16(&block[2..18])),
                convert_to_i16_m256i_from_i8_m128i(bytes16(&block[18..34])),
            ]
        }
    }

    #[inline(always)]
    fn half_of(q: &[i16; QK], h: usize) -> m256i {
        let mut a = [0i16; 16];
        a.copy_from_slice(&q[h * 16..h * 16 + 16]);
        m256i::from(a)
    }

    /// Eight lanes of partial sums (two `vpmaddwd` and an add): their total is the block's `P`.
    #[inline(always)]
    fn partials(w: Values, x: &[i16; QK]) -> m256i {
        add_i32_m256i(
            mul_i16_horizontal_add_m256i(w[0], half_of(x, 0)),
            mul_i16_horizontal_add_m256i(w[1], half_of(x, 1)),
        )
    }

    /// The totals of eight vectors, in the lanes of one (integer adds: exact in any order).
    #[inline(always)]
    fn totals(v: [m256i; 8]) -> m256i {
        let h01 = add_horizontal_i32_m256i(v[0], v[1]);
        let h23 = add_horizontal_i32_m256i(v[2], v[3]);
        let h45 = add_horizontal_i32_m256i(v[4], v[5]);
        let h67 = add_horizontal_i32_m256i(v[6], v[7]);
        let q0 = add_horizontal_i32_m256i(h01, h23);
        let q1 = add_horizontal_i32_m256i(h45, h67);
        add_i32_m256i(
            permute2z_m256i::<0x20>(q0, q1),
            permute2z_m256i::<0x31>(q0, q1),
        )
    }

    /// The scales `d` and offsets `m` of eight blocks, one per lane (the values of `Fmt::d` and
    /// `Fmt::m`): each block's first four bytes are loaded whole, then one byte shuffle and one
    /// lane permutation line the eight `d` up in the low half and the eight second halves in the
    /// high half, ready for one conversion each (instead of sixteen separate 16-bit inserts).
    #[inline(always)]
    fn headers<F: Fmt>(blocks: [&[u8]; 8]) -> (m256, m256) {
        let words: [u32; 8] = std::array::from_fn(|t| {
            let b = blocks[t];
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        });
        let lane: [u8; 16] = [0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15];
        let mut mask = [0u8; 32];
        mask[..16].copy_from_slice(&lane);
        mask[16..].copy_from_slice(&lane);
        let packed = shuffle_av_i8z_half_m256i(m256i::from(words), m256i::from(mask));
        // Quadwords [d0-3, h0-3, d4-7, h4-7] to [d0-3, d4-7, h0-3, h4-7].
        let halves: [u16; 16] = shuffle_ai_i64_all_m256i::<0b11_01_10_00>(packed).into();
        let f = |i: usize| f16::from_bits(halves[i]).to_f32();
        let d = m256::from(std::array::from_fn::<f32, 8, _>(f));
        let m = match F::FORMAT {
            BlockFormat::Q4_1 => m256::from(std::array::from_fn::<f32, 8, _>(|i| f(8 + i))),
            BlockFormat::Q4_0 => mul_m256(d, set_splat_m256(-8.0)),
            BlockFormat::Q8_0 => zeroed_m256(),
        };
        (d, m)
    }

    /// One activation row against eight weight rows, one output column per lane.
    #[inline(always)]
    fn eight_columns<F: Fmt>(wr: [&[u8]; 8], x: RowRef<'_>) -> m256 {
        let mut acc = zeroed_m256();
        for (b, xq) in x.q.iter().enumerate() {
            let at = b * F::BYTES;
            let blocks: [&[u8]; 8] = std::array::from_fn(|t| &wr[t][at..at + F::BYTES]);
            let p = totals(std::array::from_fn(|t| partials(F::values(blocks[t]), xq)));
            let (d, m) = headers::<F>(blocks);
            let scale = mul_m256(d, set_splat_m256(x.d[b]));
            acc = fused_mul_add_m256(scale, convert_to_m256_from_i32_m256i(p), acc);
            if F::OFFSET {
                acc = fused_mul_add_m256(m, set_splat_m256(x.s[b]), acc);
            }
        }
        acc
    }

    /// `R` activation rows against eight weight rows: [`eight_columns`] for each row, with each
    /// weight block unpacked once for all `R` (below a group of eight rows, unpacking the weights
    /// costs as much as the products: at `R = 4` a row costs about half). The per-row chain is
    /// `eight_columns`' own; only its integer partial sums are gathered in a different order
    /// (exact either way), so the values are the same bit for bit.
    #[inline(always)]
    fn rows_eight_columns<F: Fmt, const R: usize>(
        wr: [&[u8]; 8],
        xs: [RowRef<'_>; R],
    ) -> [m256; R] {
        let mut acc = [zeroed_m256(); R];
        for b in 0..xs[0].q.len() {
            let at = b * F::BYTES;
            let blocks: [&[u8]; 8] = std::array::from_fn(|t| &wr[t][at..at + F::BYTES]);
            // `totals` taken pairwise as the columns come, so that each row holds two vectors
            // between columns rather than eight.
            let pair = |t: usize| -> [m256i; R] {
                let (v0, v1) = (F::values(blocks[t]), F::values(blocks[t + 1]));
                std::array::from_fn(|r| {
                    add_horizontal_i32_m256i(partials(v0, &xs[r].q[b]), partials(v1, &xs[r].q[b]))
                })
            };
            let (h01, h23) = (pair(0), pair(2));
            let q0: [m256i; R] = std::array::from_fn(|r| add_horizontal_i32_m256i(h01[r], h23[r]));
            let (h45, h67) = (pair(4), pair(6));
            let (d, m) = headers::<F>(blocks);
            for r in 0..R {
                let q1 = add_horizontal_i32_m256i(h45[r], h67[r]);
                let p = add_i32_m256i(
                    permute2z_m256i::<0x20>(q0[r], q1),
                    permute2z_m256i::<0x31>(q0[r], q1),
                );
                let scale = mul_m256(d, set_splat_m256(xs[r].d[b]));
                acc[r] = fused_mul_add_m256(scale, convert_to_m256_from_i32_m256i(p), acc[r]);
                if F::OFFSET {
                    acc[r] = fused_mul_add_m256(m, set_splat_m256(xs[r].s[b]), acc[r]);
                }
            }
        }
        acc
    }

    /// One activation row against one weight row, lane by lane (the columns left over after the
    /// groups of eight).
    fn one_column<F: Fmt>(w: &[u8], x: RowRef<'_>) -> f32 {
        let mut acc = 0f32;
        for (b, xq) in x.q.iter().enumerate() {
            let block = &w[b * F::BYTES..(b + 1) * F::BYTES];
            let lanes: [i32; 8] = partials(F::values(block), xq).into();
            let p: i32 = lanes.iter().sum();
            acc = (F::d(block) * x.d[b]).mul_add(p as f32, acc);
            if F::OFFSET {
                acc = F::m(block).mul_add(x.s[b], acc);
            }
        }
        acc
    }

    /// A weight block unpacked ahead of the batched kernel: its pairs of values packed in `i32`s
    /// (as `xt`'s), its scale and its offset (the AVX-512 tile's type, so that both read it).
    use tandem_avx512::Unpacked;
    const _: () = assert!(PAIRS == tandem_avx512::PAIRS && GROUP == tandem_avx512::GROUP);

    /// Groups `g0` and `g0 + 1` against `C` unpacked weight rows in 512-bit registers, when this
    /// CPU has AVX-512BW: the same values as [`groups_against`] with `NG = 2`, bit for bit (16
    /// lanes per register instead of 8, each lane the same operations).
    #[inline(always)]
    fn two_groups_wide<const C: usize>(
        w: &[Unpacked],
        x: &Q16Rows,
        g0: usize,
        offset: bool,
    ) -> Option<[[f32; 16]; C]> {
        let nb = x.blocks;
        let group = |g: usize| tandem_avx512::Group {
            xt: &x.xt[g * nb * PAIRS * GROUP..(g + 1) * nb * PAIRS * GROUP],
            dt: &x.dt[g * nb * GROUP..(g + 1) * nb * GROUP],
            st: &x.st[g * nb * GROUP..(g + 1) * nb * GROUP],
        };
        tandem_avx512::tile16::<C>(w, [group(g0), group(g0 + 1)], nb, offset)
    }

    #[inline(always)]
    fn unpack<F: Fmt>(block: &[u8]) -> Unpacked {
        let [lo, hi] = F::values(block);
        let (lo, hi): ([i32; 8], [i32; 8]) = (lo.into(), hi.into());
        Unpacked {
            pairs: std::array::from_fn(|t| if t < 8 { lo[t] } else { hi[t - 8] }),
            d: F::d(block),
            m: F::m(block),
        }
    }

    /// `NG` groups of eight activation rows (from group `g0`) against `C` unpacked weight rows
    /// (`w[b * C + j]`), one activation row per lane: each pair of weight values is broadcast and
    /// multiplied with the same pair of eight rows.
    #[inline(always)]
    fn groups_against<const NG: usize, const C: usize>(
        w: &[Unpacked],
        x: &Q16Rows,
        g0: usize,
        offset: bool,
    ) -> [[m256; C]; NG] {
        let nb = x.blocks;
        let mut acc = [[zeroed_m256(); C]; NG];
        for b in 0..nb {
            let wb = &w[b * C..(b + 1) * C];
            let xt: [&[i32]; NG] = std::array::from_fn(|g| {
                let base = ((g0 + g) * nb + b) * PAIRS * GROUP;
                &x.xt[base..base + PAIRS * GROUP]
            });
            let mut p = [[zeroed_m256i(); C]; NG];
            // Two pairs per pass: the loop's own counting otherwise costs a tenth of its
            // instructions when four weight rows keep it from being unrolled whole.
            let mut pair = |t: usize| {
                let xv: [m256i; NG] = std::array::from_fn(|g| {
                    let mut a = [0i32; 8];
                    a.copy_from_slice(&xt[g][t * GROUP..(t + 1) * GROUP]);
                    m256i::from(a)
                });
                for j in 0..C {
                    let wv = set_splat_i32_m256i(wb[j].pairs[t]);
                    for g in 0..NG {
                        p[g][j] = add_i32_m256i(p[g][j], mul_i16_horizontal_add_m256i(xv[g], wv));
                    }
                }
            };
            for t in (0..PAIRS).step_by(2) {
                pair(t);
                pair(t + 1);
            }
            for g in 0..NG {
                let at = ((g0 + g) * nb + b) * GROUP;
                let mut a = [0f32; 8];
                a.copy_from_slice(&x.dt[at..at + GROUP]);
                let dx = m256::from(a);
                a.copy_from_slice(&x.st[at..at + GROUP]);
                let sx = m256::from(a);
                for j in 0..C {
                    let scale = mul_m256(set_splat_m256(wb[j].d), dx);
                    acc[g][j] = fused_mul_add_m256(
                        scale,
                        convert_to_m256_from_i32_m256i(p[g][j]),
                        acc[g][j],
                    );
                    if offset {
                        acc[g][j] = fused_mul_add_m256(set_splat_m256(wb[j].m), sx, acc[g][j]);
                    }
                }
            }
        }
        acc
    }

    /// The pairs of groups from `g_start` (up to `g_end`) against every weight row with the
    /// AVX-512 VNNI tile ([`tandem_avx512::rows16_bytes`], which reads the rows as stored: no
    /// unpacking pass), the same values as [`two_groups_wide`] bit for bit; returns the first group
    /// it left for the other kernels (all of them where the CPU lacks the tile).
    fn pairs_bytes<F: Fmt>(
        wrows: &[u8],
        row_bytes: usize,
        x: &Q16Rows,
        (g_start, g_end): (usize, usize),
        rows: &Range<usize>,
        out: &mut [&mut [f32]],
    ) -> usize {
        const QUADS: usize = tandem_avx512::QUADS;
        if x.ql.is_empty() || g_end < g_start + 2 {
            return g_start;
        }
        let nb = x.blocks;
        let n = wrows.len() / row_bytes;
        let w = tandem_avx512::WeightBytes {
            bytes: wrows,
            row_bytes,
            block_bytes: F::BYTES,
            values_at: F::VALUES_AT,
            values: F::VALUES,
            offset: F::OFFSET_FROM,
        };
        let group = |g: usize| tandem_avx512::Quads {
            lo: &x.ql[g * nb * QUADS * GROUP..(g + 1) * nb * QUADS * GROUP],
            hi: &x.qh[g * nb * QUADS * GROUP..(g + 1) * nb * QUADS * GROUP],
            hsum: &x.qhs[g * nb * GROUP..(g + 1) * nb * GROUP],
            dt: &x.dt[g * nb * GROUP..(g + 1) * nb * GROUP],
            st: &x.st[g * nb * GROUP..(g + 1) * nb * GROUP],
        };
        let mut lanes = vec![[0f32; 16]; n];
        let mut g = g_start;
        while g_end - g >= 2 {
            if !tandem_avx512::rows16_bytes(&w, [group(g), group(g + 1)], nb, &mut lanes) {
                return g;
            }
            let r0 = g * GROUP;
            // A padded group's zero rows are dropped here.
            for (i, r) in (r0..rows.end.min(r0 + 2 * GROUP)).enumerate() {
                for (o, l) in out[r - rows.start][..n].iter_mut().zip(&lanes) {
                    *o = l[i];
                }
            }
            g += 2;
        }
        g
    }

    pub(super) fn run(
        format: BlockFormat,
        wrows: &[u8],
        row_bytes: usize,
        x: &Q16Rows,
        rows: Range<usize>,
        out: &mut [&mut [f32]],
    ) {
        match format {
            BlockFormat::Q4_0 => run_fmt::<Q4_0>(wrows, row_bytes, x, rows, out),
            BlockFormat::Q4_1 => run_fmt::<Q4_1>(wrows, row_bytes, x, rows, out),
            BlockFormat::Q8_0 => run_fmt::<Q8_0>(wrows, row_bytes, x, rows, out),
        }
    }

    fn run_fmt<F: Fmt>(
        wrows: &[u8],
        row_bytes: usize,
        x: &Q16Rows,
        rows: Range<usize>,
        out: &mut [&mut [f32]],
    ) {
        let n = wrows.len() / row_bytes;
        let wrow = |j: usize| &wrows[j * row_bytes..(j + 1) * row_bytes];
        // The groups of eight inside `rows` go through the batched kernel (the padded last one
        // when `rows` runs to the last row), the rows around them in fours or one at a time.
        let g_start = rows.start.div_ceil(GROUP);
        let whole = (rows.end / GROUP).min(x.groups);
        let padded = rows.end == x.rows() && x.groups > whole;
        let g_end = (whole + usize::from(padded)).max(g_start);
        let grouped = if g_end > g_start {
            g_start * GROUP..(g_end * GROUP).min(rows.end)
        } else {
            rows.end..rows.end
        };

        // Pairs of groups through the VNNI tile where the CPU has it, the rest below.
        let g_start = pairs_bytes::<F>(wrows, row_bytes, x, (g_start, g_end), &rows, out);

        // Columns outside, groups inside: a tile of weight rows is unpacked once for all groups.
        let blank = Unpacked {
            pairs: [0; PAIRS],
            d: 0.0,
            m: 0.0,
        };
        let mut buf: Vec<Unpacked> = vec![blank; if g_end > g_start { x.blocks * 4 } else { 0 }];
        let mut j = 0;
        macro_rules! cols_of {
            ($c:literal) => {
                while g_end > g_start && n - j >= $c {
                    let tiles = buf[..x.blocks * $c].as_chunks_mut::<$c>().0;
                    for t in 0..$c {
                        let w = wrow(j + t);
                        for (tile, block) in tiles.iter_mut().zip(w.chunks_exact(F::BYTES)) {
                            tile[t] = unpack::<F>(block);
                        }
                    }
                    // The next tile's weight rows are fetched from memory while this one computes
                    // (at batch 16 the unpacking above otherwise waits on DRAM: the model is three
                    // times this CPU's L3). One tile ahead measured best (`batch_decode`, batch 16:
                    // 18.2-22.3 ms against 20.5-24.4 without; two or four tiles ahead in between).
                    if n - j >= 2 * $c {
                        tandem_avx512::prefetch(
                            &wrows[(j + $c) * row_bytes..(j + 2 * $c) * row_bytes],
                        );
                    }
                    let mut g = g_start;
                    macro_rules! groups_of {
                        ($ng:literal) => {
                            while g_end - g >= $ng {
                                let acc = groups_against::<$ng, $c>(&buf, x, g, F::OFFSET);
                                for (gi, accs) in acc.iter().enumerate() {
                                    for (t, a) in accs.iter().enumerate() {
                                        let lanes: [f32; 8] = (*a).into();
                                        let r0 = (g + gi) * GROUP;
                                        // A padded group's zero rows are dropped here.
                                        for (r, v) in (r0..rows.end.min(r0 + GROUP)).zip(lanes) {
                                            out[r - rows.start][j + t] = v;
                                        }
                                    }
                                }
                                g += $ng;
                            }
                        };
                    }
                    // Pairs of groups in 512-bit registers where the CPU has them.
                    while g_end - g >= 2 {
                        let Some(tile) = two_groups_wide::<$c>(&buf, x, g, F::OFFSET) else {
                            break;
                        };
                        let r0 = g * GROUP;
                        for (t, lanes) in tile.iter().enumerate() {
                            // A padded group's zero rows are dropped here.
                            for (r, v) in (r0..rows.end.min(r0 + 2 * GROUP)).zip(lanes) {
                                out[r - rows.start][j + t] = *v;
                            }
                        }
                        g += 2;
                    }
                    groups_of!(2);
                    groups_of!(1);
                    j += $c;
                }
            };
        }
        cols_of!(4);
        cols_of!(2);
        cols_of!(1);

        // The rows around the groups: in fours while there are four, then one at a time.
        let before = few_rows::<F>(
            wrows,
            row_bytes,
            x,
            rows.start..grouped.start,
            rows.start,
            out,
        );
        let after = few_rows::<F>(wrows, row_bytes, x, grouped.end..rows.end, rows.start, out);
        for r in before.chain(after) {
            let xr = x.row(r);
            let o = &mut *out[r - rows.start];
            let mut j = 0;
            while n - j >= 8 {
                // The next eight weight rows come from memory while these compute: a lone row is
                // bound by streaming the weights, and the hardware's prefetchers alone left a third
                // of its time waiting (`batch_decode`, batch 1: 3.4-3.5 ms a step against 5.2-5.5).
                if n - j >= 16 {
                    tandem_avx512::prefetch(&wrows[(j + 8) * row_bytes..(j + 16) * row_bytes]);
                }
                let wr: [&[u8]; 8] = std::array::from_fn(|t| wrow(j + t));
                let lanes: [f32; 8] = eight_columns::<F>(wr, xr).into();
                o[j..j + 8].copy_from_slice(&lanes);
                j += 8;
            }
            for (jj, v) in o[j..n].iter_mut().enumerate() {
                *v = one_column::<F>(wrow(j + jj), xr);
            }
        }
    }

    /// The rows `loose` of `x` (`out[r - first]` is row `r`'s output) in fours through
    /// [`rows_eight_columns`]; returns the rows left over (fewer than four). Fours only: pairs
    /// measured no faster than single rows (`batch_decode`: batch 2 and 3 within noise, batch 4
    /// 1.2-1.3x). Kept out of `run_fmt`: inlined there, it cost the single-row loop a fifth to a
    /// third of its speed.
    #[inline(never)]
    fn few_rows<F: Fmt>(
        wrows: &[u8],
        row_bytes: usize,
        x: &Q16Rows,
        loose: Range<usize>,
        first: usize,
        out: &mut [&mut [f32]],
    ) -> Range<usize> {
        let n = wrows.len() / row_bytes;
        let n8 = n - n % 8;
        let wrow = |j: usize| &wrows[j * row_bytes..(j + 1) * row_bytes];
        let mut r0 = loose.start;
        while loose.end - r0 >= 4 {
            let xs: [RowRef<'_>; 4] = std::array::from_fn(|i| x.row(r0 + i));
            for j in (0..n8).step_by(8) {
                // As for a lone row (batch 4: 7.4-7.6 ms a step against 9.7-10.0 without).
                if n8 - j >= 16 {
                    tandem_avx512::prefetch(&wrows[(j + 8) * row_bytes..(j + 16) * row_bytes]);
                }
                let wr: [&[u8]; 8] = std::array::from_fn(|t| wrow(j + t));
                let accs = rows_eight_columns::<F, 4>(wr, xs);
                for (r, a) in (r0..).zip(accs) {
                    let lanes: [f32; 8] = a.into();
                    out[r - first][j..j + 8].copy_from_slice(&lanes);
                }
            }
            for (r, xr) in (r0..).zip(xs) {
                for (jj, v) in out[r - first][n8..n].iter_mut().enumerate() {
                    *v = one_column::<F>(wrow(n8 + jj), xr);
                }
            }
            r0 += 4;
        }
        r0..loose.end
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
    fn rounding_a_block_gives_the_portable_values() {
        let mut seed = 17;
        for case in 0..400 {
            let mut x: [f32; QK] = std::array::from_fn(|_| {
                let u = lcg(&mut seed) as f32 / (1u64 << 31) as f32;
                (u - 0.5) * 10f32.powi((case % 7) as i32 - 3)
            });
            match case % 5 {
                // Ties: values that land on half steps of the block's scale.
                1 => {
                    x[0] = 32767.0;
                    for (i, v) in x.iter_mut().enumerate().skip(1) {
                        *v = (i as f32 - 16.0) * 0.5;
                    }
                }
                2 => x[(case / 5) % QK] = f32::NAN,
                3 => x[(case / 5) % QK] = f32::NEG_INFINITY,
                4 => x = [0.0; QK],
                _ => {}
            }
            let (mut a, mut b) = ([0i16; QK], [0i16; QK]);
            let (da, sa) = round_block(&x, &mut a);
            let (db, sb) = round_block_portable(&x, &mut b);
            assert_eq!(
                (da.to_bits(), sa, a),
                (db.to_bits(), sb, b),
                "case {case}: {x:?}"
            );
        }
    }

    #[test]
    fn splitting_a_block_into_bytes_gives_the_portable_values() {
        let mut seed = 23;
        for case in 0..200 {
            let q: [i16; QK] = std::array::from_fn(|e| match (case + e) % 9 {
                0 => 32767,
                1 => -32767,
                2 => -1,
                3 => 255,
                4 => -256,
                _ => (lcg(&mut seed) % 65535) as i32 as i16,
            });
            let (lo, hi, hs) = split_block(&q);
            assert_eq!((lo, hi, hs), split_block_portable(&q), "case {case}");
            // And the bytes recombine to the values.
            for (e, v) in q.iter().enumerate() {
                let l = lo[e / 4].to_le_bytes()[e % 4] as i32;
                let h = hi[e / 4].to_le_bytes()[e % 4] as i8 as i32;
                assert_eq!(256 * h + l, *v as i32);
            }
        }
    }

    fn segments(v: &mut [f32], n: usize) -> Vec<&mut [f32]> {
        v.chunks_mut(n).collect()
    }

    #[test]
    fn every_kernel_gives_the_portable_value_bit_for_bit() {
        let mut seed = 5;
        for format in [BlockFormat::Q4_0, BlockFormat::Q4_1, BlockFormat::Q8_0] {
            for &(n, k) in &[(9usize, 64usize), (7, 576), (4, 32), (19, 96)] {
                let w = random_rows(format, n, k, &mut seed);
                let rb = format.row_bytes(k);
                for m in [
                    1usize, 2, 3, 4, 5, 6, 7, 8, 11, 13, 15, 16, 19, 22, 27, 30, 32,
                ] {
                    let x = Q16Rows::quantize(&random_x(m * k, &mut seed), k);
                    let mut got = vec![0f32; m * n];
                    rows_times_weights(format, &w, rb, &x, 0..m, &mut segments(&mut got, n));
                    let mut want = vec![0f32; m * n];
                    portable_run(format, &w, rb, &x, 0..m, &mut segments(&mut want, n));
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "{format:?} n={n} k={k} m={m}");
                    // A range of rows writes those rows only, from the start of `out`, whether
                    // or not it starts and ends on a group of eight.
                    for start in [2, 3, 8] {
                        if m > start {
                            let mut part = vec![0f32; (m - start) * n];
                            rows_times_weights(
                                format,
                                &w,
                                rb,
                                &x,
                                start..m,
                                &mut segments(&mut part, n),
                            );
                            assert_eq!(bits(&part), bits(&want[start * n..]), "rows {start}..{m}");
                        }
                    }
                    if m > 12 {
                        let mut mid = vec![0f32; 7 * n];
                        rows_times_weights(format, &w, rb, &x, 5..12, &mut segments(&mut mid, n));
                        assert_eq!(bits(&mid), bits(&want[5 * n..12 * n]), "rows 5..12");
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
            let mut out = [0f32; 3];
            rows_times_weights(
                format,
                &w,
                format.row_bytes(k),
                &x,
                0..1,
                &mut [&mut out[..]],
            );
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
