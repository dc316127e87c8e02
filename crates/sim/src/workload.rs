//! Arrivals and request lengths: what the simulator is asked to serve.

use crate::admission::Budget;
use crate::error::SimError;
use crate::rng::Rng;

/// When requests arrive.
#[derive(Debug, Clone, PartialEq)]
pub enum Arrivals {
    /// Exponential gaps at `rate` per second.
    Poisson { rate: f64 },
    /// Gamma-distributed gaps with mean 1/rate and coefficient of variation `cv` (1 is Poisson,
    /// above 1 burstier).
    Gamma { rate: f64, cv: f64 },
    /// Evenly spaced.
    Constant { rate: f64 },
    /// Given arrival times in seconds, ascending.
    Trace(Vec<f64>),
    /// Recorded requests, ascending in time, with their own lengths: the workload's length
    /// distributions are not drawn (a `tandem bench --json` run replayed, see [`crate::replay`]).
    Replay(Vec<RequestSpec>),
}

impl Arrivals {
    pub fn rate(&self) -> Option<f64> {
        match self {
            Arrivals::Poisson { rate }
            | Arrivals::Gamma { rate, .. }
            | Arrivals::Constant { rate } => Some(*rate),
            Arrivals::Trace(_) | Arrivals::Replay(_) => None,
        }
    }

    /// The same process at another rate (a trace is compressed or stretched in time).
    pub fn at_rate(&self, new_rate: f64) -> Arrivals {
        match self {
            Arrivals::Poisson { .. } => Arrivals::Poisson { rate: new_rate },
            Arrivals::Gamma { cv, .. } => Arrivals::Gamma {
                rate: new_rate,
                cv: *cv,
            },
            Arrivals::Constant { .. } => Arrivals::Constant { rate: new_rate },
            Arrivals::Trace(t) => {
                let n = t.len() as f64;
                let span = t.last().copied().unwrap_or(0.0).max(f64::MIN_POSITIVE);
                let scale = (n / span) / new_rate;
                Arrivals::Trace(t.iter().map(|x| x * scale).collect())
            }
            Arrivals::Replay(r) => {
                let n = r.len() as f64;
                let span = r.last().map_or(0.0, |x| x.arrival).max(f64::MIN_POSITIVE);
                let scale = (n / span) / new_rate;
                Arrivals::Replay(
                    r.iter()
                        .map(|x| RequestSpec {
                            arrival: x.arrival * scale,
                            ..*x
                        })
                        .collect(),
                )
            }
        }
    }

    pub fn validate(&self) -> Result<(), SimError> {
        let ok_rate = |r: f64| r.is_finite() && r > 0.0;
        match self {
            Arrivals::Poisson { rate } | Arrivals::Constant { rate } if !ok_rate(*rate) => Err(
                SimError::invalid(format!("arrival rate must be positive, got {rate}")),
            ),
            Arrivals::Gamma { rate, cv } if !(ok_rate(*rate) && cv.is_finite() && *cv > 0.0) => {
                Err(SimError::invalid(format!(
                    "gamma arrivals need a positive rate and cv, got {rate}, {cv}"
                )))
            }
            Arrivals::Trace(t)
                if t.is_empty() || t.windows(2).any(|w| w[1] < w[0]) || t[0] < 0.0 =>
            {
                Err(SimError::invalid(
                    "a trace needs ascending, non-negative arrival times",
                ))
            }
            Arrivals::Replay(r)
                if r.is_empty()
                    || r.windows(2).any(|w| w[1].arrival < w[0].arrival)
                    || r[0].arrival < 0.0
                    || r.iter().any(|x| x.input == 0 || x.output == 0) =>
            {
                Err(SimError::invalid(
                    "a replay needs ascending, non-negative arrival times and positive lengths",
                ))
            }
            _ => Ok(()),
        }
    }
}

/// How long prompts or answers are, in tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lengths {
    Fixed(u32),
    /// Uniform over [lo, hi].
    Uniform {
        lo: u32,
        hi: u32,
    },
    /// Normal, redrawn until it lands in [lo, hi].
    Normal {
        mean: f64,
        std: f64,
        lo: u32,
        hi: u32,
    },
}

impl Lengths {
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        match *self {
            Lengths::Fixed(n) => n,
            Lengths::Uniform { lo, hi } => rng.range_inclusive(lo, hi),
            Lengths::Normal { mean, std, lo, hi } => {
                for _ in 0..64 {
                    let x = (mean + std * rng.normal()).round();
                    if x >= f64::from(lo) && x <= f64::from(hi) {
                        return x as u32;
                    }
                }
                mean.round().clamp(f64::from(lo), f64::from(hi)) as u32
            }
        }
    }

    pub fn max(&self) -> u32 {
        match *self {
            Lengths::Fixed(n) => n,
            Lengths::Uniform { hi, .. } | Lengths::Normal { hi, .. } => hi,
        }
    }

    pub fn mean(&self) -> f64 {
        match *self {
            Lengths::Fixed(n) => f64::from(n),
            Lengths::Uniform { lo, hi } => (f64::from(lo) + f64::from(hi)) / 2.0,
            // Close enough for sizing when the bounds are a few deviations out.
            Lengths::Normal { mean, .. } => mean,
        }
    }

    pub fn validate(&self, what: &str) -> Result<(), SimError> {
        let ok = match *self {
            Lengths::Fixed(n) => n > 0,
            Lengths::Uniform { lo, hi } => lo > 0 && lo <= hi,
            Lengths::Normal { mean, std, lo, hi } => {
                lo > 0 && lo <= hi && std >= 0.0 && mean.is_finite()
            }
        };
        if ok {
            Ok(())
        } else {
            Err(SimError::invalid(format!(
                "{what} lengths must be positive with lo <= hi"
            )))
        }
    }
}

