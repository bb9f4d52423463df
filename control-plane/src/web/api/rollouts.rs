//! API of signed updates: rollouts and their actions, device tags, the audit log, model upload and the
//! signing key's public half.

use crate::ml::models::ModelVersion;
use crate::ml::upload::{self, Upload};
use crate::rollout::engine::Action;
use crate::rollout::service::RolloutError;
use crate::rollout::view::{view, RolloutView};
use crate::rollout::CreateRollout;
use crate::web::error::{ApiError, ApiJson};
use crate::web::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

impl From<RolloutError> for ApiError {
    fn from(e: RolloutError) -> Self {
        match e {
            RolloutError::BadTag(_)
            | RolloutError::ClassMismatch { .. }
            | RolloutError::Spec(_)
            | RolloutError::StartAt { .. }
            | RolloutError::Release(_) => ApiError::bad_request(e.to_string()),
            RolloutError::NoModel { .. }
            | RolloutError::NoConfig { .. }
            | RolloutError::NoAgentRelease { .. }
            | RolloutError::NoRollout(_) => ApiError::not_found(e.to_string()),
            RolloutError::Refused(_) => {
                ApiError { status: StatusCode::CONFLICT, error: "conflict", detail: e.to_string() }
            }
            RolloutError::Store(e) => ApiError::internal(e),
        }
    }
}

#[utoipa::path(post, path = "/api/v1/rollouts", tag = "rollouts", operation_id = "create_rollout",
    request_body = CreateRollout,
    responses((status = 201, description = "The rollout is created.", body = RolloutView),
        (status = 404, description = "The model, configuration or agent build does not exist.", body = crate::web::error::ErrorBody),
        (status = 409, description = "Refused: another rollout of the class is live, or the model is not promoted.", body = crate::web::error::ErrorBody)))]
pub async fn create(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<CreateRollout>,
) -> Result<(StatusCode, Json<RolloutView>), ApiError> {
    let req = body;
    let r = s.rollouts.clone();
    let created = tokio::task::spawn_blocking(move || r.create(req, edgeloop_common::unix_millis())).await??;
    Ok((StatusCode::CREATED, Json(view(created))))
}

#[derive(utoipa::IntoParams, Deserialize, Debug)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Include archived rollouts.
    #[serde(default)]
    pub archived: bool,
    /// `scheduled`, `running`, `awaiting_approval`, `paused`, `completed`, `rolled_back`, `aborted` or `superseded`.
    #[param(pattern = "^(scheduled|running|awaiting_approval|paused|completed|rolled_back|aborted|superseded)$")]
    pub state: Option<String>,
    pub class: Option<String>,
    /// A rollout id: the page starts after it.
    pub cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// The rollout states, as `state` filters and views name them.
const ROLLOUT_STATES: [&str; 8] =
    ["scheduled", "running", "awaiting_approval", "paused", "completed", "rolled_back", "aborted", "superseded"];

/// `GET /api/v1/rollouts`: oldest first, paged with `limit` and `cursor`, filtered by state and class.
#[utoipa::path(get, path = "/api/v1/rollouts", tag = "rollouts", operation_id = "list_rollouts",
    params(ListParams),
    responses((status = 200, description = "Rollouts oldest first, without their per-device targets.", body = Vec<RolloutView>,
            headers(
                ("x-next-cursor" = String, description = "The next page's cursor; absent on the last page."),
                ("link" = String, description = "The next page's address, `<...>; rel=\"next\"`; absent on the last page."),
            ))))]
