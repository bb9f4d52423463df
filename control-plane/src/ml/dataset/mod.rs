//! Training sets built from stored telemetry.
//!
//! A [`DatasetSpec`] selects a device class (optionally some of its devices), one sensor and a time range.
//! [`build`] then, per device:
//! 1. **cleans** with the rules of the class's firmware config ([`clean`]): non-finite values, readings
//!    outside the valid range, duplicate sequence numbers, duplicate timestamps, records out of order;
//! 2. **imputes** short gaps of a slow signal (linear or hold, up to `max_gap` samples) and marks longer gaps,
//!    where the feature pipeline restarts ([`impute`]);
//! 3. **computes features** with common's pipeline, the code the agent runs. Slow signals are rebuilt from
//!    the raw `value` feature each record carries; fast signals keep the window features the agent computed,
//!    since their raw samples never leave the device.
//!
//! Then it splits all rows **by time** into train, validation and test (no row of a later split is older
//! than any row of an earlier one), fits the [`Standardizer`] on the training split only, and writes a
//! [`QualityReport`]. The dataset's content hash goes into each model's lineage.

pub mod clean;
pub mod impute;

use crate::fleet::telemetry::{Query, StoreError, TelemetryStore};
use edgeloop_common::config::{ClassConfig, SensorConfig, SignalKind};
use edgeloop_common::envelope::{Record, FLAG_ANOMALY};
use edgeloop_common::features::{SensorPipeline, SensorSpec, SEASON_FEATURES};
use edgeloop_common::gaps::MAX_GAP_LIMIT;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How short gaps are filled (the agent fills them the same way, linearly).
pub use edgeloop_common::gaps::ImputeMethod;

/// What to build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub class: String,
    /// Only these devices; all devices of the class when empty.
    #[serde(default)]
    pub devices: Vec<String>,
    /// The sensor whose feature vectors make the rows; the class's first sensor when absent.
    #[serde(default)]
    pub sensor: Option<String>,
    #[serde(default)]
    pub from_ms: Option<u64>,
    #[serde(default)]
    pub to_ms: Option<u64>,
    #[serde(default)]
    pub impute: ImputeMethod,
    /// Longest gap, in samples, that is filled; longer gaps restart the pipeline.
    #[serde(default = "default_max_gap")]
    pub max_gap: usize,
    /// Shares of the time range for training and validation; the rest is the test split.
    #[serde(default = "default_train_share")]
    pub train_share: f64,
    #[serde(default = "default_val_share")]
    pub val_share: f64,
    /// Keep rows the agents' model flagged out of an anomaly model's training (as rows labelled anomalous
    /// are), so that a retraining does not learn the anomalies it was meant to catch; unless they are more
    /// than [`MAX_EXCLUDED_FLAGGED`] of the training split, which is drift to learn rather than anomalies.
    #[serde(default)]
    pub exclude_flagged: bool,
    /// Rows from this time on (Unix ms, event time) are a new regime: the drift a retraining trigger saw.
    /// Each regime is then split by time on its own, so that the new one is in the training, validation and
    /// test splits alike: the model learns it, and promotion judges it ([`split_by_regime`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regime_from_ms: Option<u64>,
}

/// Above this share of flagged training rows, `exclude_flagged` keeps them all: the flags mean the
/// production model no longer fits, and the new one must learn what it sees.
pub const MAX_EXCLUDED_FLAGGED: f64 = 0.1;

fn default_max_gap() -> usize {
    edgeloop_common::gaps::DEFAULT_MAX_GAP
}
fn default_train_share() -> f64 {
    0.7
}
fn default_val_share() -> f64 {
    0.15
}

impl DatasetSpec {
    pub fn new(class: &str) -> Self {
        DatasetSpec {
            class: class.to_string(),
            devices: Vec::new(),
            sensor: None,
            from_ms: None,
            to_ms: None,
            impute: ImputeMethod::default(),
            max_gap: default_max_gap(),
            train_share: default_train_share(),
            val_share: default_val_share(),
            exclude_flagged: false,
            regime_from_ms: None,
        }
    }
}

