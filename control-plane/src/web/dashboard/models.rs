//! Model pages: every version with its metrics and promotion decision, training jobs, and per version the
//! lineage, the hyper-parameter trials and the drift of each feature against the production version.

use super::layout::{ago, badge, bytes, datetime, page, page_error, raw, sha, Nav, Who};
use super::svg;
use crate::ml::jobs::{DriftReading, JobState};
use crate::ml::models::ModelVersion;
use crate::ml::training::run::PROMOTION_Z;
use crate::web::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};

/// A drift reading older than this is measured again when a model page asks for it.
const DRIFT_MAX_AGE_MS: u64 = 30_000;
/// PSI above which a feature has shifted a lot (the usual rule of thumb).
const PSI_LIMIT: f64 = 0.25;

fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

fn promotion(m: &ModelVersion) -> Markup {
    html! { @if m.promotion.promoted { (badge("ok", "promoted")) } @else { (badge("muted", "not promoted")) } }
}

pub async fn list(State(s): State<AppState>, who: Who) -> Response {
    let models = s.learning.models.clone();
    let mut versions = match tokio::task::spawn_blocking(move || models.list()).await {
        Ok(Ok(v)) => v,
        _ => {
            return page_error(
                Some(&who),
                StatusCode::INTERNAL_SERVER_ERROR,
                "The model registry could not be read; see the control plane's log.",
            )
        }
    };
    versions.sort_by(|a, b| (&a.name, std::cmp::Reverse(a.version)).cmp(&(&b.name, std::cmp::Reverse(b.version))));
    let learning = s.learning.clone();
    let mut jobs = tokio::task::spawn_blocking(move || learning.list_jobs()).await.unwrap_or_default();
    jobs.reverse();
    let now = edgeloop_common::unix_millis();
    let classes: Vec<&String> = s.learning.classes.keys().collect();
    let body = html! {
        h1 { "Models" }
        section #versions data-live aria-labelledby="versions-h" {
            h2 #versions-h { "Versions" }
            @if versions.is_empty() { p.muted { "No model yet. Train one below, or upload one with POST /api/v1/models." } }
            @else {
                div.scroll { table #model-table {
                    thead { tr { th { "Model" } th { "Class" } th { "Kind" } th { "Created" } th.num { "Val loss" } th.num { "Test AUC" } th.num { "F1" } th { "Promotion" } th { "Artifact" } } }
                    tbody {
                        @for m in &versions {
                            tr {
                                td { a href=(format!("/models/{}/{}", m.name, m.version)) { (m.name) " v" (m.version) } }
                                td { (m.class) } td { (m.kind) } td { (ago(now, m.created_ms)) }
                                td.num { (num(Some(m.lineage.metrics.val_loss), 4)) }
                                td.num { (num(m.lineage.metrics.test_auc, 3)) }
                                td.num { (num(m.lineage.metrics.test_f1, 3)) }
                                td { (promotion(m)) " " span.small { (m.promotion.reason) } }
                                td { (sha(&m.sha256)) " " span.muted { (bytes(m.size)) } }
                            }
                        }
                    }
                } }
            }
        }
        section #jobs data-live aria-labelledby="jobs-h" {
            h2 #jobs-h { "Training jobs" }
            @if jobs.is_empty() { p.muted { "No training yet." } }
            @else {
                div.scroll { table {
                    thead { tr { th.num { "Job" } th { "Class" } th { "Cause" } th { "State" } th { "Progress" } th { "Result" } } }
                    tbody {
                        @for j in jobs.iter().take(20) {
                            tr {
                                td.num { (j.id) } td { (j.class) } td.small { (j.cause) }
                                td { (badge(match j.state { JobState::Failed => "bad", JobState::Interrupted => "warn", JobState::Succeeded => "ok", _ => "info" }, &format!("{:?}", j.state).to_lowercase())) }
                                td { progress max="1" value=(j.progress) { (format!("{:.0}%", j.progress * 100.0)) } " " span.small { (j.message) } }
                                td.small {
                                    @if let Some(r) = &j.result { a href=(format!("/models/{}/{}", r.name, r.version)) { (r.name) " v" (r.version) } " " (r.reason) }
                                    @if let Some(e) = &j.error { span.error { (e) } }
                                }
                            }
                        }
                    }
                } }
            }
        }
        @if who.can_operate() && !classes.is_empty() {
            section aria-labelledby="train-h" {
                h2 #train-h { "Train now" }
                form #train-form data-api="/api/v1/train" data-build="train" {
                    label for="train-class" { "Class" }
                    select #train-class name="class" { @for c in &classes { option value=(c) { (c) } } }
                    label for="train-trials" { "Trials" }
                    input #train-trials type="number" name="trials" min="1" max="1000" value=(s.learning.defaults.trials);
                    button type="submit" { "Start training" }
                }
            }
        }
    };
    page("Models", &who, Nav::Models, 5000, body).into_response()
}