pub async fn list(
    State(s): State<AppState>,
    uri: axum::http::Uri,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<super::paging::Paged<serde_json::Value>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = super::paging::limit(p.limit)?;
    super::paging::one_of("state", p.state.as_deref(), &ROLLOUT_STATES)?;
    let all = s.rollouts.list();
    // The list's order: when created, then the id.
    let key = |r: &crate::rollout::engine::Rollout| (r.created_ms, r.id.len(), r.id.clone());
    let after = match &p.cursor {
        Some(c) => Some(all.iter().find(|r| r.id == *c).map(key).ok_or_else(|| {
            ApiError::bad_request(format!("cursor: no rollout `{c}` (pass the X-Next-Cursor of the previous page)"))
        })?),
        None => None,
    };
    let matching = all.into_iter().filter(|r| {
        (p.archived || !r.archived)
            && p.state.as_deref().is_none_or(|st| r.state.word() == st)
            && p.class.as_ref().is_none_or(|c| *c == r.spec.class)
    });
    let (page, next) = super::paging::take(matching, key, after.as_ref(), limit);
    // Without the per-device targets, which `/api/v1/rollouts/{id}/devices` pages through; `phases` and the
    // stages' device counts are taken from them first.
    let items = page
        .into_iter()
        .map(|r| {
            let mut rv = view(r);
            rv.devices.clear();
            let mut v = serde_json::to_value(rv).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.remove("devices");
            }
            v
        })
        .collect();
    Ok(super::paging::Paged { items, next: next.map(|(_, _, id)| id), uri })
}

#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RolloutDeviceParams {
    /// Where the device stands, as the rollout's `phases` names it (`pending`, `applied`, `failed`,
    /// `timed_out`, ...).
    pub phase: Option<String>,
    /// The stage that took it in (0 is the first).
    pub stage: Option<usize>,
    /// A device id: the page starts after it.
    pub cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// One device of a rollout: its id, where it stands (as the rollout's `phases` counts it), and its target.
#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug)]
pub struct RolloutDevice {
    pub device: String,
    pub phase: String,
    pub target: crate::rollout::engine::Target,
}

/// `GET /api/v1/rollouts/{id}/devices`: the rollout's devices by id, paged, filtered by phase and stage.
#[utoipa::path(get, path = "/api/v1/rollouts/{id}/devices", tag = "rollouts", operation_id = "rollout_devices",
    params(("id" = String, Path, description = "The rollout's id."), RolloutDeviceParams),
    responses((status = 200, description = "The rollout's devices by id.", body = Vec<RolloutDevice>,
            headers(
                ("x-next-cursor" = String, description = "The next page's cursor; absent on the last page."),
                ("link" = String, description = "The next page's address, `<...>; rel=\"next\"`; absent on the last page."),
            )), (status = 404, description = "No such rollout.", body = crate::web::error::ErrorBody)))]
pub async fn devices(
    State(s): State<AppState>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    params: Result<Query<RolloutDeviceParams>, QueryRejection>,
) -> Result<super::paging::Paged<RolloutDevice>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = super::paging::limit(p.limit)?;
    let r = s.rollouts.get(&id).ok_or_else(|| ApiError::not_found(format!("no rollout `{id}`")))?;
    let matching = r.devices.into_iter().filter_map(|(device, target)| {
        let phase = target.phase_name();
        let keep = p.phase.as_ref().is_none_or(|want| *want == phase) && p.stage.is_none_or(|st| st == target.stage);
        keep.then_some(RolloutDevice { device, phase, target })
    });
    let (items, next) = super::paging::take(matching, |d| d.device.clone(), p.cursor.as_ref(), limit);
    Ok(super::paging::Paged { items, next, uri })
}

/// `DELETE /api/v1/rollouts/{id}`: archives a rollout that has ended (409 while it is live).
#[utoipa::path(delete, path = "/api/v1/rollouts/{id}", tag = "rollouts", operation_id = "archive_rollout",
    params(("id" = String, Path, description = "The rollout's id.")),
    responses((status = 200, description = "The rollout, archived.", body = RolloutView), (status = 404, description = "No such rollout.", body = crate::web::error::ErrorBody),
        (status = 409, description = "The rollout is live.", body = crate::web::error::ErrorBody)))]
