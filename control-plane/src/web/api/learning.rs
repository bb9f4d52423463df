//! API of the learning loop: training jobs, model versions, artifacts (with `Range`), labels.

use crate::ml::dataset::{DatasetSpec, ImputeMethod, Label};
use crate::ml::jobs::{Job, RequestError};
use crate::ml::models::ModelVersion;
use crate::ml::training::run::{ModelKind, TrainRequest};
use crate::web::error::{ApiError, ApiJson};
use crate::web::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

#[derive(utoipa::ToSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainBody {
    pub class: String,
    #[serde(default)]
    pub sensor: Option<String>,
    #[serde(default)]
    pub devices: Vec<String>,
    /// Unix milliseconds.
    #[serde(default)]
    pub from: Option<u64>,
    #[serde(default)]
    pub to: Option<u64>,
    /// Hyper-parameter configurations to try (default: `training.trials`).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000)]
    pub trials: Option<usize>,
    /// A time budget for the search, seconds.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0)]
    pub max_seconds: Option<f64>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub impute: Option<ImputeMethod>,
    /// Keep the rows the agents flagged out of an anomaly model's training (see `DatasetSpec`).
    #[serde(default)]
    pub exclude_flagged: bool,
    /// `autoencoder` (default) or `classifier`.
    #[serde(default)]
    pub kind: ModelKind,
}

#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug)]
pub struct Accepted {
    pub job: u64,
}

#[utoipa::path(post, path = "/api/v1/train", tag = "learning", operation_id = "train",
    request_body = TrainBody,
    responses((status = 202, description = "The job is queued.", body = Accepted), (status = 404, description = "The class is not configured.", body = crate::web::error::ErrorBody)))]
pub async fn train(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<TrainBody>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let b = body;
    super::time_range(b.from, b.to)?;
    let trials = b.trials.unwrap_or(s.learning.defaults.trials);
    if !(1..=1000).contains(&trials) {
        return Err(ApiError::bad_request(format!("trials must be between 1 and 1000, got {trials}")));
    }
    if b.max_seconds.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
        return Err(ApiError::bad_request("max_seconds must be > 0"));
    }
    if !matches!(b.kind, ModelKind::Autoencoder | ModelKind::Classifier) {
        return Err(ApiError::bad_request(format!(
            "kind must be autoencoder or classifier, got {} (the search registers a forecaster when it scores \
             better than the autoencoder)",
            b.kind
        )));
    }
    let mut dataset = DatasetSpec::new(&b.class);
    (dataset.sensor, dataset.devices, dataset.from_ms, dataset.to_ms) = (b.sensor, b.devices, b.from, b.to);
    if let Some(m) = b.impute {
        dataset.impute = m;
    }
    dataset.exclude_flagged = b.exclude_flagged;
    let req = TrainRequest {
        dataset,
        kind: b.kind,
        trials,
        max_seconds: b.max_seconds,
        seed: b.seed.unwrap_or(s.learning.defaults.seed),
        hyper: None,
        device: s.learning.defaults.device,
        stop: Default::default(),
    };
    // With PostgreSQL, queueing the job is a round trip: off the async workers.
    let learning = s.learning.clone();
    match tokio::task::spawn_blocking(move || learning.start(req, "api")).await? {
        Ok(job) => Ok((StatusCode::ACCEPTED, Json(Accepted { job }))),
        Err(e @ RequestError::UnknownClass(_)) => Err(ApiError::not_found(e.to_string())),
        Err(e) => Err(ApiError::bad_request(e.to_string())),
    }
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "learning", operation_id = "get_job",
    params(("id" = u64, Path, description = "The job's id.")),
    responses((status = 200, description = "The job.", body = Job), (status = 404, description = "No such job.", body = crate::web::error::ErrorBody)))]
pub async fn job(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Job>, ApiError> {
    let id: u64 = id.parse().map_err(|_| ApiError::bad_request(format!("job id `{id}` is not a number")))?;
    let learning = s.learning.clone();
    let job = tokio::task::spawn_blocking(move || learning.job(id)).await?;
    job.map(Json).ok_or_else(|| ApiError::not_found(format!("no job {id}")))
}

#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct JobParams {
    /// `queued`, `running`, `succeeded`, `failed` or `interrupted`.
    #[param(pattern = "^(queued|running|succeeded|failed|interrupted)$")]
    pub state: Option<String>,
    pub class: Option<String>,
    /// A job id: the page starts after it.
    pub cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

const JOB_STATES: [&str; 5] = ["queued", "running", "succeeded", "failed", "interrupted"];

/// `GET /api/v1/jobs`: by id, paged with `limit` and `cursor`, filtered by state and class.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "learning", operation_id = "list_jobs",
    params(JobParams),
    responses((status = 200, description = "Training jobs by id.", body = Vec<Job>,
            headers(
                ("x-next-cursor" = String, description = "The next page's cursor; absent on the last page."),
                ("link" = String, description = "The next page's address, `<...>; rel=\"next\"`; absent on the last page."),
            ))))]
