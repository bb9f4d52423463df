//! The Python client of `python/` (`pip install ./python`) against a live control plane with a fleet of
//! in-process agents: its pytest suite pulls the dataset, trains, reads lineage and promotion, uploads a
//! scikit-learn IsolationForest with golden vectors from onnxruntime, rolls it out in stages and waits for it,
//! and reads the gates, drift and alerts. Afterwards every device runs the uploaded model.

use crate::python_device::{python, workspace};
use crate::support::{feed_forever, fleet_for, start_cp, wait_for};
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CLASS: &str = "city-air-quality";
const DEVICES: usize = 3;
/// 26 hours of readings, one a minute.
const DATASET_READINGS: usize = 26 * 60;

#[test]
fn the_python_readme_shows_the_example_as_it_is() {
    crate::python_device::assert_shown_as_it_is("python/README.md", "python/examples/sklearn_to_rollout.py");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_drives_the_loop_from_dataset_to_a_completed_rollout() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let class = edgeloop_simulators::class_config(CLASS).unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), move |c| {
        c.rollouts.tick_ms = 50;
        c.classes.insert(class.class.clone(), class);
    })
    .await;
    let api = crate::support::api(&cp);
    let fleet_cancel = CancellationToken::new();
    let mut devices =
        fleet_for(CLASS, &api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), DEVICES, 0, &fleet_cancel).await;
    // Enough stored telemetry for a dataset, then a steady feed while the suite runs. One reading a minute:
    // the dataset spans more than a day, so that the feed during the rollout (later hours of the daily cycle)
    // is nothing the forest has not seen.
    for d in &mut devices {
        for s in d.generator.take(DATASET_READINGS) {
            d.samples.send(s).await.unwrap();
        }
    }
    let outboxes: Vec<_> = devices.iter().map(|d| d.agent.outbox.clone()).collect();
    wait_for("telemetry stored", Duration::from_secs(120), || {
        outboxes.iter().all(|o| o.stats().acked >= DATASET_READINGS as u64)
    })
    .await;
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    wait_for("devices registered with their class", Duration::from_secs(20), || {
        ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| d.class == CLASS))
    })
    .await;
    let stop_feed = CancellationToken::new();
    let feeding = feed_forever(devices, stop_feed.clone());

    let mut cmd = Command::new(&python);
    cmd.args(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"])
        .arg(workspace().join("python/tests"))
        .env("EDGELOOP_URL", format!("http://{}", cp.api_addr))
        .env("EDGELOOP_TOKEN", cp.admin_token.clone().expect("the control plane's admin token"))
        .env("EDGELOOP_CLASS", CLASS)
        .env("EDGELOOP_DEVICES", DEVICES.to_string())
        .env("PYTHONPATH", workspace().join("python"))
        .current_dir(dir.path());
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the Python client's suite failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("7 passed"), "{stdout}");

    // What the suite did, seen from the control plane: every device runs the uploaded forest.
    let versions: Vec<serde_json::Value> = api.get_json(&format!("/api/v1/models?name={CLASS}-iforest")).await.unwrap();
    let sha = versions[0]["sha256"].as_str().unwrap().to_string();
    for id in &ids {
        let d = cp.registry.get(id).unwrap();
        assert_eq!(d.latest_update().and_then(|u| u.active_sha256.clone()).as_deref(), Some(sha.as_str()), "{id}");
    }
    stop_feed.cancel();
    let devices = feeding.await.unwrap();
    // The forest scores slower than the autoencoder it replaced: let the collectors catch up before stopping.
    edgeloop_simulators::fleet::drain(&devices, Duration::from_secs(60)).await;
    fleet_cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
