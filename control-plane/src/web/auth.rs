//! Who may call what, and the audit log of every change.
//!
//! [`check_role`] is the layer each group of routes in [`super::router`] carries: it checks the bearer token
//! (or the dashboard's session cookie) against the group's role, answering 401 without a valid token and
//! 403 with too low a role; a browser without a session is sent to the login page instead. [`audit`] wraps
//! everything and writes each call that tried to change something (anything but GET and HEAD) to the audit
//! log, with who made it and how it ended.

use super::error::ApiError;
use super::{AppState, DASHBOARD_HEADER, SESSION_COOKIE};
use crate::access::operators::{Operator, Role};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Who made a call, as the audit log names them; the role layer leaves it on the response.
#[derive(Clone)]
struct Caller(String);

/// Why a call was refused, for the audit log; the role layer leaves it on a refusal.
#[derive(Clone)]
struct Refusal(String);

/// The layer each group of routes carries: lets a call through only with a token of at least the group's
/// role (when `api.require_tokens`), and leaves who made it on the response for [`audit`].
pub async fn check_role(State((s, need)): State<(AppState, Role)>, mut req: Request, next: Next) -> Response {
    if !s.require_tokens {
        return next.run(req).await;
    }
    match authenticate(&s, req.method(), req.uri(), req.headers(), need) {
        Ok(op) => {
            let caller = Caller(format!("{} ({})", op.name, op.id));
            req.extensions_mut().insert(op);
            let mut resp = next.run(req).await;
            resp.extensions_mut().insert(caller);
            resp
        }
        Err(refused) => *refused,
    }
}

/// The role a call to an unknown path would need: a viewer's to read, an operator's to change.
fn role_for(method: &Method) -> Role {
    if is_read(method) {
        Role::Viewer
    } else {
        Role::Operator
    }
}

fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// Checks the caller's token against `need`, or returns the refusal to send: a redirect to the login page
/// for a browser reading a page, 401 without a valid token, 403 with too low a role or for a change
/// authenticated by the session cookie alone without the dashboard's header.
fn authenticate(
    s: &AppState,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    need: Role,
) -> Result<Operator, Box<Response>> {
    let path = uri.path();
    let read = is_read(method);
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| broker_query_token(uri).map(|t| format!("Bearer {t}")));
    let cookie = session_cookie(headers).map(|t| format!("Bearer {t}"));
    let from_cookie = bearer.is_none() && cookie.is_some();
    let op = match s.operators.authenticate(bearer.or(cookie).as_deref()) {
        Ok(op) => op,
        Err(_) if read && super::dashboard::is_page(path) => {
            // A browser without a (valid) session goes to the login page, and comes back after it.
            let back = uri.path_and_query().map_or("/", |p| p.as_str());
            return Err(Box::new(
                axum::response::Redirect::to(&format!("/login?next={}", url_encode(back))).into_response(),
            ));
        }
        Err(e) => {
            s.metrics.api_refused("unauthorized");
            let mut r = ApiError { status: StatusCode::UNAUTHORIZED, error: "unauthorized", detail: e.to_string() }
                .into_response();
            r.headers_mut().insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
            r.extensions_mut().insert(Caller("unauthenticated".into()));
            r.extensions_mut().insert(Refusal(e.to_string()));
            return Err(Box::new(r));
        }
    };
    let caller = Caller(format!("{} ({})", op.name, op.id));
    let refuse = |detail: String| {
        s.metrics.api_refused("forbidden");
        let mut r =
            ApiError { status: StatusCode::FORBIDDEN, error: "forbidden", detail: detail.clone() }.into_response();
        r.extensions_mut().insert(caller.clone());
        r.extensions_mut().insert(Refusal(detail));
        Box::new(r)
    };
    if op.role < need {
        return Err(refuse(format!("{method} {path} needs the {need} role; token `{}` has {}", op.name, op.role)));
    }
    if from_cookie && !read && !headers.contains_key(DASHBOARD_HEADER) {
        return Err(refuse(format!(
            "{method} {path} was authenticated by the dashboard's session cookie only; changes made that way must \
             come from the dashboard (header {DASHBOARD_HEADER}), or send Authorization: Bearer"
        )));
    }
    Ok(op)
}

/// Unknown paths: after the same check as the routes around them, a JSON error under `/api/`, a page
/// elsewhere.
pub async fn fallback(State(s): State<AppState>, req: Request) -> Response {
    let (method, uri) = (req.method().clone(), req.uri().clone());
    let (who, caller) = if s.require_tokens {
        match authenticate(&s, &method, &uri, req.headers(), role_for(&method)) {
            Ok(op) => {
                let caller = Caller(format!("{} ({})", op.name, op.id));
                (super::dashboard::layout::Who::from(&op), Some(caller))
            }
            Err(refused) => return *refused,
        }
    } else {
        (super::dashboard::layout::Who::anyone(), None)
    };
    let mut resp = if super::dashboard::is_page(uri.path()) {
        super::dashboard::not_found(Some(&who), uri.path())
    } else {
        ApiError::not_found("no such route").into_response()
    };
    if let Some(c) = caller {
        resp.extensions_mut().insert(c);
    }
    resp
}

/// Writes a call that tried to change something to the audit log (reads are not audited), then returns its
/// answer; an audit log that cannot be written turns the answer into a 500. Refusals (401, 403) from one
/// source fold into one entry with a count (see [`crate::access::audit`]); the log cuts long paths and
/// details.
pub async fn audit(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    if is_read(&method) {
        return next.run(req).await;
    }
    let path = req.uri().path().to_string();
    let source =
        req.extensions().get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip().to_string());
    let query = req.uri().query().unwrap_or_default().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    let refused = status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN;
    if path.starts_with(crate::web::api::broker::PREFIX) && !refused {
        // A broker's question about a device changes nothing; only refused callers are worth a record.
        return resp;
    }
    let who = resp.extensions().get::<Caller>().map_or_else(|| "anonymous".to_string(), |c| c.0.clone());
    let detail = resp.extensions().get::<Refusal>().map_or(query, |r| r.0.clone());
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
    let write = move || if refused { audit.record_refusal(&entry) } else { audit.record(&entry) };
    match tokio::task::spawn_blocking(write).await {
        Ok(Ok(())) => resp,
        Ok(Err(e)) => ApiError::internal(format!("audit log: {e}")).into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

/// The token of a broker hook call that carries it as `?token=` (VerneMQ's webhooks and mosquitto-go-auth
/// cannot send headers of their own); only the broker hooks take a token that way.
fn broker_query_token(uri: &Uri) -> Option<String> {
    if !uri.path().starts_with(crate::web::api::broker::PREFIX) {
        return None;
    }
    uri.query()?.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == "token").map(|(_, v)| v.to_string())
}

/// The dashboard's session token from the `Cookie` header, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
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
