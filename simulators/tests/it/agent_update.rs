//! The agent updates itself, with real processes under a supervisor this test runs the way systemd's
//! `Restart=` would: an upgrade to a build that differs only in its version string, a build that crashes at
//! start and one that hangs, each given up by itself, and a tampered build that is refused.

use crate::support::{start_cp, wait_for};
use edgeloop_agent::updater::agent::{AgentFiles, RESTART_EXIT_CODE};
use edgeloop_common::update::{Component, Failure, Phase, UpdateReport};
use edgeloop_control_plane::rollout::State;
use edgeloop_control_plane::ControlPlaneHandle;
use edgeloop_simulators::http::Api;
use edgeloop_simulators::rollouts;
use edgeloop_simulators::supervisor::{stamp, Supervisor};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CLASS: &str = "probe";
const PROBE: &str =
    "class = \"probe\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1\n[uplink]\nheartbeat_secs = 1\n";

/// A build stamped `version` from the workspace's agent binary, in `dir` as `name`.
fn build(dir: &Path, name: &str, version: &str) -> (PathBuf, Vec<u8>) {
    let path = dir.join(name);
    let bytes = stamp(&crate::support::binary("edgeloop-agent"), &path, version).unwrap();
    (path, bytes)
}

async fn publish(api: &Api, version: &str, binary: &[u8]) -> serde_json::Value {
    let path = format!(
        "/api/v1/agent-releases?class={CLASS}&arch={}&version={}",
        std::env::consts::ARCH,
        version.replace('+', "%2B")
    );
    let r = api.request("POST", &path, &[], Some(binary)).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    serde_json::from_str(&r.text()).unwrap()
}

fn heartbeat_version(cp: &ControlPlaneHandle, id: &str) -> Option<String> {
    cp.registry.get(id).and_then(|d| d.last_status.and_then(|s| s.agent_version))
}

fn latest_agent_report(cp: &ControlPlaneHandle, id: &str) -> Option<UpdateReport> {
    cp.registry.get(id).and_then(|d| d.updates.iter().rev().find(|u| u.component == Component::Agent).cloned())
}