/// One training example.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[schema(as = DatasetValues)]
pub struct Row {
    pub device: String,
    pub ts_ms: u64,
    pub features: Vec<f32>,
    /// Operator or simulator label covering this time, if any (0 means normal).
    pub label: Option<u32>,
    /// The agent's model flagged the record as an anomaly when it scored it (imputed rows: never).
    #[serde(default, skip_serializing_if = "is_false")]
    pub flagged: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Per-feature mean and standard deviation, fitted on the training split.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Standardizer {
    /// Fits on `rows`; a feature with (near) zero spread gets a std of 1.
    pub fn fit(rows: &[Row], width: usize) -> Standardizer {
        let n = rows.len().max(1) as f64;
        let mut mean = vec![0f64; width];
        for r in rows {
            for (m, &x) in mean.iter_mut().zip(&r.features) {
                *m += x as f64 / n;
            }
        }
        let mut var = vec![0f64; width];
        for r in rows {
            for ((v, &x), m) in var.iter_mut().zip(&r.features).zip(&mean) {
                *v += (x as f64 - m).powi(2) / n;
            }
        }
        let std = var.iter().map(|v| if v.sqrt() > 1e-6 { v.sqrt() as f32 } else { 1.0 }).collect();
        Standardizer { mean: mean.iter().map(|&m| m as f32).collect(), std }
    }

    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        x.iter().zip(&self.mean).zip(&self.std).map(|((x, m), s)| (x - m) / s).collect()
    }
}

/// What building did to the data.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct QualityReport {
    pub devices: usize,
    pub records_in: u64,
    /// Records removed by cleaning, by rule.
    pub dropped: BTreeMap<String, u64>,
    /// Samples filled in by imputation.
    pub imputed: u64,
    /// Gaps longer than `max_gap`, left unfilled.
    pub long_gaps: u64,
    pub rows: u64,
    pub train: u64,
    pub val: u64,
    pub test: u64,
    /// Rows per label; unlabelled rows count under "unlabelled".
    pub class_balance: BTreeMap<String, u64>,
    /// Rows whose record the agent's model flagged as an anomaly.
    #[serde(default)]
    pub flagged: u64,
}

/// A built dataset.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Dataset {
    pub spec: DatasetSpec,
    pub sensor: SensorSpec,
    pub feature_names: Vec<String>,
    pub train: Vec<Row>,
    pub val: Vec<Row>,
    pub test: Vec<Row>,
    pub standardizer: Standardizer,
    pub report: QualityReport,
    /// `sha256:<hex>` of the spec and every row.
    pub hash: String,
}

impl Dataset {
    pub fn width(&self) -> usize {
        self.feature_names.len()
    }

    pub fn has_labels(&self) -> bool {
        self.train.iter().chain(&self.val).chain(&self.test).any(|r| r.label.is_some_and(|l| l > 0))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("class `{class}` has no sensor `{sensor}`")]
    NoSensor { class: String, sensor: String },
    #[error("the split shares must be positive and leave room for a test split (train {train}, val {val})")]
    Shares { train: f64, val: f64 },
    #[error("max_gap {0} is over {MAX_GAP_LIMIT}: agents fill each missing reading through their pipeline and model")]
    MaxGap(usize),
    #[error("not enough data: {rows} rows after cleaning, need at least {need}")]
    TooSmall { rows: usize, need: usize },
    #[error("the time split left the {split} split empty ({rows} rows share too few distinct timestamps)")]
    EmptySplit { split: &'static str, rows: usize },
    #[error(
        "sensor `{sensor}` has `season = {season}` rows, but no row of the training split has a season behind it \
         (its seasonal features are 0 throughout): a device needs more than {season} readings without a long \
         gap first; train on a longer time range or lower `season` in the class file"
    )]
    NoSeason { sensor: String, season: usize },
}

/// A labelled time range of one device.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    pub device: String,
    #[serde(rename = "from")]
    pub from_ms: u64,
    #[serde(rename = "to")]
    pub to_ms: u64,
    pub label: u32,
}

/// The label of `device` at `ts`, if a range covers it (the last matching range wins).
pub fn label_at(labels: &[Label], device: &str, ts: u64) -> Option<u32> {
    labels.iter().rev().find(|l| l.device == device && (l.from_ms..=l.to_ms).contains(&ts)).map(|l| l.label)
}

