//! Alerts devices raised: `GET /api/v1/alerts` (newest onset first, paged, filtered by class, device, state,
//! acknowledgement and onset time), `GET /api/v1/alerts/{device}/{id}`, and
//! `POST /api/v1/alerts/{device}/{id}/ack`, where an operator says whether it was a real fault. A verdict is
//! also a training label of the alert's span, so the class's next training learns from it.

use super::paging;
use crate::access::operators::Operator;
use crate::fleet::alerts::{drift_explaining, explain_drift, AlertAck, AlertCursor, StoredAlert};
use crate::ml::dataset::Label;
use crate::web::error::{ApiError, ApiJson};
use crate::web::AppState;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::Deserialize;

/// Most alerts one page reads before it answers (a rare filter can give a short page with a cursor).
const SCAN_MAX: usize = 100_000;
/// Longest note an acknowledgement takes, in characters.
pub const MAX_NOTE_CHARS: usize = 1000;

#[derive(Deserialize, Debug, Default, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AlertParams {
    pub class: Option<String>,
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub device: Option<String>,
    /// `open` or `closed`.
    #[param(pattern = "^(open|closed)$")]
    pub state: Option<String>,
    /// Only acknowledged (`true`) or unacknowledged (`false`) alerts.
    pub acked: Option<bool>,
    /// Only alerts a drift of their class explains (`true`: `drift` is set) or only those it does not
    /// (`false`).
    pub drift: Option<bool>,
    /// Bounds on the alert's onset (device clock), Unix ms, inclusive.
    pub since: Option<u64>,
    pub until: Option<u64>,
    /// The `X-Next-Cursor` of the previous page.
    pub cursor: Option<String>,
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/v1/alerts", tag = "alerts", operation_id = "list_alerts",
    params(AlertParams),
    responses((status = 200, description = "Alerts, newest onset first.", body = Vec<StoredAlert>,
            headers(
                ("x-next-cursor" = String, description = "The next page's cursor; absent on the last page."),
                ("link" = String, description = "The next page's address, `<...>; rel=\"next\"`; absent on the last page."),
            ))))]
/// `GET /api/v1/alerts`: newest onset first, paged with `limit` and `cursor`, filtered.
pub async fn list(
    State(s): State<AppState>,
    uri: axum::http::Uri,
    params: Result<Query<AlertParams>, QueryRejection>,
) -> Result<paging::Paged<StoredAlert>, ApiError> {
    let Query(p) = params?;
    let limit = paging::limit(p.limit)?;
    paging::one_of("state", p.state.as_deref(), &["open", "closed"])?;
    super::time_range(p.since, p.until)?;
    if let Some(d) = &p.device {
        edgeloop_common::topics::validate_device_id(d).map_err(|e| ApiError::bad_request(format!("device: {e}")))?;
    }
    let after = match &p.cursor {
        Some(c) => Some(AlertCursor::parse(c).map_err(|e| ApiError::bad_request(format!("cursor: {e}")))?),
        None => None,
    };
    let (alerts, learning) = (s.alerts.clone(), s.learning.clone());
    let (items, next) = tokio::task::spawn_blocking(move || {
        let triggers = learning.trigger_events();
        let open = p.state.as_deref().map(|st| st == "open");
        let select = crate::fleet::alerts::AlertWhere { device: p.device.as_deref(), open };
        let (mut items, next) = alerts.page_where(select, after.as_ref(), limit, SCAN_MAX, |a| {
            p.class.as_ref().is_none_or(|c| *c == a.class)
                && p.device.as_ref().is_none_or(|d| *d == a.device)
                && p.state.as_deref().is_none_or(|st| (st == "open") == a.open)
                && p.acked.is_none_or(|k| k == a.ack.is_some())
                && p.since.is_none_or(|t| a.alert.onset_ms >= t)
                && p.until.is_none_or(|t| a.alert.onset_ms <= t)
                && p.drift.is_none_or(|d| d == drift_explaining(a, &triggers).is_some())
        })?;
        explain_drift(&mut items, &triggers);
        Ok::<_, crate::fleet::telemetry::StoreError>((items, next))
    })
    .await??;
    Ok(paging::Paged { items, next: next.map(|c| c.encode()), uri })
}