/// A workload: arrivals and the two length distributions.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub arrivals: Arrivals,
    pub input: Lengths,
    pub output: Lengths,
}

impl Workload {
    pub fn validate(&self) -> Result<(), SimError> {
        self.arrivals.validate()?;
        self.input.validate("input")?;
        self.output.validate("output")
    }

    /// The longest prompt and answer the workload can hold.
    pub fn longest(&self) -> (u32, u32) {
        match &self.arrivals {
            Arrivals::Replay(r) => (
                r.iter().map(|x| x.input).max().unwrap_or(0),
                r.iter().map(|x| x.output).max().unwrap_or(0),
            ),
            _ => (self.input.max(), self.output.max()),
        }
    }
}

/// One generated request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestSpec {
    pub arrival: f64,
    pub input: u32,
    pub output: u32,
    /// Its own latency budgets and priority for admission (a replayed request's); `None`: the
    /// run's default ([`crate::des::AdmissionConfig::budget`]).
    pub budget: Option<Budget>,
}

/// Draws requests one at a time, so that the simulator never holds more than it needs.
#[derive(Debug)]
pub struct RequestStream<'a> {
    w: &'a Workload,
    rng: Rng,
    now: f64,
    index: usize,
}

impl<'a> RequestStream<'a> {
    pub fn new(w: &'a Workload, seed: u64) -> Self {
        RequestStream {
            w,
            rng: Rng::new(seed),
            now: 0.0,
            index: 0,
        }
    }
}

impl Iterator for RequestStream<'_> {
    type Item = RequestSpec;

    fn next(&mut self) -> Option<RequestSpec> {
        if let Arrivals::Replay(r) = &self.w.arrivals {
            let spec = *r.get(self.index)?;
            self.index += 1;
            return Some(spec);
        }
        let arrival = match &self.w.arrivals {
            Arrivals::Poisson { rate } => self.now + self.rng.exponential(*rate),
            Arrivals::Gamma { rate, cv } => {
                let shape = 1.0 / (cv * cv);
                self.now + self.rng.gamma(shape, 1.0 / (rate * shape))
            }
            Arrivals::Constant { rate } => self.index as f64 / rate,
            Arrivals::Trace(t) => *t.get(self.index)?,
            Arrivals::Replay(_) => return None,
        };
        self.now = arrival;
        self.index += 1;
        let input = self.w.input.sample(&mut self.rng);
        let output = self.w.output.sample(&mut self.rng);
        Some(RequestSpec {
            arrival,
            input,
            output,
            budget: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(arrivals: Arrivals) -> Workload {
        Workload {
            arrivals,
            input: Lengths::Uniform { lo: 50, hi: 400 },
            output: Lengths::Fixed(64),
        }
    }

    #[test]
    fn rates_and_lengths_come_out_as_asked() {
        for a in [
            Arrivals::Poisson { rate: 20.0 },
            Arrivals::Gamma {
                rate: 20.0,
                cv: 2.0,
            },
            Arrivals::Constant { rate: 20.0 },
        ] {
            let wl = w(a.clone());
            let reqs: Vec<_> = RequestStream::new(&wl, 3).take(40_000).collect();
            let rate = reqs.len() as f64 / reqs.last().unwrap().arrival;
            assert!((rate / 20.0 - 1.0).abs() < 0.03, "{a:?}: {rate}");
            assert!(
                reqs.iter()
                    .all(|r| (50..=400).contains(&r.input) && r.output == 64)
            );
            let mean_in = reqs.iter().map(|r| f64::from(r.input)).sum::<f64>() / reqs.len() as f64;
            assert!((mean_in - 225.0).abs() < 3.0, "{mean_in}");
        }
        let n = Lengths::Normal {
            mean: 200.0,
            std: 80.0,
            lo: 50,
            hi: 400,
        };
        let mut rng = Rng::new(1);
        assert!(
            (0..10_000)
                .map(|_| n.sample(&mut rng))
                .all(|x| (50..=400).contains(&x))
        );
    }

    #[test]
    fn traces_replay_and_rescale() {
        let wl = w(Arrivals::Trace(vec![0.0, 1.0, 2.0, 4.0]));
        let times: Vec<f64> = RequestStream::new(&wl, 1).map(|r| r.arrival).collect();
        assert_eq!(times, vec![0.0, 1.0, 2.0, 4.0]);
        assert_eq!(
            wl.arrivals.at_rate(2.0),
            Arrivals::Trace(vec![0.0, 0.5, 1.0, 2.0])
        );
    }

    #[test]
    fn bad_rates_are_refused() {
        for r in [0.0, -3.0, f64::NAN] {
            assert!(w(Arrivals::Poisson { rate: r }).validate().is_err());
        }
        assert!(w(Arrivals::Trace(vec![2.0, 1.0])).validate().is_err());
    }
}
