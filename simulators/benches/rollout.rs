//! Rollout speed: one signed model to 1,000 in-process agents (city-air-quality, one reading per second
//! each), three stages
//! (canary, 50%, 100%) with zero bake time and a one-window watch. Measures the time from creating the
//! rollout until every agent has reported it applied, over several rollouts (each a new version, so every
//! agent downloads, verifies, self-tests and activates again), and where that time goes.
//!
//! Then the same for class configurations: each run publishes a new version of the class file (another batch
//! size) and rolls it out in the same three stages with a one-second health watch, timed from creating the
//! rollout until every agent has reported it applied.
//!
//! `cargo bench -p edgeloop-simulators --bench rollout` (`EDGELOOP_BENCH_AGENTS` and `EDGELOOP_BENCH_RUNS`
//! change the fleet size and the number of rollouts of each kind).

use edgeloop_common::update::Phase;
use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::rollout::State;
use edgeloop_control_plane::ControlPlane;
use edgeloop_simulators::fleet::{self, FleetSpec};
use edgeloop_simulators::{class_config, rollouts};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(bench(env("EDGELOOP_BENCH_AGENTS", 1000), env("EDGELOOP_BENCH_RUNS", 3)))
}

async fn bench(agents: usize, runs: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    // Port 0: the control plane binds its listeners and reports the ports (`mqtt_addr`, `api_addr`).
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut cfg = Config::embedded(dir.path().join("cp"), any, any);
    cfg.rollouts.tick_ms = 100;
    let cp_cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg, cp_cancel.clone()).await?;
    let api = &edgeloop_simulators::http::Api::of(&cp);
    let class = class_config("city-air-quality")?;
    let updates = rollouts::updater_config(api).await?;
    let mut spec =
        FleetSpec::new(vec![class.clone()], cp.mqtt_addr.clone(), &dir.path().join("fleet"), cp.trusted_key.clone());
    spec.customise = std::sync::Arc::new(move |c| {
        c.updates = Some(updates.clone());
        // A thousand agents share two cores here; flush-only commits keep the fleet's own disk work from
        // dominating what this measures (on devices each agent has its disk to itself).
        c.durability = edgeloop_common::durable::Durability::Flush;
    });
    spec.enroll_with(api, agents).await?;
    let fleet_cancel = CancellationToken::new();
    let t = Instant::now();
    let devices = fleet::start(&spec, agents, &fleet_cancel).await?;
    println!("{agents} agents started in {:.1} s", t.elapsed().as_secs_f64());
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    let feed_stop = CancellationToken::new();
    let feeding = {
        let stop = feed_stop.clone();
        let mut devices = devices;
        tokio::spawn(async move {
            // One reading per device per second: enough windows for the watch, little load.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                for d in devices.iter_mut() {
                    for s in d.generator.take(1) {
                        let _ = d.samples.try_send(s);
                    }
                }
            }
            (devices, ())
        })
    };
    while !ids.iter().all(|id| cp.registry.get(id).is_some_and(|d| !d.class.is_empty())) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stages = json!([
        {"name": "canary", "share": {"count": 1}, "bake_secs": 0},
        {"name": "half", "share": {"percent": 50.0}, "bake_secs": 0},
        {"name": "all", "share": {"percent": 100.0}, "bake_secs": 0},
    ]);
    let policy = json!({"shadow_windows": 0, "watch_windows": 1, "latency_budget_us": 0});
    let (mut totals, mut to_verified, mut canary_s, mut half_s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        // A different threshold makes a different artifact, so every run is a full update.
        let m = rollouts::upload_reference_model(api, "city-air-quality", &class, 1e9 + run as f32 * 1e6).await?;
        let started_ms = edgeloop_common::unix_millis();
        let t0 = Instant::now();
        let r =
            rollouts::create(api, &json!({"model": m.name, "version": m.version, "stages": stages, "policy": policy}))
                .await?;
        let done = rollouts::wait(api, &r.id, Duration::from_secs(300), |v| v.state == State::Completed).await?;
        let total = t0.elapsed().as_secs_f64();
        anyhow::ensure!(done.phases.get("applied") == Some(&agents), "not all applied: {:?}", done.phases);
        // Where the time went: per device, from assignment to verified (download, hash, load, self-test).
        let mut verify = Vec::new();
        for (id, t) in &done.devices {
            let d = cp.registry.get(id).expect("registered");
            let v = d.updates.iter().find(|u| u.sha256 == m.sha256 && u.phase == Phase::Verified).map(|u| u.at_ms);
            if let Some(v) = v {
                verify.push(v.saturating_sub(t.assigned_ms) as f64 / 1000.0);
            }
        }
        let stage_end = |i: usize| {
            done.events
                .iter()
                .find(|e| e.what.starts_with(&format!("stage {i} ")))
                .map(|e| (e.at_ms - started_ms) as f64 / 1000.0)
        };
        let (c, h) = (stage_end(1).unwrap_or(f64::NAN), stage_end(2).unwrap_or(f64::NAN));
        println!(
            "run {run}: all {agents} applied in {total:.2} s; canary done at {c:.2} s, half at {h:.2} s; assignment -> verified median {:.3} s",
            median(verify.clone())
        );
        totals.push(total);
        to_verified.push(median(verify));
        canary_s.push(c);
        half_s.push(h);
    }
    println!(
        "median of {runs}: {:.2} s to all applied (canary stage {:.2} s, half {:.2} s); per-device assignment -> verified {:.3} s",
        median(totals),
        median(canary_s),
        median(half_s),
        median(to_verified)
    );
    let text = edgeloop_simulators::FIRMWARE_CONFIGS
        .iter()
        .find(|(f, _)| *f == "city-air-quality.toml")
        .map(|(_, t)| t.to_string())
        .expect("shipped class file");
    let mut config_totals = Vec::new();
    for run in 1..=runs {
        let tuned = text.replace("batch_max_records = 100", &format!("batch_max_records = {}", 100 + run));
        let r = api.request("POST", "/api/v1/configs", &[], Some(tuned.as_bytes())).await?;
        anyhow::ensure!(r.status == 201, "publishing a class configuration: {} {}", r.status, r.text());
        let version = serde_json::from_str::<serde_json::Value>(&r.text())?["version"].as_u64().unwrap_or(0);
        let t0 = Instant::now();
        let req = json!({"class": "city-air-quality", "config": version, "health_secs": 1, "stages": stages});
        let r = rollouts::create(api, &req).await?;
        let done = rollouts::wait(api, &r.id, Duration::from_secs(300), |v| v.state == State::Completed).await?;
        let total = t0.elapsed().as_secs_f64();
        anyhow::ensure!(done.phases.get("applied") == Some(&agents), "not all applied: {:?}", done.phases);
        println!("config run {run}: all {agents} applied v{version} in {total:.2} s (1 s health watch per stage)");
        config_totals.push(total);
    }
    println!("config median of {runs}: {:.2} s to all applied", median(config_totals));
    feed_stop.cancel();
    let (devices, ()) = feeding.await?;
    fleet_cancel.cancel();
    for d in devices {
        let _ = d.agent.join().await;
    }
    cp_cancel.cancel();
    cp.join().await?;
    Ok(())
}
