//! The updater's decisions, with no I/O: which desired states to accept, whether downloaded bytes are the
//! signed artifact, whether a model passes its golden vectors, and how the shadow and watch phases judge a
//! candidate window by window. Time comes in as an argument; everything here is tested exhaustively.

use edgeloop_common::features::{FeatureKind, SensorSpec};
use edgeloop_common::gaps::MAX_GAP_LIMIT;
use edgeloop_common::signing::{Signed, TrustedKey, VerifyError};
use edgeloop_common::update::{DesiredState, Golden, Manifest};
use serde::{Deserialize, Serialize};

/// Why a desired state was refused before anything was downloaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejection {
    #[error("desired state: {0}")]
    DesiredSignature(VerifyError),
    #[error("manifest: {0}")]
    ManifestSignature(VerifyError),
    #[error("desired state is for device `{0}`")]
    WrongDevice(String),
    #[error("desired state is for class `{got}`, this device is `{expected}`")]
    WrongClass { expected: String, got: String },
    #[error("sequence {seq} is not above the last accepted {last}")]
    Replayed { seq: u64, last: u64 },
    #[error("desired state expired at {expires_ms} ms (now {now_ms} ms)")]
    Expired { expires_ms: u64, now_ms: u64 },
    #[error("manifest: {0}")]
    BadManifest(ManifestError),
}

/// What is wrong with a verified manifest that this device cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ManifestError {
    #[error("sha256 `{0}` is not 64 hex digits")]
    Sha256NotHex(String),
    #[error("size {size} is outside 1..={max} bytes")]
    Size { size: u64, max: u64 },
    #[error("model scores sensor `{model}`, this device scores `{device}`")]
    WrongSensor { model: String, device: String },
    #[error("a window of {0} feature vectors is outside 1..={MAX_FRAMES}")]
    Frames(u32),
    #[error("input shape {shape:?} does not take {frames} × {width} features")]
    InputShape { shape: Vec<i64>, frames: u32, width: usize },
    #[error("model was trained on features {theirs:?} of sensor `{sensor}`, this device computes {mine:?}")]
    Features { sensor: String, theirs: FeatureKind, mine: FeatureKind },
    #[error("threshold is not finite")]
    ThresholdNotFinite,
    #[error("{0}")]
    ScoreTail(String),
    #[error("gap rule fills up to {0} readings, over {MAX_GAP_LIMIT}")]
    GapRule(usize),
    #[error("no golden vectors to self-test with")]
    NoGolden,
    #[error("the model comes as ONNX only, and this agent build runs NNEF archives (it was built without the `onnx` feature): the control plane converts the models it registers; one registered before conversion existed must be registered again")]
    OnnxOnly,
}

/// A download chunk that would take the file past the signed size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("server sent {total} bytes or more; the manifest signs {signed}")]
pub struct OversizedDownload {
    pub total: u64,
    pub signed: u64,
}

/// Downloaded bytes that are not the signed artifact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact is {got} bytes, the manifest signs {signed}")]
    Size { got: u64, signed: u64 },
    #[error("artifact sha256 {got} does not match the signed {signed}")]
    Sha256 { got: String, signed: String },
}

/// How a model failed its golden vectors.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SelfTestError {
    /// Inference itself failed on golden input `index`.
    #[error("golden[{index}]: {reason}")]
    Inference { index: usize, reason: String },
    #[error("golden[{index}]: {got} outputs, expected {expected}")]
    TooFewOutputs { index: usize, got: usize, expected: usize },
    #[error("golden[{index}] output {output}: got {got}, expected {expected} (tolerance {allowed})")]
    Mismatch { index: usize, output: usize, got: f32, expected: f32, allowed: f32 },
}

impl Rejection {
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::DesiredSignature(e) | Rejection::ManifestSignature(e) => e.reason(),
            Rejection::WrongDevice(_) => "wrong_device",
            Rejection::WrongClass { .. } => "wrong_class",
            Rejection::Replayed { .. } => "replayed",
            Rejection::Expired { .. } => "expired",
            Rejection::BadManifest(_) => "bad_manifest",
        }
    }
}

