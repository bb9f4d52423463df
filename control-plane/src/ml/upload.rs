//! Models operators bring: an ONNX file with golden vectors, checked and registered as the next version of
//! its model line. It reaches devices only through a rollout, signed like a trained model.

use crate::ml::models::{
    Lineage, Metrics, ModelError, ModelKind, ModelRegistry, ModelVersion, Promotion, GOLDEN_TOLERANCE,
};
use crate::ml::onnx_ml::{self, RewriteError, ScoreSpec};
use base64::Engine as _;
use edgeloop_common::config::ClassConfig;
use edgeloop_common::features::PipelineSpec;
use edgeloop_common::update::Golden;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Why an upload was refused, or could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// A field of the upload is wrong; `field` names it (`golden[2].output[0]`), `reason` says how.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("storing the artifact: {0}")]
    Artifact(#[from] std::io::Error),
    #[error(transparent)]
    Store(#[from] ModelError),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> UploadError {
    UploadError::Invalid { field: field.into(), reason: reason.into() }
}

/// What an upload says about its model: the `metadata` part of a multipart upload, or the JSON form's fields
/// but `onnx_base64`.
#[derive(utoipa::ToSchema, Deserialize, Serialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct UploadMeta {
    /// Model line; versions number up from 1 per name.
    pub name: String,
    pub class: String,
    /// The sensor whose feature vectors it scores; default: the class's first sensor.
    #[serde(default)]
    pub sensor: Option<String>,
    pub threshold: f32,
    /// Inputs with the outputs the model must give (at least one).
    pub golden: Vec<Golden>,
    #[serde(default)]
    pub description: String,
    /// Which output is the score, its column, and whether to negate it; the golden vectors' outputs are that
    /// output's values as the uploaded model gives them.
    #[serde(default)]
    pub score: ScoreSpec,
}

/// An upload: what it says, and the ONNX file.
#[derive(Debug)]
pub struct Upload {
    pub meta: UploadMeta,
    pub onnx: Vec<u8>,
}

/// Largest ONNX file an upload may carry.
pub const MAX_ONNX_BYTES: usize = 64 << 20;

impl Upload {
    /// The JSON form: the metadata's fields and `onnx_base64`, the file in base64.
    pub fn from_json(mut v: serde_json::Value) -> Result<Upload, UploadError> {
        let obj = v.as_object_mut().ok_or_else(|| invalid("body", "must be a JSON object"))?;
        let b64 = match obj.remove("onnx_base64") {
            Some(serde_json::Value::String(s)) => s,
            Some(_) => return Err(invalid("onnx_base64", "must be a string (the ONNX file in base64)")),
            None => {
                return Err(invalid(
                    "onnx_base64",
                    "missing (or send the file as the `model` part of a multipart/form-data upload)",
                ))
            }
        };
        let onnx = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| invalid("onnx_base64", format!("not base64: {e}")))?;
        Ok(Upload { meta: UploadMeta::from_value(v)?, onnx })
    }
}

impl UploadMeta {
    /// Reads the metadata, naming the field that is wrong.
    pub fn from_value(v: serde_json::Value) -> Result<UploadMeta, UploadError> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            invalid(if path == "." { "metadata".to_string() } else { path }, e.into_inner().to_string())
        })
    }
}

/// Golden vectors an uploaded model may carry: they travel inside every desired state, which must stay well
/// under the agent's 256 KiB message limit.
const MAX_GOLDEN: usize = 16;
/// Largest encoded golden vectors an upload may carry.
const MAX_GOLDEN_BYTES: usize = 128 * 1024;

/// Relative tolerance for uploaded models' golden vectors.
const UPLOAD_TOLERANCE: f32 = 1e-3;

/// Checks an operator's model and registers it as the next version of its line: the name, the threshold,
/// the ONNX file (base64), the golden vectors (run through tract, within a relative 1e-3), and the sensor
/// against the class's firmware config when the class is configured here. Blocking (it runs tract).
pub fn register(
    models: &ModelRegistry,
    classes: &BTreeMap<String, ClassConfig>,
    Upload { meta: u, onnx }: Upload,
) -> Result<ModelVersion, UploadError> {
    check_name_and_threshold(&u)?;
    if onnx.is_empty() || onnx.len() > MAX_ONNX_BYTES {
        return Err(invalid(
            "onnx",
            format!("{} bytes; an ONNX file of 1 to {MAX_ONNX_BYTES} bytes is needed", onnx.len()),
        ));
    }
    let width = golden_width(&u.golden)?;
    let (sensor, pipeline) = sensor_and_pipeline(classes, &u, width)?;
    let served = onnx_ml::prepare(&onnx, &u.score).map_err(|e| match e {
        RewriteError::Score(reason) => invalid("score.output", reason),
        other => invalid("onnx", other.to_string()),
    })?;
    let golden = served_golden(&u.golden, &u.score)?;
    let out_len = check_golden(&served.onnx, &golden, width)?;
    let sha256 = models.put_artifact(&served.onnx)?;
    let nnef = crate::ml::nnef::derive(models, &u.name, &served.onnx, width, &golden, GOLDEN_TOLERANCE)?;
    let version = models.next_version(&u.name)?;
    let m = ModelVersion {
        name: u.name.clone(),
        version,
        class: u.class.clone(),
        sensor,
        kind: ModelKind::Uploaded,
        sha256,
        size: served.onnx.len() as u64,
        nnef,
        input_shape: vec![-1, width as i64],
        output_shape: vec![-1, out_len as i64],
        gaps: Default::default(),
        score_tail: None,
        pipeline,
        threshold: u.threshold,
        golden,
        lineage: lineage(&u.description, &served.summary(&u.score)),
        created_ms: edgeloop_common::unix_millis(),
        promotion: Promotion {
            promoted: false,
            metric: String::new(),
            candidate: 0.0,
            production: None,
            production_version: None,
            reason: "uploaded by an operator; it reaches devices through a rollout".into(),
            margin: None,
        },
        frames: 1,
    };
    models.insert(&m)?;
    Ok(m)
}

