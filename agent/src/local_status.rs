//! The agent's state for a technician standing at the device, without the control plane:
//! `edgeloop-agent --config agent.toml status`.
//!
//! The running agent writes `<data_dir>/status.json` every [`EVERY`] and when it stops (a temporary file,
//! renamed, so a reader never sees half of one; not synced, which would only wear flash); `status` reads it and the updater's pointer
//! file, both read-only, and never touches the outbox, whose store the running agent holds locked.

use crate::health::Health;
use crate::outbox::Outbox;
use crate::updater::Pointer;
use crate::uplink::UplinkCounters;
use edgeloop_common::update::UpdateReport;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often the running agent writes its status.
pub const EVERY: Duration = Duration::from_secs(5);

/// The outbox, as the status file shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct OutboxView {
    pub depth: u64,
    pub bytes: u64,
    pub last_seq: u64,
    pub acked: u64,
    pub dropped_total: u64,
    /// Event time of the oldest record still waiting for its acknowledgement, Unix ms.
    pub oldest_ts_ms: Option<u64>,
}

/// What `status.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalStatus {
    pub written_ms: u64,
    pub pid: u32,
    pub version: String,
    pub device: String,
    pub class: String,
    /// The broker connection, now.
    pub connected: bool,
    /// When the last acknowledgement came, Unix ms (none since the agent started: `None`).
    pub last_ack_ms: Option<u64>,
    /// The model running (`name vN`), if any.
    pub model: Option<String>,
    /// The latest update report.
    pub update: Option<UpdateReport>,
    pub outbox: OutboxView,
    pub samples: u64,
    pub bad_samples: u64,
    pub rss_bytes: Option<u64>,
    /// The agent's own warnings and errors: the newest, and how many went up or were left out.
    #[serde(default)]
    pub logs: crate::logs::LogsView,
    /// The open alert, if any, and the alert snapshots waiting for the control plane's acknowledgement.
    #[serde(default)]
    pub alerts: AlertsView,
}

/// The device's alerts, as the status file shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct AlertsView {
    pub open: Option<edgeloop_common::alerts::AlertEvent>,
    pub waiting: u64,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("status.json")
}

/// The agent's state now. Blocking (it reads the oldest outbox record).
pub fn snapshot(
    (device, class): (&str, &str),
    health: &Health,
    outbox: &Outbox,
    link: &UplinkCounters,
    logs: &crate::logs::SharedRing,
    alerts: &crate::alerts::AlertBook,
) -> LocalStatus {
    let st = outbox.stats();
    let oldest = outbox.read_batch(st.acked + 1, 1).ok().and_then(|r| r.first().map(|r| r.ts_ms));
    let last_ack = link.last_ack_ms.load(Ordering::Relaxed);
    LocalStatus {
        written_ms: edgeloop_common::unix_millis(),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        device: device.to_string(),
        class: class.to_string(),
        connected: link.connected.load(Ordering::Relaxed),
        last_ack_ms: (last_ack > 0).then_some(last_ack),
        model: health.model_version(),
        update: health.update(),
        outbox: OutboxView {
            depth: st.depth,
            bytes: st.bytes,
            last_seq: st.last_seq,
            acked: st.acked,
            dropped_total: st.dropped_total,
            oldest_ts_ms: oldest,
        },
        samples: health.samples.load(Ordering::Relaxed),
        bad_samples: health.bad_samples.load(Ordering::Relaxed),
        rss_bytes: crate::health::rss_bytes(),
        logs: logs.lock().unwrap_or_else(|p| p.into_inner()).view(),
        alerts: AlertsView {
            open: alerts.open_alert(),
            waiting: alerts.pending(usize::MAX).map_or(0, |p| p.len() as u64),
        },
    }
}

/// Replaces the status file atomically, without syncing it (written every 5 s: a sync would wear flash, and
/// a status lost in a power cut is rewritten at the next start). Blocking.
pub fn write(data_dir: &Path, s: &LocalStatus) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?;
    edgeloop_common::private::replace(&path(data_dir), &json)
}

/// Reads the status file, naming it in the error.
pub fn read(data_dir: &Path) -> anyhow::Result<LocalStatus> {
    use anyhow::Context;
    let p = path(data_dir);
    let bytes = std::fs::read(&p).with_context(|| {
        format!("reading {} (has the agent run with this data_dir? it writes the file every 5 s)", p.display())
    })?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not an agent status file", p.display()))
}

fn ago(now_ms: u64, at_ms: u64) -> String {
    let s = now_ms.saturating_sub(at_ms) / 1000;
    match s {
        0..=119 => format!("{s} s ago"),
        120..=7199 => format!("{} min ago", s / 60),
        _ => format!("{} h ago", s / 3600),
    }
}

