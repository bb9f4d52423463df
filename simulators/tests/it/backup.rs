//! Online backup and restore with the real commands: a control plane is backed up while a fleet streams into
//! it; the backup is restored into a new data directory; a control plane started there serves the same
//! devices, models, rollouts, operator tokens and signing key, and every record acknowledged before the
//! backup.

use crate::support::{binary, start_cp, wait_for};
use edgeloop_simulators::fleet::{self, FleetSpec};
use edgeloop_simulators::{class_config, rollouts};
use serde_json::json;
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CLASS: &str = "city-air-quality";

fn cp_toml(dir: &std::path::Path, data_dir: &str) -> std::path::PathBuf {
    let p = dir.join(format!("{data_dir}.toml"));
    std::fs::write(
        &p,
        format!("data_dir = \"{data_dir}\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\n[tls]\nplaintext = true\n"),
    )
    .unwrap();
    p
}

fn run(args: &[&str], config: &std::path::Path) -> (bool, String) {
    let out = Command::new(binary("edgeloop-control-plane")).args(args).arg("--config").arg(config).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_a_control_plane_that_serves_the_same_state() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |c| c.rollouts.tick_ms = 50).await;
    let api = crate::support::api(&cp);
    let class = class_config(CLASS).unwrap();
    let model = rollouts::upload_reference_model(&api, CLASS, &class, 1e9).await.unwrap();
    let updates = rollouts::updater_config(&api).await.unwrap();
    let mut spec = FleetSpec::new(vec![class], cp.mqtt_addr.clone(), &dir.path().join("fleet"), cp.trusted_key.clone());
    spec.customise = std::sync::Arc::new(move |c| c.updates = Some(updates.clone()));
    spec.enroll_with(&api, 3).await.unwrap();
    let cancel = CancellationToken::new();
    let mut devices = fleet::start(&spec, 3, &cancel).await.unwrap();
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    let stop_feed = CancellationToken::new();
    let feeding = {
        let stop = stop_feed.clone();
        tokio::spawn(async move {
            fleet::feed(&mut devices, 20, None, &stop, &mut |_, _| {}).await.unwrap();
            devices
        })
    };
    wait_for("the fleet registered", Duration::from_secs(30), || {
        ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| d.class == CLASS))
    })
    .await;
    let r = rollouts::create(
        &api,
        &json!({"model": CLASS, "version": 1, "stages": [{"name": "all", "share": {"percent": 100.0}}]}),
    )
    .await
    .unwrap();
    rollouts::wait(&api, &r.id, Duration::from_secs(60), |v| {
        v.state == edgeloop_control_plane::rollout::State::Completed
    })
    .await
    .unwrap();
    let (_, viewer) = edgeloop_control_plane::access::TokenStore::open(&dir.path().join("cp"))
        .unwrap()
        .create("grafana", edgeloop_control_plane::access::Role::Viewer)
        .unwrap();

    // The backup, requested from the running control plane while the fleet streams.
    let acked_before: Vec<u64> = ids.iter().map(|id| cp.store.watermark(id).unwrap()).collect();
    let out = dir.path().join("backup-1");
    let (ok, text) = run(&["backup", "--out", out.to_str().unwrap()], &cp_toml(dir.path(), "cp"));
    assert!(ok && text.contains("by the running control plane"), "{text}");
    let acked_after: Vec<u64> = ids.iter().map(|id| cp.store.watermark(id).unwrap()).collect();
    assert!(acked_after.iter().zip(&acked_before).all(|(a, b)| a >= b) && acked_after.iter().sum::<u64>() > 0);
    // A second backup into the same directory is refused, naming it.
    let (ok, text) = run(&["backup", "--out", out.to_str().unwrap()], &cp_toml(dir.path(), "cp"));
    assert!(!ok && text.contains("exists and is not empty"), "{text}");

    stop_feed.cancel();
    let devices = feeding.await.unwrap();
    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    let devices_then: Vec<String> = {
        let mut v: Vec<String> = cp.registry.list().into_iter().map(|d| d.id).collect();
        v.sort();
        v
    };
    let trusted_then = cp.trusted_key.clone();
    cp_cancel.cancel();
    cp.join().await.unwrap();

    // Restore into a new data directory; never over an existing store.
    let restored_toml = cp_toml(dir.path(), "restored");
    let (ok, text) = run(&["restore", "--from", out.to_str().unwrap()], &restored_toml);
    assert!(ok && text.contains("restored"), "{text}");
    let (ok, text) = run(&["restore", "--from", out.to_str().unwrap()], &restored_toml);
    assert!(!ok && text.contains("never overwrites a store"), "{text}");
    let (ok, text) =
        run(&["restore", "--from", dir.path().join("nothing").to_str().unwrap()], &cp_toml(dir.path(), "other"));
    assert!(!ok && text.contains("not a complete backup"), "{text}");

    let restored_dir = dir.path().join("restored");
    let (cp2, cancel2) = start_cp(dir.path(), move |c| c.data_dir = restored_dir).await;
    let api2 = crate::support::api(&cp2).with_token(&viewer);
    assert_eq!(cp2.trusted_key, trusted_then, "the same signing key");
    let mut devices_now: Vec<String> = cp2.registry.list().into_iter().map(|d| d.id).collect();
    devices_now.sort();
    assert_eq!(devices_now, devices_then);
    // Every record acknowledged before the backup was requested is there, and each watermark's records too.
    for (id, before) in ids.iter().zip(&acked_before) {
        let w = cp2.store.watermark(id).unwrap();
        assert!(w >= *before, "{id}: watermark {w} < {before}");
        let seqs = crate::support::stored_seqs(&api2, id).await;
        assert!((1..=w).all(|s| seqs.binary_search(&s).is_ok()), "{id}: a record up to the watermark {w} is missing");
    }
    // The models (with their artifact), the rollout and the operator's token come back.
    let m: edgeloop_control_plane::ml::ModelVersion =
        api2.get_json(&format!("/api/v1/models/{CLASS}/1")).await.unwrap();
    assert_eq!(m.sha256, model.sha256);
    let art = api2.request("GET", &format!("/api/v1/artifacts/{}", m.sha256), &[], None).await.unwrap();
    assert_eq!((art.status, art.body.len() as u64), (200, m.size));
    let v: edgeloop_control_plane::rollout::RolloutView =
        api2.get_json(&format!("/api/v1/rollouts/{}", r.id)).await.unwrap();
    assert_eq!(v.state, edgeloop_control_plane::rollout::State::Completed);
    cancel2.cancel();
    cp2.join().await.unwrap();
}
