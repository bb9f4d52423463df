//! Training tests on synthetic data with known structure and injected anomalies.

use super::run::{self, train_dataset, TrainRequest};
use super::{autoencoder, eval, onnx, Hyper};
use crate::ml::dataset::{assemble, Dataset, DatasetSpec, QualityReport, Row};
use crate::ml::models::{ModelKind, ModelRegistry};
use candle_core::Device;
use edgeloop_common::durable::{Durability, DurableDb};
use edgeloop_common::features::{FeatureKind, SensorSpec};
use edgeloop_common::gaps::{GapRule, ImputeMethod};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Five correlated features; anomalies (label 1) break the correlation in the last 30% of time.
pub fn synthetic(n: usize, seed: u64) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = (0..n)
        .map(|i| {
            let a: f32 = rng.gen_range(-2.0..2.0);
            let b: f32 = rng.gen_range(-1.0..1.0);
            let noise = |rng: &mut StdRng| rng.gen_range(-0.05f32..0.05);
            let anomaly = i > n * 7 / 10 && i % 10 == 0;
            let second = if anomaly { -2.0 * a + 1.5 } else { 2.0 * a };
            let features = vec![a, second + noise(&mut rng), b, a + b + noise(&mut rng), 10.0 + a * b];
            Row {
                device: format!("d{}", i % 3),
                ts_ms: 1_000 * i as u64,
                features,
                label: Some(anomaly as u32),
                flagged: false,
            }
        })
        .collect();
    let sensor = SensorSpec { name: "s".into(), channels: 1, features: FeatureKind::Slow { rolling: 1, season: 0 } };
    let mut spec = DatasetSpec::new("synthetic");
    spec.train_share = 0.6;
    spec.val_share = 0.2;
    assemble(spec, sensor, rows, QualityReport::default())
}

/// A model registry in a new temporary directory (kept alive by the returned guard).
fn registry() -> (tempfile::TempDir, ModelRegistry) {
    let dir = tempfile::tempdir().unwrap();
    let db = DurableDb::open(&dir.path().join("db"), Durability::Flush).unwrap();
    let registry = ModelRegistry::open(&db, dir.path()).unwrap();
    (dir, registry)
}

fn quick() -> Hyper {
    Hyper { width: 16, depth: 1, lr: 5e-3, epochs: 40, batch: 32, patience: 5, window: 0 }
}

#[test]
fn autoencoder_separates_injected_anomalies() {
    let ds = synthetic(3000, 1);
    let m = autoencoder::train(&Device::Cpu, &ds.train, &ds.val, &ds.standardizer, &quick(), 7, &mut |_, _| Ok(()))
        .unwrap();
    let scores = autoencoder::score(&m.weights, &ds.standardizer, &ds.test).unwrap();
    let labels: Vec<bool> = ds.test.iter().map(|r| r.label == Some(1)).collect();
    assert!(labels.iter().filter(|&&l| l).count() > 20);
    let auc = eval::roc_auc(&scores, &labels).unwrap();
    assert!(auc >= 0.9, "ROC AUC {auc}");
}

#[test]
fn export_matches_candle_and_loads_from_bytes() {
    let ds = synthetic(800, 2);
    let m = autoencoder::train(
        &Device::Cpu,
        &ds.train,
        &ds.val,
        &ds.standardizer,
        &Hyper { epochs: 5, ..quick() },
        3,
        &mut |_, _| Ok(()),
    )
    .unwrap();
    let bytes = onnx::export_autoencoder(&m.weights, &ds.standardizer, "test");
    let expected = autoencoder::score(&m.weights, &ds.standardizer, &ds.val).unwrap();
    let rows: Vec<Vec<f32>> = ds.val.iter().map(|r| r.features.clone()).collect();
    let worst = onnx::verify(&bytes, &rows, &expected).unwrap();
    assert!(worst <= onnx::TOLERANCE);
    // A wrong expectation is caught.
    let mut wrong = expected.clone();
    wrong[3] *= 1.01;
    assert!(onnx::verify(&bytes, &rows, &wrong).is_err());
    // Rounding on a score far under the median is measured against the median; a 1% error on a typical score
    // is still caught.
    let mut order: Vec<usize> = (0..expected.len()).collect();
    order.sort_by(|&a, &b| expected[a].abs().total_cmp(&expected[b].abs()));
    let (smallest, median) = (order[0], order[order.len() / 2]);
    assert!(expected[smallest].abs() * 10.0 < expected[median].abs(), "a spread of scores to test with");
    let mut rounded = expected.clone();
    rounded[smallest] += expected[median].abs() * 2e-5;
    onnx::verify(&bytes, &rows, &rounded).unwrap();
    let mut off = expected.clone();
    off[median] *= 1.01;
    assert!(onnx::verify(&bytes, &rows, &off).is_err());
}

