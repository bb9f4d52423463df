//! Model updates: the signed model manifest, the signed per-device desired state, and the reports an agent
//! sends as an update moves through its phases.
//!
//! The control plane signs a [`Manifest`] and a [`DesiredState`] each time it
//! points a device at a model. The desired state carries the signed manifest inside it, and its own
//! per-device `seq`: an agent refuses any sequence it has already passed (replay and downgrade protection);
//! a rollback is a new, higher sequence pointing at an older model.

use crate::features::PipelineSpec;
use crate::gaps::GapRule;
use crate::signing::Signed;
use serde::{Deserialize, Serialize};

/// An input with the output the model must give for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Golden {
    pub input: Vec<f32>,
    pub output: Vec<f32>,
}

/// Where a model came from, as far as a device needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ManifestLineage {
    pub dataset_hash: String,
    /// Hyper-parameters and metrics, as JSON text.
    pub hyper: String,
    pub metrics: String,
    pub code_version: String,
}

/// A file a manifest signs besides the model's ONNX file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArtifactRef {
    /// SHA-256 of the file, hex.
    pub sha256: String,
    pub size: u64,
}

/// How a model file is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFormat {
    /// ONNX (protobuf): what training exports and operators upload.
    Onnx,
    /// tract's NNEF archive (a tar, gzipped or not), converted from the ONNX file by the control plane: what
    /// agents run, since loading it needs no ONNX parser.
    Nnef,
}

impl ModelFormat {
    /// The format of a model file by its first bytes: a gzip or tar archive is NNEF, anything else is taken
    /// for ONNX (whose parser then says what is wrong with it).
    pub fn sniff(bytes: &[u8]) -> ModelFormat {
        let gzip = bytes.starts_with(&[0x1f, 0x8b]);
        let tar = bytes.get(257..262) == Some(b"ustar");
        if gzip || tar {
            ModelFormat::Nnef
        } else {
            ModelFormat::Onnx
        }
    }
}

/// Everything a device needs to verify and run one model version (DESIGN.md, Model manifest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Manifest {
    pub name: String,
    pub version: u32,
    pub class: String,
    /// The sensor whose feature vectors the model scores.
    pub sensor: String,
    /// SHA-256 of the ONNX file, hex: the model's identity in reports, rollouts and the API.
    pub sha256: String,
    pub size: u64,
    /// The same model as an NNEF archive, which the control plane converted from the ONNX file and checked
    /// against the golden vectors. An agent runs this file where the manifest names one (see
    /// [`Manifest::file`]). Absent on models registered before conversion existed, and a manifest without it
    /// encodes as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nnef: Option<ArtifactRef>,
    /// `-1` marks the batch dimension.
    pub input_shape: Vec<i64>,
    pub output_shape: Vec<i64>,
    pub pipeline: PipelineSpec,
    /// Scores above this are flagged as anomalies.
    pub threshold: f32,
    pub golden: Vec<Golden>,
    /// Largest absolute difference per output allowed in the self-test (relative to `max(1, |expected|)`).
    pub golden_tolerance: f32,
    pub lineage: ManifestLineage,
    pub created_ms: u64,
    /// Feature vectors per input: a forecaster scores the latest vector against the ones before it and takes
    /// `frames` consecutive vectors, oldest first (`input_shape` is `[-1, frames × width]`). Absent means 1,
    /// and a manifest of 1 encodes as before.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub frames: u32,
    /// The gap rule the model's training filled short gaps with, which the agent applies to the model's
    /// sensor while it runs the model. Absent means the default (linear, up to 5 readings), and a manifest
    /// with the default encodes as before.
    #[serde(default, skip_serializing_if = "GapRule::is_default")]
    pub gaps: GapRule,
    /// The tail of the model's scores on its validation split ([`crate::score_tail::TailFit`]): it judges
    /// which flags count towards an alert until the device has learnt the tail of its own scores. Absent on
    /// models without one (uploaded models), and a manifest without it encodes as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_tail: Option<crate::score_tail::TailFit>,
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

