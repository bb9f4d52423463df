//! API of signed updates: rollouts and their actions, device tags, the audit log, model upload and the
//! signing key's public half.

use crate::ml::models::{Lineage, Metrics, ModelVersion, Promotion};
use crate::rollout::engine::Action;
use crate::rollout::service::RolloutError;
use crate::rollout::view::{view, RolloutView};
use crate::rollout::CreateRollout;
use crate::web::error::{json, ApiError};
use crate::web::AppState;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine as _;
use edgeloop_common::config::ClassConfig;
use edgeloop_common::update::Golden;
use serde::{Deserialize, Serialize};

impl From<RolloutError> for ApiError {
    fn from(e: RolloutError) -> Self {
        match e {
            RolloutError::BadRequest(d) => ApiError::bad_request(d),
            RolloutError::NotFound(d) => ApiError::not_found(d),
            RolloutError::Conflict(d) => ApiError { status: StatusCode::CONFLICT, error: "conflict", detail: d },
            RolloutError::Store(e) => ApiError::internal(e),
        }
    }
}

pub async fn create(
    State(s): State<AppState>,
    body: Result<Json<CreateRollout>, JsonRejection>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let req = json(body)?;
    let r = s.rollouts.clone();
    let created = tokio::task::spawn_blocking(move || r.create(req, edgeloop_common::unix_millis()))
        .await
        .map_err(ApiError::internal)??;
    Ok((StatusCode::CREATED, Json(view(created))))
}

pub async fn list(State(s): State<AppState>) -> Json<Vec<RolloutView>> {
    Json(s.rollouts.list().into_iter().map(view).collect())
}

pub async fn get(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<RolloutView>, ApiError> {
    s.rollouts.get(&id).map(|r| Json(view(r))).ok_or_else(|| ApiError::not_found(format!("no rollout `{id}`")))
}

pub async fn act(
    State(s): State<AppState>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<RolloutView>, ApiError> {
    let action = match action.as_str() {
        "pause" => Action::Pause,
        "resume" => Action::Resume,
        "abort" => Action::Abort,
        "approve" => Action::Approve,
        other => return Err(ApiError::not_found(format!("no action `{other}`; use pause, resume, abort or approve"))),
    };
    let r = s.rollouts.clone();
    let out = tokio::task::spawn_blocking(move || r.act(&id, action, edgeloop_common::unix_millis()))
        .await
        .map_err(ApiError::internal)??;
    Ok(Json(view(out)))
}

#[derive(Deserialize, Serialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    pub tags: Vec<String>,
}

pub async fn set_tags(
    State(s): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<Tags>, JsonRejection>,
) -> Result<Json<Tags>, ApiError> {
    let Tags { tags } = json(body)?;
    edgeloop_common::topics::validate_device_id(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let r = s.rollouts.clone();
    let dev = id.clone();
    tokio::task::spawn_blocking(move || r.set_tags(&dev, tags)).await.map_err(ApiError::internal)??;
    Ok(Json(Tags { tags: s.rollouts.tags(&id) }))
}

/// Largest `limit` the audit log's list takes (entries are at most a few KiB each, so a page stays small).
pub const MAX_AUDIT_LIMIT: usize = 1_000;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    pub limit: Option<usize>,
}

pub async fn audit(
    State(s): State<AppState>,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> Result<Json<Vec<crate::access::audit::AuditEntry>>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = p.limit.unwrap_or(200);
    if limit == 0 || limit > MAX_AUDIT_LIMIT {
        return Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_AUDIT_LIMIT}, got {limit}")));
    }
    let a = s.audit.clone();
    let entries = tokio::task::spawn_blocking(move || a.recent(limit))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    Ok(Json(entries))
}

#[derive(Serialize, Deserialize, Debug)]
pub struct SigningKey {
    pub key_id: String,
    pub public_key: String,
}

pub async fn signing_key(State(s): State<AppState>) -> Json<SigningKey> {
    Json(SigningKey { key_id: s.rollouts.key_id().to_string(), public_key: s.rollouts.public_key_hex() })
}

/// `POST /api/v1/models`: an ONNX file from elsewhere (PyTorch, scikit-learn) with what devices need to run it.
#[derive(Deserialize, Serialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Upload {
    /// Model line; versions number up from 1 per name.
    pub name: String,
    pub class: String,
    /// The sensor whose feature vectors it scores; default: the class's first sensor.
    #[serde(default)]
    pub sensor: Option<String>,
    pub threshold: f32,
    /// Inputs with the outputs the model must give (at least one).
    pub golden: Vec<Golden>,
    /// The ONNX file, base64.
    pub onnx_base64: String,
    #[serde(default)]
    pub description: String,
}

/// Largest `POST /api/v1/models` body: a 64 MiB model in base64, plus its golden vectors. Every other route
/// keeps axum's 2 MiB default.
pub const MAX_UPLOAD_BYTES: usize = 96 << 20;

/// Golden vectors an uploaded model may carry: they travel inside every desired state, which must stay well
/// under the agent's 256 KiB message limit.
const MAX_GOLDEN: usize = 16;
/// Largest encoded golden vectors an upload may carry.
const MAX_GOLDEN_BYTES: usize = 128 * 1024;

