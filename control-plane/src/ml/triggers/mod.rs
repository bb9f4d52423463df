//! Retraining triggers, per device class: a schedule, a number of new records since the last training, and
//! drift (the PSI of any feature between the production model's training set and a recent window above a
//! threshold).
//!
//! [`rules::evaluate`] is the pure decision, with time passed in. [`run`] is the thin loop around it: it
//! counts records, measures drift on a blocking thread, starts a training job when a trigger fires, and
//! records every firing as a [`TriggerEvent`] (logged, and listed by `GET /api/v1/triggers`).

pub mod rules;

pub use rules::{evaluate, note_training, Cause, DriftedWindow, TriggerConfig, TriggerEvent, TriggerState};

use crate::fleet::telemetry::Query;
use crate::ml::dataset::{self, DatasetSpec, QualityReport};
use crate::ml::drift;
use crate::ml::jobs::{DriftReading, JobState, Learning};
use crate::ml::training::run::TrainRequest;
use edgeloop_common::gaps::GapRule;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The PSI per feature of the class's recent window against its production model. The window is the last
/// `drift_window_secs` of event time of each device, up to its newest record, so replays and devices with
/// skewed clocks are measured on their own time. Blocking.
pub fn measure_drift(learning: &Learning, cfg: &TriggerConfig) -> Vec<f64> {
    let Ok(Some(prod)) = learning.models.production(&cfg.class) else { return Vec::new() };
    let Some(class) = learning.classes.get(&cfg.class) else { return Vec::new() };
    let Some(sensor) = class.sensors.iter().find(|s| s.name == prod.sensor) else { return Vec::new() };
    // Gaps filled as for the production model's training set, which its reference describes.
    let spec = with_gap_rule(DatasetSpec::new(&cfg.class), prod.gaps);
    let mut report = QualityReport::default();
    let mut rows = Vec::new();
    for device in learning.devices_of(&cfg.class) {
        let Ok(Some(newest)) = learning.store.last(&device) else { continue };
        let from = newest.ts_ms.saturating_sub(cfg.drift_window_secs * 1000);
        let q = Query { after_seq: 0, from_ms: Some(from), to_ms: None, limit: 100_000 };
        if let Ok(records) = learning.store.query(&device, q) {
            rows.extend(dataset::device_rows(&device, &records, sensor, &spec, &[], &mut report));
        }
    }
    drift::psi(&prod.lineage.reference, &rows.iter().map(|r| r.features.as_slice()).collect::<Vec<_>>())
}

/// The recent window [`measure_drift`] measures, in event time: from the earliest start to the latest
/// reading over the class's devices (`None` without records). A retraining for drift takes the rows from
/// its start on as the new regime. Blocking.
pub fn drift_window(learning: &Learning, cfg: &TriggerConfig) -> Option<(u64, u64)> {
    let newest: Vec<u64> = learning
        .devices_of(&cfg.class)
        .iter()
        .filter_map(|d| learning.store.last(d).ok().flatten())
        .map(|r| r.ts_ms)
        .collect();
    let from = newest.iter().map(|t| t.saturating_sub(cfg.drift_window_secs * 1000)).min()?;
    Some((from, newest.iter().copied().max()?))
}

/// `spec` filling gaps by `rule`.
fn with_gap_rule(spec: DatasetSpec, rule: GapRule) -> DatasetSpec {
    DatasetSpec { impute: rule.impute, max_gap: rule.max_gap, ..spec }
}

/// The training a trigger starts: the configured trials and seed, on the sensor the production model watches
/// with the gap rule of its training (`production`: its sensor and rule), or on the class's first sensor with
/// the default rule while there is none. A retraining for drift names where the drifted window began
/// (`regime_from_ms`): its dataset splits the new regime on its own, so the model learns it and promotion
/// judges it.
fn retrain_request(
    cfg: &TriggerConfig,
    trials: usize,
    seed: u64,
    production: Option<(String, GapRule)>,
    regime_from_ms: Option<u64>,
) -> TrainRequest {
    let mut req = TrainRequest::new(&cfg.class);
    (req.trials, req.seed) = (trials, seed);
    req.dataset.exclude_flagged = cfg.exclude_flagged;
    req.dataset.regime_from_ms = regime_from_ms;
    if let Some((sensor, rule)) = production {
        req.dataset = with_gap_rule(req.dataset, rule);
        req.dataset.sensor = Some(sensor);
    }
    req
}

