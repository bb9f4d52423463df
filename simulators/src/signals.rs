//! Seeded signal generators, one model per device class, with ground truth.
//!
//! - **factory-vibration**: a rotating machine (shaft at 29.5 Hz) with 2x and 3x harmonics, load changes and
//!   noise. Faults: outer-race bearing defect (tones at BPFO = 3.58x shaft), inner-race defect (BPFI = 5.42x
//!   shaft, amplitude-modulated by the shaft so it shows sidebands at BPFI +/- shaft), imbalance (1x grows),
//!   looseness (half-order and many harmonics).
//! - **factory-machine-temperature**: load cycles, sensor noise, and a failure ramp before a breakdown.
//! - **city-air-quality**: PM2.5 and NO2 with daily and weekly cycles and weather episodes; sensor faults:
//!   stuck value, drift, dropouts.
//! - **city-traffic**: occupancy and speed with weekday and weekend patterns, incidents, and holidays that
//!   move a weekday to the weekend pattern (a drift that should trigger retraining), whole calendar days from
//!   midnight to midnight.
//!
//! [`Generator::new`] gives normal operation. [`Generator::with_faults`] schedules faults (seeded) and
//! records each as a [`GroundTruth`] window: the labels, which exist only in simulation. The same seed gives
//! the same samples and the same labels.

use edgeloop_agent::source::Sample;
use edgeloop_common::config::{ClassConfig, SignalKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

/// Shaft frequency of the simulated rotating machine, Hz.
pub const SHAFT_HZ: f64 = 29.5;
/// Period of the machine's load changes, seconds.
pub const LOAD_PERIOD_S: f64 = 12.0;
/// Ball-pass frequencies of its bearing, as multiples of the shaft frequency.
pub const BPFO_ORDER: f64 = 3.58;
pub const BPFI_ORDER: f64 = 5.42;

/// The kinds of fault or event a generator can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    BearingOuter,
    BearingInner,
    Imbalance,
    Looseness,
    FailureRamp,
    Breakdown,
    Episode,
    StuckSensor,
    SensorDrift,
    Dropout,
    Incident,
    Holiday,
}

/// A labelled window of event time, milliseconds since the Unix epoch, inclusive.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroundTruth {
    pub from_ms: u64,
    pub to_ms: u64,
    pub fault: Fault,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    Vibration,
    MachineTemperature,
    AirQuality,
    Traffic,
    /// Any other class: a sine per channel plus noise.
    Generic,
}

pub struct Generator {
    class: ClassConfig,
    model: Model,
    rng: StdRng,
    /// Samples produced per sensor.
    n: Vec<u64>,
    start_ms: u64,
    labels: Vec<GroundTruth>,
    /// Air quality: the value a stuck sensor repeats.
    stuck: Vec<Option<f64>>,
}

fn gauss(rng: &mut StdRng) -> f64 {
    // Box-Muller.
    let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen_range(0.0..1.0));
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

impl Generator {
    /// Normal operation, no faults.
    pub fn new(class: ClassConfig, seed: u64, start_ms: u64) -> Self {
        let model = match class.class.as_str() {
            "factory-vibration" => Model::Vibration,
            "factory-machine-temperature" => Model::MachineTemperature,
            "city-air-quality" => Model::AirQuality,
            "city-traffic" => Model::Traffic,
            _ => Model::Generic,
        };
        let n = vec![0; class.sensors.len()];
        let stuck = vec![None; class.sensors.len()];
        Generator { class, model, rng: StdRng::seed_from_u64(seed), n, start_ms, labels: Vec::new(), stuck }
    }

