//! Signed rollouts end to end, in process: a real control plane (embedded broker, API, rollout engine) and
//! simulated agents that download, verify, self-test, activate and watch real ONNX models.

use crate::support::{feed_forever, fleet_for, start_cp, wait_for};
use edgeloop_common::update::Phase;
use edgeloop_control_plane::rollout::State;
use edgeloop_simulators::{class_config, rollouts};
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CLASS: &str = "city-air-quality";

fn stages(canary_bake: u64) -> serde_json::Value {
    json!([
        {"name": "canary", "share": {"count": 1}, "bake_secs": canary_bake},
        {"name": "half", "share": {"percent": 50.0}, "bake_secs": 0},
        {"name": "all", "share": {"percent": 100.0}, "bake_secs": 0},
    ])
}

/// Update reports the control plane holds for a device, as (sha256, phase).
fn history(cp: &edgeloop_control_plane::ControlPlaneHandle, device: &str) -> Vec<(String, Phase)> {
    cp.registry.get(device).map(|d| d.updates.iter().map(|u| (u.sha256.clone(), u.phase)).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_completes_then_canary_breach_rolls_back_and_late_joiner_gets_rollout() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |c| c.rollouts.tick_ms = 50).await;
    let api = &crate::support::api(&cp);
    let class = class_config(CLASS).unwrap();
    let good = rollouts::upload_reference_model(api, CLASS, &class, 1e9).await.unwrap();
    let bad = rollouts::upload_reference_model(api, CLASS, &class, -1.0).await.unwrap();
    assert_eq!((good.version, bad.version), (1, 2));

    let fleet_cancel = CancellationToken::new();
    let devices = fleet_for(CLASS, api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), 6, 0, &fleet_cancel).await;
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    let stop_feed = CancellationToken::new();
    let feeding = feed_forever(devices, stop_feed.clone());
    wait_for("all devices registered with their class", Duration::from_secs(20), || {
        ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| d.class == CLASS))
    })
    .await;

    // 1. The good model goes canary -> 50% -> 100%.
    let r1 = rollouts::create(api, &json!({"model": CLASS, "version": 1, "stages": stages(0)})).await.unwrap();
    let done = rollouts::wait(api, &r1.id, Duration::from_secs(60), |v| v.state == State::Completed).await.unwrap();
    assert_eq!(done.phases.get("applied"), Some(&6), "{:?}", done.phases);
    assert!(done.stages.iter().all(|s| s.status == "done"));
    // Per stage, each gate's value against its threshold: no failures, anomaly rate far under the limit.
    for s in &done.stages {
        let failed = s.gates.iter().find(|g| g.gate == "failed_installs").unwrap();
        assert_eq!((failed.value, failed.threshold, failed.ok), (Some(0.0), 0.2, true), "{}", s.stage.name);
        let anomaly = s.gates.iter().find(|g| g.gate == "anomaly_ratio").unwrap();
        assert!(anomaly.ok && anomaly.value.is_some_and(|v| v < 1.0), "{anomaly:?}");
    }
    for id in &ids {
        let d = cp.registry.get(id).unwrap();
        assert_eq!(d.latest_update().unwrap().active_sha256.as_deref(), Some(good.sha256.as_str()), "{id}");
        let phases: Vec<Phase> = d.updates.iter().map(|u| u.phase).collect();
        for p in [Phase::Downloading, Phase::Verified, Phase::Watching, Phase::Applied] {
            assert!(phases.contains(&p), "{id}: {p:?} missing from {phases:?}");
        }
    }

    // 2. late_joiner_gets_rollout: a device that joins after completion receives the model too.
    let late = fleet_for(CLASS, api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), 1, 6, &fleet_cancel).await;
    let late_id = late[0].agent.device.clone();
    let late_feed_stop = CancellationToken::new();
    let late_feeding = feed_forever(late, late_feed_stop.clone());
    rollouts::wait(api, &r1.id, Duration::from_secs(30), |v| {
        v.devices.get(&late_id).is_some_and(|t| t.phase == Some(Phase::Applied))
    })
    .await
    .unwrap();

    // 3. canary_breach_rolls_back: a model that flags everything breaches the anomaly gate at the canary.
    let r2 = rollouts::create(api, &json!({"model": CLASS, "version": 2, "stages": stages(1)})).await.unwrap();
    assert_eq!(r2.previous.as_ref().map(|p| p.version), Some(1), "the rollback target is the last completed model");
    let back = rollouts::wait(api, &r2.id, Duration::from_secs(60), |v| matches!(v.state, State::RolledBack { .. }))
        .await
        .unwrap();
    let State::RolledBack { reason } = &back.state else { unreachable!() };
    assert!(reason.contains("anomaly_ratio") && reason.contains("canary"), "{reason}");
    assert_eq!(back.devices.len(), 1, "only the canary was reached: {:?}", back.devices.keys());
    let canary = back.devices.keys().next().unwrap().clone();
    wait_for("the canary runs the previous model again", Duration::from_secs(30), || {
        cp.registry
            .get(&canary)
            .and_then(|d| d.latest_update().cloned())
            .is_some_and(|u| u.phase == Phase::Applied && u.active_sha256.as_deref() == Some(good.sha256.as_str()))
    })
    .await;
    let all: Vec<String> = ids.iter().cloned().chain([late_id.clone()]).collect();
    for id in all.iter().filter(|id| **id != canary) {
        assert!(
            history(&cp, id).iter().all(|(sha, _)| *sha != bad.sha256),
            "{id} outside the canary heard of the bad model: {:?}",
            history(&cp, id)
        );
    }
    // The whole fleet runs the good model, and the API's audit log holds every mutating call.
    for id in &all {
        let u = cp.registry.get(id).unwrap().latest_update().cloned().unwrap();
        assert_eq!(u.active_sha256.as_deref(), Some(good.sha256.as_str()), "{id}");
    }
    let audit: Vec<edgeloop_control_plane::access::AuditEntry> = api.get_json("/api/v1/audit").await.unwrap();
    let actions: Vec<&str> = audit.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions.iter().filter(|a| **a == "POST /api/v1/rollouts").count(), 2, "{actions:?}");
    assert_eq!(actions.iter().filter(|a| **a == "POST /api/v1/models").count(), 2, "{actions:?}");

    stop_feed.cancel();
    late_feed_stop.cancel();
    let mut devices = feeding.await.unwrap();
    devices.extend(late_feeding.await.unwrap());
    fleet_cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_restart_mid_rollout_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let start = |mqtt: SocketAddr, api: SocketAddr, cancel: CancellationToken| {
        let mut cfg = edgeloop_control_plane::config::Config::embedded(dir.path().join("cp"), mqtt, api);
        cfg.rollouts.tick_ms = 50;
        edgeloop_control_plane::ControlPlane::start(cfg, cancel)
    };
    // The first start binds port 0 and reports the ports it got; the restart comes back on those ports, which
    // the agents keep using.
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let cp_cancel = CancellationToken::new();
    let cp = start(any, any, cp_cancel.clone()).await.unwrap();
    let (mqtt, api_addr) = (SocketAddr::from(([127, 0, 0, 1], cp.mqtt_addr.1)), cp.api_addr);
    // Built once: the restarted control plane comes back on the same address, with the same admin token.
    let api = &crate::support::api(&cp);
    let class = class_config(CLASS).unwrap();
    let good = rollouts::upload_reference_model(api, CLASS, &class, 1e9).await.unwrap();
    let fleet_cancel = CancellationToken::new();
    let devices = fleet_for(CLASS, api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), 4, 0, &fleet_cancel).await;
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    let stop_feed = CancellationToken::new();
    let feeding = feed_forever(devices, stop_feed.clone());
    wait_for("devices registered", Duration::from_secs(20), || {
        ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| d.class == CLASS))
    })
    .await;
    let r = rollouts::create(api, &json!({"model": CLASS, "version": 1, "stages": stages(0), "manual_approval": true}))
        .await
        .unwrap();
    let held =
        rollouts::wait(api, &r.id, Duration::from_secs(60), |v| v.state == State::AwaitingApproval).await.unwrap();
    assert_eq!(held.devices.len(), 1);

    // The control plane stops (its broker with it) and comes back on the same data dir and ports.
    cp_cancel.cancel();
    cp.join().await.unwrap();
    let cp_cancel = CancellationToken::new();
    let cp = start(mqtt, api_addr, cp_cancel.clone()).await.unwrap();
    let after: edgeloop_control_plane::rollout::RolloutView =
        api.get_json(&format!("/api/v1/rollouts/{}", r.id)).await.unwrap();
    assert_eq!((after.state, after.stage, after.devices.len()), (State::AwaitingApproval, 0, 1), "state survived");

    let (status, body) = api.post_json(&format!("/api/v1/rollouts/{}/approve", r.id), &json!({})).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let done =
        rollouts::wait(api, &r.id, Duration::from_secs(60), |v| v.state == State::AwaitingApproval && v.stage == 1)
            .await
            .unwrap();
    assert_eq!(done.devices.len(), 2);
    let (status, _) = api.post_json(&format!("/api/v1/rollouts/{}/approve", r.id), &json!({})).await.unwrap();
    assert_eq!(status, 200);
    let done = rollouts::wait(api, &r.id, Duration::from_secs(60), |v| v.state == State::Completed).await.unwrap();
    assert_eq!(done.phases.get("applied"), Some(&4), "{:?}", done.phases);
    for id in &ids {
        let u = cp.registry.get(id).unwrap().latest_update().cloned().unwrap();
        assert_eq!(u.active_sha256.as_deref(), Some(good.sha256.as_str()), "{id}");
    }
    // A wrong action is refused with a reason, and unknown rollouts are 404.
    let (status, body) = api.post_json(&format!("/api/v1/rollouts/{}/resume", r.id), &json!({})).await.unwrap();
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("cannot resume a rollout that is completed"), "{body}");
    let (status, _) = api.post_json("/api/v1/rollouts/r99/pause", &json!({})).await.unwrap();
    assert_eq!(status, 404);

    stop_feed.cancel();
    let devices = feeding.await.unwrap();
    fleet_cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

