//! The operator HTTP API (axum): health, devices, telemetry and metrics here; training jobs, models,
//! artifacts and labels in [`learning`].
//!
//! Routes and the role each needs are in [`crate::web::router`]. Handlers are thin: they validate the request, call the store or registry (scans run on the blocking
//! pool) and shape JSON. Every error is an [`error::ApiError`].

pub mod alerts;
pub mod broker;
pub mod configs;
pub mod identity;
pub mod learning;
pub mod logs;
pub mod openapi;
pub mod paging;
pub mod releases;
pub mod rollouts;

use crate::fleet::devices::Device;
use crate::fleet::telemetry::Query;
use crate::web::error::ApiError;
use crate::web::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query as QueryParams, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use edgeloop_common::envelope::Record;
use serde::{Deserialize, Serialize};

/// Largest `limit` a telemetry query may ask for.
pub const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 1_000;

#[derive(utoipa::ToSchema, Serialize)]
pub struct Health {
    status: &'static str,
    version: &'static str,
    uptime_s: u64,
    devices: usize,
}

#[utoipa::path(get, path = "/api/v1/health", tag = "health", operation_id = "health",
    responses((status = 200, description = "The control plane is up.", body = Health)))]
pub async fn health(State(s): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: s.started.elapsed().as_secs(),
        devices: s.registry.len(),
    })
}

/// A device as the API shows it.
#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeviceView {
    #[serde(flatten)]
    pub device: Device,
    pub online: bool,
    /// Whether its maintenance window lets it receive a desired state now (until when), or when the next
    /// one opens; `always` where no window applies.
    #[serde(default)]
    pub window: crate::rollout::window::Opening,
}

fn view(s: &AppState, d: Device) -> DeviceView {
    let now = edgeloop_common::unix_millis();
    let online = now.saturating_sub(d.last_seen_ms) < s.offline_after_ms;
    let window = s.rollouts.opening(&d.class, &s.rollouts.tags(&d.id), now);
    DeviceView { device: d, online, window }
}

#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeviceParams {
    pub class: Option<String>,
    /// One of the device's tags.
    pub tag: Option<String>,
    /// `online`, `offline` or `stale` (silent for a day or more).
    #[param(pattern = "^(online|offline|stale)$")]
    pub state: Option<String>,
    /// The model it runs, by its last heartbeat: a model line (`city-air-quality`), one version
    /// (`city-air-quality/3`), or `none`.
    pub model: Option<String>,
    pub cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

/// Whether `model_version` (`<name> v<version> (sha256:...)`, as heartbeats carry it) is what `want` names.
fn runs_model(model_version: Option<&str>, want: &str) -> bool {
    let Some(mv) = model_version else { return want == "none" };
    match want.split_once('/') {
        Some((name, version)) => mv.starts_with(&format!("{name} v{version} ")),
        None => mv.strip_prefix(want).is_some_and(|rest| rest.starts_with(" v")),
    }
}

/// `GET /api/v1/devices`: devices by id, paged with `limit` and `cursor`, and filtered by class, tag, state and model.
#[utoipa::path(get, path = "/api/v1/devices", tag = "devices", operation_id = "list_devices",
    params(DeviceParams),
    responses((status = 200, description = "Devices by id.", body = Vec<DeviceView>,
            headers(
                ("x-next-cursor" = String, description = "The next page's cursor; absent on the last page."),
                ("link" = String, description = "The next page's address, `<...>; rel=\"next\"`; absent on the last page."),
            ))))]
pub async fn devices(
    State(s): State<AppState>,
    uri: axum::http::Uri,
    params: Result<QueryParams<DeviceParams>, QueryRejection>,
) -> Result<paging::Paged<DeviceView>, ApiError> {
    let QueryParams(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = paging::limit(p.limit)?;
    paging::one_of("state", p.state.as_deref(), &["online", "offline", "stale"])?;
    let now = edgeloop_common::unix_millis();
    let matching = s.registry.list().into_iter().filter(|d| {
        p.class.as_ref().is_none_or(|c| *c == d.class)
            && p.state.as_deref().is_none_or(|st| {
                crate::metrics::device_state(now.saturating_sub(d.last_seen_ms), s.offline_after_ms) == st
            })
            && p.model
                .as_deref()
                .is_none_or(|m| runs_model(d.last_status.as_ref().and_then(|st| st.model_version.as_deref()), m))
            && p.tag.as_ref().is_none_or(|t| s.rollouts.tags(&d.id).contains(t))
    });
    let (page, next) = paging::take(matching, |d| d.id.clone(), p.cursor.as_ref(), limit);
    Ok(paging::Paged { items: page.into_iter().map(|d| view(&s, d)).collect(), next, uri })
}

pub(crate) fn known_device(s: &AppState, id: &str) -> Result<Device, ApiError> {
    edgeloop_common::topics::validate_device_id(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    s.registry.get(id).ok_or_else(|| ApiError::not_found(format!("no device `{id}`")))
}

#[utoipa::path(get, path = "/api/v1/devices/{id}", tag = "devices", operation_id = "get_device",
    params(("id" = String, Path, description = "The device's id.", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "The device.", body = DeviceView), (status = 404, description = "No such device.", body = crate::web::error::ErrorBody)))]
