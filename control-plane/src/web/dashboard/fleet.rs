//! The fleet overview (devices by class, status and model; alerts) and the device page (live charts of
//! features and score, update history, heartbeat metrics).

use super::layout::{self, ago, badge, bytes, datetime, page, page_error, raw, sha, Nav, Who};
use super::svg::{self, Point};
use crate::fleet::alerts::{drift_explaining, explain_drift, StoredAlert};
use crate::fleet::devices::Device;
use crate::fleet::telemetry::Query as StoreQuery;
use crate::ml::triggers::Cause;
use crate::rollout::window::Opening;
use crate::web::AppState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use edgeloop_common::envelope::{Record, FLAG_ANOMALY};
use maud::{html, Markup};
use serde::Deserialize;
use std::collections::BTreeMap;

/// A closed alert stays on the overview for this long after it closed.
const CLOSED_ALERT_MS: u64 = 15 * 60 * 1000;
/// Alerts shown on a device's page.
const DEVICE_ALERTS: usize = 20;
/// A drift trigger is an alert for this long.
const DRIFT_ALERT_MS: u64 = 24 * 3600 * 1000;
/// Devices listed on the overview at most (the class table counts all of them).
const MAX_ROWS: usize = 500;
/// Records drawn on a device's charts.
const CHART_RECORDS: u64 = 300;
/// Feature charts per sensor on the device page.
const MAX_FEATURE_CHARTS: usize = 8;

fn online(d: &Device, now: u64, offline_after_ms: u64) -> bool {
    now.saturating_sub(d.last_seen_ms) < offline_after_ms
}

fn model_of(d: &Device) -> String {
    d.last_status.as_ref().and_then(|s| s.model_version.clone()).unwrap_or_else(|| "none".into())
}

fn backlog(d: &Device) -> u64 {
    d.last_status.as_ref().map_or(0, |s| s.outbox_depth)
}

/// One row of the alert list.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub kind: &'static str,
    pub at_ms: u64,
    pub text: String,
    pub link: String,
}

/// One line about an alert a device raised, and the drift that explains it, where `drift` is set.
fn describe(a: &StoredAlert) -> String {
    let e = &a.alert;
    let state = if a.open { "open".to_string() } else { format!("closed after {}", span(e.duration_ms())) };
    let ack = match &a.ack {
        None => "not acknowledged".to_string(),
        Some(k) => match k.verdict {
            Some(true) => format!("a real fault, says {}", k.by),
            Some(false) => format!("a false alarm, says {}", k.by),
            None => format!("seen by {}", k.by),
        },
    };
    let drift = a.drift.as_ref().map_or(String::new(), |d| {
        format!(
            "; most likely drift, not a fault: {}'s {} drifted from this model (PSI {:.3}){}",
            a.class,
            d.feature,
            d.psi,
            d.job.map(|j| format!(", retraining in job {j}")).unwrap_or_default()
        )
    });
    format!(
        "{} ({}): alert {} on {}, {state}; peak score {:.3}, {} flagged windows; {}; {ack}{drift}",
        a.device,
        a.class,
        e.id,
        e.sensor,
        e.peak_score,
        e.windows,
        e.model.as_deref().unwrap_or("no model named"),
    )
}

/// A duration, in the largest unit that fits.
fn span(ms: u64) -> String {
    match ms / 1000 {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s => format!("{} h", s / 3600),
    }
}