/// The alert, with the drift that explains it.
fn known(s: &AppState, device: &str, id: u64) -> Result<StoredAlert, ApiError> {
    edgeloop_common::topics::validate_device_id(device).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut a =
        s.alerts.get(device, id)?.ok_or_else(|| ApiError::not_found(format!("no alert {id} of device `{device}`")))?;
    a.drift = drift_explaining(&a, &s.learning.trigger_events());
    Ok(a)
}

#[utoipa::path(get, path = "/api/v1/alerts/{device}/{id}", tag = "alerts", operation_id = "get_alert",
    params(("device" = String, Path, description = "The device's id.", pattern = "^[A-Za-z0-9._-]{1,64}$"),
        ("id" = u64, Path, description = "The device's alert number.")),
    responses((status = 200, description = "The alert.", body = StoredAlert),
        (status = 404, description = "No such alert.", body = crate::web::error::ErrorBody)))]
/// `GET /api/v1/alerts/{device}/{id}`.
pub async fn get(
    State(s): State<AppState>,
    Path((device, id)): Path<(String, u64)>,
) -> Result<Json<StoredAlert>, ApiError> {
    let st = s.clone();
    Ok(Json(tokio::task::spawn_blocking(move || known(&st, &device, id)).await??))
}

/// An operator's acknowledgement.
#[derive(Deserialize, Debug, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    /// `true`: a real fault (its span becomes a training label 1); `false`: a false alarm (label 0, normal);
    /// absent: seen, no verdict.
    #[serde(default)]
    pub verdict: Option<bool>,
    /// Up to 1000 characters.
    #[serde(default)]
    #[schema(max_length = 1000)]
    pub note: String,
}

#[utoipa::path(post, path = "/api/v1/alerts/{device}/{id}/ack", tag = "alerts", operation_id = "acknowledge_alert",
    params(("device" = String, Path, description = "The device's id.", pattern = "^[A-Za-z0-9._-]{1,64}$"),
        ("id" = u64, Path, description = "The device's alert number.")),
    request_body = AckBody,
    responses((status = 200, description = "The alert, acknowledged.", body = StoredAlert),
        (status = 404, description = "No such alert.", body = crate::web::error::ErrorBody)))]
/// `POST /api/v1/alerts/{device}/{id}/ack`: acknowledges an alert, with a verdict that also labels its span
/// for training. Acknowledging again replaces the verdict and its label.
pub async fn acknowledge(
    State(s): State<AppState>,
    operator: Option<Extension<Operator>>,
    Path((device, id)): Path<(String, u64)>,
    ApiJson(body): ApiJson<AckBody>,
) -> Result<Json<StoredAlert>, ApiError> {
    let chars = body.note.chars().count();
    if chars > MAX_NOTE_CHARS {
        return Err(ApiError::bad_request(format!("note: {chars} characters, over {MAX_NOTE_CHARS}")));
    }
    let by = operator.map_or_else(
        || "anyone (api.require_tokens = false)".to_string(),
        |Extension(o)| format!("{} ({})", o.name, o.id),
    );
    let st = s.clone();
    let alert = tokio::task::spawn_blocking(move || -> Result<StoredAlert, ApiError> {
        edgeloop_common::topics::validate_device_id(&device).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let models = st.learning.models.clone();
        let acked = st.alerts.acknowledge(&device, id, |a| -> Result<AlertAck, ApiError> {
            // The previous verdict's label goes; the new verdict's covers the alert's span as it is now.
            if let Some(old) = a.ack.as_ref().and_then(|k| k.label.as_ref()) {
                models.remove_label(old)?;
            }
            let label = body.verdict.map(|verdict| Label {
                device: device.clone(),
                from_ms: a.alert.onset_ms,
                to_ms: a.alert.end_ms.unwrap_or(a.alert.last_ms).max(a.alert.onset_ms),
                label: u32::from(verdict),
            });
            if let Some(l) = &label {
                models.add_label(l)?;
            }
            Ok(AlertAck { by, at_ms: edgeloop_common::unix_millis(), verdict: body.verdict, note: body.note, label })
        })?;
        let a = acked.ok_or_else(|| ApiError::not_found(format!("no alert {id} of device `{device}`")))?;
        st.store.db().commit().map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(a)
    })
    .await??;
    tracing::info!(device = %alert.device, alert = alert.alert.id, verdict = ?alert.ack.as_ref().and_then(|a| a.verdict), "alert acknowledged");
    Ok(Json(alert))
}