/// What the device is, for verifying desired states.
#[derive(Debug, Clone)]
pub struct Identity {
    pub device: String,
    pub class: String,
    pub sensor: String,
    /// Width of that sensor's feature vector.
    pub width: usize,
    /// How this device computes that sensor's features; a manifest whose pipeline describes the sensor
    /// otherwise is refused.
    pub features: Option<SensorSpec>,
    pub max_artifact_bytes: u64,
}

/// The longest window of feature vectors a model may ask for.
pub const MAX_FRAMES: u32 = 256;

/// Verifies a desired state and the manifest inside it. `last_seq` is the highest sequence accepted so far.
pub fn verify_desired(
    signed: &Signed,
    trusted: &[TrustedKey],
    me: &Identity,
    last_seq: u64,
    now_ms: u64,
) -> Result<(DesiredState, Manifest), Rejection> {
    verify(signed, trusted, me, last_seq, now_ms, false)
}

/// As [`verify_desired`], for the desired state of an update bundle: it may name
/// [`edgeloop_common::bundle::ANY_DEVICE`] (every device of its class) instead of this device.
pub fn verify_bundle_state(
    signed: &Signed,
    trusted: &[TrustedKey],
    me: &Identity,
    last_seq: u64,
    now_ms: u64,
) -> Result<(DesiredState, Manifest), Rejection> {
    verify(signed, trusted, me, last_seq, now_ms, true)
}

fn verify(
    signed: &Signed,
    trusted: &[TrustedKey],
    me: &Identity,
    last_seq: u64,
    now_ms: u64,
    from_bundle: bool,
) -> Result<(DesiredState, Manifest), Rejection> {
    let desired: DesiredState = signed.verify(trusted, now_ms).map_err(Rejection::DesiredSignature)?;
    let any = from_bundle && desired.device == edgeloop_common::bundle::ANY_DEVICE;
    if desired.device != me.device && !any {
        return Err(Rejection::WrongDevice(desired.device));
    }
    if desired.class != me.class {
        return Err(Rejection::WrongClass { expected: me.class.clone(), got: desired.class });
    }
    if desired.seq <= last_seq {
        return Err(Rejection::Replayed { seq: desired.seq, last: last_seq });
    }
    if now_ms > desired.expires_ms {
        return Err(Rejection::Expired { expires_ms: desired.expires_ms, now_ms });
    }
    let manifest: Manifest = desired.manifest.verify(trusted, now_ms).map_err(Rejection::ManifestSignature)?;
    if manifest.class != me.class {
        return Err(Rejection::WrongClass { expected: me.class.clone(), got: manifest.class });
    }
    check_manifest(&manifest, me).map_err(Rejection::BadManifest)?;
    Ok((desired, manifest))
}

/// What a report of a refused desired state may say about the state: only what was signed by a trusted key
/// for this device. Whoever made a state that does not verify chose every field of it, and a state for another
/// device says nothing about this one: both give nothing. A verified state for this device gives its sequence
/// and rollout and its model's sha256 (the manifest is inside what the signature covers).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RefusedState {
    pub seq: u64,
    pub rollout: Option<String>,
    pub sha256: String,
}

/// The [`RefusedState`] of a desired state that [`verify_desired`] refused.
pub fn refused_state(signed: &Signed, trusted: &[TrustedKey], me: &Identity, now_ms: u64) -> RefusedState {
    refused(signed, trusted, me, now_ms, false)
}

/// The [`RefusedState`] of a bundle's desired state that [`verify_bundle_state`] refused.
pub fn refused_bundle_state(signed: &Signed, trusted: &[TrustedKey], me: &Identity, now_ms: u64) -> RefusedState {
    refused(signed, trusted, me, now_ms, true)
}

fn refused(signed: &Signed, trusted: &[TrustedKey], me: &Identity, now_ms: u64, from_bundle: bool) -> RefusedState {
    let Ok(desired) = signed.verify::<DesiredState>(trusted, now_ms) else { return RefusedState::default() };
    let any = from_bundle && desired.device == edgeloop_common::bundle::ANY_DEVICE;
    if desired.device != me.device && !any {
        return RefusedState::default();
    }
    let sha256 =
        ciborium::from_reader::<Manifest, _>(&desired.manifest.payload[..]).map(|m| m.sha256).unwrap_or_default();
    RefusedState { seq: desired.seq, rollout: desired.rollout, sha256 }
}