    /// With faults scheduled over the next `horizon_ms` of event time: a fault window of the class's kinds
    /// every so often, each recorded as ground truth.
    pub fn with_faults(class: ClassConfig, seed: u64, start_ms: u64, horizon_ms: u64) -> Self {
        let mut g = Generator::new(class, seed, start_ms);
        let mut rng = StdRng::seed_from_u64(seed ^ 0xfa017);
        let (kinds, gap_ms, len_ms): (&[Fault], (u64, u64), (u64, u64)) = match g.model {
            Model::Vibration => (
                &[Fault::BearingOuter, Fault::BearingInner, Fault::Imbalance, Fault::Looseness],
                (20_000, 40_000),
                (5_000, 10_000),
            ),
            Model::MachineTemperature => {
                (&[Fault::FailureRamp], (2 * 86_400_000, 4 * 86_400_000), (6 * 3_600_000, 8 * 3_600_000))
            }
            Model::AirQuality => (
                &[Fault::Episode, Fault::StuckSensor, Fault::SensorDrift, Fault::Dropout],
                (86_400_000, 3 * 86_400_000),
                (3 * 3_600_000, 12 * 3_600_000),
            ),
            Model::Traffic => {
                (&[Fault::Incident, Fault::Holiday], (2 * 86_400_000, 5 * 86_400_000), (45 * 60_000, 90 * 60_000))
            }
            Model::Generic => (&[], (1, 1), (1, 1)),
        };
        if kinds.is_empty() {
            return g;
        }
        let mut t = start_ms + rng.gen_range(gap_ms.0..=gap_ms.1);
        let mut k = 0;
        while t < start_ms + horizon_ms {
            let fault = kinds[k % kinds.len()];
            let len = match fault {
                Fault::Holiday => {
                    t = next_midnight(t);
                    DAY_MS
                }
                _ => rng.gen_range(len_ms.0..=len_ms.1),
            };
            g.labels.push(GroundTruth { from_ms: t, to_ms: t + len, fault });
            if fault == Fault::FailureRamp {
                // The ramp ends in a breakdown: the machine stops and cools for two hours.
                g.labels.push(GroundTruth {
                    from_ms: t + len + 1,
                    to_ms: t + len + 2 * 3_600_000,
                    fault: Fault::Breakdown,
                });
            }
            t += len + rng.gen_range(gap_ms.0..=gap_ms.1);
            k += 1;
        }
        g
    }

    /// The ground-truth windows.
    pub fn labels(&self) -> &[GroundTruth] {
        &self.labels
    }

    /// Event time of the next sample of the first sensor.
    pub fn now_ms(&self) -> u64 {
        let s = &self.class.sensors[0];
        self.start_ms + (self.n[0] as f64 / s.rate_hz * 1000.0) as u64
    }

    /// Injects `fault` from the next sample on, for `len_ms` of event time, and records it as ground truth.
    /// Returns the window.
    ///
    /// A holiday is whole calendar days (UTC, event time): it begins at the next midnight and lasts `len_ms`
    /// rounded up to days, as a city's holidays do. One that began and ended at the hour it was injected
    /// would switch the traffic from a weekend's pattern to a weekday's within one reading, at rush hour as
    /// likely as not: the jump an incident makes, not the drift a holiday is.
    pub fn inject(&mut self, fault: Fault, len_ms: u64) -> GroundTruth {
        let (from_ms, len_ms) = match fault {
            Fault::Holiday => (next_midnight(self.now_ms()), len_ms.div_ceil(DAY_MS).max(1) * DAY_MS),
            _ => (self.now_ms(), len_ms),
        };
        let window = GroundTruth { from_ms, to_ms: from_ms + len_ms, fault };
        self.labels.push(window.clone());
        window
    }

    fn active(&self, ts: u64) -> Option<(Fault, f64)> {
        self.labels
            .iter()
            .find(|l| (l.from_ms..=l.to_ms).contains(&ts))
            .map(|l| (l.fault, (ts - l.from_ms) as f64 / (l.to_ms - l.from_ms).max(1) as f64))
    }

    /// The next sample of sensor `i`, stamped on event time; `None` when a dropout swallows it.
    pub fn next(&mut self, i: usize) -> Option<Sample> {
        let s = self.class.sensors[i].clone();
        let k = self.n[i];
        self.n[i] += 1;
        let t = k as f64 / s.rate_hz;
        let ts_ms = self.start_ms + (t * 1000.0) as u64;
        let fault = self.active(ts_ms);
        let values = match self.model {
            Model::Vibration => (0..s.channels).map(|c| self.vibration(t, c, fault)).collect(),
            Model::MachineTemperature => vec![self.machine_temperature(t, fault)],
            Model::AirQuality => {
                if matches!(fault, Some((Fault::Dropout, _))) {
                    return None;
                }
                let v = self.air_quality(i, t, fault);
                vec![v]
            }
            Model::Traffic => vec![self.traffic(i, ts_ms, t, fault)],
            Model::Generic => (0..s.channels)
                .map(|c| {
                    let base = s.valid_max.unwrap_or(100.0) * 0.03;
                    let v =
                        base * (1.0 + 0.5 * (2.0 * PI * t / 86_400.0 + c as f64).sin()) + self.rng.gen_range(-1.0..1.0);
                    if s.kind == SignalKind::Slow {
                        v.max(0.0)
                    } else {
                        v
                    }
                })
                .collect(),
        };
        Some(Sample { sensor: s.name.clone(), ts_ms: Some(ts_ms), values })
    }