/// The fleet's alerts, newest first: the alerts devices raised (open ones, and those closed in the last 15
/// minutes), drift triggers and failed updates.
pub fn alerts(
    devices: &[Device],
    raised: &[crate::fleet::alerts::StoredAlert],
    triggers: &[crate::ml::triggers::TriggerEvent],
    now: u64,
) -> Vec<Alert> {
    let mut out = Vec::new();
    for a in raised {
        let closed_long_ago =
            a.alert.end_ms.is_some_and(|e| now.saturating_sub(a.received_ms.max(e)) >= CLOSED_ALERT_MS);
        if !closed_long_ago {
            let explained = StoredAlert { drift: drift_explaining(a, triggers), ..a.clone() };
            out.push(Alert {
                kind: "alert",
                at_ms: a.alert.onset_ms,
                text: describe(&explained),
                link: format!("/devices/{}", a.device),
            });
        }
    }
    for d in devices {
        if let Some(u) = d.latest_update().filter(|u| u.phase.is_failure()) {
            out.push(Alert {
                kind: "update",
                at_ms: u.at_ms,
                text: format!(
                    "{}: update {} {} — {}",
                    d.id,
                    u.sha256.get(..12).unwrap_or(&u.sha256),
                    format!("{:?}", u.phase).to_lowercase(),
                    u.reason
                ),
                link: format!("/devices/{}", d.id),
            });
        }
    }
    for t in triggers.iter().filter(|t| now.saturating_sub(t.at_ms) < DRIFT_ALERT_MS) {
        if let Cause::Drift { feature, psi, threshold } = &t.cause {
            out.push(Alert {
                kind: "drift",
                at_ms: t.at_ms,
                text: format!(
                    "class {}: feature {feature} drifted (PSI {psi:.3} over {threshold}); {}",
                    t.class,
                    match (t.job, &t.error) {
                        (Some(j), _) => format!("retraining job {j} started"),
                        (None, Some(e)) => format!("retraining not started: {e}"),
                        (None, None) => "no retraining".into(),
                    }
                ),
                link: "/models".into(),
            });
        }
    }
    out.sort_by_key(|a| std::cmp::Reverse(a.at_ms));
    out
}

/// Per class: devices, online, model versions in use, backlog.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ClassRow {
    pub devices: usize,
    pub online: usize,
    pub models: BTreeMap<String, usize>,
    pub backlog: u64,
}

pub fn by_class(devices: &[Device], now: u64, offline_after_ms: u64) -> BTreeMap<String, ClassRow> {
    let mut out: BTreeMap<String, ClassRow> = BTreeMap::new();
    for d in devices {
        let class = if d.class.is_empty() { "(no heartbeat yet)".to_string() } else { d.class.clone() };
        let row = out.entry(class).or_default();
        row.devices += 1;
        row.online += usize::from(online(d, now, offline_after_ms));
        *row.models.entry(model_of(d)).or_default() += 1;
        row.backlog += backlog(d);
    }
    out
}

#[derive(Deserialize, Debug, Default)]
pub struct FleetQuery {
    class: Option<String>,
}

