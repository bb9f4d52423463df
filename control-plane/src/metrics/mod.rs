//! What an operator graphs and alerts on, served on `/metrics` and encoded by `prometheus-client`: counters
//! the services increment as things happen, and gauges set at each scrape from the stores ([`Scrape`]): the
//! fleet by class and state, heartbeat ages, rollouts by state, training jobs by state, drift, the store's
//! size, the build and the process, and ([`detail`]) live rollouts' gates, waits and phases, training
//! durations, outbox drops and certificate expiry.
//!
//! The default answer is the Prometheus text format (0.0.4), which `promtool check metrics` and every
//! Prometheus read; a scraper that asks for OpenMetrics gets it ([`Metrics::render_for`]).

mod detail;
mod process;

pub use detail::{not_after, JobScrape, RolloutScrape};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Ingest latency buckets, seconds: a fleet on a LAN commits in milliseconds, one behind a cellular link or
/// resending after an outage in seconds to minutes.
const LATENCY_BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// After this long without a message a device is `stale`, not merely `offline`.
pub const STALE_AFTER_MS: u64 = 24 * 3600 * 1000;

/// A device's state after `silent_ms` without a message: `online` (within `offline_after_ms`), `offline`, or
/// `stale` (a day or more).
pub fn device_state(silent_ms: u64, offline_after_ms: u64) -> &'static str {
    if silent_ms < offline_after_ms {
        "online"
    } else if silent_ms < STALE_AFTER_MS {
        "offline"
    } else {
        "stale"
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassState {
    class: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Feature {
    class: String,
    feature: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Build {
    version: String,
}

/// What `/metrics` reads from the stores and services at scrape time.
#[derive(Debug, Default)]
pub struct Scrape {
    pub now_ms: u64,
    pub offline_after_ms: u64,
    /// Per device: class, last message (Unix ms), anomalies it flagged.
    pub devices: Vec<(String, u64, u64)>,
    /// Each rollout's state, in words (`running`, `completed`, ...).
    pub rollouts: Vec<&'static str>,
    /// Each training job's state, in words.
    pub jobs: Vec<&'static str>,
    /// Per class, the latest PSI of each feature against its production model's training set.
    pub drift: Vec<(String, Vec<f64>)>,
    /// Alerts open now, by class.
    pub alerts_open: Vec<(String, u64)>,
    /// The store's size on disk.
    pub store_bytes: Option<u64>,
    /// Every live rollout (scheduled, running, awaiting approval, paused).
    pub live_rollouts: Vec<RolloutScrape>,
    /// Every training job.
    pub training: Vec<JobScrape>,
    /// Per device: its class and the records its outbox dropped since its first start (its last heartbeat).
    pub outbox_dropped: Vec<(String, u64)>,
    /// The certificates served, by name, with when they expire (Unix seconds).
    pub certificates: Vec<(String, u64)>,
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
    /// Alert snapshots devices sent (an alert's opening, closing or reopening).
    pub alert_snapshots: Counter,
    pub commits: Counter,
    /// Records pruned by telemetry retention.
    pub records_pruned: Counter,
    /// Artifact files removed because no model version names them.
    pub artifacts_collected: Counter,
    /// Closed alerts removed by `[retention] alert_days`.
    pub alerts_pruned: Counter,
    /// Seconds from a telemetry batch's sending (device clock) to its durable commit.
    pub ingest_latency: Histogram,
    /// 1 while this control plane leads the work that runs once across replicas.
    pub leader: Gauge,
    /// Ingest replicas alive on the database (1 on the embedded store).
    pub replicas: Gauge,
    /// Replicas that train alive on the database (1 on the embedded store).
    pub trainers: Gauge,
    rejected: Family<Reason, Counter>,
    log_lines: Family<OutcomeLabel, Counter>,
    api_refusals: Family<Reason, Counter>,
    devices: Gauge,
    fleet: Family<ClassState, Gauge>,
    heartbeat_age: Family<ClassLabel, Gauge>,
    anomalies: Family<ClassLabel, Gauge>,
    alerts_open: Family<ClassLabel, Gauge>,
    rollouts: Family<StateLabel, Gauge>,
    jobs: Family<StateLabel, Gauge>,
    drift: Family<Feature, Gauge<f64, std::sync::atomic::AtomicU64>>,
    store_bytes: Gauge,
    build: Family<Build, Gauge>,
    process: process::Process,
    detail: detail::Detail,
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
            alert_snapshots: Counter::default(),
            commits: Counter::default(),
            records_pruned: Counter::default(),
            artifacts_collected: Counter::default(),
            alerts_pruned: Counter::default(),
            ingest_latency: Histogram::new(LATENCY_BUCKETS),
            leader: Gauge::default(),
            replicas: Gauge::default(),
            trainers: Gauge::default(),
            rejected: Family::default(),
            log_lines: Family::default(),
            api_refusals: Family::default(),
            devices: Gauge::default(),
            fleet: Family::default(),
            heartbeat_age: Family::default(),
            anomalies: Family::default(),
            alerts_open: Family::default(),
            rollouts: Family::default(),
            jobs: Family::default(),
            drift: Family::default(),
            store_bytes: Gauge::default(),
            build: Family::default(),
            process: Default::default(),
            detail: Default::default(),
            registry: Registry::default(),
        };
        // Counters are shared handles: the registry encodes the same atomics the fields count with.
        let mut registry = Registry::default();
        let counters: [(&str, &str, &Counter); 13] = [
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
            (
                "edgeloop_alert_snapshots",
                "Alert snapshots devices sent: an alert opening, closing or reopening",
                &m.alert_snapshots,
            ),
            ("edgeloop_store_commits", "Durable store commits (group commits)", &m.commits),
            ("edgeloop_records_pruned", "Telemetry records pruned by retention", &m.records_pruned),
            ("edgeloop_alerts_pruned", "Closed alerts removed by retention", &m.alerts_pruned),
            (
                "edgeloop_artifacts_collected",
                "Artifact files removed because no model version names them",
                &m.artifacts_collected,
            ),
        ];
        for (name, help, c) in counters {
            registry.register(name, help, c.clone());
        }
        registry.register_with_unit(
            "edgeloop_ingest_latency",
            "From a telemetry batch's sending (device clock) to its durable commit",
            prometheus_client::registry::Unit::Seconds,
            m.ingest_latency.clone(),
        );
        registry.register("edgeloop_messages_rejected", "Uplink messages refused, by reason", m.rejected.clone());
        registry.register(
            "edgeloop_device_log_lines",
            "Device log lines: stored; cut by ingest (over the control plane's budget); suppressed (left out by the device itself)",
            m.log_lines.clone(),
        );
        registry.register(
            "edgeloop_api_refusals",
            "Operator API calls refused, by reason (unauthorized, forbidden)",
            m.api_refusals.clone(),
        );
        registry.register("edgeloop_devices", "Devices in the registry", m.devices.clone());
        registry.register(
            "edgeloop_leader",
            "1 while this control plane leads the work that runs once across replicas (rollout steps, \
             triggers); always 1 on the embedded store",
            m.leader.clone(),
        );
        m.replicas.set(1);
        registry.register(
            "edgeloop_replicas",
            "Ingest replicas alive on the database, among which each device's rate limit is shared (1 on the \
             embedded store)",
            m.replicas.clone(),
        );
        m.trainers.set(1);
        registry.register(
            "edgeloop_trainers",
            "Replicas that claim training jobs alive on the database (roles with \"train\"), as this ingest \
             replica counts them; 1 on the embedded store, which trains in-process",
            m.trainers.clone(),
        );
        registry.register(
            "edgeloop_fleet_devices",
            "Devices by class and state: online (a message within api.offline_after_secs), offline, stale (none for a day)",
            m.fleet.clone(),
        );
        registry.register(
            "edgeloop_class_oldest_message_age_seconds",
            "Seconds since the class's least recently heard device sent anything",
            m.heartbeat_age.clone(),
        );
        registry.register(
            "edgeloop_class_anomalies_flagged",
            "Anomalies the class's devices flagged, since they enrolled (only grows)",
            m.anomalies.clone(),
        );
        registry.register(
            "edgeloop_alerts_open",
            "Alerts the class's devices raised that are open now (one per fault)",
            m.alerts_open.clone(),
        );
        registry.register("edgeloop_rollouts", "Rollouts by state", m.rollouts.clone());
        registry.register("edgeloop_training_jobs", "Training jobs by state", m.jobs.clone());
        registry.register(
            "edgeloop_drift_psi",
            "Population stability index of each feature against the production model's training set",
            m.drift.clone(),
        );
        registry.register_with_unit(
            "edgeloop_store_size",
            "Size of the store on disk",
            prometheus_client::registry::Unit::Bytes,
            m.store_bytes.clone(),
        );
        m.build.get_or_create(&Build { version: env!("CARGO_PKG_VERSION").to_string() }).set(1);
        registry.register("edgeloop_build_info", "The running build (always 1)", m.build.clone());
        m.process.register(&mut registry);
        m.detail.register(&mut registry);
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&Reason { reason: reason.to_string() }).inc();
    }

    /// Device log lines by outcome: `stored`, `cut` (ingest's budget), `suppressed` (the device's own).
    pub fn log_lines(&self, outcome: &'static str, n: u64) {
        if n > 0 {
            self.log_lines.get_or_create(&OutcomeLabel { outcome }).inc_by(n);
        }
    }

    pub fn log_lines_counted(&self, outcome: &'static str) -> u64 {
        self.log_lines.get(&OutcomeLabel { outcome }).map_or(0, |c| c.get())
    }

    /// An operator API call refused (401 `unauthorized`, 403 `forbidden`).
    pub fn api_refused(&self, reason: &'static str) {
        self.api_refusals.get_or_create(&Reason { reason: reason.to_string() }).inc();
    }

    pub fn api_refusals(&self, reason: &str) -> u64 {
        self.api_refusals.get(&Reason { reason: reason.to_string() }).map_or(0, |c| c.get())
    }

    pub fn rejected(&self, reason: &str) -> u64 {
        self.rejected.get(&Reason { reason: reason.to_string() }).map_or(0, |c| c.get())
    }

    /// Every series after setting the gauges from `scrape`, in OpenMetrics when `openmetrics`, else in the
    /// Prometheus text format. Returns the body and its content type.
    pub fn render_for(&self, scrape: &Scrape, openmetrics: bool) -> (String, &'static str) {
        self.update(scrape);
        let text = self.encode();
        if openmetrics {
            (text, OPENMETRICS)
        } else {
            (to_prometheus_text(&text), PROMETHEUS_TEXT)
        }
    }

    fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Sets the scrape-time gauges; families are cleared first, so a class or state that is gone disappears.
    fn update(&self, s: &Scrape) {
        use std::collections::BTreeMap;
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.devices.set(gauge(s.devices.len()));
        self.fleet.clear();
        self.heartbeat_age.clear();
        self.anomalies.clear();
        let mut oldest: BTreeMap<&str, u64> = BTreeMap::new();
        let mut flagged: BTreeMap<&str, u64> = BTreeMap::new();
        for (class, last_seen_ms, anomalies) in &s.devices {
            let silent = s.now_ms.saturating_sub(*last_seen_ms);
            let state = device_state(silent, s.offline_after_ms);
            self.fleet.get_or_create(&ClassState { class: class.clone(), state: state.into() }).inc();
            let o = oldest.entry(class).or_insert(0);
            *o = (*o).max(silent);
            *flagged.entry(class).or_insert(0) += anomalies;
        }
        for (class, silent_ms) in oldest {
            self.heartbeat_age.get_or_create(&ClassLabel { class: class.into() }).set(gauge(silent_ms as usize / 1000));
        }
        for (class, n) in flagged {
            self.anomalies.get_or_create(&ClassLabel { class: class.into() }).set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        self.rollouts.clear();
        for state in &s.rollouts {
            self.rollouts.get_or_create(&StateLabel { state: (*state).into() }).inc();
        }
        self.alerts_open.clear();
        for (class, n) in &s.alerts_open {
            self.alerts_open
                .get_or_create(&ClassLabel { class: class.clone() })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        self.jobs.clear();
        for state in &s.jobs {
            self.jobs.get_or_create(&StateLabel { state: (*state).into() }).inc();
        }
        self.drift.clear();
        for (class, psi) in &s.drift {
            for (i, v) in psi.iter().enumerate() {
                self.drift.get_or_create(&Feature { class: class.clone(), feature: i.to_string() }).set(*v);
            }
        }
        if let Some(b) = s.store_bytes {
            self.store_bytes.set(i64::try_from(b).unwrap_or(i64::MAX));
        }
        self.detail.update(s);
        self.process.update();
    }
}

/// OpenMetrics text as the Prometheus text format (0.0.4): a counter's `# HELP` and `# TYPE` name its
/// `_total` samples, and `# UNIT` and `# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters.contains(name).then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
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
        let two = Scrape { devices: vec![("press".into(), 0, 0); 2], ..Default::default() };
        let (text, _) = m.render_for(&two, false);
        assert!(text.contains("edgeloop_messages_rejected_total{reason=\"too_large\"} 2"), "{text}");
        assert!(text.contains("edgeloop_records_ingested_total 3"), "{text}");
        assert!(text.contains("# TYPE edgeloop_records_ingested_total counter"), "{text}");
        assert!(text.contains("edgeloop_devices 2"), "{text}");
        assert!(!text.contains("never_seen"), "asking for a count creates no series: {text}");
        assert!(!text.contains("# EOF"), "{text}");
        let (om, kind) = m.render_for(&Scrape::default(), true);
        assert_eq!(kind, OPENMETRICS);
        assert!(om.contains("# TYPE edgeloop_records_ingested counter") && om.ends_with("# EOF\n"), "{om}");
    }

    #[test]
    fn the_fleet_rollouts_jobs_and_drift_are_set_at_each_scrape() {
        let m = Metrics::default();
        let now = 10 * STALE_AFTER_MS;
        let scrape = Scrape {
            now_ms: now,
            offline_after_ms: 60_000,
            devices: vec![
                ("press".into(), now - 1_000, 2),
                ("press".into(), now - 120_000, 3),
                ("air".into(), now - 2 * STALE_AFTER_MS, 0),
            ],
            rollouts: vec!["running", "completed", "completed"],
            jobs: vec!["succeeded", "interrupted"],
            drift: vec![("press".into(), vec![0.05, 0.3])],
            store_bytes: Some(4096),
            ..Default::default()
        };
        let (text, _) = m.render_for(&scrape, false);
        for line in [
            "edgeloop_fleet_devices{class=\"press\",state=\"online\"} 1",
            "edgeloop_fleet_devices{class=\"press\",state=\"offline\"} 1",
            "edgeloop_fleet_devices{class=\"air\",state=\"stale\"} 1",
            "edgeloop_class_oldest_message_age_seconds{class=\"press\"} 120",
            "edgeloop_class_anomalies_flagged{class=\"press\"} 5",
            "edgeloop_rollouts{state=\"completed\"} 2",
            "edgeloop_training_jobs{state=\"interrupted\"} 1",
            "edgeloop_drift_psi{class=\"press\",feature=\"1\"} 0.3",
            "edgeloop_store_size_bytes 4096",
            "edgeloop_devices 3",
        ] {
            assert!(text.contains(line), "no `{line}` in:\n{text}");
        }
        assert!(text.contains(&format!("edgeloop_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        // A class that is gone disappears at the next scrape.
        let (text, _) = m.render_for(&Scrape { now_ms: now, offline_after_ms: 60_000, ..Default::default() }, false);
        assert!(!text.contains("class=\"air\""), "{text}");
    }

    #[test]
    fn live_rollouts_training_drops_and_certificates_are_set_at_each_scrape() {
        let m = Metrics::default();
        let now = 1_000_000_000;
        let scrape = Scrape {
            now_ms: now,
            live_rollouts: vec![RolloutScrape {
                id: "r3".into(),
                class: "press".into(),
                stage: 1,
                stage_started_ms: now - 90_000,
                waiting: Some("offline".into()),
                gates: vec![("failed_installs".into(), Some(0.25), 0.2), ("anomaly_ratio".into(), None, 3.0)],
                phases: [("applied".to_string(), 4), ("timed_out".to_string(), 1)].into(),
            }],
            training: vec![
                JobScrape {
                    class: "press".into(),
                    state: "succeeded",
                    created_ms: now - 500_000,
                    finished_ms: Some(now - 380_000),
                },
                JobScrape {
                    class: "press".into(),
                    state: "failed",
                    created_ms: now - 100_000,
                    finished_ms: Some(now - 95_000),
                },
                JobScrape { class: "air".into(), state: "running", created_ms: now - 42_000, finished_ms: None },
            ],
            outbox_dropped: vec![("press".into(), 7), ("press".into(), 5), ("air".into(), 0)],
            certificates: vec![("tls".into(), 1_800_000_000)],
            ..Default::default()
        };
        let (text, _) = m.render_for(&scrape, false);
        for line in [
            "edgeloop_rollout_gate_value{rollout=\"r3\",class=\"press\",gate=\"failed_installs\"} 0.25",
            "edgeloop_rollout_gate_threshold{rollout=\"r3\",class=\"press\",gate=\"failed_installs\"} 0.2",
            "edgeloop_rollout_gate_threshold{rollout=\"r3\",class=\"press\",gate=\"anomaly_ratio\"} 3.0",
            "edgeloop_rollout_waiting{rollout=\"r3\",class=\"press\",waiting_for=\"offline\"} 1",
            "edgeloop_rollout_stage{rollout=\"r3\",class=\"press\"} 1",
            "edgeloop_rollout_stage_age_seconds{rollout=\"r3\",class=\"press\"} 90",
            "edgeloop_rollout_devices{rollout=\"r3\",class=\"press\",phase=\"timed_out\"} 1",
            "edgeloop_training_last_duration_seconds{class=\"press\",state=\"failed\"} 5.0",
            "edgeloop_training_running_seconds{class=\"air\"} 42.0",
            "edgeloop_outbox_dropped_records{class=\"press\"} 12",
            "edgeloop_certificate_expiry_timestamp_seconds{certificate=\"tls\"} 1800000000",
        ] {
            assert!(text.contains(line), "no `{line}` in:\n{text}");
        }
        assert!(!text.contains("gate=\"anomaly_ratio\"} 0"), "no value until a device reported one: {text}");
        assert!(!text.contains("edgeloop_training_last_duration_seconds{class=\"press\",state=\"succeeded\"}"));
        // A finished rollout leaves no series behind.
        let (text, _) = m.render_for(&Scrape { now_ms: now, ..Default::default() }, false);
        assert!(!text.contains("rollout=\"r3\""), "{text}");
    }

    #[test]
    fn a_certificate_s_expiry_is_read_from_its_pem() {
        let dir = tempfile::tempdir().unwrap();
        let files = crate::access::certs::init(dir.path(), &["localhost".to_string()]).unwrap();
        let pem = std::fs::read(&files.cert).unwrap();
        let t = not_after(&pem).expect("an rcgen certificate parses");
        let now = edgeloop_common::unix_millis() / 1000;
        assert!(t > now + 30 * 86_400, "{t} vs {now}");
        assert_eq!(not_after(b"-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n"), None);
    }
}
