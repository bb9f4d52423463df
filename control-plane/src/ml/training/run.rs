//! One training run for a device class, end to end: build the dataset, search, choose the threshold,
//! export to ONNX, verify the export with tract, evaluate against production on the same test split,
//! register the version with its lineage, and promote it if it wins. Blocking.

use super::device::{DeviceSetting, Devices, Work};
use super::forecaster::{self, Forecaster};
use super::mlp::DenseWeights;
use super::search::{self, Budget};
use super::{autoencoder, classifier, eval, onnx, Hyper, TrainError};
use crate::fleet::telemetry::{StoreError, TelemetryStore};
use crate::ml::dataset::{self, Dataset, DatasetError, DatasetSpec, Row};
use crate::ml::models::{decide, Golden, Lineage, Metrics, ModelRegistry, ModelVersion, Promotion, GOLDEN_TOLERANCE};
use edgeloop_common::config::ClassConfig;
use edgeloop_common::features::{FeatureKind, PipelineSpec};
use edgeloop_common::gaps::GapRule;
use edgeloop_common::score_tail::TailFit;
use serde::{Deserialize, Serialize};

pub use crate::ml::models::ModelKind;

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
    /// Where trials run: the control plane's `training.device`, not part of an API request.
    #[serde(skip)]
    pub device: DeviceSetting,
    /// When to give up (the control plane stopping): not part of an API request.
    #[serde(skip)]
    pub stop: super::Stop,
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
            device: DeviceSetting::Auto,
            stop: super::Stop::never(),
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
    #[error(transparent)]
    Model(#[from] crate::ml::models::ModelError),
    #[error("writing the artifact: {0}")]
    Artifact(#[from] std::io::Error),
    #[error("no firmware config for class `{0}`")]
    UnknownClass(String),
    #[error("the training request: {0}")]
    Request(String),
    #[error("a {0} cannot be asked for: ask for an autoencoder (the search registers a forecaster when it scores better) or a classifier")]
    NotTrainable(ModelKind),
    #[error("a classifier needs at least two labels in the training split, and labelled rows in the validation and test splits")]
    NoLabels,
}

/// Golden vectors kept in the manifest.
pub const GOLDEN: usize = 8;
/// Validation quantile used as the threshold when there are no labels.
pub const THRESHOLD_QUANTILE: f64 = 0.99;

/// How the threshold was set when there are no labels, for the lineage.
fn threshold_by_quantile() -> String {
    format!("validation quantile {THRESHOLD_QUANTILE} (median over up to {} stretches of time)", eval::STRETCHES)
}

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
    let devices = Devices::new(req.device).map_err(TrainError::from)?;
    match req.kind {
        ModelKind::Autoencoder => train_autoencoder(&devices, ds, class, req, registry, progress),
        ModelKind::Classifier => train_classifier(&devices, ds, class, req, registry, progress),
        kind @ (ModelKind::Forecaster | ModelKind::Uploaded) => Err(RunError::NotTrainable(kind)),
    }
}

/// Whether the flagged rows stay out of training: `Some(what was done)` when the dataset asks for it and they
/// are at most [`dataset::MAX_EXCLUDED_FLAGGED`] of the training split.
fn excluded_flagged(ds: &Dataset) -> Option<String> {
    if !ds.spec.exclude_flagged {
        return None;
    }
    let flagged = ds.train.iter().filter(|r| r.flagged).count();
    let share = flagged as f64 / ds.train.len().max(1) as f64;
    if share > dataset::MAX_EXCLUDED_FLAGGED {
        tracing::info!(flagged, share, "flagged rows kept in training: too many to be anomalies (drift)");
        return None;
    }
    Some(format!("{flagged} training rows the agents flagged kept out of training"))
}