impl Manifest {
    /// Width of the feature vector the model takes.
    pub fn input_width(&self) -> Option<usize> {
        self.input_shape.last().and_then(|&w| usize::try_from(w).ok()).filter(|&w| w > 0)
    }

    /// The file a device downloads, checks and runs: the NNEF archive where the manifest names one, else
    /// the ONNX file. Its SHA-256, size and format.
    pub fn file(&self) -> (&str, u64, ModelFormat) {
        match &self.nnef {
            Some(a) => (&a.sha256, a.size, ModelFormat::Nnef),
            None => (&self.sha256, self.size, ModelFormat::Onnx),
        }
    }
}

/// How the agent should bring the model in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdatePolicy {
    /// Windows the candidate runs beside the active model before it is activated (0: no shadow phase).
    pub shadow_windows: u32,
    /// Windows the new model is watched after activation before the update counts as applied.
    pub watch_windows: u32,
    /// Inference latency allowed while watching, microseconds (0: no budget).
    pub latency_budget_us: u32,
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        UpdatePolicy { shadow_windows: 0, watch_windows: 20, latency_budget_us: 0 }
    }
}

/// What one device should run. Published retained on `edgeloop/v1/{device}/down/desired`, signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    pub device: String,
    pub class: String,
    /// Per device, strictly increasing.
    pub seq: u64,
    pub issued_ms: u64,
    /// The agent refuses the state after this time (freeze protection).
    pub expires_ms: u64,
    /// The rollout this state belongs to, if any.
    pub rollout: Option<String>,
    /// The signed [`Manifest`] of the model to run.
    pub manifest: Signed,
    /// Where to download the artifact: a path on the control plane's API (or an absolute URL).
    pub artifact: String,
    pub policy: UpdatePolicy,
    /// Where to download the manifest's NNEF archive, where it names one. Absent otherwise, and a state
    /// without it encodes as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nnef_artifact: Option<String>,
}

impl DesiredState {
    /// Where to download the file [`Manifest::file`] names: `artifact` for the ONNX file, `nnef_artifact`
    /// for the NNEF archive (`None` where the state does not say).
    pub fn artifact_for(&self, m: &Manifest) -> Option<&str> {
        match m.file().2 {
            ModelFormat::Onnx => Some(&self.artifact),
            ModelFormat::Nnef => self.nnef_artifact.as_deref(),
        }
    }
}

/// A class configuration as the control plane publishes it: the text of a `firmware-configs/<class>.toml`,
/// checked by the same validator as the file, numbered per class and signed. Carried inside a
/// [`DesiredConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigRelease {
    pub class: String,
    /// Per class, from 1.
    pub version: u32,
    /// SHA-256 of `toml`, hex: what reports and rollouts name the configuration by.
    pub sha256: String,
    /// The class file, exactly as published.
    pub toml: String,
    pub created_ms: u64,
}

/// What class configuration one device should run. Published retained on
/// `edgeloop/v1/{device}/down/config`, signed, beside (never instead of) the model's [`DesiredState`]; its
/// `seq` is a sequence of its own, per device, strictly increasing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredConfig {
    pub device: String,
    pub class: String,
    pub seq: u64,
    pub issued_ms: u64,
    /// The agent refuses the state after this time.
    pub expires_ms: u64,
    pub rollout: Option<String>,
    /// The signed [`ConfigRelease`].
    pub release: Signed,
    /// How long the agent gives the new configuration to prove itself (connected, and every record waiting
    /// acknowledged or none waiting; no record dropped) before it restores the previous one.
    pub health_secs: u32,
}