pub async fn jobs(
    State(s): State<AppState>,
    uri: axum::http::Uri,
    params: Result<axum::extract::Query<JobParams>, axum::extract::rejection::QueryRejection>,
) -> Result<super::paging::Paged<Job>, ApiError> {
    let axum::extract::Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = super::paging::limit(p.limit)?;
    super::paging::one_of("state", p.state.as_deref(), &JOB_STATES)?;
    let after = match &p.cursor {
        Some(c) => Some(c.parse::<u64>().map_err(|_| ApiError::bad_request(format!("cursor: `{c}` is not a job id")))?),
        None => None,
    };
    let learning = s.learning.clone();
    let mut all = tokio::task::spawn_blocking(move || learning.list_jobs()).await?;
    all.sort_by_key(|j| j.id);
    let matching = all.into_iter().filter(|j| {
        p.state.as_deref().is_none_or(|st| j.state.word() == st) && p.class.as_ref().is_none_or(|c| *c == j.class)
    });
    let (items, next) = super::paging::take(matching, |j| j.id, after.as_ref(), limit);
    Ok(super::paging::Paged { items, next: next.map(|id| id.to_string()), uri })
}

/// A version without its bulky parts (golden vectors, trial table).
#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug)]
pub struct ModelSummary {
    pub name: String,
    pub version: u32,
    pub class: String,
    pub kind: ModelKind,
    pub sha256: String,
    pub size: u64,
    pub threshold: f32,
    pub created_ms: u64,
    pub promoted: bool,
    pub production: bool,
    pub test_loss: f64,
    pub test_auc: Option<f64>,
}

#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    /// One model line.
    pub name: Option<String>,
    pub class: Option<String>,
    /// `<name>/<version>`: the page starts after that version.
    pub cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// `GET /api/v1/models`: by name, then version, paged with `limit` and `cursor`, filtered by name and class.
#[utoipa::path(get, path = "/api/v1/models", tag = "learning", operation_id = "list_models",
    params(ModelParams),
    responses((status = 200, description = "Model versions by name, then version.", body = Vec<ModelSummary>,
            headers(
                ("x-next-cursor" = String, description = "The next page's cursor; absent on the last page."),
                ("link" = String, description = "The next page's address, `<...>; rel=\"next\"`; absent on the last page."),
            ))))]
pub async fn models(
    State(s): State<AppState>,
    uri: axum::http::Uri,
    params: Result<axum::extract::Query<ModelParams>, axum::extract::rejection::QueryRejection>,
) -> Result<super::paging::Paged<ModelSummary>, ApiError> {
    let axum::extract::Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = super::paging::limit(p.limit)?;
    let after = match &p.cursor {
        Some(c) => Some(
            c.rsplit_once('/')
                .and_then(|(n, v)| Some((n.to_string(), v.parse::<u32>().ok()?)))
                .ok_or_else(|| ApiError::bad_request(format!("cursor: `{c}` is not <name>/<version>")))?,
        ),
        None => None,
    };
    let models = s.learning.models.clone();
    let out = tokio::task::spawn_blocking(move || -> Result<Vec<ModelSummary>, crate::fleet::telemetry::StoreError> {
        let mut list = models.list()?;
        list.retain(|m| p.name.as_ref().is_none_or(|n| *n == m.name) && p.class.as_ref().is_none_or(|c| *c == m.class));
        list.sort_by(|a, b| (&a.name, a.version).cmp(&(&b.name, b.version)));
        let mut out = Vec::with_capacity(list.len());
        for m in list {
            let production = models.production(&m.name)?.is_some_and(|p| p.version == m.version);
            out.push(ModelSummary {
                production,
                promoted: m.promotion.promoted,
                test_loss: m.lineage.metrics.test_loss,
                test_auc: m.lineage.metrics.test_auc,
                name: m.name,
                version: m.version,
                class: m.class,
                kind: m.kind,
                sha256: m.sha256,
                size: m.size,
                threshold: m.threshold,
                created_ms: m.created_ms,
            });
        }
        Ok(out)
    })
    .await??;
    let (items, next) = super::paging::take(out, |m| (m.name.clone(), m.version), after.as_ref(), limit);
    Ok(super::paging::Paged { items, next: next.map(|(n, v)| format!("{n}/{v}")), uri })
}

