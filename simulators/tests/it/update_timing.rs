//! Updates and time, end to end: a canary that goes silent mid-install times out and the rollout goes on
//! without it; a device outside its maintenance window is not sent its state, and the API says when the
//! window opens; a rollout may be scheduled.

use crate::support::{start_cp, wait_for};
use edgeloop_common::update::Phase;
use edgeloop_control_plane::rollout::config::WindowConfig;
use edgeloop_control_plane::rollout::engine::Waiting;
use edgeloop_control_plane::rollout::window::Opening;
use edgeloop_control_plane::rollout::{State, WindowView};
use edgeloop_control_plane::web::DeviceView;
use edgeloop_simulators::fleet::{self, FleetSpec, SimDevice};
use edgeloop_simulators::http::Api;
use edgeloop_simulators::proxy::{FaultProxy, Mode};
use edgeloop_simulators::{class_config, rollouts};
use serde_json::json;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CLASS: &str = "city-air-quality";

/// `n` agents that trust the control plane at `api` and download artifacts from `artifacts`.
pub(crate) async fn agents(
    api: &Api,
    mqtt: (String, u16),
    root: &std::path::Path,
    n: usize,
    artifacts: String,
) -> Vec<SimDevice> {
    let mut updates = rollouts::updater_config(api).await.unwrap();
    updates.artifact_base = artifacts;
    let mut spec = FleetSpec::new(vec![class_config(CLASS).unwrap()], mqtt, root, updates.trusted[0].clone());
    spec.customise = Arc::new(move |c| c.updates = Some(updates.clone()));
    spec.enroll_with(api, n).await.unwrap();
    fleet::start(&spec, n, &CancellationToken::new()).await.unwrap()
}