/// The class's latest drift reading, measured again when older than [`DRIFT_MAX_AGE_MS`]. Blocking.
fn drift_now(s: &AppState, class: &str) -> Option<DriftReading> {
    let now = edgeloop_common::unix_millis();
    if let Some(r) = s.learning.drift(class).filter(|r| now.saturating_sub(r.at_ms) < DRIFT_MAX_AGE_MS) {
        return Some(r);
    }
    let cfg: crate::ml::triggers::TriggerConfig = serde_json::from_value(serde_json::json!({ "class": class })).ok()?;
    let psi = crate::ml::triggers::measure_drift(&s.learning, &cfg);
    if psi.is_empty() {
        return None;
    }
    let reading = DriftReading { at_ms: now, psi };
    s.learning.record_drift(class, reading.clone());
    Some(reading)
}

pub async fn detail(State(s): State<AppState>, who: Who, Path((name, version)): Path<(String, String)>) -> Response {
    let Ok(version) = version.trim_start_matches('v').parse::<u32>() else {
        return page_error(Some(&who), StatusCode::BAD_REQUEST, &format!("`{version}` is not a version number."));
    };
    let (st, n) = (s.clone(), name.clone());
    let found = tokio::task::spawn_blocking(move || {
        let m = st.learning.models.get(&n, version)?;
        let prod = m.as_ref().map(|m| st.learning.models.production(&m.class)).transpose()?.flatten();
        let drift = match (&m, &prod) {
            (Some(m), Some(p)) if p.sha256 == m.sha256 => drift_now(&st, &m.class),
            _ => None,
        };
        Ok::<_, crate::fleet::telemetry::StoreError>((m, prod, drift))
    })
    .await;
    let (m, prod, drift) = match found {
        Ok(Ok((Some(m), prod, drift))) => (m, prod, drift),
        Ok(Ok((None, ..))) => {
            return page_error(Some(&who), StatusCode::NOT_FOUND, &format!("There is no model {name} v{version}."))
        }
        _ => {
            return page_error(
                Some(&who),
                StatusCode::INTERNAL_SERVER_ERROR,
                "The model registry could not be read; see the control plane's log.",
            )
        }
    };
    let l = &m.lineage;
    let is_prod = prod.as_ref().is_some_and(|p| p.sha256 == m.sha256);
    let names = m.pipeline.sensors.iter().find(|x| x.name == m.sensor).map(|x| x.feature_names()).unwrap_or_default();
    let report = serde_json::to_value(&l.dataset_report).unwrap_or_default();
    let hyper = serde_json::to_value(&l.hyper).unwrap_or_default();
    let best = l.trials.iter().map(|t| t.val_loss).fold(f64::INFINITY, f64::min);
    let body = html! {
        h1 { (m.name) " v" (m.version) " " (promotion(&m)) @if is_prod { " " (badge("info", "production")) } }
        section aria-labelledby="summary-h" {
            h2 #summary-h { "Summary" }
            dl.grid {
                dt { "Class / sensor" } dd { (m.class) " / " (m.sensor) }
                dt { "Kind" } dd { (m.kind) @if m.frames > 1 { " over windows of " (m.frames) " vectors" } }
                @if !l.selection.is_empty() { dt { "Why this kind" } dd #selection { (l.selection) } }
                dt { "Created" } dd { (datetime(m.created_ms)) " UTC" }
                dt { "Artifact" } dd { (sha(&m.sha256)) " " (bytes(m.size)) " " a href=(format!("/api/v1/artifacts/{}", m.sha256)) { "download" } }
                dt { "Input → output" } dd { code { (format!("{:?}", m.input_shape)) } " → " code { (format!("{:?}", m.output_shape)) } }
                dt { "Decision threshold" } dd { (m.threshold) " (" (l.threshold_source) ")" }
                dt { "Golden vectors" } dd { (m.golden.len()) }
                dt { "Code version" } dd { (l.code_version) }
            }
        }
        section aria-labelledby="promotion-h" {
            h2 #promotion-h { "Promotion decision" }
            p #promotion { (m.promotion.reason) }
            dl.grid {
                dt { "Metric" } dd { (m.promotion.metric) }
                dt { "This version" } dd { (format!("{:.5}", m.promotion.candidate)) }
                dt { "Production then" } dd { @match (m.promotion.production_version, m.promotion.production) {
                    (Some(v), Some(x)) => { "v" (v) ": " (format!("{x:.5}")) }
                    _ => { "none (first version)" }
                } }
                dt { "Margin to beat it by" } dd { @match m.promotion.margin {
                    Some(x) => { (format!("{x:.5} ({} standard errors of the paired difference)", PROMOTION_Z)) }
                    None => { "none" }
                } }
            }
        }
        section aria-labelledby="metrics-h" {
            h2 #metrics-h { "Metrics" }
            dl.grid {
                dt { "Validation loss" } dd { (format!("{:.5}", l.metrics.val_loss)) }
                dt { "Test loss" } dd { (format!("{:.5}", l.metrics.test_loss)) }
                dt { "Test ROC AUC" } dd { (num(l.metrics.test_auc, 3)) }
                dt { "Test precision / recall / F1" } dd { (num(l.metrics.test_precision, 3)) " / " (num(l.metrics.test_recall, 3)) " / " (num(l.metrics.test_f1, 3)) }
                dt { "Test accuracy (majority class)" } dd { (num(l.metrics.test_accuracy, 3)) " (" (num(l.metrics.majority_accuracy, 3)) ")" }
                dt { "ONNX export vs candle, max relative error" } dd { (format!("{:.2e}", l.metrics.export_max_rel_error)) }
            }
        }
        section #drift data-live aria-labelledby="drift-h" {
            h2 #drift-h { "Drift of each feature" }
            @if !is_prod { p.muted { "Drift is measured for the production version of the class." } }
            @else if let Some(d) = &drift {
                @let rows: Vec<(String, f64)> = d.psi.iter().enumerate()
                    .map(|(i, p)| (names.get(i).cloned().unwrap_or_else(|| format!("feature {i}")), *p)).collect();
                (raw(svg::bars(&format!("PSI, recent window vs training set (measured {})", ago(edgeloop_common::unix_millis(), d.at_ms)), &rows, PSI_LIMIT)))
                p.small.muted { "Bars past the line (PSI " (PSI_LIMIT) ") mark a large shift." }
            } @else { p.muted { "Not measured: no recent records of this class." } }
        }
        section aria-labelledby="dataset-h" {
            h2 #dataset-h { "Dataset" }
            p { "Content hash " (sha(&l.dataset_hash)) ", seed " (l.seed) }
            dl.grid {
                @if let Some(o) = report.as_object() { @for (k, v) in o { dt { (k.replace('_', " ")) } dd { (compact(v)) } } }
            }
        }
        section aria-labelledby="trials-h" {
            h2 #trials-h { "Hyper-parameter search" }
            p { "Chosen: " code { (compact(&hyper)) } }
            div.scroll { table #trial-table {
                thead { tr { th.num { "Trial" } th.num { "Rung" } th.num { "Width" } th.num { "Depth" } th.num { "Learning rate" } th.num { "Epochs run" } th.num { "Val loss" } th.num { "Seconds" } th { "Device" } } }
                tbody {
                    @for t in &l.trials {
                        tr class=[(t.val_loss == best).then_some("best")] {
                            td.num { (t.id) } td.num { (t.rung) } td.num { (t.hyper.width) } td.num { (t.hyper.depth) }
                            td.num { (format!("{:.1e}", t.hyper.lr)) } td.num { (t.epochs_run) " / " (t.hyper.epochs) }
                            td.num { (format!("{:.5}", t.val_loss)) } td.num { (format!("{:.2}", t.seconds)) }
                            td { (t.device) }
                        }
                    }
                }
            } }
        }
    };
    page(&format!("{name} v{version}"), &who, Nav::Models, 10_000, body).into_response()
}

/// A JSON value on one line, without quotes around plain strings.
fn compact(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
