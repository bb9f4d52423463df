//! Alerts end to end: a device running a signed model raises one alert for one fault (though the fault's
//! windows are flagged for a long while after it, as the rolling features remember it), sends it up, and the
//! control plane serves it; an operator's verdict acknowledges it and labels its span for training.

use crate::support::{fleet_for, start_cp, wait_for};
use edgeloop_agent::source::Sample;
use edgeloop_common::config::ClassConfig;
use edgeloop_simulators::fleet::SimDevice;
use edgeloop_simulators::http::Api;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CLASS: &str = "city-air-quality";

/// Sends `n` of the device's next samples with every value replaced by `value`.
async fn send(d: &mut SimDevice, n: usize, value: f64) {
    let mut sent = 0;
    while sent < n {
        // The model's sensor (pm25) only; a sample a dropout swallowed is skipped.
        let Some(mut s): Option<Sample> = d.generator.next(0) else { continue };
        s.values.iter_mut().for_each(|v| *v = value);
        d.samples.send(s).await.unwrap();
        sent += 1;
    }
}

/// Rolls the reference model (mean square of the features, flagging a window over 100) out to the device,
/// feeding it calm readings of 0 (which score 0) until the rollout completes, then 60 more.
async fn run_reference_model(api: &Api, class: &ClassConfig, d: &mut SimDevice) {
    edgeloop_simulators::rollouts::upload_reference_model(api, "ms", class, 100.0).await.unwrap();
    let stages = json!([{"name": "all", "share": {"percent": 100.0}}]);
    let r = edgeloop_simulators::rollouts::create(api, &json!({"model": "ms", "version": 1, "stages": stages}))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        send(d, 5, 0.0).await;
        let v: Value = api.get_json(&format!("/api/v1/rollouts/{}", r.id)).await.unwrap();
        if v["state"] == "completed" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the rollout did not complete: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    send(d, 60, 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_fault_is_one_alert_served_acknowledged_and_labelled() {
    let dir = tempfile::tempdir().unwrap();
    let class = edgeloop_simulators::class_config(CLASS).unwrap();
    let for_cp = class.clone();
    let (cp, cp_cancel) = start_cp(dir.path(), move |c| {
        c.rollouts.tick_ms = 50;
        c.classes.insert(for_cp.class.clone(), for_cp);
    })
    .await;
    let api = crate::support::api(&cp);
    let fleet_cancel = CancellationToken::new();
    let mut devices =
        fleet_for(CLASS, &api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), 1, 0, &fleet_cancel).await;
    let d = &mut devices[0];
    let id = d.agent.device.clone();

    run_reference_model(&api, &class, d).await;
    let (_, list) = api.get("/api/v1/alerts").await.unwrap();
    assert_eq!(serde_json::from_str::<Value>(&list).unwrap(), json!([]), "calm readings raise nothing");

    // One fault: 20 readings of 1000. The rolling features stay high for the 60 readings after it, then the
    // windows calm down and the alert closes.
    send(d, 20, 1000.0).await;
    send(d, 150, 0.0).await;
    let url = format!("/api/v1/alerts?device={id}&state=closed");
    let mut closed = Vec::new();
    for _ in 0..300 {
        closed = api.get_json::<Vec<Value>>(&url).await.unwrap();
        if !closed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all: Vec<Value> = api.get_json("/api/v1/alerts").await.unwrap();
    let dev: Value = api.get_json(&format!("/api/v1/devices/{id}")).await.unwrap();
    assert_eq!(closed.len(), 1, "alerts {all:?}; the device: {dev}");
    let all: Vec<Value> = api.get_json(&format!("/api/v1/alerts?class={CLASS}")).await.unwrap();
    assert_eq!(all.len(), 1, "one fault, one alert: {all:?}");
    let a = &all[0];
    assert_eq!((a["id"].as_u64(), a["open"].as_bool(), a["sensor"].as_str()), (Some(1), Some(false), Some("pm25")));
    assert!(a["model"].as_str().unwrap().starts_with("ms v1 "), "{a}");
    assert!(a["peak_score"].as_f64().unwrap() > 100.0, "{a}");
    let windows = a["windows"].as_u64().unwrap();
    assert!((20..=100).contains(&windows), "the fault and its echo in the rolling features: {a}");
    let (onset, end) = (a["onset_ms"].as_u64().unwrap(), a["end_ms"].as_u64().unwrap());
    assert!(onset < end && a["last_ms"].as_u64().unwrap() <= end, "{a}");
    // The agent's copy went once acknowledged: the control plane holds both snapshots (opened, closed).
    assert_eq!(a["rev"], 2, "{a}");
    assert_eq!(cp.metrics.alert_snapshots.get(), 2);

    // Filters and errors.
    assert!(api.get_json::<Vec<Value>>("/api/v1/alerts?state=open").await.unwrap().is_empty());
    assert!(api.get_json::<Vec<Value>>("/api/v1/alerts?class=factory-vibration").await.unwrap().is_empty());
    assert!(api.get_json::<Vec<Value>>(&format!("/api/v1/alerts?since={}", end + 1)).await.unwrap().is_empty());
    assert_eq!(api.get("/api/v1/alerts?state=sleepy").await.unwrap().0, 400);
    assert_eq!(api.get(&format!("/api/v1/alerts/{id}/9")).await.unwrap().0, 404);
    let one: Value = api.get_json(&format!("/api/v1/alerts/{id}/1")).await.unwrap();
    assert_eq!(one, *a);

    // An operator says it was a real fault: acknowledged, and its span is a training label.
    let (status, body) = api
        .post_json(&format!("/api/v1/alerts/{id}/1/ack"), &json!({"verdict": true, "note": "filter clogged"}))
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let acked: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (acked["ack"]["verdict"].as_bool(), acked["ack"]["note"].as_str()),
        (Some(true), Some("filter clogged"))
    );
    assert!(acked["ack"]["by"].as_str().unwrap().contains("admin"), "{acked}");
    let labels: Vec<Value> = api.get_json("/api/v1/labels").await.unwrap();
    assert_eq!(labels, vec![json!({"device": id, "from": onset, "to": end, "label": 1})]);
    assert_eq!(api.get_json::<Vec<Value>>("/api/v1/alerts?acked=false").await.unwrap().len(), 0);
    assert_eq!(api.get_json::<Vec<Value>>("/api/v1/alerts?acked=true").await.unwrap().len(), 1);
    // A second look changes the verdict, and the label with it.
    let (status, _) = api.post_json(&format!("/api/v1/alerts/{id}/1/ack"), &json!({"verdict": false})).await.unwrap();
    assert_eq!(status, 200);
    let labels: Vec<Value> = api.get_json("/api/v1/labels").await.unwrap();
    assert_eq!(labels, vec![json!({"device": id, "from": onset, "to": end, "label": 0})]);
    let (status, body) =
        api.post_json(&format!("/api/v1/alerts/{id}/1/ack"), &json!({"verdict": "yes"})).await.unwrap();
    assert_eq!(status, 400, "{body}");
    // The class's drift trigger fires, having measured a window over the alert's onset against the model
    // that raised it: the alert is served as explained by drift (and stays stored as the device sent it).
    assert!(a.get("drift").is_none(), "{a}");
    assert!(api.get_json::<Vec<Value>>("/api/v1/alerts?drift=true").await.unwrap().is_empty());
    let sha = cp.learning.models.list().unwrap().into_iter().find(|m| m.name == "ms").unwrap().sha256;
    let drift = |from_ms: u64, to_ms: u64, job: u64| edgeloop_control_plane::ml::TriggerEvent {
        class: CLASS.into(),
        at_ms: edgeloop_common::unix_millis(),
        cause: edgeloop_control_plane::ml::Cause::Drift { feature: "pm25_mean".into(), psi: 0.4, threshold: 0.25 },
        job: Some(job),
        error: None,
        drifted: Some(edgeloop_control_plane::ml::DriftedWindow { from_ms, to_ms, model_sha256: sha.clone() }),
    };
    // A window after the alert explains nothing.
    cp.learning.record_trigger(drift(end + 1, end + 1000, 8));
    assert!(api.get_json::<Vec<Value>>("/api/v1/alerts?drift=true").await.unwrap().is_empty());
    cp.learning.record_trigger(drift(onset - 1000, end, 9));
    let explained: Vec<Value> = api.get_json("/api/v1/alerts?drift=true").await.unwrap();
    assert_eq!(explained.len(), 1, "{explained:?}");
    assert_eq!(explained[0]["drift"]["feature"], "pm25_mean", "{}", explained[0]);
    assert_eq!((explained[0]["drift"]["psi"].as_f64(), explained[0]["drift"]["job"].as_u64()), (Some(0.4), Some(9)));
    assert!(api.get_json::<Vec<Value>>("/api/v1/alerts?drift=false").await.unwrap().is_empty());
    let one: Value = api.get_json(&format!("/api/v1/alerts/{id}/1")).await.unwrap();
    assert_eq!(one["drift"]["job"], 9, "{one}");
    assert_eq!(api.get("/api/v1/alerts?drift=maybe").await.unwrap().0, 400);

    // The dashboard shows it on the device's page, with the drift that explains it.
    let (status, page) = api.get(&format!("/devices/{id}")).await.unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("alert 1 on pm25") && page.contains("a false alarm"), "{page}");
    assert!(page.contains("most likely drift, not a fault") && page.contains("retraining in job 9"), "{page}");

    fleet_cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

/// A device raises an alert while the control plane is away; it arrives when the device reconnects, before
/// the backlog of telemetry it was raised in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_raised_offline_arrives_after_reconnecting() {
    let dir = tempfile::tempdir().unwrap();
    let class = edgeloop_simulators::class_config(CLASS).unwrap();
    let for_cp = class.clone();
    let cp_dir = dir.path().join("cp-data");
    let (cp, cp_cancel) = start_cp(&cp_dir, {
        let for_cp = for_cp.clone();
        move |c| {
            c.rollouts.tick_ms = 50;
            c.classes.insert(for_cp.class.clone(), for_cp);
        }
    })
    .await;
    let api = crate::support::api(&cp);
    let fleet_cancel = CancellationToken::new();
    let mut devices =
        fleet_for(CLASS, &api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), 1, 0, &fleet_cancel).await;
    let d = &mut devices[0];
    run_reference_model(&api, &class, d).await;
    let outbox = d.agent.outbox.clone();
    wait_for("calm readings stored", Duration::from_secs(30), || outbox.stats().depth == 0).await;

    // The control plane stops; the device raises an alert and piles up telemetry meanwhile.
    let mqtt: std::net::SocketAddr = format!("{}:{}", cp.mqtt_addr.0, cp.mqtt_addr.1).parse().unwrap();
    cp_cancel.cancel();
    cp.join().await.unwrap();
    send(d, 20, 1000.0).await;
    send(d, 2000, 0.0).await;
    wait_for("the backlog", Duration::from_secs(30), || outbox.stats().durable_seq >= 2000).await;

    // Back on the same address and data: the alert comes, closed, with every record.
    let (cp, cp_cancel) = start_cp(&cp_dir, move |c| {
        c.rollouts.tick_ms = 50;
        c.broker = edgeloop_control_plane::config::BrokerConfig::Embedded { listen: mqtt };
        c.classes.insert(for_cp.class.clone(), for_cp);
    })
    .await;
    let api = crate::support::authorize_from_file(Api::new(cp.api_addr), &cp_dir.join("cp/admin.token")).await;
    let mut alerts = Vec::new();
    for _ in 0..600 {
        alerts = api.get_json::<Vec<Value>>("/api/v1/alerts").await.unwrap();
        if alerts.iter().any(|a| a["open"] == false) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!((alerts[0]["id"].as_u64(), alerts[0]["open"].as_bool()), (Some(1), Some(false)));
    wait_for("the backlog stored", Duration::from_secs(60), || outbox.stats().depth == 0).await;

    fleet_cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