    /// `count` samples, round-robin over the class's sensors (fewer if dropouts swallow some).
    pub fn take(&mut self, count: usize) -> Vec<Sample> {
        let sensors = self.class.sensors.len();
        (0..count).filter_map(|j| self.next(j % sensors)).collect()
    }

    fn vibration(&mut self, t: f64, channel: usize, fault: Option<(Fault, f64)>) -> f64 {
        let w = 2.0 * PI * SHAFT_HZ * t;
        let phase = channel as f64 * 0.7;
        let load = 1.0 + 0.2 * (2.0 * PI * t / LOAD_PERIOD_S).sin();
        let one_x = match fault {
            Some((Fault::Imbalance, _)) => 3.0,
            _ => 1.0,
        };
        let mut x = load * (one_x * (w + phase).sin() + 0.3 * (2.0 * w + phase).sin() + 0.1 * (3.0 * w + phase).sin());
        match fault {
            Some((Fault::BearingOuter, _)) => x += 0.6 * (BPFO_ORDER * w).sin(),
            Some((Fault::BearingInner, _)) => x += 0.6 * (BPFI_ORDER * w).sin() * (1.0 + 0.8 * w.cos()),
            Some((Fault::Looseness, _)) => {
                x += 0.4 * (0.5 * w).sin();
                for h in 2..=10 {
                    x += 0.25 / (h as f64).sqrt() * (h as f64 * w + h as f64).sin();
                }
            }
            _ => {}
        }
        x + 0.05 * gauss(&mut self.rng)
    }

    fn machine_temperature(&mut self, t: f64, fault: Option<(Fault, f64)>) -> f64 {
        let base = 70.0 + 8.0 * (2.0 * PI * t / (8.0 * 3600.0)).sin();
        let v = match fault {
            Some((Fault::FailureRamp, p)) => base + 15.0 * p,
            Some((Fault::Breakdown, p)) => 25.0 + (70.0 - 25.0) * (-6.0 * p).exp().max(0.0) * 0.2,
            _ => base,
        };
        v + 0.3 * gauss(&mut self.rng)
    }

    fn air_quality(&mut self, i: usize, t: f64, fault: Option<(Fault, f64)>) -> f64 {
        let day = 2.0 * PI * t / 86_400.0;
        let weekday = ((t / 86_400.0) as u64 % 7) < 5;
        let (base, daily) = if i == 0 { (15.0, 8.0) } else { (30.0, 15.0) };
        let mut v = base + daily * (day - PI / 3.0).sin().max(-0.5) + if weekday { 4.0 } else { 0.0 };
        match fault {
            Some((Fault::Episode, p)) => v += 40.0 * (PI * p).sin(),
            Some((Fault::SensorDrift, p)) => v += 25.0 * p,
            _ => {}
        }
        v += self.rng.gen_range(-1.0..1.0);
        v = v.max(0.0);
        match fault {
            Some((Fault::StuckSensor, _)) => *self.stuck[i].get_or_insert(v),
            _ => {
                self.stuck[i] = None;
                v
            }
        }
    }

    fn traffic(&mut self, i: usize, ts_ms: u64, t: f64, fault: Option<(Fault, f64)>) -> f64 {
        let hour = (ts_ms / 3_600_000 % 24) as f64 + (ts_ms % 3_600_000) as f64 / 3_600_000.0;
        let weekday = (ts_ms / 86_400_000 + 4) % 7 < 5; // 1970-01-01 was a Thursday
        let holiday = matches!(fault, Some((Fault::Holiday, _)));
        let peak = |h: f64, at: f64| (-((h - at) / 1.5).powi(2)).exp();
        let occupancy = if weekday && !holiday {
            5.0 + 30.0 * peak(hour, 8.0) + 35.0 * peak(hour, 17.5) + 8.0 * peak(hour, 12.5)
        } else {
            4.0 + 12.0 * peak(hour, 14.0)
        };
        let incident = matches!(fault, Some((Fault::Incident, _)));
        let occupancy = if incident { occupancy + 30.0 } else { occupancy };
        let _ = t;
        if i == 0 {
            (occupancy + self.rng.gen_range(-1.5..1.5)).clamp(0.0, 100.0)
        } else {
            let speed = 105.0 - 0.9 * occupancy - if incident { 35.0 } else { 0.0 };
            (speed + self.rng.gen_range(-3.0..3.0)).clamp(5.0, 200.0)
        }
    }
}