/// A build of the agent for a device class and CPU architecture, as the control plane publishes it: the
/// binary is an artifact like a model's (`/api/v1/artifacts/{sha256}`). Carried inside a [`DesiredAgent`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRelease {
    pub class: String,
    /// `std::env::consts::ARCH` of the devices that can run it: `x86_64`, `aarch64`, `arm`, ...
    pub arch: String,
    /// The build's own version string, as `edgeloop-agent --version` and heartbeats say it.
    pub version: String,
    /// Per class, from 1: what rollouts name the release by.
    pub number: u32,
    /// SHA-256 of the binary, hex.
    pub sha256: String,
    pub size: u64,
    pub created_ms: u64,
}

/// What agent binary one device should run. Published retained on `edgeloop/v1/{device}/down/agent`, signed,
/// with a sequence of its own per device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredAgent {
    pub device: String,
    pub class: String,
    pub seq: u64,
    pub issued_ms: u64,
    pub expires_ms: u64,
    pub rollout: Option<String>,
    /// The signed [`AgentRelease`].
    pub release: Signed,
    /// Where to download the binary: a path on the control plane's API (or an absolute URL).
    pub artifact: String,
    /// How long the new binary has, from its first start, to prove itself (connected, records
    /// acknowledged) before the previous one comes back.
    pub health_secs: u32,
}

/// What an update report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Component {
    /// A model, from a [`DesiredState`].
    #[default]
    Model,
    /// A class configuration, from a [`DesiredConfig`].
    Config,
    /// The agent's own binary, from a [`DesiredAgent`].
    Agent,
}

impl Component {
    pub fn is_model(&self) -> bool {
        *self == Component::Model
    }
}

/// The phases an update goes through on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Phase {
    /// Verified and accepted; the artifact is being downloaded.
    Downloading,
    /// Downloaded, hash checked, loaded and self-tested.
    Verified,
    /// Running beside the active model.
    Shadow,
    /// Active and being watched.
    Watching,
    /// Active and past its watch: the update succeeded.
    Applied,
    /// Refused before download: signature, class, sequence or expiry.
    Rejected,
    /// Download, hash, load or self-test failed; the active model is unchanged.
    Failed,
    /// Activated, then misbehaved, and the previous model was restored.
    Reverted,
}

impl Phase {
    /// Whether the update has ended, well or badly.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Applied | Phase::Rejected | Phase::Failed | Phase::Reverted)
    }
    /// Whether the update ended badly.
    pub fn is_failure(self) -> bool {
        matches!(self, Phase::Rejected | Phase::Failed | Phase::Reverted)
    }
}

/// Why an update ended badly, so that the control plane tells a broken model or a hostile server from a
/// device that simply ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Failure {
    /// The desired state expired before the update could finish: the artifact server stayed unreachable
    /// through every retry, or the state arrived already expired. Not the model's fault, and not a success.
    TimedOut,
    /// A signature, key, device, class or sequence check refused the desired state or its manifest.
    Refused,
    /// The artifact's size or hash is not what the manifest signs.
    Integrity,
    /// The artifact server answered with a refusal that retrying cannot fix (404, 403, ...).
    Download,
    /// The model did not load, or failed its golden vectors.
    SelfTest,
    /// The device's own storage failed (a full disk, say).
    Storage,
    /// The activated model misbehaved while watched and the previous one was restored.
    Misbehaved,
    /// A kind this build does not know (a newer agent's).
    #[serde(other)]
    Other,
}

impl Failure {
    /// Whether the update failed for a reason that counts against the model or the rollout: everything but
    /// running out of time.
    pub fn is_real(self) -> bool {
        self != Failure::TimedOut
    }
}

