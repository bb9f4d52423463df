//! `edgeloop-sim demo`: a control plane with its embedded broker, and a fleet of in-process agents fed by
//! synthetic signals, each scoring its features with the reference model.
//!
//! The agents start with no model and trust the control plane's signing key. Once they have connected, the
//! demo uploads a reference model per class and starts a signed rollout for each: one canary device, then
//! half the class, then all of it, each stage gated on install results and on the anomaly rate the devices
//! report. Vibration devices are fed in real time (2 kHz); slow air-quality devices run 600 times faster than
//! real time (one reading per 100 ms tick instead of one a minute), so that a short demo still shows them.
//! With a duration, the demo waits for the rollouts to finish, stops feeding, waits for every outbox to drain,
//! and prints a one-line JSON summary.

use crate::fleet::{self, FleetSpec};
use crate::rollouts;
use anyhow::Context;
use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::ControlPlane;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: usize,
    pub duration: Option<Duration>,
    pub data_dir: PathBuf,
    /// Longest wait for outboxes to drain at the end.
    pub drain_timeout: Duration,
}

/// The final line.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub devices: usize,
    pub generated: u64,
    pub acknowledged: u64,
    pub stored: u64,
    pub dropped: u64,
    /// Signed rollouts that reached every stage (one per class).
    pub rollouts_completed: usize,
    /// Devices per active model (`name vN`, or `none`), as the devices last reported.
    pub devices_per_model: BTreeMap<String, usize>,
}

/// The stages each class's rollout goes through: one canary device, half the class, all of it.
fn demo_stages() -> serde_json::Value {
    serde_json::json!([
        {"name": "canary", "share": {"count": 1}, "bake_secs": 1},
        {"name": "half", "share": {"percent": 50.0}, "bake_secs": 1},
        {"name": "all", "share": {"percent": 100.0}, "bake_secs": 0},
    ])
}

/// How long the rollouts may take beyond the demo's duration.
const ROLLOUT_GRACE: Duration = Duration::from_secs(90);

