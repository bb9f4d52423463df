//! Rollout pages (the list with a start form, and one rollout's stages, gates, phases, devices, events and
//! actions) and the audit log.

use super::layout::{ago, badge, datetime, page, page_error, sha, Nav, Who};
use crate::rollout::engine::{iso, GateValue, Kind, Share, State as RState, Target, Waiting};
use crate::rollout::view::{view, RolloutView};
use crate::web::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};

fn state_badge(s: &RState) -> Markup {
    let (kind, text, why) = match s {
        RState::Scheduled => ("muted", "scheduled", None),
        RState::Running => ("info", "running", None),
        RState::AwaitingApproval => ("warn", "awaiting approval", None),
        RState::Paused { reason } => ("warn", "paused", Some(reason.as_str())),
        RState::Completed => ("ok", "completed", None),
        RState::RolledBack { reason } => ("bad", "rolled back", Some(reason.as_str())),
        RState::Aborted => ("bad", "aborted", None),
        RState::Superseded { by } => ("muted", "superseded", Some(by.as_str())),
    };
    html! { span.state data-state=(text) { (badge(kind, text)) @if let Some(w) = why { " " span.small { (w) } } } }
}

fn share(s: Share) -> String {
    match s {
        Share::Percent(p) => format!("{p}%"),
        Share::Count(c) => format!("{c} device{}", if c == 1 { "" } else { "s" }),
    }
}

fn gate_cell(g: &GateValue) -> Markup {
    let value = g.value.map_or("no data".into(), |v| format!("{v:.3}"));
    html! {
        span class=(if g.ok { "gate ok" } else { "gate bad" }) title=(format!("{}: {value} against {}", g.gate, g.threshold)) {
            (if g.ok { "✓ " } else { "✗ " }) (g.gate.replace('_', " ")) " " strong { (value) } " / " (format!("{}", g.threshold))
        }
    }
}

/// What a running rollout waits for, in words.
fn waiting_text(w: &Waiting) -> String {
    let n = |k: usize| format!("{k} device{}", if k == 1 { "" } else { "s" });
    match w {
        Waiting::Start { at_ms } => format!("starts at {}", iso(*at_ms)),
        Waiting::Reports { devices } => format!("waiting for {} to report", n(*devices)),
        Waiting::Offline { devices } => format!("every device the stage waits for is offline ({})", n(*devices)),
        Waiting::NoDevices { matching } => format!("no online device to take in ({matching} match)"),
        Waiting::Window { devices, opens_ms } => format!(
            "{} wait for their maintenance window{}",
            n(*devices),
            opens_ms.map_or(String::new(), |t| format!("; the next opens at {}", iso(t)))
        ),
        Waiting::Bake { until_ms } => format!("baking until {}", iso(*until_ms)),
        Waiting::Approval => "waiting for an operator's approval".into(),
    }
}

/// A device's phase in a rollout, as a badge.
fn target_badge(t: &Target) -> Markup {
    if t.timed_out() {
        return badge("warn", "timed out");
    }
    if t.awaiting_window {
        return badge("muted", "awaiting window");
    }
    match t.phase {
        Some(p) => badge(
            if t.failed() {
                "bad"
            } else if p.is_final() {
                "ok"
            } else {
                "info"
            },
            &format!("{p:?}").to_lowercase(),
        ),
        None => html! { span.muted { "waiting" } },
    }
}

/// "Stage 2 of 3 (half)", or how the rollout ended.
fn progress_text(r: &RolloutView) -> String {
    let n = r.stages.len();
    match &r.state {
        RState::Completed => format!("all {n} stages done"),
        _ => format!(
            "stage {} of {n} ({})",
            (r.stage + 1).min(n),
            r.stages.get(r.stage).map_or("", |s| s.stage.name.as_str())
        ),
    }
}

