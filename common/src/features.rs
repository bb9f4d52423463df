//! Feature pipeline v1: raw samples in, feature vectors out.
//!
//! The same code runs on the agent (live, one sample at a time) and on the control plane (when it builds
//! training sets), so a model never sees features computed two different ways. The [`PipelineSpec`] that
//! configures it is serialisable because it travels inside model manifests.
//!
//! - **Fast signals** (vibration, current): non-overlapping or hopping windows of `window` samples per channel,
//!   each reduced to [`WINDOW_FEATURES`]: mean, std, min, max, rms, peak-to-peak, kurtosis, crest factor.
//! - **Slow signals** (temperature, air quality): one vector per sample per channel with [`SLOW_FEATURES`]:
//!   value, delta from the previous sample, rolling mean, rolling std and z-score over the last `rolling` samples.
//!   A slow signal with a `season` (the samples in one cycle of the process, a day or a week of readings) adds
//!   [`SEASON_FEATURES`]: the change from the same point one season earlier, and that change's z-score against
//!   the changes of the last season. A rolling window cannot hold a day or a week of context; these two do, in
//!   `2 × season` numbers per channel.
//!
//! Every output is finite for any finite input: statistics are computed on values scaled by the window's
//! largest magnitude, degenerate ratios (zero variance, zero rms) are defined as 0, and the results saturate at
//! the `f32` range the models consume. Non-finite inputs are the caller's to clean (the agent refuses them at
//! the source; the control plane's cleaning drops or imputes them).

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Names of the window features, in output order.
pub const WINDOW_FEATURES: [&str; 8] = ["mean", "std", "min", "max", "rms", "p2p", "kurtosis", "crest"];
/// Names of the slow-signal features, in output order.
pub const SLOW_FEATURES: [&str; 5] = ["value", "delta", "rolling_mean", "rolling_std", "zscore"];
/// Names of the features a slow signal with a season adds after [`SLOW_FEATURES`].
pub const SEASON_FEATURES: [&str; 2] = ["season_delta", "season_zscore"];
/// [`SLOW_FEATURES`] followed by [`SEASON_FEATURES`].
const SLOW_SEASON_FEATURES: [&str; 7] = {
    let mut out = [""; 7];
    let mut i = 0;
    while i < out.len() {
        out[i] = if i < SLOW_FEATURES.len() { SLOW_FEATURES[i] } else { SEASON_FEATURES[i - SLOW_FEATURES.len()] };
        i += 1;
    }
    out
};

/// The whole pipeline: one entry per sensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PipelineSpec {
    /// Pipeline version; this build implements 1.
    pub version: u32,
    pub sensors: Vec<SensorSpec>,
}

/// How one sensor's samples become features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SensorSpec {
    pub name: String,
    /// Values per sample (for example 3 for a three-axis accelerometer).
    pub channels: usize,
    pub features: FeatureKind,
}

/// The two feature families of pipeline v1.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FeatureKind {
    /// Windowed statistics; a vector every `hop` samples once `window` samples are buffered.
    Window { window: usize, hop: usize },
    /// Per-sample features with a rolling window of `rolling` samples, and with `season` > 0 the seasonal
    /// features over `season` samples (absent from older specs, which mean 0).
    Slow {
        rolling: usize,
        #[serde(default, skip_serializing_if = "is_zero")]
        season: usize,
    },
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

impl SensorSpec {
    /// Length of the feature vector this sensor produces.
    pub fn width(&self) -> usize {
        self.channels * self.per_channel().len()
    }

    fn per_channel(&self) -> &'static [&'static str] {
        match self.features {
            FeatureKind::Window { .. } => &WINDOW_FEATURES,
            FeatureKind::Slow { season: 0, .. } => &SLOW_FEATURES,
            FeatureKind::Slow { .. } => &SLOW_SEASON_FEATURES,
        }
    }

    /// Feature names, `ch{i}.{feature}` for multi-channel sensors.
    pub fn feature_names(&self) -> Vec<String> {
        let per = self.per_channel();
        (0..self.channels)
            .flat_map(|c| {
                per.iter().map(move |f| if self.channels == 1 { f.to_string() } else { format!("ch{c}.{f}") })
            })
            .collect()
    }
}

