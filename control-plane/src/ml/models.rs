//! The model registry: every trained or uploaded model version with its manifest, metrics, lineage and
//! promotion decision, the production version of each device class, the ONNX artifacts (content-addressed by
//! sha256 on disk) and the operators' labels that training uses.
//!
//! Versions and pointers live in sled and are committed durably; an artifact file is written to a temporary
//! name, synced and renamed before the version that points at it is recorded. Version numbers are allocated
//! atomically from a counter per model line, so a training and an upload running side by side never get the
//! same one, and a recorded version is never overwritten.

use crate::fleet::telemetry::StoreError;
use crate::ml::dataset::{Label, QualityReport};
use crate::ml::training::search::Trial;
use crate::ml::training::Hyper;
use crate::storage::kv::{Backend, Tree};
use edgeloop_common::durable::DurableDb;
use edgeloop_common::features::PipelineSpec;
use edgeloop_common::gaps::GapRule;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub use edgeloop_common::update::Golden;

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[schema(as = ModelMetrics)]
pub struct Metrics {
    pub val_loss: f64,
    /// Mean score over the test split (reconstruction error), computed with the exported model.
    pub test_loss: f64,
    pub test_auc: Option<f64>,
    pub test_precision: Option<f64>,
    pub test_recall: Option<f64>,
    pub test_f1: Option<f64>,
    /// Largest relative difference between tract and candle over the validation split.
    pub export_max_rel_error: f32,
    /// Classifiers: accuracy on the test split, and that of always answering the most common label.
    #[serde(default)]
    pub test_accuracy: Option<f64>,
    #[serde(default)]
    pub majority_accuracy: Option<f64>,
}

/// Where a model came from.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lineage {
    pub dataset_hash: String,
    pub dataset_report: QualityReport,
    pub hyper: Hyper,
    pub trials: Vec<Trial>,
    pub seed: u64,
    pub metrics: Metrics,
    /// How the decision threshold was chosen.
    pub threshold_source: String,
    pub code_version: String,
    /// The training split's distribution per feature, for drift detection.
    #[serde(default)]
    pub reference: crate::ml::drift::Reference,
    /// Why this kind of model (autoencoder or forecaster) was chosen, with the numbers.
    #[serde(default)]
    pub selection: String,
}

/// Whether a version became production, and on what numbers.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Promotion {
    pub promoted: bool,
    pub metric: String,
    pub candidate: f64,
    pub production: Option<f64>,
    pub production_version: Option<u32>,
    pub reason: String,
    /// How much the candidate had to beat production by, in the metric's units (1.645 standard errors of the
    /// paired difference); absent where none applied (a first version, or one decided before margins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f64>,
}

/// What a model computes. Training is asked for an autoencoder or a classifier; the search may register a
/// forecaster instead of an autoencoder when it scores better; operators upload models of their own.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// Anomaly scores from reconstruction error; needs no labels.
    #[default]
    Autoencoder,
    /// Class probabilities, from labelled rows.
    Classifier,
    /// Anomaly scores from the error of predicting the next feature vector from a window of them.
    Forecaster,
    /// An operator's own ONNX model, checked against its golden vectors on upload.
    Uploaded,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Autoencoder => "autoencoder",
            ModelKind::Classifier => "classifier",
            ModelKind::Forecaster => "forecaster",
            ModelKind::Uploaded => "uploaded",
        }
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A registered model version: the manifest fields of DESIGN.md plus metrics, lineage and promotion.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    pub name: String,
    pub version: u32,
    pub class: String,
    pub sensor: String,
    pub kind: ModelKind,
    /// SHA-256 of the ONNX file, hex: the model's identity.
    pub sha256: String,
    pub size: u64,
    /// The NNEF archive agents run, converted from the ONNX file and checked on the golden vectors at
    /// registration (`ml::nnef`); absent where the model did not convert, or was registered before
    /// conversion existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nnef: Option<edgeloop_common::update::ArtifactRef>,
    /// `-1` marks the batch dimension.
    pub input_shape: Vec<i64>,
    pub output_shape: Vec<i64>,
    pub pipeline: PipelineSpec,
    pub threshold: f32,
    pub golden: Vec<Golden>,
    pub lineage: Lineage,
    pub created_ms: u64,
    pub promotion: Promotion,
    /// Feature vectors per input: more than 1 for a forecaster (`input_shape` is `[-1, frames × width]`).
    #[serde(default = "one")]
    pub frames: u32,
    /// The gap rule of the dataset it was trained on (slow sensors; the default for fast ones, which datasets
    /// do not fill), carried in the manifest so that agents fill gaps the same way while they run it.
    #[serde(default)]
    pub gaps: GapRule,
    /// The tail of its scores on the validation split, shipped in the manifest: devices judge alerts by it
    /// until they have learnt the tail of their own scores. Absent for classifiers and uploaded models.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_tail: Option<edgeloop_common::score_tail::TailFit>,
}

