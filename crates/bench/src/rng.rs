//! A small deterministic random number generator, so a run can be repeated from its `--seed` on any
//! machine and any version of our dependencies (xoshiro256** seeded through SplitMix64).

/// SplitMix64 step: used to spread one `u64` seed over the four words of xoshiro's state.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** with the samplers the load generator needs.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose whole sequence is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self { s }
    }

    /// An independent stream for one purpose (arrivals, lengths, warmup), so that drawing more
    /// from one never shifts another.
    pub fn stream(seed: u64, purpose: u64) -> Self {
        let mut sm = seed ^ purpose.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        Self::new(splitmix64(&mut sm))
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1), 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in (0, 1]: safe to take the logarithm of.
    fn open01(&mut self) -> f64 {
        1.0 - self.next_f64()
    }

    /// Uniform integer in `lo..=hi` (Lemire's widening multiply; the bias is below 2^-32 for the
    /// ranges we draw from, far under anything a benchmark can see).
    pub fn range_u32(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            return lo;
        }
        let span = u64::from(hi - lo) + 1;
        let x = self.next_u64() >> 32;
        lo + ((x * span) >> 32) as u32
    }

    /// Uniform index in `0..n` (`n > 0`).
    pub fn index(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// Exponential with the given rate (mean `1 / rate`).
    pub fn exponential(&mut self, rate: f64) -> f64 {
        -self.open01().ln() / rate
    }

    /// Standard normal (Box-Muller; one of the pair is discarded to keep the state simple).
    pub fn standard_normal(&mut self) -> f64 {
        let u1 = self.open01();
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Gamma with `shape` and `scale` (mean `shape * scale`), by Marsaglia and Tsang; shapes under
    /// one use the boost `G(a) = G(a + 1) * U^(1/a)`.
    pub fn gamma(&mut self, shape: f64, scale: f64) -> f64 {
        if shape < 1.0 {
            let u = self.open01();
            return self.gamma(shape + 1.0, scale) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.standard_normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = self.open01();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v * scale;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference_values() {
        // Published first outputs of SplitMix64 from seed 0.
        let mut s = 0;
        assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64(&mut s), 0x6E78_9E6A_A1B9_65F4);
        assert_eq!(splitmix64(&mut s), 0x06C4_5D18_8009_454F);
    }

    #[test]
    fn same_seed_same_sequence_and_streams_differ() {
        let a: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let mut r = Rng::new(7);
        let b: Vec<u64> = (0..8).map(|_| r.next_u64()).collect();
        assert_eq!(a, b);
        assert_ne!(Rng::stream(7, 1).next_u64(), Rng::stream(7, 2).next_u64());
        assert_ne!(Rng::new(7).next_u64(), Rng::new(8).next_u64());
    }

    fn mean_var(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let m = xs.iter().sum::<f64>() / n;
        (m, xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n)
    }

    // Fixed seeds make these exact functions of the code: they cannot flake, and a wrong sampler
    // misses by far more than the tolerances.
    #[test]
    fn samplers_have_their_moments() {
        let mut r = Rng::new(42);
        let n = 200_000;
        let exp: Vec<f64> = (0..n).map(|_| r.exponential(4.0)).collect();
        let (m, v) = mean_var(&exp);
        assert!((m - 0.25).abs() < 0.005, "exp mean {m}");
        assert!((v - 0.0625).abs() < 0.003, "exp var {v}");
        for (shape, scale) in [(0.25, 2.0), (1.0, 0.5), (4.0, 0.25)] {
            let g: Vec<f64> = (0..n).map(|_| r.gamma(shape, scale)).collect();
            let (m, v) = mean_var(&g);
            assert!(
                (m - shape * scale).abs() < 0.02 * shape * scale + 0.005,
                "gamma mean {m}"
            );
            let want = shape * scale * scale;
            assert!((v - want).abs() < 0.05 * want, "gamma var {v} want {want}");
        }
        let z: Vec<f64> = (0..n).map(|_| r.standard_normal()).collect();
        let (m, v) = mean_var(&z);
        assert!(m.abs() < 0.01 && (v - 1.0).abs() < 0.02, "normal {m} {v}");
    }

    #[test]
    fn ranges_stay_inside_and_cover() {
        let mut r = Rng::new(3);
        let mut seen = [false; 5];
        for _ in 0..1000 {
            let x = r.range_u32(10, 14);
            assert!((10..=14).contains(&x));
            seen[(x - 10) as usize] = true;
            assert!(r.index(3) < 3);
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
        }
        assert!(seen.iter().all(|s| *s));
        assert_eq!(r.range_u32(5, 5), 5);
    }
}