/// Feature extraction state for one sensor. Feed it samples in event-time order.
#[derive(Debug, Clone)]
pub struct SensorPipeline {
    spec: SensorSpec,
    /// One buffer per channel: the current window (fast) or the rolling history (slow).
    buffers: Vec<VecDeque<f64>>,
    /// Slow signals: the previous sample per channel.
    previous: Vec<Option<f64>>,
    /// Slow signals with a season: per channel, the last season of values and of seasonal changes.
    seasons: Vec<Season>,
}

/// The seasonal state of one channel.
#[derive(Debug, Clone, Default)]
struct Season {
    values: VecDeque<f64>,
    changes: VecDeque<f64>,
}

impl Season {
    /// Adds `v` and returns its change from one season earlier (0 until a season has passed) and that change's
    /// z-score against the changes of the season before it (0 until there are two, or while they are constant).
    fn push(&mut self, v: f64, season: usize) -> (f64, f64) {
        let mut out = (0.0, 0.0);
        if self.values.len() == season {
            let then = self.values.pop_front().unwrap_or(v);
            let change = (v / 2.0 - then / 2.0) * 2.0;
            let (mean, std) = mean_std(self.changes.make_contiguous());
            let z = if std > 0.0 && self.changes.len() >= 2 { (change / 2.0 - mean / 2.0) / std * 2.0 } else { 0.0 };
            if self.changes.len() == season {
                self.changes.pop_front();
            }
            self.changes.push_back(change);
            out = (change, z);
        }
        self.values.push_back(v);
        out
    }
}

/// A sample whose channel count differs from the spec.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("sensor `{sensor}` expects {expected} values per sample, got {got}")]
pub struct ChannelMismatch {
    pub sensor: String,
    pub expected: usize,
    pub got: usize,
}

impl SensorPipeline {
    /// Starts over, as after a long gap: rolling and seasonal state forgotten.
    pub fn reset(&mut self) {
        *self = SensorPipeline::new(self.spec.clone());
    }

    pub fn new(spec: SensorSpec) -> Self {
        let cap = match spec.features {
            FeatureKind::Window { window, .. } => window,
            FeatureKind::Slow { rolling, .. } => rolling,
        };
        SensorPipeline {
            buffers: vec![VecDeque::with_capacity(cap); spec.channels],
            previous: vec![None; spec.channels],
            seasons: vec![Season::default(); spec.channels],
            spec,
        }
    }

    pub fn spec(&self) -> &SensorSpec {
        &self.spec
    }

    /// Adds one sample; returns a feature vector when one is due.
    pub fn push(&mut self, values: &[f64]) -> Result<Option<Vec<f32>>, ChannelMismatch> {
        if values.len() != self.spec.channels {
            return Err(ChannelMismatch {
                sensor: self.spec.name.clone(),
                expected: self.spec.channels,
                got: values.len(),
            });
        }
        Ok(match self.spec.features {
            FeatureKind::Window { window, hop } => self.push_window(values, window, hop),
            FeatureKind::Slow { rolling, season } => Some(self.push_slow(values, rolling, season)),
        })
    }

    fn push_window(&mut self, values: &[f64], window: usize, hop: usize) -> Option<Vec<f32>> {
        for (buf, &v) in self.buffers.iter_mut().zip(values) {
            buf.push_back(v);
        }
        if self.buffers[0].len() < window {
            return None;
        }
        let mut out = Vec::with_capacity(self.spec.width());
        for buf in &mut self.buffers {
            let stats = window_stats(buf.make_contiguous());
            out.extend(stats.iter().map(|&x| saturate(x)));
            buf.drain(..hop.clamp(1, window));
        }
        Some(out)
    }

