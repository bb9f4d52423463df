//! One training run for a device class, end to end: build the dataset, search, choose the threshold,
//! export to ONNX, verify the export with tract, evaluate against production on the same test split,
//! register the version with its lineage, and promote it if it wins. Blocking.

use super::search::{self, Budget};
use super::{autoencoder, classifier, eval, onnx, Hyper, TrainError};
use crate::dataset::{self, Dataset, DatasetError, DatasetSpec, Row};
use crate::models::{decide, Golden, Lineage, Metrics, ModelRegistry, ModelVersion};
use crate::store::{StoreError, TelemetryStore};
use edgeloop_common::config::ClassConfig;
use edgeloop_common::features::PipelineSpec;
use serde::{Deserialize, Serialize};

/// Which kind of model to train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Anomaly scores from reconstruction error; needs no labels.
    #[default]
    Autoencoder,
    /// Class probabilities, from labelled rows.
    Classifier,
}

/// What to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRequest {
    pub dataset: DatasetSpec,
    #[serde(default)]
    pub kind: ModelKind,
    pub trials: usize,
    #[serde(default)]
    pub max_seconds: Option<f64>,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub hyper: Option<Hyper>,
}

impl TrainRequest {
    pub fn new(class: &str) -> Self {
        TrainRequest {
            dataset: DatasetSpec::new(class),
            kind: ModelKind::Autoencoder,
            trials: 6,
            max_seconds: None,
            seed: 0,
            hyper: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error(transparent)]
    Train(#[from] TrainError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("writing the artifact: {0}")]
    Artifact(#[from] std::io::Error),
    #[error("no firmware config for class `{0}`")]
    UnknownClass(String),
    #[error("a classifier needs at least two labels in the training split, and labelled rows in the validation and test splits")]
    NoLabels,
}

/// Golden vectors kept in the manifest.
pub const GOLDEN: usize = 8;
/// Validation quantile used as the threshold when there are no labels.
pub const THRESHOLD_QUANTILE: f64 = 0.99;

fn raw(rows: &[Row]) -> Vec<Vec<f32>> {
    rows.iter().map(|r| r.features.clone()).collect()
}

fn anomalous(rows: &[Row]) -> Vec<bool> {
    rows.iter().map(|r| r.label.is_some_and(|l| l > 0)).collect()
}

/// Trains on an already built dataset and registers the result.
pub fn train_dataset(
    ds: &Dataset,
    class: &str,
    req: &TrainRequest,
    registry: &ModelRegistry,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<ModelVersion, RunError> {
    match req.kind {
        ModelKind::Autoencoder => train_autoencoder(ds, class, req, registry, progress),
        ModelKind::Classifier => train_classifier(ds, class, req, registry, progress),
    }
}

fn train_autoencoder(
    ds: &Dataset,
    class: &str,
    req: &TrainRequest,
    registry: &ModelRegistry,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<ModelVersion, RunError> {
    let base = req.hyper.clone().unwrap_or_default();
    let budget = Budget { trials: req.trials.max(1), max_seconds: req.max_seconds };
    // The autoencoder learns normal operation: rows labelled as anomalies stay out of its training split and
    // of the validation loss that early stopping and the search minimise (the threshold still sees them).
    let is_normal = |r: &&dataset::Row| r.label.is_none_or(|l| l == 0);
    let normal: Vec<dataset::Row> = ds.train.iter().filter(is_normal).cloned().collect();
    let normal_val: Vec<dataset::Row> = ds.val.iter().filter(is_normal).cloned().collect();
    let outcome = search::run(&normal, &normal_val, &ds.standardizer, &base, budget, req.seed, &mut |f, m| {
        progress(0.05 + 0.8 * f, m)
    })?;
    let weights = &outcome.model.weights;

    let val_scores = autoencoder::score(weights, &ds.standardizer, &ds.val)?;
    let labelled = ds.has_labels();
    let (threshold, threshold_source) = if labelled && anomalous(&ds.val).iter().any(|&a| a) {
        (
            eval::best_f1_threshold(&val_scores, &anomalous(&ds.val)),
            "labels: best F1 on the validation split".to_string(),
        )
    } else {
        (eval::quantile(&val_scores, THRESHOLD_QUANTILE), format!("validation quantile {THRESHOLD_QUANTILE}"))
    };

    progress(0.88, "exporting to ONNX and verifying with tract");
    let name = class.to_string();
    let version = registry.next_version(&name)?;
    let bytes = onnx::export_autoencoder(
        weights,
        &ds.standardizer,
        &format!("edgeloop {name} v{version}, dataset {}", ds.hash),
    );
    let export_err = onnx::verify(&bytes, &raw(&ds.val), &val_scores)?;

    progress(0.93, "evaluating against production on the test split");
    let test_scores = onnx::run_tract(&bytes, &raw(&ds.test))?;
    let test_loss = mean(&test_scores);
    let mut metrics =
        Metrics { val_loss: outcome.model.val_loss, test_loss, export_max_rel_error: export_err, ..Default::default() };
    let labels_test = anomalous(&ds.test);
    if let Some(auc) = eval::roc_auc(&test_scores, &labels_test) {
        let (p, r, f) = eval::prf(&test_scores, &labels_test, threshold);
        (metrics.test_auc, metrics.test_precision, metrics.test_recall, metrics.test_f1) =
            (Some(auc), Some(p), Some(r), Some(f));
    }
    let current = registry.production(class)?;
    let production = match &current {
        Some(prod) => {
            let path = registry.artifact_path(&prod.sha256);
            let prod_bytes = path.map(std::fs::read).transpose()?;
            match prod_bytes {
                Some(b) if prod.input_shape.last() == Some(&(ds.width() as i64)) => {
                    let s = onnx::run_tract(&b, &raw(&ds.test))?;
                    let m = match metrics.test_auc {
                        Some(_) => eval::roc_auc(&s, &labels_test).unwrap_or(0.0),
                        None => mean(&s),
                    };
                    Some((prod.version, m))
                }
                // A production model we cannot evaluate on this data loses by default.
                _ => Some((prod.version, if metrics.test_auc.is_some() { f64::NEG_INFINITY } else { f64::INFINITY })),
            }
        }
        None => None,
    };
    let mut promotion = match metrics.test_auc {
        Some(auc) => decide("test_auc", auc, production, true),
        None => decide("test_loss", test_loss, production, false),
    };
    keep_other_sensor(&mut promotion, current.as_ref(), &ds.sensor.name);

    let golden_rows = &ds.val[..ds.val.len().min(GOLDEN)];
    let golden = golden_rows
        .iter()
        .zip(&val_scores)
        .map(|(r, &s)| Golden { input: r.features.clone(), output: vec![s] })
        .collect();
    let candidate = Candidate {
        name,
        version,
        kind: "autoencoder",
        bytes,
        outputs: 1,
        threshold,
        threshold_source,
        golden,
        hyper: outcome.best.hyper.clone(),
        trials: outcome.trials,
        metrics,
        promotion,
    };
    register(ds, class, req, registry, candidate, progress)
}

fn train_classifier(
    ds: &Dataset,
    class: &str,
    req: &TrainRequest,
    registry: &ModelRegistry,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<ModelVersion, RunError> {
    let (_, train_labels) = classifier::labelled(&ds.train);
    let (_, val_labels) = classifier::labelled(&ds.val);
    let (_, test_labels) = classifier::labelled(&ds.test);
    // Early stopping, export verification and promotion all need labelled validation and test rows.
    if train_labels.iter().all(|&l| l == train_labels[0]) || val_labels.is_empty() || test_labels.is_empty() {
        return Err(RunError::NoLabels);
    }
    // Random search: each drawn configuration trained in full; the best validation loss wins.
    let base = req.hyper.clone().unwrap_or_default();
    let configs = search::draw(&base, req.trials.max(1), req.seed);
    let mut trials = Vec::new();
    let mut best: Option<(search::Trial, classifier::Classifier)> = None;
    let deadline = req.max_seconds.map(|s| std::time::Instant::now() + std::time::Duration::from_secs_f64(s));
    for (i, h) in configs.iter().enumerate() {
        if best.is_some() && deadline.is_some_and(|d| std::time::Instant::now() > d) {
            break;
        }
        let t0 = std::time::Instant::now();
        let c = classifier::train(&ds.train, &ds.val, &ds.standardizer, h, req.seed.wrapping_add(i as u64))?;
        let trial = search::Trial {
            id: i,
            rung: 0,
            hyper: h.clone(),
            epochs_run: c.epochs_run,
            val_loss: c.val_loss,
            seconds: t0.elapsed().as_secs_f64(),
        };
        progress(0.05 + 0.8 * (i + 1) as f32 / configs.len() as f32, &format!("trial {i}: val loss {:.5}", c.val_loss));
        if best.as_ref().is_none_or(|(b, _)| c.val_loss < b.val_loss) {
            best = Some((trial.clone(), c));
        }
        trials.push(trial);
    }
    let (best_trial, model) = best.ok_or(TrainError::NoTrial)?;

    progress(0.88, "exporting to ONNX and verifying with tract");
    let (val_rows, _) = classifier::labelled(&ds.val);
    let val_probs = classifier::probabilities(&model, &ds.standardizer, &val_rows)?;
    let name = format!("{class}-classifier");
    let version = registry.next_version(&name)?;
    let bytes = onnx::export_classifier(
        &model.weights,
        &ds.standardizer,
        &format!("edgeloop {name} v{version}, dataset {}", ds.hash),
    );
    let export_err = onnx::verify(&bytes, &raw(&val_rows), &val_probs)?;

    let (test_rows, test_labels) = classifier::labelled(&ds.test);
    let accuracy_of = |onnx_bytes: &[u8], k: usize| -> Result<f64, TrainError> {
        let probs = onnx::run_tract(onnx_bytes, &raw(&test_rows))?;
        Ok(classifier::accuracy_vs_majority(&classifier::argmax(&probs, k), &test_labels).0)
    };
    let test_probs = onnx::run_tract(&bytes, &raw(&test_rows))?;
    let (acc, majority) =
        classifier::accuracy_vs_majority(&classifier::argmax(&test_probs, model.classes), &test_labels);
    let current = registry.production(&name)?;
    let production = match &current {
        Some(prod) => {
            let same_shape = prod.input_shape.last() == Some(&(ds.width() as i64))
                && prod.output_shape.last() == Some(&(model.classes as i64));
            let bytes = registry.artifact_path(&prod.sha256).map(std::fs::read).transpose()?;
            match bytes {
                Some(b) if same_shape => Some((prod.version, accuracy_of(&b, model.classes)?)),
                _ => Some((prod.version, f64::NEG_INFINITY)),
            }
        }
        None => None,
    };
    let mut promotion = decide("test_accuracy", acc, production, true);
    keep_other_sensor(&mut promotion, current.as_ref(), &ds.sensor.name);
    let k = model.classes;
    let golden = val_rows
        .iter()
        .take(GOLDEN)
        .enumerate()
        .map(|(i, r)| Golden { input: r.features.clone(), output: val_probs[i * k..(i + 1) * k].to_vec() })
        .collect();
    let metrics = Metrics {
        val_loss: model.val_loss,
        export_max_rel_error: export_err,
        test_accuracy: Some(acc),
        majority_accuracy: Some(majority),
        ..Default::default()
    };
    let candidate = Candidate {
        name,
        version,
        kind: "classifier",
        bytes,
        outputs: k,
        threshold: 0.0,
        threshold_source: "none: the most probable class is the answer".into(),
        golden,
        hyper: best_trial.hyper.clone(),
        trials,
        metrics,
        promotion,
    };
    register(ds, class, req, registry, candidate, progress)
}

/// A trained, exported and evaluated model about to be registered.
struct Candidate {
    name: String,
    version: u32,
    kind: &'static str,
    bytes: Vec<u8>,
    outputs: usize,
    threshold: f32,
    threshold_source: String,
    golden: Vec<Golden>,
    hyper: Hyper,
    trials: Vec<search::Trial>,
    metrics: Metrics,
    promotion: crate::models::Promotion,
}

/// Stores the artifact, records the version with its lineage (and the production pointer if promoted).
fn register(
    ds: &Dataset,
    class: &str,
    req: &TrainRequest,
    registry: &ModelRegistry,
    c: Candidate,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<ModelVersion, RunError> {
    let sha256 = registry.put_artifact(&c.bytes)?;
    let m = ModelVersion {
        name: c.name,
        version: c.version,
        class: class.to_string(),
        sensor: ds.sensor.name.clone(),
        kind: c.kind.into(),
        sha256,
        size: c.bytes.len() as u64,
        input_shape: vec![-1, ds.width() as i64],
        output_shape: vec![-1, c.outputs as i64],
        pipeline: PipelineSpec { version: 1, sensors: vec![ds.sensor.clone()] },
        threshold: c.threshold,
        golden: c.golden,
        lineage: Lineage {
            dataset_hash: ds.hash.clone(),
            dataset_report: ds.report.clone(),
            hyper: c.hyper,
            trials: c.trials,
            seed: req.seed,
            metrics: c.metrics,
            threshold_source: c.threshold_source,
            code_version: concat!("edgeloop-control-plane ", env!("CARGO_PKG_VERSION")).to_string(),
            reference: reference(ds),
        },
        created_ms: edgeloop_common::unix_millis(),
        promotion: c.promotion,
    };
    registry.insert(&m)?;
    let verdict = if m.promotion.promoted { "promoted" } else { "not promoted" };
    progress(1.0, &format!("registered {} v{} ({verdict})", m.name, m.version));
    Ok(m)
}

/// A production model of another sensor is not comparable with this one: it stays in production.
fn keep_other_sensor(p: &mut crate::models::Promotion, production: Option<&ModelVersion>, sensor: &str) {
    if let Some(prod) = production.filter(|prod| prod.sensor != sensor) {
        p.promoted = false;
        p.reason = format!(
            "production v{} models sensor `{}`, not `{sensor}`; not compared and not replaced",
            prod.version, prod.sensor
        );
    }
}

fn reference(ds: &Dataset) -> crate::drift::Reference {
    crate::drift::Reference::fit(&ds.train.iter().map(|r| r.features.as_slice()).collect::<Vec<_>>())
}

fn mean(v: &[f32]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
}

/// Builds the dataset from the store, then trains and registers.
pub fn train_class(
    store: &TelemetryStore,
    devices: &[String],
    class: &ClassConfig,
    registry: &ModelRegistry,
    req: &TrainRequest,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<ModelVersion, RunError> {
    progress(0.0, "building the dataset");
    let labels = registry.labels()?;
    let ds = dataset::build(store, class, devices, &labels, &req.dataset)?;
    progress(
        0.05,
        &format!(
            "dataset {}: {} rows ({} train, {} val, {} test)",
            &ds.hash[..19],
            ds.report.rows,
            ds.report.train,
            ds.report.val,
            ds.report.test
        ),
    );
    train_dataset(&ds, &class.class, req, registry, progress)
}
