//! Scrape-time series about the work in progress: each live rollout's gate values against their thresholds,
//! what it waits for and how long its stage has run, its devices by phase; training jobs' durations; records
//! the fleet's outboxes dropped; and when the API's certificate expires. Label sets stay bounded: only live
//! rollouts (at most one a class) are labelled by id.

use super::ClassLabel;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

type FloatGauge = Gauge<f64, AtomicU64>;

/// A live rollout (scheduled, running, awaiting approval or paused), as a scrape reads it.
#[derive(Debug, Clone, Default)]
pub struct RolloutScrape {
    pub id: String,
    pub class: String,
    pub stage: usize,
    pub stage_started_ms: u64,
    /// What it waits for (`reports`, `offline`, `window`...), if anything.
    pub waiting: Option<String>,
    /// Each gate: name, live value (none until a device reported one), threshold.
    pub gates: Vec<(String, Option<f64>, f64)>,
    /// Devices per phase, as the API counts them (`pending`, `applied`, `timed_out`...).
    pub phases: BTreeMap<String, usize>,
}

/// A training job, as a scrape reads it.
#[derive(Debug, Clone)]
pub struct JobScrape {
    pub class: String,
    pub state: &'static str,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RolloutLabel {
    rollout: String,
    class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GateLabel {
    rollout: String,
    class: String,
    gate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaitingLabel {
    rollout: String,
    class: String,
    waiting_for: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    rollout: String,
    class: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    class: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertLabel {
    certificate: String,
}

#[derive(Debug, Default)]
pub(super) struct Detail {
    gate_value: Family<GateLabel, FloatGauge>,
    gate_threshold: Family<GateLabel, FloatGauge>,
    waiting: Family<WaitingLabel, Gauge>,
    stage: Family<RolloutLabel, Gauge>,
    stage_seconds: Family<RolloutLabel, Gauge>,
    rollout_devices: Family<PhaseLabel, Gauge>,
    job_seconds: Family<JobLabel, FloatGauge>,
    job_running_seconds: Family<ClassLabel, FloatGauge>,
    dropped: Family<ClassLabel, Gauge>,
    cert_expiry: Family<CertLabel, Gauge>,
}

impl Detail {
    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "edgeloop_rollout_gate_value",
            "A live rollout's gate value, over every device it reached (absent until one reported it)",
            self.gate_value.clone(),
        );
        r.register(
            "edgeloop_rollout_gate_threshold",
            "The limit of a live rollout's gate (a minimum for shadow_agreement, a maximum for the others)",
            self.gate_threshold.clone(),
        );
        r.register(
            "edgeloop_rollout_waiting",
            "What a live rollout waits for (1): reports, offline, no_devices, window, bake, approval or start",
            self.waiting.clone(),
        );
        r.register("edgeloop_rollout_stage", "A live rollout's current stage, from 0", self.stage.clone());
        r.register_with_unit(
            "edgeloop_rollout_stage_age",
            "How long a live rollout's current stage has run",
            prometheus_client::registry::Unit::Seconds,
            self.stage_seconds.clone(),
        );
        r.register(
            "edgeloop_rollout_devices",
            "A live rollout's devices by phase (pending, awaiting_window, timed_out, applied, failed...)",
            self.rollout_devices.clone(),
        );
        r.register_with_unit(
            "edgeloop_training_last_duration",
            "How long the class's latest finished training job took, from its request to its end",
            prometheus_client::registry::Unit::Seconds,
            self.job_seconds.clone(),
        );
        r.register_with_unit(
            "edgeloop_training_running",
            "How long the class's oldest queued or running training job has waited or run",
            prometheus_client::registry::Unit::Seconds,
            self.job_running_seconds.clone(),
        );
        r.register(
            "edgeloop_outbox_dropped_records",
            "Records the class's devices dropped from full outboxes, as their heartbeats report (only grows)",
            self.dropped.clone(),
        );
        r.register(
            "edgeloop_certificate_expiry_timestamp_seconds",
            "When a certificate the control plane serves expires, Unix seconds",
            self.cert_expiry.clone(),
        );
    }

    pub(super) fn update(&self, s: &super::Scrape) {
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for f in [&self.gate_value, &self.gate_threshold] {
            f.clear();
        }
        self.waiting.clear();
        self.stage.clear();
        self.stage_seconds.clear();
        self.rollout_devices.clear();
        for r in &s.live_rollouts {
            let at = RolloutLabel { rollout: r.id.clone(), class: r.class.clone() };
            self.stage.get_or_create(&at).set(int(r.stage as u64));
            self.stage_seconds.get_or_create(&at).set(int(s.now_ms.saturating_sub(r.stage_started_ms) / 1000));
            if let Some(w) = &r.waiting {
                let l = WaitingLabel { rollout: r.id.clone(), class: r.class.clone(), waiting_for: w.clone() };
                self.waiting.get_or_create(&l).set(1);
            }
            for (gate, value, threshold) in &r.gates {
                let l = GateLabel { rollout: r.id.clone(), class: r.class.clone(), gate: gate.clone() };
                self.gate_threshold.get_or_create(&l).set(*threshold);
                if let Some(v) = value {
                    self.gate_value.get_or_create(&l).set(*v);
                }
            }
            for (phase, n) in &r.phases {
                let l = PhaseLabel { rollout: r.id.clone(), class: r.class.clone(), phase: phase.clone() };
                self.rollout_devices.get_or_create(&l).set(int(*n as u64));
            }
        }
        self.job_seconds.clear();
        self.job_running_seconds.clear();
        let mut latest: BTreeMap<&str, &JobScrape> = BTreeMap::new();
        let mut oldest_open: BTreeMap<&str, u64> = BTreeMap::new();
        for j in &s.training {
            match j.finished_ms {
                Some(f) => {
                    let newer = latest.get(j.class.as_str()).is_none_or(|l| l.finished_ms.unwrap_or(0) <= f);
                    if newer {
                        latest.insert(&j.class, j);
                    }
                }
                None => {
                    let o = oldest_open.entry(&j.class).or_insert(j.created_ms);
                    *o = (*o).min(j.created_ms);
                }
            }
        }
        for (class, j) in latest {
            let secs = j.finished_ms.unwrap_or(j.created_ms).saturating_sub(j.created_ms) as f64 / 1000.0;
            self.job_seconds.get_or_create(&JobLabel { class: class.into(), state: j.state.into() }).set(secs);
        }
        for (class, created) in oldest_open {
            let secs = s.now_ms.saturating_sub(created) as f64 / 1000.0;
            self.job_running_seconds.get_or_create(&ClassLabel { class: class.into() }).set(secs);
        }
        self.dropped.clear();
        let mut dropped: BTreeMap<&str, u64> = BTreeMap::new();
        for (class, n) in &s.outbox_dropped {
            *dropped.entry(class).or_insert(0) += n;
        }
        for (class, n) in dropped {
            self.dropped.get_or_create(&ClassLabel { class: class.into() }).set(int(n));
        }
        self.cert_expiry.clear();
        for (name, not_after) in &s.certificates {
            self.cert_expiry.get_or_create(&CertLabel { certificate: name.clone() }).set(int(*not_after));
        }
    }
}

/// When the first certificate of a PEM chain expires, Unix seconds; `None` if it does not parse.
pub fn not_after(pem: &[u8]) -> Option<u64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    u64::try_from(cert.validity().not_after.timestamp()).ok()
}