/// Rows of one device, from its stored records, after cleaning, imputation and feature computation.
pub fn device_rows(
    device: &str,
    records: &[Record],
    sensor: &SensorConfig,
    spec: &DatasetSpec,
    labels: &[Label],
    report: &mut QualityReport,
) -> Vec<Row> {
    let pipeline_spec = ClassConfig::sensor_spec(sensor);
    let mine: Vec<&Record> = records.iter().filter(|r| r.sensor == sensor.name).collect();
    report.records_in += mine.len() as u64;
    let flagged_at: std::collections::HashSet<u64> =
        mine.iter().filter(|r| r.flags & FLAG_ANOMALY != 0).map(|r| r.ts_ms).collect();
    let row = |ts: u64, features: Vec<f32>| Row {
        device: device.to_string(),
        ts_ms: ts,
        features,
        label: label_at(labels, device, ts),
        flagged: flagged_at.contains(&ts),
    };
    let mut rows = Vec::new();
    match sensor.kind {
        SignalKind::Fast => {
            let kept = clean::clean_fast(&mine, sensor, &mut report.dropped);
            for (ts, features) in kept {
                rows.push(row(ts, features));
            }
        }
        SignalKind::Slow => {
            // Each channel's features start with its value (a seasonal sensor has more features per channel).
            let width = pipeline_spec.width() / sensor.channels.max(1);
            let raw: Vec<(u64, Vec<f64>)> = mine
                .iter()
                .map(|r| {
                    let values = (0..sensor.channels)
                        .map(|c| r.features.get(c * width).copied().unwrap_or(f32::NAN) as f64)
                        .collect();
                    (r.ts_ms, values)
                })
                .collect();
            let seqs: Vec<u64> = mine.iter().map(|r| r.seq).collect();
            let kept = clean::clean_slow(&raw, &seqs, sensor, &mut report.dropped);
            let period_ms = ClassConfig::period_ms(sensor);
            let segments = impute::fill(&kept, period_ms, spec.max_gap, spec.impute, report);
            for segment in segments {
                let mut p = SensorPipeline::new(pipeline_spec.clone());
                for (ts, values) in segment {
                    if let Ok(Some(features)) = p.push(&values) {
                        rows.push(row(ts, features));
                    }
                }
            }
        }
    }
    rows
}

/// Splits rows by time: the oldest `train` share, then `val`, then the rest. Rows with equal timestamps
/// always land in the same split.
pub fn split_by_time(mut rows: Vec<Row>, train: f64, val: f64) -> (Vec<Row>, Vec<Row>, Vec<Row>) {
    rows.sort_by(|a, b| a.ts_ms.cmp(&b.ts_ms).then_with(|| a.device.cmp(&b.device)));
    if rows.is_empty() {
        return (Vec::new(), Vec::new(), Vec::new());
    }
    let cut = |share: f64| rows[((rows.len() as f64 * share) as usize).min(rows.len() - 1)].ts_ms;
    let (t1, t2) = (cut(train), cut(train + val));
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        if r.ts_ms < t1 {
            out.0.push(r);
        } else if r.ts_ms < t2 {
            out.1.push(r);
        } else {
            out.2.push(r);
        }
    }
    out
}

/// Fewest rows a regime must have for [`split_by_regime`] to split it on its own.
pub const MIN_REGIME_ROWS: usize = 3 * MIN_ROWS;

/// [`split_by_time`], but with `regime_from_ms` set, the rows before it and the rows from it on are each
/// split by time on their own and the splits joined: the latest regime is then in every split, not only in
/// the test split as a plain split by time would leave it. Within each regime no split sees the future of
/// the one before. A regime with fewer than [`MIN_REGIME_ROWS`] rows is not split apart.
pub fn split_by_regime(
    rows: Vec<Row>,
    train: f64,
    val: f64,
    regime_from_ms: Option<u64>,
) -> (Vec<Row>, Vec<Row>, Vec<Row>) {
    let Some(from) = regime_from_ms else { return split_by_time(rows, train, val) };
    let (old, new): (Vec<Row>, Vec<Row>) = rows.into_iter().partition(|r| r.ts_ms < from);
    if old.len() < MIN_REGIME_ROWS || new.len() < MIN_REGIME_ROWS {
        return split_by_time(old.into_iter().chain(new).collect(), train, val);
    }
    let (mut a, b) = (split_by_time(old, train, val), split_by_time(new, train, val));
    a.0.extend(b.0);
    a.1.extend(b.1);
    a.2.extend(b.2);
    a
}

