//! The operator's web: the HTTP API and the dashboard served beside it, and who may call what.
//!
//! - [`api`]: the JSON API's handlers.
//! - [`dashboard`]: the operator dashboard in the browser, served at `/`.
//! - [`auth`]: bearer tokens and the dashboard's session cookie checked against each route's role, and the
//!   audit log of every change.
//! - [`serve`]: the accept loop: TLS, timeouts, connection cap.
//!
//! [`router`] is the one table of routes and the role each needs. Neither `api` nor `dashboard` knows the
//! other: both read the [`AppState`] defined here.

pub(crate) mod api;
pub(crate) mod auth;
pub(crate) mod dashboard;
pub(crate) mod error;
pub mod serve;

use crate::access::operators::Role;
use axum::extract::DefaultBodyLimit;
use axum::middleware::from_fn_with_state;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;
use std::time::Instant;

/// What every handler reads: the stores and services of the control plane.
#[derive(Clone)]
pub struct AppState {
    pub store: crate::fleet::telemetry::TelemetryStore,
    pub logs: crate::fleet::LogStore,
    pub registry: Arc<crate::fleet::devices::Registry>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub started: Instant,
    pub offline_after_ms: u64,
    pub learning: Arc<crate::ml::jobs::Learning>,
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
    pub downloads: Arc<api::learning::Downloads>,
    /// The certificates served (`tls`: the API's and the broker's), with when they expire, Unix seconds.
    pub certificates: Vec<(String, u64)>,
}

/// The cookie the dashboard keeps the operator's token in (HttpOnly, SameSite=Strict).
pub const SESSION_COOKIE: &str = "edgeloop_session";
/// The header the dashboard's script sends with every change. A change authenticated by the session cookie
/// alone is refused without it: a form or script on another site cannot add it.
pub const DASHBOARD_HEADER: &str = "x-edgeloop-dashboard";

/// Every route, grouped by the role it needs. A group's `route_layer` checks the caller's token (or the
/// dashboard's session cookie) before its handlers run; the outer layer writes every change to the audit
/// log. Unknown paths need a viewer (reads) or an operator (changes), like the routes around them.
pub fn router(state: AppState) -> Router {
    // Open: health; artifacts (devices fetch them; they are content-addressed and only run after their signed
    // manifest checks out); enrollment (it carries its own token); the login page and static assets.
    let open = Router::new()
        .route("/api/v1/health", get(api::health))
        .route("/api/v1/artifacts/{sha256}", get(api::learning::artifact))
        .route("/api/v1/enroll", post(api::identity::enroll))
        .merge(dashboard::open_routes());
    let viewer = Router::new()
        .route("/api/v1/devices", get(api::devices))
        .route("/api/v1/devices/{id}", get(api::device))
        .route("/api/v1/devices/{id}/telemetry", get(api::telemetry))
        .route("/api/v1/devices/{id}/logs", get(api::logs::device))
        .route("/api/v1/logs", get(api::logs::search))
        .route("/api/v1/jobs", get(api::learning::jobs))
        .route("/api/v1/jobs/{id}", get(api::learning::job))
        .route("/api/v1/models", get(api::learning::models))
        .route("/api/v1/models/{name}/{version}", get(api::learning::model))
        .route("/api/v1/models/{name}/{version}/manifest", get(api::learning::manifest))
        .route("/api/v1/labels", get(api::learning::labels))
        .route("/api/v1/datasets/{class}", get(api::learning::dataset))
        .route("/api/v1/triggers", get(api::learning::triggers))
        .route("/api/v1/rollouts", get(api::rollouts::list))
        .route("/api/v1/rollouts/{id}", get(api::rollouts::get))
        .route("/api/v1/rollouts/{id}/devices", get(api::rollouts::devices))
        .route("/api/v1/windows", get(api::rollouts::windows))
        .route("/api/v1/devices/{id}/tags", get(api::rollouts::tags))
        .route("/api/v1/bundles", get(api::rollouts::bundles))
        .route("/api/v1/configs", get(api::configs::list))
        .route("/api/v1/agent-releases", get(api::releases::list))
        .route("/api/v1/configs/{class}/{version}", get(api::configs::get))
        .route("/api/v1/audit", get(api::rollouts::audit))
        .route("/api/v1/enrollments", get(api::identity::enrolled))
        .route("/api/v1/signing-key", get(api::rollouts::signing_key))
        .route("/metrics", get(api::metrics))
        .merge(dashboard::pages())
        .route_layer(from_fn_with_state((state.clone(), Role::Viewer), auth::check_role));
    let operator = Router::new()
        .route("/api/v1/train", post(api::learning::train))
        .route(
            "/api/v1/models",
            post(api::rollouts::upload).layer(DefaultBodyLimit::max(api::rollouts::MAX_UPLOAD_BYTES)),
        )
        .route("/api/v1/labels", post(api::learning::add_label))
        .route("/api/v1/rollouts", post(api::rollouts::create))
        .route("/api/v1/rollouts/{id}/{action}", post(api::rollouts::act))
        .route("/api/v1/rollouts/{id}", axum::routing::delete(api::rollouts::archive))
        .route("/api/v1/bundles", post(api::rollouts::make_bundle))
        .route(
            "/api/v1/configs",
            post(api::configs::publish).layer(DefaultBodyLimit::max(api::configs::MAX_CONFIG_BYTES)),
        )
        .route(
            "/api/v1/agent-releases",
            post(api::releases::publish).layer(DefaultBodyLimit::max(api::releases::MAX_AGENT_BYTES)),
        )
        .route("/api/v1/devices/{id}/tags", post(api::rollouts::set_tags))
        .route_layer(from_fn_with_state((state.clone(), Role::Operator), auth::check_role));
    let admin = Router::new()
        .route("/api/v1/enrollment-tokens", get(api::identity::tokens).post(api::identity::create_token))
        .route("/api/v1/enrollment-tokens/{id}/revoke", post(api::identity::revoke_token))
        .route("/api/v1/devices/{id}/revoke", post(api::identity::revoke))
        .route("/api/v1/devices/{id}", axum::routing::delete(api::identity::decommission))
        .route_layer(from_fn_with_state((state.clone(), Role::Admin), auth::check_role));
    Router::new()
        .merge(open)
        .merge(viewer)
        .merge(operator)
        .merge(admin)
        .fallback(auth::fallback)
        .layer(from_fn_with_state(state.clone(), auth::audit))
        .with_state(state)
}

pub use api::logs::LogPageView;
pub use api::rollouts::SigningKey;
pub use api::{DeviceView, TelemetryPage};
