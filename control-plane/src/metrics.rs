//! Counters a user would graph, served on `/metrics` in the OpenMetrics text format (which Prometheus
//! scrapes), encoded by `prometheus-client`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Debug)]
pub struct Metrics {
    pub messages_received: Counter,
    pub records_ingested: Counter,
    pub records_duplicate: Counter,
    /// Records a device deleted past the acknowledged point that were never stored (ingest's recovery).
    pub records_lost: Counter,
    pub status_messages: Counter,
    pub update_reports: Counter,
    pub desired_published: Counter,
    pub acks_sent: Counter,
    pub commits: Counter,
    rejected: Family<Reason, Counter>,
    devices: Gauge,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            messages_received: Counter::default(),
            records_ingested: Counter::default(),
            records_duplicate: Counter::default(),
            records_lost: Counter::default(),
            status_messages: Counter::default(),
            update_reports: Counter::default(),
            desired_published: Counter::default(),
            acks_sent: Counter::default(),
            commits: Counter::default(),
            rejected: Family::default(),
            devices: Gauge::default(),
            registry: Registry::default(),
        };
        // Counters are shared handles: the registry encodes the same atomics the fields count with.
        let mut registry = Registry::default();
        let counters: [(&str, &str, &Counter); 9] = [
            ("edgeloop_messages_received", "Uplink MQTT messages received", &m.messages_received),
            ("edgeloop_records_ingested", "Telemetry records stored (first copy)", &m.records_ingested),
            (
                "edgeloop_records_duplicate",
                "Telemetry records received again and not stored twice",
                &m.records_duplicate,
            ),
            (
                "edgeloop_records_lost",
                "Records a device deleted past the acknowledged point that were never stored",
                &m.records_lost,
            ),
            ("edgeloop_status_messages", "Heartbeats received", &m.status_messages),
            ("edgeloop_update_reports", "Model update reports received", &m.update_reports),
            ("edgeloop_desired_published", "Signed desired states published", &m.desired_published),
            ("edgeloop_acks_sent", "End-to-end acknowledgements published", &m.acks_sent),
            ("edgeloop_store_commits", "Durable store commits (group commits)", &m.commits),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        registry.register("edgeloop_messages_rejected", "Uplink messages refused, by reason", m.rejected.clone());
        registry.register("edgeloop_devices", "Devices in the registry", m.devices.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&Reason { reason: reason.to_string() }).inc();
    }

    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected.get(&Reason { reason: reason.to_string() }).map_or(0, |c| c.get())
    }

    /// Every series, with `devices` as the registry's size now.
    pub fn render(&self, devices: usize) -> String {
        self.devices.set(i64::try_from(devices).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
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
        m.records_ingested.inc_by(3);
        assert_eq!(m.rejected("too_large"), 2);
        assert_eq!(m.rejected("never_seen"), 0);
        let text = m.render(2);
        assert!(text.contains("edgeloop_messages_rejected_total{reason=\"too_large\"} 2"), "{text}");
        assert!(text.contains("edgeloop_records_ingested_total 3"), "{text}");
        assert!(text.contains("# TYPE edgeloop_records_ingested counter"), "{text}");
        assert!(text.contains("edgeloop_devices 2"), "{text}");
        assert!(!text.contains("never_seen"), "asking for a count creates no series: {text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
