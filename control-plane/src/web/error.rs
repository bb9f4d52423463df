//! API errors: a JSON body `{error, detail}` with the right status. A 5xx never carries internals to the
//! client; the cause is logged once on the server.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: &'static str,
    pub detail: String,
}

/// The body of every error the API answers with.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody<'a> {
    /// A stable word for the kind of error: `bad_request`, `unauthorized`, `forbidden`, `not_found`,
    /// `conflict`, `payload_too_large`, `busy`, `internal`, ...
    error: &'a str,
    /// What was wrong and where, for a person.
    detail: &'a str,
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, error: "bad_request", detail: detail.into() }
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        ApiError { status: StatusCode::NOT_FOUND, error: "not_found", detail: detail.into() }
    }
    /// Logs `cause` and returns a generic 500.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "API request failed");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: "internal",
            detail: "internal error; see the control plane's log".into(),
        }
    }
}

/// A JSON request body. A malformed one is a 400 whose detail names what was wrong (axum's rejection text:
/// the field, line and column), in the API's error shape.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let Json(v) = <Json<T> as axum::extract::FromRequest<S>>::from_request(req, state).await?;
        Ok(ApiJson(v))
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> Self {
        ApiError::bad_request(e.body_text())
    }
}

/// Failures that are the control plane's, not the caller's: a 500, with the cause logged.
macro_rules! internal_from {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for ApiError {
            fn from(e: $t) -> Self {
                ApiError::internal(e)
            }
        }
    )*};
}

internal_from!(
    tokio::task::JoinError,
    crate::fleet::telemetry::StoreError,
    crate::ml::models::ModelError,
    std::io::Error,
    axum::http::header::InvalidHeaderValue,
);

impl From<crate::ml::upload::UploadError> for ApiError {
    fn from(e: crate::ml::upload::UploadError) -> Self {
        match e {
            crate::ml::upload::UploadError::Invalid { .. } => ApiError::bad_request(e.to_string()),
            e => ApiError::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(ErrorBody { error: self.error, detail: &self.detail })).into_response()
    }
}

/// The word an error answer carries for `status`.
fn word(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        406 => "not_acceptable",
        409 => "conflict",
        411 => "length_required",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        416 => "range_not_satisfiable",
        422 => "unprocessable",
        429 => "too_many_requests",
        503 => "busy",
        s if s >= 500 => "internal",
        _ => "error",
    }
}

/// Gives the errors axum answers by itself under `/api/` the API's shape: a path segment of the wrong type,
/// a body over its limit, a method a path does not take. They come as plain text (or empty); this layer turns
/// them into `{error, detail}` with the same status and headers (`Allow` on a 405), so that a client reads
/// every error the same way and the OpenAPI document's error schema holds for all of them.
pub async fn uniform(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let api = req.uri().path().starts_with("/api/");
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !api || json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024).await.map(|b| String::from_utf8_lossy(&b).trim().to_string());
    let detail = match text {
        Ok(t) if !t.is_empty() => t,
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let mut out = ApiError { status, error: word(status), detail }.into_response();
    for (name, value) in parts.headers.iter() {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
