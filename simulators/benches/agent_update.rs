//! Agent self-update speed: a new `edgeloop-agent` build to N agent processes (100 by default), each under
//! its own supervisor that restarts it the way systemd's `Restart=` does, three stages (canary, 50%, 100%)
//! with zero bake time and a one-second health watch. Timed from creating the rollout until the API shows
//! every device applied (each agent has downloaded the binary, checked its hash, self-tested it, restarted
//! into it and proven itself). Each run rolls out a new build (another version string), so every run is a
//! full update.
//!
//! `cargo build --release --bin edgeloop-agent && cargo bench -p edgeloop-simulators --bench agent_update`
//! (`EDGELOOP_BENCH_AGENTS` and `EDGELOOP_BENCH_RUNS` change the fleet size and the number of rollouts).

use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::rollout::State;
use edgeloop_control_plane::ControlPlane;
use edgeloop_simulators::rollouts;
use edgeloop_simulators::supervisor::{stamp, Supervisor};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PROBE: &str =
    "class = \"probe\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1\n[uplink]\nheartbeat_secs = 2\n";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(bench(env("EDGELOOP_BENCH_AGENTS", 100), env("EDGELOOP_BENCH_RUNS", 3)))
}

async fn bench(agents: usize, runs: usize) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let release = exe.parent().and_then(|d| d.parent()).map(|d| d.join("edgeloop-agent"));
    let agent_bin = release
        .filter(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("build the agent first: cargo build --release --bin edgeloop-agent"))?;
    let dir = tempfile::tempdir()?;
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut cfg = Config::embedded(dir.path().join("cp"), any, any);
    cfg.rollouts.tick_ms = 100;
    let cp_cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg, cp_cancel.clone()).await?;
    let api = &edgeloop_simulators::http::Api::of(&cp);
    let site = dir.path().join("site");
    std::fs::create_dir_all(site.join("bin"))?;
    let v1 = edgeloop_agent::version::build();
    let installed = site.join("bin").join("edgeloop-agent");
    let size = stamp(&agent_bin, &installed, &v1)?.len();
    std::fs::write(site.join("probe.toml"), PROBE)?;
    let token = edgeloop_simulators::device::enrollment_token(api, "probe", agents as u32).await?;
    std::fs::write(site.join("probe.enroll"), token)?;
    let key = edgeloop_common::signing::hex(&cp.trusted_key.public_key);
    let mut sups = Vec::new();
    for i in 0..agents {
        let d = site.join(format!("upd-{i:04}"));
        std::fs::create_dir_all(&d)?;
        let config = d.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[device]\nid = \"upd-{i:04}\"\nclass_config = \"../probe.toml\"\n[mqtt]\nurl = \"mqtt://{}:{}\"\n\
                 [storage]\ndata_dir = \"data\"\ndurability = \"flush\"\n[identity]\nenroll_url = \"{}\"\n\
                 enrollment_token_file = \"../probe.enroll\"\n[updates]\nartifact_base_url = \"{}\"\n\
                 [[trusted_keys]]\npublic_key = \"{key}\"\n",
                cp.mqtt_addr.0,
                cp.mqtt_addr.1,
                api.base_url(),
                api.base_url(),
            ),
        )?;
        sups.push(Supervisor::start(installed.clone(), config, d.join("agent.log")));
    }
    let ids: Vec<String> = (0..agents).map(|i| format!("upd-{i:04}")).collect();
    let version_of = |id: &str| cp.registry.get(id).and_then(|d| d.last_status.and_then(|s| s.agent_version));
    let t = Instant::now();
    while !ids.iter().all(|id| version_of(id).as_deref() == Some(v1.as_str())) {
        anyhow::ensure!(t.elapsed() < Duration::from_secs(300), "agents did not start within 300 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("{agents} agent processes up in {:.1} s; the build is {size} bytes", t.elapsed().as_secs_f64());
    let stages = json!([
        {"name": "canary", "share": {"count": 1}, "bake_secs": 0},
        {"name": "half", "share": {"percent": 50.0}, "bake_secs": 0},
        {"name": "all", "share": {"percent": 100.0}, "bake_secs": 0},
    ]);
    let mut totals = Vec::new();
    for run in 1..=runs {
        let version = format!("{v1}+bench{run}");
        let bytes = stamp(&agent_bin, &dir.path().join(format!("build-{run}")), &version)?;
        let path = format!(
            "/api/v1/agent-releases?class=probe&arch={}&version={}",
            std::env::consts::ARCH,
            version.replace('+', "%2B")
        );
        let r = api.request("POST", &path, &[], Some(&bytes)).await?;
        anyhow::ensure!(r.status == 201, "publishing the build: {} {}", r.status, r.text());
        let number = serde_json::from_str::<serde_json::Value>(&r.text())?["number"].as_u64().unwrap_or(0);
        let t0 = Instant::now();
        let req = json!({"class": "probe", "agent": number, "health_secs": 1, "stages": stages});
        let ro = rollouts::create(api, &req).await?;
        let done = rollouts::wait(api, &ro.id, Duration::from_secs(600), |v| v.state == State::Completed).await?;
        let total = t0.elapsed().as_secs_f64();
        anyhow::ensure!(done.phases.get("applied") == Some(&agents), "not all applied: {:?}", done.phases);
        println!("run {run}: all {agents} agents restarted into {version} and applied in {total:.2} s");
        totals.push(total);
    }
    totals.sort_by(f64::total_cmp);
    println!("median of {runs}: {:.2} s to all applied", totals[totals.len() / 2]);
    let restarts: usize = sups.iter().map(|s| s.exits().iter().filter(|&&c| c == 75).count()).sum();
    println!("restarts into a new build: {restarts} (expected {})", agents * runs);
    for s in sups {
        s.stop();
    }
    cp_cancel.cancel();
    cp.join().await?;
    Ok(())
}