/// Feeds every device not in `silent` until `stop` fires.
fn feed(
    mut devices: Vec<SimDevice>,
    silent: Arc<Mutex<HashSet<String>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<SimDevice>> {
    tokio::spawn(async move {
        let per_tick = move |d: &SimDevice| {
            if silent.lock().unwrap().contains(&d.agent.device) {
                0
            } else {
                10
            }
        };
        fleet::feed_ticks(&mut devices, &per_tick, None, &stop, &mut |_, _| {}).await.unwrap();
        devices
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_silent_mid_install_times_out_and_the_rollout_completes_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |c| {
        c.rollouts.tick_ms = 50;
        c.ingest.offline_after_secs = 3;
    })
    .await;
    let api = &crate::support::api(&cp);
    let class = class_config(CLASS).unwrap();
    let good = rollouts::upload_reference_model(api, CLASS, &class, 1e9).await.unwrap();
    // Artifacts come through a proxy that swallows requests at first: the canary is stuck downloading.
    let net = CancellationToken::new();
    let proxy = FaultProxy::start(cp.api_addr, net.clone()).await.unwrap();
    proxy.set_mode(Mode::Blackhole);
    let devices =
        agents(api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), 4, format!("http://{}", proxy.addr())).await;
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    let stops: Vec<(String, CancellationToken)> =
        devices.iter().map(|d| (d.agent.device.clone(), d.cancel.clone())).collect();
    let silent = Arc::new(Mutex::new(HashSet::new()));
    let stop_feed = CancellationToken::new();
    let feeding = feed(devices, silent.clone(), stop_feed.clone());
    wait_for("all devices registered", Duration::from_secs(20), || {
        ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| d.class == CLASS))
    })
    .await;

    let req = json!({
        "model": CLASS, "version": 1,
        "stages": [
            {"name": "canary", "share": {"count": 1}, "bake_secs": 0},
            {"name": "all", "share": {"percent": 100.0}, "bake_secs": 0},
        ],
        "timeouts": {"install_secs": 8, "stage_secs": 0, "on_timeout": "skip"},
    });
    let r = rollouts::create(api, &req).await.unwrap();
    let v = rollouts::wait(api, &r.id, Duration::from_secs(30), |v| {
        v.devices.values().any(|t| t.phase == Some(Phase::Downloading))
    })
    .await
    .unwrap();
    let canary = v.devices.keys().next().unwrap().clone();
    // The canary goes silent mid-download: its agent stops, nothing more comes from it.
    silent.lock().unwrap().insert(canary.clone());
    stops.iter().find(|(id, _)| *id == canary).unwrap().1.cancel();
    proxy.set_mode(Mode::Pass);

    let done = rollouts::wait(api, &r.id, Duration::from_secs(90), |v| v.state == State::Completed).await.unwrap();
    assert_eq!(done.phases.get("timed_out"), Some(&1), "{:?}", done.phases);
    assert_eq!(done.phases.get("applied"), Some(&3), "{:?}", done.phases);
    let t = &done.devices[&canary];
    assert!(t.timed_out() && !t.failed() && !t.online, "{t:?}");
    let failed = done.gates.iter().find(|g| g.gate == "failed_installs").unwrap();
    assert_eq!((failed.value, failed.ok), (Some(0.0), true), "a timeout is no failed install");
    assert!(done.events.iter().any(|e| e.what.contains("timed out") && e.what.contains(&canary)), "{:?}", done.events);
    for id in ids.iter().filter(|id| **id != canary) {
        let u = cp.registry.get(id).unwrap().latest_update().cloned().unwrap();
        assert_eq!((u.phase, u.active_sha256.as_deref()), (Phase::Applied, Some(good.sha256.as_str())), "{id}");
    }

    // An operator retries the device that ran out of time: it is sent the model again under a new sequence,
    // and no longer counts as timed out.
    let seq_before = cp.rollouts.issued(&canary).unwrap().unwrap().seq;
    let (status, body) = api.post_json(&format!("/api/v1/rollouts/{}/retry", r.id), &json!({})).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v = rollouts::wait(api, &r.id, Duration::from_secs(10), |v| {
        v.devices[&canary].sent_ms.is_some_and(|t| t > 0) && !v.devices[&canary].timed_out()
    })
    .await
    .unwrap();
    assert_eq!(v.phases.get("timed_out"), None, "{:?}", v.phases);
    assert!(cp.rollouts.issued(&canary).unwrap().unwrap().seq > seq_before);
    // Denying a rollout that awaits no approval is a 409.
    let (status, body) = api.post_json(&format!("/api/v1/rollouts/{}/deny", r.id), &json!({})).await.unwrap();
    assert_eq!(status, 409, "{body}");
    // Archived once it has ended: out of the list, still readable, and listed on request.
    let del = api.request("DELETE", &format!("/api/v1/rollouts/{}", r.id), &[], None).await.unwrap();
    assert_eq!(del.status, 200, "{}", del.text());
    let listed: Vec<serde_json::Value> = api.get_json("/api/v1/rollouts").await.unwrap();
    assert!(listed.iter().all(|v| v["id"] != r.id.as_str()));
    let all: Vec<serde_json::Value> = api.get_json("/api/v1/rollouts?archived=true").await.unwrap();
    assert!(all.iter().any(|v| v["id"] == r.id.as_str() && v["archived"] == true));
    let live = rollouts::create(api, &json!({"model": CLASS, "version": 1, "start_at": "2099-01-01T00:00:00Z"}))
        .await
        .unwrap();
    let del = api.request("DELETE", &format!("/api/v1/rollouts/{}", live.id), &[], None).await.unwrap();
    assert_eq!(del.status, 409, "{}", del.text());
    assert!(del.text().contains("cannot archive a rollout that is scheduled"), "{}", del.text());
    let tags: serde_json::Value = api.get_json(&format!("/api/v1/devices/{canary}/tags")).await.unwrap();
    assert_eq!(tags, json!({"tags": []}));

    stop_feed.cancel();
    let devices = feeding.await.unwrap();
    for (_, stop) in &stops {
        stop.cancel();
    }
    for d in devices {
        d.agent.join().await.unwrap();
    }
    net.cancel();
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_hold_desired_states_and_the_api_says_when_they_open() {
    // A daily one-hour window twelve hours from now: closed for the whole test.
    let hour = (jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC).hour() + 12) % 24;
    let window = WindowConfig {
        name: "night".into(),
        class: Some(CLASS.into()),
        tag: None,
        weekly: vec![format!("daily {hour:02}:00-{:02}:00", (hour + 1) % 24)],
        time_zone: "UTC".into(),
    };
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |c| {
        c.rollouts.tick_ms = 50;
        c.rollouts.windows.push(window);
    })
    .await;
    let api = &crate::support::api(&cp);
    let class = class_config(CLASS).unwrap();
    rollouts::upload_reference_model(api, CLASS, &class, 1e9).await.unwrap();
    let devices = agents(api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), 2, api.base_url().to_string()).await;
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    let stop_feed = CancellationToken::new();
    let feeding = feed(devices, Arc::new(Mutex::new(HashSet::new())), stop_feed.clone());
    wait_for("all devices registered", Duration::from_secs(20), || {
        ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| d.class == CLASS))
    })
    .await;

    // The API shows the window and when it opens, for the window and for each device under it.
    let windows: Vec<WindowView> = api.get_json("/api/v1/windows").await.unwrap();
    let Opening::Closed { opens_ms } = windows[0].now else { panic!("{:?}", windows[0].now) };
    let now = edgeloop_common::unix_millis();
    assert!(opens_ms > now + 10 * 3600 * 1000 && opens_ms <= now + 13 * 3600 * 1000, "{opens_ms} from {now}");
    let d: DeviceView = api.get_json(&format!("/api/v1/devices/{}", ids[0])).await.unwrap();
    assert_eq!(d.window, Opening::Closed { opens_ms });

    let req = json!({"model": CLASS, "version": 1, "stages": [{"name": "all", "share": {"percent": 100.0}}]});
    let r = rollouts::create(api, &req).await.unwrap();
    let v = rollouts::wait(api, &r.id, Duration::from_secs(10), |v| matches!(v.waiting, Some(Waiting::Window { .. })))
        .await
        .unwrap();
    assert_eq!(v.waiting, Some(Waiting::Window { devices: 2, opens_ms: Some(opens_ms) }));
    assert_eq!(v.phases.get("awaiting_window"), Some(&2), "{:?}", v.phases);
    // Nothing was issued to the devices, and the dashboard says when the window opens.
    for id in &ids {
        assert!(cp.rollouts.issued(id).unwrap().is_none(), "{id} was sent a desired state outside its window");
    }
    let (status, page) = api.get(&format!("/rollouts/{}", r.id)).await.unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("wait for their maintenance window; the next opens at"), "{page}");
    let (status, page) = api.get(&format!("/devices/{}", ids[0])).await.unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("Maintenance window") && page.contains("next opens"), "{page}");

    // A scheduled rollout waits for its time; a bad time is refused, naming the field.
    let at = jiff::Timestamp::from_millisecond((now + 3600 * 1000) as i64).unwrap();
    let scheduled =
        rollouts::create(api, &json!({"model": CLASS, "version": 1, "start_at": at.to_string()})).await.unwrap();
    assert_eq!(scheduled.state, State::Scheduled);
    assert_eq!(scheduled.waiting, Some(Waiting::Start { at_ms: now + 3600 * 1000 }));
    let (status, body) = api
        .post_json("/api/v1/rollouts", &json!({"model": CLASS, "version": 1, "start_at": "tomorrow"}))
        .await
        .unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("start_at: `tomorrow` is not an RFC 3339 time"), "{body}");

    stop_feed.cancel();
    let devices = feeding.await.unwrap();
    for d in devices {
        d.cancel.cancel();
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
