//! API of class configurations: publish a `firmware-configs/<class>.toml`, list and read the versions. A
//! rollout of one is `POST /api/v1/rollouts` with `{"class": ..., "config": VERSION}`.

use crate::rollout::configs::{ConfigView, PublishError};
use crate::web::error::ApiError;
use crate::web::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

/// The largest class file taken.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

impl From<PublishError> for ApiError {
    fn from(e: PublishError) -> Self {
        match e {
            PublishError::Invalid(_) => ApiError::bad_request(e.to_string()),
            PublishError::Exhausted(_) => {
                ApiError { status: StatusCode::CONFLICT, error: "conflict", detail: e.to_string() }
            }
            PublishError::Store(e) => ApiError::internal(e),
        }
    }
}

#[derive(utoipa::IntoParams, Deserialize, Debug)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PublishParams {
    /// The name errors call the text by (default `body`), such as the file it came from.
    #[serde(default)]
    pub source: Option<String>,
}

/// `POST /api/v1/configs`: the body is the class file's TOML text. 201 with the new version, or 200 with the
/// latest one when it has the same text; 400 naming the key when the text is not a valid class file.
#[utoipa::path(post, path = "/api/v1/configs", tag = "configs", operation_id = "publish_config",
    params(PublishParams),
    request_body(content = String, content_type = "text/plain", description = "The class file's TOML text (UTF-8)."),
    responses((status = 201, description = "A new version.", body = ConfigView),
        (status = 200, description = "The latest version already has this text.", body = ConfigView),
        (status = 409, description = "Versions are exhausted.", body = crate::web::error::ErrorBody)))]
pub async fn publish(
    State(s): State<AppState>,
    params: Result<Query<PublishParams>, QueryRejection>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<ConfigView>), ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let text = String::from_utf8(body.to_vec())
        .map_err(|e| ApiError::bad_request(format!("body: the class file must be UTF-8 TOML text ({e})")))?;
    let source = p.source.unwrap_or_else(|| "body".into());
    let r = s.rollouts.clone();
    let (c, new) =
        tokio::task::spawn_blocking(move || r.publish_config(&source, &text, edgeloop_common::unix_millis())).await??;
    if new {
        tracing::info!(class = %c.class, version = c.version, sha256 = %c.sha256, "class configuration published");
    }
    Ok((if new { StatusCode::CREATED } else { StatusCode::OK }, Json(c.view())))
}

#[derive(utoipa::IntoParams, Deserialize, Debug)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default)]
    pub class: Option<String>,
}

/// `GET /api/v1/configs[?class=C]`: every version published, oldest first.
#[utoipa::path(get, path = "/api/v1/configs", tag = "configs", operation_id = "list_configs",
    params(ListParams),
    responses((status = 200, description = "Every version published, oldest first.", body = Vec<ConfigView>)))]
pub async fn list(
    State(s): State<AppState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<Vec<ConfigView>>, ApiError> {
    let Query(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let r = s.rollouts.clone();
    let all = tokio::task::spawn_blocking(move || r.configs(p.class.as_deref())).await?.map_err(ApiError::internal)?;
    Ok(Json(all.iter().map(|c| c.view()).collect()))
}

/// `GET /api/v1/configs/{class}/{version}`.
#[utoipa::path(get, path = "/api/v1/configs/{class}/{version}", tag = "configs", operation_id = "get_config",
    params(("class" = String, Path, description = "The device class."), ("version" = u32, Path, description = "The version.")),
    responses((status = 200, description = "The version.", body = ConfigView), (status = 404, description = "No such version.", body = crate::web::error::ErrorBody)))]
pub async fn get(
    State(s): State<AppState>,
    Path((class, version)): Path<(String, u32)>,
) -> Result<Json<ConfigView>, ApiError> {
    let r = s.rollouts.clone();
    let (c2, v2) = (class.clone(), version);
    let c = tokio::task::spawn_blocking(move || r.config(&c2, v2)).await?.map_err(ApiError::internal)?;
    c.map(|c| Json(c.view()))
        .ok_or_else(|| ApiError::not_found(format!("no class configuration `{class}` version {version}")))
}
