//! API of device identity: enrollment (open: it carries its own token), enrollment tokens and revocation
//! (admin), and the enrolled devices (viewer).

use crate::fleet::enrollment::{Credentials, EnrollError, EnrollRequest, Enrolled, EnrollmentToken};
use crate::web::error::{ApiError, ApiJson};
use crate::web::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

impl From<EnrollError> for ApiError {
    fn from(e: EnrollError) -> Self {
        match e {
            EnrollError::Bad(d) => ApiError::bad_request(d),
            EnrollError::Proof(_) | EnrollError::Token(_) | EnrollError::Replayed { .. } | EnrollError::Revoked(_) => {
                ApiError { status: StatusCode::FORBIDDEN, error: "forbidden", detail: e.to_string() }
            }
            EnrollError::Conflict(_) | EnrollError::ClassFixed { .. } => {
                ApiError { status: StatusCode::CONFLICT, error: "conflict", detail: e.to_string() }
            }
            EnrollError::Store(d) => ApiError::internal(d),
        }
    }
}

/// Enrolls a device from a request signed with its key (protocol.md, "Enrollment").
#[utoipa::path(post, path = "/api/v1/enroll", tag = "identity", operation_id = "enroll",
    request_body = EnrollRequest,
    responses((status = 200, description = "The device's credentials.", body = Credentials),
        (status = 403, description = "The token, proof or device is refused.", body = crate::web::error::ErrorBody),
        (status = 409, description = "The device id is taken, or its class is fixed.", body = crate::web::error::ErrorBody),
        (status = 503, description = "Enrolled, but the external broker did not take the device's credentials (`[broker] provisioning`); enroll again.", body = crate::web::error::ErrorBody)))]
pub async fn enroll(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<EnrollRequest>,
) -> Result<Json<Credentials>, ApiError> {
    let r = body;
    let en = s.enrollment.clone();
    let creds = tokio::task::spawn_blocking(move || en.enroll(&r, edgeloop_common::unix_millis())).await?;
    if let Err(e) = &creds {
        s.metrics.api_refused("enrollment_refused");
        tracing::warn!(error = %e, "enrollment refused");
    }
    let creds = creds?;
    if let Some(p) = &s.provisioner {
        // The device gets its credentials only once the broker knows them; if it does not, the device enrolls
        // again (its agent retries), with new credentials.
        let provisioned = p.provision(&creds.username, &creds.password).await;
        if !s.enrollment.is_active(&creds.username) {
            // Revoked while mosquitto was taking the credentials: take them back (queued if it does not answer).
            let _ = p.disable(&creds.username).await;
        }
        if let Err(e) = provisioned {
            tracing::error!(device = %creds.username, error = %e, "enrolled, but the broker did not take the credentials");
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                error: "broker_unavailable",
                detail: format!(
                    "device `{}` enrolled, but the broker did not take its credentials ({e}); enroll again",
                    creds.username
                ),
            });
        }
    }
    Ok(Json(creds))
}

/// Disables a revoked device's client in the external broker, when the control plane provisions it there:
/// `Some(true)` once the broker confirmed it (and so disconnected the device), `Some(false)` if the broker did
/// not answer (the control plane keeps trying in the background), `None` without provisioning.
async fn disable_at_broker(s: &AppState, device: &str) -> Option<bool> {
    let p = s.provisioner.as_ref()?;
    match p.disable(device).await {
        Ok(()) => Some(true),
        Err(e) => {
            tracing::error!(device, error = %e, "revoked, but the broker did not disable the device yet; retrying");
            Some(false)
        }
    }
}

#[derive(utoipa::ToSchema, Deserialize, Serialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct NewEnrollmentToken {
    pub class: String,
    /// How many devices may enroll with it.
    pub uses: u32,
    /// How long it stays valid.
    pub expires_in_secs: u64,
}

#[derive(utoipa::ToSchema, Deserialize, Serialize, Debug)]
pub struct CreatedEnrollmentToken {
    /// Shown once; only its hash is kept.
    pub token: String,
    #[serde(flatten)]
    pub entry: EnrollmentToken,
}

#[utoipa::path(post, path = "/api/v1/enrollment-tokens", tag = "identity", operation_id = "create_enrollment_token",
    request_body = NewEnrollmentToken,
    responses((status = 201, description = "The token, shown once.", body = CreatedEnrollmentToken)))]
pub async fn create_token(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<NewEnrollmentToken>,
) -> Result<(StatusCode, Json<CreatedEnrollmentToken>), ApiError> {
    let r = body;
    let en = s.enrollment.clone();
    let now = edgeloop_common::unix_millis();
    let expires = now.saturating_add(r.expires_in_secs.saturating_mul(1000));
    let (entry, token) = tokio::task::spawn_blocking(move || en.create_token(&r.class, r.uses, expires, now)).await??;
    Ok((StatusCode::CREATED, Json(CreatedEnrollmentToken { token, entry })))
}

#[utoipa::path(post, path = "/api/v1/enrollment-tokens/{id}/revoke", tag = "identity", operation_id = "revoke_enrollment_token",
    params(("id" = String, Path, description = "The token's id.")),
    responses((status = 200, description = "The token, revoked.", body = EnrollmentToken), (status = 404, description = "No such token.", body = crate::web::error::ErrorBody)))]