pub async fn overview(State(s): State<AppState>, who: Who, Query(q): Query<FleetQuery>) -> Response {
    let now = edgeloop_common::unix_millis();
    let mut devices = s.registry.list();
    devices.sort_by(|a, b| (&a.class, &a.id).cmp(&(&b.class, &b.id)));
    let classes = by_class(&devices, now, s.offline_after_ms);
    let raised = {
        let store = s.alerts.clone();
        // Every open alert (however many newer closed ones there are), and the newest closed ones.
        tokio::task::spawn_blocking(move || {
            use crate::fleet::alerts::AlertWhere;
            let (mut open, _) = store.page_where(
                AlertWhere { open: Some(true), ..Default::default() },
                None,
                200,
                1_000_000,
                |_| true,
            )?;
            open.extend(
                store
                    .page_where(AlertWhere { open: Some(false), ..Default::default() }, None, 200, 10_000, |_| true)?
                    .0,
            );
            Ok::<_, crate::fleet::telemetry::StoreError>(open)
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
    };
    let raised = match raised {
        Ok(r) => r,
        Err(e) => {
            return page_error(
                Some(&who),
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("Reading the alerts failed: {e}"),
            )
        }
    };
    let learning = s.learning.clone();
    let events = tokio::task::spawn_blocking(move || learning.trigger_events()).await.unwrap_or_default();
    let alerts = alerts(&devices, &raised, &events, now);
    let on = devices.iter().filter(|d| online(d, now, s.offline_after_ms)).count();
    let active_rollouts = s.rollouts.list().iter().filter(|r| r.state.is_active()).count();
    let shown: Vec<&Device> =
        devices.iter().filter(|d| q.class.as_ref().is_none_or(|c| &d.class == c)).take(MAX_ROWS).collect();
    let matching = devices.iter().filter(|d| q.class.as_ref().is_none_or(|c| &d.class == c)).count();
    let body = html! {
        h1 { "Fleet" }
        section #summary data-live {
            ul.cards {
                li { span.big #devices-total { (devices.len()) } " devices" }
                li { span.big.ok #devices-online { (on) } " online" }
                li { span.big.warn #devices-offline { (devices.len() - on) } " offline" }
                li { span.big { (classes.len()) } " classes" }
                li { a href="/rollouts" { span.big { (active_rollouts) } " active rollouts" } }
                li { span.big.alert { (alerts.len()) } " alerts" }
            }
        }
        section #alerts data-live aria-labelledby="alerts-h" {
            h2 #alerts-h { "Alerts" }
            @if alerts.is_empty() { p.muted { "No open alert, none closed in the last 15 minutes, no drift today, no failed updates." } }
            @else {
                ul.alerts {
                    @for a in alerts.iter().take(50) {
                        li class=(format!("alert {}", a.kind)) {
                            (badge(a.kind, a.kind)) " " a href=(a.link) { (a.text) } " " span.muted { (ago(now, a.at_ms)) }
                        }
                    }
                }
            }
        }
        section #classes data-live aria-labelledby="classes-h" {
            h2 #classes-h { "By class" }
            div.scroll { table {
                thead { tr { th { "Class" } th.num { "Devices" } th.num { "Online" } th.num { "Offline" } th { "Models in use" } th.num { "Outbox backlog" } } }
                tbody {
                    @for (class, r) in &classes {
                        tr {
                            td { a href=(format!("/?class={class}")) { (class) } }
                            td.num { (r.devices) } td.num { (r.online) } td.num { (r.devices - r.online) }
                            td { @for (m, n) in &r.models { span.chip { (m) " ×" (n) } " " } }
                            td.num { (r.backlog) }
                        }
                    }
                }
            } }
        }
        section #devices data-live aria-labelledby="devices-h" {
            h2 #devices-h { "Devices" @if let Some(c) = &q.class { " of " (c) " " a.small href="/" { "(all classes)" } } }
            @if matching > shown.len() { p.muted { "Showing the first " (shown.len()) " of " (matching) "; pick a class to narrow the list." } }
            div.scroll { table #device-table {
                thead { tr { th { "Device" } th { "Class" } th { "Status" } th { "Model" } th.num { "Backlog" } th.num { "Records" } th.num { "Flagged" } th { "Last seen" } } }
                tbody {
                    @for d in &shown {
                        tr data-device=(d.id) {
                            td { a href=(format!("/devices/{}", d.id)) { (d.id) } }
                            td { (d.class) }
                            td { @if online(d, now, s.offline_after_ms) { (badge("ok", "online")) } @else { (badge("warn", "offline")) } }
                            td { (model_of(d)) }
                            td.num { (backlog(d)) }
                            td.num { (d.records) }
                            td.num { (d.anomalies) }
                            td { (ago(now, d.last_seen_ms)) }
                        }
                    }
                }
            } }
        }
    };
    page("Fleet", &who, Nav::Fleet, 3000, body).into_response()
}

/// The last `n` records of a device, oldest first.
fn recent(s: &AppState, device: &str, n: u64) -> Result<Vec<Record>, crate::fleet::telemetry::StoreError> {
    let Some(last) = s.store.last(device)? else { return Ok(Vec::new()) };
    s.store.query(
        device,
        StoreQuery { after_seq: last.seq.saturating_sub(n), from_ms: None, to_ms: None, limit: n as usize },
    )
}