fn train_autoencoder(
    devices: &Devices,
    ds: &Dataset,
    class: &str,
    req: &TrainRequest,
    registry: &ModelRegistry,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<ModelVersion, RunError> {
    let base = req.hyper.clone().unwrap_or_default();
    let budget = Budget { trials: req.trials.max(1), max_seconds: req.max_seconds, stop: req.stop.clone() };
    // The autoencoder learns normal operation: rows labelled as anomalies stay out of its training split and
    // of the validation loss that early stopping and the search minimise (the threshold still sees them), and
    // so do rows the agents flagged when the dataset asks for it (and they are few enough to be anomalies).
    let exclude = excluded_flagged(ds);
    let is_normal = |r: &&dataset::Row| r.label.is_none_or(|l| l == 0) && !(exclude.is_some() && r.flagged);
    if let Some(note) = &exclude {
        progress(0.05, note);
    }
    let normal: Vec<dataset::Row> = ds.train.iter().filter(is_normal).cloned().collect();
    let normal_val: Vec<dataset::Row> = ds.val.iter().filter(is_normal).cloned().collect();
    let outcome =
        search::run(devices, &normal, &normal_val, &ds.standardizer, &base, budget, req.seed, &mut |f, m| {
            progress(0.05 + 0.8 * f, m)
        })?;
    let weights = &outcome.model.weights;

    // (a2) A forecaster over windows of the same rows, and the choice between the two on validation data.
    progress(0.6, "training a forecaster over windows of the same rows");
    let deadline = req.max_seconds.map(|s| std::time::Instant::now() + std::time::Duration::from_secs_f64(s));
    // Over all rows, cutting around the ones left out rather than bridging them.
    let forecast = forecaster::search(
        devices,
        &ds.train,
        &ds.val,
        &|r| is_normal(&r),
        &ds.standardizer,
        &base,
        req.trials.max(1),
        deadline,
        req.seed,
        &req.stop,
    );
    if let Err(TrainError::Stopped) = forecast {
        return Err(TrainError::Stopped.into());
    }
    let mut choice = match &forecast {
        Ok((f, _)) => choose(ds, weights, f, req.seed)?,
        Err(e) => Choice { forecaster: false, reason: format!("autoencoder: no forecaster could be trained ({e})") },
    };
    if let Some(note) = &exclude {
        choice.reason = format!("{}; {note}", choice.reason);
    }
    progress(0.8, &choice.reason);
    let (forecast, f_trials) = match forecast {
        Ok((f, t)) => (Some(f), t),
        Err(_) => (None, Vec::new()),
    };
    let mut trials = outcome.trials.clone();
    trials.extend(f_trials);
    if let (true, Some(f)) = (choice.forecaster, forecast) {
        return forecaster_candidate(ds, class, req, registry, f, trials, choice.reason, progress);
    }
    autoencoder_candidate(ds, class, req, registry, &outcome, trials, choice.reason, progress)
}

/// The autoencoder the search chose: its threshold (best F1 where the validation split has labelled
/// anomalies, else a stretched quantile), ONNX export checked with tract, test metrics, the decision against
/// production, golden vectors, registered.
#[allow(clippy::too_many_arguments)]
fn autoencoder_candidate(
    ds: &Dataset,
    class: &str,
    req: &TrainRequest,
    registry: &ModelRegistry,
    outcome: &search::Outcome,
    trials: Vec<search::Trial>,
    selection: String,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<ModelVersion, RunError> {
    let weights = &outcome.model.weights;
    let val_scores = autoencoder::score(weights, &ds.standardizer, &ds.val)?;
    let labelled = ds.has_labels();
    let (threshold, threshold_source) = if labelled && anomalous(&ds.val).iter().any(|&a| a) {
        (
            eval::best_f1_threshold(&val_scores, &anomalous(&ds.val)),
            "labels: best F1 on the validation split".to_string(),
        )
    } else {
        (eval::stretch_quantile(&val_scores, THRESHOLD_QUANTILE), threshold_by_quantile())
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
    let tested = Tested { bytes: &bytes, frames: 1, test_scores: &test_scores };
    let mut promotion = against_production(ds, registry, current.as_ref(), &tested, &metrics, req.seed)?;
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
        kind: ModelKind::Autoencoder,
        bytes,
        outputs: 1,
        threshold,
        threshold_source,
        golden,
        hyper: outcome.best.hyper.clone(),
        trials,
        metrics,
        promotion,
        frames: 1,
        selection,
        score_tail: normal_tail(&[&val_scores[..], &test_scores[..]], &[&anomalous(&ds.val)[..], &labels_test[..]]),
    };
    register(ds, class, req, registry, candidate, progress)
}

/// Which of the two anomaly models a class gets, and why.
struct Choice {
    forecaster: bool,
    reason: String,
}

/// Compares the autoencoder and the forecaster on the validation split: on its labelled windows when it has
/// labels of both kinds, else on its windows with synthetic anomalies (out-of-context readings, which only a
/// forecaster can see, and 4-sigma spikes, which both can). The forecaster must win by more than
/// [`PROMOTION_Z`] standard errors of the paired AUC difference, as a candidate must to replace production;
/// the simpler model keeps ties and differences within the noise.
fn choose(ds: &Dataset, ae: &[DenseWeights], f: &Forecaster, seed: u64) -> Result<Choice, TrainError> {
    let d = ds.width();
    let vw = forecaster::windows(&ds.val, f.frames, d);
    let labelled = vw.anomalous.iter().any(|a| *a) && vw.anomalous.iter().any(|a| !*a);
    let (x, y, how) = if labelled {
        (vw.x.clone(), vw.anomalous.clone(), "labelled validation windows")
    } else {
        let (x, y) = forecaster::with_synthetic_anomalies(&vw, &ds.standardizer, seed);
        (x, y, "validation windows with synthetic anomalies (out-of-context readings, 4-sigma spikes; no labels)")
    };
    let last = (f.frames - 1) * d;
    let rows: Vec<Row> = x
        .iter()
        .map(|w| Row { device: String::new(), ts_ms: 0, features: w[last..].to_vec(), label: None, flagged: false })
        .collect();
    let ae_scores = autoencoder::score(ae, &ds.standardizer, &rows)?;
    let f_scores = forecaster::score(f, &ds.standardizer, &x)?;
    Ok(match eval::paired_auc(&f_scores, &ae_scores, &y) {
        Some(p) => {
            // `paired_auc` was given the forecaster's scores first.
            let (fcst, ae, margin) = (p.a, p.b, PROMOTION_Z * p.se);
            let pick = fcst > ae + margin;
            Choice {
                forecaster: pick,
                reason: format!(
                    "{}: ROC AUC forecaster (window {}) {fcst:.3} vs autoencoder {ae:.3} on {} {how} (the forecaster \
                     must win by more than {margin:.4}, {PROMOTION_Z} standard errors of the paired difference)",
                    if pick { "forecaster" } else { "autoencoder" },
                    f.frames,
                    x.len()
                ),
            }
        }
        None => Choice {
            forecaster: false,
            reason: format!("autoencoder: too few validation windows ({}) to compare with the forecaster", x.len()),
        },
    })
}

/// Threshold, export, verification, test metrics and promotion of a chosen forecaster.
#[allow(clippy::too_many_arguments)]
fn forecaster_candidate(
    ds: &Dataset,
    class: &str,
    req: &TrainRequest,
    registry: &ModelRegistry,
    f: Forecaster,
    trials: Vec<search::Trial>,
    selection: String,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<ModelVersion, RunError> {
    let (d, frames) = (ds.width(), f.frames);
    let vw = forecaster::windows(&ds.val, frames, d);
    let val_scores = forecaster::score(&f, &ds.standardizer, &vw.x)?;
    let (threshold, threshold_source) = if vw.anomalous.iter().any(|&a| a) {
        (eval::best_f1_threshold(&val_scores, &vw.anomalous), "labels: best F1 on the validation split".to_string())
    } else {
        // Windows come device by device; the stretches are stretches of time.
        let mut by_time: Vec<(u64, f32)> = vw.ts_ms.iter().copied().zip(val_scores.iter().copied()).collect();
        by_time.sort_by_key(|p| p.0);
        let in_time: Vec<f32> = by_time.into_iter().map(|p| p.1).collect();
        (eval::stretch_quantile(&in_time, THRESHOLD_QUANTILE), threshold_by_quantile())
    };
    progress(0.88, "exporting the forecaster to ONNX and verifying with tract");
    let name = class.to_string();
    let version = registry.next_version(&name)?;
    let bytes =
        onnx::export_forecaster(&f, &ds.standardizer, &format!("edgeloop {name} v{version}, dataset {}", ds.hash));
    let export_err = onnx::verify(&bytes, &vw.x, &val_scores)?;
    progress(0.93, "evaluating against production on the test split");
    let tw = forecaster::windows(&ds.test, frames, d);
    let test_scores = onnx::run_tract(&bytes, &tw.x)?;
    let mut metrics = Metrics {
        val_loss: f.val_loss,
        test_loss: mean(&test_scores),
        export_max_rel_error: export_err,
        ..Default::default()
    };
    if let Some(auc) = eval::roc_auc(&test_scores, &tw.anomalous) {
        let (p, r, f1) = eval::prf(&test_scores, &tw.anomalous, threshold);
        (metrics.test_auc, metrics.test_precision, metrics.test_recall, metrics.test_f1) =
            (Some(auc), Some(p), Some(r), Some(f1));
    }
    let current = registry.production(class)?;
    let tested = Tested { bytes: &bytes, frames, test_scores: &test_scores };
    let mut promotion = against_production(ds, registry, current.as_ref(), &tested, &metrics, req.seed)?;
    keep_other_sensor(&mut promotion, current.as_ref(), &ds.sensor.name);
    let golden =
        vw.x.iter().zip(&val_scores).take(GOLDEN).map(|(x, &s)| Golden { input: x.clone(), output: vec![s] }).collect();
    let hyper = trials
        .iter()
        .filter(|t| t.hyper.window == frames)
        .min_by(|a, b| a.val_loss.total_cmp(&b.val_loss))
        .map(|t| t.hyper.clone())
        .unwrap_or_default();
    let candidate = Candidate {
        name,
        version,
        kind: ModelKind::Forecaster,
        bytes,
        outputs: 1,
        threshold,
        threshold_source,
        golden,
        hyper,
        trials,
        metrics,
        promotion,
        frames,
        selection,
        score_tail: normal_tail(&[&val_scores[..], &test_scores[..]], &[&vw.anomalous[..], &tw.anomalous[..]]),
    };
    register(ds, class, req, registry, candidate, progress)
}

/// The promotion decision against the class's production version, on the same test split. With labels on
/// the test split, a production model of the same input form is compared by test ROC AUC. Otherwise both
/// models run on the same test windows (the longer window's) and are compared by ROC AUC: against the labels
/// when the windows hold both kinds, else against synthetic anomalies. Never by mean score: each model's
/// score is in its own units (a forecaster's residuals are divided by its own training spread), so a model
/// that scores everything low would win without detecting anything.
///
/// The candidate must win by more than [`PROMOTION_Z`] standard errors of the paired AUC difference
/// ([`eval::paired_auc`]): a difference within the noise of the test windows (and, without labels, of the
/// draw of synthetic anomalies) keeps production, since replacing a model costs a rollout and the fit of the
/// threshold it was deployed with. The margin follows the evidence: a few hundred windows need a wide one,
/// tens of thousands a narrow one, and it does not freeze production near an AUC of 1 as a fixed margin
/// would.
fn against_production(
    ds: &Dataset,
    registry: &ModelRegistry,
    current: Option<&ModelVersion>,
    new: &Tested,
    metrics: &Metrics,
    seed: u64,
) -> Result<Promotion, RunError> {
    let (d, frames) = (ds.width(), new.frames);
    let higher_is_better = metrics.test_auc.is_some();
    let (metric, candidate) = match metrics.test_auc {
        Some(auc) => ("test_auc", auc),
        None => ("test_loss", metrics.test_loss),
    };
    let Some(prod) = current else { return Ok(decide(metric, candidate, None, higher_is_better, 0.0)) };
    let pf = prod.frames.max(1) as usize;
    let prod_bytes = registry.artifact_path(&prod.sha256).map(std::fs::read).transpose()?;
    let Some(pb) = prod_bytes.filter(|_| prod.input_shape.last() == Some(&((d * pf) as i64))) else {
        // A production model we cannot evaluate on this data loses by default.
        let lost = if higher_is_better { f64::NEG_INFINITY } else { f64::INFINITY };
        return Ok(decide(metric, candidate, Some((prod.version, lost)), higher_is_better, 0.0));
    };
    if pf == frames && higher_is_better {
        // The candidate's scores of these inputs are its test scores.
        let (inputs, labels) = if frames == 1 {
            (raw(&ds.test), anomalous(&ds.test))
        } else {
            let w = forecaster::windows(&ds.test, frames, d);
            (w.x, w.anomalous)
        };
        let old = onnx::run_tract(&pb, &inputs)?;
        return Ok(paired_decision(metric, new.test_scores, &old, &labels, prod.version));
    }
    let window = pf.max(frames);
    let (w, new_regime) = judged_windows(ds, window, d);
    let labelled = w.anomalous.iter().any(|a| *a) && w.anomalous.iter().any(|a| !*a);
    let (x, y, name) = match (labelled, new_regime) {
        (true, false) => (w.x.clone(), w.anomalous.clone(), "test_auc_same_windows"),
        (true, true) => (w.x.clone(), w.anomalous.clone(), "new_regime_auc_same_windows"),
        (false, _) => {
            let (x, y) = forecaster::with_synthetic_anomalies(&w, &ds.standardizer, seed);
            (x, y, if new_regime { "new_regime_synthetic_anomaly_auc" } else { "test_synthetic_anomaly_auc" })
        }
    };
    if !y.iter().any(|a| *a) {
        // No anomaly to find: neither model can show anything, and the candidate has not beaten production.
        return Ok(Promotion {
            margin: None,
            promoted: false,
            metric: name.to_string(),
            candidate: 0.0,
            production: None,
            production_version: Some(prod.version),
            reason: format!(
                "{} test windows of {window} rows are too few for synthetic anomalies (at least {} needed): not \
                 compared with production v{}, which stays",
                w.len(),
                2 * window + 2,
                prod.version
            ),
        });
    }
    let cut = |n: usize| -> Vec<Vec<f32>> { x.iter().map(|v| v[v.len() - n * d..].to_vec()).collect() };
    let (new, old) = (onnx::run_tract(new.bytes, &cut(frames))?, onnx::run_tract(&pb, &cut(pf))?);
    Ok(paired_decision(name, &new, &old, &y, prod.version))
}

/// Fewest test windows of a new regime that promotion judges on their own.
pub const MIN_REGIME_WINDOWS: usize = 200;

/// The test windows of `window` rows that promotion judges: with a new regime in the dataset (a retraining
/// for drift, `regime_from_ms`), the new regime's, when there are at least [`MIN_REGIME_WINDOWS`] of them
/// (`true`): the question a drift retraining asks is whether the candidate serves the data as it is now, and
/// both models would otherwise be judged mostly on the old regime, which production was trained for. Else
/// every test window (`false`).
fn judged_windows(ds: &Dataset, window: usize, d: usize) -> (forecaster::Windows, bool) {
    if let Some(from) = ds.spec.regime_from_ms {
        let recent: Vec<_> = ds.test.iter().filter(|r| r.ts_ms >= from).cloned().collect();
        let w = forecaster::windows(&recent, window, d);
        if w.len() >= MIN_REGIME_WINDOWS {
            return (w, true);
        }
    }
    (forecaster::windows(&ds.test, window, d), false)
}

/// A trained model up for promotion: its exported file, its window, and its scores of the test split's
/// inputs (rows, or windows of `frames` rows) in order.
struct Tested<'a> {
    bytes: &'a [u8],
    frames: usize,
    test_scores: &'a [f32],
}

/// Standard errors of the paired difference (of ROC AUC, or a classifier's accuracy) by which a candidate
/// must beat production: a one-sided test at the 5 % level.
pub const PROMOTION_Z: f64 = 1.645;

/// The promotion decision from the candidate's and production's scores of the same examples (autoencoders and
/// forecasters; classifiers compare their accuracies the same way, with McNemar's standard error).
pub(super) fn paired_decision(metric: &str, new: &[f32], old: &[f32], labels: &[bool], version: u32) -> Promotion {
    let Some(p) = eval::paired_auc(new, old, labels) else {
        // One class only: neither model can show anything.
        return decide(metric, 0.0, Some((version, 0.0)), true, 0.0);
    };
    let margin = PROMOTION_Z * p.se;
    let mut promotion = decide(metric, p.a, Some((version, p.b)), true, margin);
    promotion.reason.push_str(&format!(" ({PROMOTION_Z} standard errors of the paired difference, {:.6})", p.se));
    promotion
}

fn train_classifier(
    devices: &Devices,
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
    let (best_trial, model, trials) = search_classifier(devices, ds, req, progress)?;
    classifier_candidate(ds, class, req, registry, (best_trial, model), trials, progress)
}

/// Random search: each drawn configuration trained in full; the best validation loss wins.
fn search_classifier(
    devices: &Devices,
    ds: &Dataset,
    req: &TrainRequest,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<(search::Trial, classifier::Classifier, Vec<search::Trial>), RunError> {
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
        // Sized as if for two classes: the output layer is a small part of the work.
        let work = Work::of(&classifier::sizes(ds.standardizer.mean.len(), 2, h), h.batch);
        let (c, plan) = devices
            .run(work, |dev| {
                classifier::train(
                    dev,
                    &ds.train,
                    &ds.val,
                    &ds.standardizer,
                    h,
                    req.seed.wrapping_add(i as u64),
                    &req.stop,
                )
            })
            .map_err(TrainError::from)?;
        let c = c?;
        let trial = search::Trial::finished(i, 0, h.clone(), (c.epochs_run, c.val_loss), t0, &plan);
        progress(0.05 + 0.8 * (i + 1) as f32 / configs.len() as f32, &format!("trial {i}: val loss {:.5}", c.val_loss));
        if best.as_ref().is_none_or(|(b, _)| c.val_loss < b.val_loss) {
            best = Some((trial.clone(), c));
        }
        trials.push(trial);
    }
    let (best_trial, model) = best.ok_or(TrainError::NoTrial)?;
    Ok((best_trial, model, trials))
}

/// The classifier the search chose: ONNX export checked with tract, test accuracy against the majority class
/// and (paired, McNemar's) against production, golden vectors, registered.
fn classifier_candidate(
    ds: &Dataset,
    class: &str,
    req: &TrainRequest,
    registry: &ModelRegistry,
    (best_trial, model): (search::Trial, classifier::Classifier),
    trials: Vec<search::Trial>,
    progress: &mut dyn FnMut(f32, &str),
) -> Result<ModelVersion, RunError> {
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
    // Per test row, whether a model answering `probs` has the label.
    let right_of = |probs: &[f32], k: usize| -> Vec<bool> {
        classifier::argmax(probs, k).iter().zip(&test_labels).map(|(p, t)| p == t).collect()
    };
    let test_probs = onnx::run_tract(&bytes, &raw(&test_rows))?;
    let (acc, majority) =
        classifier::accuracy_vs_majority(&classifier::argmax(&test_probs, model.classes), &test_labels);
    let right = right_of(&test_probs, model.classes);
    let current = registry.production(&name)?;
    let mut promotion = match &current {
        Some(prod) => {
            let same_shape = prod.input_shape.last() == Some(&(ds.width() as i64))
                && prod.output_shape.last() == Some(&(model.classes as i64));
            let bytes = registry.artifact_path(&prod.sha256).map(std::fs::read).transpose()?;
            match bytes {
                Some(b) if same_shape => {
                    let theirs = right_of(&onnx::run_tract(&b, &raw(&test_rows))?, model.classes);
                    let production = theirs.iter().filter(|r| **r).count() as f64 / theirs.len().max(1) as f64;
                    let se = eval::paired_accuracy_se(&right, &theirs);
                    let mut p = decide("test_accuracy", acc, Some((prod.version, production)), true, PROMOTION_Z * se);
                    p.reason.push_str(&format!(
                        " ({PROMOTION_Z} standard errors of the paired difference, McNemar's, {se:.6})"
                    ));
                    p
                }
                // A production model we cannot run on this data loses by default.
                _ => decide("test_accuracy", acc, Some((prod.version, f64::NEG_INFINITY)), true, 0.0),
            }
        }
        None => decide("test_accuracy", acc, None, true, 0.0),
    };
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
        kind: ModelKind::Classifier,
        bytes,
        outputs: k,
        threshold: 0.0,
        threshold_source: "none: the most probable class is the answer".into(),
        golden,
        hyper: best_trial.hyper.clone(),
        trials,
        metrics,
        promotion,
        frames: 1,
        selection: "classifier: asked for".into(),
        score_tail: None,
    };
    register(ds, class, req, registry, candidate, progress)
}

/// A trained, exported and evaluated model about to be registered.
struct Candidate {
    name: String,
    version: u32,
    kind: ModelKind,
    bytes: Vec<u8>,
    outputs: usize,
    threshold: f32,
    threshold_source: String,
    golden: Vec<Golden>,
    hyper: Hyper,
    trials: Vec<search::Trial>,
    metrics: Metrics,
    promotion: crate::ml::models::Promotion,
    /// Feature vectors per input (1 but for forecasters).
    frames: usize,
    /// Why this kind of model was chosen.
    selection: String,
    /// The tail of its scores on the validation split's normal windows (anomaly models).
    score_tail: Option<TailFit>,
}

/// The tail of the scores of the windows not labelled anomalous, over the validation and test splits
/// (`splits`: each split's scores with its labels): devices judge alerts by it until they have learnt their
/// own (`edgeloop_common::score_tail`). The test split is the latest data, closest to what the model will
/// score: a model retrained because the data drifted (a new regime, such as holidays on a road) has only the
/// start of the new regime there, and a tail of the validation split alone (the older regime) would let the
/// new regime's ordinary windows count towards alerts until the devices have learnt their own tail. Twice
/// the windows also steady the fit of the extreme quantile.
fn normal_tail(splits: &[&[f32]], anomalous: &[&[bool]]) -> Option<TailFit> {
    let mut normal = Vec::new();
    for (i, scores) in splits.iter().enumerate() {
        let labels = anomalous.get(i).copied().unwrap_or(&[]);
        normal.extend(
            scores.iter().zip(labels.iter().chain(std::iter::repeat(&false))).filter(|(_, a)| !**a).map(|(s, _)| *s),
        );
    }
    TailFit::from_scores(&normal)
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
    let width = ds.width() * c.frames;
    let nnef = crate::ml::nnef::derive(registry, &c.name, &c.bytes, width, &c.golden, GOLDEN_TOLERANCE)?;
    let m = ModelVersion {
        name: c.name,
        version: c.version,
        class: class.to_string(),
        sensor: ds.sensor.name.clone(),
        kind: c.kind,
        sha256,
        size: c.bytes.len() as u64,
        nnef,
        input_shape: vec![-1, width as i64],
        frames: c.frames as u32,
        gaps: match ds.sensor.features {
            FeatureKind::Slow { .. } => GapRule { impute: ds.spec.impute, max_gap: ds.spec.max_gap },
            FeatureKind::Window { .. } => GapRule::default(),
        },
        output_shape: vec![-1, c.outputs as i64],
        pipeline: PipelineSpec { version: 1, sensors: vec![ds.sensor.clone()] },
        threshold: c.threshold,
        golden: c.golden,
        score_tail: c.score_tail,
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
            selection: c.selection,
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
fn keep_other_sensor(p: &mut crate::ml::models::Promotion, production: Option<&ModelVersion>, sensor: &str) {
    if let Some(prod) = production.filter(|prod| prod.sensor != sensor) {
        p.promoted = false;
        p.reason = format!(
            "production v{} models sensor `{}`, not `{sensor}`; not compared and not replaced",
            prod.version, prod.sensor
        );
    }
}

fn reference(ds: &Dataset) -> crate::ml::drift::Reference {
    crate::ml::drift::Reference::fit(&ds.train.iter().map(|r| r.features.as_slice()).collect::<Vec<_>>())
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