/// Fewest rows a dataset may have.
pub const MIN_ROWS: usize = 30;

/// Builds a dataset from the store. Blocking.
pub fn build(
    store: &TelemetryStore,
    class: &ClassConfig,
    devices: &[String],
    labels: &[Label],
    spec: &DatasetSpec,
) -> Result<Dataset, DatasetError> {
    if !(spec.train_share > 0.0 && spec.val_share > 0.0 && spec.train_share + spec.val_share < 1.0) {
        return Err(DatasetError::Shares { train: spec.train_share, val: spec.val_share });
    }
    if spec.max_gap > MAX_GAP_LIMIT {
        return Err(DatasetError::MaxGap(spec.max_gap));
    }
    let sensor_name = spec.sensor.clone().unwrap_or_else(|| class.sensors[0].name.clone());
    let sensor = class
        .sensors
        .iter()
        .find(|s| s.name == sensor_name)
        .ok_or_else(|| DatasetError::NoSensor { class: class.class.clone(), sensor: sensor_name.clone() })?;
    let mut report = QualityReport { devices: devices.len(), ..Default::default() };
    let mut rows = Vec::new();
    for device in devices {
        let mut records = Vec::new();
        let mut after = 0;
        loop {
            let page = store
                .query(device, Query { after_seq: after, from_ms: spec.from_ms, to_ms: spec.to_ms, limit: 10_000 })?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            let full = page.len() == 10_000;
            records.extend(page);
            if !full {
                break;
            }
        }
        rows.extend(device_rows(device, &records, sensor, spec, labels, &mut report));
    }
    if rows.len() < MIN_ROWS {
        return Err(DatasetError::TooSmall { rows: rows.len(), need: MIN_ROWS });
    }
    let n = rows.len();
    let ds = assemble(spec.clone(), ClassConfig::sensor_spec(sensor), rows, report);
    for (split, len) in [("training", ds.train.len()), ("validation", ds.val.len()), ("test", ds.test.len())] {
        if len == 0 {
            return Err(DatasetError::EmptySplit { split, rows: n });
        }
    }
    // A model that only ever saw seasonal features at 0 would meet the agents' real ones in sensor units.
    let seasonal: Vec<usize> = (ds.feature_names.iter().enumerate())
        .filter(|(_, name)| name.ends_with(SEASON_FEATURES[0]))
        .map(|(i, _)| i)
        .collect();
    if !seasonal.is_empty() && ds.train.iter().all(|r| seasonal.iter().all(|&i| r.features[i] == 0.0)) {
        return Err(DatasetError::NoSeason { sensor: sensor.name.clone(), season: sensor.season });
    }
    Ok(ds)
}