/// One transition of an update on a device, sent on `up/report` and repeated in every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UpdateReport {
    /// The desired-state sequence this is about (0 if the state could not be read).
    pub seq: u64,
    pub rollout: Option<String>,
    /// SHA-256 of the model concerned.
    pub sha256: String,
    pub phase: Phase,
    pub reason: String,
    /// SHA-256 of the model the agent runs now.
    pub active_sha256: Option<String>,
    /// Share of shadow windows where candidate and active model made the same anomaly decision.
    pub shadow_agreement: Option<f32>,
    /// Share of windows the new model flagged while watched, and the previous model's share before it.
    pub anomaly_rate: Option<f32>,
    pub baseline_anomaly_rate: Option<f32>,
    /// p95 inference latency of the new model while watched, microseconds.
    pub p95_us: Option<u32>,
    pub at_ms: u64,
    /// With a failure phase: what kind of failure it was. Absent from agents that predate it, whose failures
    /// all count as real ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// What the report is about: absent for a model (as agents that predate configurations send it), and
    /// `config` for a class configuration, whose `sha256` is then the configuration's.
    #[serde(default, skip_serializing_if = "Component::is_model")]
    pub component: Component,
}

impl UpdateReport {
    /// A report of `component` about the state with sequence `seq` (and `rollout`) and the thing of hash
    /// `sha256`, with no measurements, no failure kind and no active hash yet.
    pub fn new(
        component: Component,
        (seq, rollout): (u64, Option<String>),
        sha256: impl Into<String>,
        phase: Phase,
        reason: impl Into<String>,
        at_ms: u64,
    ) -> UpdateReport {
        UpdateReport {
            seq,
            rollout,
            sha256: sha256.into(),
            phase,
            reason: reason.into(),
            active_sha256: None,
            shadow_agreement: None,
            anomaly_rate: None,
            baseline_anomaly_rate: None,
            p95_us: None,
            at_ms,
            failure: None,
            component,
        }
    }

    /// Whether the report ends the update badly for a reason that counts against it (see [`Failure::is_real`]).
    pub fn is_real_failure(&self) -> bool {
        self.phase.is_failure() && self.failure.is_none_or(Failure::is_real)
    }

