//! The batched 16-bit decode kernel's inner tile in 512-bit registers, for CPUs with AVX-512BW,
//! picked at run time (the workspace builds for `x86-64-v3`, which has no AVX-512): [`tile16`]
//! on unpacked weights, and [`rows16_bytes`], where the CPU also has AVX-512 VNNI, on the weights
//! as stored. And [`prefetch`], a cache hint.
//!
//! This crate exists to hold the `unsafe` that runtime dispatch needs: a function compiled for a
//! feature the build target lacks can only be called through `unsafe`, after checking the CPU has
//! it, and 512-bit loads take pointers. Everything here is checked before that: [`tile16`] and
//! [`rows16_bytes`] assert every slice length they read and call their kernels only when the CPU
//! reports the features. The engine (which forbids `unsafe`) calls the safe wrappers and falls
//! back to its AVX2 kernel when they return `None` or `false`.
//!
//! What the tile computes is the engine's grouped tile (`kernels/q16.rs`, `groups_against`) for
//! two groups of eight activation rows at once, one row per 32-bit lane of a 512-bit register: per
//! weight block, the exact integer product of each row's 16-bit activations with the block's
//! values (`vpmaddwd` and 32-bit adds, exact in any order), then per lane the same float chain,
//! `acc = fma(d_w * d_x, P, acc)` and, with an offset, `acc = fma(m_w, s_x, acc)`. Lane for lane
//! these are the AVX2 kernel's operations, so the outputs are the same bit for bit (the engine's
//! kernel test compares them).

/// Pairs of 16-bit values in a block of 32.
pub const PAIRS: usize = 16;
/// Activation rows in one group of the engine's transposed layout.
pub const GROUP: usize = 8;

/// A weight block unpacked for the grouped tile: its 32 values as pairs of 16-bit integers packed
/// in `i32`s (low half the even value), its scale and its offset.
#[derive(Debug, Clone, Copy)]
pub struct Unpacked {
    pub pairs: [i32; PAIRS],
    pub d: f32,
    pub m: f32,
}

/// One group of eight activation rows in the engine's transposed layout, over all `nb` blocks of
/// a row: `xt[(b * PAIRS + t) * GROUP + i]` is the `t`-th pair of block `b` of the group's row `i`,
/// `dt[b * GROUP + i]` its scale and `st[b * GROUP + i]` its scale times its sum.
#[derive(Debug, Clone, Copy)]
pub struct Group<'a> {
    pub xt: &'a [i32],
    pub dt: &'a [f32],
    pub st: &'a [f32],
}

/// Whether [`tile16`] runs here: the CPU has AVX-512F and AVX-512BW, and the environment does not
/// say `TANDEM_AVX512=0` (which keeps the AVX2 kernel, to compare the two in one binary). Read once.
pub fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| switched_on("TANDEM_AVX512") && cpu_has_it())
}

/// Whether the environment leaves `var` unset or set to anything but `0`.
fn switched_on(var: &str) -> bool {
    std::env::var(var).map_or(true, |v| v != "0")
}