/// The status as a technician reads it. Pure: `now_ms` is passed in. A file older than three writing
/// intervals means the agent is not running (or is stuck), and the text says so first.
pub fn render(s: &LocalStatus, pointer: &Pointer, now_ms: u64) -> String {
    let mut out = Vec::new();
    let stale = now_ms.saturating_sub(s.written_ms) > 3 * EVERY.as_millis() as u64;
    if stale {
        out.push(format!(
            "NOT RUNNING: the last status is from {} (pid {}); what follows is as it was then",
            ago(now_ms, s.written_ms),
            s.pid
        ));
    } else {
        out.push(format!("running: pid {}, edgeloop-agent {}", s.pid, s.version));
    }
    out.push(format!("device:     {} (class {})", s.device, s.class));
    let active = pointer
        .active
        .as_ref()
        .map(|a| format!("{} v{} (sha256 {})", a.name, a.version, &a.sha256[..12.min(a.sha256.len())]));
    out.push(format!(
        "model:      {}",
        active.or_else(|| s.model.clone()).unwrap_or_else(|| "none (collecting only)".into())
    ));
    let update = match (&pointer.pending, &s.update) {
        (Some(p), _) => format!("in progress: sequence {}, {:?}", p.desired.seq, p.phase).to_lowercase(),
        (None, Some(u)) => format!("{:?} (sequence {}): {}", u.phase, u.seq, u.reason).to_lowercase(),
        (None, None) => "none since the agent started".into(),
    };
    out.push(format!("update:     {update}; highest sequence accepted {}", pointer.last_seq));
    out.push(format!(
        "broker:     {}; last acknowledgement {}",
        if s.connected { "connected" } else { "NOT connected" },
        s.last_ack_ms.map_or("none since the agent started".to_string(), |t| ago(now_ms, t))
    ));
    let o = &s.outbox;
    out.push(format!(
        "outbox:     {} records waiting ({} bytes), oldest {}; last sequence {}, acknowledged up to {}, dropped {}",
        o.depth,
        o.bytes,
        o.oldest_ts_ms.map_or("-".to_string(), |t| ago(now_ms, t)),
        o.last_seq,
        o.acked,
        o.dropped_total
    ));
    out.push(format!("samples:    {} taken, {} refused", s.samples, s.bad_samples));
    let l = &s.logs;
    out.push(format!(
        "log:        {} warnings and errors sent to the control plane, {} waiting, {} left out by the budget",
        l.shipped_total, l.waiting, l.suppressed_total
    ));
    let a = &s.alerts;
    out.push(format!(
        "alerts:     {}; {} snapshot(s) waiting to be sent",
        a.open.as_ref().map_or("none open".to_string(), |o| format!(
            "alert {} OPEN on {} since {} (peak score {:.3}, {} flagged windows)",
            o.id,
            o.sensor,
            ago(now_ms, o.onset_ms),
            o.peak_score,
            o.windows
        )),
        a.waiting
    ));
    for e in &l.recent {
        out.push(format!(
            "            {} {} {}: {}",
            ago(now_ms, e.ts_ms),
            e.level.as_str().to_uppercase(),
            e.target,
            e.message
        ));
    }
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::updater::slot::ModelInfo;

    fn sample(written_ms: u64) -> LocalStatus {
        LocalStatus {
            written_ms,
            pid: 42,
            version: "0.1.0".into(),
            device: "press-01".into(),
            class: "press".into(),
            connected: false,
            last_ack_ms: Some(written_ms - 90_000),
            model: Some("press v3".into()),
            update: None,
            outbox: OutboxView {
                depth: 12,
                bytes: 3000,
                last_seq: 112,
                acked: 100,
                dropped_total: 0,
                oldest_ts_ms: Some(written_ms - 600_000),
            },
            samples: 1000,
            bad_samples: 2,
            rss_bytes: None,
            logs: crate::logs::LogsView {
                waiting: 1,
                shipped_total: 7,
                suppressed_total: 3,
                recent: vec![edgeloop_common::envelope::LogEntry {
                    ts_ms: written_ms - 30_000,
                    level: edgeloop_common::envelope::LogLevel::Warn,
                    target: "edgeloop_agent::source".into(),
                    message: "bad sample refused rejected_total=2".into(),
                }],
            },
            alerts: AlertsView {
                open: Some(edgeloop_common::alerts::AlertEvent {
                    id: 4,
                    rev: 9,
                    sensor: "vibration".into(),
                    model: Some("press v3".into()),
                    onset_ms: written_ms - 120_000,
                    last_ms: written_ms - 5_000,
                    peak_score: 2.5,
                    peak_ms: written_ms - 60_000,
                    windows: 31,
                    end_ms: None,
                    floor: 0,
                }),
                waiting: 1,
            },
        }
    }

    #[test]
    fn a_technician_reads_model_update_link_and_outbox_and_a_stale_file_says_not_running() {
        let now = 1_700_000_000_000;
        let pointer = Pointer {
            last_seq: 7,
            active: Some(ModelInfo {
                name: "press".into(),
                version: 3,
                sha256: "ab".repeat(32),
                threshold: Some(1.0),
                frames: 1,
                gaps: Default::default(),
                score_tail: None,
                nnef_sha256: None,
            }),
            ..Pointer::default()
        };
        let text = render(&sample(now - 1_000), &pointer, now);
        assert!(text.starts_with("running: pid 42"), "{text}");
        for want in [
            "model:      press v3 (sha256 abababababab)",
            "highest sequence accepted 7",
            "broker:     NOT connected; last acknowledgement 91 s ago",
            "outbox:     12 records waiting (3000 bytes), oldest 10 min ago; last sequence 112, acknowledged up to 100",
            "log:        7 warnings and errors sent to the control plane, 1 waiting, 3 left out by the budget",
            "31 s ago WARN edgeloop_agent::source: bad sample refused rejected_total=2",
            "alerts:     alert 4 OPEN on vibration since 2 min ago (peak score 2.500, 31 flagged windows); 1 snapshot(s) waiting",
        ] {
            assert!(text.contains(want), "no `{want}` in:\n{text}");
        }
        let text = render(&sample(now - 60_000), &Pointer::default(), now);
        assert!(text.starts_with("NOT RUNNING: the last status is from 60 s ago (pid 42)"), "{text}");
        assert!(text.contains("model:      press v3"), "{text}");
    }

    #[test]
    fn the_file_round_trips_and_a_missing_one_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("status.json") && e.contains("has the agent run"), "{e}");
        write(dir.path(), &sample(5_000_000)).unwrap();
        assert_eq!(read(dir.path()).unwrap(), sample(5_000_000));
        std::fs::write(path(dir.path()), b"{").unwrap();
        assert!(read(dir.path()).unwrap_err().to_string().contains("not an agent status file"));
    }
}