fn one() -> u32 {
    1
}

impl ModelVersion {
    /// The manifest devices verify (DESIGN.md, Model manifest), ready to sign.
    pub fn manifest(&self) -> edgeloop_common::update::Manifest {
        let l = &self.lineage;
        edgeloop_common::update::Manifest {
            name: self.name.clone(),
            version: self.version,
            class: self.class.clone(),
            sensor: self.sensor.clone(),
            sha256: self.sha256.clone(),
            size: self.size,
            nnef: self.nnef.clone(),
            input_shape: self.input_shape.clone(),
            output_shape: self.output_shape.clone(),
            pipeline: self.pipeline.clone(),
            threshold: self.threshold,
            golden: self.golden.clone(),
            golden_tolerance: GOLDEN_TOLERANCE,
            frames: self.frames,
            gaps: self.gaps,
            score_tail: self.score_tail,
            lineage: edgeloop_common::update::ManifestLineage {
                dataset_hash: l.dataset_hash.clone(),
                hyper: serde_json::to_string(&l.hyper).unwrap_or_default(),
                metrics: serde_json::to_string(&l.metrics).unwrap_or_default(),
                code_version: l.code_version.clone(),
            },
            created_ms: self.created_ms,
        }
    }
}

/// How far a device's outputs on the golden vectors may be from the expected ones, relative to
/// `max(1, |expected|)`: tract on another CPU, or the NNEF conversion, may differ from the exporter in the last
/// bits; 1e-3 is far below any difference a wrong model makes.
pub const GOLDEN_TOLERANCE: f32 = 1e-3;

/// Decides promotion: the first version of a class is promoted; a later one only if it beats production on
/// the same test split by more than `margin` (in the metric's units; 0 for any improvement).
pub fn decide(
    metric: &str,
    candidate: f64,
    production: Option<(u32, f64)>,
    higher_is_better: bool,
    margin: f64,
) -> Promotion {
    let (promoted, reason) = match production {
        None => (true, "first version of this class".to_string()),
        Some((v, p)) => {
            let better = if higher_is_better { candidate > p + margin } else { candidate < p - margin };
            let by = if margin > 0.0 { format!(" by more than {margin:.6}") } else { String::new() };
            if better {
                (true, format!("{metric} {candidate:.6} beats production v{v} ({p:.6}){by} on the same test split"))
            } else {
                (
                    false,
                    format!(
                        "{metric} {candidate:.6} does not beat production v{v} ({p:.6}){by} on the same test split"
                    ),
                )
            }
        }
    };
    Promotion {
        promoted,
        metric: metric.to_string(),
        candidate,
        production: production.map(|p| p.1),
        production_version: production.map(|p| p.0),
        reason,
        margin: (production.is_some() && margin > 0.0).then_some(margin),
    }
}