pub async fn archive(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<RolloutView>, ApiError> {
    let r = s.rollouts.clone();
    let out = tokio::task::spawn_blocking(move || r.archive(&id, edgeloop_common::unix_millis())).await??;
    Ok(Json(view(out)))
}

#[utoipa::path(get, path = "/api/v1/rollouts/{id}", tag = "rollouts", operation_id = "get_rollout",
    params(("id" = String, Path, description = "The rollout's id.")),
    responses((status = 200, description = "The rollout, with every device's target.", body = RolloutView), (status = 404, description = "No such rollout.", body = crate::web::error::ErrorBody)))]
pub async fn get(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<RolloutView>, ApiError> {
    s.rollouts.get(&id).map(|r| Json(view(r))).ok_or_else(|| ApiError::not_found(format!("no rollout `{id}`")))
}

#[utoipa::path(post, path = "/api/v1/rollouts/{id}/{action}", tag = "rollouts", operation_id = "act_on_rollout",
    params(("id" = String, Path, description = "The rollout's id."), ("action" = inline(RolloutAction), Path, description = "What to do.")),
    responses((status = 200, description = "The rollout after the action.", body = RolloutView), (status = 404, description = "No such rollout or action.", body = crate::web::error::ErrorBody),
        (status = 409, description = "The action does not apply in the rollout's state.", body = crate::web::error::ErrorBody)))]
pub async fn act(
    State(s): State<AppState>,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<RolloutView>, ApiError> {
    let action = match serde_json::from_value::<RolloutAction>(serde_json::Value::String(action.clone())) {
        Ok(a) => a.into(),
        Err(_) => {
            return Err(ApiError::not_found(format!(
                "no action `{action}`; use pause, resume, abort, approve, deny or retry"
            )))
        }
    };
    let r = s.rollouts.clone();
    let out = tokio::task::spawn_blocking(move || r.act(&id, action, edgeloop_common::unix_millis())).await??;
    Ok(Json(view(out)))
}

/// What `POST /api/v1/rollouts/{id}/{action}` does: pause or resume the rollout, abort it (devices go back to
/// what they ran), approve or deny the stage that awaits approval, or retry the devices that failed.
#[derive(Deserialize, Debug, Clone, Copy, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RolloutAction {
    Pause,
    Resume,
    Abort,
    Approve,
    Deny,
    Retry,
}

impl From<RolloutAction> for Action {
    fn from(a: RolloutAction) -> Action {
        match a {
            RolloutAction::Pause => Action::Pause,
            RolloutAction::Resume => Action::Resume,
            RolloutAction::Abort => Action::Abort,
            RolloutAction::Approve => Action::Approve,
            RolloutAction::Deny => Action::Deny,
            RolloutAction::Retry => Action::Retry,
        }
    }
}

#[derive(utoipa::ToSchema, Deserialize, Serialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct Tags {
    pub tags: Vec<String>,
}

/// `GET /api/v1/devices/{id}/tags`.
#[utoipa::path(get, path = "/api/v1/devices/{id}/tags", tag = "devices", operation_id = "get_tags",
    params(("id" = String, Path, description = "The device's id.", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "The device's tags.", body = Tags)))]
