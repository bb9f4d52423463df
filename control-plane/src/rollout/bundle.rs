//! Update bundles for sites with no network (`edgeloop-control-plane bundle`, `POST /api/v1/bundles`): one
//! signed file with a desired state for every device of a class, its manifest and its artifact, valid until
//! an expiry ([`edgeloop_common::bundle`]).
//!
//! Sequences. An agent accepts only a sequence above the last it accepted, online or from a bundle. A bundle
//! takes a sequence above every one the control plane has issued (to any device) or put in a bundle, so it
//! installs on any device of the class that has not run a newer state; and every online state issued to the
//! class afterwards goes above the class's highest bundle ([`RolloutStore::bundle_floor`]), so a device
//! that installed a bundle still takes what the control plane sends it once it is back online.

use super::store::RolloutStore;
use crate::fleet::telemetry::StoreError;
use crate::ml::models::ModelRegistry;
use edgeloop_common::bundle::{Bundle, ANY_DEVICE, FORMAT};
use edgeloop_common::signing::{Signed, Signer};
use edgeloop_common::update::{DesiredState, UpdatePolicy, UpdateReport};
use serde::{Deserialize, Serialize};

/// A bundle the control plane made, as the API lists it.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundleRecord {
    /// Also the `rollout` its desired state and the devices' reports about it carry.
    pub id: String,
    pub class: String,
    pub model: String,
    pub version: u32,
    pub sha256: String,
    pub seq: u64,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// The class configuration the bundle carries, if any: its version, hash and the sequence of its desired
    /// configuration (a sequence of the configuration kind).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<BundledConfig>,
}

/// A class configuration in a bundle.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BundledConfig {
    pub version: u32,
    pub sha256: String,
    pub seq: u64,
}

/// A bundle request (`POST /api/v1/bundles`).
#[derive(utoipa::ToSchema, Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BundleRequest {
    pub model: String,
    pub version: u32,
    /// Default: the model's class.
    #[serde(default)]
    pub class: Option<String>,
    /// How long the bundle stays installable. Default: 30 days.
    #[serde(default = "default_valid_secs")]
    pub valid_secs: u64,
    #[serde(default)]
    pub policy: Option<UpdatePolicy>,
    /// A class configuration version of the class to carry with the model (`/api/v1/configs/{class}/{version}`).
    #[serde(default)]
    pub config: Option<u32>,
    /// How long a device watches the bundle's class configuration before it keeps it (default 60 s).
    #[serde(default)]
    pub health_secs: Option<u32>,
}

fn default_valid_secs() -> u64 {
    30 * 24 * 3600
}

/// Why a bundle was not made.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("no model `{name}` version {version}")]
    NoModel { name: String, version: u32 },
    #[error("config: no class configuration `{class}` version {version}")]
    NoConfig { class: String, version: u32 },
    #[error("class: model `{model}` is for class `{model_class}`, not `{class}`")]
    ClassMismatch { model: String, model_class: String, class: String },
    #[error("valid_secs: {0} is not between 60 and 31536000 (a year)")]
    Validity(u64),
    #[error("model `{0}`: its artifact is missing from the data directory")]
    NoArtifact(String),
    #[error("artifact: {0}")]
    Io(String),
    #[error("sequences are exhausted: no bundle can follow sequence {0}")]
    Exhausted(u64),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Makes and records a bundle; returns its record and the file's bytes. Blocking. The caller serialises it
