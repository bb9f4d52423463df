//! Device logs: `GET /api/v1/devices/{id}/logs` and the fleet-wide `GET /api/v1/logs`, newest first, paged
//! with a cursor, filtered by device, class, level, text and the device's time of the line.

use crate::fleet::logs::{LogCursor, LogQuery, LogStats, StoredLog, MAX_LIMIT};
use crate::web::error::ApiError;
use crate::web::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query as QueryParams, State};
use axum::Json;
use edgeloop_common::envelope::LogLevel;
use serde::{Deserialize, Serialize};

const DEFAULT_LIMIT: usize = 100;

#[derive(utoipa::IntoParams, Deserialize, Debug, Default)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogParams {
    /// Fleet-wide search only: one device.
    pub device: Option<String>,
    pub class: Option<String>,
    /// The lowest level: `warn` (warnings and errors) or `error`.
    #[param(pattern = "^(warn|error)$")]
    pub level: Option<String>,
    /// Text the message or the target contains, ignoring case.
    pub q: Option<String>,
    /// Bounds on the device's time of the line, Unix ms, inclusive.
    pub since: Option<u64>,
    pub until: Option<u64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
}

/// A page of log lines, newest first.
#[derive(utoipa::ToSchema, Serialize, Deserialize, Debug)]
pub struct LogPageView {
    pub logs: Vec<StoredLog>,
    /// Pass as `cursor` for the next (older) page; absent at the end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// One device's counters (the device's own endpoint only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<LogStats>,
}

fn query(p: LogParams) -> Result<LogQuery, ApiError> {
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!("limit must be between 1 and {MAX_LIMIT}, got {limit}")));
    }
    if let (Some(s), Some(u)) = (p.since, p.until) {
        if s > u {
            return Err(ApiError::bad_request(format!("since ({s}) is after until ({u})")));
        }
    }
    if let Some(d) = &p.device {
        edgeloop_common::topics::validate_device_id(d).map_err(|e| ApiError::bad_request(format!("device: {e}")))?;
    }
    let level = match &p.level {
        Some(l) => Some(l.parse::<LogLevel>().map_err(|e| ApiError::bad_request(format!("level: {e}")))?),
        None => None,
    };
    let cursor = match &p.cursor {
        Some(c) => Some(LogCursor::parse(c).map_err(|e| ApiError::bad_request(format!("cursor: {e}")))?),
        None => None,
    };
    Ok(LogQuery {
        device: p.device,
        class: p.class,
        level,
        text: p.q.filter(|t| !t.is_empty()),
        since_ms: p.since,
        until_ms: p.until,
        cursor,
        limit,
    })
}

async fn run(s: &AppState, q: LogQuery, with_stats: bool) -> Result<LogPageView, ApiError> {
    let logs = s.logs.clone();
    let (page, stats) = tokio::task::spawn_blocking(move || {
        let stats = match (&q.device, with_stats) {
            (Some(d), true) => Some(logs.stats(d)?),
            _ => None,
        };
        logs.search(&q).map(|p| (p, stats))
    })
    .await??;
    Ok(LogPageView { logs: page.entries, next_cursor: page.next.map(|c| c.encode()), stats })
}

/// `GET /api/v1/devices/{id}/logs`: one device's lines, with its counters (stored, suppressed by the device,
/// cut by ingest).
#[utoipa::path(get, path = "/api/v1/devices/{id}/logs", tag = "logs", operation_id = "device_logs",
    params(("id" = String, Path, description = "The device's id.", pattern = "^[A-Za-z0-9._-]{1,64}$"), LogParams),
    responses((status = 200, description = "The device's log lines, newest first, with its counters.", body = LogPageView), (status = 404, description = "No such device.", body = crate::web::error::ErrorBody)))]
pub async fn device(
    State(s): State<AppState>,
    Path(id): Path<String>,
    params: Result<QueryParams<LogParams>, QueryRejection>,
) -> Result<Json<LogPageView>, ApiError> {
    let QueryParams(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    if p.device.is_some() {
        return Err(ApiError::bad_request("device: the path names the device; use /api/v1/logs to search by device"));
    }
    super::known_device(&s, &id)?;
    let mut q = query(p)?;
    q.device = Some(id);
    Ok(Json(run(&s, q, true).await?))
}

/// `GET /api/v1/logs`: every device's lines.
#[utoipa::path(get, path = "/api/v1/logs", tag = "logs", operation_id = "search_logs",
    params(LogParams),
    responses((status = 200, description = "Log lines of the fleet, newest first.", body = LogPageView)))]
pub async fn search(
    State(s): State<AppState>,
    params: Result<QueryParams<LogParams>, QueryRejection>,
) -> Result<Json<LogPageView>, ApiError> {
    let QueryParams(p) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let q = query(p)?;
    Ok(Json(run(&s, q, false).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_parameters_are_named() {
        let bad = |p: LogParams| query(p).unwrap_err().detail;
        assert!(bad(LogParams { limit: Some(0), ..Default::default() }).contains("limit must be between 1 and 1000"));
        assert!(bad(LogParams { level: Some("info".into()), ..Default::default() }).contains("level: `info`"));
        assert!(bad(LogParams { cursor: Some("xyz".into()), ..Default::default() }).contains("cursor: "));
        assert!(bad(LogParams { since: Some(5), until: Some(4), ..Default::default() }).contains("since (5)"));
        assert!(bad(LogParams { device: Some("a b".into()), ..Default::default() }).contains("device: "));
        let q = query(LogParams { level: Some("error".into()), q: Some(String::new()), ..Default::default() }).unwrap();
        assert_eq!((q.level, q.text, q.limit), (Some(LogLevel::Error), None, DEFAULT_LIMIT));
    }
}