fn cpu_has_it() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Two groups of eight activation rows (`groups[0]`'s rows in lanes 0-7, `groups[1]`'s in 8-15)
/// against `C` unpacked weight rows (`w[b * C + j]` is block `b` of weight row `j`), `nb` blocks
/// each: returns the 16 lanes of each of the `C` outputs, or `None` when the CPU lacks AVX-512BW.
/// `offset`: add each block's `m * s` term (formats with an offset).
///
/// # Panics
/// When a slice is shorter than `nb` blocks need.
pub fn tile16<const C: usize>(
    w: &[Unpacked],
    groups: [Group<'_>; 2],
    nb: usize,
    offset: bool,
) -> Option<[[f32; 16]; C]> {
    if !available() {
        return None;
    }
    tile16_here::<C>(w, groups, nb, offset)
}

/// [`tile16`] whatever the environment says (the CPU is still checked).
fn tile16_here<const C: usize>(
    w: &[Unpacked],
    groups: [Group<'_>; 2],
    nb: usize,
    offset: bool,
) -> Option<[[f32; 16]; C]> {
    if !cpu_has_it() {
        return None;
    }
    assert!(
        w.len() >= nb * C,
        "{} weight blocks for {nb} x {C}",
        w.len()
    );
    for g in &groups {
        assert!(
            g.xt.len() >= nb * PAIRS * GROUP,
            "a group's pairs are short"
        );
        assert!(g.dt.len() >= nb * GROUP && g.st.len() >= nb * GROUP);
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F and AVX-512BW (checked above), and every slice holds what
        // `nb` blocks read (asserted above); the kernel reads nothing else.
        #[allow(unsafe_code)]
        let out = unsafe { x86::tile16::<C>(w, groups, nb, offset) };
        Some(out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// How a weight block holds its 32 values (at `values_at` in the block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Values {
    /// 16 bytes, unsigned 4-bit values: byte `i`'s low nibble is value `i`, its high nibble value
    /// `16 + i` (Q4_0, Q4_1).
    Nibbles,
    /// 32 signed bytes, value `i` in byte `i` (Q8_0).
    Bytes,
}

/// Where a weight block's offset `m` (`w = q·d + m`) comes from; its scale `d` is always the
/// little-endian f16 in its first two bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offset {
    /// No offset (Q8_0).
    None,
    /// The f16 in bytes 2..4 (Q4_1).
    Stored,
    /// `-8·d` (Q4_0).
    MinusEightScales,
}

/// A run of quantized weight rows as stored, one after another: row `j` is
/// `bytes[j * row_bytes..]`, `nb` blocks of `block_bytes` each.
#[derive(Debug, Clone, Copy)]
pub struct WeightBytes<'a> {
    pub bytes: &'a [u8],
    pub row_bytes: usize,
    pub block_bytes: usize,
    pub values_at: usize,
    pub values: Values,
    pub offset: Offset,
}

/// Values in one group of [`Quads`]: four consecutive values of a block (`4t..4t + 4`).
pub const QUADS: usize = 8;

/// One group of eight activation rows with each 16-bit value `x` split into bytes, `x = 256·h + l`
/// (`l` unsigned, `h` signed), four values to an `i32`: `lo[(b * QUADS + t) * GROUP + i]` holds
/// the low bytes of values `4t..4t + 4` of block `b` of the group's row `i`, `hi` the high bytes,
/// `hsum[b * GROUP + i]` is `128 · Σh` over the block, and `dt`, `st` are as [`Group`]'s.
#[derive(Debug, Clone, Copy)]
pub struct Quads<'a> {
    pub lo: &'a [i32],
    pub hi: &'a [i32],
    pub hsum: &'a [i32],
    pub dt: &'a [f32],
    pub st: &'a [f32],
}

/// Whether [`rows16_bytes`] runs here: [`available`], the CPU has AVX-512 VNNI, and the
/// environment does not say `TANDEM_VNNI=0` (which keeps [`tile16`], to compare the two). Read once.
pub fn bytes_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| switched_on("TANDEM_VNNI") && available() && cpu_has_vnni())
}