    fn push_slow(&mut self, values: &[f64], rolling: usize, season: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.spec.width());
        let channels = self.buffers.iter_mut().zip(&mut self.previous).zip(&mut self.seasons);
        for (((buf, prev), seasonal), &v) in channels.zip(values) {
            if buf.len() == rolling.max(1) {
                buf.pop_front();
            }
            buf.push_back(v);
            let delta = prev.map_or(0.0, |p| v / 2.0 - p / 2.0) * 2.0;
            *prev = Some(v);
            let (mean, std) = mean_std(buf.make_contiguous());
            let z = if std > 0.0 { (v / 2.0 - mean / 2.0) / std * 2.0 } else { 0.0 };
            out.extend([v, delta, mean, std, z].iter().map(|&x| saturate(x)));
            if season > 0 {
                let (change, change_z) = seasonal.push(v, season);
                out.extend([saturate(change), saturate(change_z)]);
            }
        }
        out
    }
}

/// Runs a whole [`PipelineSpec`], routing samples by sensor name.
#[derive(Debug, Clone)]
pub struct Pipeline {
    sensors: Vec<SensorPipeline>,
}

impl Pipeline {
    pub fn new(spec: &PipelineSpec) -> Self {
        Pipeline { sensors: spec.sensors.iter().cloned().map(SensorPipeline::new).collect() }
    }

    /// The pipeline for `sensor`, if the spec names it.
    pub fn sensor_mut(&mut self, sensor: &str) -> Option<&mut SensorPipeline> {
        self.sensors.iter_mut().find(|s| s.spec.name == sensor)
    }
}

/// A slow reading as a record stores it, in its `value` feature: an `f32`, saturated to the finite range.
/// Datasets recompute a slow sensor's features from that stored value, so the agent computes them from it
/// too, and a model sees in the field the features of its training rows to the bit, whatever the magnitude
/// (above 2^24, an `f32` no longer holds every integer).
pub fn as_stored(reading: f64) -> f64 {
    saturate(reading) as f64
}

/// Saturates to the finite `f32` range (the value is already finite).
fn saturate(x: f64) -> f32 {
    if x.is_nan() {
        return 0.0;
    }
    x.clamp(f32::MIN as f64, f32::MAX as f64) as f32
}