/// A model whose desired state is larger than an MQTT client's default packet limit (10 KiB): a fast sensor
/// of 24 channels (192 features) and 16 golden vectors, which travel in the desired state. It reaches its
/// device, which applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_with_a_large_desired_state_reaches_its_devices() {
    use edgeloop_simulators::fleet::{self, FleetSpec};
    let dir = tempfile::tempdir().unwrap();
    let mut class = class_config("factory-vibration").unwrap();
    class.class = "wide-vibration".into();
    class.sensors[0].channels = 24;
    let c2 = class.clone();
    let (cp, cp_cancel) = start_cp(dir.path(), move |c| {
        c.rollouts.tick_ms = 50;
        c.classes.insert(c2.class.clone(), c2);
    })
    .await;
    let api = crate::support::api(&cp);
    let model = rollouts::upload_reference_model_with(&api, "wide-vibration", &class, 1e9, 16).await.unwrap();
    let cancel = CancellationToken::new();
    let updates = rollouts::updater_config(&api).await.unwrap();
    let mut spec = FleetSpec::new(
        vec![class.clone()],
        cp.mqtt_addr.clone(),
        &dir.path().join("agents"),
        updates.trusted[0].clone(),
    );
    spec.customise = std::sync::Arc::new(move |c| c.updates = Some(updates.clone()));
    spec.enroll_with(&api, 2).await.unwrap();
    let devices = fleet::start(&spec, 2, &cancel).await.unwrap();
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    let stop = CancellationToken::new();
    let feeding = feed_forever(devices, stop.clone());
    wait_for("the devices registered with their class", Duration::from_secs(20), || {
        ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| d.class == "wide-vibration"))
    })
    .await;
    let r =
        rollouts::create(&api, &json!({"model": "wide-vibration", "version": 1, "stages": stages(0)})).await.unwrap();
    let done = rollouts::wait(&api, &r.id, Duration::from_secs(60), |v| v.state == State::Completed)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(done.phases.get("applied"), Some(&2), "{:?}", done.phases);
    let issued = cp.rollouts.issued(&ids[0]).unwrap();
    let bytes = issued.map_or(0, |i| i.payload.len());
    assert!(bytes > 10 * 1024, "the desired state is {bytes} bytes: the test needs one over 10 KiB");
    for id in &ids {
        let d = cp.registry.get(id).unwrap();
        assert_eq!(d.latest_update().unwrap().active_sha256.as_deref(), Some(model.sha256.as_str()), "{id}");
    }
    stop.cancel();
    let devices = feeding.await.unwrap();
    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
