//! The operator dashboard: HTML pages rendered on the server (maud), SVG charts drawn on the server, and a
//! small hand-written script for live updates and the buttons. Everything is built into the binary, so it
//! works on a factory network with no internet.
//!
//! Pages read the same state the JSON API serves; every change (rollout actions, starting a rollout or a
//! training) goes through the JSON API itself, so it is authorised and audited in one place.
//!
//! Login: the operator pastes a bearer token; it is kept in an HttpOnly, SameSite=Strict cookie, which the
//! API accepts in place of the `Authorization` header. A change made with that cookie must also carry the
//! [`crate::web::DASHBOARD_HEADER`] header, which only same-origin scripts can send.
//!
//! - [`layout`]: the page frame, navigation, who is logged in, time formatting.
//! - [`fleet`]: the fleet overview and the device page.
//! - [`models`]: model versions, their lineage, trials, promotion and drift.
//! - [`rollouts`]: rollouts, their stages and gates, the start form, the audit log.
//! - [`svg`]: the charts.

pub mod fleet;
pub mod layout;
pub mod models;
pub mod rollouts;
pub mod svg;

use crate::web::{AppState, SESSION_COOKIE};
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use layout::{page_error, Who};
use maud::html;
use serde::Deserialize;

const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
/// How long a login lasts, seconds.
const SESSION_SECS: u64 = 12 * 3600;

/// The dashboard's pages; they need a viewer's token or session (see [`crate::web::router`]).
pub fn pages() -> Router<AppState> {
    Router::new()
        .route("/", get(fleet::overview))
        .route("/devices/{id}", get(fleet::device))
        .route("/models", get(models::list))
        .route("/models/{name}/{version}", get(models::detail))
        .route("/rollouts", get(rollouts::list))
        .route("/rollouts/{id}", get(rollouts::detail))
        .route("/audit", get(rollouts::audit))
}

/// The routes anyone may fetch ([`is_open`]): the login page, logging out and the static assets.
pub fn open_routes() -> Router<AppState> {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", axum::routing::post(logout))
        .route("/assets/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/assets/app.css", get(|| async { asset("text/css; charset=utf-8", APP_CSS) }))
}

/// Paths anyone may fetch: the login page and the static assets.
pub fn is_open(path: &str) -> bool {
    path == "/login" || path == "/logout" || path.starts_with("/assets/")
}

