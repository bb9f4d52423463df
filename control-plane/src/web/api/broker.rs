//! Authentication and authorisation hooks for external brokers, in the request and response shapes the brokers
//! themselves use, so that EMQX, VerneMQ and mosquitto (with mosquitto-go-auth) admit enrolled devices and keep
//! them to their topics without a password file. The decisions are [`crate::broker::hooks`]'; this module only
//! speaks each broker's dialect. They need the `broker` role (or any higher one); a broker that cannot send an
//! `Authorization` header (VerneMQ, mosquitto-go-auth) passes its token as `?token=` instead.
//!
//! - EMQX 5: `POST /api/v1/broker/emqx/authn` (HTTP authenticator) and `/api/v1/broker/emqx/authz` (HTTP
//!   authoriser); JSON bodies of strings, answers `{"result": "allow" | "deny" | "ignore"}`.
//! - VerneMQ: `POST /api/v1/broker/vernemq`, for the `auth_on_register`, `auth_on_publish` and
//!   `auth_on_subscribe` webhooks (and their `_m5` forms), told apart by the `vernemq-hook` header; answers
//!   `{"result": "ok"}`, `{"result": {"error": "..."}}` or `{"result": "next"}`.
//! - mosquitto-go-auth's HTTP back-end, with `http_params_mode json` and `http_response_mode json`:
//!   `POST /api/v1/broker/go-auth/user`, `/superuser` and `/acl`; answers `{"ok": true}` or
//!   `{"ok": false, "error": "..."}`.

use crate::broker::hooks::{self, Access, Verdict};
use crate::web::error::{ApiError, ApiJson};
use crate::web::AppState;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Where the hooks live; the audit log records only their refusals (a broker calls them for every connection
/// and, without a cache, every message, and they change nothing).
pub const PREFIX: &str = "/api/v1/broker/";

fn log(hook: &str, who: &str, v: &Verdict) {
    if let Verdict::Deny(why) = v {
        tracing::debug!(hook, client = %who, reason = %why, "broker hook refused");
    }
}

/// A login to check, as EMQX's HTTP authenticator sends it with a body template such as
/// `{"username": "${username}", "password": "${password}", "clientid": "${clientid}"}` (placeholders render
/// as strings, missing values as ""), and as mosquitto-go-auth's user check sends it in JSON mode. Other
/// fields (`peerhost`, ...) are ignored.
#[derive(utoipa::ToSchema, Deserialize, Debug)]
pub struct Login {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub password: String,
    #[serde(default)]
    pub clientid: String,
}

/// What EMQX's HTTP authoriser sends, with a body template such as `{"username": "${username}", "clientid":
/// "${clientid}", "topic": "${topic}", "action": "${action}"}`; `action` is `publish` or `subscribe`.
#[derive(utoipa::ToSchema, Deserialize, Debug)]
pub struct EmqxAuthz {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub clientid: String,
    pub topic: String,
    pub action: String,
}

/// EMQX's answer: `allow`, `deny`, or `ignore` (the client is not an enrolled device; EMQX asks its next
/// authenticator or source).
#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct EmqxResult {
    pub result: String,
    /// Always false: no device is exempt from the topic rules.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_superuser: Option<bool>,
}

fn emqx(v: &Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny(_) => "deny",
        Verdict::Ignore => "ignore",
    }
}

/// EMQX 5's HTTP authenticator: may this client connect?
#[utoipa::path(post, path = "/api/v1/broker/emqx/authn", tag = "broker", operation_id = "emqx_authn",
    request_body = Login,
    responses((status = 200, description = "`allow`, `deny`, or `ignore` for a username that is no enrolled device.", body = EmqxResult)))]
pub async fn emqx_authn(State(s): State<AppState>, ApiJson(r): ApiJson<Login>) -> Json<EmqxResult> {
    let v = hooks::authenticate(&s.enrollment, &r.username, &r.clientid, &r.password);
    log("emqx_authn", &r.username, &v);
    Json(EmqxResult { result: emqx(&v).into(), is_superuser: Some(false) })
}

/// EMQX 5's HTTP authoriser: may this client publish or subscribe to this topic?
#[utoipa::path(post, path = "/api/v1/broker/emqx/authz", tag = "broker", operation_id = "emqx_authz",
    request_body = EmqxAuthz,
    responses((status = 200, description = "`allow`, `deny`, or `ignore` for a username that is no enrolled device.", body = EmqxResult)))]