pub async fn tags(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Tags>, ApiError> {
    edgeloop_common::topics::validate_device_id(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(Tags { tags: s.rollouts.tags(&id) }))
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/tags", tag = "devices", operation_id = "set_tags",
    params(("id" = String, Path, description = "The device's id.", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    request_body = Tags,
    responses((status = 200, description = "The device's tags, replaced.", body = Tags)))]
pub async fn set_tags(
    State(s): State<AppState>,
    Path(id): Path<String>,
    ApiJson(Tags { tags }): ApiJson<Tags>,
) -> Result<Json<Tags>, ApiError> {
    edgeloop_common::topics::validate_device_id(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let r = s.rollouts.clone();
    let dev = id.clone();
    tokio::task::spawn_blocking(move || r.set_tags(&dev, tags)).await??;
    Ok(Json(Tags { tags: s.rollouts.tags(&id) }))
}

/// Largest `limit` the audit log's list takes (entries are at most a few KiB each, so a page stays small).
pub const MAX_AUDIT_LIMIT: usize = 1_000;

#[derive(utoipa::IntoParams, Deserialize, Debug)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// The operator (`who`), exactly.
    pub actor: Option<String>,
    /// Bounds on the entry's time, Unix ms, inclusive.
    pub since: Option<u64>,
    pub until: Option<u64>,
    /// The `X-Next-Cursor` of the previous (newer) page.
    pub cursor: Option<String>,
}

/// `GET /api/v1/audit`: newest first, 200 a page by default, filtered by actor and time, paged with a cursor.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit", operation_id = "list_audit",
    params(AuditParams),
    responses((status = 200, description = "Audit entries, newest first.", body = Vec<crate::access::audit::AuditEntry>,
            headers(
                ("x-next-cursor" = String, description = "The next page's cursor; absent on the last page."),
                ("link" = String, description = "The next page's address, `<...>; rel=\"next\"`; absent on the last page."),
            ))))]
pub async fn audit(
    State(s): State<AppState>,
    uri: axum::http::Uri,
    params: Result<Query<AuditParams>, QueryRejection>,
) -> Result<super::paging::Paged<crate::access::audit::AuditEntry>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = p.limit.unwrap_or(200);
    if limit == 0 || limit > MAX_AUDIT_LIMIT {
        return Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_AUDIT_LIMIT}, got {limit}")));
    }
    if let (Some(a), Some(b)) = (p.since, p.until) {
        if a > b {
            return Err(ApiError::bad_request(format!("since ({a}) is after until ({b})")));
        }
    }
    let before = match &p.cursor {
        Some(c) => Some(
            crate::fleet::logs::LogCursor::parse(c).map_err(|e| ApiError::bad_request(format!("cursor: {e}")))?.bytes(),
        ),
        None => None,
    };
    let a = s.audit.clone();
    let (items, next) = tokio::task::spawn_blocking(move || {
        a.page(before, limit, |e| {
            p.actor.as_ref().is_none_or(|w| *w == e.who)
                && p.since.is_none_or(|t| e.at_ms >= t)
                && p.until.is_none_or(|t| e.at_ms <= t)
        })
    })
    .await??;
    let next = next.map(|k| crate::fleet::logs::LogCursor::from_bytes(k).encode());
    Ok(super::paging::Paged { items, next, uri })
}

#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug)]
pub struct SigningKey {
    pub key_id: String,
    pub public_key: String,
}

#[utoipa::path(get, path = "/api/v1/signing-key", tag = "rollouts", operation_id = "get_signing_key",
    responses((status = 200, description = "The public half of the key manifests are signed with.", body = SigningKey)))]
pub async fn signing_key(State(s): State<AppState>) -> Json<SigningKey> {
    Json(SigningKey { key_id: s.rollouts.key_id().to_string(), public_key: s.rollouts.public_key_hex() })
}

/// Largest `POST /api/v1/models` body: a 64 MiB model in base64, plus its golden vectors. Every other route
/// keeps axum's 2 MiB default.
pub const MAX_UPLOAD_BYTES: usize = 96 << 20;

/// `POST /api/v1/models`: an ONNX file from elsewhere (PyTorch, scikit-learn) with what devices need to run it.
/// Either `multipart/form-data` with a `metadata` part (JSON: name, class, sensor, threshold, golden,
/// description) and a `model` part (the ONNX file), or a JSON body with the same fields and `onnx_base64`.
#[utoipa::path(post, path = "/api/v1/models", tag = "learning", operation_id = "upload_model",
    request_body(content(
        (UploadForm = "multipart/form-data"),
        (UploadJson = "application/json"),
    )),
    responses((status = 201, description = "The model is verified against its golden vectors and registered.", body = ModelVersion),
        (status = 404, description = "The class is not configured.", body = crate::web::error::ErrorBody)))]