/// Mean and population standard deviation, computed on scaled values so that no intermediate overflows.
fn mean_std(xs: &[f64]) -> (f64, f64) {
    let scale = xs.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    if xs.is_empty() || scale == 0.0 {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean_s = xs.iter().map(|x| x / scale).sum::<f64>() / n;
    let var_s = xs.iter().map(|x| (x / scale - mean_s).powi(2)).sum::<f64>() / n;
    (mean_s * scale, var_s.sqrt() * scale)
}

/// The eight window statistics of [`WINDOW_FEATURES`], finite for any finite, non-empty input.
pub fn window_stats(xs: &[f64]) -> [f64; 8] {
    if xs.is_empty() {
        return [0.0; 8];
    }
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let scale = max.abs().max(min.abs());
    if scale == 0.0 {
        return [0.0; 8];
    }
    let n = xs.len() as f64;
    let ys = xs.iter().map(|x| x / scale);
    let mean_s = ys.clone().sum::<f64>() / n;
    let (m2, m4, sq) = ys.fold((0.0, 0.0, 0.0), |(m2, m4, sq), y| {
        let d = y - mean_s;
        (m2 + d * d, m4 + d * d * d * d, sq + y * y)
    });
    let (var_s, m4) = (m2 / n, m4 / n);
    let rms_s = (sq / n).sqrt();
    let kurtosis = if var_s > 1e-300 { (m4 / (var_s * var_s)).min(f64::MAX) } else { 0.0 };
    let crest = if rms_s > 0.0 { 1.0 / rms_s } else { 0.0 }; // max|y| is 1 after scaling
    let p2p = (max / 2.0 - min / 2.0) * 2.0; // halves first: max - min can overflow
    [mean_s * scale, var_s.sqrt() * scale, min, max, rms_s * scale, p2p, kurtosis, crest]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn window_spec(window: usize, hop: usize, channels: usize) -> SensorSpec {
        SensorSpec { name: "vib".into(), channels, features: FeatureKind::Window { window, hop } }
    }

    #[test]
    fn window_stats_known_values() {
        let s = window_stats(&[1.0, -1.0, 1.0, -1.0]);
        assert_eq!(s, [0.0, 1.0, -1.0, 1.0, 1.0, 2.0, 1.0, 1.0]);
        let s = window_stats(&[0.0, 0.0, 0.0, 4.0]);
        assert!((s[0] - 1.0).abs() < 1e-12);
        assert!((s[1] - 3f64.sqrt()).abs() < 1e-12);
        assert!((s[4] - 2.0).abs() < 1e-12); // rms
        assert!((s[6] - 21.0 / 9.0).abs() < 1e-12); // kurtosis (non-excess): m4 21 / m2² 9
        assert!((s[7] - 2.0).abs() < 1e-12); // crest = 4 / 2
    }

    #[test]
    fn window_emits_every_hop() {
        let mut p = SensorPipeline::new(window_spec(4, 2, 1));
        let emitted: Vec<bool> = (0..10).map(|i| p.push(&[i as f64]).unwrap().is_some()).collect();
        assert_eq!(emitted, [false, false, false, true, false, true, false, true, false, true]);
    }

    #[test]
    fn multi_channel_layout() {
        let spec = window_spec(2, 2, 2);
        assert_eq!(spec.width(), 16);
        assert_eq!(spec.feature_names()[8], "ch1.mean");
        let mut p = SensorPipeline::new(spec);
        p.push(&[1.0, 10.0]).unwrap();
        let v = p.push(&[3.0, 30.0]).unwrap().unwrap();
        assert_eq!((v[0], v[8]), (2.0, 20.0));
    }

    #[test]
    fn wrong_channel_count_is_an_error() {
        let mut p = SensorPipeline::new(window_spec(2, 2, 3));
        let err = p.push(&[1.0]).unwrap_err();
        assert_eq!(err.to_string(), "sensor `vib` expects 3 values per sample, got 1");
    }

    #[test]
    fn slow_features() {
        let spec = SensorSpec { name: "t".into(), channels: 1, features: FeatureKind::Slow { rolling: 3, season: 0 } };
        assert_eq!(spec.feature_names(), SLOW_FEATURES);
        let mut p = SensorPipeline::new(spec);
        assert_eq!(p.push(&[10.0]).unwrap().unwrap(), vec![10.0, 0.0, 10.0, 0.0, 0.0]);
        p.push(&[12.0]).unwrap();
        let v = p.push(&[14.0]).unwrap().unwrap();
        assert_eq!(&v[..3], &[14.0, 2.0, 12.0]);
        assert!((v[3] - (8.0f32 / 3.0).sqrt()).abs() < 1e-6);
        // The rolling window forgets the oldest sample.
        let v = p.push(&[14.0]).unwrap().unwrap();
        assert!((v[2] - 40.0 / 3.0).abs() < 1e-5);
    }

    #[test]
    fn seasonal_features_compare_with_one_season_earlier() {
        let spec = SensorSpec { name: "t".into(), channels: 1, features: FeatureKind::Slow { rolling: 2, season: 3 } };
        assert_eq!(spec.width(), 7);
        assert_eq!(&spec.feature_names()[5..], SEASON_FEATURES);
        let mut p = SensorPipeline::new(spec);
        // Until a season has passed there is nothing to compare with.
        for v in [1.0, 5.0, 9.0] {
            assert_eq!(&p.push(&[v]).unwrap().unwrap()[5..], &[0.0, 0.0]);
        }
        // A repeating cycle changes by 0 from one season to the next.
        let cycle: Vec<Vec<f32>> = [1.0, 5.0, 9.0, 1.0].iter().map(|&v| p.push(&[v]).unwrap().unwrap()).collect();
        assert!(cycle.iter().all(|f| f[5] == 0.0 && f[6] == 0.0), "{cycle:?}");
        // A value that breaks the cycle: +4 from the same point last season, while the changes were all 0
        // (their spread is 0, so the z-score stays 0 rather than dividing by it).
        let broken = p.push(&[9.0]).unwrap().unwrap();
        assert_eq!(broken[5], 4.0);
        assert_eq!(broken[6], 0.0);
        // Back in the cycle: the change is 0 again, and now its z-score is measured against the +4 (mean 4/3,
        // spread sqrt(32/9)): (0 - 4/3) / 1.8856 = -0.7071.
        let back = p.push(&[9.0]).unwrap().unwrap();
        assert_eq!(back[5], 0.0);
        assert!((back[6] + 0.70710677).abs() < 1e-5, "{back:?}");
        // Specs without a season encode as before (so signed manifests verify), and older specs read as 0.
        #[derive(Serialize)]
        #[serde(tag = "kind", rename_all = "snake_case")]
        enum Before {
            Slow { rolling: usize },
        }
        let (mut before, mut now) = (Vec::new(), Vec::new());
        ciborium::into_writer(&Before::Slow { rolling: 12 }, &mut before).unwrap();
        ciborium::into_writer(&FeatureKind::Slow { rolling: 12, season: 0 }, &mut now).unwrap();
        assert_eq!(before, now);
        let read: FeatureKind = ciborium::from_reader(&before[..]).unwrap();
        assert_eq!(read, FeatureKind::Slow { rolling: 12, season: 0 });
    }

    #[test]
    fn spec_serialises() {
        let spec = PipelineSpec {
            version: 1,
            sensors: vec![
                window_spec(256, 128, 3),
                SensorSpec { name: "t".into(), channels: 1, features: FeatureKind::Slow { rolling: 60, season: 0 } },
            ],
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&spec, &mut bytes).unwrap();
        let back: PipelineSpec = ciborium::from_reader(&bytes[..]).unwrap();
        assert_eq!(back, spec);
    }

    fn finite() -> impl Strategy<Value = f64> {
        prop_oneof![
            any::<f64>().prop_filter("finite", |x| x.is_finite()),
            -1e3f64..1e3,
            Just(f64::MAX),
            Just(f64::MIN),
            Just(f64::MIN_POSITIVE),
            Just(0.0),
        ]
    }

    proptest! {
        #[test]
        fn window_output_finite_and_deterministic(
            samples in proptest::collection::vec(proptest::collection::vec(finite(), 2), 1..64),
            window in 1usize..16, hop in 1usize..16,
        ) {
            let hop = hop.min(window);
            let run = || {
                let mut p = SensorPipeline::new(window_spec(window, hop, 2));
                samples.iter().filter_map(|s| p.push(s).unwrap()).collect::<Vec<_>>()
            };
            let (a, b) = (run(), run());
            prop_assert_eq!(&a, &b);
            for v in a {
                prop_assert_eq!(v.len(), 16);
                prop_assert!(v.iter().all(|x| x.is_finite()), "{:?}", v);
            }
        }

        #[test]
        fn slow_output_finite_and_deterministic(
            samples in proptest::collection::vec(finite(), 1..64), rolling in 1usize..20, season in 0usize..8,
        ) {
            let spec = SensorSpec { name: "t".into(), channels: 1, features: FeatureKind::Slow { rolling, season } };
            let run = || {
                let mut p = SensorPipeline::new(spec.clone());
                samples.iter().map(|&s| p.push(&[s]).unwrap().unwrap()).collect::<Vec<_>>()
            };
            let (a, b) = (run(), run());
            prop_assert_eq!(&a, &b);
            prop_assert!(a.iter().flatten().all(|x| x.is_finite()));
            prop_assert!(a.iter().all(|v| v.len() == spec.width()));
        }
    }
}