/// Splits, standardises, reports and hashes already-cleaned rows.
pub fn assemble(spec: DatasetSpec, sensor: SensorSpec, rows: Vec<Row>, mut report: QualityReport) -> Dataset {
    for r in &rows {
        let key = match r.label {
            Some(l) => l.to_string(),
            None => "unlabelled".to_string(),
        };
        *report.class_balance.entry(key).or_default() += 1;
        report.flagged += r.flagged as u64;
    }
    let (train, val, test) = split_by_regime(rows, spec.train_share, spec.val_share, spec.regime_from_ms);
    let feature_names = sensor.feature_names();
    let standardizer = Standardizer::fit(&train, feature_names.len());
    report.rows = (train.len() + val.len() + test.len()) as u64;
    (report.train, report.val, report.test) = (train.len() as u64, val.len() as u64, test.len() as u64);
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = Vec::new();
    ciborium::into_writer(&(&spec, &feature_names, &train, &val, &test), &mut buf)
        .expect("CBOR encoding into a Vec is infallible");
    hasher.update(&buf);
    let hash = format!("sha256:{}", edgeloop_common::signing::hex(hasher.finish().as_ref()));
    Dataset { spec, sensor, feature_names, train, val, test, standardizer, report, hash }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ts: u64, x: f32) -> Row {
        // Five features, as a one-channel slow sensor produces.
        Row { device: "d".into(), ts_ms: ts, features: vec![x, 2.0 * x, 0.0, 0.0, 0.0], label: None, flagged: false }
    }

    #[test]
    fn a_new_regime_is_split_on_its_own_into_every_split() {
        // 1,000 rows of the old regime, then 200 of the new from t = 10,000.
        let rows: Vec<Row> = (0..1200u64).map(|i| row(if i < 1000 { i } else { 10_000 + i }, i as f32)).collect();
        let (train, val, test) = split_by_regime(rows.clone(), 0.7, 0.15, Some(10_000));
        let new = |s: &[Row]| s.iter().filter(|r| r.ts_ms >= 10_000).count();
        assert_eq!((new(&train), new(&val), new(&test)), (140, 30, 30));
        assert_eq!((train.len(), val.len(), test.len()), (840, 180, 180));
        // Within each regime, time order holds across the splits.
        let old_max = |s: &[Row]| s.iter().filter(|r| r.ts_ms < 10_000).map(|r| r.ts_ms).max().unwrap();
        let old_min = |s: &[Row]| s.iter().filter(|r| r.ts_ms < 10_000).map(|r| r.ts_ms).min().unwrap();
        assert!(old_max(&train) < old_min(&val) && old_max(&val) < old_min(&test));
        // Without a regime, or with one too small to split, the plain split by time: the new rows are all
        // in the test split.
        let (_, _, test) = split_by_regime(rows.clone(), 0.7, 0.15, None);
        assert_eq!(new(&test), 180);
        let (train, _, _) = split_by_regime(rows, 0.7, 0.15, Some(10_000 + 1200 - 50));
        assert_eq!(new(&train), 0, "a regime of 50 rows is not split apart");
    }

    #[test]
    fn split_has_no_leakage() {
        let rows: Vec<Row> = (0..100).rev().map(|t| row(t / 2, t as f32)).collect();
        let (train, val, test) = split_by_time(rows, 0.7, 0.15);
        assert_eq!(train.len() + val.len() + test.len(), 100);
        let max = |v: &[Row]| v.iter().map(|r| r.ts_ms).max().unwrap();
        let min = |v: &[Row]| v.iter().map(|r| r.ts_ms).min().unwrap();
        assert!(max(&train) < min(&val), "train overlaps validation in time");
        assert!(max(&val) < min(&test), "validation overlaps test in time");
        assert!((68..=72).contains(&train.len()), "{}", train.len());
    }

    #[test]
    fn standardizer_fits_training_split_only() {
        // Train values around 0..70, later values far higher: the fit must not see them.
        let rows: Vec<Row> = (0..100).map(|t| row(t, if t < 70 { (t % 7) as f32 } else { 1000.0 })).collect();
        let ds = assemble(
            DatasetSpec::new("c"),
            SensorSpec {
                name: "s".into(),
                channels: 1,
                features: edgeloop_common::features::FeatureKind::Slow { rolling: 3, season: 0 },
            },
            rows.clone(),
            QualityReport::default(),
        );
        let expected = Standardizer::fit(&ds.train, 5);
        assert_eq!(ds.standardizer, expected);
        assert!(ds.standardizer.mean[0] < 7.0, "mean {:?} leaked later rows", ds.standardizer.mean);
        let all = Standardizer::fit(&rows, 5);
        assert_ne!(ds.standardizer, all);
        // Constant features get unit spread instead of a division by zero.
        let flat = Standardizer::fit(&[row(0, 1.0), row(1, 1.0)], 5);
        assert_eq!(flat.std, vec![1.0; 5]);
        assert_eq!(flat.apply(&[3.0, 2.0, 0.0, 0.0, 1.0]), vec![2.0, 0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn hash_changes_with_content() {
        let spec = SensorSpec {
            name: "s".into(),
            channels: 1,
            features: edgeloop_common::features::FeatureKind::Slow { rolling: 3, season: 0 },
        };
        let rows: Vec<Row> = (0..40).map(|t| row(t, t as f32)).collect();
        let a = assemble(DatasetSpec::new("c"), spec.clone(), rows.clone(), QualityReport::default());
        let b = assemble(DatasetSpec::new("c"), spec.clone(), rows.clone(), QualityReport::default());
        let mut changed = rows;
        changed[3].features[0] = 99.0;
        let c = assemble(DatasetSpec::new("c"), spec, changed, QualityReport::default());
        assert_eq!(a.hash, b.hash);
        assert_ne!(a.hash, c.hash);
        assert_eq!(a.report.class_balance.get("unlabelled"), Some(&40));
    }

    #[test]
    fn seasonal_multichannel_rows_match_the_agents_features() {
        // Two channels with a season: seven features per channel, each channel's value first. The dataset reads
        // the values back from the stored records and recomputes the features; with no gap they are the
        // agent's own.
        let sensor = SensorConfig {
            name: "t".into(),
            kind: SignalKind::Slow,
            rate_hz: 1.0,
            channels: 2,
            window: None,
            hop: None,
            rolling: 3,
            season: 4,
            valid_min: None,
            valid_max: None,
            unit: String::new(),
        };
        let mut agent = SensorPipeline::new(ClassConfig::sensor_spec(&sensor));
        let values = |i: u64| vec![(i % 4) as f64 + 0.5 * i as f64, 100.0 - (i % 3) as f64];
        let records: Vec<Record> = (1..=20u64)
            .map(|i| Record {
                seq: i,
                ts_ms: i * 1000,
                sensor: "t".into(),
                features: agent.push(&values(i)).unwrap().unwrap(),
                score: None,
                flags: 0,
            })
            .collect();
        let mut report = QualityReport::default();
        let rows = device_rows("d", &records, &sensor, &DatasetSpec::new("c"), &[], &mut report);
        assert_eq!(rows.len(), 20);
        for (row, rec) in rows.iter().zip(&records) {
            assert_eq!(row.features.len(), 14);
            assert_eq!(row.features, rec.features, "row at {}", row.ts_ms);
        }
    }

    #[test]
    fn a_season_longer_than_the_data_or_a_gap_limit_over_the_agents_is_refused() {
        use edgeloop_common::durable::{Durability, DurableDb};
        let dir = tempfile::tempdir().unwrap();
        let store = TelemetryStore::open(DurableDb::open(&dir.path().join("db"), Durability::Flush).unwrap()).unwrap();
        // 200 readings a second apart: two seasons of 60 fit, not one of 300.
        let mut agent = SensorPipeline::new(SensorSpec {
            name: "t".into(),
            channels: 1,
            features: edgeloop_common::features::FeatureKind::Slow { rolling: 3, season: 60 },
        });
        for i in 1..=200u64 {
            let features = agent.push(&[(i as f64 * 0.3).sin() * 5.0 + (i % 7) as f64]).unwrap().unwrap();
            let rec = Record { seq: i, ts_ms: i * 1000, sensor: "t".into(), features, score: None, flags: 0 };
            store.insert("d", &rec).unwrap();
        }
        let class_with = |season: usize| {
            let mut class = ClassConfig::from_toml(
                "c.toml",
                "class = \"c\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1.0\nrolling = 3\n",
            )
            .unwrap();
            class.sensors[0].season = season;
            class
        };
        let spec = DatasetSpec::new("c");
        let ds = build(&store, &class_with(60), &["d".to_string()], &[], &spec).unwrap();
        assert_eq!(ds.feature_names.len(), 7);
        let err = build(&store, &class_with(300), &["d".to_string()], &[], &spec).unwrap_err();
        assert!(matches!(err, DatasetError::NoSeason { season: 300, .. }), "{err}");
        assert!(err.to_string().contains("`season = 300`") && err.to_string().contains("`t`"), "{err}");
        // A gap limit agents would refuse in the manifest is refused here, before any work.
        let widest = DatasetSpec { max_gap: MAX_GAP_LIMIT, ..DatasetSpec::new("c") };
        assert!(build(&store, &class_with(60), &["d".to_string()], &[], &widest).is_ok());
        let wide = DatasetSpec { max_gap: MAX_GAP_LIMIT + 1, ..DatasetSpec::new("c") };
        let err = build(&store, &class_with(60), &["d".to_string()], &[], &wide).unwrap_err();
        assert!(matches!(err, DatasetError::MaxGap(1001)), "{err}");
        assert!(err.to_string().contains("max_gap 1001"), "{err}");
    }

    #[test]
    fn labels_cover_ranges() {
        let labels = vec![
            Label { device: "d".into(), from_ms: 10, to_ms: 20, label: 1 },
            Label { device: "d".into(), from_ms: 15, to_ms: 16, label: 0 },
        ];
        assert_eq!(label_at(&labels, "d", 12), Some(1));
        assert_eq!(label_at(&labels, "d", 15), Some(0));
        assert_eq!(label_at(&labels, "d", 25), None);
        assert_eq!(label_at(&labels, "e", 12), None);
    }
}