pub async fn upload(
    State(s): State<AppState>,
    req: axum::extract::Request,
) -> Result<(StatusCode, Json<ModelVersion>), ApiError> {
    let multipart = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.to_ascii_lowercase().starts_with("multipart/form-data"));
    let u = if multipart {
        let m = axum::extract::Multipart::from_request(req, &s)
            .await
            .map_err(|e| ApiError::bad_request(format!("multipart: {}", e.body_text())))?;
        read_multipart(m).await?
    } else {
        let ApiJson(v) = ApiJson::<serde_json::Value>::from_request(req, &s).await?;
        Upload::from_json(v)?
    };
    let learning = s.learning.clone();
    let m = tokio::task::spawn_blocking(move || upload::register(&learning.models, &learning.classes, u)).await??;
    Ok((StatusCode::CREATED, Json(m)))
}

/// `POST /api/v1/models` as `multipart/form-data`: a `metadata` part (JSON) and a `model` part (the ONNX
/// file), each once.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct UploadForm {
    /// The model's name, class, threshold and golden vectors, as JSON.
    #[schema(content_media_type = "application/json")]
    metadata: upload::UploadMeta,
    /// The ONNX file.
    #[schema(value_type = String, format = Binary, content_media_type = "application/octet-stream")]
    model: Vec<u8>,
}

/// `POST /api/v1/models` as JSON: the metadata's fields and the ONNX file in base64 (the multipart form is
/// smaller on the wire).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
pub struct UploadJson {
    /// The ONNX file, base64 (RFC 4648, with padding).
    #[schema(content_encoding = "base64")]
    onnx_base64: String,
    // The fields of `UploadMeta`, each with its type; a test checks that the two lists agree.
    name: String,
    class: String,
    #[serde(default)]
    sensor: Option<String>,
    threshold: f32,
    golden: Vec<edgeloop_common::update::Golden>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    score: crate::ml::onnx_ml::ScoreSpec,
}

#[cfg(test)]
mod tests {
    use utoipa::PartialSchema;

    /// The property names of a component schema, as the OpenAPI document shows them.
    fn properties(schema: utoipa::openapi::RefOr<utoipa::openapi::schema::Schema>) -> Vec<String> {
        let v = serde_json::to_value(schema).unwrap();
        let mut names: Vec<String> = v["properties"].as_object().unwrap().keys().cloned().collect();
        names.sort();
        names
    }

    #[test]
    fn the_json_upload_is_the_metadata_and_the_file() {
        let mut meta = properties(crate::ml::upload::UploadMeta::schema());
        meta.push("onnx_base64".into());
        meta.sort();
        assert_eq!(properties(super::UploadJson::schema()), meta);
    }
}

/// The parts of a multipart upload: `metadata` (JSON) and `model` (the ONNX file), each once, nothing else.
async fn read_multipart(mut m: axum::extract::Multipart) -> Result<Upload, ApiError> {
    let bad = |detail: String| ApiError::bad_request(detail);
    let (mut meta, mut onnx) = (None, None);
    while let Some(field) = m.next_field().await.map_err(|e| bad(format!("multipart: {}", e.body_text())))? {
        let name = field.name().unwrap_or_default().to_string();
        let bytes = field.bytes().await.map_err(|e| bad(format!("multipart part `{name}`: {}", e.body_text())))?;
        let slot = match name.as_str() {
            "metadata" => &mut meta,
            "model" => &mut onnx,
            other => {
                return Err(bad(format!(
                    "multipart: unknown part `{other}`; send `metadata` (JSON) and `model` (the ONNX file)"
                )))
            }
        };
        if slot.replace(bytes).is_some() {
            return Err(bad(format!("multipart: the part `{name}` is there twice")));
        }
    }
    let meta = meta.ok_or_else(|| {
        bad("multipart: no `metadata` part (the model's name, class, threshold and golden vectors, as JSON)".into())
    })?;
    let onnx = onnx.ok_or_else(|| bad("multipart: no `model` part (the ONNX file)".into()))?;
    let v: serde_json::Value = serde_json::from_slice(&meta).map_err(|e| bad(format!("metadata: not JSON: {e}")))?;
    Ok(Upload { meta: upload::UploadMeta::from_value(v)?, onnx: onnx.to_vec() })
}

