//! The learning loop over real stored telemetry: a training job through the API, the registered model and
//! its artifact (with Range), the same model running in the agent's tract, and the offline CLI.

use crate::support::{start_cp, wait_for};
use edgeloop_control_plane::ml::{JobState, ModelVersion};
use edgeloop_simulators::fleet::{self, FleetSpec};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A control plane that knows the air-quality class, and `n` enrolled in-process devices of it that have each
/// had `samples` samples stored and reported their class. The devices run until the token is cancelled.
async fn air_quality_fleet(
    dir: &std::path::Path,
    n: usize,
    samples: usize,
) -> (
    edgeloop_control_plane::ControlPlaneHandle,
    CancellationToken,
    CancellationToken,
    Vec<edgeloop_simulators::fleet::SimDevice>,
) {
    let class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    let c2 = class.clone();
    let (cp, cp_cancel) = start_cp(dir, move |c| {
        c.classes.insert(c2.class.clone(), c2);
    })
    .await;
    let cancel = CancellationToken::new();
    let mut spec = FleetSpec::new(vec![class], cp.mqtt_addr.clone(), &dir.join("agents"), cp.trusted_key.clone());
    spec.enroll_with(&crate::support::api(&cp), 64).await.unwrap();
    let mut devices = fleet::start(&spec, n, &cancel).await.unwrap();
    for d in &mut devices {
        for s in d.generator.take(samples) {
            d.samples.send(s).await.unwrap();
        }
    }
    let outboxes: Vec<_> = devices.iter().map(|d| d.agent.outbox.clone()).collect();
    wait_for("telemetry stored", Duration::from_secs(30), || {
        outboxes.iter().all(|o| o.stats().acked == samples as u64)
    })
    .await;
    // Heartbeats tell the registry each device's class.
    wait_for("classes known", Duration::from_secs(20), || {
        cp.registry.list().iter().filter(|d| d.class == "city-air-quality").count() == n
    })
    .await;
    (cp, cp_cancel, cancel, devices)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_register_serve_and_retrain_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel, cancel, devices) = air_quality_fleet(dir.path(), 3, 600).await;
    let api = crate::support::api(&cp);

    // Refusals first.
    let (status, body) = api.post_json("/api/v1/train", &json!({"class": "no-such-class"})).await.unwrap();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no-such-class"));
    let (status, body) =
        api.post_json("/api/v1/train", &json!({"class": "city-air-quality", "trials": 0})).await.unwrap();
    assert_eq!(status, 400, "{body}");
    let r = api.request("POST", "/api/v1/train", &[], Some(b"{not json")).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("\"error\":\"bad_request\""));

    let (status, body) =
        api.post_json("/api/v1/train", &json!({"class": "city-air-quality", "trials": 2, "seed": 3})).await.unwrap();
    assert_eq!(status, 202, "{body}");
    let job: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = job["job"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let job = loop {
        let j: serde_json::Value = api.get_json(&format!("/api/v1/jobs/{id}")).await.unwrap();
        match j["state"].as_str() {
            Some("succeeded") => break j,
            Some("failed") => panic!("training failed: {j}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "training did not finish: {j}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(job["result"]["version"], 1);
    assert_eq!(job["result"]["promoted"], true);
    assert_eq!(job["progress"], 1.0);

    let models: serde_json::Value = api.get_json("/api/v1/models").await.unwrap();
    assert_eq!(models.as_array().unwrap().len(), 1);
    assert_eq!(models[0]["production"], true);
    let m: ModelVersion = api.get_json("/api/v1/models/city-air-quality/1").await.unwrap();
    assert_eq!(m.sensor, "pm25");
    // An autoencoder takes one vector of 5 features, a forecaster a window of them; the choice is recorded.
    assert_eq!(m.input_shape, vec![-1, 5 * m.frames as i64]);
    assert!(m.lineage.selection.contains("ROC AUC"), "{}", m.lineage.selection);
    assert_eq!(m.lineage.dataset_report.devices, 3);
    assert!(m.lineage.dataset_report.rows >= 800, "{:?}", m.lineage.dataset_report);
    assert!(m.lineage.trials.len() >= 2);
    assert_eq!(m.golden.len(), 8);
    assert!(m.lineage.metrics.export_max_rel_error <= 1e-4);
    // The manifest agents receive, as it is, with its golden tolerance.
    let manifest: edgeloop_common::update::Manifest =
        api.get_json("/api/v1/models/city-air-quality/1/manifest").await.unwrap();
    assert_eq!(manifest, m.manifest());
    assert!(manifest.golden_tolerance > 0.0 && manifest.golden.len() == 8);
    assert_eq!(api.get("/api/v1/models/city-air-quality/9/manifest").await.unwrap().0, 404);

    // The artifact: whole, and by range.
    let whole = api.request("GET", &format!("/api/v1/artifacts/{}", m.sha256), &[], None).await.unwrap();
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body.len() as u64, m.size);
    let digest = ring::digest::digest(&ring::digest::SHA256, &whole.body);
    assert_eq!(edgeloop_common::signing::hex(digest.as_ref()), m.sha256);
    let part =
        api.request("GET", &format!("/api/v1/artifacts/{}", m.sha256), &[("Range", "bytes=10-")], None).await.unwrap();
    assert_eq!(part.status, 206);
    assert_eq!(part.body, whole.body[10..]);
    assert_eq!(part.header("content-range"), Some(format!("bytes 10-{}/{}", m.size - 1, m.size).as_str()));
    let bad = api
        .request("GET", &format!("/api/v1/artifacts/{}", m.sha256), &[("Range", "bytes=99999999-")], None)
        .await
        .unwrap();
    assert_eq!(bad.status, 416);
    let (status, _) = api.get(&format!("/api/v1/artifacts/{}", "a".repeat(64))).await.unwrap();
    assert_eq!(status, 404);

    // The agent's own inference runs the exported model and reproduces the golden vectors.
    let mut model = edgeloop_agent::inference::Model::load_bytes(&whole.body, 5 * m.frames as usize).unwrap();
    for g in &m.golden {
        let score = model.outputs(&g.input).unwrap()[0];
        assert!((score - g.output[0]).abs() <= 1e-4 * g.output[0].abs().max(1e-3), "{score} vs {}", g.output[0]);
    }

    let (status, body) =
        api.post_json("/api/v1/labels", &json!({"device": "sim-0000", "from": 1, "to": 2, "label": 1})).await.unwrap();
    assert_eq!(status, 201, "{body}");
    let (status, _) =
        api.post_json("/api/v1/labels", &json!({"device": "sim-0000", "from": 5, "to": 2, "label": 1})).await.unwrap();
    assert_eq!(status, 400);

    // Stop everything, then train again offline with the CLI on the same store.
    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
    let cfg = dir.path().join("cp.toml");
    let classes = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-configs");
    std::fs::write(&cfg, format!("data_dir = \"cp\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:1\"\n[tls]\nplaintext = true\n[training]\nclasses_dir = \"{}\"\n", classes.display())).unwrap();
    let bin = std::env::current_exe().unwrap().parent().unwrap().parent().unwrap().join("edgeloop-control-plane");
    let out = std::process::Command::new(bin)
        .args(["train", "--config"])
        .arg(&cfg)
        .args(["--class", "city-air-quality", "--trials", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("city-air-quality v2"), "{stdout}");
    assert!(stdout.contains("promotion"), "{stdout}");
    assert!(stdout.lines().next().unwrap_or("").contains("val_loss"), "{stdout}");
}

/// The agent fills a slow sensor's short gaps and starts its features over after long ones, as a dataset
/// does with the stored records, so every row a model trains on has the features the agent computed for that
/// reading in the field (seasonal ones included, whose phase a missing reading would otherwise shift).
#[test]
fn the_agents_features_across_gaps_are_the_datasets() {
    use edgeloop_agent::collector::Collector;
    use edgeloop_agent::health::Health;
    use edgeloop_agent::outbox::Outbox;
    use edgeloop_agent::source::Sample;
    use edgeloop_agent::updater::slot::ModelSlot;
    use edgeloop_common::config::{SensorConfig, SignalKind};
    use edgeloop_common::envelope::Record;
    use edgeloop_control_plane::ml::dataset::{device_rows, DatasetSpec, QualityReport};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let mut class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    class.sensors = vec![SensorConfig {
        name: "t".into(),
        kind: SignalKind::Slow,
        rate_hz: 1.0,
        channels: 1,
        window: None,
        hop: None,
        rolling: 4,
        season: 6,
        valid_min: None,
        valid_max: None,
        unit: String::new(),
    }];
    let health = Arc::new(Health::default());
    let outbox = Arc::new(Outbox::open(dir.path(), edgeloop_common::durable::Durability::Flush, 1 << 20).unwrap());
    let (slot, _events) = ModelSlot::new(health.clone(), None);
    let mut agent = Collector::for_class(&class, slot, "t".into(), outbox, health);
    // One reading a second with short gaps (1, 2 and 5 missing) and a long one (20 missing).
    let seconds: Vec<u64> = (0..15).chain(16..30).chain(32..40).chain(45..60).chain(81..100).collect();
    let value = |t: u64| (t as f64 * 0.7).sin() * 10.0 + t as f64 * 0.1;
    let samples = seconds.iter().map(|&t| Sample { sensor: "t".into(), ts_ms: Some(t * 1000), values: vec![value(t)] });
    let records: Vec<Record> = agent
        .process(samples.collect(), 0)
        .into_iter()
        .enumerate()
        .map(|(i, r)| Record {
            seq: i as u64 + 1,
            ts_ms: r.ts_ms,
            sensor: r.sensor,
            features: r.features,
            score: None,
            flags: 0,
        })
        .collect();
    assert_eq!(records.len(), seconds.len(), "one record per reading, none for the filled ones");
    let mut report = QualityReport::default();
    let rows = device_rows("d", &records, &class.sensors[0], &DatasetSpec::new(&class.class), &[], &mut report);
    assert_eq!((report.imputed, report.long_gaps), (8, 1));
    assert_eq!(rows.len(), seconds.len() + 8);
    for rec in &records {
        let row = rows.iter().find(|r| r.ts_ms == rec.ts_ms).unwrap();
        // Both start from the reading as stored (an f32): the same features to the bit.
        assert_eq!(row.features, rec.features, "the reading at {} ms: dataset, agent", rec.ts_ms);
    }
    // The features did change across the gaps (seasonal ones too): the comparison above is not vacuous.
    assert!(records.iter().all(|r| r.features.len() == 7));
    assert!(records.iter().filter(|r| r.features[5] != 0.0).count() > 40);
}

/// Stopping the control plane while a long training runs: the stop completes within its deadline (the
/// training checks for it between epochs and trials), and the job is marked interrupted, durably.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_training_finishes_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel, cancel, _devices) = air_quality_fleet(dir.path(), 2, 400).await;
    // A training far longer than any deadline: one trial of a million epochs that never stops early.
    let mut req = edgeloop_control_plane::ml::TrainRequest::new("city-air-quality");
    req.trials = 1;
    req.hyper =
        Some(edgeloop_control_plane::ml::Hyper { epochs: 1_000_000, patience: 1_000_000, ..Default::default() });
    let learning = cp.learning.clone();
    let id = learning.start(req, "test").unwrap();
    wait_for("the training is past its first epochs", Duration::from_secs(60), || {
        learning.job(id).is_some_and(|j| j.state == JobState::Running && j.progress > 0.0)
    })
    .await;

    cancel.cancel();
    let stopping = Instant::now();
    cp_cancel.cancel();
    tokio::time::timeout(Duration::from_secs(15), cp.join())
        .await
        .expect("the control plane stopped within its deadline")
        .unwrap();
    let took = stopping.elapsed();
    let job = learning.job(id).unwrap();
    assert_eq!(job.state, JobState::Interrupted, "{job:?} (stopped in {took:?})");
    assert!(job.error.as_deref().unwrap().contains("interrupted"), "{job:?}");
    drop(learning);

    // Durably: a restart lists it as interrupted, not as running.
    let (cp, cp_cancel) = start_cp(dir.path(), |_| {}).await;
    let job = cp.learning.job(id).unwrap();
    assert_eq!(job.state, JobState::Interrupted, "{job:?}");
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
