//! The operator HTTP API (axum): health, devices, telemetry and metrics here; training jobs, models,
//! artifacts and labels in [`learning`].
//!
//! Handlers are thin: they validate the request, call the store or registry (scans run on the blocking
//! pool) and shape JSON. Every error is an [`error::ApiError`].

pub mod error;
pub mod identity;
pub mod learning;
pub mod rollouts;
pub mod serve;

use crate::ml::jobs::Learning;
use crate::metrics::Metrics;
use crate::access::operators::Role;
use crate::fleet::devices::{Device, Registry};
use crate::fleet::telemetry::{Query, TelemetryStore};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query as QueryParams, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use edgeloop_common::envelope::Record;
use error::ApiError;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;

/// Largest `limit` a telemetry query may ask for.
pub const MAX_LIMIT: usize = 10_000;
const DEFAULT_LIMIT: usize = 1_000;

#[derive(Clone)]
pub struct AppState {
    pub store: TelemetryStore,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    pub offline_after_ms: u64,
    pub learning: Arc<Learning>,
    pub rollouts: Arc<crate::rollout::Rollouts>,
    pub audit: Arc<crate::access::audit::AuditLog>,
    pub operators: Arc<crate::access::operators::TokenStore>,
    /// Whether the API asks for bearer tokens (`api.require_tokens`).
    pub require_tokens: bool,
    pub enrollment: Arc<crate::fleet::enrollment::Enrollment>,
    pub front: Arc<crate::broker::front::Front>,
    /// Whether the API is served over TLS (the dashboard's session cookie is then `Secure`).
    pub tls: bool,
    /// Slots for artifact downloads (`api.max_downloads`), which need no token.
    pub downloads: Arc<learning::Downloads>,
}

/// The cookie the dashboard keeps the operator's token in (HttpOnly, SameSite=Strict).
pub const SESSION_COOKIE: &str = "edgeloop_session";
/// The header the dashboard's script sends with every change. A change authenticated by the session cookie
/// alone is refused without it: a form or script on another site cannot add it.
pub const DASHBOARD_HEADER: &str = "x-edgeloop-dashboard";

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/v1/health", get(health))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/devices/{id}", get(device))
        .route("/api/v1/devices/{id}/telemetry", get(telemetry))
        .route("/api/v1/train", post(learning::train))
        .route("/api/v1/jobs", get(learning::jobs))
        .route("/api/v1/jobs/{id}", get(learning::job))
        .route(
            "/api/v1/models",
            get(learning::models)
                .post(rollouts::upload)
                .layer(axum::extract::DefaultBodyLimit::max(rollouts::MAX_UPLOAD_BYTES)),
        )
        .route("/api/v1/models/{name}/{version}", get(learning::model))
        .route("/api/v1/artifacts/{sha256}", get(learning::artifact))
        .route("/api/v1/labels", get(learning::labels).post(learning::add_label))
        .route("/api/v1/triggers", get(learning::triggers))
        .route("/api/v1/rollouts", get(rollouts::list).post(rollouts::create))
        .route("/api/v1/rollouts/{id}", get(rollouts::get))
        .route("/api/v1/rollouts/{id}/{action}", post(rollouts::act))
        .route("/api/v1/devices/{id}/tags", post(rollouts::set_tags))
        .route("/api/v1/audit", get(rollouts::audit))
        .route("/api/v1/enroll", post(identity::enroll))
        .route("/api/v1/enrollment-tokens", get(identity::tokens).post(identity::create_token))
        .route("/api/v1/enrollment-tokens/{id}/revoke", post(identity::revoke_token))
        .route("/api/v1/enrollments", get(identity::enrolled))
        .route("/api/v1/devices/{id}/revoke", post(identity::revoke))
        .route("/api/v1/signing-key", get(rollouts::signing_key))
        .route("/metrics", get(metrics))
        .merge(crate::web::dashboard::routes())
        .fallback(fallback)
        .layer(axum::middleware::from_fn_with_state(state.clone(), authorize_and_audit))
        .with_state(state)
}