impl Rejection {
    /// The reason a report gives: the code, and the details only where they come from a verified state (the
    /// details of a failed signature check name a key id the sender chose).
    pub fn report_reason(&self) -> String {
        match self {
            Rejection::DesiredSignature(e) => {
                format!("{}: the desired state does not verify against a trusted key", e.reason())
            }
            r => format!("{}: {r}", r.reason()),
        }
    }
}

fn check_manifest(m: &Manifest, me: &Identity) -> Result<(), ManifestError> {
    let nnef = m.nnef.as_ref().map(|a| (&a.sha256, a.size));
    for (sha256, size) in std::iter::once((&m.sha256, m.size)).chain(nnef) {
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ManifestError::Sha256NotHex(sha256.clone()));
        }
        if size == 0 || size > me.max_artifact_bytes {
            return Err(ManifestError::Size { size, max: me.max_artifact_bytes });
        }
    }
    if m.nnef.is_none() && !cfg!(feature = "onnx") {
        return Err(ManifestError::OnnxOnly);
    }
    if m.sensor != me.sensor {
        return Err(ManifestError::WrongSensor { model: m.sensor.clone(), device: me.sensor.clone() });
    }
    if !(1..=MAX_FRAMES).contains(&m.frames) {
        return Err(ManifestError::Frames(m.frames));
    }
    if m.input_width() != Some(me.width * m.frames as usize) {
        return Err(ManifestError::InputShape { shape: m.input_shape.clone(), frames: m.frames, width: me.width });
    }
    let trained_on = m.pipeline.sensors.iter().find(|s| s.name == m.sensor);
    if let (Some(theirs), Some(mine)) = (trained_on, &me.features) {
        if theirs != mine {
            return Err(ManifestError::Features {
                sensor: m.sensor.clone(),
                theirs: theirs.features,
                mine: mine.features,
            });
        }
    }
    if !m.threshold.is_finite() {
        return Err(ManifestError::ThresholdNotFinite);
    }
    if let Some(tail) = &m.score_tail {
        tail.validate().map_err(ManifestError::ScoreTail)?;
    }
    if m.gaps.max_gap > MAX_GAP_LIMIT {
        return Err(ManifestError::GapRule(m.gaps.max_gap));
    }
    if m.golden.is_empty() {
        return Err(ManifestError::NoGolden);
    }
    Ok(())
}

/// Guards a download: never more bytes than the signed size.
pub fn accept_chunk(have: u64, chunk: usize, signed_size: u64) -> Result<(), OversizedDownload> {
    let total = have + chunk as u64;
    if total > signed_size {
        return Err(OversizedDownload { total, signed: signed_size });
    }
    Ok(())
}

/// Checks downloaded bytes against the size and SHA-256 the manifest signs for the file a device runs
/// ([`Manifest::file`]: the NNEF archive where it names one).
pub fn check_artifact(bytes: &[u8], m: &Manifest) -> Result<(), ArtifactError> {
    let (sha256, size, _) = m.file();
    if bytes.len() as u64 != size {
        return Err(ArtifactError::Size { got: bytes.len() as u64, signed: size });
    }
    let got = edgeloop_common::signing::sha256_hex(bytes);
    if !got.eq_ignore_ascii_case(sha256) {
        return Err(ArtifactError::Sha256 { got, signed: sha256.to_string() });
    }
    Ok(())
}