/// `GET /api/v1/windows`: every maintenance window, open now (until when) or when it next opens.
#[utoipa::path(get, path = "/api/v1/windows", tag = "rollouts", operation_id = "list_windows",
    responses((status = 200, description = "Every maintenance window, open now or when it next opens.", body = Vec<crate::rollout::WindowView>)))]
pub async fn windows(State(s): State<AppState>) -> Json<Vec<crate::rollout::WindowView>> {
    Json(s.rollouts.windows(edgeloop_common::unix_millis()))
}

impl From<crate::rollout::bundle::BundleError> for ApiError {
    fn from(e: crate::rollout::bundle::BundleError) -> Self {
        use crate::rollout::bundle::BundleError as B;
        match e {
            B::NoModel { .. } | B::NoConfig { .. } => ApiError::not_found(e.to_string()),
            B::ClassMismatch { .. } | B::Validity(_) => ApiError::bad_request(e.to_string()),
            B::Exhausted(_) => ApiError { status: StatusCode::CONFLICT, error: "conflict", detail: e.to_string() },
            B::NoArtifact(_) | B::Io(_) => ApiError::internal(e.to_string()),
            B::Store(e) => ApiError::internal(e),
        }
    }
}

/// The media type of an update bundle file.
pub const BUNDLE_TYPE: &str = "application/vnd.edgeloop.bundle+cbor";

/// `POST /api/v1/bundles`: makes an update bundle for sites with no network and answers with the file
/// (`edgeloop-agent install --bundle FILE` installs it). Its id is in `X-Edgeloop-Bundle`.
#[utoipa::path(post, path = "/api/v1/bundles", tag = "rollouts", operation_id = "make_bundle",
    request_body = crate::rollout::bundle::BundleRequest,
    responses((status = 201, description = "The bundle file.", content_type = "application/vnd.edgeloop.bundle+cbor", body = inline(super::openapi::Binary),
            headers(("x-edgeloop-bundle" = String, description = "The bundle's id."), ("content-disposition" = String))),
        (status = 404, description = "The model or configuration does not exist.", body = crate::web::error::ErrorBody),
        (status = 409, description = "Bundle ids are exhausted.", body = crate::web::error::ErrorBody)))]
pub async fn make_bundle(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<crate::rollout::bundle::BundleRequest>,
) -> Result<axum::response::Response, ApiError> {
    use axum::http::header;
    use axum::response::IntoResponse;
    let r = s.rollouts.clone();
    let (record, bytes) = tokio::task::spawn_blocking(move || r.bundle(&req, edgeloop_common::unix_millis())).await??;
    let name = format!("attachment; filename=\"{}-{}-v{}.bundle\"", record.id, record.model, record.version);
    let headers = [
        (header::CONTENT_TYPE, BUNDLE_TYPE.to_string()),
        (header::CONTENT_DISPOSITION, name),
        (header::HeaderName::from_static("x-edgeloop-bundle"), record.id),
    ];
    Ok((StatusCode::CREATED, headers, bytes).into_response())
}

/// `GET /api/v1/bundles`: the bundles made, with what each device reported about them.
#[utoipa::path(get, path = "/api/v1/bundles", tag = "rollouts", operation_id = "list_bundles",
    responses((status = 200, description = "The bundles made, with what devices reported about them.", body = Vec<crate::rollout::bundle::BundleView>)))]
pub async fn bundles(State(s): State<AppState>) -> Result<Json<Vec<crate::rollout::bundle::BundleView>>, ApiError> {
    let r = s.rollouts.clone();
    Ok(Json(tokio::task::spawn_blocking(move || r.bundles()).await??))
}