pub async fn list(State(s): State<AppState>, who: Who) -> Response {
    let mut rollouts: Vec<RolloutView> = s.rollouts.list().into_iter().filter(|r| !r.archived).map(view).collect();
    rollouts.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
    let models = s.learning.models.clone();
    let mut versions =
        tokio::task::spawn_blocking(move || models.list()).await.ok().and_then(Result::ok).unwrap_or_default();
    versions.sort_by(|a, b| (&a.name, std::cmp::Reverse(a.version)).cmp(&(&b.name, std::cmp::Reverse(b.version))));
    let now = edgeloop_common::unix_millis();
    let body = html! {
        h1 { "Rollouts" }
        section #rollout-list data-live aria-labelledby="list-h" {
            h2 #list-h { "All rollouts" }
            @if rollouts.is_empty() { p.muted { "No rollout yet." } }
            @else {
                div.scroll { table #rollout-table {
                    thead { tr { th { "Rollout" } th { "Class" } th { "Model or configuration" } th { "State" } th { "Progress" } th { "Devices by phase" } th { "Started" } } }
                    tbody {
                        @for r in &rollouts {
                            tr {
                                td { a href=(format!("/rollouts/{}", r.id)) { (r.id) } }
                                td { (r.class) } td { (release_label(r)) }
                                td { (state_badge(&r.state)) } td { (progress_text(r)) }
                                td { @for (p, n) in &r.phases { span.chip { (p) " " (n) } " " } }
                                td { (ago(now, r.created_ms)) }
                            }
                        }
                    }
                } }
            }
        }
        @if who.can_operate() {
            section aria-labelledby="start-h" {
                h2 #start-h { "Start a rollout" }
                @if versions.is_empty() { p.muted { "There is no model version to roll out yet." } }
                @else {
                    form #rollout-form data-api="/api/v1/rollouts" data-build="rollout" {
                        div.fields {
                            label { "Model" select name="model" required {
                                @for m in &versions { option value=(format!("{}:{}", m.name, m.version)) { (m.name) " v" (m.version) " (" (m.class) ")" @if m.promotion.promoted { ", promoted" } } }
                            } }
                            label { "Canary devices" input type="number" name="canary_count" min="1" value="1" required; }
                            label { "Canary bake (s)" input type="number" name="canary_bake" min="0" value="30" required; }
                            label { "Second stage (%)" input type="number" name="middle_percent" min="1" max="100" step="any" value="50" required; }
                            label { "Second stage bake (s)" input type="number" name="middle_bake" min="0" value="30" required; }
                            label { "On a gate breach" select name="on_breach" { option value="rollback" { "roll back" } option value="pause" { "pause" } } }
                            label.check { input type="checkbox" name="manual_approval"; " Wait for approval between stages" }
                        }
                        button type="submit" { "Start rollout" }
                    }
                }
            }
        } @else {
            p.muted #read-only { "You are logged in as a viewer: rollouts can be watched, not started or changed." }
        }
    };
    page("Rollouts", &who, Nav::Rollouts, 3000, body).into_response()
}