/// Why a version could not be allocated or recorded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The artifacts folder or an artifact could not be created, read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("model `{name}` version {version} is already registered; a version is never overwritten")]
    VersionTaken { name: String, version: u32 },
    #[error("model `{name}`: no version number is left after {last}")]
    VersionsExhausted { name: String, last: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sled::Error> for ModelError {
    fn from(e: sled::Error) -> Self {
        ModelError::Store(e.into())
    }
}

impl From<edgeloop_common::durable::DurableError> for ModelError {
    fn from(e: edgeloop_common::durable::DurableError) -> Self {
        ModelError::Store(e.into())
    }
}

pub struct ModelRegistry {
    backend: Backend,
    versions: Tree,
    /// The last version number allocated per model line (big-endian `u32`).
    allocated: Tree,
    production: Tree,
    labels: Tree,
    /// The artifacts' files: every artifact with the embedded store; with PostgreSQL, which holds them all,
    /// a cache of those this replica wrote or served.
    artifacts: PathBuf,
}

fn version_key(name: &str, version: u32) -> Vec<u8> {
    let mut k = name.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, v: &[u8]) -> Result<T, StoreError> {
    ciborium::from_reader(v).map_err(|e| StoreError::Corrupt {
        device: what.to_string(),
        seq: 0,
        reason: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    edgeloop_common::signing::to_cbor(v)
}

/// True for a 64-digit lowercase hex sha256.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl ModelRegistry {
    /// The registry in the embedded database.
    pub fn open(db: &DurableDb, data_dir: &Path) -> Result<ModelRegistry, ModelError> {
        ModelRegistry::open_on(&Backend::Embedded(db.clone()), data_dir)
    }

    pub fn open_on(backend: &Backend, data_dir: &Path) -> Result<ModelRegistry, ModelError> {
        let artifacts = data_dir.join("artifacts");
        edgeloop_common::private::dir(&artifacts)
            .map_err(|e| ModelError::Io { path: e.path.clone(), source: e.source })?;
        Ok(ModelRegistry {
            versions: backend.tree("model_versions")?,
            allocated: backend.tree("model_version_counters")?,
            production: backend.tree("production")?,
            labels: backend.tree("labels")?,
            backend: backend.clone(),
            artifacts,
        })
    }

    /// Stores an artifact under its sha256 (hex) and returns it: a file in the artifacts folder, and with
    /// PostgreSQL a row there too, for every replica. Idempotent. Blocking.
    pub fn put_artifact(&self, bytes: &[u8]) -> std::io::Result<String> {
        let sha = edgeloop_common::signing::sha256_hex(bytes);
        let now = edgeloop_common::unix_millis();
        self.backend
            .on_postgres(|kv| Box::pin(kv.put_artifact(&sha, bytes, now)))
            .transpose()
            .map_err(|e| std::io::Error::other(format!("storing artifact {sha} in {e}")))?;
        let path = self.artifacts.join(&sha);
        if path.exists() {
            return Ok(sha);
        }
        edgeloop_common::private::write_atomic(&path, bytes)?;
        Ok(sha)
    }

    /// Deletes artifact files that no model version names, that are not in `keep` (agent builds), and that are
    /// older than `min_age` (an upload or a training writes its artifact before it records the version).
    /// Returns the files removed. Blocking.
    pub fn collect_garbage(
        &self,
        min_age: std::time::Duration,
        keep: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<String>, ModelError> {
        let mut named: std::collections::BTreeSet<String> =
            self.list()?.into_iter().flat_map(|v| std::iter::once(v.sha256).chain(v.nnef.map(|a| a.sha256))).collect();
        named.extend(keep.iter().cloned());
        let before = edgeloop_common::unix_millis().saturating_sub(min_age.as_millis() as u64);
        let named_list: Vec<String> = named.iter().cloned().collect();
        let shared = self.backend.on_postgres(|kv| Box::pin(kv.collect_artifacts(&named_list, before)));
        if let Some(gone) = shared {
            let gone = gone.map_err(StoreError::from)?;
            if !gone.is_empty() {
                tracing::info!(artifacts = gone.len(), "collected from PostgreSQL");
            }
        }
        let io = |path: &Path, source: std::io::Error| ModelError::Io { path: path.to_path_buf(), source };
        let mut gone = Vec::new();
        for e in std::fs::read_dir(&self.artifacts).map_err(|e| io(&self.artifacts, e))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if named.contains(&name) {
                continue;
            }
            // Only this registry's files: a sha256 name, or a temporary file left by a write that died.
            let ours = is_sha256(&name) || name.ends_with(".tmp");
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|a| a >= min_age);
            if ours && old {
                std::fs::remove_file(e.path()).map_err(|err| io(&e.path(), err))?;
                gone.push(name);
            }
        }
        Ok(gone)
    }

    /// The file of an artifact, if the id is a sha256 we hold. With PostgreSQL, an artifact another replica
    /// stored is fetched into the cache first. Blocking.
    pub fn artifact_path(&self, sha: &str) -> Option<PathBuf> {
        if !is_sha256(sha) {
            return None;
        }
        let p = self.artifacts.join(sha);
        if p.is_file() {
            return Some(p);
        }
        let fetched = self.backend.on_postgres(|kv| Box::pin(kv.artifact(sha)))?;
        match fetched {
            Ok(Some(bytes)) if edgeloop_common::signing::sha256_hex(&bytes) == sha => {
                match edgeloop_common::private::write_atomic(&p, &bytes) {
                    Ok(()) => Some(p),
                    Err(e) => {
                        tracing::error!(artifact = sha, error = %e, "caching an artifact from PostgreSQL");
                        None
                    }
                }
            }
            Ok(Some(_)) => {
                tracing::error!(artifact = sha, "an artifact in PostgreSQL does not match its sha256; not served");
                None
            }
            Ok(None) => None,
            Err(e) => {
                tracing::error!(artifact = sha, error = %e, "reading an artifact from PostgreSQL");
                None
            }
        }
    }

    /// Allocates the next version number of a model line: above every number allocated before and every
    /// version recorded, and never the same for two callers, however many run at once (an atomic update of
    /// the line's counter). A number whose model is never recorded (a training that failed after it) is a gap.
    pub fn next_version(&self, name: &str) -> Result<u32, ModelError> {
        // Versions recorded before the counter existed count too; after that every version comes from it.
        let recorded = self.highest_recorded(name)?;
        let mut exhausted = None;
        let new = self.allocated.update_and_fetch(name.as_bytes(), |old: Option<&[u8]>| {
            let last = old.and_then(|v| <[u8; 4]>::try_from(v).ok()).map_or(0, u32::from_be_bytes).max(recorded);
            exhausted = None;
            match last.checked_add(1) {
                Some(next) => Some(next.to_be_bytes().to_vec()),
                None => {
                    exhausted = Some(last);
                    old.map(<[u8]>::to_vec)
                }
            }
        })?;
        if let Some(last) = exhausted {
            return Err(ModelError::VersionsExhausted { name: name.to_string(), last });
        }
        let next = new.and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok()).map(u32::from_be_bytes);
        next.ok_or_else(|| {
            ModelError::Store(StoreError::Corrupt {
                device: format!("model_version_counters {name}"),
                seq: 0,
                reason: "the counter is not 4 bytes".into(),
            })
        })
    }

    /// The highest version recorded for a model line (0 when none), read from the keys alone.
    fn highest_recorded(&self, name: &str) -> Result<u32, StoreError> {
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(0);
        for (k, _) in self.versions.scan_prefix(&prefix)?.into_iter().rev() {
            // A longer name that starts with this one and a NUL has a longer key: not this line.
            if let Ok(v) = <[u8; 4]>::try_from(&k[prefix.len()..]) {
                return Ok(u32::from_be_bytes(v));
            }
        }
        Ok(0)
    }

    /// Records a version (and the production pointer if it was promoted), durably. Refuses a version that is
    /// already recorded: allocate it with [`ModelRegistry::next_version`]. Blocking.
    pub fn insert(&self, m: &ModelVersion) -> Result<(), ModelError> {
        let key = version_key(&m.name, m.version);
        // The version and its production pointer together: never one without the other.
        let pointer: Vec<(&Tree, Vec<u8>, Vec<u8>)> = if m.promotion.promoted {
            vec![(&self.production, m.name.as_bytes().to_vec(), encode(&(m.name.clone(), m.version)))]
        } else {
            Vec::new()
        };
        if !self.versions.insert_new_with(key, encode(m), &pointer)? {
            return Err(ModelError::VersionTaken { name: m.name.clone(), version: m.version });
        }
        self.backend.commit()?;
        Ok(())
    }

    /// Rewrites a recorded version in place: only tests that stage a production model do this.
    #[cfg(test)]
    pub(crate) fn overwrite(&self, m: &ModelVersion) -> Result<(), ModelError> {
        self.versions.insert(version_key(&m.name, m.version), encode(m))?;
        self.backend.commit()?;
        Ok(())
    }

    pub fn get(&self, name: &str, version: u32) -> Result<Option<ModelVersion>, StoreError> {
        self.versions.get(version_key(name, version))?.map(|v| decode(name, &v)).transpose()
    }

    /// Records the NNEF archive of a version registered without one (`ml::nnef::backfill`). Versions are
    /// otherwise never changed; a version that has an archive already keeps it. Returns whether it recorded.
    pub fn record_nnef(
        &self,
        name: &str,
        version: u32,
        nnef: &edgeloop_common::update::ArtifactRef,
    ) -> Result<bool, ModelError> {
        let key = version_key(name, version);
        let Some(mut m) = self.get(name, version)? else { return Ok(false) };
        if m.nnef.is_some() {
            return Ok(false);
        }
        m.nnef = Some(nnef.clone());
        self.versions.insert(key, encode(&m))?;
        self.backend.commit()?;
        Ok(true)
    }

    /// The version whose artifact has this sha256.
    pub fn by_sha(&self, sha: &str) -> Result<Option<ModelVersion>, StoreError> {
        Ok(self.list()?.into_iter().find(|m| m.sha256 == sha))
    }

    pub fn list(&self) -> Result<Vec<ModelVersion>, StoreError> {
        self.versions.all()?.into_iter().map(|(_, v)| decode("model", &v)).collect()
    }

    /// The production version of a model line (`<class>` for anomaly models, `<class>-classifier` for
    /// classifiers).
    pub fn production(&self, name: &str) -> Result<Option<ModelVersion>, StoreError> {
        let Some(v) = self.production.get(name.as_bytes())? else { return Ok(None) };
        let (name, version): (String, u32) = decode(name, &v)?;
        self.get(&name, version)
    }

    /// Records an operator's label. Blocking.
    pub fn add_label(&self, l: &Label) -> Result<(), StoreError> {
        let mut k = l.device.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&l.from_ms.to_be_bytes());
        k.extend_from_slice(&l.to_ms.to_be_bytes());
        self.labels.insert(k, encode(l))?;
        self.backend.commit()?;
        Ok(())
    }

    /// Removes a label recorded with [`ModelRegistry::add_label`] (nothing if there is none). Blocking.
    pub fn remove_label(&self, l: &Label) -> Result<(), StoreError> {
        let mut k = l.device.as_bytes().to_vec();
        k.push(0);
        k.extend_from_slice(&l.from_ms.to_be_bytes());
        k.extend_from_slice(&l.to_ms.to_be_bytes());
        self.labels.remove(k)?;
        self.backend.commit()?;
        Ok(())
    }

    pub fn labels(&self) -> Result<Vec<Label>, StoreError> {
        self.labels.all()?.into_iter().map(|(_, v)| decode("label", &v)).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn worse_model_is_not_promoted() {
        let first = decide("test_loss", 0.5, None, false, 0.0);
        assert!(first.promoted);
        let worse = decide("test_loss", 0.7, Some((1, 0.5)), false, 0.0);
        assert!(!worse.promoted, "{}", worse.reason);
        assert_eq!((worse.production, worse.production_version), (Some(0.5), Some(1)));
        let better = decide("test_auc", 0.95, Some((3, 0.9)), true, 0.0);
        assert!(better.promoted);
        let tie = decide("test_auc", 0.9, Some((3, 0.9)), true, 0.0);
        assert!(!tie.promoted, "a tie keeps production");
    }

    #[test]
    fn a_gain_within_the_margin_keeps_production() {
        let noise = decide("test_auc", 0.905, Some((3, 0.9)), true, 0.01);
        assert!(!noise.promoted, "{}", noise.reason);
        assert!(noise.reason.contains("does not beat production v3") && noise.reason.contains("by more than 0.010000"));
        let clear = decide("test_auc", 0.915, Some((3, 0.9)), true, 0.01);
        assert!(clear.promoted, "{}", clear.reason);
        assert_eq!((noise.margin, clear.margin), (Some(0.01), Some(0.01)));
        assert_eq!(decide("test_auc", 0.9, None, true, 0.01).margin, None, "a first version has no margin");
        assert!(clear.reason.contains("beats production v3 (0.900000) by more than 0.010000"), "{}", clear.reason);
        // Lower is better: the candidate must be lower by more than the margin.
        assert!(!decide("test_loss", 0.45, Some((1, 0.5)), false, 0.1).promoted);
        assert!(decide("test_loss", 0.35, Some((1, 0.5)), false, 0.1).promoted);
    }

    #[test]
    fn promotions_stored_before_margins_still_read() {
        // A promotion as versions before margins stored it: no `margin` field.
        #[derive(Serialize)]
        struct Before {
            promoted: bool,
            metric: String,
            candidate: f64,
            production: Option<f64>,
            production_version: Option<u32>,
            reason: String,
        }
        let old = Before {
            promoted: true,
            metric: "test_auc".into(),
            candidate: 0.95,
            production: Some(0.9),
            production_version: Some(3),
            reason: "test_auc 0.950000 beats production v3 (0.900000) on the same test split".into(),
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&old, &mut bytes).unwrap();
        let read: Promotion = ciborium::from_reader(&bytes[..]).unwrap();
        assert_eq!((read.promoted, read.candidate, read.margin), (true, 0.95, None));
        // A margin is kept, and left out of the JSON where there is none.
        let new = decide("test_auc", 0.95, Some((3, 0.9)), true, 0.02);
        let mut bytes = Vec::new();
        ciborium::into_writer(&new, &mut bytes).unwrap();
        assert_eq!(ciborium::from_reader::<Promotion, _>(&bytes[..]).unwrap(), new);
        assert!(!serde_json::to_string(&decide("test_auc", 0.95, None, true, 0.0)).unwrap().contains("margin"));
    }

    /// A version of `name` whose sha256 names the caller `tag`, so that the test can tell whose it is.
    pub(crate) fn sample(name: &str, version: u32, tag: u64) -> ModelVersion {
        ModelVersion {
            name: name.into(),
            version,
            class: "press".into(),
            sensor: "t".into(),
            kind: crate::ml::models::ModelKind::Autoencoder,
            sha256: format!("{tag:064}"),
            size: 10,
            nnef: None,
            input_shape: vec![-1, 4],
            output_shape: vec![-1, 1],
            gaps: Default::default(),
            score_tail: None,
            pipeline: PipelineSpec { version: 1, sensors: vec![] },
            threshold: 1.0,
            golden: vec![],
            lineage: Lineage {
                dataset_hash: String::new(),
                dataset_report: Default::default(),
                hyper: Default::default(),
                trials: vec![],
                seed: 0,
                metrics: Metrics::default(),
                threshold_source: String::new(),
                code_version: String::new(),
                reference: Default::default(),
                selection: String::new(),
            },
            created_ms: 0,
            promotion: decide("test_loss", 0.5, Some((1, 0.1)), false, 0.0),
            frames: 1,
        }
    }

    #[test]
    fn artifacts_no_version_names_are_collected_after_their_grace() {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(&dir.path().join("db"), edgeloop_common::durable::Durability::Flush).unwrap();
        let r = ModelRegistry::open(&db, dir.path()).unwrap();
        let named = r.put_artifact(b"the model a version names").unwrap();
        let orphan = r.put_artifact(b"an upload whose version was never recorded").unwrap();
        let archive = r.put_artifact(b"the NNEF archive the version names").unwrap();
        let nnef = Some(edgeloop_common::update::ArtifactRef { sha256: archive.clone(), size: 34 });
        r.insert(&ModelVersion { sha256: named.clone(), nnef, ..sample("press", 1, 0) }).unwrap();
        // A stranger's file in the directory is not the registry's to remove.
        std::fs::write(dir.path().join("artifacts/README"), "notes").unwrap();
        // Within the grace period nothing goes: a training writes its artifact before it records the version.
        let none = Default::default();
        assert!(r.collect_garbage(std::time::Duration::from_secs(3600), &none).unwrap().is_empty());
        let kept = std::collections::BTreeSet::from([orphan.clone()]);
        assert!(r.collect_garbage(std::time::Duration::ZERO, &kept).unwrap().is_empty());
        assert_eq!(r.collect_garbage(std::time::Duration::ZERO, &none).unwrap(), vec![orphan.clone()]);
        assert!(r.artifact_path(&named).is_some() && r.artifact_path(&orphan).is_none());
        assert!(r.artifact_path(&archive).is_some(), "a version's NNEF archive is kept with it");
        assert!(dir.path().join("artifacts/README").exists());
    }

    #[test]
    fn concurrent_uploads_and_trainings_get_distinct_versions() {
        use std::sync::{Arc, Barrier};
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(&dir.path().join("db"), edgeloop_common::durable::Durability::Flush).unwrap();
        let r = Arc::new(ModelRegistry::open(&db, dir.path()).unwrap());
        // A version recorded before versions had a counter.
        r.insert(&sample("press", 1, 0)).unwrap();
        const TRAININGS: u64 = 8;
        const UPLOADERS: u64 = 4;
        const UPLOADS: u64 = 10;
        // Trainings allocate their version before they export: all of them allocate before any records.
        let exported = Arc::new(Barrier::new(TRAININGS as usize));
        let mut threads = Vec::new();
        for t in 0..TRAININGS {
            let (r, exported) = (r.clone(), exported.clone());
            threads.push(std::thread::spawn(move || {
                let v = r.next_version("press").unwrap();
                exported.wait();
                r.insert(&sample("press", v, 1 + t)).unwrap();
                vec![(v, 1 + t)]
            }));
        }
        for u in 0..UPLOADERS {
            let r = r.clone();
            threads.push(std::thread::spawn(move || {
                (0..UPLOADS)
                    .map(|i| {
                        let tag = 100 + u * UPLOADS + i;
                        let v = r.next_version("press").unwrap();
                        r.insert(&sample("press", v, tag)).unwrap();
                        (v, tag)
                    })
                    .collect::<Vec<_>>()
            }));
        }
        let got: Vec<(u32, u64)> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let total = (TRAININGS + UPLOADERS * UPLOADS) as usize;
        let versions: std::collections::BTreeSet<u32> = got.iter().map(|g| g.0).collect();
        assert_eq!(versions.len(), total, "two callers got the same version: {got:?}");
        assert_eq!((versions.first(), versions.last()), (Some(&2), Some(&(1 + total as u32))));
        // Every caller's model is stored under its version: none was overwritten by another.
        for (v, tag) in &got {
            assert_eq!(r.get("press", *v).unwrap().unwrap().sha256, format!("{tag:064}"), "version {v}");
        }
        assert_eq!(r.get("press", 1).unwrap().unwrap().sha256, format!("{:064}", 0));
        // Recording a version again is refused and keeps the first.
        let e = r.insert(&sample("press", 1, 999)).unwrap_err();
        assert!(matches!(e, ModelError::VersionTaken { version: 1, .. }), "{e}");
        assert_eq!(r.get("press", 1).unwrap().unwrap().sha256, format!("{:064}", 0));
        // Another line has its own numbers, and a version recorded out of turn is skipped by the counter.
        assert_eq!(r.next_version("press-classifier").unwrap(), 1);
        r.insert(&sample("press-classifier", 5, 7)).unwrap();
        assert_eq!(r.next_version("press-classifier").unwrap(), 6);
    }

    #[test]
    fn artifacts_are_content_addressed() {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(&dir.path().join("db"), edgeloop_common::durable::Durability::Flush).unwrap();
        let r = ModelRegistry::open(&db, dir.path()).unwrap();
        let sha = r.put_artifact(b"model bytes").unwrap();
        assert_eq!(sha, edgeloop_common::signing::sha256_hex(b"model bytes"));
        assert_eq!(r.put_artifact(b"model bytes").unwrap(), sha);
        assert_eq!(std::fs::read(r.artifact_path(&sha).unwrap()).unwrap(), b"model bytes");
        assert!(r.artifact_path("../../etc/passwd").is_none());
        assert!(r.artifact_path(&"0".repeat(64)).is_none());
    }

    #[test]
    fn store_and_artifacts_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let db = DurableDb::open(&data.join("store"), edgeloop_common::durable::Durability::Fsync).unwrap();
        let r = ModelRegistry::open(&db, &data).unwrap();
        let sha = r.put_artifact(b"model bytes").unwrap();
        db.commit().unwrap();
        fn mode(p: &Path) -> u32 {
            std::fs::metadata(p).unwrap().permissions().mode() & 0o777
        }
        let store = data.join("store");
        let artifacts = data.join("artifacts");
        assert_eq!((mode(&store), mode(&artifacts), mode(&artifacts.join(&sha))), (0o700, 0o700, 0o600));
        for e in std::fs::read_dir(&store).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(mode(&p) & 0o077, 0, "{} is open to group or others", p.display());
        }

        // An artifacts directory an older version left open is tightened when the registry opens.
        std::fs::set_permissions(&artifacts, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(artifacts.join(&sha), std::fs::Permissions::from_mode(0o644)).unwrap();
        ModelRegistry::open(&db, &data).unwrap();
        assert_eq!((mode(&artifacts), mode(&artifacts.join(&sha))), (0o700, 0o600));
    }

    #[test]
    fn an_artifacts_folder_that_cannot_be_made_is_an_io_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(&dir.path().join("db"), edgeloop_common::durable::Durability::Flush).unwrap();
        // A file where the data directory should be: the artifacts folder cannot be created under it.
        let data = dir.path().join("data");
        std::fs::write(&data, b"not a directory").unwrap();
        let Err(e) = ModelRegistry::open(&db, &data) else { panic!("opened under a file") };
        assert!(matches!(&e, ModelError::Io { path, .. } if path.starts_with(&data)), "{e:?}");
        assert!(e.to_string().contains("data"), "{e}");
        assert!(!e.to_string().contains("corrupt"), "{e}");
    }
}
