//! API of agent builds: publish an `edgeloop-agent` binary for a class and architecture, list them. A rollout
//! of one is `POST /api/v1/rollouts` with `{"class": ..., "agent": NUMBER}`.

use crate::rollout::releases::{PublishRelease, ReleaseError, ReleaseView};
use crate::web::error::ApiError;
use crate::web::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

/// The largest agent binary taken.
pub const MAX_AGENT_BYTES: usize = 256 << 20;

impl From<ReleaseError> for ApiError {
    fn from(e: ReleaseError) -> Self {
        match e {
            ReleaseError::Invalid(_) => ApiError::bad_request(e.to_string()),
            ReleaseError::Exhausted(_) => {
                ApiError { status: StatusCode::CONFLICT, error: "conflict", detail: e.to_string() }
            }
            ReleaseError::Io(e) => ApiError::internal(e),
            ReleaseError::Store(e) => ApiError::internal(e),
        }
    }
}

/// `POST /api/v1/agent-releases?class=C&arch=A&version=V`: the body is the binary. 201 with the new release,
/// 200 with the existing one for the same binary, class and architecture; 400 naming the bad parameter.
#[utoipa::path(post, path = "/api/v1/agent-releases", tag = "agent-releases", operation_id = "publish_agent_release",
    params(PublishRelease),
    request_body(content = inline(super::openapi::Binary), content_type = "application/octet-stream", description = "The `edgeloop-agent` binary."),
    responses((status = 201, description = "A new build.", body = ReleaseView),
        (status = 200, description = "This binary is already published for the class and architecture.", body = ReleaseView),
        (status = 409, description = "Build numbers are exhausted.", body = crate::web::error::ErrorBody)))]
pub async fn publish(
    State(s): State<AppState>,
    params: Result<Query<PublishRelease>, QueryRejection>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<ReleaseView>), ApiError> {
    let Query(req) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let r = s.rollouts.clone();
    let (rec, new) =
        tokio::task::spawn_blocking(move || r.publish_agent_release(&req, &body, edgeloop_common::unix_millis()))
            .await??;
    if new {
        tracing::info!(class = %rec.class, arch = %rec.arch, version = %rec.version, number = rec.number, "agent build published");
    }
    Ok((if new { StatusCode::CREATED } else { StatusCode::OK }, Json(rec.view())))
}

#[derive(utoipa::IntoParams, Deserialize, Debug)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default)]
    pub class: Option<String>,
}

/// `GET /api/v1/agent-releases[?class=C]`.
#[utoipa::path(get, path = "/api/v1/agent-releases", tag = "agent-releases", operation_id = "list_agent_releases",
    params(ListParams),
    responses((status = 200, description = "Agent builds.", body = Vec<ReleaseView>)))]
pub async fn list(
    State(s): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Vec<ReleaseView>>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let r = s.rollouts.clone();
    let all =
        tokio::task::spawn_blocking(move || r.agent_releases(p.class.as_deref())).await?.map_err(ApiError::internal)?;
    Ok(Json(all.iter().map(|r| r.view()).collect()))
}
