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
use axum::http::header;
use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::Router;
use std::sync::Arc;
use std::time::Instant;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// What every handler reads: the stores and services of the control plane.
#[derive(Clone)]
pub struct AppState {
    pub store: crate::fleet::telemetry::TelemetryStore,
    pub logs: crate::fleet::LogStore,
    pub alerts: crate::fleet::AlertStore,
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
    /// Provisioning into an external mosquitto's dynamic-security plugin, when configured.
    pub provisioner: Option<Arc<crate::broker::dynsec::Dynsec>>,
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
///
/// API routes are registered with `routes!`, which adds each to the router and to the OpenAPI document
/// ([`api::openapi`]) at once; the document is served at [`api::openapi::PATH`].
pub fn router(state: AppState) -> Router {
    let layer_state = state.clone();
    let (router, doc) = routes(&move |group, role| {
        group.route_layer(from_fn_with_state((layer_state.clone(), role), auth::check_role))
    })
    .split_for_parts();
    let doc = std::sync::Arc::new(doc.to_pretty_json().unwrap_or_default());
    let serve_doc = get(move || async move { ([(header::CONTENT_TYPE, "application/json")], doc.to_string()) });
    router
        .route(api::openapi::PATH, serve_doc)
        .fallback(auth::fallback)
        .layer(axum::middleware::from_fn(error::uniform))
        .layer(from_fn_with_state(state.clone(), auth::audit))
        .with_state(state)
}

/// The OpenAPI document alone, as `GET /api/v1/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes(&|group, _| group).split_for_parts().1
}

/// A group of routes with the check of the role it needs.
type Guard<'a> = &'a dyn Fn(OpenApiRouter<AppState>, Role) -> OpenApiRouter<AppState>;

/// The routes and their description, before the state and the outer layers; `guard` adds each group's role
/// check.
fn routes(guard: Guard) -> OpenApiRouter<AppState> {
    // Open: health; artifacts (devices fetch them; they are content-addressed and only run after their signed
    // manifest checks out); enrollment (it carries its own token); the login page and static assets.
    let open = OpenApiRouter::new()
        .routes(routes!(api::health))
        .routes(routes!(api::learning::artifact))
        .routes(routes!(api::identity::enroll))
        .merge(dashboard::open_routes().into());
    let viewer = OpenApiRouter::new()
        .routes(routes!(api::devices))
        .routes(routes!(api::device))
        .routes(routes!(api::telemetry))
        .routes(routes!(api::logs::device))
        .routes(routes!(api::logs::search))
        .routes(routes!(api::alerts::list))
        .routes(routes!(api::alerts::get))
        .routes(routes!(api::learning::jobs))
        .routes(routes!(api::learning::job))
        .routes(routes!(api::learning::models))
        .routes(routes!(api::learning::model))
        .routes(routes!(api::learning::manifest))
        .routes(routes!(api::learning::labels))
        .routes(routes!(api::learning::dataset))
        .routes(routes!(api::learning::triggers))
        .routes(routes!(api::rollouts::list))
        .routes(routes!(api::rollouts::get))
        .routes(routes!(api::rollouts::devices))
        .routes(routes!(api::rollouts::windows))
        .routes(routes!(api::rollouts::tags))
        .routes(routes!(api::rollouts::bundles))
        .routes(routes!(api::configs::list))
        .routes(routes!(api::releases::list))
        .routes(routes!(api::configs::get))
        .routes(routes!(api::rollouts::audit))
        .routes(routes!(api::identity::enrolled))
        .routes(routes!(api::rollouts::signing_key))
        .routes(routes!(api::metrics));
    let viewer = guard(api::openapi::guarded(viewer, Role::Viewer).merge(dashboard::pages().into()), Role::Viewer);
    let operator = OpenApiRouter::new()
        .routes(routes!(api::learning::train))
        .routes(limited(routes!(api::rollouts::upload), api::rollouts::MAX_UPLOAD_BYTES))
        .routes(routes!(api::learning::add_label))
        .routes(routes!(api::rollouts::create))
        .routes(routes!(api::rollouts::act))
        .routes(routes!(api::rollouts::archive))
        .routes(routes!(api::rollouts::make_bundle))
        .routes(limited(routes!(api::configs::publish), api::configs::MAX_CONFIG_BYTES))
        .routes(limited(routes!(api::releases::publish), api::releases::MAX_AGENT_BYTES))
        .routes(routes!(api::rollouts::set_tags))
        .routes(routes!(api::alerts::acknowledge));
    let operator = guard(api::openapi::guarded(operator, Role::Operator), Role::Operator);
    let admin = OpenApiRouter::new()
        .routes(routes!(api::identity::tokens, api::identity::create_token))
        .routes(routes!(api::identity::revoke_token))
        .routes(routes!(api::identity::revoke))
        .routes(routes!(api::identity::decommission));
    let admin = guard(api::openapi::guarded(admin, Role::Admin), Role::Admin);
    let broker = OpenApiRouter::new()
        .routes(routes!(api::broker::emqx_authn))
        .routes(routes!(api::broker::emqx_authz))
        .routes(routes!(api::broker::vernemq_hook))
        .routes(routes!(api::broker::go_auth_user))
        .routes(routes!(api::broker::go_auth_superuser))
        .routes(routes!(api::broker::go_auth_acl));
    let broker = guard(api::openapi::guarded(broker, Role::Broker), Role::Broker);
    let mut all = OpenApiRouter::with_openapi(api::openapi::frame())
        .merge(open)
        .merge(viewer)
        .merge(operator)
        .merge(admin)
        .merge(broker);
    api::openapi::complete(all.get_openapi_mut());
    all
}

/// A route whose body may be larger than axum's 2 MiB default.
fn limited(
    (schemas, paths, route): utoipa_axum::router::UtoipaMethodRouter<AppState>,
    max: usize,
) -> utoipa_axum::router::UtoipaMethodRouter<AppState> {
    (schemas, paths, route.layer(DefaultBodyLimit::max(max)))
}

pub use api::logs::LogPageView;
pub use api::rollouts::SigningKey;
pub use api::{DeviceView, TelemetryPage};

#[cfg(test)]
mod tests {
    /// Every API route is registered with `routes!`, which describes it in the OpenAPI document: none is
    /// added with a plain `.route(...)` but the document's own.
    #[test]
    fn every_api_route_is_in_the_openapi_document() {
        let source = include_str!("mod.rs").split("#[cfg(test)]").next().unwrap();
        let plain: Vec<&str> =
            source.lines().filter(|l| l.contains(".route(") && !l.contains("api::openapi::PATH")).collect();
        assert!(plain.is_empty(), "routes outside the OpenAPI document: {plain:?}");
        let doc = super::openapi();
        let operations: usize = serde_json::to_value(&doc).unwrap()["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|p| p.as_object().unwrap().len())
            .sum();
        assert_eq!(operations, 53);
    }
}