    /// Whether the update ran out of time on the device.
    pub fn timed_out(&self) -> bool {
        self.phase.is_failure() && self.failure == Some(Failure::TimedOut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gaps::ImputeMethod;

    fn manifest() -> Manifest {
        Manifest {
            name: "press".into(),
            version: 1,
            class: "press".into(),
            sensor: "t".into(),
            sha256: "0".repeat(64),
            size: 1,
            nnef: None,
            input_shape: vec![-1, 5],
            output_shape: vec![-1, 1],
            pipeline: PipelineSpec { version: 1, sensors: vec![] },
            threshold: 1.0,
            golden: vec![],
            golden_tolerance: 1e-3,
            lineage: ManifestLineage::default(),
            created_ms: 0,
            frames: 1,
            gaps: GapRule::default(),
            score_tail: None,
        }
    }

    /// The manifest's top-level keys as encoded in CBOR, and the value under `key`.
    fn encoded(m: &Manifest, key: &str) -> (Vec<String>, Option<ciborium::Value>) {
        let v: ciborium::Value = ciborium::from_reader(crate::signing::to_cbor(m).as_slice()).unwrap();
        let map = v.into_map().unwrap();
        let keys = map.iter().filter_map(|(k, _)| k.as_text().map(str::to_string)).collect();
        let value = map.into_iter().find(|(k, _)| k.as_text() == Some(key)).map(|(_, v)| v);
        (keys, value)
    }

    #[test]
    fn a_manifest_names_the_file_a_device_runs_and_without_nnef_encodes_as_before() {
        let m = manifest();
        let (keys, _) = encoded(&m, "nnef");
        assert!(!keys.iter().any(|k| k == "nnef"), "{keys:?}");
        assert_eq!(m.file(), (m.sha256.as_str(), 1, ModelFormat::Onnx));
        let nnef = ArtifactRef { sha256: "1".repeat(64), size: 7 };
        let with = Manifest { nnef: Some(nnef.clone()), ..m };
        assert_eq!(with.file(), (nnef.sha256.as_str(), 7, ModelFormat::Nnef));
        let back: Manifest = ciborium::from_reader(crate::signing::to_cbor(&with).as_slice()).unwrap();
        assert_eq!(back, with);
    }

    #[test]
    fn model_files_are_told_apart_by_their_first_bytes() {
        assert_eq!(ModelFormat::sniff(&[0x1f, 0x8b, 8, 0]), ModelFormat::Nnef);
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert_eq!(ModelFormat::sniff(&tar), ModelFormat::Nnef);
        // An ONNX file starts with its protobuf fields (`ir_version` is field 1).
        assert_eq!(ModelFormat::sniff(&[0x08, 0x08, 0x12, 0x04]), ModelFormat::Onnx);
        assert_eq!(ModelFormat::sniff(b""), ModelFormat::Onnx);
    }

    #[test]
    fn the_gap_rule_travels_in_the_manifest_and_the_default_encodes_as_before() {
        let m = manifest();
        let (keys, _) = encoded(&m, "gaps");
        assert!(!keys.iter().any(|k| k == "gaps" || k == "frames"), "{keys:?}");
        assert!(keys.iter().any(|k| k == "threshold"), "{keys:?}");
        // A manifest from before the field decodes with the default rule.
        let old = crate::signing::to_cbor(&m);
        assert_eq!(ciborium::from_reader::<Manifest, _>(old.as_slice()).unwrap().gaps, GapRule::default());
        let held = Manifest { gaps: GapRule { impute: ImputeMethod::Hold, max_gap: 3 }, ..m };
        let (_, gaps) = encoded(&held, "gaps");
        let gaps = gaps.expect("a rule other than the default is encoded").into_map().unwrap();
        assert_eq!(gaps[0].1.as_text(), Some("hold"));
        let back: Manifest = ciborium::from_reader(crate::signing::to_cbor(&held).as_slice()).unwrap();
        assert_eq!(back, held);
    }

    fn report(failure: Option<Failure>) -> UpdateReport {
        UpdateReport {
            seq: 4,
            rollout: Some("r1".into()),
            sha256: "a".repeat(64),
            phase: Phase::Failed,
            reason: "download".into(),
            active_sha256: None,
            shadow_agreement: None,
            anomaly_rate: None,
            baseline_anomaly_rate: None,
            p95_us: None,
            at_ms: 9,
            failure,
            component: Component::Model,
        }
    }

    #[test]
    fn the_failure_kind_is_optional_on_the_wire_and_unknown_kinds_decode_as_other() {
        // A report without a kind encodes as before, and one from an older agent counts as a real failure.
        let old = report(None);
        let bytes = crate::signing::to_cbor(&old);
        let v: ciborium::Value = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert!(!v.as_map().unwrap().iter().any(|(k, _)| k.as_text() == Some("failure")));
        let back: UpdateReport = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert!(back.is_real_failure() && !back.timed_out());
        // A timed-out report is a failure phase that is not a real failure.
        let late = report(Some(Failure::TimedOut));
        let back: UpdateReport = ciborium::from_reader(crate::signing::to_cbor(&late).as_slice()).unwrap();
        assert_eq!(back, late);
        assert!(back.timed_out() && !back.is_real_failure());
        // A kind from a newer agent decodes, and counts as real.
        let mut map = ciborium::from_reader::<ciborium::Value, _>(bytes.as_slice()).unwrap().into_map().unwrap();
        map.push((ciborium::Value::Text("failure".into()), ciborium::Value::Text("cosmic_ray".into())));
        let mut newer = Vec::new();
        ciborium::into_writer(&ciborium::Value::Map(map), &mut newer).unwrap();
        let back: UpdateReport = ciborium::from_reader(newer.as_slice()).unwrap();
        assert_eq!(back.failure, Some(Failure::Other));
        assert!(back.is_real_failure());
        // Applied is never a failure, whatever the kind says.
        assert!(!UpdateReport { phase: Phase::Applied, ..late }.timed_out());
    }
}