#[utoipa::path(get, path = "/api/v1/models/{name}/{version}", tag = "learning", operation_id = "get_model",
    params(("name" = String, Path, description = "The model line."), ("version" = u32, Path, description = "The version.")),
    responses((status = 200, description = "The version, with its lineage, promotion decision and golden vectors.", body = ModelVersion), (status = 404, description = "No such version.", body = crate::web::error::ErrorBody)))]
pub async fn model(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<ModelVersion>, ApiError> {
    let version: u32 =
        version.parse().map_err(|_| ApiError::bad_request(format!("version `{version}` is not a number")))?;
    let (models, n) = (s.learning.models.clone(), name.clone());
    tokio::task::spawn_blocking(move || models.get(&n, version))
        .await??
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no model {name} v{version}")))
}

/// `GET /api/v1/models/{name}/{version}/manifest`: the manifest exactly as agents receive it in their desired
/// states (golden tolerance included).
#[utoipa::path(get, path = "/api/v1/models/{name}/{version}/manifest", tag = "learning", operation_id = "get_manifest",
    params(("name" = String, Path, description = "The model line."), ("version" = u32, Path, description = "The version.")),
    responses((status = 200, description = "The manifest exactly as agents receive it.", body = edgeloop_common::update::Manifest), (status = 404, description = "No such version.", body = crate::web::error::ErrorBody)))]
pub async fn manifest(
    State(s): State<AppState>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<edgeloop_common::update::Manifest>, ApiError> {
    let Json(m) = model(State(s), Path((name, version))).await?;
    Ok(Json(m.manifest()))
}

/// `bytes=a-b`, `bytes=a-` or `bytes=-n` against a length: the inclusive range, or `None` if it cannot be
/// satisfied (several ranges are not supported and count as unsatisfiable).
pub fn parse_range(header: &str, len: u64) -> Option<(u64, u64)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || len == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().ok().filter(|&n| n > 0)?;
            (len.saturating_sub(n), len - 1)
        }
        (a, "") => (a.parse().ok()?, len - 1),
        (a, b) => (a.parse().ok()?, b.parse::<u64>().ok()?.min(len - 1)),
    };
    (start <= end && start < len).then_some((start, end))
}

/// Serves an artifact from disk, whole or one byte range (`Range: bytes=a-b`, `a-`, `-n`; 206 with
/// `Content-Range`, 416 for a range outside the file). The body is streamed in 64 KiB pieces, so
/// memory per download stays small whatever the file's size. Downloads need no token, so at most
/// `api.max_downloads` run at once; the next waits up to 10 s for a turn, then gets a 503 (agents retry with
/// back-off and resume with `Range`).
#[utoipa::path(get, path = "/api/v1/artifacts/{sha256}", tag = "learning", operation_id = "get_artifact",
    params(("sha256" = String, Path, description = "The artifact's SHA-256, 64 lowercase hex digits.", pattern = "^[0-9a-f]{64}$"),
        ("range" = Option<String>, Header, description = "One byte range: `bytes=a-b`, `bytes=a-` or `bytes=-n`.")),
    responses(
        (status = 200, description = "The whole file.", content_type = "application/octet-stream", body = inline(super::openapi::Binary),
            headers(("etag" = String, description = "The SHA-256, quoted."), ("accept-ranges" = String))),
        (status = 206, description = "One byte range.", content_type = "application/octet-stream", body = inline(super::openapi::Binary),
            headers(("content-range" = String, description = "`bytes a-b/len`."))),
        (status = 404, description = "No such artifact.", body = crate::web::error::ErrorBody),
        (status = 416, description = "The range does not fit the file.", body = crate::web::error::ErrorBody),
        (status = 503, description = "Every download slot is taken (`api.max_downloads`); retry after `Retry-After`.", body = crate::web::error::ErrorBody),
    ))]
