//! Retraining triggers over real stored telemetry: a record-count trigger trains the first model, then a
//! distribution shift trips the drift trigger and trains again.

use crate::support::{start_cp, wait_for};
use edgeloop_control_plane::ml::{Cause, TriggerConfig};
use edgeloop_simulators::fleet::{self, FleetSpec};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_then_drift_trigger_retraining() {
    let dir = tempfile::tempdir().unwrap();
    let class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    let c2 = class.clone();
    let (cp, cp_cancel) = start_cp(dir.path(), move |c| {
        c.classes.insert(c2.class.clone(), c2);
        c.training.trials = 1;
        c.training.triggers = vec![TriggerConfig {
            class: "city-air-quality".into(),
            every_secs: None,
            new_records: Some(1000),
            psi_threshold: Some(0.5),
            // One reading a minute: the last 100 minutes of each device.
            drift_window_secs: 6000,
            check_secs: 1,
            min_interval_secs: 0,
            exclude_flagged: false,
        }];
    })
    .await;
    let api = crate::support::api(&cp);
    let cancel = CancellationToken::new();
    let mut spec =
        FleetSpec::new(vec![class], cp.mqtt_addr.clone(), &dir.path().join("agents"), cp.trusted_key.clone());
    spec.enroll_with(&api, 64).await.unwrap();
    let mut devices = fleet::start(&spec, 2, &cancel).await.unwrap();
    for d in &mut devices {
        for s in d.generator.take(800) {
            d.samples.send(s).await.unwrap();
        }
    }
    let learning = cp.learning.clone();
    wait_for("the count trigger's training", Duration::from_secs(120), || {
        learning.list_jobs().iter().any(|j| j.state == edgeloop_control_plane::ml::JobState::Succeeded)
    })
    .await;
    let events = learning.trigger_events();
    assert!(matches!(events[0].cause, Cause::NewRecords { threshold: 1000, .. }), "{events:?}");
    assert_eq!(learning.models.production("city-air-quality").unwrap().unwrap().version, 1);

    // Shift the signal: every reading tripled and raised. The count trigger cannot fire again (fewer than
    // 1000 new records), so a second training can only come from drift.
    for d in &mut devices {
        for mut s in d.generator.take(300) {
            s.values.iter_mut().for_each(|v| *v = *v * 3.0 + 40.0);
            d.samples.send(s).await.unwrap();
        }
    }
    wait_for("the drift trigger", Duration::from_secs(120), || {
        learning.trigger_events().iter().any(|e| matches!(e.cause, Cause::Drift { .. }))
    })
    .await;
    let events = learning.trigger_events();
    let drift = events.iter().find(|e| matches!(e.cause, Cause::Drift { .. })).unwrap();
    let Cause::Drift { psi, threshold, .. } = &drift.cause else { unreachable!() };
    assert!(psi > threshold);
    assert!(drift.job.is_some(), "{drift:?}");
    // It names the window it measured (event time: the last 100 minutes of readings, over both devices) and
    // the production model it measured against (v1: the drift retraining is v2).
    let v1 = learning.models.list().unwrap().into_iter().find(|m| m.version == 1).unwrap();
    let w = drift.drifted.as_ref().expect("a drift firing names its window");
    assert_eq!(w.model_sha256, v1.sha256, "{drift:?}");
    let newest = devices.iter().map(|d| cp.store.last(&d.agent.device).unwrap().unwrap().ts_ms).max().unwrap();
    assert!(w.to_ms <= newest && newest - w.to_ms <= 300 * 60_000, "{w:?}, newest {newest}");
    assert!(w.to_ms - w.from_ms >= 6_000_000, "at least the drift window: {w:?}");
    let (status, body) = api.get("/api/v1/triggers").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("\"trigger\":\"drift\"") && body.contains("\"trigger\":\"new_records\""), "{body}");

    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
