//! The operator API's answers, errors included, against a running control plane with one device.

use crate::support::{start_cp, wait_for};
use edgeloop_simulators::fleet::{self, FleetSpec};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_answers_and_errors_are_json() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let cancel = CancellationToken::new();
    let class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    let mut spec =
        FleetSpec::new(vec![class], cp.mqtt_addr.clone(), &dir.path().join("agents"), cp.trusted_key.clone());
    spec.enroll_with(&api, 64).await.unwrap();
    let mut devices = fleet::start(&spec, 1, &cancel).await.unwrap();
    let samples = devices[0].generator.take(20);
    let first_ts = samples[0].ts_ms.unwrap();
    for s in samples {
        devices[0].samples.send(s).await.unwrap();
    }
    let outbox = devices[0].agent.outbox.clone();
    wait_for("records acknowledged", Duration::from_secs(20), || outbox.stats().acked == 20).await;

    let (status, body) = api.get("/api/v1/health").await.unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["status"].as_str(), v["devices"].as_u64()), (Some("ok"), Some(1)));

    let (status, body) = api.get("/api/v1/devices").await.unwrap();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v[0]["id"], "sim-0000");
    assert_eq!(v[0]["records"], 20);
    assert_eq!(v[0]["online"], true);

    // Time-bounded query: the first timestamp only (one reading of each of the class's two sensors).
    let (status, body) =
        api.get(&format!("/api/v1/devices/sim-0000/telemetry?from={first_ts}&to={first_ts}")).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["records"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!((v["records"][0]["seq"].as_u64(), v["records"][1]["seq"].as_u64()), (Some(1), Some(2)));
    let (_, body) = api.get("/api/v1/devices/sim-0000/telemetry?limit=5").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((v["records"].as_array().unwrap().len(), v["next_after_seq"].as_u64()), (5, Some(5)));

    let errors = [
        ("/api/v1/devices/nope", 404, "not_found"),
        ("/api/v1/devices/bad%20id", 400, "bad_request"),
        ("/api/v1/devices/sim-0000/telemetry?limit=0", 400, "bad_request"),
        ("/api/v1/devices/sim-0000/telemetry?limit=abc", 400, "bad_request"),
        ("/api/v1/devices/sim-0000/telemetry?from=10&to=5", 400, "bad_request"),
        ("/api/v1/devices/sim-0000/telemetry?colour=red", 400, "bad_request"),
        ("/api/v1/nothing-here", 404, "not_found"),
    ];
    for (path, want, kind) in errors {
        let (status, body) = api.get(path).await.unwrap();
        assert_eq!(status, want, "{path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
        assert_eq!(v["error"], kind, "{path}: {body}");
        assert!(!v["detail"].as_str().unwrap_or("").is_empty(), "{path}: {body}");
    }

    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