/// The role a request needs, or `None` for the few open routes: health, artifacts (devices fetch them;
/// they are content-addressed and only run after their signed manifest checks out), enrollment (it
/// carries its own token), and the dashboard's login page and static assets. Dashboard pages are reads.
pub fn required_role(method: &axum::http::Method, path: &str) -> Option<Role> {
    let read = method == axum::http::Method::GET || method == axum::http::Method::HEAD;
    if path == "/api/v1/health"
        || (read && path.starts_with("/api/v1/artifacts/"))
        || path == "/api/v1/enroll"
        || crate::web::dashboard::is_open(path)
    {
        return None;
    }
    let admin = path.starts_with("/api/v1/tokens")
        || path.starts_with("/api/v1/enrollment-tokens")
        || (path.starts_with("/api/v1/devices/") && path.ends_with("/revoke"));
    Some(if admin {
        Role::Admin
    } else if read {
        Role::Viewer
    } else {
        Role::Operator
    })
}

/// Writes a call that tried to change something to the audit log (reads are not audited), then returns its
/// answer; an audit log that cannot be written turns the answer into a 500. Refusals (401, 403) from one
/// source fold into one entry with a count (see [`crate::access::audit`]); the log cuts long paths and details.
async fn audited(
    s: &AppState,
    who: String,
    source: Option<String>,
    method: &axum::http::Method,
    path: &str,
    resp: axum::response::Response,
    detail: String,
) -> axum::response::Response {
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        return resp;
    }
    let status = resp.status();
    let entry = crate::access::audit::AuditEntry {
        source,
        // The log cuts a long path or detail to its bound, and says how long it was.
        ..crate::access::audit::AuditEntry::new(
            edgeloop_common::unix_millis(),
            who,
            format!("{method} {path}"),
            status.as_u16(),
            detail,
        )
    };
    let audit = s.audit.clone();
    let refused = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
    let write = move || if refused { audit.record_refusal(&entry) } else { audit.record(&entry) };
    match tokio::task::spawn_blocking(write).await {
        Ok(Ok(())) => resp,
        Ok(Err(e)) => ApiError::internal(format!("audit log: {e}")).into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

/// Checks the bearer token against the route's role (401 without a valid token, 403 with too low a role),
/// then writes every mutating call (anything but GET and HEAD) to the audit log with who made it and how it
/// ended.
async fn authorize_and_audit(
    State(s): State<AppState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let read = method == axum::http::Method::GET || method == axum::http::Method::HEAD;
    let source =
        req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip().to_string());
    let mut who = "anonymous".to_string();
    if let (Some(need), true) = (required_role(&method, &path), s.require_tokens) {
        let bearer = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
        let cookie = session_cookie(req.headers()).map(|t| format!("Bearer {t}"));
        let from_cookie = bearer.is_none() && cookie.is_some();
        let op = match s.operators.authenticate(bearer.or(cookie).as_deref()) {
            Ok(op) => op,
            Err(_) if read && crate::web::dashboard::is_page(&path) => {
                // A browser without a (valid) session goes to the login page, and comes back after it.
                let back = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_string();
                let query: String = url_encode(&back);
                return axum::response::Redirect::to(&format!("/login?next={query}")).into_response();
            }
            Err(e) => {
                s.metrics.reject("api_unauthorized");
                let mut r = ApiError { status: StatusCode::UNAUTHORIZED, error: "unauthorized", detail: e.to_string() }
                    .into_response();
                r.headers_mut().insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
                return audited(&s, "unauthenticated".into(), source, &method, &path, r, e.to_string()).await;
            }
        };
        if op.role < need {
            s.metrics.reject("api_forbidden");
            let detail = format!("{method} {path} needs the {need} role; token `{}` has {}", op.name, op.role);
            let r =
                ApiError { status: StatusCode::FORBIDDEN, error: "forbidden", detail: detail.clone() }.into_response();
            return audited(&s, format!("{} ({})", op.name, op.id), source, &method, &path, r, detail).await;
        }
        who = format!("{} ({})", op.name, op.id);
        if from_cookie && !read && !req.headers().contains_key(DASHBOARD_HEADER) {
            s.metrics.reject("api_forbidden");
            let detail = format!(
                "{method} {path} was authenticated by the dashboard's session cookie only; changes made that way must \
                 come from the dashboard (header {DASHBOARD_HEADER}), or send Authorization: Bearer"
            );
            let r =
                ApiError { status: StatusCode::FORBIDDEN, error: "forbidden", detail: detail.clone() }.into_response();
            return audited(&s, who, source, &method, &path, r, detail).await;
        }
        req.extensions_mut().insert(op);
    }
    if read {
        return next.run(req).await;
    }
    let detail = req.uri().query().unwrap_or_default().to_string();
    let resp = next.run(req).await;
    audited(&s, who, source, &method, &path, resp, detail).await
}