fn cpu_has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        cpu_has_it() && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`tile16`]'s outputs, bit for bit, for the weight rows `0..out.len()` of `w` against two
/// groups of activation rows split into bytes: `out[j][lane]`. Each block's exact integer product
/// comes from `vpdpbusd` (four byte products summed per lane) on the low and the high bytes,
/// `P = 256·P_h + P_l`, then the same float chain. No unpacking pass: the tile takes four weight
/// values per broadcast straight from the rows, and converts each block's scale and offset
/// itself; one instruction per four products and byte half, where [`tile16`] needs two per
/// pair. Eight weight rows at a time (then four, then one), the next eight prefetched meanwhile.
/// Returns `false`, having written nothing, when the CPU lacks AVX-512 VNNI or the environment
/// says `TANDEM_AVX512=0` or `TANDEM_VNNI=0`.
///
/// Exactness: per block `|P_l| <= 32·255·128` and `|P_h| <= 32·128·128` (Q8_0's signed values go
/// through `vpdpbusd` as `q + 128`, a sum of at most `32·255·128` before `128·Σh` comes off), so
/// every sum, and `256·P_h + P_l`, fits an `i32`.
///
/// # Panics
/// When a slice is shorter than `nb` blocks of `out.len()` rows need, or the layout does not fit
/// in a block.
pub fn rows16_bytes(
    w: &WeightBytes<'_>,
    groups: [Quads<'_>; 2],
    nb: usize,
    out: &mut [[f32; 16]],
) -> bool {
    bytes_available() && rows16_bytes_here(w, groups, nb, out)
}

/// [`rows16_bytes`] whatever the environment says (the CPU is still checked).
fn rows16_bytes_here(
    w: &WeightBytes<'_>,
    groups: [Quads<'_>; 2],
    nb: usize,
    out: &mut [[f32; 16]],
) -> bool {
    if !cpu_has_vnni() {
        return false;
    }
    let width = match w.values {
        Values::Nibbles => 16,
        Values::Bytes => 32,
    };
    assert!(
        w.values_at + width <= w.block_bytes && w.block_bytes >= 4,
        "a block's layout does not fit in it"
    );
    assert!(
        w.row_bytes >= nb * w.block_bytes,
        "a row holds fewer than nb blocks"
    );
    assert!(
        w.bytes.len() >= out.len() * w.row_bytes,
        "fewer weight rows than outputs"
    );
    for g in &groups {
        assert!(g.lo.len() >= nb * QUADS * GROUP && g.hi.len() >= nb * QUADS * GROUP);
        assert!(g.hsum.len() >= nb * GROUP && g.dt.len() >= nb * GROUP && g.st.len() >= nb * GROUP);
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: the CPU has AVX-512F, BW and VNNI (checked above), and every slice holds what
        // `nb` blocks of `out.len()` rows read (asserted above); the kernel reads nothing else.
        #[allow(unsafe_code)]
        unsafe {
            x86::rows16_bytes(w, groups, nb, out)
        };
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Asks the CPU to bring `items` into its caches ahead of use, one prefetch per 64-byte line,
/// and returns at once (nothing waits for the lines). A hint only: it changes no value, and it
/// does nothing on other architectures.
#[inline]
pub fn prefetch<T>(items: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = items.as_ptr().cast::<i8>();
        for at in (0..std::mem::size_of_val(items)).step_by(64) {
            // SAFETY: `prefetcht0` reads nothing architecturally and cannot fault, whatever the
            // address; here every address is inside the live slice anyway. SSE is part of
            // x86-64's baseline.
            #[allow(unsafe_code)]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    start.wrapping_add(at),
                );
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = items;
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{GROUP, Group, Offset, PAIRS, QUADS, Quads, Unpacked, Values, WeightBytes};

    /// Eight values at `lo` (lanes 0-7) and eight at `hi` (lanes 8-15) in one register.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn two_halves_i32(lo: *const i32, hi: *const i32) -> __m512i {
        // SAFETY (caller): each pointer has eight readable i32s.
        unsafe {
            let l = _mm256_loadu_si256(lo.cast());
            let h = _mm256_loadu_si256(hi.cast());
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(l), h)
        }
    }

    /// The same for floats (moved as their bits).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn two_halves_f32(lo: *const f32, hi: *const f32) -> __m512 {
        // SAFETY (caller): each pointer has eight readable f32s.
        unsafe { _mm512_castsi512_ps(two_halves_i32(lo.cast(), hi.cast())) }
    }

    /// # Safety
    /// The CPU has AVX-512F and AVX-512BW; `w` has `nb * C` blocks and each group's
    /// slices hold `nb` blocks.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn tile16<const C: usize>(
        w: &[Unpacked],
        g: [Group<'_>; 2],
        nb: usize,
        offset: bool,
    ) -> [[f32; 16]; C] {
        let mut acc = [_mm512_setzero_ps(); C];
        for b in 0..nb {
            let wb = &w[b * C..(b + 1) * C];
            let (x0, x1) = (
                g[0].xt[b * PAIRS * GROUP..].as_ptr(),
                g[1].xt[b * PAIRS * GROUP..].as_ptr(),
            );
            let mut p = [_mm512_setzero_si512(); C];
            for t in 0..PAIRS {
                // SAFETY: block `b`'s pairs are `PAIRS * GROUP` i32s from x0 and x1 (the
                // caller's lengths), and `t * GROUP + 8 <= PAIRS * GROUP`.
                let xv = unsafe { two_halves_i32(x0.add(t * GROUP), x1.add(t * GROUP)) };
                for j in 0..C {
                    let wv = _mm512_set1_epi32(wb[j].pairs[t]);
                    p[j] = _mm512_add_epi32(p[j], _mm512_madd_epi16(xv, wv));
                }
            }
            let at = b * GROUP;
            let (d0, d1) = (g[0].dt[at..].as_ptr(), g[1].dt[at..].as_ptr());
            let (s0, s1) = (g[0].st[at..].as_ptr(), g[1].st[at..].as_ptr());
            // SAFETY: eight scales and sums per group from `at` (the caller's lengths).
            let (dx, sx) = unsafe { (two_halves_f32(d0, d1), two_halves_f32(s0, s1)) };
            for j in 0..C {
                let scale = _mm512_mul_ps(_mm512_set1_ps(wb[j].d), dx);
                acc[j] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(p[j]), acc[j]);
                if offset {
                    acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(wb[j].m), sx, acc[j]);
                }
            }
        }
        let mut out = [[0f32; 16]; C];
        for (o, a) in out.iter_mut().zip(acc) {
            // SAFETY: `o` has 16 writable f32s.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
        }
        out
    }

    /// The four bytes at `p`, broadcast.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn word_at(p: *const u8) -> __m512i {
        // SAFETY (caller): four readable bytes at `p`.
        _mm512_set1_epi32(unsafe { p.cast::<i32>().read_unaligned() })
    }

    /// # Safety
    /// The CPU has AVX-512F, AVX-512BW, AVX-512 VNNI and F16C; `w.bytes` holds `out.len()` rows
    /// of `nb` blocks and each group `nb` blocks (the caller's assertions).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    pub(super) unsafe fn rows16_bytes(
        w: &WeightBytes<'_>,
        g: [Quads<'_>; 2],
        nb: usize,
        out: &mut [[f32; 16]],
    ) {
        let n = out.len();
        let row = |j: usize| w.bytes[j * w.row_bytes..].as_ptr();
        let mut store = |j: usize, acc: &[__m512]| {
            for (o, a) in out[j..j + acc.len()].iter_mut().zip(acc) {
                // SAFETY: `o` has 16 writable f32s.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *a) };
            }
        };
        let mut j = 0;
        while n - j >= 8 {
            // The next eight rows come from memory while these compute.
            let ahead = &w.bytes[((j + 8) * w.row_bytes).min(w.bytes.len())
                ..((j + 16) * w.row_bytes).min(n * w.row_bytes)];
            // SAFETY: rows `j..j + 8` exist (`j + 8 <= n`), the caller's assertions for the rest.
            store(j, &unsafe { tile::<8>(w, row(j), g, nb, ahead) });
            j += 8;
        }
        if n - j >= 4 {
            // SAFETY: as above, four rows.
            store(j, &unsafe { tile::<4>(w, row(j), g, nb, &[]) });
            j += 4;
        }
        while j < n {
            // SAFETY: as above, one row.
            store(j, &unsafe { tile::<1>(w, row(j), g, nb, &[]) });
            j += 1;
        }
    }

    /// `C` weight rows from `first` (each `w.row_bytes` apart) against the two groups.
    ///
    /// # Safety
    /// As [`rows16_bytes`], and `C` rows of `nb` blocks from `first`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c")]
    unsafe fn tile<const C: usize>(
        w: &WeightBytes<'_>,
        first: *const u8,
        g: [Quads<'_>; 2],
        nb: usize,
        ahead: &[u8],
    ) -> [__m512; C] {
        let low4 = _mm512_set1_epi8(0x0f);
        let flip = _mm512_set1_epi8(-128);
        let rows: [*const u8; C] = std::array::from_fn(|j| first.wrapping_add(j * w.row_bytes));
        let (lo0, lo1, hi0, hi1) = (
            g[0].lo.as_ptr(),
            g[1].lo.as_ptr(),
            g[0].hi.as_ptr(),
            g[1].hi.as_ptr(),
        );
        let mut acc = [_mm512_setzero_ps(); C];
        let share = ahead.len().div_ceil(nb.max(1));
        for b in 0..nb {
            super::prefetch(
                &ahead[(b * share).min(ahead.len())..((b + 1) * share).min(ahead.len())],
            );
            let q = |t: usize| b * QUADS * GROUP + t * GROUP;
            // SAFETY (these loads): each group's `lo` and `hi` hold `nb * QUADS * GROUP` i32s.
            let lo = |t: usize| unsafe { two_halves_i32(lo0.add(q(t)), lo1.add(q(t))) };
            let hi = |t: usize| unsafe { two_halves_i32(hi0.add(q(t)), hi1.add(q(t))) };
            let at = b * w.block_bytes + w.values_at;
            let mut pl = [_mm512_setzero_si512(); C];
            let mut ph = [_mm512_setzero_si512(); C];
            match w.values {
                Values::Nibbles => {
                    for t in 0..4 {
                        let (l0, h0, l1, h1) = (lo(t), hi(t), lo(t + 4), hi(t + 4));
                        for j in 0..C {
                            // SAFETY: the block's 16 value bytes are in the row.
                            let r = unsafe { word_at(rows[j].add(at + 4 * t)) };
                            let v0 = _mm512_and_si512(r, low4);
                            let v1 = _mm512_and_si512(_mm512_srli_epi16::<4>(r), low4);
                            // Values 0..16 are valid as either operand's bytes.
                            pl[j] = _mm512_dpbusd_epi32(pl[j], l0, v0);
                            ph[j] = _mm512_dpbusd_epi32(ph[j], v0, h0);
                            pl[j] = _mm512_dpbusd_epi32(pl[j], l1, v1);
                            ph[j] = _mm512_dpbusd_epi32(ph[j], v1, h1);
                        }
                    }
                }
                Values::Bytes => {
                    for t in 0..QUADS {
                        let (l, h) = (lo(t), hi(t));
                        for j in 0..C {
                            // SAFETY: the block's 32 value bytes are in the row.
                            let v = unsafe { word_at(rows[j].add(at + 4 * t)) };
                            pl[j] = _mm512_dpbusd_epi32(pl[j], l, v);
                            // Signed values as unsigned bytes `v + 128`; `128·Σh` comes off below.
                            ph[j] = _mm512_dpbusd_epi32(ph[j], _mm512_xor_si512(v, flip), h);
                        }
                    }
                    let at = b * GROUP;
                    // SAFETY: eight sums per group from `at`.
                    let hs = unsafe {
                        two_halves_i32(g[0].hsum[at..].as_ptr(), g[1].hsum[at..].as_ptr())
                    };
                    for p in &mut ph {
                        *p = _mm512_sub_epi32(*p, hs);
                    }
                }
            }
            let at = b * GROUP;
            let (d0, d1) = (g[0].dt[at..].as_ptr(), g[1].dt[at..].as_ptr());
            let (s0, s1) = (g[0].st[at..].as_ptr(), g[1].st[at..].as_ptr());
            // SAFETY: eight scales and sums per group from `at`.
            let (dx, sx) = unsafe { (two_halves_f32(d0, d1), two_halves_f32(s0, s1)) };
            for j in 0..C {
                let p = _mm512_add_epi32(_mm512_slli_epi32::<8>(ph[j]), pl[j]);
                // The block's scale and offset, f16 to f32 (exact).
                // SAFETY: a block's first four bytes are in the row.
                let header = unsafe {
                    rows[j]
                        .add(b * w.block_bytes)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(header));
                let d = _mm512_broadcastss_ps(dm);
                let scale = _mm512_mul_ps(d, dx);
                acc[j] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(p), acc[j]);
                let m = match w.offset {
                    Offset::None => continue,
                    Offset::Stored => _mm512_broadcastss_ps(_mm_movehdup_ps(dm)),
                    Offset::MinusEightScales => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
                };
                acc[j] = _mm512_fmadd_ps(m, sx, acc[j]);
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed pseudo-random sequence (a 64-bit LCG's high bits).
    fn lcg(mut seed: u64) -> impl FnMut() -> u32 {
        move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        }
    }

    /// The tile's definition, lane by lane, in plain Rust: the exact integer product of each block,
    /// then the float chain.
    fn reference<const C: usize>(
        w: &[Unpacked],
        groups: [Group<'_>; 2],
        nb: usize,
        offset: bool,
    ) -> [[f32; 16]; C] {
        let mut out = [[0f32; 16]; C];
        for (j, o) in out.iter_mut().enumerate() {
            for (lane, v) in o.iter_mut().enumerate() {
                let (g, i) = (&groups[lane / GROUP], lane % GROUP);
                let mut acc = 0f32;
                for b in 0..nb {
                    let wb = &w[b * C + j];
                    let mut p = 0i32;
                    for t in 0..PAIRS {
                        let x = g.xt[(b * PAIRS + t) * GROUP + i];
                        let y = wb.pairs[t];
                        let lo = |v: i32| v as i16 as i32;
                        let hi = |v: i32| (v >> 16) as i16 as i32;
                        p += lo(x) * lo(y) + hi(x) * hi(y);
                    }
                    acc = (wb.d * g.dt[b * GROUP + i]).mul_add(p as f32, acc);
                    if offset {
                        acc = wb.m.mul_add(g.st[b * GROUP + i], acc);
                    }
                }
                *v = acc;
            }
        }
        out
    }

    #[test]
    fn the_tile_equals_its_definition_bit_for_bit() {
        if !cpu_has_it() {
            eprintln!("no AVX-512BW on this CPU: the tile is never called here");
            assert!(
                tile16::<4>(
                    &[],
                    [Group {
                        xt: &[],
                        dt: &[],
                        st: &[]
                    }; 2],
                    0,
                    true
                )
                .is_none()
            );
            return;
        }
        let mut next = lcg(0x9e37_79b9_7f4a_7c15);
        let nb = 18;
        let pack = |a: i16, b: i16| (a as u16 as u32 | (b as u16 as u32) << 16) as i32;
        let w: Vec<Unpacked> = (0..nb * 4)
            .map(|_| Unpacked {
                pairs: std::array::from_fn(|_| pack((next() % 16) as i16, (next() % 16) as i16)),
                d: (next() % 1000) as f32 / 7919.0,
                m: -((next() % 1000) as f32) / 3571.0,
            })
            .collect();
        let mut group = || {
            let xt: Vec<i32> = (0..nb * PAIRS * GROUP)
                .map(|_| {
                    let v = |r: u32| (r % 65535) as i32 - 32767;
                    pack(v(next()) as i16, v(next()) as i16)
                })
                .collect();
            let dt: Vec<f32> = (0..nb * GROUP)
                .map(|_| (next() % 997) as f32 / 1e6)
                .collect();
            let st: Vec<f32> = (0..nb * GROUP)
                .map(|_| (next() % 991) as f32 / 1e3 - 0.5)
                .collect();
            (xt, dt, st)
        };
        let (a, b) = (group(), group());
        let groups = [
            Group {
                xt: &a.0,
                dt: &a.1,
                st: &a.2,
            },
            Group {
                xt: &b.0,
                dt: &b.1,
                st: &b.2,
            },
        ];
        for offset in [false, true] {
            let got = tile16_here::<4>(&w, groups, nb, offset).expect("AVX-512BW present");
            let want = reference::<4>(&w, groups, nb, offset);
            let bits = |v: &[[f32; 16]; 4]| v.map(|r| r.map(f32::to_bits));
            assert_eq!(bits(&got), bits(&want), "offset {offset}");
            let narrow: Vec<Unpacked> = (0..nb).map(|b| w[b * 4 + 1]).collect();
            let got = tile16_here::<1>(&narrow, groups, nb, offset).expect("AVX-512BW");
            let want = reference::<1>(&narrow, groups, nb, offset);
            assert_eq!(
                got.map(|r| r.map(f32::to_bits)),
                want.map(|r| r.map(f32::to_bits))
            );
        }
    }

    /// Splits a group's 16-bit values (`x[(b * 32 + e) * GROUP + i]`, value `e` of block `b` of
    /// row `i`) into [`Quads`]' arrays.
    fn split_bytes(x: &[i16], nb: usize) -> (Vec<i32>, Vec<i32>, Vec<i32>) {
        let mut lo = vec![0i32; nb * QUADS * GROUP];
        let mut hi = vec![0i32; nb * QUADS * GROUP];
        let mut hsum = vec![0i32; nb * GROUP];
        for b in 0..nb {
            for i in 0..GROUP {
                for t in 0..QUADS {
                    let v = |e: usize| x[(b * 32 + 4 * t + e) * GROUP + i];
                    let l: [u8; 4] = std::array::from_fn(|e| v(e) as u16 as u8);
                    let h: [u8; 4] = std::array::from_fn(|e| (v(e) >> 8) as u8);
                    lo[(b * QUADS + t) * GROUP + i] = i32::from_le_bytes(l);
                    hi[(b * QUADS + t) * GROUP + i] = i32::from_le_bytes(h);
                    hsum[b * GROUP + i] += 128 * h.iter().map(|&y| y as i8 as i32).sum::<i32>();
                }
            }
        }
        (lo, hi, hsum)
    }

    #[test]
    fn the_byte_tile_equals_the_definition_bit_for_bit() {
        if !cpu_has_vnni() {
            eprintln!("no AVX-512 VNNI on this CPU: the byte tile is never called here");
            return;
        }
        let mut next = lcg(0x2545_f491_4f6c_dd1d);
        let nb = 5;
        // Activations with the extremes in every group: ±32767, 0, -1, -256, 255.
        let edges = [32767i16, -32767, 0, -1, -256, 255, 256, -32768 + 1];
        let mut group = |scale: f32| {
            let x: Vec<i16> = (0..nb * 32 * GROUP)
                .map(|i| {
                    if i % 7 == 0 {
                        edges[(i / 7) % edges.len()]
                    } else {
                        ((next() % 65535) as i32 - 32767) as i16
                    }
                })
                .collect();
            let dt: Vec<f32> = (0..nb * GROUP)
                .map(|_| (next() % 997) as f32 / 1e6 * scale)
                .collect();
            let st: Vec<f32> = (0..nb * GROUP)
                .map(|_| (next() % 991) as f32 / 1e3 - 0.5)
                .collect();
            (x, dt, st)
        };
        let (ga, gb) = (group(1.0), group(3.0));
        let (la, ha, sa) = split_bytes(&ga.0, nb);
        let (lb, hb, sb) = split_bytes(&gb.0, nb);
        let quads = [
            Quads {
                lo: &la,
                hi: &ha,
                hsum: &sa,
                dt: &ga.1,
                st: &ga.2,
            },
            Quads {
                lo: &lb,
                hi: &hb,
                hsum: &sb,
                dt: &gb.1,
                st: &gb.2,
            },
        ];
        // Eight rows, four, then one go through the three tile widths.
        const ROWS: usize = 13;
        // A normal f16 (exponent field 5..21) and its exact f32.
        let half = |bits: u16| -> f32 {
            let (sign, exp, mant) = (bits >> 15, (bits >> 10) & 0x1f, bits & 0x3ff);
            f32::from_bits(
                (sign as u32) << 31 | (exp as u32 + 127 - 15) << 23 | (mant as u32) << 13,
            )
        };
        let cases = [
            (Values::Nibbles, 20, 4, Offset::Stored),
            (Values::Nibbles, 18, 2, Offset::MinusEightScales),
            (Values::Bytes, 34, 2, Offset::None),
        ];
        for (values, block_bytes, values_at, offset) in cases {
            let rows: Vec<Vec<u8>> = (0..ROWS)
                .map(|j| {
                    let mut row: Vec<u8> = (0..nb * block_bytes)
                        .map(|i| match (j, values) {
                            // Q8_0's extremes in one row, the nibbles' in another.
                            (0, Values::Bytes) => [0x80u8, 0x7f][i % 2],
                            (1, Values::Nibbles) => 0xff,
                            _ => next() as u8,
                        })
                        .collect();
                    for b in 0..nb {
                        let d = (((5 + next() % 16) << 10) | (next() % 1024)) as u16;
                        let m = 0x8000 | (((5 + next() % 16) << 10) | (next() % 1024)) as u16;
                        row[b * block_bytes..b * block_bytes + 2].copy_from_slice(&d.to_le_bytes());
                        if offset == Offset::Stored {
                            row[b * block_bytes + 2..b * block_bytes + 4]
                                .copy_from_slice(&m.to_le_bytes());
                        }
                    }
                    row
                })
                .collect();
            let header = |j: usize, b: usize, at: usize| {
                half(u16::from_le_bytes([
                    rows[j][b * block_bytes + at],
                    rows[j][b * block_bytes + at + 1],
                ]))
            };
            let value = |j: usize, b: usize, e: usize| -> i32 {
                let blk = &rows[j][b * block_bytes + values_at..];
                match values {
                    Values::Nibbles if e < 16 => (blk[e] & 0x0f) as i32,
                    Values::Nibbles => (blk[e - 16] >> 4) as i32,
                    Values::Bytes => blk[e] as i8 as i32,
                }
            };
            let bytes = rows.concat();
            let w = WeightBytes {
                bytes: &bytes,
                row_bytes: nb * block_bytes,
                block_bytes,
                values_at,
                values,
                offset,
            };
            let mut got = vec![[0f32; 16]; ROWS];
            assert!(rows16_bytes_here(&w, quads, nb, &mut got), "VNNI present");
            for (j, got) in got.iter().enumerate() {
                for lane in 0..16 {
                    let (g, i) = ([&ga, &gb][lane / GROUP], lane % GROUP);
                    let mut acc = 0f32;
                    for b in 0..nb {
                        let p: i32 = (0..32)
                            .map(|e| value(j, b, e) * g.0[(b * 32 + e) * GROUP + i] as i32)
                            .sum();
                        let d = header(j, b, 0);
                        acc = (d * g.1[b * GROUP + i]).mul_add(p as f32, acc);
                        let m = match offset {
                            Offset::None => continue,
                            Offset::Stored => header(j, b, 2),
                            Offset::MinusEightScales => -8.0 * d,
                        };
                        acc = m.mul_add(g.2[b * GROUP + i], acc);
                    }
                    assert_eq!(
                        got[lane].to_bits(),
                        acc.to_bits(),
                        "{values:?} {offset:?} row {j} lane {lane}"
                    );
                }
            }
        }
    }
}