/// The charts of one sensor: its anomaly score (with the model's threshold) and its first features.
fn sensor_charts(sensor: &str, records: &[&Record], names: &[String], threshold: Option<f64>) -> Markup {
    let point = |r: &Record, v: f64| Point { ts_ms: r.ts_ms, value: v, flagged: r.flags & FLAG_ANOMALY != 0 };
    let scores: Vec<Point> = records.iter().filter_map(|r| r.score.map(|v| point(r, f64::from(v)))).collect();
    let width = records.iter().map(|r| r.features.len()).max().unwrap_or(0);
    html! {
        h3 { "Sensor " (sensor) }
        div.charts {
            @if scores.is_empty() { p.muted { "No anomaly scores yet: the device runs no model." } }
            @else { (raw(svg::line_chart(&format!("{sensor}: anomaly score"), &scores, threshold))) }
            @for i in 0..width.min(MAX_FEATURE_CHARTS) {
                @let name = names.get(i).cloned().unwrap_or_else(|| format!("feature {i}"));
                @let pts: Vec<Point> = records.iter().filter_map(|r| r.features.get(i).map(|v| point(r, f64::from(*v)))).collect();
                (raw(svg::line_chart(&format!("{sensor}: {name}"), &pts, None)))
            }
        }
        @if width > MAX_FEATURE_CHARTS { p.muted { (width - MAX_FEATURE_CHARTS) " more features are not drawn." } }
    }
}

/// Names of a sensor's features: from the class's firmware config when the control plane has it, else from
/// the pipeline of a registered model of the class, else guessed from the width (pipeline v1 has two
/// families of different widths).
fn feature_names(
    models: &[crate::ml::models::ModelVersion],
    class_name: &str,
    sensor: &str,
    class: Option<&edgeloop_common::config::ClassConfig>,
    records: &[&Record],
) -> Vec<String> {
    use edgeloop_common::features::{SLOW_FEATURES, WINDOW_FEATURES};
    if let Some(x) = class.and_then(|c| c.sensors.iter().find(|x| x.name == sensor)) {
        return edgeloop_common::config::ClassConfig::sensor_spec(x).feature_names();
    }
    let from_model = models
        .iter()
        .filter(|m| m.class == class_name)
        .find_map(|m| m.pipeline.sensors.iter().find(|x| x.name == sensor).cloned());
    if let Some(spec) = from_model {
        return spec.feature_names();
    }
    let width = records.iter().map(|r| r.features.len()).max().unwrap_or(0);
    let per: &[&str] = if width % SLOW_FEATURES.len() == 0 && width % WINDOW_FEATURES.len() != 0 {
        &SLOW_FEATURES
    } else if width % WINDOW_FEATURES.len() == 0 {
        &WINDOW_FEATURES
    } else {
        return Vec::new();
    };
    let channels = width / per.len();
    (0..channels)
        .flat_map(|c| per.iter().map(move |f| if channels == 1 { f.to_string() } else { format!("ch{c}.{f}") }))
        .collect()
}

/// Log lines the device page shows.
const LOG_LINES: usize = 50;