pub async fn emqx_authz(
    State(s): State<AppState>,
    ApiJson(r): ApiJson<EmqxAuthz>,
) -> Result<Json<EmqxResult>, ApiError> {
    let access = match r.action.as_str() {
        "publish" => Access::Publish,
        "subscribe" => Access::Subscribe,
        other => return Err(ApiError::bad_request(format!("action: `{other}` is neither `publish` nor `subscribe`"))),
    };
    let v = hooks::authorize(&s.enrollment, &r.username, &r.clientid, &r.topic, access);
    log("emqx_authz", &r.username, &v);
    Ok(Json(EmqxResult { result: emqx(&v).into(), is_superuser: None }))
}

/// A VerneMQ webhook's body: `auth_on_register` sends `username`, `password` and `client_id` (with
/// `peer_addr`, `mountpoint`, ...), `auth_on_publish` `username`, `client_id` and `topic` (with `payload`,
/// `qos`, `retain`), `auth_on_subscribe` `username`, `client_id` and `topics` (a list of `{topic, qos}`).
/// `username` and `password` are `null` when the client sent none. Other fields are ignored.
#[derive(utoipa::ToSchema, Deserialize, Debug)]
pub struct VernemqHook {
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub client_id: String,
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default)]
    pub topics: Option<Vec<VernemqTopic>>,
}

/// One topic of an `auth_on_subscribe` call (its `qos` is ignored).
#[derive(utoipa::ToSchema, Deserialize, Debug)]
pub struct VernemqTopic {
    pub topic: String,
}

/// VerneMQ's answer: `{"result": "ok"}`, `{"result": {"error": "..."}}`, or `{"result": "next"}` for a
/// username that is no enrolled device (VerneMQ asks its next hook, and refuses the client if none accepts).
#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug)]
pub struct VernemqResult {
    #[schema(value_type = Object)]
    pub result: Value,
}

fn vernemq(v: &Verdict) -> VernemqResult {
    VernemqResult {
        result: match v {
            Verdict::Allow => json!("ok"),
            Verdict::Deny(why) => json!({ "error": why }),
            Verdict::Ignore => json!("next"),
        },
    }
}

/// VerneMQ's webhooks `auth_on_register`, `auth_on_publish` and `auth_on_subscribe` (and their `_m5` forms),
/// told apart by the `vernemq-hook` header VerneMQ sends.
#[utoipa::path(post, path = "/api/v1/broker/vernemq", tag = "broker", operation_id = "vernemq_hook",
    request_body = VernemqHook,
    params(("vernemq-hook" = String, Header, description = "The hook: auth_on_register, auth_on_publish or auth_on_subscribe, or one of their _m5 forms.")),
    responses((status = 200, description = "`ok`, an error with its reason, or `next` for a username that is no enrolled device.", body = VernemqResult)))]
pub async fn vernemq_hook(
    State(s): State<AppState>,
    headers: HeaderMap,
    ApiJson(r): ApiJson<VernemqHook>,
) -> Result<Json<VernemqResult>, ApiError> {
    let hook = headers.get("vernemq-hook").and_then(|h| h.to_str().ok()).unwrap_or_default();
    let user = r.username.as_deref().unwrap_or_default();
    let v = match hook.strip_suffix("_m5").unwrap_or(hook) {
        "auth_on_register" => {
            hooks::authenticate(&s.enrollment, user, &r.client_id, r.password.as_deref().unwrap_or_default())
        }
        "auth_on_publish" => {
            let topic = r.topic.as_deref().ok_or_else(|| ApiError::bad_request("auth_on_publish: no `topic`"))?;
            hooks::authorize(&s.enrollment, user, &r.client_id, topic, Access::Publish)
        }
        "auth_on_subscribe" => {
            let topics = r.topics.as_deref().ok_or_else(|| ApiError::bad_request("auth_on_subscribe: no `topics`"))?;
            if topics.is_empty() {
                return Err(ApiError::bad_request("auth_on_subscribe: `topics` is empty"));
            }
            // Every topic must pass; the first refusal (or ignore) answers for the whole call.
            topics
                .iter()
                .map(|t| hooks::authorize(&s.enrollment, user, &r.client_id, &t.topic, Access::Subscribe))
                .find(|v| *v != Verdict::Allow)
                .unwrap_or(Verdict::Allow)
        }
        "" => return Err(ApiError::bad_request("header vernemq-hook: missing; VerneMQ's webhooks send it")),
        other => {
            return Err(ApiError::bad_request(format!(
                "header vernemq-hook: `{other}` is not auth_on_register, auth_on_publish or auth_on_subscribe (or an _m5 form)"
            )))
        }
    };
    log(hook, user, &v);
    Ok(Json(vernemq(&v)))
}