/// Whether a path is a dashboard page (as opposed to the JSON API or the metrics).
pub fn is_page(path: &str) -> bool {
    !path.starts_with("/api/") && path != "/metrics"
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

/// Where to go after logging in: a path on this site only, never another site. Anything else goes to the
/// dashboard's root.
fn local_target(next: Option<&str>) -> String {
    match next {
        Some(n) if is_same_site_path(n) && !is_open(n) => n.to_string(),
        _ => "/".to_string(),
    }
}

/// Longest `next` the login page carries back.
const MAX_NEXT_LEN: usize = 2048;

/// Whether `target` can only mean an absolute path on this site, however a browser reads it: one leading `/`,
/// no `//` anywhere, no backslash (browsers read `\` as `/`), and no control character or whitespace (browsers
/// drop tab and newline from URLs, so `/\t/evil.example/` would become `//evil.example/`). The path part (up
/// to `?` or `#`) must pass the same test after one more round of percent-decoding, so an encoded form
/// (`/%2F/evil`, `/%09/evil`) that something decodes again cannot turn into another site either.
fn is_same_site_path(target: &str) -> bool {
    fn plain(t: &str) -> bool {
        t.starts_with('/')
            && !t.contains("//")
            && !t.contains('\\')
            && !t.chars().any(|c| c.is_control() || c.is_whitespace())
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    target.len() <= MAX_NEXT_LEN && plain(target) && plain(&percent_decode(path))
}

/// Decodes `%XX` escapes (invalid ones stay as they are); bytes that are not UTF-8 become U+FFFD.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Deserialize, Debug, Default)]
pub struct LoginQuery {
    next: Option<String>,
}

async fn login_page(State(s): State<AppState>, Query(q): Query<LoginQuery>) -> Response {
    if !s.require_tokens {
        return Redirect::to("/").into_response();
    }
    login_form(StatusCode::OK, q.next.as_deref(), None)
}

fn login_form(status: StatusCode, next: Option<&str>, error: Option<&str>) -> Response {
    let body = html! {
        section.login {
            h1 { "Log in to edgeloop" }
            p { "Paste an operator token (" code { "elt_…" } "). The control plane wrote the first admin token to "
                code { "<data_dir>/admin.token" } "; admins make more with "
                code { "edgeloop-control-plane tokens create" } "." }
            @if let Some(e) = error { p.error role="alert" id="login-error" { (e) } }
            form method="post" action="/login" {
                input type="hidden" name="next" value=(local_target(next));
                label for="token" { "Token" }
                input #token type="password" name="token" autocomplete="off" required autofocus;
                button type="submit" { "Log in" }
            }
        }
    };
    (status, layout::bare("Log in", body)).into_response()
}

#[derive(Deserialize, Debug)]
pub struct LoginForm {
    token: String,
    next: Option<String>,
}

async fn login(State(s): State<AppState>, Form(f): Form<LoginForm>) -> Response {
    let token = f.token.trim();
    let op = match s.operators.authenticate(Some(&format!("Bearer {token}"))) {
        Ok(op) => op,
        Err(e) => {
            s.metrics.api_refused("unauthorized");
            return login_form(
                StatusCode::UNAUTHORIZED,
                f.next.as_deref(),
                Some(&format!("That token was not accepted: {e}.")),
            );
        }
    };
    tracing::info!(operator = %op.name, role = %op.role, "dashboard login");
    let secure = if s.tls { "; Secure" } else { "" };
    let cookie = format!("{SESSION_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECS}{secure}");
    let mut r = Redirect::to(&local_target(f.next.as_deref())).into_response();
    match HeaderValue::from_str(&cookie) {
        Ok(v) => {
            r.headers_mut().insert(header::SET_COOKIE, v);
            r
        }
        Err(_) => {
            login_form(StatusCode::BAD_REQUEST, f.next.as_deref(), Some("That token has characters a token never has."))
        }
    }
}

async fn logout() -> Response {
    let mut r = Redirect::to("/login").into_response();
    let clear = format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0");
    r.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_str(&clear).expect("a static cookie is a valid header"));
    r
}

/// A page for a path no route serves.
pub fn not_found(who: Option<&Who>, path: &str) -> Response {
    page_error(who, StatusCode::NOT_FOUND, &format!("There is no page at {path}."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_only_returns_to_local_pages() {
        assert_eq!(local_target(Some("/rollouts/r1")), "/rollouts/r1");
        assert_eq!(local_target(Some("/models/m/3?tab=trials&x=a%20b")), "/models/m/3?tab=trials&x=a%20b");
        assert_eq!(local_target(Some("https://evil.example/")), "/");
        assert_eq!(local_target(Some("//evil.example/")), "/");
        assert_eq!(local_target(Some("/\\evil.example")), "/");
        assert_eq!(local_target(Some("/login")), "/");
        assert_eq!(local_target(None), "/");
    }

    /// The attack: a login link whose `next` a browser would follow to another site. Each `next` here is what
    /// the login form receives after the form or query decoding; the encoded ones are what a second decoding
    /// would turn into another site.
    #[test]
    fn login_next_stays_on_the_site() {
        let attacks = [
            "/\t/evil.example/",
            "/\n/evil.example/",
            "/\r\n/evil.example/",
            "/ /evil.example/",
            "/\u{0}/evil.example/",
            "/\u{a0}/evil.example/",
            "\t//evil.example/",
            "//evil",
            "///evil",
            "/\\evil",
            "\\\\evil",
            "/x/..//evil",
            "https://evil",
            "http:evil",
            "javascript:alert(1)",
            "evil.example",
            "",
            "/%2F/evil.example/",
            "/%2f%2fevil.example/",
            "/%5Cevil.example",
            "/%09/evil.example/",
            "/%0a/evil.example/",
            "/%20/evil.example/",
        ];
        for next in attacks {
            assert_eq!(local_target(Some(next)), "/", "next = {next:?}");
        }
        let long = format!("/{}", "a".repeat(MAX_NEXT_LEN));
        assert_eq!(local_target(Some(&long)), "/");
        for fine in ["/", "/rollouts/r1", "/devices/dev-1?range=1h", "/audit?limit=50"] {
            assert_eq!(local_target(Some(fine)), fine);
        }
    }

    #[test]
    fn pages_and_open_paths() {
        assert!(is_page("/") && is_page("/rollouts/x") && !is_page("/api/v1/devices") && !is_page("/metrics"));
        assert!(is_open("/login") && is_open("/assets/app.js") && !is_open("/") && !is_open("/audit"));
    }
}