/// The dashboard's session token from the `Cookie` header, if any.
pub fn session_cookie(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, v)| *k == SESSION_COOKIE && !v.is_empty())
        .map(|(_, v)| v.to_string())
}

/// Percent-encodes everything but unreserved characters and `/`.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Unknown paths: a JSON error under `/api/`, a page elsewhere.
async fn fallback(uri: axum::http::Uri, who: crate::web::dashboard::layout::Who) -> axum::response::Response {
    if crate::web::dashboard::is_page(uri.path()) {
        crate::web::dashboard::not_found(Some(&who), uri.path())
    } else {
        ApiError::not_found("no such route").into_response()
    }
}

#[derive(Serialize)]
struct Health {
    status: &'static str,
    version: &'static str,
    uptime_s: u64,
    devices: usize,
}

async fn health(State(s): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        uptime_s: s.started.elapsed().as_secs(),
        devices: s.registry.len(),
    })
}

/// A device as the API shows it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct DeviceView {
    #[serde(flatten)]
    pub device: Device,
    pub online: bool,
}

fn view(d: Device, offline_after_ms: u64) -> DeviceView {
    let online = edgeloop_common::unix_millis().saturating_sub(d.last_seen_ms) < offline_after_ms;
    DeviceView { device: d, online }
}

async fn devices(State(s): State<AppState>) -> Json<Vec<DeviceView>> {
    Json(s.registry.list().into_iter().map(|d| view(d, s.offline_after_ms)).collect())
}

fn known_device(s: &AppState, id: &str) -> Result<Device, ApiError> {
    edgeloop_common::topics::validate_device_id(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    s.registry.get(id).ok_or_else(|| ApiError::not_found(format!("no device `{id}`")))
}

async fn device(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<DeviceView>, ApiError> {
    let d = known_device(&s, &id)?;
    Ok(Json(view(d, s.offline_after_ms)))
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct TelemetryParams {
    /// Event-time bounds in Unix milliseconds, inclusive.
    pub from: Option<u64>,
    pub to: Option<u64>,
    pub limit: Option<usize>,
    /// Paging: only records with a higher sequence number.
    pub after_seq: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct TelemetryPage {
    pub device: String,
    pub records: Vec<Record>,
    /// Pass as `after_seq` to get the next page; absent on the last page.
    pub next_after_seq: Option<u64>,
}

async fn telemetry(
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
    if let (Some(f), Some(t)) = (p.from, p.to) {
        if f > t {
            return Err(ApiError::bad_request(format!("from ({f}) is after to ({t})")));
        }
    }
    let q = Query { after_seq: p.after_seq.unwrap_or(0), from_ms: p.from, to_ms: p.to, limit };
    let store = s.store.clone();
    let dev = id.clone();
    let records = tokio::task::spawn_blocking(move || store.query(&dev, q))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
    let next_after_seq = (records.len() == limit).then(|| records.last().map(|r| r.seq)).flatten();
    Ok(Json(TelemetryPage { device: id, records, next_after_seq }))
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render(s.registry.len()))
}
