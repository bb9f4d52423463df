//! Update bundles: installing a model on a device that no network reaches.
//!
//! `edgeloop-agent install --bundle FILE` checks a bundle ([`edgeloop_common::bundle`]) exactly as the
//! updater checks an online desired state (a trusted key's signature on the state and on its manifest, the
//! class, a sequence above the last accepted one, the expiry, the manifest's fit to this device) and the
//! artifact against the signed size and SHA-256. A good bundle is queued in `updates/inbox/`; the updater
//! takes it from there (at once when the agent runs, else at its next start) and installs it through the
//! same self-test, shadow and watch as an online update. The device reports the result when it next reaches
//! the control plane, in its heartbeats.

use super::state::{self, ArtifactError, Identity, Rejection};
use super::{Files, UpdaterConfig};
use crate::config::AgentConfig;
use anyhow::Context;
use edgeloop_common::bundle::{Bundle, BundleError};
use edgeloop_common::signing::TrustedKey;
use edgeloop_common::update::{DesiredState, Failure, Manifest};
use std::path::{Path, PathBuf};

/// Room for the signed desired state beside the artifact in a bundle file.
const STATE_ALLOWANCE: u64 = 1 << 20;

/// Why a bundle is refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleRefusal {
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
    #[error(transparent)]
    Decode(#[from] BundleError),
    #[error("{}", .0.report_reason())]
    Rejected(#[from] Rejection),
    #[error("artifact: {0}")]
    Artifact(#[from] ArtifactError),
    #[error("class configuration: {}", .0.report_reason())]
    Config(super::config::ConfigRejection),
}

impl BundleRefusal {
    /// The failure kind a report names.
    pub fn failure(&self) -> Failure {
        match self {
            BundleRefusal::Rejected(Rejection::Expired { .. }) => Failure::TimedOut,
            BundleRefusal::Artifact(_) => Failure::Integrity,
            BundleRefusal::Read { .. } => Failure::Storage,
            BundleRefusal::Config(super::config::ConfigRejection::Expired { .. }) => Failure::TimedOut,
            _ => Failure::Refused,
        }
    }
}

/// The device as the updater verifies desired states for it.
pub fn identity(cfg: &AgentConfig, ucfg: &UpdaterConfig) -> Identity {
    let sensor = cfg.class.pipeline().sensors.into_iter().find(|s| s.name == cfg.model_sensor);
    Identity {
        device: cfg.device_id.clone(),
        class: cfg.class.class.clone(),
        sensor: cfg.model_sensor.clone(),
        width: sensor.as_ref().map_or(0, |s| s.width()),
        features: sensor,
        max_artifact_bytes: ucfg.max_artifact_bytes,
    }
}

/// Checks a bundle as the updater checks an online desired state, and its artifact against the signed
/// manifest. Pure.
pub fn check(
    bundle: &Bundle,
    trusted: &[TrustedKey],
    me: &Identity,
    last_seq: u64,
    now_ms: u64,
) -> Result<(DesiredState, Manifest), BundleRefusal> {
    let (d, m) = state::verify_bundle_state(&bundle.desired, trusted, me, last_seq, now_ms)?;
    state::check_artifact(&bundle.artifact, &m)?;
    Ok((d, m))
}

/// Reads a bundle file, refusing one larger than an artifact this device takes could make.
pub fn read(path: &Path, max_artifact_bytes: u64) -> Result<Bundle, BundleRefusal> {
    let fail = |reason: String| BundleRefusal::Read { path: path.display().to_string(), reason };
    let len = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?.len();
    if len > max_artifact_bytes.saturating_add(STATE_ALLOWANCE) {
        return Err(fail(format!("{len} bytes, more than an artifact of at most {max_artifact_bytes} bytes needs")));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    Ok(Bundle::decode(&bytes)?)
}

/// What `install --bundle` queued.
#[derive(Debug)]
pub struct Queued {
    pub desired: DesiredState,
    pub manifest: Manifest,
    pub path: PathBuf,
    /// The class configuration in the bundle, if any: its version and hash.
    pub config: Option<(u32, String)>,
}

/// Keeps a checked bundle's artifact under `models/` (content-addressed), where the updater finds it instead
/// of downloading it.
pub fn keep_artifact(files: &Files, bundle: &Bundle, m: &Manifest) -> anyhow::Result<()> {
    let model = files.model_of(m);
    if !model.is_file() {
        let dir = model.parent().expect("models dir");
        edgeloop_common::private::dir(dir)?;
        edgeloop_common::private::write_atomic(&model, &bundle.artifact)
            .with_context(|| format!("writing {}", model.display()))?;
    }
    Ok(())
}

/// Keeps a checked bundle's artifact and queues the bundle in the inbox.
pub fn keep(files: &Files, bundle: &Bundle, d: &DesiredState, m: &Manifest) -> anyhow::Result<PathBuf> {
    keep_artifact(files, bundle, m)?;
    let inbox = files.inbox();
    edgeloop_common::private::dir(&inbox)?;
    let path = inbox.join(format!("{:020}-{}.bundle", d.seq, &m.sha256[..16]));
    edgeloop_common::private::write_atomic(&path, &bundle.encode())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `edgeloop-agent install --bundle FILE`: checks the bundle against this device and queues it.
pub fn queue(cfg: &AgentConfig, file: &Path, now_ms: u64) -> anyhow::Result<Queued> {
    let ucfg = cfg.updates.as_ref().context("this agent takes no updates: its config has no [updates] section")?;
    let me = identity(cfg, ucfg);
    let files = Files::new(&cfg.data_dir);
    let pointer = files.load_pointer()?;
    let bundle = read(file, ucfg.max_artifact_bytes)?;
    let (desired, manifest) = check(&bundle, &ucfg.trusted, &me, pointer.last_seq, now_ms)?;
    let config = match &bundle.config {
        Some(signed) => {
            let last = super::config::ConfigFiles::new(&cfg.data_dir).load_pointer()?.last_seq;
            let who = (cfg.device_id.as_str(), cfg.class.class.as_str());
            let v = super::config::verify_bundled(signed, &ucfg.trusted, who, last, now_ms)
                .map_err(BundleRefusal::Config)?;
            Some((v.release.version, v.release.sha256))
        }
        None => None,
    };
    let path = keep(&files, &bundle, &desired, &manifest)?;
    Ok(Queued { desired, manifest, path, config })
}

/// The bundles waiting in the inbox, oldest sequence first.
pub fn waiting(files: &Files) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(files.inbox())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "bundle"))
        .collect();
    v.sort();
    v
}