/// mosquitto-go-auth's superuser check (`http_superuser_uri`).
#[derive(utoipa::ToSchema, Deserialize, Debug)]
pub struct GoAuthSuperuser {
    #[serde(default)]
    pub username: String,
}

/// mosquitto-go-auth's ACL check (`http_aclcheck_uri`): `acc` is 1 (a message is about to be delivered to the
/// client), 2 (publish), 3 (read and write) or 4 (subscribe).
#[derive(utoipa::ToSchema, Deserialize, Debug)]
pub struct GoAuthAcl {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub clientid: String,
    pub topic: String,
    pub acc: i64,
}

/// mosquitto-go-auth's answer in `http_response_mode json`. A username that is no enrolled device gets
/// `ok: false`, so that go-auth tries its next back-end.
#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug, PartialEq, Eq)]
pub struct GoAuthResult {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

fn go_auth(v: &Verdict) -> GoAuthResult {
    match v {
        Verdict::Allow => GoAuthResult { ok: true, error: None },
        Verdict::Deny(why) => GoAuthResult { ok: false, error: Some(why.clone()) },
        Verdict::Ignore => GoAuthResult { ok: false, error: Some("not an enrolled device".into()) },
    }
}

/// mosquitto-go-auth's user check: may this client connect?
#[utoipa::path(post, path = "/api/v1/broker/go-auth/user", tag = "broker", operation_id = "go_auth_user",
    request_body = Login,
    responses((status = 200, description = "`ok` true when the device may connect.", body = GoAuthResult)))]
pub async fn go_auth_user(State(s): State<AppState>, ApiJson(r): ApiJson<Login>) -> Json<GoAuthResult> {
    let v = hooks::authenticate(&s.enrollment, &r.username, &r.clientid, &r.password);
    log("go_auth_user", &r.username, &v);
    Json(go_auth(&v))
}

/// mosquitto-go-auth's superuser check: no device is a superuser.
#[utoipa::path(post, path = "/api/v1/broker/go-auth/superuser", tag = "broker", operation_id = "go_auth_superuser",
    request_body = GoAuthSuperuser,
    responses((status = 200, description = "Always `ok` false.", body = GoAuthResult)))]
pub async fn go_auth_superuser(ApiJson(r): ApiJson<GoAuthSuperuser>) -> Json<GoAuthResult> {
    Json(GoAuthResult { ok: false, error: Some(format!("`{}` is not a superuser: no device is", r.username)) })
}

/// mosquitto-go-auth's ACL check: may this client read, publish or subscribe to this topic?
#[utoipa::path(post, path = "/api/v1/broker/go-auth/acl", tag = "broker", operation_id = "go_auth_acl",
    request_body = GoAuthAcl,
    responses((status = 200, description = "`ok` true when the device may.", body = GoAuthResult)))]
pub async fn go_auth_acl(
    State(s): State<AppState>,
    ApiJson(r): ApiJson<GoAuthAcl>,
) -> Result<Json<GoAuthResult>, ApiError> {
    let access = match r.acc {
        1 => Access::Receive,
        2 => Access::Publish,
        4 => Access::Subscribe,
        // A device never needs one topic both ways.
        3 => {
            let v = match hooks::standing(&s.enrollment, &r.username) {
                hooks::Standing::Unknown => Verdict::Ignore,
                _ => Verdict::Deny(format!("device `{}` may not read and write `{}`", r.username, r.topic)),
            };
            return Ok(Json(go_auth(&v)));
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "acc: {other} is not 1 (read), 2 (write), 3 (read and write) or 4 (subscribe)"
            )))
        }
    };
    let v = hooks::authorize(&s.enrollment, &r.username, &r.clientid, &r.topic, access);
    log("go_auth_acl", &r.username, &v);
    Ok(Json(go_auth(&v)))
}
