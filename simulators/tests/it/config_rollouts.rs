//! Class configurations end to end: one published from `firmware-configs/`, rolled out across a fleet, that
//! changes batching, the heartbeat and the outbox bound on running agents without losing a record; and a bad
//! one that the canary applies, finds unhealthy and reverts, which stops the rollout at its canary.

use crate::support::{assert_gap_free, start_cp, stored_seqs, wait_for};
use crate::update_timing::agents;
use edgeloop_common::update::{Component, Failure, Phase};
use edgeloop_control_plane::rollout::engine::Kind;
use edgeloop_control_plane::rollout::State;
use edgeloop_simulators::fleet::{self, SimDevice};
use edgeloop_simulators::http::Api;
use edgeloop_simulators::{rollouts, FIRMWARE_CONFIGS};
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CLASS: &str = "city-air-quality";

/// The class file as shipped in `firmware-configs/`.
fn class_text() -> String {
    FIRMWARE_CONFIGS.iter().find(|(f, _)| *f == format!("{CLASS}.toml")).unwrap().1.to_string()
}

/// Publishes a class file's text through the API; returns the status and the body as JSON.
async fn publish(api: &Api, text: &str) -> (u16, serde_json::Value) {
    let r =
        api.request("POST", "/api/v1/configs?source=city-air-quality.toml", &[], Some(text.as_bytes())).await.unwrap();
    (r.status, serde_json::from_str(&r.text()).unwrap())
}

/// Feeds each device `per_tick(device)` samples every 100 ms until `stop` fires.
fn feed(
    mut devices: Vec<SimDevice>,
    per_tick: impl Fn(&SimDevice) -> usize + Send + Sync + 'static,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<SimDevice>> {
    tokio::spawn(async move {
        fleet::feed_ticks(&mut devices, &per_tick, None, &stop, &mut |_, _| {}).await.unwrap();
        devices
    })
}

