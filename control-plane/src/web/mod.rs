//! The operator's web: the HTTP API and the dashboard served beside it.
//!
//! - [`api`]: the operator HTTP API (axum), its authorisation and audit middleware, and its server.
//! - [`dashboard`]: the operator dashboard in the browser, served at `/`.

pub mod api;
pub mod dashboard;