/// Relative tolerance for uploaded models' golden vectors.
const UPLOAD_TOLERANCE: f32 = 1e-3;

pub async fn upload(
    State(s): State<AppState>,
    body: Result<Json<Upload>, JsonRejection>,
) -> Result<(StatusCode, Json<ModelVersion>), ApiError> {
    let u = json(body)?;
    let learning = s.learning.clone();
    let out =
        tokio::task::spawn_blocking(move || register_upload(&learning, u)).await.map_err(ApiError::internal)??;
    Ok((StatusCode::CREATED, Json(out)))
}

fn register_upload(learning: &crate::ml::jobs::Learning, u: Upload) -> Result<ModelVersion, ApiError> {
    if u.name.is_empty()
        || u.name.len() > 64
        || !u.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ApiError::bad_request(format!(
            "name: `{}` must be 1 to 64 characters of A-Z, a-z, 0-9, '-', '_', '.'",
            u.name
        )));
    }
    if !u.threshold.is_finite() {
        return Err(ApiError::bad_request("threshold: must be a finite number"));
    }
    let onnx = base64::engine::general_purpose::STANDARD
        .decode(u.onnx_base64.trim())
        .map_err(|e| ApiError::bad_request(format!("onnx_base64: not base64: {e}")))?;
    if u.golden.len() > MAX_GOLDEN {
        return Err(ApiError::bad_request(format!("golden: {} vectors, at most {MAX_GOLDEN}", u.golden.len())));
    }
    let Some(first) = u.golden.first() else {
        return Err(ApiError::bad_request("golden: at least one golden vector is needed"));
    };
    let width = first.input.len();
    if width == 0 {
        return Err(ApiError::bad_request("golden[0].input: must not be empty"));
    }
    let (sensor, pipeline) = match learning.classes.get(&u.class) {
        Some(class) => {
            let sensor = u.sensor.clone().unwrap_or_else(|| class.sensors[0].name.clone());
            let spec =
                class.sensors.iter().find(|x| x.name == sensor).map(ClassConfig::sensor_spec).ok_or_else(|| {
                    ApiError::bad_request(format!("sensor: class `{}` has no sensor `{sensor}`", u.class))
                })?;
            if spec.width() != width {
                return Err(ApiError::bad_request(format!(
                    "golden[0].input: {width} values, but sensor `{sensor}` of class `{}` gives {} features",
                    u.class,
                    spec.width()
                )));
            }
            (sensor, class.pipeline())
        }
        None => (
            u.sensor.clone().ok_or_else(|| {
                ApiError::bad_request(format!("sensor: class `{}` is not configured here, so name the sensor", u.class))
            })?,
            edgeloop_common::features::PipelineSpec { version: 1, sensors: vec![] },
        ),
    };
    let mut out_len = 0;
    for (i, g) in u.golden.iter().enumerate() {
        if g.input.len() != width {
            return Err(ApiError::bad_request(format!(
                "golden[{i}].input: {} values, expected {width}",
                g.input.len()
            )));
        }
        let got = crate::ml::training::onnx::run_tract(&onnx, std::slice::from_ref(&g.input))
            .map_err(|e| ApiError::bad_request(format!("onnx: tract cannot run it: {e}")))?;
        if got.len() < g.output.len() || g.output.is_empty() {
            return Err(ApiError::bad_request(format!(
                "golden[{i}].output: the model gives {} values, the golden vector lists {}",
                got.len(),
                g.output.len()
            )));
        }
        for (j, (&want, &have)) in g.output.iter().zip(&got).enumerate() {
            if !have.is_finite() || (have - want).abs() > UPLOAD_TOLERANCE * want.abs().max(1.0) {
                return Err(ApiError::bad_request(format!(
                    "golden[{i}].output[{j}]: the model gives {have}, expected {want}"
                )));
            }
        }
        out_len = got.len();
    }
    let models = &learning.models;
    let golden_bytes = edgeloop_common::signing::to_cbor(&u.golden).len();
    if golden_bytes > MAX_GOLDEN_BYTES {
        return Err(ApiError::bad_request(format!(
            "golden: {golden_bytes} bytes encoded, over {MAX_GOLDEN_BYTES}; send fewer or shorter golden vectors"
        )));
    }
    let sha256 = models.put_artifact(&onnx).map_err(ApiError::internal)?;
    let version = models.next_version(&u.name).map_err(ApiError::internal)?;
    let m = ModelVersion {
        name: u.name.clone(),
        version,
        class: u.class.clone(),
        sensor,
        kind: crate::ml::models::ModelKind::Uploaded,
        sha256,
        size: onnx.len() as u64,
        input_shape: vec![-1, width as i64],
        output_shape: vec![-1, out_len as i64],
        gaps: Default::default(),
        pipeline,
        threshold: u.threshold,
        golden: u.golden,
        lineage: Lineage {
            dataset_hash: String::new(),
            dataset_report: Default::default(),
            hyper: Default::default(),
            trials: Vec::new(),
            seed: 0,
            metrics: Metrics::default(),
            threshold_source: "given by the uploader".into(),
            code_version: format!("uploaded: {}", u.description),
            reference: Default::default(),
            selection: "uploaded by an operator".into(),
        },
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
    models.insert(&m).map_err(ApiError::internal)?;
    Ok(m)
}