async fn stop_all(devices: Vec<SimDevice>) {
    for d in devices {
        d.cancel.cancel();
        d.agent.join().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_configuration_rolls_out_across_the_fleet_and_changes_batching_in_place_losing_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |c| c.rollouts.tick_ms = 50).await;
    let api = &crate::support::api(&cp);
    let devices = agents(api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), 4, api.base_url().to_string()).await;
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    let stop_feed = CancellationToken::new();
    let feeding = feed(devices, |_| 10, stop_feed.clone());
    wait_for("all devices registered", Duration::from_secs(20), || {
        ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| d.class == CLASS))
    })
    .await;

    // Publish: smaller batches, a faster heartbeat, half the outbox. A bad file is refused, naming its key; the
    // same text twice is one version.
    let shipped = class_text();
    let tuned = shipped
        .replace("batch_max_records = 100", "batch_max_records = 7")
        .replace("heartbeat_secs = 30", "heartbeat_secs = 2")
        .replace("max_bytes = 16777216", "max_bytes = 8388608");
    assert_ne!(tuned, shipped);
    let (status, bad) = publish(api, &shipped.replace("batch_max_records = 100", "batch_max_records = 0")).await;
    assert_eq!(status, 400, "{bad}");
    assert!(bad["detail"].as_str().unwrap().contains("uplink.batch_max_records"), "{bad}");
    let (status, v1) = publish(api, &tuned).await;
    assert_eq!((status, v1["version"].as_u64()), (201, Some(1)), "{v1}");
    assert_eq!(v1["uplink"]["batch_max_records"], 7);
    let (status, again) = publish(api, &tuned).await;
    assert_eq!((status, again["version"].as_u64()), (200, Some(1)), "{again}");
    let listed: Vec<serde_json::Value> = api.get_json(&format!("/api/v1/configs?class={CLASS}")).await.unwrap();
    assert_eq!(listed.len(), 1);

    // Roll it out: a canary, then everyone.
    let req = json!({
        "class": CLASS, "config": 1, "health_secs": 2,
        "stages": [
            {"name": "canary", "share": {"count": 1}, "bake_secs": 0},
            {"name": "all", "share": {"percent": 100.0}, "bake_secs": 0},
        ],
    });
    let r = rollouts::create(api, &req).await.unwrap();
    assert_eq!(r.kind, Kind::Config);
    let done = rollouts::wait(api, &r.id, Duration::from_secs(60), |v| v.state == State::Completed).await.unwrap();
    assert_eq!(done.phases.get("applied"), Some(&4), "{:?}", done.phases);
    for id in &ids {
        let d = cp.registry.get(id).unwrap();
        let u = d.updates.iter().rev().find(|u| u.component == Component::Config).unwrap();
        assert_eq!((u.phase, u.sha256.as_str()), (Phase::Applied, v1["sha256"].as_str().unwrap()), "{id}");
    }

    stop_feed.cancel();
    let mut devices = feeding.await.unwrap();
    // The running agents follow it: the class in force, the outbox bound, and batches of at most 7 records.
    for d in &devices {
        assert_eq!(d.agent.class.borrow().uplink.batch_max_records, 7, "{}", d.agent.device);
        assert_eq!(d.agent.class.borrow().uplink.heartbeat_secs, 2, "{}", d.agent.device);
        assert_eq!(d.agent.outbox.max_bytes(), 8_388_608, "{}", d.agent.device);
    }
    fleet::drain(&devices, Duration::from_secs(30)).await;
    let d = &mut devices[0];
    let before = d.agent.counters.batches_sent.load(Ordering::Relaxed);
    for s in d.generator.take(140) {
        d.samples.send(s).await.unwrap();
        d.sent += 1;
    }
    fleet::drain(&devices, Duration::from_secs(30)).await;
    let batches = devices[0].agent.counters.batches_sent.load(Ordering::Relaxed) - before;
    assert!(batches >= 20, "140 records went in {batches} batches; at most 7 a batch needs 20 or more");
    // Nothing was lost on the way: every record each device made is stored, once.
    for d in &devices {
        let last = d.agent.outbox.stats().durable_seq;
        assert!(last > 0);
        assert_eq!(d.agent.outbox.stats().dropped_total, 0, "{}", d.agent.device);
        assert_gap_free(&d.agent.device, &stored_seqs(api, &d.agent.device).await, last);
    }
    stop_all(devices).await;
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_that_drops_records_is_reverted_by_the_canary_and_goes_no_further() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |c| c.rollouts.tick_ms = 50).await;
    let api = &crate::support::api(&cp);
    let devices = agents(api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), 3, api.base_url().to_string()).await;
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    // Quiet until the canary runs the new configuration; then a burst on the canary only.
    let burst: Arc<Mutex<HashSet<String>>> = Arc::default();
    let burst2 = burst.clone();
    let stop_feed = CancellationToken::new();
    let feeding = feed(
        devices,
        move |d| if burst2.lock().unwrap().contains(&d.agent.device) { 300 } else { 0 },
        stop_feed.clone(),
    );
    wait_for("all devices registered", Duration::from_secs(20), || {
        ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| d.class == CLASS))
    })
    .await;
    // A valid class file whose outbox holds 1 KiB: under any real load it drops records.
    let (status, v1) = publish(api, &class_text().replace("max_bytes = 16777216", "max_bytes = 1024")).await;
    assert_eq!(status, 201, "{v1}");
    let req = json!({
        "class": CLASS, "config": 1, "health_secs": 60,
        "stages": [
            {"name": "canary", "share": {"count": 1}, "bake_secs": 0},
            {"name": "all", "share": {"percent": 100.0}, "bake_secs": 0},
        ],
    });
    let r = rollouts::create(api, &req).await.unwrap();
    let watching = rollouts::wait(api, &r.id, Duration::from_secs(30), |v| {
        v.devices.values().any(|t| t.phase == Some(Phase::Watching))
    })
    .await
    .unwrap();
    let canary = watching.devices.keys().next().unwrap().clone();
    burst.lock().unwrap().insert(canary.clone());

    // The canary drops records under it, reverts at once and says why; the rollout stops at its canary.
    let stopped = rollouts::wait(api, &r.id, Duration::from_secs(30), |v| {
        matches!(v.state, State::Paused { .. } | State::RolledBack { .. })
    })
    .await
    .unwrap();
    assert!(matches!(stopped.state, State::Paused { .. } | State::RolledBack { .. }), "{:?}", stopped.state);
    assert_eq!(stopped.devices.len(), 1, "only the canary was sent it: {:?}", stopped.devices.keys());
    let t = &stopped.devices[&canary];
    assert!(t.failed() && t.phase == Some(Phase::Reverted), "{t:?}");
    let u = cp
        .registry
        .get(&canary)
        .unwrap()
        .updates
        .iter()
        .rev()
        .find(|u| u.component == Component::Config)
        .cloned()
        .unwrap();
    assert_eq!((u.phase, u.failure), (Phase::Reverted, Some(Failure::Misbehaved)));
    assert!(u.reason.contains("dropped") && u.reason.contains("the class file's restored"), "{}", u.reason);

    stop_feed.cancel();
    let devices = feeding.await.unwrap();
    for d in &devices {
        // Every device runs the class file's configuration: the canary by reverting, the rest untouched.
        assert_eq!(d.agent.class.borrow().outbox.max_bytes, 16_777_216, "{}", d.agent.device);
        assert_eq!(d.agent.outbox.max_bytes(), 16_777_216, "{}", d.agent.device);
    }
    stop_all(devices).await;
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