fn check_name_and_threshold(u: &UploadMeta) -> Result<(), UploadError> {
    if u.name.is_empty()
        || u.name.len() > 64
        || !u.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(invalid(
            "name",
            format!("`{}` must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.'", u.name),
        ));
    }
    if !u.threshold.is_finite() {
        return Err(invalid("threshold", "must be a finite number"));
    }
    Ok(())
}

/// The input width the golden vectors give: at least one vector, at most [`MAX_GOLDEN`], not empty, and
/// at most [`MAX_GOLDEN_BYTES`] encoded (they travel inside every desired state).
fn golden_width(golden: &[Golden]) -> Result<usize, UploadError> {
    if golden.len() > MAX_GOLDEN {
        return Err(invalid("golden", format!("{} vectors, at most {MAX_GOLDEN}", golden.len())));
    }
    let Some(first) = golden.first() else {
        return Err(invalid("golden", "at least one golden vector is needed"));
    };
    if first.input.is_empty() {
        return Err(invalid("golden[0].input", "must not be empty"));
    }
    let golden_bytes = edgeloop_common::signing::to_cbor(&golden).len();
    if golden_bytes > MAX_GOLDEN_BYTES {
        return Err(invalid(
            "golden",
            format!("{golden_bytes} bytes encoded, over {MAX_GOLDEN_BYTES}; send fewer or shorter golden vectors"),
        ));
    }
    Ok(first.input.len())
}

/// The sensor the model scores and the feature pipeline of its class: checked against the class's
/// firmware config when the class is configured here, else as the uploader names it.
fn sensor_and_pipeline(
    classes: &BTreeMap<String, ClassConfig>,
    u: &UploadMeta,
    width: usize,
) -> Result<(String, PipelineSpec), UploadError> {
    let Some(class) = classes.get(&u.class) else {
        let sensor = u.sensor.clone().ok_or_else(|| {
            invalid("sensor", format!("class `{}` is not configured here, so name the sensor", u.class))
        })?;
        return Ok((sensor, PipelineSpec { version: 1, sensors: vec![] }));
    };
    let sensor = u.sensor.clone().unwrap_or_else(|| class.sensors[0].name.clone());
    let spec = class
        .sensors
        .iter()
        .find(|x| x.name == sensor)
        .map(ClassConfig::sensor_spec)
        .ok_or_else(|| invalid("sensor", format!("class `{}` has no sensor `{sensor}`", u.class)))?;
    if spec.width() != width {
        return Err(invalid(
            "golden[0].input",
            format!("{width} values, but sensor `{sensor}` of class `{}` gives {} features", u.class, spec.width()),
        ));
    }
    Ok((sensor, class.pipeline()))
}

/// Runs every golden input through tract and compares with its outputs (relative [`UPLOAD_TOLERANCE`]);
/// returns the model's output width.
fn check_golden(onnx: &[u8], golden: &[Golden], width: usize) -> Result<usize, UploadError> {
    let mut out_len = 0;
    for (i, g) in golden.iter().enumerate() {
        if g.input.len() != width {
            return Err(invalid(format!("golden[{i}].input"), format!("{} values, expected {width}", g.input.len())));
        }
        let got = crate::ml::training::onnx::run_tract(onnx, std::slice::from_ref(&g.input))
            .map_err(|e| invalid("onnx", format!("tract cannot run it: {e}")))?;
        if got.len() < g.output.len() || g.output.is_empty() {
            return Err(invalid(
                format!("golden[{i}].output"),
                format!("the model gives {} values, the golden vector lists {}", got.len(), g.output.len()),
            ));
        }
        for (j, (&want, &have)) in g.output.iter().zip(&got).enumerate() {
            if !have.is_finite() || (have - want).abs() > UPLOAD_TOLERANCE * want.abs().max(1.0) {
                return Err(invalid(
                    format!("golden[{i}].output[{j}]"),
                    format!("the model gives {have}, expected {want}"),
                ));
            }
        }
        out_len = got.len();
    }
    Ok(out_len)
}

/// The golden vectors of the served model: the score's column of each, negated when the score is.
fn served_golden(golden: &[Golden], score: &ScoreSpec) -> Result<Vec<Golden>, UploadError> {
    golden
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let mut output = match score.index {
                None => g.output.clone(),
                Some(k) => vec![*g.output.get(k).ok_or_else(|| {
                    invalid(
                        format!("golden[{i}].output"),
                        format!("{} values, but the score is column {k} (`score.index`)", g.output.len()),
                    )
                })?],
            };
            if score.negate {
                output.iter_mut().for_each(|v| *v = -*v);
            }
            Ok(Golden { input: g.input.clone(), output })
        })
        .collect()
}

fn lineage(description: &str, served: &str) -> Lineage {
    Lineage {
        dataset_hash: String::new(),
        dataset_report: Default::default(),
        hyper: Default::default(),
        trials: Vec::new(),
        seed: 0,
        metrics: Metrics::default(),
        threshold_source: "given by the uploader".into(),
        code_version: format!("uploaded: {description} ({served})"),
        reference: Default::default(),
        selection: "uploaded by an operator".into(),
    }
}
