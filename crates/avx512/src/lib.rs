//! The batched 16-bit decode kernel's inner tile in 512-bit registers, for CPUs with AVX-512BW,
//! picked at run time (the workspace builds for `x86-64-v3`, which has no AVX-512).
//!
//! This crate exists to hold the `unsafe` that runtime dispatch needs: a function compiled for a
//! feature the build target lacks can only be called through `unsafe`, after checking the CPU has
//! it, and 512-bit loads take pointers. Everything here is checked before that: [`tile16`] asserts
//! every slice length it reads and calls the kernel only when the CPU reports the features. The
//! engine (which forbids `unsafe`) calls the safe wrapper and falls back to its AVX2 kernel when it
//! returns `None`.
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
    *AVAILABLE.get_or_init(|| {
        let wanted = std::env::var("TANDEM_AVX512").map_or(true, |v| v != "0");
        wanted && cpu_has_it()
    })
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

/// Asks the CPU to bring `bytes` into its caches ahead of use, one prefetch per 64-byte line,
/// and returns at once (nothing waits for the lines). A hint only: it changes no value, and it
/// does nothing on other architectures.
#[inline]
pub fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: `prefetcht0` reads nothing architecturally and cannot fault, whatever the
        // address; here it is inside a live slice anyway. SSE is part of x86-64's baseline.
        #[allow(unsafe_code)]
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use std::arch::x86_64::*;

    use super::{GROUP, Group, PAIRS, Unpacked};

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
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as u32
        };
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
}