pub async fn artifact(
    State(s): State<AppState>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !crate::ml::models::is_sha256(&sha) {
        return Err(ApiError::bad_request(format!("`{sha}` is not a sha256 (64 lowercase hex digits)")));
    }
    let path =
        s.learning.models.artifact_path(&sha).ok_or_else(|| ApiError::not_found(format!("no artifact {sha}")))?;
    let permit = match tokio::time::timeout(s.downloads.wait, s.downloads.slots.clone().acquire_owned()).await {
        Ok(Ok(p)) => p,
        _ => {
            s.metrics.api_refused("downloads_busy");
            let mut r = ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error: "busy",
                detail: "every artifact download slot is taken (api.max_downloads); try again".into(),
            }
            .into_response();
            r.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("5"));
            return Ok(r);
        }
    };
    let mut file =
        tokio::fs::File::open(&path).await.map_err(|e| ApiError::internal(format!("artifact {sha}: {e}")))?;
    let len = file.metadata().await.map_err(|e| ApiError::internal(format!("artifact {sha}: {e}")))?.len();
    let etag = format!("\"{sha}\"");
    let (status, start, end) = match headers.get(header::RANGE) {
        None => (StatusCode::OK, 0, len.checked_sub(1)),
        Some(range) => {
            let range = range.to_str().map_err(|_| ApiError::bad_request("Range header is not text"))?;
            match parse_range(range, len) {
                Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, Some(end)),
                None => {
                    let mut r = ApiError {
                        status: StatusCode::RANGE_NOT_SATISFIABLE,
                        error: "range_not_satisfiable",
                        detail: format!("`{range}` does not fit {len} bytes"),
                    }
                    .into_response();
                    if let Ok(v) = format!("bytes */{len}").parse() {
                        r.headers_mut().insert(header::CONTENT_RANGE, v);
                    }
                    return Ok(r);
                }
            }
        }
    };
    let body_len = end.map_or(0, |e| e - start + 1);
    if start > 0 {
        use tokio::io::AsyncSeekExt;
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| ApiError::internal(format!("artifact {sha}: {e}")))?;
    }
    let reader = Permitted { inner: tokio::io::AsyncReadExt::take(file, body_len), _permit: permit };
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(reader, ARTIFACT_CHUNK));
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    let value = |v: String| axum::http::HeaderValue::try_from(v);
    h.insert(header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, axum::http::HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, value(etag)?);
    h.insert(header::CONTENT_LENGTH, value(body_len.to_string())?);
    if let (StatusCode::PARTIAL_CONTENT, Some(end)) = (status, end) {
        h.insert(header::CONTENT_RANGE, value(format!("bytes {start}-{end}/{len}"))?);
    }
    Ok(r)
}

/// How much of an artifact is read at a time.
pub const ARTIFACT_CHUNK: usize = 64 * 1024;

/// The artifact download slots.
#[derive(Debug)]
pub struct Downloads {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    /// How long a download waits for a slot before it gets a 503.
    wait: std::time::Duration,
}

impl Downloads {
    pub fn new(limits: &crate::web::serve::Limits) -> Downloads {
        Downloads {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_downloads.max(1))),
            wait: limits.download_wait,
        }
    }
}

/// A reader that holds a download slot until the body is done with (sent, or dropped with the connection).
struct Permitted<R> {
    inner: R,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Permitted<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

#[derive(utoipa::ToSchema, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelBody {
    pub device: String,
    pub from: u64,
    pub to: u64,
    /// 0 for normal, anything else for an anomaly (or a class, for classifiers).
    pub label: u32,
}

#[utoipa::path(post, path = "/api/v1/labels", tag = "learning", operation_id = "add_label",
    request_body = LabelBody,
    responses((status = 201, description = "The label is stored.", body = Label)))]
pub async fn add_label(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<LabelBody>,
) -> Result<(StatusCode, Json<Label>), ApiError> {
    let b = body;
    edgeloop_common::topics::validate_device_id(&b.device).map_err(|e| ApiError::bad_request(e.to_string()))?;
    super::time_range(Some(b.from), Some(b.to))?;
    let label = Label { device: b.device, from_ms: b.from, to_ms: b.to, label: b.label };
    let models = s.learning.models.clone();
    let l = label.clone();
    tokio::task::spawn_blocking(move || models.add_label(&l)).await??;
    Ok((StatusCode::CREATED, Json(label)))
}

#[utoipa::path(get, path = "/api/v1/triggers", tag = "learning", operation_id = "list_triggers",
    responses((status = 200, description = "Retraining triggers that fired.", body = Vec<crate::ml::triggers::TriggerEvent>)))]
pub async fn triggers(State(s): State<AppState>) -> Result<Json<Vec<crate::ml::triggers::TriggerEvent>>, ApiError> {
    let learning = s.learning.clone();
    Ok(Json(tokio::task::spawn_blocking(move || learning.trigger_events()).await?))
}