#[test]
fn same_seed_same_model_bytes() {
    let ds = synthetic(600, 3);
    let h = Hyper { epochs: 4, ..quick() };
    let export = |seed| {
        let m = autoencoder::train(&Device::Cpu, &ds.train, &ds.val, &ds.standardizer, &h, seed, &mut |_, _| Ok(()))
            .unwrap();
        onnx::export_autoencoder(&m.weights, &ds.standardizer, "x")
    };
    assert_eq!(export(11), export(11));
    assert_ne!(export(11), export(12));
}

#[test]
fn worse_model_is_not_promoted_and_lineage_is_recorded() {
    let (_dir, registry) = registry();
    let ds = synthetic(1500, 4);
    let mut req = TrainRequest::new("synthetic");
    req.trials = 1;
    req.hyper = Some(quick());
    let first = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert!(first.promotion.promoted, "{}", first.promotion.reason);
    assert_eq!(first.lineage.dataset_hash, ds.hash);
    assert_eq!(first.golden.len(), 8);
    assert!(first.lineage.metrics.test_auc.unwrap() >= 0.9);
    // A crippled model: one epoch at a tiny learning rate.
    req.hyper = Some(Hyper { epochs: 1, lr: 1e-6, ..quick() });
    let second = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert_eq!(second.version, 2);
    assert!(!second.promotion.promoted, "{}", second.promotion.reason);
    assert_eq!(second.promotion.production_version, Some(1));
    assert_eq!(registry.production("synthetic").unwrap().unwrap().version, 1);
    // The artifact on disk is what the manifest says.
    let bytes = std::fs::read(registry.artifact_path(&second.sha256).unwrap()).unwrap();
    assert_eq!(bytes.len() as u64, second.size);
    // Golden vectors reproduce through tract.
    let inputs: Vec<Vec<f32>> = first.golden.iter().map(|g| g.input.clone()).collect();
    let outputs: Vec<f32> = first.golden.iter().map(|g| g.output[0]).collect();
    let prod = std::fs::read(registry.artifact_path(&first.sha256).unwrap()).unwrap();
    onnx::verify(&prod, &inputs, &outputs).unwrap();
}

#[test]
fn search_records_every_trial_and_keeps_the_best() {
    let ds = synthetic(600, 5);
    let base = Hyper { epochs: 9, ..quick() };
    let out = super::search::run(
        &super::device::Devices::cpu(),
        &ds.train,
        &ds.val,
        &ds.standardizer,
        &base,
        super::search::Budget { trials: 4, max_seconds: None, stop: super::Stop::never() },
        1,
        &mut |_, _| {},
    )
    .unwrap();
    // Rung 0: 4 trials at 3 epochs; rung 1: the best 2 at 9 epochs.
    assert_eq!(out.trials.len(), 6, "{:?}", out.trials.iter().map(|t| (t.id, t.rung)).collect::<Vec<_>>());
    let best = out.trials.iter().map(|t| t.val_loss).fold(f64::INFINITY, f64::min);
    assert_eq!(out.best.val_loss, best);
    assert_eq!(out.model.val_loss, best);
    // Each trial says where it trained: these small models on one CPU thread.
    assert!(out.trials.iter().all(|t| t.device == "cpu (1 threads)"), "{:?}", out.trials);
}

/// Three well-separated labelled clusters, unbalanced (60/25/15).
fn clusters(n: usize, seed: u64) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = (0..n)
        .map(|i| {
            let u: f32 = rng.gen_range(0.0..1.0);
            let label = if u < 0.6 {
                0
            } else if u < 0.85 {
                1
            } else {
                2
            };
            let c = [(0.0f32, 0.0f32), (3.0, 1.0), (-2.0, 3.0)][label as usize];
            let features = vec![
                c.0 + rng.gen_range(-0.8..0.8),
                c.1 + rng.gen_range(-0.8..0.8),
                rng.gen_range(-1.0..1.0),
                5.0,
                c.0 * c.1,
            ];
            Row { device: "d".into(), ts_ms: i as u64 * 1000, features, label: Some(label), flagged: false }
        })
        .collect();
    let sensor = SensorSpec { name: "s".into(), channels: 1, features: FeatureKind::Slow { rolling: 1, season: 0 } };
    assemble(DatasetSpec::new("clusters"), sensor, rows, QualityReport::default())
}