pub async fn device(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<DeviceView>, ApiError> {
    let d = known_device(&s, &id)?;
    Ok(Json(view(&s, d)))
}

#[derive(utoipa::IntoParams, Deserialize, Debug)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct TelemetryParams {
    /// Event-time bounds in Unix milliseconds, inclusive.
    pub from: Option<u64>,
    pub to: Option<u64>,
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
    /// Paging: only records with a higher sequence number.
    pub after_seq: Option<u64>,
}

#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug)]
pub struct TelemetryPage {
    pub device: String,
    pub records: Vec<Record>,
    /// Pass as `after_seq` to get the next page; absent on the last page.
    pub next_after_seq: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/devices/{id}/telemetry", tag = "telemetry", operation_id = "device_telemetry",
    params(("id" = String, Path, description = "The device's id.", pattern = "^[A-Za-z0-9._-]{1,64}$"), TelemetryParams),
    responses((status = 200, description = "Stored records by sequence number.", body = TelemetryPage), (status = 404, description = "No such device.", body = crate::web::error::ErrorBody)))]
pub async fn telemetry(
    State(s): State<AppState>,
    Path(id): Path<String>,
    params: Result<QueryParams<TelemetryParams>, QueryRejection>,
) -> Result<Json<TelemetryPage>, ApiError> {
    let QueryParams(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    known_device(&s, &id)?;
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_LIMIT}, got {limit}")));
    }
    time_range(p.from, p.to)?;
    let q = Query { after_seq: p.after_seq.unwrap_or(0), from_ms: p.from, to_ms: p.to, limit };
    let store = s.store.clone();
    let dev = id.clone();
    let records = tokio::task::spawn_blocking(move || store.query(&dev, q)).await??;
    let next_after_seq = (records.len() == limit).then(|| records.last().map(|r| r.seq)).flatten();
    Ok(Json(TelemetryPage { device: id, records, next_after_seq }))
}

/// Refuses a time range whose `from` is after its `to` (both Unix milliseconds, either may be open).
pub(crate) fn time_range(from: Option<u64>, to: Option<u64>) -> Result<(), ApiError> {
    match (from, to) {
        (Some(f), Some(t)) if f > t => Err(ApiError::bad_request(format!("from ({f}) is after to ({t})"))),
        _ => Ok(()),
    }
}

/// `/metrics`: the Prometheus text format, or OpenMetrics for a scraper whose `Accept` asks for it. The
/// scrape-time gauges are read on the blocking pool (the store's size walks its files).
#[utoipa::path(get, path = "/metrics", tag = "metrics", operation_id = "metrics",
    responses((status = 200, description = "The Prometheus text format (OpenMetrics when `Accept` asks for `application/openmetrics-text`).",
        content(
            (String = "text/plain; version=0.0.4; charset=utf-8"),
            (String = "application/openmetrics-text; version=1.0.0; charset=utf-8"),
        ))))]
pub async fn metrics(State(s): State<AppState>, headers: axum::http::HeaderMap) -> Result<impl IntoResponse, ApiError> {
    let openmetrics = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let (body, content_type) = tokio::task::spawn_blocking(move || {
        let devices = s.registry.list();
        let rollouts = s.rollouts.list();
        let jobs = s.learning.list_jobs();
        let scrape = crate::metrics::Scrape {
            now_ms: edgeloop_common::unix_millis(),
            offline_after_ms: s.offline_after_ms,
            outbox_dropped: devices
                .iter()
                .map(|d| (d.class.clone(), d.last_status.as_ref().map_or(0, |st| st.dropped_total)))
                .collect(),
            devices: devices.into_iter().map(|d| (d.class, d.last_seen_ms, d.anomalies)).collect(),
            rollouts: rollouts.iter().map(|r| r.state.word()).collect(),
            live_rollouts: rollouts.iter().filter(|r| r.state.is_active()).map(rollout_scrape).collect(),
            jobs: jobs.iter().map(|j| j.state.word()).collect(),
            training: jobs
                .iter()
                .map(|j| crate::metrics::JobScrape {
                    class: j.class.clone(),
                    state: j.state.word(),
                    created_ms: j.created_ms,
                    finished_ms: j.finished_ms,
                })
                .collect(),
            drift: s.learning.classes.keys().filter_map(|c| s.learning.drift(c).map(|d| (c.clone(), d.psi))).collect(),
            store_bytes: s.store.db().db().size_on_disk().ok(),
            alerts_open: match s.alerts.open_by_class() {
                Ok(open) => open.into_iter().collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "open alerts not read for /metrics");
                    Vec::new()
                }
            },
            certificates: s.certificates.clone(),
        };
        s.metrics.render_for(&scrape, openmetrics)
    })
    .await?;
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body))
}

/// A live rollout as `/metrics` reads it: its gates as of the engine's last tick (computed now before the first).
fn rollout_scrape(r: &crate::rollout::engine::Rollout) -> crate::metrics::RolloutScrape {
    let gates = if r.gates.is_empty() { r.evaluate() } else { r.gates.clone() };
    let waiting = r.waiting.as_ref().and_then(|w| {
        serde_json::to_value(w).ok().and_then(|v| v.get("for").and_then(|f| f.as_str()).map(String::from))
    });
    crate::metrics::RolloutScrape {
        id: r.id.clone(),
        class: r.spec.class.clone(),
        stage: r.stage,
        stage_started_ms: r.stage_started_ms,
        waiting,
        gates: gates.into_iter().map(|g| (g.gate, g.value, g.threshold)).collect(),
        phases: r.phase_counts(),
    }
}