/// A day of event time, in milliseconds.
const DAY_MS: u64 = 86_400_000;

/// The first midnight (UTC) at or after `ts_ms`.
fn next_midnight(ts_ms: u64) -> u64 {
    ts_ms.div_ceil(DAY_MS) * DAY_MS
}

/// The magnitude of one frequency in `xs` sampled at `rate_hz` (Goertzel), normalised by length.
pub fn tone(xs: &[f64], rate_hz: f64, freq: f64) -> f64 {
    let w = 2.0 * PI * freq / rate_hz;
    let (mut s1, mut s2) = (0.0, 0.0);
    for &x in xs {
        let s = x + 2.0 * w.cos() * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    (s1 * s1 + s2 * s2 - 2.0 * w.cos() * s1 * s2).max(0.0).sqrt() * 2.0 / xs.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 24 * HOUR;

    #[test]
    fn deterministic_per_seed() {
        for class in ["city-air-quality", "factory-vibration", "factory-machine-temperature", "city-traffic"] {
            let c = crate::class_config(class).unwrap();
            let a = Generator::with_faults(c.clone(), 7, 0, 30 * DAY);
            let b = Generator::with_faults(c.clone(), 7, 0, 30 * DAY);
            assert_eq!(a.labels(), b.labels(), "{class}");
            let (mut a, mut b, mut other) = (a, b, Generator::new(c, 8, 0));
            let (x, y, z) = (a.take(500), b.take(500), other.take(500));
            assert_eq!(x, y, "{class}");
            assert_ne!(x, z, "{class}");
            assert!(x.iter().all(|s| s.values.iter().all(|v| v.is_finite())), "{class}");
        }
    }

    fn vibration_window(g: &mut Generator, from_ms: u64, n: usize) -> Vec<f64> {
        // Skip to `from_ms` (sensor 0 only: the class has one three-axis sensor).
        while g.n[0] < from_ms * 2 {
            g.next(0);
        }
        (0..n).map(|_| g.next(0).unwrap().values[0]).collect()
    }

    #[test]
    fn vibration_spectrum_shows_shaft_and_faults_where_labelled() {
        let c = crate::class_config("factory-vibration").unwrap();
        let rate = c.sensors[0].rate_hz;
        assert_eq!(rate, 2000.0);
        let mut g = Generator::with_faults(c.clone(), 3, 0, 200_000);
        let labels = g.labels().to_vec();
        let window = |l: &GroundTruth| l.from_ms + 500;
        // Healthy: the spectrum peaks at the shaft frequency, not at the bearing tones.
        let healthy = vibration_window(&mut Generator::new(c, 3, 0), 0, 4000);
        let (shaft, bpfo, bpfi) = (
            tone(&healthy, rate, SHAFT_HZ),
            tone(&healthy, rate, BPFO_ORDER * SHAFT_HZ),
            tone(&healthy, rate, BPFI_ORDER * SHAFT_HZ),
        );
        assert!(shaft > 0.7 && bpfo < 0.05 && bpfi < 0.05, "shaft {shaft}, bpfo {bpfo}, bpfi {bpfi}");
        let outer = labels.iter().find(|l| l.fault == Fault::BearingOuter).unwrap();
        let inner = labels.iter().find(|l| l.fault == Fault::BearingInner).unwrap();
        let imbalance = labels.iter().find(|l| l.fault == Fault::Imbalance).unwrap();
        let x = vibration_window(&mut g, window(outer), 4000);
        assert!(tone(&x, rate, BPFO_ORDER * SHAFT_HZ) > 0.4, "outer-race tone inside its window");
        let x = vibration_window(&mut g, window(inner), 4000);
        let f = BPFI_ORDER * SHAFT_HZ;
        assert!(tone(&x, rate, f) > 0.4, "inner-race tone");
        assert!(
            tone(&x, rate, f + SHAFT_HZ) > 0.15 && tone(&x, rate, f - SHAFT_HZ) > 0.15,
            "sidebands at BPFI +/- shaft"
        );
        let x = vibration_window(&mut g, window(imbalance), 4000);
        assert!(tone(&x, rate, SHAFT_HZ) > 2.0, "imbalance raises 1x");
    }

    #[test]
    fn slow_generators_put_their_faults_inside_the_labels() {
        // Machine temperature: hotter at the end of the ramp than before it.
        let c = crate::class_config("factory-machine-temperature").unwrap();
        let mut g = Generator::with_faults(c, 1, 0, 20 * DAY);
        let ramp = g.labels().iter().find(|l| l.fault == Fault::FailureRamp).unwrap().clone();
        let samples = g.take(20 * 24 * 60);
        let mean_at = |from: u64, to: u64| {
            let v: Vec<f64> =
                samples.iter().filter(|s| (from..to).contains(&s.ts_ms.unwrap())).map(|s| s.values[0]).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let before = mean_at(ramp.from_ms - 8 * HOUR, ramp.from_ms);
        let end = mean_at(ramp.to_ms - HOUR, ramp.to_ms);
        assert!(end > before + 8.0, "ramp end {end} vs before {before}");
        let breakdown = mean_at(ramp.to_ms + HOUR, ramp.to_ms + 2 * HOUR);
        assert!(breakdown < 40.0, "breakdown {breakdown}");

        // Air quality: dropouts leave gaps exactly inside their windows; a stuck sensor repeats itself.
        let c = crate::class_config("city-air-quality").unwrap();
        let mut g = Generator::with_faults(c, 2, 0, 40 * DAY);
        let labels = g.labels().to_vec();
        let samples = g.take(2 * 40 * 24 * 60);
        for l in labels.iter().filter(|l| l.fault == Fault::Dropout) {
            assert!(
                !samples.iter().any(|s| (l.from_ms..=l.to_ms).contains(&s.ts_ms.unwrap())),
                "sample inside a dropout"
            );
        }
        let stuck = labels.iter().find(|l| l.fault == Fault::StuckSensor).unwrap();
        let inside: Vec<f64> = samples
            .iter()
            .filter(|s| s.sensor == "pm25" && (stuck.from_ms..=stuck.to_ms).contains(&s.ts_ms.unwrap()))
            .map(|s| s.values[0])
            .collect();
        assert!(inside.len() > 100 && inside.iter().all(|&v| v == inside[0]));

        // Traffic: an incident raises occupancy against the same hour without one; a holiday weekday looks
        // like a weekend.
        let c = crate::class_config("city-traffic").unwrap();
        let mut g = Generator::with_faults(c, 5, 0, 60 * DAY);
        let labels = g.labels().to_vec();
        let samples = g.take(2 * 60 * 24 * 12);
        let occ = |ts: u64| {
            samples.iter().find(|s| s.sensor == "occupancy" && s.ts_ms.unwrap() >= ts).map(|s| s.values[0]).unwrap()
        };
        let incident = labels.iter().find(|l| l.fault == Fault::Incident).unwrap();
        let mid = (incident.from_ms + incident.to_ms) / 2;
        assert!(occ(mid) > occ(mid + 7 * DAY).min(occ(mid + 14 * DAY)) + 15.0);
        let holidays: Vec<&GroundTruth> = labels.iter().filter(|l| l.fault == Fault::Holiday).collect();
        assert!(!holidays.is_empty());
        // Holidays are calendar days: they begin and end at midnight, where the weekday's and the weekend's
        // patterns meet, so the traffic does not jump as it does at an incident.
        let jump_at = |ts: u64| {
            let occ: Vec<f64> = samples
                .iter()
                .filter(|s| s.sensor == "occupancy" && s.ts_ms.unwrap().abs_diff(ts) <= 15 * 60_000)
                .map(|s| s.values[0])
                .collect();
            occ.windows(2).map(|w| (w[1] - w[0]).abs()).fold(0.0, f64::max)
        };
        for h in &holidays {
            assert_eq!((h.from_ms % DAY, h.to_ms % DAY), (0, 0), "{h:?}");
            if h.to_ms < 55 * DAY {
                assert!(jump_at(h.from_ms) < 5.0 && jump_at(h.to_ms) < 5.0, "{h:?}");
            }
        }
        assert!(jump_at(incident.from_ms) > 20.0, "an incident's onset is a jump");
        // An injected holiday too, from the next midnight, whole days.
        let now = g.now_ms();
        let h = g.inject(Fault::Holiday, 3 * DAY - 1000);
        assert_eq!((h.from_ms, h.to_ms - h.from_ms), (now.div_ceil(DAY) * DAY, 3 * DAY));
    }
}