/// Checks every class's triggers until cancelled, while this control plane leads (`lease`).
pub async fn run(learning: Arc<Learning>, lease: crate::storage::postgres::lease::Lease, cancel: CancellationToken) {
    let configs = learning.defaults.triggers.clone();
    if configs.is_empty() {
        return;
    }
    let mut states: BTreeMap<String, TriggerState> = BTreeMap::new();
    for c in &configs {
        let last = learning.models.production(&c.class).ok().flatten().map(|m| m.created_ms);
        states.insert(
            c.class.clone(),
            TriggerState { last_train_ms: last, records_at_last_train: learning.records_of(&c.class) },
        );
    }
    let period = Duration::from_secs(configs.iter().map(|c| c.check_secs).min().unwrap_or(60).max(1));
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Replicas evaluate triggers only where they lead: one training per trigger across the cluster.
        if !lease.is_leader() {
            continue;
        }
        for cfg in &configs {
            let busy = learning
                .list_jobs()
                .iter()
                .any(|j| j.class == cfg.class && matches!(j.state, JobState::Queued | JobState::Running));
            if busy {
                continue;
            }
            let now = edgeloop_common::unix_millis();
            let records = learning.records_of(&cfg.class);
            let psi = match cfg.psi_threshold {
                Some(_) => {
                    let (l, c) = (learning.clone(), cfg.clone());
                    let psi = tokio::task::spawn_blocking(move || measure_drift(&l, &c)).await.unwrap_or_default();
                    if !psi.is_empty() {
                        learning.record_drift(&cfg.class, DriftReading { at_ms: now, psi: psi.clone() });
                    }
                    psi
                }
                None => Vec::new(),
            };
            // The production model, read once per check, off the async workers (the registry may be in
            // PostgreSQL).
            let production = {
                let (l, class) = (learning.clone(), cfg.class.clone());
                tokio::task::spawn_blocking(move || l.models.production(&class).ok().flatten()).await.ok().flatten()
            };
            let names = production.as_ref().map(|m| m.pipeline.sensors[0].feature_names()).unwrap_or_default();
            let state = states.entry(cfg.class.clone()).or_default();
            // A training started elsewhere (the API, an operator) resets the clock as a triggered one does.
            let latest = learning
                .list_jobs()
                .iter()
                .filter(|j| j.class == cfg.class && j.state == JobState::Succeeded)
                .map(|j| j.created_ms)
                .max();
            note_training(state, latest, records);
            // The window the drift was measured over, when the class drifted (the same test as `evaluate`'s).
            let drifted = cfg.psi_threshold.is_some_and(|t| psi.iter().any(|p| p.is_finite() && *p > t));
            let window = if drifted {
                let (l, c) = (learning.clone(), cfg.clone());
                tokio::task::spawn_blocking(move || drift_window(&l, &c)).await.ok().flatten()
            } else {
                None
            };
            // Still drifted from the model the last drift firing measured: that firing's window grows, so
            // the model's alerts since are explained too (whether or not a new firing follows).
            if let Some((w, m)) = window.zip(production.as_ref()) {
                let (l, class, sha) = (learning.clone(), cfg.class.clone(), m.sha256.clone());
                if tokio::task::spawn_blocking(move || l.grow_drift(&class, &sha, w)).await.unwrap_or(false) {
                    tracing::debug!(class = %cfg.class, "the drift firing's window grew");
                }
            }
            let Some(cause) = evaluate(cfg, state, now, records, &psi, &names) else { continue };
            let window = window.filter(|_| matches!(cause, Cause::Drift { .. }));
            let drifted = window.zip(production.as_ref()).map(|((from_ms, to_ms), m)| DriftedWindow {
                from_ms,
                to_ms,
                model_sha256: m.sha256.clone(),
            });
            let prod = production.map(|m| (m.sensor, m.gaps));
            let regime = window.map(|w| w.0);
            let req = retrain_request(cfg, learning.defaults.trials, learning.defaults.seed, prod, regime);
            let started = learning.start(req, &format!("trigger: {cause:?}"));
            tracing::info!(class = %cfg.class, ?cause, job = ?started.as_ref().ok(), "retraining trigger fired");
            let (job, error) = match started {
                Ok(id) => (Some(id), None),
                Err(e) => (None, Some(e.to_string())),
            };
            *state = TriggerState { last_train_ms: Some(now), records_at_last_train: records };
            let event = TriggerEvent { class: cfg.class.clone(), at_ms: now, cause, job, error, drifted };
            let l = learning.clone();
            // A durable write (fdatasync): off the async workers.
            if let Err(e) = tokio::task::spawn_blocking(move || l.record_trigger(event)).await {
                tracing::error!(error = %e, "recording the trigger event panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_latest_drift_firing_of_the_class_grows_and_only_against_its_model() {
        let event = |class: &str, cause: Cause, sha: Option<&str>| TriggerEvent {
            class: class.into(),
            at_ms: 0,
            cause,
            job: None,
            error: None,
            drifted: sha.map(|s| DriftedWindow { from_ms: 100, to_ms: 200, model_sha256: s.into() }),
        };
        let drift = || Cause::Drift { feature: "f".into(), psi: 0.4, threshold: 0.25 };
        let schedule = Cause::Schedule { every_secs: 60, since_last_secs: None };
        let mut events = vec![
            event("c", drift(), Some("v1")),
            event("c", drift(), Some("v1")),
            event("other", drift(), Some("v1")),
            event("c", schedule, None),
        ];
        // The second firing is the latest drift of class c (a later schedule firing is not a drift).
        assert_eq!(rules::grow_latest_drift(&mut events, "c", "v1", (150, 300)), Some(1));
        let span = |e: &TriggerEvent| e.drifted.as_ref().map(|w| (w.from_ms, w.to_ms));
        assert_eq!(
            events.iter().map(span).collect::<Vec<_>>(),
            [Some((100, 200)), Some((100, 300)), Some((100, 200)), None]
        );
        // Earlier readings widen it at the start; a window it holds changes nothing.
        assert_eq!(rules::grow_latest_drift(&mut events, "c", "v1", (50, 250)), Some(1));
        assert_eq!(span(&events[1]), Some((50, 300)));
        assert_eq!(rules::grow_latest_drift(&mut events, "c", "v1", (60, 290)), None);
        // Against another model, for a class without a drift firing, or a firing without a window: none.
        assert_eq!(rules::grow_latest_drift(&mut events, "c", "v2", (0, 999)), None);
        assert_eq!(rules::grow_latest_drift(&mut events, "nope", "v1", (0, 999)), None);
        events.push(event("c", drift(), None));
        assert_eq!(rules::grow_latest_drift(&mut events, "c", "v1", (0, 999)), None);
    }

    fn cfg() -> TriggerConfig {
        TriggerConfig {
            class: "c".into(),
            every_secs: None,
            new_records: None,
            psi_threshold: None,
            drift_window_secs: 60,
            check_secs: 1,
            min_interval_secs: 0,
            exclude_flagged: false,
        }
    }

    #[test]
    fn a_triggered_training_keeps_the_production_models_sensor_and_gap_rule() {
        use edgeloop_common::gaps::ImputeMethod;
        let c = TriggerConfig { exclude_flagged: true, ..cfg() };
        let held = GapRule { impute: ImputeMethod::Hold, max_gap: 8 };
        let req = retrain_request(&c, 7, 3, Some(("pm25".into(), held)), None);
        assert_eq!((req.trials, req.seed, req.dataset.exclude_flagged), (7, 3, true));
        assert_eq!(req.dataset.regime_from_ms, None);
        let drifted = retrain_request(&c, 7, 3, Some(("pm25".into(), held)), Some(42_000));
        assert_eq!(drifted.dataset.regime_from_ms, Some(42_000), "a drift retraining names the new regime");
        assert_eq!(req.dataset.sensor.as_deref(), Some("pm25"));
        assert_eq!((req.dataset.impute, req.dataset.max_gap), (ImputeMethod::Hold, 8));
        // No production model yet: the class's first sensor, the default rule.
        let first = retrain_request(&c, 7, 3, None, None);
        assert_eq!(first.dataset.sensor, None);
        assert_eq!(GapRule { impute: first.dataset.impute, max_gap: first.dataset.max_gap }, GapRule::default());
    }

    #[test]
    fn schedule() {
        let c = TriggerConfig { every_secs: Some(100), ..cfg() };
        let fresh = TriggerState::default();
        assert!(matches!(
            evaluate(&c, &fresh, 5_000, 10, &[], &[]),
            Some(Cause::Schedule { since_last_secs: None, .. })
        ));
        assert_eq!(evaluate(&c, &fresh, 5_000, 0, &[], &[]), None, "nothing to train on yet");
        let trained = TriggerState { last_train_ms: Some(1_000), records_at_last_train: 10 };
        assert_eq!(evaluate(&c, &trained, 100_999, 10, &[], &[]), None);
        assert!(evaluate(&c, &trained, 101_000, 10, &[], &[]).is_some());
    }

    #[test]
    fn new_records() {
        let c = TriggerConfig { new_records: Some(1000), ..cfg() };
        let s = TriggerState { last_train_ms: Some(0), records_at_last_train: 500 };
        assert_eq!(evaluate(&c, &s, 1, 1499, &[], &[]), None);
        assert_eq!(evaluate(&c, &s, 1, 1500, &[], &[]), Some(Cause::NewRecords { count: 1000, threshold: 1000 }));
    }

    #[test]
    fn drift_names_the_worst_feature() {
        let c = TriggerConfig { psi_threshold: Some(0.25), ..cfg() };
        let s = TriggerState { last_train_ms: Some(0), records_at_last_train: 0 };
        let names = vec!["value".to_string(), "delta".to_string()];
        assert_eq!(evaluate(&c, &s, 1, 5, &[0.05, 0.2], &names), None);
        assert_eq!(
            evaluate(&c, &s, 1, 5, &[0.05, 0.4], &names),
            Some(Cause::Drift { feature: "delta".into(), psi: 0.4, threshold: 0.25 })
        );
        assert_eq!(evaluate(&c, &s, 1, 5, &[], &names), None, "no measurement, no drift");
    }

    #[test]
    fn nothing_fires_within_the_minimum_interval_of_the_last_training() {
        let c = TriggerConfig { psi_threshold: Some(0.25), new_records: Some(10), min_interval_secs: 600, ..cfg() };
        let s = TriggerState { last_train_ms: Some(1_000), records_at_last_train: 0 };
        let names = vec!["value".to_string()];
        assert_eq!(evaluate(&c, &s, 600_999, 50, &[0.9], &names), None, "599.999 s after the last training");
        assert_eq!(evaluate(&c, &s, 601_000, 50, &[0.9], &names), Some(Cause::NewRecords { count: 50, threshold: 10 }));
        let never = TriggerState::default();
        assert!(evaluate(&c, &never, 1, 50, &[0.9], &names).is_some(), "a class never trained is not held back");
    }

    #[test]
    fn a_training_started_elsewhere_resets_the_clock() {
        let c = TriggerConfig { every_secs: Some(60), ..cfg() };
        let mut st = TriggerState { last_train_ms: Some(0), records_at_last_train: 10 };
        assert!(evaluate(&c, &st, 61_000, 20, &[], &[]).is_some(), "due without the API training");
        note_training(&mut st, Some(30_000), 20);
        assert_eq!(st, TriggerState { last_train_ms: Some(30_000), records_at_last_train: 20 });
        assert_eq!(evaluate(&c, &st, 61_000, 20, &[], &[]), None, "an operator's training at 30 s counts");
        note_training(&mut st, Some(10_000), 99);
        assert_eq!(st.last_train_ms, Some(30_000), "an older job changes nothing");
        note_training(&mut st, None, 99);
        assert_eq!(st.records_at_last_train, 20);
    }
}
