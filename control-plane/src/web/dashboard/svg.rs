//! Charts drawn on the server as SVG: a time series with flagged points and a threshold, and horizontal
//! bars against a limit. Pure functions of their data, so they are tested without a browser.

use maud::{html, Markup};

const W: f64 = 640.0;
const H: f64 = 180.0;
/// Room for the axis labels.
const LEFT: f64 = 56.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 24.0;

/// A point of a time series: event time in Unix milliseconds, value, and whether it was flagged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub ts_ms: u64,
    pub value: f64,
    pub flagged: bool,
}

/// Short number for an axis label.
pub fn short(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

pub use super::layout::clock;

/// A line chart of `points` (non-finite values are left out). Flagged points are drawn as red dots and
/// `threshold`, if any, as a dashed line. `data-points` on the `<svg>` says how many points were drawn.
pub fn line_chart(title: &str, points: &[Point], threshold: Option<f64>) -> Markup {
    let pts: Vec<&Point> = points.iter().filter(|p| p.value.is_finite()).collect();
    let (mut lo, mut hi) =
        pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| (l.min(p.value), h.max(p.value)));
    if let Some(t) = threshold.filter(|t| t.is_finite()) {
        (lo, hi) = (lo.min(t), hi.max(t));
    }
    if !lo.is_finite() {
        (lo, hi) = (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        (lo, hi) = (lo - 0.5, hi + 0.5);
    }
    let (t0, t1) = match (pts.first(), pts.last()) {
        (Some(a), Some(b)) => (a.ts_ms, b.ts_ms.max(a.ts_ms + 1)),
        _ => (0, 1),
    };
    let x = |t: u64| LEFT + (t.saturating_sub(t0)) as f64 / (t1 - t0) as f64 * (W - LEFT - RIGHT);
    let y = |v: f64| TOP + (hi - v) / (hi - lo) * (H - TOP - BOTTOM);
    let line: String = pts.iter().map(|p| format!("{:.1},{:.1}", x(p.ts_ms), y(p.value))).collect::<Vec<_>>().join(" ");
    let flagged: Vec<&&Point> = pts.iter().filter(|p| p.flagged).collect();
    html! {
        figure.chart {
            figcaption { (title) " " span.muted { (pts.len()) " points" @if !flagged.is_empty() { ", " (flagged.len()) " flagged" } } }
            svg viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(title) data-points=(pts.len())
                data-flagged=(flagged.len()) preserveAspectRatio="none" {
                line.axis x1=(LEFT) y1=(H - BOTTOM) x2=(W - RIGHT) y2=(H - BOTTOM) {}
                line.axis x1=(LEFT) y1=(TOP) x2=(LEFT) y2=(H - BOTTOM) {}
                text.label x=(LEFT - 4.0) y=(TOP + 8.0) text-anchor="end" { (short(hi)) }
                text.label x=(LEFT - 4.0) y=(H - BOTTOM) text-anchor="end" { (short(lo)) }
                @if !pts.is_empty() {
                    text.label x=(LEFT) y=(H - 6.0) { (clock(t0)) }
                    text.label x=(W - RIGHT) y=(H - 6.0) text-anchor="end" { (clock(t1)) }
                }
                @if let Some(t) = threshold.filter(|t| t.is_finite()) {
                    line.threshold x1=(LEFT) y1=(format!("{:.1}", y(t))) x2=(W - RIGHT) y2=(format!("{:.1}", y(t))) {
                        title { "threshold " (short(t)) }
                    }
                }
                @if pts.len() == 1 {
                    circle.point cx=(format!("{:.1}", x(pts[0].ts_ms))) cy=(format!("{:.1}", y(pts[0].value))) r="2" {}
                } @else if !pts.is_empty() {
                    polyline.series points=(line) {}
                }
                @for p in &flagged {
                    circle.flag cx=(format!("{:.1}", x(p.ts_ms))) cy=(format!("{:.1}", y(p.value))) r="3.5" {
                        title { "flagged at " (clock(p.ts_ms)) ": " (short(p.value)) }
                    }
                }
            }
        }
    }
}

/// Horizontal bars, one per `(name, value)`, with the limit drawn across; bars over it are marked.
pub fn bars(title: &str, rows: &[(String, f64)], limit: f64) -> Markup {
    let row_h = 18.0;
    let label_w = 150.0;
    let h = row_h * rows.len() as f64 + 8.0;
    let top = rows.iter().map(|r| r.1).filter(|v| v.is_finite()).fold(limit, f64::max).max(1e-9) * 1.1;
    let x = |v: f64| label_w + (v.max(0.0) / top) * (W - label_w - 60.0);
    html! {
        figure.chart {
            figcaption { (title) }
            svg viewBox=(format!("0 0 {W} {h}")) role="img" aria-label=(title) data-bars=(rows.len()) {
                @for (i, (name, v)) in rows.iter().enumerate() {
                    @let cy = 4.0 + i as f64 * row_h;
                    text.label x=(label_w - 6.0) y=(cy + 12.0) text-anchor="end" { (name) }
                    @if v.is_finite() {
                        rect class=(if *v > limit { "bar over" } else { "bar" }) x=(label_w) y=(cy + 2.0)
                            width=(format!("{:.1}", x(*v) - label_w)) height=(row_h - 5.0) {}
                        text.label x=(format!("{:.1}", x(*v) + 4.0)) y=(cy + 12.0) { (short(*v)) }
                    } @else {
                        text.label x=(label_w + 4.0) y=(cy + 12.0) { "not measured" }
                    }
                }
                line.threshold x1=(format!("{:.1}", x(limit))) y1="0" x2=(format!("{:.1}", x(limit))) y2=(h) {
                    title { "limit " (short(limit)) }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ts_ms: u64, value: f64, flagged: bool) -> Point {
        Point { ts_ms, value, flagged }
    }

    #[test]
    fn line_chart_draws_every_finite_point_and_marks_flags() {
        let pts = [p(1000, 1.0, false), p(2000, f64::NAN, false), p(3000, 3.0, true), p(4000, 2.0, false)];
        let svg = line_chart("score", &pts, Some(2.5)).into_string();
        assert!(svg.contains(r#"data-points="3""#), "{svg}");
        assert!(svg.contains(r#"data-flagged="1""#));
        assert_eq!(svg.matches("<circle class=\"flag\"").count(), 1);
        // The polyline has one coordinate pair per finite point, first at the left edge, last at the right.
        let line = svg.split(" points=\"").nth(1).unwrap().split('"').next().unwrap();
        let xy: Vec<&str> = line.split(' ').collect();
        assert_eq!(xy.len(), 3);
        assert!(xy[0].starts_with("56.0,"), "{line}");
        assert!(xy[2].starts_with("632.0,"), "{line}");
        // The highest value (3.0) is at the top, the lowest (1.0) at the bottom.
        assert!(xy[1].ends_with(",10.0"), "{line}");
        assert!(xy[0].ends_with(",156.0"), "{line}");
        assert!(svg.contains("class=\"threshold\""));
    }

    #[test]
    fn empty_and_flat_series_still_draw() {
        let svg = line_chart("empty", &[], None).into_string();
        assert!(svg.contains(r#"data-points="0""#) && !svg.contains("polyline"));
        let flat = line_chart("flat", &[p(1, 5.0, false), p(2, 5.0, false)], None).into_string();
        assert!(flat.contains("polyline") && !flat.contains("NaN") && !flat.contains("inf"), "{flat}");
    }

    #[test]
    fn titles_are_escaped() {
        let svg = line_chart("<script>x</script>", &[], None).into_string();
        assert!(!svg.contains("<script>") && svg.contains("&lt;script&gt;"));
    }

    #[test]
    fn bars_over_the_limit_are_marked() {
        let rows = vec![("mean".to_string(), 0.05), ("std".to_string(), 0.4), ("max".to_string(), f64::NAN)];
        let svg = bars("drift", &rows, 0.25).into_string();
        assert_eq!(svg.matches(r#"class="bar over""#).count(), 1);
        assert_eq!(svg.matches(r#"class="bar""#).count(), 1);
        assert!(svg.contains("not measured"));
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(short(0.5), "0.5");
        assert_eq!(short(1234.0), "1234");
        assert_eq!(short(0.0), "0");
        assert_eq!(short(1.5e-6), "1.50e-6");
        assert_eq!(clock(3_723_000), "01:02:03");
    }
}
