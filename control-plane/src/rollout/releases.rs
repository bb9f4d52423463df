//! Agent builds: an `edgeloop-agent` binary published for a device class and CPU architecture, numbered per
//! class and signed, rolled out like a model (`kind: agent`). The binary is an artifact beside the models'
//! (`/api/v1/artifacts/{sha256}`), and housekeeping keeps it while a release names it.

use super::store::RolloutStore;
use crate::fleet::telemetry::StoreError;
use crate::ml::models::ModelRegistry;
use edgeloop_common::signing::{Signed, Signer};
use edgeloop_common::update::AgentRelease;
use serde::{Deserialize, Serialize};

/// One published agent build, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub class: String,
    pub arch: String,
    pub version: String,
    pub number: u32,
    pub sha256: String,
    pub size: u64,
    pub created_ms: u64,
    /// The signed [`AgentRelease`], as devices receive it.
    pub signed: Signed,
}

/// An agent build as the API shows it.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseView {
    pub class: String,
    pub arch: String,
    pub version: String,
    pub number: u32,
    pub sha256: String,
    pub size: u64,
    pub created_ms: u64,
}

impl ReleaseRecord {
    pub fn view(&self) -> ReleaseView {
        ReleaseView {
            class: self.class.clone(),
            arch: self.arch.clone(),
            version: self.version.clone(),
            number: self.number,
            sha256: self.sha256.clone(),
            size: self.size,
            created_ms: self.created_ms,
        }
    }
}

/// What an operator publishes.
#[derive(utoipa::IntoParams, Debug, Clone, Deserialize, Serialize)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PublishRelease {
    pub class: String,
    /// `std::env::consts::ARCH` of the devices: `x86_64`, `aarch64`, `arm`, `riscv64`, ...
    pub arch: String,
    /// The build's version string (what `edgeloop-agent --version` prints).
    pub version: String,
}

/// Why an agent build was not published.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("{0}")]
    Invalid(String),
    #[error("class `{0}` has published the largest release number there is")]
    Exhausted(String),
    #[error("storing the binary: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks the request, stores the binary as an artifact and records and signs the next release of the class.
/// Publishing the same binary for the same class and architecture again returns the existing release (and
/// `false`). Not yet durable. Blocking.
pub fn publish(
    store: &RolloutStore,
    models: &ModelRegistry,
    signer: &Signer,
    req: &PublishRelease,
    binary: &[u8],
    now_ms: u64,
) -> Result<(ReleaseRecord, bool), ReleaseError> {
    edgeloop_common::topics::validate_device_id(&req.class)
        .map_err(|_| ReleaseError::Invalid(format!("class: `{}` is not a class name", req.class)))?;
    let word = |s: &str| {
        !s.is_empty() && s.len() <= 40 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b))
    };
    if !word(&req.arch) {
        return Err(ReleaseError::Invalid(format!(
            "arch: `{}` is not an architecture name (x86_64, aarch64, ...)",
            req.arch
        )));
    }
    if !word(&req.version) {
        return Err(ReleaseError::Invalid(format!(
            "version: `{}` must be 1 to 40 characters of A-Z, a-z, 0-9, '.', '_', '-' or '+'",
            req.version
        )));
    }
    if binary.len() < 4 {
        return Err(ReleaseError::Invalid("body: the agent binary is empty".into()));
    }
    let sha256 = edgeloop_common::signing::sha256_hex(binary);
    let all = store.agent_releases(Some(&req.class))?;
    if let Some(same) = all.iter().find(|r| r.sha256 == sha256 && r.arch == req.arch) {
        return Ok((same.clone(), false));
    }
    let number = match all.iter().map(|r| r.number).max() {
        None => 1,
        Some(n) => n.checked_add(1).ok_or_else(|| ReleaseError::Exhausted(req.class.clone()))?,
    };
    models.put_artifact(binary)?;
    let release = AgentRelease {
        class: req.class.clone(),
        arch: req.arch.clone(),
        version: req.version.clone(),
        number,
        sha256: sha256.clone(),
        size: binary.len() as u64,
        created_ms: now_ms,
    };
    let r = ReleaseRecord {
        class: req.class.clone(),
        arch: req.arch.clone(),
        version: req.version.clone(),
        number,
        sha256,
        size: binary.len() as u64,
        created_ms: now_ms,
        signed: Signed::sign(&release, signer),
    };
    store.put_agent_release(&r)?;
    Ok((r, true))
}
