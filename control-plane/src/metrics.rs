//! Counters a user would graph, rendered in the Prometheus text format on `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Metrics {
    pub messages_received: AtomicU64,
    pub records_ingested: AtomicU64,
    pub records_duplicate: AtomicU64,
    /// Records a device deleted past the acknowledged point that were never stored (ingest's recovery).
    pub records_lost: AtomicU64,
    pub status_messages: AtomicU64,
    pub update_reports: AtomicU64,
    pub desired_published: AtomicU64,
    pub acks_sent: AtomicU64,
    pub commits: AtomicU64,
    rejected: Mutex<BTreeMap<&'static str, u64>>,
}

impl Metrics {
    pub fn reject(&self, reason: &'static str) {
        *self.rejected.lock().unwrap_or_else(|p| p.into_inner()).entry(reason).or_default() += 1;
    }

    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected.lock().unwrap_or_else(|p| p.into_inner()).get(reason).copied().unwrap_or(0)
    }

    pub fn render(&self, devices: usize) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "edgeloop_messages_received_total",
            "Uplink MQTT messages received.",
            get(&self.messages_received),
        );
        counter(
            &mut out,
            "edgeloop_records_ingested_total",
            "Telemetry records stored (first copy).",
            get(&self.records_ingested),
        );
        counter(
            &mut out,
            "edgeloop_records_duplicate_total",
            "Telemetry records received again and not stored twice.",
            get(&self.records_duplicate),
        );
        counter(
            &mut out,
            "edgeloop_records_lost_total",
            "Records a device deleted past the acknowledged point that were never stored.",
            get(&self.records_lost),
        );
        counter(&mut out, "edgeloop_status_messages_total", "Heartbeats received.", get(&self.status_messages));
        counter(&mut out, "edgeloop_update_reports_total", "Model update reports received.", get(&self.update_reports));
        counter(
            &mut out,
            "edgeloop_desired_published_total",
            "Signed desired states published.",
            get(&self.desired_published),
        );
        counter(&mut out, "edgeloop_acks_sent_total", "End-to-end acknowledgements published.", get(&self.acks_sent));
        counter(&mut out, "edgeloop_store_commits_total", "Durable store commits (group commits).", get(&self.commits));
        let _ = writeln!(out, "# HELP edgeloop_messages_rejected_total Uplink messages refused, by reason.\n# TYPE edgeloop_messages_rejected_total counter");
        for (reason, n) in self.rejected.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "edgeloop_messages_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(out, "# HELP edgeloop_devices Devices in the registry.\n# TYPE edgeloop_devices gauge\nedgeloop_devices {devices}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_by_reason() {
        let m = Metrics::default();
        m.reject("too_large");
        m.reject("too_large");
        m.records_ingested.fetch_add(3, Ordering::Relaxed);
        let text = m.render(2);
        assert!(text.contains("edgeloop_messages_rejected_total{reason=\"too_large\"} 2"));
        assert!(text.contains("edgeloop_records_ingested_total 3"));
        assert!(text.contains("edgeloop_devices 2"));
    }
}