/// A classifier training of the `clusters` class with `trials` trials and `hyper`.
fn classifier_request(trials: usize, hyper: Hyper) -> TrainRequest {
    let mut req = TrainRequest::new("clusters");
    req.kind = super::run::ModelKind::Classifier;
    req.trials = trials;
    req.hyper = Some(hyper);
    req
}

#[test]
fn classifier_beats_the_majority_class_by_a_wide_margin() {
    let (_dir, registry) = registry();
    let ds = clusters(1500, 9);
    let req = classifier_request(2, quick());
    let m = train_dataset(&ds, "clusters", &req, &registry, &mut |_, _| {}).unwrap();
    let (acc, majority) = (m.lineage.metrics.test_accuracy.unwrap(), m.lineage.metrics.majority_accuracy.unwrap());
    assert!(acc >= 0.95 && acc - majority >= 0.25, "accuracy {acc}, majority {majority}");
    assert_eq!(
        (m.name.as_str(), m.kind.as_str(), m.output_shape.clone()),
        ("clusters-classifier", "classifier", vec![-1, 3])
    );
    assert!(m.promotion.promoted);
    assert_eq!(m.score_tail, None, "a classifier has no anomaly score");
    // Golden probabilities sum to one and reproduce through tract.
    let bytes = std::fs::read(registry.artifact_path(&m.sha256).unwrap()).unwrap();
    let inputs: Vec<Vec<f32>> = m.golden.iter().map(|g| g.input.clone()).collect();
    let outputs: Vec<f32> = m.golden.iter().flat_map(|g| g.output.clone()).collect();
    onnx::verify(&bytes, &inputs, &outputs).unwrap();
    assert!(m.golden.iter().all(|g| (g.output.iter().sum::<f32>() - 1.0).abs() < 1e-5));
    // Without labels a classifier is refused.
    let unlabelled = synthetic(300, 1);
    let mut none = unlabelled.clone();
    for r in none.train.iter_mut() {
        r.label = None;
    }
    assert!(matches!(train_dataset(&none, "x", &req, &registry, &mut |_, _| {}), Err(super::run::RunError::NoLabels)));
}