pub async fn device(State(s): State<AppState>, who: Who, Path(id): Path<String>) -> Response {
    if edgeloop_common::topics::validate_device_id(&id).is_err() {
        return page_error(Some(&who), StatusCode::BAD_REQUEST, &format!("`{id}` is not a device id."));
    }
    let Some(d) = s.registry.get(&id) else {
        return page_error(
            Some(&who),
            StatusCode::NOT_FOUND,
            &format!("No device `{id}` has reported to this control plane."),
        );
    };
    // The store and the model registry are read on the blocking pool.
    let st = s.clone();
    let dev = id.clone();
    let read = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let records = recent(&st, &dev, CHART_RECORDS).map_err(|e| e.to_string())?;
        let models = st.learning.models.list().map_err(|e| e.to_string())?;
        let q = crate::fleet::logs::LogQuery { device: Some(dev.clone()), limit: LOG_LINES, ..Default::default() };
        let logs = st.logs.search(&q).map_err(|e| e.to_string())?.entries;
        let log_stats = st.logs.stats(&dev).map_err(|e| e.to_string())?;
        let raised = st
            .alerts
            .page_where(
                crate::fleet::alerts::AlertWhere { device: Some(&dev), open: None },
                None,
                DEVICE_ALERTS,
                100_000,
                |_| true,
            )
            .map_err(|e| e.to_string())?
            .0;
        let mut raised = raised;
        explain_drift(&mut raised, &st.learning.trigger_events());
        Ok((records, models, (logs, log_stats), raised))
    });
    let (records, models, (logs, log_stats), raised) = match read.await.map_err(|e| e.to_string()).and_then(|r| r) {
        Ok(r) => r,
        Err(e) => {
            return page_error(
                Some(&who),
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("Reading the device's records failed: {e}"),
            )
        }
    };
    let now = edgeloop_common::unix_millis();
    // The threshold of the model the device runs, when the registry knows it.
    let active = d.latest_update().and_then(|u| u.active_sha256.clone());
    let threshold = active.and_then(|sha| models.iter().find(|m| m.sha256 == sha)).map(|m| f64::from(m.threshold));
    let class = s.learning.classes.get(&d.class);
    let mut sensors: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in &records {
        sensors.entry(r.sensor.as_str()).or_default().push(r);
    }
    let tags = s.rollouts.tags(&id);
    let window = s.rollouts.opening(&d.class, &tags, now);
    let st = d.last_status.clone().unwrap_or_default();
    let on = online(&d, now, s.offline_after_ms);
    let body = html! {
        h1 { "Device " (d.id) }
        section #device-info data-live {
            ul.cards {
                li { "Class " strong { @if d.class.is_empty() { "unknown" } @else { (d.class) } } }
                li { @if on { (badge("ok", "online")) } @else { (badge("warn", "offline")) } " last seen " (ago(now, d.last_seen_ms)) }
                li { "Model " strong #device-model { (model_of(&d)) } }
                li { "Records " strong { (d.records) } }
                li { "Flagged " strong { (d.anomalies) } }
                @if !tags.is_empty() { li { "Tags " @for t in &tags { span.chip { (t) } " " } } }
                @match window {
                    Opening::Always => {}
                    Opening::Open { closes_ms } => { li #window { "Maintenance window " (badge("ok", "open")) " until " (datetime(closes_ms)) } }
                    Opening::Closed { opens_ms } => { li #window { "Maintenance window " (badge("muted", "closed")) "; next opens " (datetime(opens_ms)) } }
                }
            }
        }
        section #charts data-live aria-labelledby="charts-h" {
            h2 #charts-h { "Live data" span.muted { " (last " (records.len()) " records; red dots are windows the model flagged)" } }
            @if records.is_empty() { p.muted { "No records stored yet." } }
            @for (sensor, rs) in &sensors {
                (sensor_charts(sensor, rs, &feature_names(&models, &d.class, sensor, class, rs), threshold))
            }
        }
        section #heartbeat data-live aria-labelledby="heartbeat-h" {
            h2 #heartbeat-h { "Heartbeat" }
            @if d.last_status.is_none() { p.muted { "No heartbeat yet." } }
            @else {
                dl.grid {
                    dt { "Uptime" } dd { (st.uptime_s) " s" }
                    dt { "Memory (RSS)" } dd { @if let Some(r) = st.rss_bytes { (bytes(r)) } @else { "not reported" } }
                    dt { "Inference p50 / p95" } dd { (st.inference_p50_us.map_or("–".into(), |v| format!("{v} µs"))) " / " (st.inference_p95_us.map_or("–".into(), |v| format!("{v} µs"))) }
                    dt { "Outbox backlog" } dd { (st.outbox_depth) " records, " (bytes(st.outbox_bytes)) }
                    dt { "Last sequence / acknowledged" } dd { (st.last_seq) " / " (st.acked_upto) }
                    dt { "Dropped by the outbox bound" } dd { (st.dropped_total) " records" }
                    dt { "Dropped ranges" } dd {
                        @if st.dropped_ranges.is_empty() { "none" }
                        @for r in st.dropped_ranges.iter().rev().take(10) { code { (r.from) "–" (r.to) } " " }
                        @if st.dropped_ranges.len() > 10 { " and " (st.dropped_ranges.len() - 10) " older" }
                    }
                    dt { "Malformed samples refused" } dd { (st.bad_samples) }
                    dt { "Duplicates / refused messages" } dd { (d.duplicates) " / " (d.rejected) }
                }
            }
        }
        section #device-alerts data-live aria-labelledby="device-alerts-h" {
            h2 #device-alerts-h { "Alerts" span.muted { " (its latest " (DEVICE_ALERTS) "; one fault is one alert)" } }
            @if raised.is_empty() { p.muted { "This device has raised no alert." } }
            @else {
                ul.alerts {
                    @for a in &raised {
                        li class=(if a.open { "alert open" } else { "alert" }) {
                            (badge(if a.open { "bad" } else { "muted" }, if a.open { "open" } else { "closed" })) " "
                            (describe(a)) " " span.muted { "since " (datetime(a.alert.onset_ms)) }
                        }
                    }
                }
                p.muted { "Acknowledge one, with a verdict that labels its span for training: " code { "POST /api/v1/alerts/" (d.id) "/{id}/ack {\"verdict\": true}" } }
            }
        }
        section #logs data-live aria-labelledby="logs-h" {
            h2 #logs-h { "Device log" span.muted { " (its latest warnings and errors; "
                (log_stats.stored) " shipped, " (log_stats.suppressed) " left out by the device's budget, "
                (log_stats.cut) " cut by the control plane's)" } }
            @if logs.is_empty() { p.muted { "No warning or error from this device." } }
            @else {
                div.scroll { table {
                    thead { tr { th { "When (device clock)" } th { "Level" } th { "Where" } th { "Message" } } }
                    tbody {
                        @for l in &logs {
                            tr {
                                td { (layout::datetime(l.ts_ms)) }
                                td { (badge(if l.level == edgeloop_common::envelope::LogLevel::Error { "bad" } else { "warn" }, l.level.as_str())) }
                                td { code { (l.target) } }
                                td { (l.message) }
                            }
                        }
                    }
                } }
                p.muted { "Older lines and searches: " code { "GET /api/v1/devices/" (d.id) "/logs?level=&q=&since=&until=&cursor=" } }
            }
        }
        section #updates data-live aria-labelledby="updates-h" {
            h2 #updates-h { "Update history" }
            @if d.updates.is_empty() { p.muted { "No model update has reached this device." } }
            @else {
                div.scroll { table {
                    thead { tr { th { "When" } th { "Rollout" } th { "Model" } th { "Phase" } th { "Reason" } th.num { "Shadow agreement" } th.num { "Anomaly rate" } th.num { "p95" } } }
                    tbody {
                        @for u in d.updates.iter().rev() {
                            tr {
                                td { (layout::datetime(u.at_ms)) }
                                td { @if let Some(r) = &u.rollout { a href=(format!("/rollouts/{r}")) { (r) } } @else { "–" } }
                                td { (sha(&u.sha256)) }
                                td { (badge(if u.phase.is_failure() { "bad" } else if u.phase.is_final() { "ok" } else { "info" }, &format!("{:?}", u.phase).to_lowercase())) }
                                td { (u.reason) }
                                td.num { (u.shadow_agreement.map_or("–".into(), |v| format!("{:.1}%", v * 100.0))) }
                                td.num { (u.anomaly_rate.map_or("–".into(), |v| format!("{:.2}%", v * 100.0))) }
                                td.num { (u.p95_us.map_or("–".into(), |v| format!("{v} µs"))) }
                            }
                        }
                    }
                } }
            }
        }
    };
    page(&format!("Device {id}"), &who, Nav::Fleet, 3000, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ml::triggers::TriggerEvent;
    use edgeloop_common::envelope::Status;
    use edgeloop_common::update::{Phase, UpdateReport};

    fn dev(id: &str, class: &str, last_seen_ms: u64) -> Device {
        Device { id: id.into(), class: class.into(), last_seen_ms, ..Default::default() }
    }

    #[test]
    fn classes_count_online_models_and_backlog() {
        let mut a = dev("a", "press", 1_000);
        a.last_status = Some(Status { model_version: Some("press:2".into()), outbox_depth: 7, ..Default::default() });
        let b = dev("b", "press", 100);
        let c = dev("c", "", 1_000);
        let rows = by_class(&[a, b, c], 1_000, 500);
        let press = &rows["press"];
        assert_eq!((press.devices, press.online, press.backlog), (2, 1, 7));
        assert_eq!(press.models.get("press:2"), Some(&1));
        assert_eq!(press.models.get("none"), Some(&1));
        assert_eq!(rows["(no heartbeat yet)"].devices, 1);
    }

    #[test]
    fn alerts_list_raised_alerts_drift_and_failed_updates_newest_first() {
        let now = 100 * 60 * 1000;
        let alert = |id: u64, onset_ms: u64, end_ms: Option<u64>| crate::fleet::alerts::StoredAlert {
            device: "fresh".into(),
            class: "press".into(),
            alert: edgeloop_common::alerts::AlertEvent {
                id,
                rev: id,
                sensor: "vibration".into(),
                model: Some("press v2 (sha256:abcdef012345)".into()),
                onset_ms,
                last_ms: onset_ms + 1000,
                peak_score: 4.5,
                peak_ms: onset_ms,
                windows: 7,
                end_ms,
                floor: 0,
            },
            received_ms: end_ms.unwrap_or(onset_ms),
            open: end_ms.is_none(),
            ack: None,
            listed_ms: None,
            drift: None,
        };
        // Open; closed a minute ago; closed long ago (not listed).
        let raised =
            [alert(3, now - 1000, None), alert(2, now - 4000, Some(now - 60_000)), alert(1, 0, Some(CLOSED_ALERT_MS))];
        let mut failed = dev("failed", "press", now);
        failed.add_update(UpdateReport {
            seq: 1,
            rollout: Some("r1".into()),
            sha256: "ab".repeat(32),
            phase: Phase::Reverted,
            reason: "NaN output".into(),
            active_sha256: None,
            shadow_agreement: None,
            anomaly_rate: None,
            baseline_anomaly_rate: None,
            p95_us: None,
            at_ms: now - 500,
            failure: None,
            component: Default::default(),
        });
        let drift = TriggerEvent {
            class: "city-traffic".into(),
            at_ms: now - 2000,
            cause: Cause::Drift { feature: "mean".into(), psi: 0.41, threshold: 0.25 },
            job: Some(4),
            error: None,
            drifted: None,
        };
        let schedule =
            TriggerEvent { cause: Cause::Schedule { every_secs: 60, since_last_secs: None }, ..drift.clone() };
        let a = alerts(&[failed], &raised, &[drift.clone(), schedule], now);
        let kinds: Vec<&str> = a.iter().map(|x| x.kind).collect();
        assert_eq!(kinds, ["update", "alert", "drift", "alert"]);
        assert!(a[0].text.contains("reverted") && a[0].text.contains("NaN output"), "{}", a[0].text);
        assert!(a[1].text.contains("alert 3") && a[1].text.contains("open") && a[1].link == "/devices/fresh");
        assert!(a[1].text.contains("press v2") && a[1].text.contains("not acknowledged"), "{}", a[1].text);
        assert!(a[2].text.contains("PSI 0.410") && a[2].text.contains("job 4"), "{}", a[2].text);
        assert!(a[3].text.contains("alert 2") && a[3].text.contains("closed after"), "{}", a[3].text);
        assert!(a.iter().all(|x| !x.text.contains("drift, not a fault")));
        // A drift of the alert's class, measured against the model that raised it, over its onset: the
        // alert says so.
        let press_drift = TriggerEvent {
            class: "press".into(),
            job: Some(7),
            drifted: Some(crate::ml::triggers::DriftedWindow {
                from_ms: now - 2000,
                to_ms: now,
                model_sha256: format!("abcdef012345{}", "0".repeat(52)),
            }),
            ..drift
        };
        let a = alerts(&[], &raised, &[press_drift], now);
        let texts: Vec<&str> = a.iter().filter(|x| x.kind == "alert").map(|x| x.text.as_str()).collect();
        assert!(texts[0].contains("alert 3") && texts[0].contains("most likely drift, not a fault"), "{}", texts[0]);
        assert!(texts[0].contains("press's mean drifted") && texts[0].contains("retraining in job 7"), "{}", texts[0]);
        // Alert 2 began before the drifted window.
        assert!(texts[1].contains("alert 2") && !texts[1].contains("drift"), "{}", texts[1]);
    }
}