/// with issuing desired states (the rollout service's writer lock, or a control plane that is stopped).
pub fn make(
    store: &RolloutStore,
    models: &ModelRegistry,
    signer: &Signer,
    req: &BundleRequest,
    now_ms: u64,
) -> Result<(BundleRecord, Vec<u8>), BundleError> {
    if !(60..=365 * 24 * 3600).contains(&req.valid_secs) {
        return Err(BundleError::Validity(req.valid_secs));
    }
    let mv = models
        .get(&req.model, req.version)?
        .ok_or_else(|| BundleError::NoModel { name: req.model.clone(), version: req.version })?;
    let class = req.class.clone().unwrap_or_else(|| mv.class.clone());
    if class != mv.class {
        return Err(BundleError::ClassMismatch { model: req.model.clone(), model_class: mv.class.clone(), class });
    }
    // The file a device runs: the NNEF archive where the model has one, else the ONNX file.
    let manifest = mv.manifest();
    let runs = manifest.file().0.to_string();
    let path = models.artifact_path(&runs).ok_or_else(|| BundleError::NoArtifact(mv.name.clone()))?;
    let artifact = std::fs::read(&path).map_err(|e| BundleError::Io(format!("{}: {e}", path.display())))?;
    let issued = store.all_issued()?.into_iter().map(|(_, i)| i.seq).max().unwrap_or(0);
    let bundled = store.bundles()?.iter().map(|b| b.seq).max().unwrap_or(0);
    let top = issued.max(bundled);
    let seq = top.checked_add(1).ok_or(BundleError::Exhausted(top))?;
    let id = format!("bundle-{seq}");
    let expires_ms = now_ms + req.valid_secs * 1000;
    let desired = DesiredState {
        device: ANY_DEVICE.to_string(),
        class: class.clone(),
        seq,
        issued_ms: now_ms,
        expires_ms,
        rollout: Some(id.clone()),
        manifest: Signed::sign(&manifest, signer),
        artifact: format!("bundle:{}", mv.sha256),
        policy: req.policy.unwrap_or_default(),
        nnef_artifact: mv.nnef.as_ref().map(|a| format!("bundle:{}", a.sha256)),
    };
    let (config, bundled) = match req.config {
        None => (None, None),
        Some(version) => {
            let c = store
                .config(&class, version)?
                .ok_or_else(|| BundleError::NoConfig { class: class.clone(), version })?;
            // Above every configuration issued to any device and in any bundle, as for the model's state.
            let top = store.config_seq_floor()?;
            let cseq = top.checked_add(1).ok_or(BundleError::Exhausted(top))?;
            let d = edgeloop_common::update::DesiredConfig {
                device: ANY_DEVICE.to_string(),
                class: class.clone(),
                seq: cseq,
                issued_ms: now_ms,
                expires_ms,
                rollout: Some(id.clone()),
                release: c.signed.clone(),
                health_secs: req.health_secs.unwrap_or(super::engine::DEFAULT_CONFIG_HEALTH_SECS),
            };
            (Some(Signed::sign(&d, signer)), Some(BundledConfig { version, sha256: c.sha256, seq: cseq }))
        }
    };
    let bundle = Bundle { format: FORMAT, desired: Signed::sign(&desired, signer), artifact, config };
    let record = BundleRecord {
        id,
        class,
        model: mv.name.clone(),
        version: mv.version,
        sha256: mv.sha256.clone(),
        seq,
        created_ms: now_ms,
        expires_ms,
        config: bundled,
    };
    store.put_bundle(&record)?;
    store.commit()?;
    Ok((record, bundle.encode()))
}

/// A bundle with what devices reported about it.
#[derive(utoipa::ToSchema, Debug, Clone, Serialize, Deserialize)]
pub struct BundleView {
    #[serde(flatten)]
    pub bundle: BundleRecord,
    /// Each device's latest report about this bundle.
    pub devices: std::collections::BTreeMap<String, UpdateReport>,
}

/// The bundles with each device's latest report about them: reports that carry the bundle's id and
/// sequence and model. Pure.
pub fn views<'a>(
    bundles: Vec<BundleRecord>,
    devices: impl IntoIterator<Item = (&'a str, &'a [UpdateReport])> + Clone,
) -> Vec<BundleView> {
    bundles
        .into_iter()
        .map(|b| {
            let mut seen = std::collections::BTreeMap::new();
            for (id, reports) in devices.clone() {
                let about = reports
                    .iter()
                    .filter(|r| {
                        r.component.is_model()
                            && r.rollout.as_deref() == Some(b.id.as_str())
                            && r.seq == b.seq
                            && r.sha256 == b.sha256
                    })
                    .max_by_key(|r| r.at_ms);
                if let Some(r) = about {
                    seen.insert(id.to_string(), r.clone());
                }
            }
            BundleView { bundle: b, devices: seen }
        })
        .collect()
}
