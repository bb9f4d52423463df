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

#[derive(Serialize)]
struct Body<'a> {
    error: &'a str,
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
        (self.status, Json(Body { error: self.error, detail: &self.detail })).into_response()
    }
}