#[test]
fn the_cli_publishes_class_files_and_agent_builds_into_a_stopped_control_planes_store() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cp = crate::support::binary("edgeloop-control-plane");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&cp).current_dir(d).args(args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert_eq!(run(&["keys", "generate", "--out", "signing.key"]).0, Some(0));
    std::fs::write(
        d.join("cp.toml"),
        "data_dir = \"cp\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\n[api]\nlisten = \"127.0.0.1:1\"\n\
         [rollouts]\nsigning_key = \"signing.key\"\n[tls]\nplaintext = true\n",
    )
    .unwrap();
    std::fs::write(d.join("city-air-quality.toml"), class_text()).unwrap();
    std::fs::write(d.join("bad.toml"), class_text().replace("batch_max_records = 100", "batch_max_records = 0"))
        .unwrap();
    std::fs::write(d.join("agent.bin"), b"\x7fELF a build").unwrap();

    let (code, out, err) = run(&["configs", "publish", "-c", "cp.toml", "city-air-quality.toml"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("published as city-air-quality v1"), "{out}");
    let (_, out, _) = run(&["configs", "publish", "-c", "cp.toml", "city-air-quality.toml"]);
    assert!(out.contains("unchanged: already city-air-quality v1"), "{out}");
    let (code, _, err) = run(&["configs", "publish", "-c", "cp.toml", "bad.toml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("bad.toml") && err.contains("uplink.batch_max_records"), "{err}");
    let agent = ["agent-releases", "publish", "-c", "cp.toml", "--class", CLASS, "--version", "0.2.0"];
    let (code, out, err) = run(&[&agent[..], &["--arch", "aarch64", "agent.bin"]].concat());
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&format!("published as {CLASS} #1 for aarch64")), "{out}");
    let (code, _, err) = run(&[&agent[..], &["--arch", "arm 64", "agent.bin"]].concat());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("arch: `arm 64`"), "{err}");

    // What the store holds: one configuration version, signed, and one release whose binary is an artifact.
    let db = edgeloop_common::durable::DurableDb::open(&d.join("cp/store"), Default::default()).unwrap();
    let store = edgeloop_control_plane::rollout::store::RolloutStore::open(&db).unwrap();
    let configs = store.configs(Some(CLASS)).unwrap();
    assert_eq!(configs.iter().map(|c| c.version).collect::<Vec<_>>(), [1]);
    let releases = store.agent_releases(Some(CLASS)).unwrap();
    assert_eq!((releases.len(), releases[0].arch.as_str()), (1, "aarch64"));
    assert_eq!(std::fs::read(d.join("cp/artifacts").join(&releases[0].sha256)).unwrap(), b"\x7fELF a build");
}