/// Compares a model's outputs on the golden inputs with the expected outputs (`outputs[i]`: the model's
/// outputs on golden input `i`, or why inference failed).
pub fn self_test(golden: &[Golden], outputs: &[Result<Vec<f32>, String>], tolerance: f32) -> Result<(), SelfTestError> {
    for (i, (g, out)) in golden.iter().zip(outputs).enumerate() {
        let out = out.as_ref().map_err(|e| SelfTestError::Inference { index: i, reason: e.clone() })?;
        if out.len() < g.output.len() {
            return Err(SelfTestError::TooFewOutputs { index: i, got: out.len(), expected: g.output.len() });
        }
        for (j, (&want, &got)) in g.output.iter().zip(out).enumerate() {
            let allowed = tolerance * want.abs().max(1.0);
            if !got.is_finite() || (got - want).abs() > allowed {
                return Err(SelfTestError::Mismatch { index: i, output: j, got, expected: want, allowed });
            }
        }
    }
    Ok(())
}

/// What one window of the candidate gave, while shadowed or watched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WindowOutcome {
    /// A finite score, whether it crossed the threshold, and how long inference took.
    Scored { flagged: bool, latency_us: u32 },
    /// The model produced NaN or infinity.
    NonFinite,
}

/// Counts shadow windows and how often the candidate agreed with the active model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowTracker {
    pub target: u32,
    pub seen: u32,
    pub agreed: u32,
}

impl ShadowTracker {
    pub fn new(target: u32) -> Self {
        ShadowTracker { target, ..Default::default() }
    }
    /// `active_flag`: the active model's decision (none if it gave no score); returns true when done.
    pub fn observe(&mut self, active_flag: Option<bool>, candidate: WindowOutcome) -> bool {
        self.seen += 1;
        if let (Some(a), WindowOutcome::Scored { flagged, .. }) = (active_flag, candidate) {
            if a == flagged {
                self.agreed += 1;
            }
        }
        self.seen >= self.target
    }
    pub fn agreement(&self) -> f32 {
        if self.seen == 0 {
            return 1.0;
        }
        self.agreed as f32 / self.seen as f32
    }
}

/// The watch's verdict after a window.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Continue,
    Passed,
    Revert(String),
}

/// Watches a newly activated model: a non-finite output, or latency over budget (in more than a tenth of the
/// windows, so one scheduling hiccup does not revert), reverts it; `target` clean windows pass it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WatchTracker {
    pub target: u32,
    pub budget_us: u32,
    pub seen: u32,
    pub flagged: u32,
    pub over_budget: u32,
    latencies: Vec<u32>,
}

impl WatchTracker {
    pub fn new(target: u32, budget_us: u32) -> Self {
        WatchTracker { target: target.max(1), budget_us, ..Default::default() }
    }

    pub fn observe(&mut self, w: WindowOutcome) -> Verdict {
        self.seen += 1;
        match w {
            WindowOutcome::NonFinite => {
                return Verdict::Revert(format!("non-finite output in watched window {}", self.seen));
            }
            WindowOutcome::Scored { flagged, latency_us } => {
                self.flagged += u32::from(flagged);
                self.latencies.push(latency_us);
                if self.budget_us > 0 && latency_us > self.budget_us {
                    self.over_budget += 1;
                }
            }
        }
        if self.budget_us > 0 && self.over_budget * 10 > self.target.max(10) {
            return Verdict::Revert(format!(
                "inference over the {} us budget in {} of {} windows",
                self.budget_us, self.over_budget, self.seen
            ));
        }
        if self.seen >= self.target {
            Verdict::Passed
        } else {
            Verdict::Continue
        }
    }

    pub fn anomaly_rate(&self) -> f32 {
        if self.seen == 0 {
            0.0
        } else {
            self.flagged as f32 / self.seen as f32
        }
    }