#[test]
fn a_model_of_another_sensor_never_replaces_production() {
    let (_dir, registry) = registry();
    let mut req = TrainRequest::new("synthetic");
    req.trials = 1;
    // A poor first model of sensor `s` (one epoch at a tiny learning rate)...
    req.hyper = Some(Hyper { epochs: 1, lr: 1e-6, ..quick() });
    let ds = synthetic(1200, 6);
    let first = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert!(first.promotion.promoted);
    // ...and a much better model of another sensor of the same width: not compared, not promoted.
    let mut other = ds.clone();
    other.sensor.name = "other".into();
    req.hyper = Some(quick());
    let second = train_dataset(&other, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert!(!second.promotion.promoted, "{}", second.promotion.reason);
    assert!(second.promotion.reason.contains("models sensor `s`"), "{}", second.promotion.reason);
    assert_eq!(registry.production("synthetic").unwrap().unwrap().version, first.version);
}

#[test]
fn classifier_needs_labelled_validation_rows() {
    let (_dir, registry) = registry();
    let mut ds = clusters(600, 3);
    ds.val.iter_mut().for_each(|r| r.label = None);
    let mut req = TrainRequest::new("clusters");
    req.kind = super::run::ModelKind::Classifier;
    req.trials = 1;
    let r = train_dataset(&ds, "clusters", &req, &registry, &mut |_, _| {});
    assert!(matches!(r, Err(super::run::RunError::NoLabels)), "{:?}", r.map(|m| m.version));
    assert!(onnx::verify(&[], &[], &[]).is_err(), "verifying on nothing is not a verification");
}

/// Three devices of a noisy sine (20 rows a period) and four features that follow it; no labels.
fn sines(n: usize, seed: u64) -> Dataset {
    let mut rng = StdRng::seed_from_u64(seed);
    let rows = (0..n)
        .map(|i| {
            let (dev, k) = (i % 3, (i / 3) as f32);
            let v = (k * std::f32::consts::TAU / 20.0 + dev as f32).sin() + rng.gen_range(-0.02..0.02);
            let mut n = || rng.gen_range(-0.02f32..0.02);
            let features = vec![v, 0.5 * v + n(), -v + n(), 0.2 * v + n(), 1.0 + n()];
            Row { device: format!("d{dev}"), ts_ms: 1_000 * (i / 3) as u64, features, label: None, flagged: false }
        })
        .collect();
    let sensor = SensorSpec { name: "s".into(), channels: 1, features: FeatureKind::Slow { rolling: 1, season: 0 } };
    let mut spec = DatasetSpec::new("sines");
    spec.train_share = 0.6;
    spec.val_share = 0.2;
    assemble(spec, sensor, rows, QualityReport::default())
}

#[test]
fn a_forecaster_is_chosen_where_context_matters_and_beats_an_autoencoder_in_production() {
    let (_dir, registry) = registry();
    let ds = sines(3000, 9);
    // In production: an autoencoder of the same class, as an earlier training would have left it.
    let ae = autoencoder::train(&Device::Cpu, &ds.train, &ds.val, &ds.standardizer, &quick(), 1, &mut |_, _| Ok(()))
        .unwrap();
    let ae_bytes = onnx::export_autoencoder(&ae.weights, &ds.standardizer, "autoencoder");
    let mut req = TrainRequest::new("sines");
    req.trials = 1;
    req.hyper = Some(Hyper { epochs: 1, lr: 1e-6, ..quick() });
    // A crippled first version (one epoch at a tiny rate) is promoted (it is the first); its artifact is
    // then swapped for the real autoencoder's, so production is a good point-wise model.
    let mut prod = train_dataset(&ds, "sines", &req, &registry, &mut |_, _| {}).unwrap();
    prod.sha256 = registry.put_artifact(&ae_bytes).unwrap();
    (prod.kind, prod.frames, prod.input_shape) = (ModelKind::Autoencoder, 1, vec![-1, 5]);
    registry.overwrite(&prod).unwrap();

    req.hyper = Some(quick());
    let m = train_dataset(&ds, "sines", &req, &registry, &mut |_, _| {}).unwrap();
    assert_eq!(m.kind, ModelKind::Forecaster, "{}", m.lineage.selection);
    assert!(m.lineage.selection.starts_with("forecaster: ROC AUC"), "{}", m.lineage.selection);
    assert!(m.lineage.selection.contains("synthetic anomalies"), "{}", m.lineage.selection);
    assert!(m.frames > 1);
    assert_eq!(m.input_shape, vec![-1, 5 * m.frames as i64]);
    assert_eq!(m.manifest().frames, m.frames);
    // Every trial of both searches is recorded; the forecaster's carry their window.
    assert!(m.lineage.trials.iter().any(|t| t.hyper.window == m.frames as usize));
    // Autoencoder and forecaster score on different scales: they were compared by ROC AUC on the same test
    // windows with synthetic anomalies, and the forecaster won.
    assert_eq!(m.promotion.metric, "test_synthetic_anomaly_auc", "{}", m.promotion.reason);
    assert!(m.promotion.promoted, "{}", m.promotion.reason);
    assert!(m.promotion.candidate > m.promotion.production.unwrap());
    // Golden vectors are whole windows, and tract reproduces them from the stored file.
    assert!(m.golden.iter().all(|g| g.input.len() == 5 * m.frames as usize));
    let bytes = std::fs::read(registry.artifact_path(&m.sha256).unwrap()).unwrap();
    let inputs: Vec<Vec<f32>> = m.golden.iter().map(|g| g.input.clone()).collect();
    let outputs: Vec<f32> = m.golden.iter().map(|g| g.output[0]).collect();
    onnx::verify(&bytes, &inputs, &outputs).unwrap();
    assert!(m.lineage.metrics.export_max_rel_error <= onnx::TOLERANCE);
}

#[test]
fn without_labels_production_is_compared_by_detection_not_by_score_scale() {
    let (_dir, registry) = registry();
    let mut ds = synthetic(1500, 4);
    for r in ds.train.iter_mut().chain(&mut ds.val).chain(&mut ds.test) {
        r.label = None;
    }
    let mut req = TrainRequest::new("synthetic");
    req.trials = 1;
    req.hyper = Some(quick());
    let mut prod = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert!(prod.promotion.promoted, "{}", prod.promotion.reason);
    // In production: an autoencoder that barely trained, exported with a standardizer 100 times too wide, so
    // it scores every row near 0 and detects nothing.
    let cripple = Hyper { epochs: 1, lr: 1e-6, ..quick() };
    let weak = autoencoder::train(&Device::Cpu, &ds.train, &ds.val, &ds.standardizer, &cripple, 1, &mut |_, _| Ok(()))
        .unwrap();
    let mut wide = ds.standardizer.clone();
    wide.std.iter_mut().for_each(|s| *s *= 100.0);
    let weak_bytes = onnx::export_autoencoder(&weak.weights, &wide, "autoencoder");
    prod.sha256 = registry.put_artifact(&weak_bytes).unwrap();
    (prod.kind, prod.frames, prod.input_shape) = (ModelKind::Autoencoder, 1, vec![-1, 5]);
    registry.overwrite(&prod).unwrap();

    let m = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert_eq!((m.kind.as_str(), m.frames), ("autoencoder", 1), "{}", m.lineage.selection);
    // Its mean test score is far above the crippled model's: compared by mean score, it would have lost.
    let test: Vec<Vec<f32>> = ds.test.iter().map(|r| r.features.clone()).collect();
    let weak_scores = onnx::run_tract(&weak_bytes, &test).unwrap();
    let weak_mean = weak_scores.iter().map(|&s| s as f64).sum::<f64>() / weak_scores.len() as f64;
    assert!(weak_mean < m.lineage.metrics.test_loss / 10.0, "{weak_mean} vs {}", m.lineage.metrics.test_loss);
    // Compared by how well each finds synthetic anomalies in the same test windows, it wins.
    assert_eq!(m.promotion.metric, "test_synthetic_anomaly_auc", "{}", m.promotion.reason);
    assert!(m.promotion.promoted, "{}", m.promotion.reason);
    assert!(m.promotion.candidate > m.promotion.production.unwrap(), "{}", m.promotion.reason);
    assert_eq!(registry.production("synthetic").unwrap().unwrap().version, m.version);
    // The same training again (same seed, same weights; only the version named in the graph differs) ties,
    // and a tie keeps production.
    let again = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert!(!again.promotion.promoted, "{}", again.promotion.reason);
    assert_eq!(again.promotion.candidate, again.promotion.production.unwrap());
    assert_eq!(registry.production("synthetic").unwrap().unwrap().version, m.version);
}

#[test]
fn without_anomalies_to_compare_on_production_stays() {
    let (_dir, registry) = registry();
    // 120 rows, no labels, 3 of them in the test split: too few windows for synthetic anomalies.
    let full = synthetic(120, 4);
    let rows: Vec<Row> =
        full.train.iter().chain(&full.val).chain(&full.test).map(|r| Row { label: None, ..r.clone() }).collect();
    let spec = DatasetSpec { train_share: 0.8, val_share: 0.175, ..DatasetSpec::new("synthetic") };
    let ds = assemble(spec, full.sensor.clone(), rows, QualityReport::default());
    assert_eq!(ds.test.len(), 3);
    let mut req = TrainRequest::new("synthetic");
    req.trials = 1;
    req.hyper = Some(quick());
    let first = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert!(first.promotion.promoted);
    let second = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert!(!second.promotion.promoted, "{}", second.promotion.reason);
    assert!(second.promotion.reason.contains("too few for synthetic anomalies"), "{}", second.promotion.reason);
    assert_eq!(second.promotion.production_version, Some(first.version));
    assert_eq!(registry.production("synthetic").unwrap().unwrap().version, first.version);
}

#[test]
fn the_datasets_gap_rule_goes_into_the_version_and_its_manifest() {
    let (_dir, registry) = registry();
    let mut ds = synthetic(600, 4);
    (ds.spec.impute, ds.spec.max_gap) = (ImputeMethod::Hold, 3);
    let mut req = TrainRequest::new("synthetic");
    req.trials = 1;
    req.hyper = Some(quick());
    let m = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    let held = GapRule { impute: ImputeMethod::Hold, max_gap: 3 };
    assert_eq!(m.gaps, held);
    assert_eq!(m.manifest().gaps, held);
    assert_eq!(registry.get("synthetic", m.version).unwrap().unwrap().gaps, held);
    // A fast sensor's rows are window statistics the agent computed; datasets fill no gaps in them, and the
    // version carries the default rule whatever the spec says.
    ds.sensor.features = FeatureKind::Window { window: 8, hop: 8 };
    let fast = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert_eq!(fast.gaps, GapRule::default());
    assert_eq!(fast.manifest().gaps, GapRule::default());
}

#[test]
fn an_anomaly_models_manifest_carries_the_tail_of_its_normal_validation_and_test_scores() {
    let (_dir, registry) = registry();
    let mut req = TrainRequest::new("synthetic");
    req.trials = 1;
    req.hyper = Some(quick());
    // Too few windows (140 of validation and 140 of test, 5 or 6 past the 98th percentile) make no tail.
    let small = train_dataset(&synthetic(700, 4), "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert_eq!(small.score_tail, None);
    // 300 of each: too few in the validation split alone, enough with the test split's.
    let both = train_dataset(&synthetic(1500, 4), "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert!(both.score_tail.is_some(), "the test split's windows count towards the tail");
    let ds = synthetic(4000, 4);
    let m = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    let tail = m.score_tail.expect("an anomaly model has a score tail");
    assert_eq!(tail.validate(), Ok(()));
    assert!((0.01..=0.03).contains(&tail.peak_share), "{tail:?}");
    let (common, rare) = (tail.threshold(1e-2).unwrap(), tail.threshold(1e-5).unwrap());
    assert!(tail.peak_threshold < rare && common < rare, "{tail:?}");
    assert_eq!(m.manifest().score_tail, Some(tail));
    assert_eq!(registry.get("synthetic", m.version).unwrap().unwrap().score_tail, Some(tail));
}

#[test]
fn the_autoencoder_is_kept_where_readings_are_independent() {
    let (_dir, registry) = registry();
    let ds = synthetic(1500, 4);
    let mut req = TrainRequest::new("synthetic");
    req.trials = 1;
    req.hyper = Some(quick());
    let m = train_dataset(&ds, "synthetic", &req, &registry, &mut |_, _| {}).unwrap();
    assert_eq!((m.kind.as_str(), m.frames), ("autoencoder", 1), "{}", m.lineage.selection);
    assert!(m.lineage.selection.contains("labelled validation windows"), "{}", m.lineage.selection);
}

/// Correlated rows, no labels; every `every`-th row breaks the correlation and is flagged, as a production
/// model would have flagged it.
fn flagged_anomalies(n: usize, every: usize, exclude: bool) -> (Dataset, Vec<bool>) {
    let mut rng = StdRng::seed_from_u64(21);
    let mut truth = Vec::new();
    let rows = (0..n)
        .map(|i| {
            let a: f32 = rng.gen_range(-2.0..2.0);
            let b: f32 = rng.gen_range(-1.0..1.0);
            let anomaly = i % every == 0;
            let second = if anomaly { -2.0 * a + 1.5 } else { 2.0 * a };
            truth.push(anomaly);
            let features = vec![a, second, b, a + b, 10.0 + a * b];
            Row { device: "d".into(), ts_ms: 1_000 * i as u64, features, label: None, flagged: anomaly }
        })
        .collect();
    let sensor = SensorSpec { name: "s".into(), channels: 1, features: FeatureKind::Slow { rolling: 1, season: 0 } };
    let mut spec = DatasetSpec::new("flagged");
    spec.exclude_flagged = exclude;
    let ds = assemble(spec, sensor, rows, QualityReport::default());
    let test_truth = ds.test.iter().map(|r| truth[(r.ts_ms / 1_000) as usize]).collect();
    (ds, test_truth)
}

#[test]
fn flagged_rows_stay_out_of_retraining_unless_they_are_drift() {
    let train = |every: usize, exclude: bool| {
        let (_dir, registry) = registry();
        let (ds, truth) = flagged_anomalies(3000, every, exclude);
        let mut req = TrainRequest::new("flagged");
        req.trials = 1;
        req.hyper = Some(Hyper { width: 24, depth: 2, epochs: 60, ..quick() });
        let m = train_dataset(&ds, "flagged", &req, &registry, &mut |_, _| {}).unwrap();
        assert_eq!(m.frames, 1, "point-wise rows: the autoencoder is kept ({})", m.lineage.selection);
        let flagged = ds.train.iter().chain(&ds.val).chain(&ds.test).filter(|r| r.flagged).count();
        assert_eq!((ds.report.flagged as usize, flagged), (3000 / every, 3000 / every), "the report counts them");
        let bytes = std::fs::read(registry.artifact_path(&m.sha256).unwrap()).unwrap();
        let rows: Vec<Vec<f32>> = ds.test.iter().map(|r| r.features.clone()).collect();
        let scores = onnx::run_tract(&bytes, &rows).unwrap();
        (eval::roc_auc(&scores, &truth).unwrap(), m.lineage.selection)
    };
    // 1 row in 15 flagged (under the 10% cap): kept out, and the model separates them better for it.
    let (auc_kept_in, note_in) = train(15, false);
    let (auc_kept_out, note_out) = train(15, true);
    assert!(!note_in.contains("kept out"), "{note_in}");
    assert!(note_out.contains("training rows the agents flagged kept out of training"), "{note_out}");
    assert!(auc_kept_out > auc_kept_in, "AUC {auc_kept_out} kept out vs {auc_kept_in} learned");
    assert!(auc_kept_out >= 0.95, "AUC {auc_kept_out}");
    // 1 row in 5 (over the cap): that is drift, and the model learns it.
    let (_, note_drift) = train(5, true);
    assert!(!note_drift.contains("kept out"), "{note_drift}");
}

#[test]
fn a_candidate_wins_only_by_more_than_the_noise_of_the_comparison() {
    // Ten examples: the candidate's AUC is 0.94 against production's 0.84, but the paired standard error is
    // 0.167, so 0.1 is within the noise and production stays.
    let prod = [0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.65, 0.3, 0.9, 0.5];
    let cand = [0.2, 0.1, 0.6, 0.7, 0.3, 0.4, 0.5, 0.5, 0.8, 0.45];
    let labels = [false, false, true, true, false, false, true, false, true, true];
    let p = run::paired_decision("test_auc", &cand, &prod, &labels, 3);
    assert!(!p.promoted, "{}", p.reason);
    assert!((p.candidate - 0.94).abs() < 1e-12 && (p.production.unwrap() - 0.84).abs() < 1e-12, "{}", p.reason);
    assert_eq!(p.production_version, Some(3));
    assert!(p.reason.contains("does not beat production v3") && p.reason.contains("standard errors"), "{}", p.reason);
    assert!((p.margin.unwrap() - run::PROMOTION_Z * 0.167_332_005_306_815).abs() < 1e-9, "{:?}", p.margin);
    // The same two scorings repeated 40 times: the same AUCs, a standard error a sixth as wide, and the
    // candidate wins.
    let many = |s: &[f32]| -> Vec<f32> { s.iter().copied().cycle().take(400).collect() };
    let labels: Vec<bool> = labels.iter().copied().cycle().take(400).collect();
    let p = run::paired_decision("test_auc", &many(&cand), &many(&prod), &labels, 3);
    assert!(p.promoted, "{}", p.reason);
    assert!((p.candidate - 0.94).abs() < 1e-12, "{}", p.reason);
    // A candidate that scores exactly as production does ties, and a tie keeps production.
    let tie = run::paired_decision("test_auc", &many(&prod), &many(&prod), &labels, 3);
    assert!(!tie.promoted, "{}", tie.reason);
}

#[test]
fn a_classifier_replaces_production_only_when_clearly_more_accurate() {
    let (_dir, registry) = registry();
    let ds = clusters(1500, 9);
    // A poor first classifier (one epoch at a tiny learning rate)...
    let mut req = classifier_request(1, Hyper { epochs: 1, lr: 1e-6, ..quick() });
    let poor = train_dataset(&ds, "clusters", &req, &registry, &mut |_, _| {}).unwrap();
    assert!(poor.promotion.promoted, "{}", poor.promotion.reason);
    // ...is replaced by a trained one, far beyond the noise of the test rows.
    req.hyper = Some(quick());
    let good = train_dataset(&ds, "clusters", &req, &registry, &mut |_, _| {}).unwrap();
    let p = &good.promotion;
    assert!(p.promoted, "{}", p.reason);
    assert!(p.candidate > p.production.unwrap() + 0.2, "{}", p.reason);
    assert!(p.reason.contains("McNemar"), "{}", p.reason);
    // The same training again answers as it does on every row: nothing shows it better, production stays.
    let again = train_dataset(&ds, "clusters", &req, &registry, &mut |_, _| {}).unwrap();
    assert!(!again.promotion.promoted, "{}", again.promotion.reason);
    assert_eq!(again.promotion.candidate, again.promotion.production.unwrap());
    assert_eq!(registry.production("clusters-classifier").unwrap().unwrap().version, good.version);
}