async fn roll_out(api: &Api, number: u64) -> String {
    let req = json!({
        "class": CLASS, "agent": number, "health_secs": 3,
        "stages": [{"name": "all", "share": {"percent": 100.0}, "bake_secs": 0}],
    });
    rollouts::create(api, &req).await.unwrap().id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_upgrades_itself_goes_back_from_a_crashing_or_hanging_build_and_refuses_a_tampered_one() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |c| c.rollouts.tick_ms = 50).await;
    let api = &crate::support::api(&cp);
    let site = dir.path().join("site");
    std::fs::create_dir_all(site.join("bin")).unwrap();
    let v1 = edgeloop_agent::version::build();
    let (installed, _) = build(&site.join("bin"), "edgeloop-agent", &v1);
    let v2 = format!("{v1}+v2");
    let (_, v2_bytes) = build(dir.path(), "agent-v2", &v2);
    std::fs::write(site.join("probe.toml"), PROBE).unwrap();
    let token = edgeloop_simulators::device::enrollment_token(api, CLASS, 1).await.unwrap();
    std::fs::write(site.join("probe.enroll"), token).unwrap();
    let config = site.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"upd-1\"\nclass_config = \"probe.toml\"\n[mqtt]\nurl = \"mqtt://{}:{}\"\nreconnect_max_ms = 500\n\
             [storage]\ndata_dir = \"data\"\n[identity]\nenroll_url = \"{}\"\nenrollment_token_file = \"probe.enroll\"\n\
             [updates]\nartifact_base_url = \"{}\"\n[[trusted_keys]]\npublic_key = \"{}\"\n",
            cp.mqtt_addr.0,
            cp.mqtt_addr.1,
            api.base_url(),
            api.base_url(),
            edgeloop_common::signing::hex(&cp.trusted_key.public_key)
        ),
    )
    .unwrap();
    let log = site.join("agent.log");
    let sup = Supervisor::start(installed, config.clone(), log.clone());
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("the installed build's heartbeat", Duration::from_secs(60), || {
        heartbeat_version(&cp, "upd-1").as_deref() == Some(v1.as_str())
    })
    .await;

    // 1. An upgrade to a build that differs only in its version string.
    let r1 = publish(api, &v2, &v2_bytes).await;
    assert_eq!((r1["number"].as_u64(), r1["arch"].as_str()), (Some(1), Some(std::env::consts::ARCH)));
    let v2_sha = r1["sha256"].as_str().unwrap().to_string();
    let id = roll_out(api, 1).await;
    let done = rollouts::wait(api, &id, Duration::from_secs(120), |v| v.state == State::Completed).await;
    let done = done.unwrap_or_else(|e| panic!("{e}\n{}", read_log()));
    assert_eq!(done.phases.get("applied"), Some(&1), "{:?}", done.phases);
    wait_for("the new build's heartbeat", Duration::from_secs(30), || {
        heartbeat_version(&cp, "upd-1").as_deref() == Some(v2.as_str())
    })
    .await;
    let files = AgentFiles::new(&site.join("data"));
    let p = files.load_pointer().unwrap();
    assert_eq!(p.good.as_ref().map(|g| g.sha256.as_str()), Some(v2_sha.as_str()), "{p:?}");
    assert!(p.trial.is_none());
    assert!(sup.exits().contains(&i32::from(RESTART_EXIT_CODE)), "{:?}", sup.exits());
    let u = latest_agent_report(&cp, "upd-1").unwrap();
    assert_eq!((u.phase, u.sha256.as_str()), (Phase::Applied, v2_sha.as_str()));

    // 2. A build that passes its self-test and then crashes at every start: after three starts the next one
    // goes back to the last good build by itself, and the rollout stops.
    let broken = b"#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = self-test ] && exit 0; done\necho crashing >&2\nexit 3\n";
    let r2 = publish(api, "0.0.0-broken", broken).await;
    let id = roll_out(api, r2["number"].as_u64().unwrap()).await;
    let stopped = rollouts::wait(api, &id, Duration::from_secs(120), |v| {
        matches!(v.state, State::Paused { .. } | State::RolledBack { .. })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", read_log()));
    // It breached the failed-installs gate; rolled back, the device is pointed at the last good build again.
    assert!(stopped.events.iter().any(|e| e.what.contains("failed_installs")), "{:?}", stopped.events);
    wait_for("the revert report", Duration::from_secs(30), || {
        cp.registry
            .get("upd-1")
            .is_some_and(|d| d.updates.iter().any(|u| u.component == Component::Agent && u.phase == Phase::Reverted))
    })
    .await;
    let d = cp.registry.get("upd-1").unwrap();
    let reverted =
        d.updates.iter().rev().find(|u| u.component == Component::Agent && u.phase == Phase::Reverted).unwrap();
    assert_eq!(reverted.failure, Some(Failure::Misbehaved));
    assert!(
        reverted.reason.contains("stopped before proving itself 3 times") && reverted.reason.contains(&v2),
        "{}",
        reverted.reason
    );
    assert_eq!(sup.exits().iter().filter(|&&c| c == 3).count(), 3, "{:?}", sup.exits());
    wait_for("the good build running again", Duration::from_secs(30), || {
        heartbeat_version(&cp, "upd-1").as_deref() == Some(v2.as_str())
    })
    .await;

    // 3. A build that passes its self-test and then hangs: the trial watchdog gives it up after twice its
    // health watch plus 10 s, and the good build comes back.
    let hangs = b"#!/bin/sh\nfor a in \"$@\"; do [ \"$a\" = self-test ] && exit 0; done\nexec sleep 600\n";
    let r = publish(api, "0.0.0-hangs", hangs).await;
    let hang_sha = r["sha256"].as_str().unwrap().to_string();
    let id = roll_out(api, r["number"].as_u64().unwrap()).await;
    rollouts::wait(api, &id, Duration::from_secs(120), |v| {
        matches!(v.state, State::Paused { .. } | State::RolledBack { .. })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", read_log()));
    wait_for("the hung build given up", Duration::from_secs(30), || {
        cp.registry.get("upd-1").is_some_and(|d| {
            d.updates.iter().any(|u| {
                u.sha256 == hang_sha
                    && u.phase == Phase::Reverted
                    && u.reason.contains("did not prove itself within 16 s")
            })
        })
    })
    .await;
    wait_for("the good build running again", Duration::from_secs(30), || {
        heartbeat_version(&cp, "upd-1").as_deref() == Some(v2.as_str())
    })
    .await;

    // 4. A tampered build: the binary on the server is not what the release signs. Refused, nothing swapped.
    let v3 = format!("{v1}+v3");
    let (_, v3_bytes) = build(dir.path(), "agent-v3", &v3);
    let r3 = publish(api, &v3, &v3_bytes).await;
    let artifact = dir.path().join("cp").join("artifacts").join(r3["sha256"].as_str().unwrap());
    let mut bytes = std::fs::read(&artifact).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&artifact, &bytes).unwrap();
    let exits_before = sup.exits().len();
    let v3_sha = r3["sha256"].as_str().unwrap().to_string();
    let id = roll_out(api, r3["number"].as_u64().unwrap()).await;
    let stopped = rollouts::wait(api, &id, Duration::from_secs(60), |v| {
        matches!(v.state, State::Paused { .. } | State::RolledBack { .. })
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", read_log()));
    assert!(stopped.events.iter().any(|e| e.what.contains("failed_installs")), "{:?}", stopped.events);
    let d = cp.registry.get("upd-1").unwrap();
    let u = d.updates.iter().rev().find(|u| u.component == Component::Agent && u.sha256 == v3_sha).unwrap();
    assert_eq!((u.phase, u.failure), (Phase::Failed, Some(Failure::Integrity)), "{u:?}");
    assert!(u.reason.contains("the release signs"), "{}", u.reason);
    assert_eq!(sup.exits().len(), exits_before, "a refused build restarts nothing");
    assert_eq!(heartbeat_version(&cp, "upd-1").as_deref(), Some(v2.as_str()));
    assert!(!files.binary(r3["sha256"].as_str().unwrap()).exists());

    // A SIGTERM stops the running build cleanly.
    let exits = sup.exits.clone();
    sup.stop();
    assert_eq!(exits.lock().unwrap().last(), Some(&0), "{}", read_log());
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
