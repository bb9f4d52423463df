//! Seeded synthetic signals, one generator per device class: a vibration signal (shaft harmonic plus noise)
//! and slow air-quality readings (a daily-like cycle plus noise). The same seed gives the same samples.

use edgeloop_agent::source::Sample;
use edgeloop_common::config::{ClassConfig, SignalKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub struct Generator {
    class: ClassConfig,
    rng: StdRng,
    /// Samples produced per sensor.
    n: Vec<u64>,
    start_ms: u64,
}

impl Generator {
    pub fn new(class: ClassConfig, seed: u64, start_ms: u64) -> Self {
        let n = vec![0; class.sensors.len()];
        Generator { class, rng: StdRng::seed_from_u64(seed), n, start_ms }
    }

    /// The next sample of sensor `i`, stamped on event time.
    pub fn next(&mut self, i: usize) -> Sample {
        let s = &self.class.sensors[i];
        let k = self.n[i];
        self.n[i] += 1;
        let t = k as f64 / s.rate_hz;
        let ts_ms = self.start_ms + (t * 1000.0) as u64;
        let values = (0..s.channels)
            .map(|c| match s.kind {
                SignalKind::Fast => {
                    let shaft = 2.0 * std::f64::consts::PI * 29.5 * t + c as f64;
                    shaft.sin() + 0.3 * (2.0 * shaft).sin() + self.rng.gen_range(-0.2..0.2)
                }
                SignalKind::Slow => {
                    let day = 2.0 * std::f64::consts::PI * t / 86_400.0;
                    let base = s.valid_max.unwrap_or(100.0) * 0.03;
                    (base * (1.0 + 0.5 * day.sin()) + self.rng.gen_range(-1.0..1.0)).max(0.0)
                }
            })
            .collect();
        Sample { sensor: s.name.clone(), ts_ms: Some(ts_ms), values }
    }

    /// `count` samples, round-robin over the class's sensors.
    pub fn take(&mut self, count: usize) -> Vec<Sample> {
        let sensors = self.class.sensors.len();
        (0..count).map(|j| self.next(j % sensors)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_per_seed() {
        let class = crate::class_config("city-air-quality").unwrap();
        let a = Generator::new(class.clone(), 7, 0).take(20);
        let b = Generator::new(class.clone(), 7, 0).take(20);
        let c = Generator::new(class, 8, 0).take(20);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|s| s.values.iter().all(|v| v.is_finite() && *v >= 0.0)));
    }
}