/// Runs the demo until `duration` passes and the rollouts have finished (then returns the summary), or until
/// `stop` fires.
pub async fn run(opts: DemoOptions, stop: CancellationToken) -> anyhow::Result<Summary> {
    let mqtt_port = crate::free_port()?;
    let mut cfg = Config::embedded(
        opts.data_dir.join("control-plane"),
        SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    );
    // TLS everywhere: a development CA and server certificate, made once per data dir.
    let tls_dir = opts.data_dir.join("tls");
    let (ca, cert, key) = (tls_dir.join("ca.pem"), tls_dir.join("server.pem"), tls_dir.join("server.key"));
    if !ca.exists() {
        edgeloop_control_plane::certs::init(&tls_dir, &[]).context("creating the demo's TLS certificates")?;
    }
    cfg.tls = Some(edgeloop_control_plane::config::TlsFiles { cert, key });
    let ca_pem = std::fs::read(&ca).with_context(|| format!("reading {}", ca.display()))?;
    let cp_cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg, cp_cancel.clone()).await.context("starting the control plane")?;
    let api = cp.api_addr;
    let token_path = opts.data_dir.join("control-plane/admin.token");
    let token = std::fs::read_to_string(&token_path)
        .with_context(|| format!("reading the admin token {}", token_path.display()))?;
    crate::http::authorize(api, &token);
    crate::http::trust(api, &ca_pem)?;
    println!("edgeloop demo: {} devices", opts.devices);
    println!("  dashboard:    https://{api}/  (log in with the admin token below; the browser must trust the CA)");
    println!("  operator API: https://{api}/api/v1/devices   rollouts: https://{api}/api/v1/rollouts   metrics: https://{api}/metrics");
    println!("  MQTT broker:  mqtts://{}:{}  (TLS; CA {})", cp.mqtt_addr.0, cp.mqtt_addr.1, ca.display());
    println!("  devices:      enrolled with per-class tokens; every uplink signed and verified");
    println!("  signing key:  {} (agents trust it)", cp.rollouts.key_id());
    println!("  admin token:  {} (send it as `Authorization: Bearer <token>`)", token_path.display());
    println!("  data:         {}", opts.data_dir.display());

    let classes = vec![crate::class_config("factory-vibration")?, crate::class_config("city-air-quality")?];
    let updates = rollouts::updater_config(api).await?;
    let mut spec = FleetSpec::new(classes.clone(), cp.mqtt_addr.clone(), &opts.data_dir.join("agents"));
    spec.customise = std::sync::Arc::new(move |cfg| cfg.updates = Some(updates.clone()));
    spec.tls_ca = Some(ca_pem.clone());
    spec.enroll_with(api, opts.devices).await?;
    let fleet_cancel = CancellationToken::new();
    let mut devices = fleet::start(&spec, opts.devices, &fleet_cancel).await?;

    // Feed until told to stop: the rollouts' watch phases need windows flowing.
    let feed_stop = stop.child_token();
    let ingested = cp.metrics.clone();
    let status = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let line = status.clone();
    let feed_task = {
        let feed_stop = feed_stop.clone();
        tokio::spawn(async move {
            let mut report = |elapsed: Duration, devices: &[fleet::SimDevice]| {
                let (gen, acked) = devices.iter().fold((0, 0), |(g, a), d| {
                    let s = d.agent.outbox.stats();
                    (g + s.durable_seq, a + s.acked)
                });
                println!(
                    "  t={:>4}s  records generated {gen:>8}  acknowledged {acked:>8}  ingested {:>8}  {}",
                    elapsed.as_secs(),
                    ingested.records_ingested.load(std::sync::atomic::Ordering::Relaxed),
                    line.lock().unwrap_or_else(|p| p.into_inner())
                );
            };
            let r = fleet::feed(&mut devices, 2, None, &feed_stop, &mut report).await;
            (devices, r)
        })
    };

    let started = std::time::Instant::now();
    let ids: Vec<String> = (0..opts.devices).map(|i| format!("sim-{i:04}")).collect();
    let registered = async {
        while !ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| !d.class.is_empty())) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        _ = registered => {}
        _ = tokio::time::sleep(Duration::from_secs(30)) => anyhow::bail!("devices did not all connect within 30 s"),
        _ = stop.cancelled() => {}
    }
    let mut ids_by_class = Vec::new();
    for c in classes.iter().filter(|c| ids.iter().any(|id| cp.registry.get(id).is_some_and(|d| d.class == c.class))) {
        let m = rollouts::upload_reference_model(api, &c.class, c, 1e9).await?;
        let req = serde_json::json!({"model": m.name, "version": m.version, "stages": demo_stages()});
        let r = rollouts::create(api, &req).await?;
        println!("  rollout {} started: {} v{} to class {}, canary -> 50% -> 100%", r.id, m.name, m.version, c.class);
        ids_by_class.push(r.id);
    }
    // Wait for the duration and for every rollout to finish (or the grace period, or a stop).
    loop {
        let views: Vec<_> = ids_by_class.iter().filter_map(|id| cp.rollouts.get(id)).collect();
        *status.lock().unwrap_or_else(|p| p.into_inner()) = views
            .iter()
            .map(|r| format!("{}: stage {} {:?}", r.id, r.spec.stages[r.stage].name, r.state))
            .collect::<Vec<_>>()
            .join("  ");
        let settled = views.iter().all(|r| !r.state.is_active());
        let elapsed = started.elapsed();
        match opts.duration {
            Some(d) if elapsed >= d && settled => break,
            Some(d) if elapsed >= d + ROLLOUT_GRACE => {
                println!("  rollouts did not settle within {ROLLOUT_GRACE:?} after the demo's duration");
                break;
            }
            _ => {}
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    feed_stop.cancel();
    let (devices, fed) = feed_task.await.context("feeding task")?;
    fed?;
    fleet::drain(&devices, opts.drain_timeout).await;
    fleet_cancel.cancel();
    let rollouts_completed = ids_by_class
        .iter()
        .filter(|id| {
            cp.rollouts.get(id).is_some_and(|r| r.state == edgeloop_control_plane::rollout::engine::State::Completed)
        })
        .count();
    let mut summary = Summary {
        devices: devices.len(),
        generated: 0,
        acknowledged: 0,
        stored: 0,
        dropped: 0,
        rollouts_completed,
        devices_per_model: BTreeMap::new(),
    };
    for d in devices {
        drop(d.samples);
        let outbox = d.agent.outbox.clone();
        let id = d.agent.device.clone();
        let model = d.agent.health.model_version().map_or("none".to_string(), |v| {
            // "name vN (sha256:…)" -> "name vN"
            v.split(" (").next().unwrap_or(&v).to_string()
        });
        *summary.devices_per_model.entry(model).or_insert(0) += 1;
        d.agent.join().await.with_context(|| format!("stopping agent {id}"))?;
        let s = outbox.stats();
        summary.generated += s.last_seq;
        summary.acknowledged += s.acked;
        summary.dropped += s.dropped_total;
        summary.stored += cp.store.count(&id)?;
    }
    cp_cancel.cancel();
    cp.join().await?;
    Ok(summary)
}
