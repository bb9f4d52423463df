//! The page frame every dashboard page shares, who is looking, and how times and numbers are written.

use crate::access::operators::{Operator, Role};
use crate::web::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use time::macros::format_description;

/// The operator looking at a page. With `api.require_tokens = false` everyone is an admin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub name: String,
    pub role: Role,
    pub open: bool,
}

impl Who {
    /// Whether this operator may change rollouts and start trainings.
    pub fn can_operate(&self) -> bool {
        self.role >= Role::Operator
    }

    /// Anyone, where the API asks for no tokens.
    pub fn anyone() -> Who {
        Who { name: "anyone".into(), role: Role::Admin, open: true }
    }
}

impl From<&Operator> for Who {
    fn from(op: &Operator) -> Who {
        Who { name: op.name.clone(), role: op.role, open: false }
    }
}

impl FromRequestParts<AppState> for Who {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Who, Self::Rejection> {
        // The middleware has already refused anyone without a valid token where tokens are required.
        Ok(match parts.extensions.get::<Operator>() {
            Some(op) => Who::from(op),
            None => Who::anyone(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Fleet,
    Models,
    Rollouts,
    Audit,
}

/// A full page: navigation, who is logged in, a message area for errors, and `body`. Elements of `body`
/// with `data-live` and an `id` are refreshed in place every `refresh_ms` by the page's script.
pub fn page(title: &str, who: &Who, nav: Nav, refresh_ms: u32, body: Markup) -> Html<String> {
    let item = |n: Nav, href: &str, label: &str| {
        html! { li { a href=(href) aria-current=[(n == nav).then_some("page")] { (label) } } }
    };
    Html(
        frame(
            title,
            html! {
                header.top {
                    a.brand href="/" { "edgeloop" }
                    nav aria-label="Main" {
                        ul {
                            (item(Nav::Fleet, "/", "Fleet"))
                            (item(Nav::Models, "/models", "Models"))
                            (item(Nav::Rollouts, "/rollouts", "Rollouts"))
                            (item(Nav::Audit, "/audit", "Audit"))
                        }
                    }
                    div.who {
                        span #whoami data-role=(who.role) {
                            @if who.open { "open access (api.require_tokens = false)" }
                            @else { (who.name) " · " span.role { (who.role) } }
                        }
                        @if !who.open {
                            form method="post" action="/logout" { button.link type="submit" { "Log out" } }
                        }
                    }
                }
                div #flash role="alert" aria-live="assertive" {}
                main #main data-refresh-ms=(refresh_ms) {
                    (body)
                    p.muted.updated { "Updated " span #updated { (clock(edgeloop_common::unix_millis())) } " UTC"
                        @if refresh_ms > 0 { ", live" } }
                }
            },
        )
        .into_string(),
    )
}

/// A page without navigation (the login page).
pub fn bare(title: &str, body: Markup) -> Html<String> {
    Html(frame(title, html! { main #main.narrow { (body) } }).into_string())
}

fn frame(title: &str, content: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · edgeloop" }
                link rel="stylesheet" href="/assets/app.css";
                script src="/assets/app.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                (content)
            }
        }
    }
}

/// An error page in plain words.
pub fn page_error(who: Option<&Who>, status: StatusCode, message: &str) -> Response {
    let body = html! {
        h1 { (status.canonical_reason().unwrap_or("Error")) }
        p.error #page-error { (message) }
        p { a href="/" { "Back to the fleet" } }
    };
    let html = match who {
        Some(w) => page(status.canonical_reason().unwrap_or("Error"), w, Nav::Fleet, 0, body),
        None => bare("Error", body),
    };
    (status, html).into_response()
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) of a Unix millisecond time.
pub fn datetime(ms: u64) -> String {
    utc(ms, format_description!("[year]-[month]-[day] [hour]:[minute]:[second]"))
}

/// `HH:MM:SS` (UTC) of a Unix millisecond time.
pub fn clock(ms: u64) -> String {
    utc(ms, format_description!("[hour]:[minute]:[second]"))
}

fn utc(ms: u64, format: &[time::format_description::BorrowedFormatItem<'_>]) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(format).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// How long ago `then_ms` was, in words: `12 s ago`, `5 min ago`, `3 h ago`, `2 d ago`.
pub fn ago(now_ms: u64, then_ms: u64) -> String {
    if then_ms == 0 {
        return "never".into();
    }
    let s = now_ms.saturating_sub(then_ms) / 1000;
    match s {
        0..=89 => format!("{s} s ago"),
        90..=5399 => format!("{} min ago", s / 60),
        5400..=172_799 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86_400),
    }
}

/// A byte count in words.
pub fn bytes(n: u64) -> String {
    match n {
        0..10_240 => format!("{n} B"),
        10_240..1_048_576 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

/// The first 12 hex digits of a hash, with the whole as a tooltip.
pub fn sha(s: &str) -> Markup {
    html! { code title=(s) { (s.get(..12).unwrap_or(s)) } }
}

/// A coloured status word.
pub fn badge(kind: &str, text: &str) -> Markup {
    html! { span class=(format!("badge {kind}")) { (text) } }
}

/// Inline SVG needs no escaping beyond what maud did when it was built.
pub fn raw(m: Markup) -> PreEscaped<String> {
    PreEscaped(m.into_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_gregorian_utc() {
        assert_eq!(datetime(0), "1970-01-01 00:00:00");
        assert_eq!(datetime(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(datetime(1_795_737_600_000 + 3_723_000), "2026-11-27 01:02:03");
    }

    #[test]
    fn ages_and_sizes_read_well() {
        assert_eq!(ago(100_000, 88_000), "12 s ago");
        assert_eq!(ago(1_000_000, 700_000), "5 min ago");
        assert_eq!(ago(5, 0), "never");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(20_480), "20.0 KiB");
        assert_eq!(bytes(3 * 1_048_576), "3.0 MiB");
    }
}