#[utoipa::path(get, path = "/api/v1/labels", tag = "learning", operation_id = "list_labels",
    responses((status = 200, description = "Every label.", body = Vec<Label>)))]
pub async fn labels(State(s): State<AppState>) -> Result<Json<Vec<Label>>, ApiError> {
    let models = s.learning.models.clone();
    Ok(Json(tokio::task::spawn_blocking(move || models.labels()).await??))
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=-0", 100), None);
    }
}

/// `GET /api/v1/datasets/{class}`: what a training of the class would learn from, built the same way (the
/// same cleaning, imputation, features, time split and quality report), for a notebook.
#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DatasetParams {
    pub sensor: Option<String>,
    /// Comma-separated device ids; default: every device of the class.
    pub devices: Option<String>,
    /// Unix milliseconds, inclusive.
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub impute: Option<ImputeMethod>,
    #[serde(default)]
    pub exclude_flagged: bool,
}

/// One row of a dataset, with the split it falls in.
#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug)]
pub struct DatasetRow {
    pub split: &'static str,
    #[serde(flatten)]
    pub row: crate::ml::dataset::Row,
}

#[derive(utoipa::ToSchema, Serialize, Debug)]
pub struct DatasetView {
    pub class: String,
    pub sensor: String,
    /// `sha256:<hex>` of the spec and every row, as a trained model's lineage names its dataset.
    pub hash: String,
    pub feature_names: Vec<String>,
    pub report: crate::ml::dataset::QualityReport,
    /// Fitted on the training split; trained models standardise their inputs with it.
    pub standardizer: crate::ml::dataset::Standardizer,
    pub rows: Vec<DatasetRow>,
}

/// Most rows a dataset answer carries: narrow a larger one with `from`, `to` or `devices`.
pub const MAX_DATASET_ROWS: usize = 200_000;

#[utoipa::path(get, path = "/api/v1/datasets/{class}", tag = "learning", operation_id = "get_dataset",
    params(("class" = String, Path, description = "The device class."), DatasetParams),
    responses((status = 200, description = "The dataset a training would learn from.", body = DatasetView), (status = 404, description = "The class is not configured.", body = crate::web::error::ErrorBody)))]
pub async fn dataset(
    State(s): State<AppState>,
    Path(class): Path<String>,
    params: Result<axum::extract::Query<DatasetParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DatasetView>, ApiError> {
    let axum::extract::Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    super::time_range(p.from, p.to)?;
    let config =
        s.learning.classes.get(&class).cloned().ok_or_else(|| {
            ApiError::not_found(format!("class `{class}` is not configured here (training.classes_dir)"))
        })?;
    let mut spec = DatasetSpec::new(&class);
    spec.sensor = p.sensor;
    spec.devices =
        p.devices.map(|d| d.split(',').filter(|x| !x.is_empty()).map(String::from).collect()).unwrap_or_default();
    (spec.from_ms, spec.to_ms, spec.exclude_flagged) = (p.from, p.to, p.exclude_flagged);
    if let Some(m) = p.impute {
        spec.impute = m;
    }
    let learning = s.learning.clone();
    let store = s.store.clone();
    let ds = tokio::task::spawn_blocking(move || {
        let devices = if spec.devices.is_empty() { learning.devices_of(&class) } else { spec.devices.clone() };
        let labels = learning.models.labels()?;
        crate::ml::dataset::build(&store, &config, &devices, &labels, &spec)
    })
    .await?
    .map_err(|e| match e {
        crate::ml::dataset::DatasetError::Store(e) => ApiError::from(e),
        other => ApiError::bad_request(other.to_string()),
    })?;
    if ds.report.rows as usize > MAX_DATASET_ROWS {
        return Err(ApiError::bad_request(format!(
            "{} rows, over {MAX_DATASET_ROWS}: narrow the dataset with from, to or devices",
            ds.report.rows
        )));
    }
    let split = |name: &'static str, rows: Vec<crate::ml::dataset::Row>| {
        rows.into_iter().map(move |row| DatasetRow { split: name, row })
    };
    let rows = split("train", ds.train).chain(split("val", ds.val)).chain(split("test", ds.test)).collect();
    Ok(Json(DatasetView {
        class: ds.spec.class,
        sensor: ds.sensor.name.clone(),
        hash: ds.hash,
        feature_names: ds.feature_names,
        report: ds.report,
        standardizer: ds.standardizer,
        rows,
    }))
}