    pub fn p95_us(&self) -> Option<u32> {
        let mut l = self.latencies.clone();
        if l.is_empty() {
            return None;
        }
        l.sort_unstable();
        Some(l[((l.len() - 1) * 95) / 100])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_common::features::{FeatureKind, PipelineSpec};
    use edgeloop_common::signing::{to_cbor, Signer};
    use edgeloop_common::update::{ArtifactRef, ManifestLineage, UpdatePolicy};

    const NOW: u64 = 1_000_000;

    fn me() -> Identity {
        Identity {
            device: "d1".into(),
            class: "press".into(),
            sensor: "temp".into(),
            width: 4,
            features: Some(temp_features(4)),
            max_artifact_bytes: 1 << 20,
        }
    }

    /// The sensor's features as some device computes them (the check compares specs, not widths).
    fn temp_features(rolling: usize) -> SensorSpec {
        SensorSpec { name: "temp".into(), channels: 1, features: FeatureKind::Slow { rolling, season: 0 } }
    }

    fn manifest(bytes: &[u8]) -> Manifest {
        Manifest {
            name: "press".into(),
            version: 2,
            class: "press".into(),
            sensor: "temp".into(),
            sha256: edgeloop_common::signing::sha256_hex(b"the ONNX file"),
            size: 13,
            nnef: Some(ArtifactRef { sha256: edgeloop_common::signing::sha256_hex(bytes), size: bytes.len() as u64 }),
            input_shape: vec![-1, 4],
            output_shape: vec![-1, 1],
            pipeline: PipelineSpec { version: 1, sensors: vec![] },
            threshold: 1.0,
            golden: vec![Golden { input: vec![1.0; 4], output: vec![1.0] }],
            golden_tolerance: 1e-4,
            lineage: ManifestLineage::default(),
            created_ms: 0,
            frames: 1,
            gaps: Default::default(),
            score_tail: None,
        }
    }

    fn desired(signer: &Signer, m: &Manifest, seq: u64) -> DesiredState {
        DesiredState {
            device: "d1".into(),
            class: "press".into(),
            seq,
            issued_ms: NOW,
            expires_ms: NOW + 60_000,
            rollout: Some("r1".into()),
            manifest: Signed::sign(m, signer),
            artifact: format!("/api/v1/artifacts/{}", m.sha256),
            policy: UpdatePolicy::default(),
            nnef_artifact: m.nnef.as_ref().map(|a| format!("/api/v1/artifacts/{}", a.sha256)),
        }
    }

    fn signer() -> Signer {
        Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap()
    }

    #[test]
    fn a_good_desired_state_is_accepted() {
        let s = signer();
        let m = manifest(b"onnx");
        let signed = Signed::sign(&desired(&s, &m, 5), &s);
        let (d, got) = verify_desired(&signed, &[s.trusted(None)], &me(), 4, NOW).unwrap();
        assert_eq!((d.seq, got), (5, m));
    }

    #[test]
    fn unknown_key_rejected() {
        let (s, stranger) = (signer(), signer());
        let m = manifest(b"onnx");
        let signed = Signed::sign(&desired(&stranger, &m, 5), &stranger);
        let r = verify_desired(&signed, &[s.trusted(None)], &me(), 0, NOW).unwrap_err();
        assert_eq!(r.reason(), "unknown_key");
        // A desired state signed by a trusted key but carrying a manifest signed by a stranger fails too.
        let signed = Signed::sign(&desired(&stranger, &m, 5), &s);
        let r = verify_desired(&signed, &[s.trusted(None)], &me(), 0, NOW).unwrap_err();
        assert!(matches!(r, Rejection::ManifestSignature(VerifyError::UnknownKey(_))), "{r:?}");
    }

    #[test]
    fn unsigned_rejected() {
        let s = signer();
        let d = desired(&s, &manifest(b"onnx"), 5);
        let unsigned = Signed { payload: to_cbor(&d), key_id: String::new(), sig: Vec::new() };
        let r = verify_desired(&unsigned, &[s.trusted(None)], &me(), 0, NOW).unwrap_err();
        assert_eq!(r, Rejection::DesiredSignature(VerifyError::Unsigned));
        // Signed, but the payload was changed afterwards (a seq bumped by hand, say).
        let mut signed = Signed::sign(&d, &s);
        let mut bumped = d.clone();
        bumped.seq = 99;
        signed.payload = to_cbor(&bumped);
        let r = verify_desired(&signed, &[s.trusted(None)], &me(), 0, NOW).unwrap_err();
        assert_eq!(r.reason(), "bad_signature");
    }

    #[test]
    fn rollback_replayed_desired_state_rejected() {
        let s = signer();
        let m = manifest(b"onnx");
        for seq in [3, 4] {
            let signed = Signed::sign(&desired(&s, &m, seq), &s);
            let r = verify_desired(&signed, &[s.trusted(None)], &me(), 4, NOW).unwrap_err();
            assert_eq!(r, Rejection::Replayed { seq, last: 4 });
        }
    }

    #[test]
    fn freeze_expired_manifest_rejected() {
        let s = signer();
        let d = desired(&s, &manifest(b"onnx"), 5);
        let signed = Signed::sign(&d, &s);
        let later = d.expires_ms + 1;
        let r = verify_desired(&signed, &[s.trusted(None)], &me(), 0, later).unwrap_err();
        assert_eq!(r, Rejection::Expired { expires_ms: d.expires_ms, now_ms: later });
    }

    #[test]
    fn mix_and_match_wrong_device_class_rejected() {
        let s = signer();
        let mut m = manifest(b"onnx");
        // A desired state for the right class carrying another class's (validly signed) manifest.
        m.class = "city-traffic".into();
        let signed = Signed::sign(&desired(&s, &m, 5), &s);
        let r = verify_desired(&signed, &[s.trusted(None)], &me(), 0, NOW).unwrap_err();
        assert_eq!(r.reason(), "wrong_class");
        // A desired state addressed to another class, or another device.
        let mut d = desired(&s, &manifest(b"onnx"), 5);
        d.class = "city-traffic".into();
        let r = verify_desired(&Signed::sign(&d, &s), &[s.trusted(None)], &me(), 0, NOW).unwrap_err();
        assert_eq!(r.reason(), "wrong_class");
        let mut d = desired(&s, &manifest(b"onnx"), 5);
        d.device = "d2".into();
        let r = verify_desired(&Signed::sign(&d, &s), &[s.trusted(None)], &me(), 0, NOW).unwrap_err();
        assert_eq!(r, Rejection::WrongDevice("d2".into()));
    }

    #[test]
    fn manifests_that_cannot_run_here_are_rejected() {
        let s = signer();
        type Breaker = fn(&mut Manifest);
        let cases: Vec<(Breaker, &str)> = vec![
            (|m| m.sha256 = "xyz".into(), "sha256"),
            (|m| m.size = 2 << 20, "size"),
            (|m| m.nnef.as_mut().unwrap().sha256 = "xyz".into(), "sha256"),
            (|m| m.nnef.as_mut().unwrap().size = 0, "size"),
            (|m| m.sensor = "vibration".into(), "sensor"),
            (|m| m.input_shape = vec![-1, 5], "input shape"),
            (|m| m.golden.clear(), "golden"),
            (|m| m.threshold = f32::NAN, "threshold"),
            (
                |m| {
                    m.score_tail = Some(edgeloop_common::score_tail::TailFit {
                        peak_threshold: 1.0,
                        shape: 0.1,
                        scale: -2.0,
                        peak_share: 0.02,
                    })
                },
                "score_tail",
            ),
            (|m| m.gaps.max_gap = 1_000_000, "gap rule"),
            // Trained on a rolling window of 8 where this device computes one of 4.
            (|m| m.pipeline.sensors = vec![temp_features(8)], "trained on features"),
        ];
        for (break_it, word) in cases {
            let mut m = manifest(b"onnx");
            break_it(&mut m);
            let signed = Signed::sign(&desired(&s, &m, 5), &s);
            let r = verify_desired(&signed, &[s.trusted(None)], &me(), 0, NOW).unwrap_err();
            assert!(r.to_string().contains(word), "{r} lacks {word}");
        }
        // A pipeline that describes the sensor as this device computes it, or does not describe it, is fine.
        for sensors in [vec![temp_features(4)], vec![], vec![SensorSpec { name: "other".into(), ..temp_features(8) }]] {
            let mut m = manifest(b"onnx");
            m.pipeline.sensors = sensors;
            let signed = Signed::sign(&desired(&s, &m, 5), &s);
            assert!(verify_desired(&signed, &[s.trusted(None)], &me(), 0, NOW).is_ok());
        }
        // The highest gap limit is fine.
        let mut m = manifest(b"onnx");
        m.gaps.max_gap = MAX_GAP_LIMIT;
        let signed = Signed::sign(&desired(&s, &m, 5), &s);
        assert!(verify_desired(&signed, &[s.trusted(None)], &me(), 0, NOW).is_ok());
        // A model with its ONNX file only runs on a build that loads ONNX, and a build without says why.
        let mut m = manifest(b"onnx");
        m.nnef = None;
        let signed = Signed::sign(&desired(&s, &m, 5), &s);
        let verdict = verify_desired(&signed, &[s.trusted(None)], &me(), 0, NOW);
        if cfg!(feature = "onnx") {
            assert!(verdict.is_ok(), "{verdict:?}");
        } else {
            let r = verdict.unwrap_err();
            assert!(r.to_string().contains("ONNX only") && r.to_string().contains("`onnx`"), "{r}");
        }
    }

    #[test]
    fn arbitrary_software_tampered_artifact_rejected() {
        let m = manifest(b"the signed model");
        assert!(check_artifact(b"the signed model", &m).is_ok());
        let e = check_artifact(b"the signed modeL", &m).unwrap_err().to_string();
        assert!(e.contains("does not match the signed"), "{e}");
        let e = check_artifact(b"short", &m).unwrap_err().to_string();
        assert!(e.contains("bytes"), "{e}");
    }

    #[test]
    fn endless_data_oversize_artifact_aborted() {
        assert!(accept_chunk(0, 10, 10).is_ok());
        assert!(accept_chunk(5, 5, 10).is_ok());
        assert_eq!(accept_chunk(8, 3, 10), Err(OversizedDownload { total: 11, signed: 10 }));
        let e = accept_chunk(8, 3, 10).unwrap_err().to_string();
        assert!(e.contains("11 bytes"), "{e}");
    }

    #[test]
    fn self_test_compares_within_tolerance() {
        let g = vec![Golden { input: vec![0.0], output: vec![2.0, 100.0] }];
        assert!(self_test(&g, &[Ok(vec![2.00001, 100.001])], 1e-4).is_ok());
        assert!(self_test(&g, &[Ok(vec![2.1, 100.0])], 1e-4).unwrap_err().to_string().contains("output 0"));
        assert!(self_test(&g, &[Ok(vec![2.0, f32::NAN])], 1e-4).is_err());
        assert!(self_test(&g, &[Ok(vec![2.0])], 1e-4).unwrap_err().to_string().contains("1 outputs"));
        assert!(self_test(&g, &[Err("boom".into())], 1e-4).unwrap_err().to_string().contains("boom"));
    }

    #[test]
    fn shadow_counts_agreement() {
        let mut t = ShadowTracker::new(4);
        let s = |flagged| WindowOutcome::Scored { flagged, latency_us: 1 };
        assert!(!t.observe(Some(true), s(true)));
        assert!(!t.observe(Some(false), s(true)));
        assert!(!t.observe(Some(false), WindowOutcome::NonFinite));
        assert!(t.observe(Some(false), s(false)));
        assert_eq!(t.agreement(), 0.5);
    }

    #[test]
    fn watch_passes_clean_windows_and_reverts_on_nan_or_slowness() {
        let ok = WindowOutcome::Scored { flagged: false, latency_us: 10 };
        let mut w = WatchTracker::new(3, 100);
        assert_eq!(w.observe(ok), Verdict::Continue);
        assert_eq!(w.observe(WindowOutcome::Scored { flagged: true, latency_us: 10 }), Verdict::Continue);
        assert_eq!(w.observe(ok), Verdict::Passed);
        assert!((w.anomaly_rate() - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(w.p95_us(), Some(10));

        let mut w = WatchTracker::new(3, 100);
        assert_eq!(w.observe(ok), Verdict::Continue);
        assert!(matches!(w.observe(WindowOutcome::NonFinite), Verdict::Revert(r) if r.contains("non-finite")));

        let mut w = WatchTracker::new(20, 100);
        let slow = WindowOutcome::Scored { flagged: false, latency_us: 500 };
        assert_eq!(w.observe(slow), Verdict::Continue, "one slow window is tolerated");
        assert_eq!(w.observe(slow), Verdict::Continue);
        assert!(matches!(w.observe(slow), Verdict::Revert(r) if r.contains("budget")));
    }
}
