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

/// A JSON body, or a 400 naming what was wrong with it.
pub fn json<T>(body: Result<axum::Json<T>, axum::extract::rejection::JsonRejection>) -> Result<T, ApiError> {
    body.map(|axum::Json(b)| b).map_err(|e| ApiError::bad_request(e.body_text()))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(Body { error: self.error, detail: &self.detail })).into_response()
    }
}
