//! The operator API's OpenAPI document (`GET /api/v1/openapi.json`) against a live control plane with a
//! fleet, a training job, an uploaded model, a rollout, a class configuration and an enrollment token:
//! `openapi-spec-validator` validates the document, and schemathesis calls every operation with an admin
//! token (settings in `control-plane/tests/openapi/schemathesis.toml`). It passes when no answer is a 5xx,
//! every answer's status, content type, headers and body conform to the document, every guarded operation
//! refuses a call without a token, and no operation is left untested.

use crate::python_device::{python, workspace};
use crate::support::{feed_forever, fleet_for, start_cp, wait_for};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CLASS: &str = "city-air-quality";

/// Runs a tool of the test virtual environment (`target/py-venv/bin/NAME`) and returns its output, failing
/// the test with both streams when it fails.
async fn venv_tool(name: &str, args: &[String], env: &[(String, String)]) -> String {
    let tool = python().with_file_name(name);
    assert!(tool.exists(), "{} is missing: scripts/test.sh installs it", tool.display());
    let mut cmd = Command::new(&tool);
    cmd.args(args).current_dir(workspace()).envs(env.iter().map(|(k, v)| (k, v)));
    let out = tokio::task::spawn_blocking(move || cmd.output()).await.unwrap().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{name} failed:\n{stdout}\n{stderr}");
    stdout.into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_is_valid_and_every_operation_conforms_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let class = edgeloop_simulators::class_config(CLASS).unwrap();
    let class_for_cp = class.clone();
    let (cp, cp_cancel) = start_cp(dir.path(), move |c| {
        c.rollouts.tick_ms = 50;
        c.classes.insert(class_for_cp.class.clone(), class_for_cp);
    })
    .await;
    let api = crate::support::api(&cp);
    let token = cp.admin_token.clone().expect("the control plane's admin token");

    // The document served is the one the router was built with, and it names the API's operations.
    let served: Value = api.get_json("/api/v1/openapi.json").await.unwrap();
    assert_eq!(served, serde_json::to_value(edgeloop_control_plane::web::openapi()).unwrap());
    assert_eq!(served["openapi"], "3.1.0");
    let operations: usize = served["paths"].as_object().unwrap().values().map(|p| p.as_object().unwrap().len()).sum();
    assert!(operations >= 44, "{operations} operations");
    // Without a token: the document is open, the API is not.
    let open = edgeloop_simulators::http::Api::new(cp.api_addr);
    assert_eq!(open.get("/api/v1/openapi.json").await.unwrap().0, 200);
    assert_eq!(open.get("/api/v1/devices").await.unwrap().0, 401);

    // Errors axum answers by itself come in the API's shape too, with their status and headers.
    let r = api.request("PUT", "/api/v1/devices", &[], None).await.unwrap();
    assert_eq!(r.status, 405, "{}", r.text());
    assert!(r.header("allow").is_some_and(|a| a.contains("GET")), "{:?}", r.header("allow"));
    let e: Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(e["error"], "method_not_allowed", "{e}");
    let r = api.request("GET", "/api/v1/configs/city-air-quality/not-a-number", &[], None).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    let e: Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(e["error"], "bad_request", "{e}");
    assert!(e["detail"].as_str().unwrap().contains("not-a-number"), "{e}");

    // Something to call: devices with telemetry, a training job, a model, a rollout, a configuration, a token.
    let fleet_cancel = CancellationToken::new();
    let mut devices =
        fleet_for(CLASS, &api, cp.mqtt_addr.clone(), &dir.path().join("fleet"), 3, 0, &fleet_cancel).await;
    for d in &mut devices {
        for s in d.generator.take(300) {
            d.samples.send(s).await.unwrap();
        }
    }
    let outboxes: Vec<_> = devices.iter().map(|d| d.agent.outbox.clone()).collect();
    wait_for("telemetry stored", Duration::from_secs(60), || outboxes.iter().all(|o| o.stats().acked >= 300)).await;
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    let stop_feed = CancellationToken::new();
    let feeding = feed_forever(devices, stop_feed.clone());

    let (status, body) =
        api.post_json("/api/v1/train", &json!({"class": CLASS, "trials": 1, "seed": 1})).await.unwrap();
    assert_eq!(status, 202, "{body}");
    let job = serde_json::from_str::<Value>(&body).unwrap()["job"].as_u64().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let j: Value = api.get_json(&format!("/api/v1/jobs/{job}")).await.unwrap();
        match j["state"].as_str() {
            Some("succeeded") => break,
            Some("failed") => panic!("training failed: {j}"),
            _ => assert!(std::time::Instant::now() < deadline, "training did not finish: {j}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    edgeloop_simulators::rollouts::upload_reference_model(&api, "reference", &class, 1.0).await.unwrap();
    let model: Value = api.get_json("/api/v1/models/reference/1").await.unwrap();
    let stages = json!([{"name": "first", "share": {"percent": 50.0}}, {"name": "rest", "share": {"percent": 100.0}}]);
    let (status, body) = api
        .post_json("/api/v1/rollouts", &json!({"model": "reference", "version": 1, "stages": stages}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let rollout = serde_json::from_str::<Value>(&body).unwrap()["id"].as_str().unwrap().to_string();
    let toml = std::fs::read(workspace().join(format!("firmware-configs/{CLASS}.toml"))).unwrap();
    let r = api.request("POST", "/api/v1/configs", &[], Some(&toml)).await.unwrap();
    assert_eq!(r.status, 201, "{}", r.text());
    let config_version = serde_json::from_str::<Value>(&r.text()).unwrap()["version"].to_string();
    let (status, body) = api
        .post_json("/api/v1/enrollment-tokens", &json!({"class": CLASS, "uses": 1, "expires_in_secs": 3600}))
        .await
        .unwrap();
    assert_eq!(status, 201, "{body}");
    let token_id = serde_json::from_str::<Value>(&body).unwrap()["id"].as_str().unwrap().to_string();
    let (status, body) =
        api.post_json("/api/v1/labels", &json!({"device": ids[0], "from": 0, "to": 1, "label": 1})).await.unwrap();
    assert_eq!(status, 201, "{body}");

    let url = format!("http://{}/api/v1/openapi.json", cp.api_addr);
    // The validator reads a file: the document as served.
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec(&served).unwrap()).unwrap();
    let validated = venv_tool("openapi-spec-validator", &[file.to_str().unwrap().to_string()], &[]).await;
    assert!(validated.contains("OK"), "{validated}");

    let env: Vec<(String, String)> = [
        ("EDGELOOP_TOKEN", token.clone()),
        ("EDGELOOP_DEVICE", ids[0].clone()),
        ("EDGELOOP_SPARE_DEVICE", ids[2].clone()),
        ("EDGELOOP_CLASS", CLASS.to_string()),
        ("EDGELOOP_MODEL", "reference".to_string()),
        ("EDGELOOP_VERSION", "1".to_string()),
        ("EDGELOOP_SHA256", model["sha256"].as_str().unwrap().to_string()),
        ("EDGELOOP_JOB", job.to_string()),
        ("EDGELOOP_ROLLOUT", rollout),
        ("EDGELOOP_CONFIG_VERSION", config_version),
        ("EDGELOOP_TOKEN_ID", token_id),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let report = dir.path().join("schemathesis.xml");
    let args: Vec<String> = [
        "--config-file",
        "control-plane/tests/openapi/schemathesis.toml",
        "run",
        &url,
        "--no-color",
        "--report",
        "junit",
        "--report-junit-path",
        report.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = venv_tool("schemathesis", &args, &env).await;
    // Every operation was tested, and none failed (a failure also fails the run above).
    assert!(out.contains(&format!("Tested: {operations}")), "{out}");
    let junit = std::fs::read_to_string(&report).unwrap();
    assert_eq!(junit.matches("<testcase ").count(), operations, "{junit}");
    assert!(!junit.contains("<failure") && !junit.contains("<error"), "{junit}");

    stop_feed.cancel();
    let devices = feeding.await.unwrap();
    fleet_cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