pub async fn revoke_token(
    State(s): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<EnrollmentToken>, ApiError> {
    let en = s.enrollment.clone();
    let t = tokio::task::spawn_blocking(move || en.revoke_token(&id)).await?.map_err(|e| match e {
        EnrollError::Bad(d) => ApiError::not_found(d),
        other => other.into(),
    })?;
    Ok(Json(t))
}

#[utoipa::path(get, path = "/api/v1/enrollment-tokens", tag = "identity", operation_id = "list_enrollment_tokens",
    responses((status = 200, description = "Every enrollment token (hashes only).", body = Vec<EnrollmentToken>)))]
pub async fn tokens(State(s): State<AppState>) -> Result<Json<Vec<EnrollmentToken>>, ApiError> {
    Ok(Json(s.enrollment.tokens()?))
}

#[utoipa::path(get, path = "/api/v1/enrollments", tag = "identity", operation_id = "list_enrollments",
    responses((status = 200, description = "Every enrolled device.", body = Vec<Enrolled>)))]
pub async fn enrolled(State(s): State<AppState>) -> Json<Vec<Enrolled>> {
    Json(s.enrollment.list())
}

#[derive(utoipa::ToSchema, Deserialize, Serialize, Debug)]
pub struct Revoked {
    pub device: String,
    pub revoked_ms: Option<u64>,
    /// Live broker connections of the device that were closed (embedded broker).
    pub connections_cut: usize,
    /// With `[broker] provisioning`: whether the external broker confirmed it disabled the device's client
    /// (and disconnected it); false means the control plane keeps trying. Absent without provisioning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_disabled: Option<bool>,
}

#[utoipa::path(post, path = "/api/v1/devices/{id}/revoke", tag = "identity", operation_id = "revoke_device",
    params(("id" = String, Path, description = "The device's id.", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "The device's credentials are revoked.", body = Revoked), (status = 404, description = "The device is not enrolled.", body = crate::web::error::ErrorBody)))]
pub async fn revoke(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Revoked>, ApiError> {
    edgeloop_common::topics::validate_device_id(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let en = s.enrollment.clone();
    let dev = id.clone();
    let e = tokio::task::spawn_blocking(move || en.revoke(&dev, edgeloop_common::unix_millis())).await?.map_err(
        |e| match e {
            EnrollError::Bad(d) => ApiError::not_found(d),
            other => other.into(),
        },
    )?;
    let connections_cut = s.front.cut(&id);
    let broker_disabled = disable_at_broker(&s, &id).await;
    tracing::warn!(device = %id, connections_cut, ?broker_disabled, "device revoked");
    Ok(Json(Revoked { device: id, revoked_ms: e.revoked_ms, connections_cut, broker_disabled }))
}

/// What `DELETE /api/v1/devices/{id}` did.
#[derive(utoipa::ToSchema, Debug, Serialize, Deserialize)]
pub struct Decommissioned {
    pub device: String,
    pub decommissioned_ms: u64,
    /// Whether the device was enrolled (its credentials are now revoked).
    pub enrollment_revoked: bool,
    pub connections_cut: usize,
    /// As in revocation: whether the external broker disabled the device's client (absent without
    /// provisioning, or if the device was not enrolled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_disabled: Option<bool>,
    /// Whether a desired state had been issued to it (its retained message is now cleared).
    pub desired_cleared: bool,
}

/// `DELETE /api/v1/devices/{id}`: decommissions a device. Its enrollment is revoked and its connections cut,
/// its retained desired state is cleared from the broker and forgotten, its tags go, and it leaves the
/// registry (and so the fleet's metrics and every rollout's view of the fleet). Its stored telemetry stays.
#[utoipa::path(delete, path = "/api/v1/devices/{id}", tag = "devices", operation_id = "decommission_device",
    params(("id" = String, Path, description = "The device's id.", pattern = "^[A-Za-z0-9._-]{1,64}$")),
    responses((status = 200, description = "The device is decommissioned.", body = Decommissioned), (status = 404, description = "No such device.", body = crate::web::error::ErrorBody)))]
pub async fn decommission(State(s): State<AppState>, Path(id): Path<String>) -> Result<Json<Decommissioned>, ApiError> {
    edgeloop_common::topics::validate_device_id(&id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let (st, dev) = (s.clone(), id.clone());
    let now = edgeloop_common::unix_millis();
    let (known, enrollment_revoked, desired_cleared) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
        let known = st.registry.get(&dev).is_some() || st.rollouts.issued(&dev)?.is_some();
        let enrolled = match st.enrollment.revoke(&dev, now) {
            Ok(_) => true,
            Err(EnrollError::Bad(_)) => false,
            Err(e) => return Err(e.into()),
        };
        if !known && !enrolled {
            return Ok((false, false, false));
        }
        let cleared = st.rollouts.forget(&dev)?;
        st.registry.remove(&dev)?;
        st.store.db().commit().map_err(|e| ApiError::internal(e.to_string()))?;
        Ok((true, enrolled, cleared))
    })
    .await??;
    if !known {
        return Err(ApiError::not_found(format!("no device `{id}`")));
    }
    let connections_cut = s.front.cut(&id);
    let broker_disabled = if enrollment_revoked { disable_at_broker(&s, &id).await } else { None };
    tracing::warn!(device = %id, enrollment_revoked, desired_cleared, connections_cut, ?broker_disabled, "device decommissioned");
    Ok(Json(Decommissioned {
        device: id,
        decommissioned_ms: now,
        enrollment_revoked,
        connections_cut,
        broker_disabled,
        desired_cleared,
    }))
}
