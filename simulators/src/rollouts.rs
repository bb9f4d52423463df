//! Driving signed updates from the simulator side, through the operator API only: upload a model, start a
//! rollout, watch it, and configure simulated agents to trust the control plane's key.

use crate::http::Api;
use base64::Engine as _;
use edgeloop_agent::updater::UpdaterConfig;
use edgeloop_common::signing::TrustedKey;
use edgeloop_common::update::Golden;
use edgeloop_control_plane::ml::ModelVersion;
use edgeloop_control_plane::rollout::RolloutView;
use edgeloop_control_plane::web::SigningKey;
use std::time::{Duration, Instant};

/// The updater config a simulated agent needs to take updates from the control plane at `api`.
pub async fn updater_config(api: &Api) -> anyhow::Result<UpdaterConfig> {
    let key: SigningKey = api.get_json("/api/v1/signing-key").await?;
    let trusted = TrustedKey::from_hex(&key.public_key, None).map_err(anyhow::Error::msg)?;
    Ok(UpdaterConfig {
        trusted: vec![trusted],
        artifact_base: api.base_url().to_string(),
        max_artifact_bytes: 64 << 20,
        max_agent_bytes: 256 << 20,
    })
}

/// The control plane's keys agents are to trust: `given` if any, else the signing key the API at `api`
/// publishes (fetched with the caller's client, pinned CA included).
pub async fn control_plane_keys(given: Vec<TrustedKey>, api: Option<&Api>) -> anyhow::Result<Vec<TrustedKey>> {
    if !given.is_empty() {
        return Ok(given);
    }
    let Some(api) = api else {
        anyhow::bail!("agents need the control plane's public key: pass --trusted-key HEX (`edgeloop-control-plane keys show`) or --api to read it from the API")
    };
    let key: SigningKey = api.get_json("/api/v1/signing-key").await?;
    Ok(vec![TrustedKey::from_hex(&key.public_key, None).map_err(anyhow::Error::msg)?])
}

/// A reference model for `class`'s first sensor: the mean square of the features, flagging scores above
/// `threshold`. A threshold below zero flags everything: a deliberately bad model.
pub async fn upload_reference_model(
    api: &Api,
    name: &str,
    class: &edgeloop_common::config::ClassConfig,
    threshold: f32,
) -> anyhow::Result<ModelVersion> {
    upload_reference_model_with(api, name, class, threshold, 3).await
}

/// [`upload_reference_model`] with `golden` golden vectors (at most 16), which travel in every desired state.
pub async fn upload_reference_model_with(
    api: &Api,
    name: &str,
    class: &edgeloop_common::config::ClassConfig,
    threshold: f32,
    golden: usize,
) -> anyhow::Result<ModelVersion> {
    let width = class.pipeline().sensors[0].width();
    let onnx = edgeloop_agent::inference::mean_square_onnx_with_doc(width, &format!("{name}, threshold {threshold}"));
    let golden: Vec<Golden> = (0..golden)
        .map(|k| {
            let input: Vec<f32> = (0..width).map(|i| (i as f32 * 0.5 - k as f32).sin()).collect();
            let ms = input.iter().map(|x| x * x).sum::<f32>() / width as f32;
            Golden { input, output: vec![ms] }
        })
        .collect();
    let body = serde_json::json!({
        "name": name,
        "class": class.class,
        "sensor": class.sensors[0].name,
        "threshold": threshold,
        "golden": golden,
        "onnx_base64": base64::engine::general_purpose::STANDARD.encode(&onnx),
        "description": "edgeloop reference model (mean square of the features)",
    });
    let (status, text) = api.post_json("/api/v1/models", &body).await?;
    anyhow::ensure!(status == 201, "uploading {name}: HTTP {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

/// Starts a rollout from a JSON request; returns its view.
pub async fn create(api: &Api, req: &serde_json::Value) -> anyhow::Result<RolloutView> {
    let (status, text) = api.post_json("/api/v1/rollouts", req).await?;
    anyhow::ensure!(status == 201, "creating a rollout: HTTP {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

/// Polls a rollout until `done` holds for it, or `limit` passes (then the last view is in the error).
pub async fn wait(
    api: &Api,
    id: &str,
    limit: Duration,
    done: impl Fn(&RolloutView) -> bool,
) -> anyhow::Result<RolloutView> {
    let deadline = Instant::now() + limit;
    loop {
        let v: RolloutView = api.get_json(&format!("/api/v1/rollouts/{id}")).await?;
        if done(&v) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "rollout {id} still {:?} at stage {} after {limit:?}; phases {:?}; events {:?}",
                v.state,
                v.stage,
                v.phases,
                v.events.iter().map(|e| e.what.as_str()).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