fn actions(r: &RolloutView, who: &Who) -> Markup {
    if !who.can_operate() {
        return html! { p.muted #read-only { "Viewers can watch this rollout; pausing, resuming, aborting, approving, retrying and archiving need the operator role." } };
    }
    let active = r.state.is_active();
    let retryable = r.devices.values().any(|t| t.failed() || t.timed_out())
        && matches!(r.state, RState::Running | RState::AwaitingApproval | RState::Paused { .. } | RState::Completed);
    let can = |a: &str| match a {
        "pause" => matches!(r.state, RState::Scheduled | RState::Running | RState::AwaitingApproval),
        "resume" => matches!(r.state, RState::Paused { .. }),
        "approve" | "deny" => matches!(r.state, RState::AwaitingApproval),
        "retry" => retryable,
        _ => active,
    };
    html! {
        div.actions role="group" aria-label="Rollout actions" {
            @for (a, label, done) in [("pause", "Pause", "Rollout paused."), ("resume", "Resume", "Rollout resumed."), ("approve", "Approve next stage", "Next stage approved."), ("deny", "Deny next stage", "Next stage denied; the rollout is paused."), ("retry", "Retry failed devices", "The failed and timed-out devices get the model again."), ("abort", "Abort", "Rollout aborted.")] {
                button id=(format!("action-{a}")) type="button" data-action=(format!("/api/v1/rollouts/{}/{a}", r.id))
                    data-done=(done) disabled[!can(a)] class=(if a == "abort" { "danger" } else { "" }) { (label) }
            }
            @if !active && !r.archived {
                button #action-archive type="button" data-method="DELETE" data-action=(format!("/api/v1/rollouts/{}", r.id))
                    data-done="Rollout archived: it leaves the list." { "Archive" }
            }
        }
    }
}

pub async fn detail(State(s): State<AppState>, who: Who, Path(id): Path<String>) -> Response {
    let Some(r) = s.rollouts.get(&id).map(view) else {
        return page_error(Some(&who), StatusCode::NOT_FOUND, &format!("There is no rollout `{id}`."));
    };
    let now = edgeloop_common::unix_millis();
    let n = r.stages.len().max(1);
    let done = r.stages.iter().filter(|s| s.status == "done").count();
    let total: usize = r.phases.values().sum();
    let body = html! {
        h1 { "Rollout " (r.id) }
        section #rollout-state data-live aria-labelledby="state-h" {
            h2 #state-h.visually-hidden { "State" }
            p.lead { (release_label(&r)) " " (sha(&r.model.sha256)) " to class " strong { (r.class) } " · "
                (state_badge(&r.state)) " · " span #stage-text data-stage=(r.stage) { (progress_text(&r)) } }
            @if let Some(w) = &r.waiting { p #waiting data-waiting=(serde_json::to_value(w).ok().and_then(|v| v["for"].as_str().map(String::from)).unwrap_or_default()) { "Now: " (waiting_text(w)) "." } }
            @if let Some(p) = &r.previous { p.small { "A rollback returns devices to " @if r.kind == Kind::Config { "class configuration " } @if r.kind == Kind::Agent { "agent build " } (p.name) " v" (p.version) "." } }
            div.stagebar aria-hidden="true" {
                @for st in &r.stages { span class=(format!("seg {}", st.status)) style=(format!("width: {:.2}%", 100.0 / n as f64)) { (st.stage.name) } }
            }
            p.visually-hidden { (done) " of " (n) " stages done" }
            (actions(&r, &who))
        }
        section #stages data-live aria-labelledby="stages-h" {
            h2 #stages-h { "Stages and gates" }
            div.scroll { table #stage-table {
                thead { tr { th { "Stage" } th { "Share" } th.num { "Bake" } th { "Status" } th.num { "Devices" } th { "Gates (live value / threshold)" } } }
                tbody {
                    @for st in &r.stages {
                        tr data-status=(st.status) {
                            td { (st.stage.name) } td { (share(st.stage.share)) } td.num { (st.stage.bake_secs) " s" }
                            td { (badge(match st.status.as_str() { "done" => "ok", "current" => "info", _ => "muted" }, &st.status)) }
                            td.num { (st.devices) }
                            td { @for g in &st.gates { (gate_cell(g)) " " } }
                        }
                    }
                }
            } }
            h3 { "Whole rollout" }
            p { @for g in &r.gates { (gate_cell(g)) " " } }
        }
        section #phases data-live aria-labelledby="phases-h" {
            h2 #phases-h { "Devices per phase" }
            @if total == 0 { p.muted { "No device reached yet." } }
            ul.phasebars {
                @for (p, c) in &r.phases {
                    li { span.name { (p) } span.bar style=(format!("width: {:.1}%", 100.0 * *c as f64 / total.max(1) as f64)) {} span.count { (c) } }
                }
            }
            div.scroll { table #rollout-devices {
                thead { tr { th { "Device" } th.num { "Stage" } th { "Phase" } th { "Reason" } th { "Online" } th { "Assigned" } } }
                tbody {
                    @for (d, t) in r.devices.iter().take(500) {
                        tr {
                            td { a href=(format!("/devices/{d}")) { (d) } }
                            td.num { (r.stages.get(t.stage).map_or("?", |s| s.stage.name.as_str())) }
                            td { (target_badge(t)) }
                            td.small { (t.reason) }
                            td { @if t.online { "yes" } @else { "no" } }
                            td { (ago(now, t.assigned_ms)) }
                        }
                    }
                }
            } }
        }
        section #events data-live aria-labelledby="events-h" {
            h2 #events-h { "Events" }
            ol.events reversed {
                @for e in r.events.iter().rev().take(100) { li { span.muted { (datetime(e.at_ms)) } " " (e.what) } }
            }
        }
    };
    page(&format!("Rollout {id}"), &who, Nav::Rollouts, 1500, body).into_response()
}

pub async fn audit(State(s): State<AppState>, who: Who) -> Response {
    let log = s.audit.clone();
    let entries = match tokio::task::spawn_blocking(move || log.recent(200)).await {
        Ok(Ok(e)) => e,
        _ => {
            return page_error(
                Some(&who),
                StatusCode::INTERNAL_SERVER_ERROR,
                "The audit log could not be read; see the control plane's log.",
            )
        }
    };
    let body = html! {
        h1 { "Audit log" }
        p.muted { "Every call that tried to change something, who made it and how it ended (newest first, last 200)." }
        section #audit data-live {
            div.scroll { table #audit-table {
                thead { tr { th { "When (UTC)" } th { "Who" } th { "Action" } th.num { "Status" } th { "Detail" } } }
                tbody {
                    @for e in &entries {
                        tr {
                            td { (datetime(e.at_ms)) } td { (e.who) }
                            td { code { (e.action) } @if e.count > 1 { " " span.muted { "×" (e.count) } } }
                            td.num { (badge(if e.status < 400 { "ok" } else { "bad" }, &e.status.to_string())) }
                            td.small { (e.detail) }
                        }
                    }
                }
            } }
        }
    };
    page("Audit log", &who, Nav::Audit, 5000, body).into_response()
}

/// What a rollout carries, as a person reads it: `press v3`, or `class configuration press v2`.
fn release_label(r: &RolloutView) -> String {
    match r.kind {
        Kind::Model => format!("{} v{}", r.model.name, r.model.version),
        Kind::Config => format!("class configuration {} v{}", r.model.name, r.model.version),
        Kind::Agent => format!("agent build {} #{}", r.model.name, r.model.version),
    }
}
