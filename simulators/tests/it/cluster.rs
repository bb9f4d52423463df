//! Control-plane replicas: 2 `edgeloop-control-plane run` processes on one PostgreSQL, sharing ingest through
//! mosquitto (`$share/ingest/...`, devices provisioned into its dynamic security), with one signing key. The
//! work that runs once (rollout steps, triggers) runs on the replica holding the lease; killing it moves the
//! work to the other, which goes on from the stored state.

use crate::mosquitto::Mosquitto;
use crate::support::{wait_for, Proc};
use edgeloop_control_plane::rollout::{RolloutView, State};
use edgeloop_control_plane::web::DeviceView;
use edgeloop_simulators::free_port;
use edgeloop_simulators::http::Api;
use edgeloop_simulators::postgres::{PgCluster, PASSWORD};
use edgeloop_simulators::rollouts;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub(crate) struct Cluster {
    dir: PathBuf,
    pub mosquitto: Mosquitto,
    pub pg: PgCluster,
    pub signer: edgeloop_common::signing::Signer,
}

impl Cluster {
    /// mosquitto with dynamic security, a PostgreSQL cluster, their password files and a signing key in `dir`.
    pub fn start(dir: &Path) -> Cluster {
        let mosquitto = Mosquitto::start_dynsec(dir);
        let pg = PgCluster::start(dir).unwrap();
        std::fs::write(dir.join("pg.password"), PASSWORD).unwrap();
        std::fs::write(dir.join("cp.password"), "cp-secret").unwrap();
        // One signing key for every replica: agents accept any replica's acknowledgements and desired states.
        let signer = edgeloop_control_plane::access::keys::load_or_create(&dir.join("signing.key")).unwrap();
        Cluster { dir: dir.to_path_buf(), mosquitto, pg, signer }
    }

    /// A replica's process (not started) and its API address; `rollouts` adds lines to its `[rollouts]`.
    fn proc(&self, name: &str, rollouts: &str) -> (Proc, std::net::SocketAddr) {
        let api = std::net::SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
        let conf = self.dir.join(format!("{name}.toml"));
        std::fs::write(
            &conf,
            format!(
                "data_dir = \"{name}\"\n[broker]\nmode = \"external\"\nurl = \"mqtt://127.0.0.1:{}\"\n\
                 username = \"edgeloop-control-plane\"\npassword_file = \"cp.password\"\n\
                 provisioning = \"mosquitto-dynsec\"\nshared_group = \"ingest\"\n[api]\nlisten = \"{api}\"\n\
                 [tls]\nplaintext = true\n[rollouts]\nsigning_key = \"signing.key\"\n{rollouts}\n\
                 [ingest]\ncommit_max_messages = 64\n\
                 [storage]\nbackend = \"postgres\"\nurl = \"{}\"\npassword_file = \"pg.password\"\n",
                self.mosquitto.port,
                self.pg.url()
            ),
        )
        .unwrap();
        let proc = Proc::new(
            "edgeloop-control-plane",
            vec!["run".into(), "--config".into(), conf.display().to_string()],
            self.dir.join(format!("{name}.log")),
        );
        (proc, api)
    }

    /// Starts the first replica, `a`, which makes the admin token; returns it and its API with that token.
    pub async fn first_replica(&self, rollouts: &str) -> (Proc, Api) {
        let (mut p, addr) = self.proc("a", rollouts);
        p.start();
        let api = crate::support::authorize_from_file(Api::new(addr), &self.dir.join("a/admin.token")).await;
        (p, api)
    }

    /// Starts another replica; it finds the admin token in the shared database.
    pub async fn replica(&self, name: &str, rollouts: &str) -> (Proc, Api) {
        let (mut p, addr) = self.proc(name, rollouts);
        p.start();
        let admin = std::fs::read_to_string(self.dir.join("a/admin.token")).unwrap();
        wait_for(&format!("{name}'s API"), Duration::from_secs(60), || std::net::TcpStream::connect(addr).is_ok())
            .await;
        (p, Api::new(addr).with_token(&admin))
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

/// A metric's value on a replica (0 when absent or unreachable).
pub(crate) async fn metric(api: &Api, name: &str) -> f64 {
    let (_, text) = api.get("/metrics").await.unwrap_or_default();
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

async fn wait_until_leader(api: &Api, who: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    while metric(api, "edgeloop_leader").await != 1.0 {
        assert!(started.elapsed() < limit, "{who} did not take the lead within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

const CLASS: &str = "city-air-quality";

/// A staged rollout created on the replica that does not lead; the leader is SIGKILLed once the canary has
/// applied the model. The other replica takes the lead within 15 s and completes the rollout from the stored
/// state, and no device is issued the rollout's desired state twice under different sequences.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_mid_rollout_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path());
    let (mut a, api_a) = c.first_replica("tick_ms = 100").await;
    wait_until_leader(&api_a, "a, the only replica", Duration::from_secs(30)).await;
    let (mut b, api_b) = c.replica("b", "tick_ms = 100").await;
    assert_eq!(metric(&api_b, "edgeloop_leader").await, 0.0, "two leaders");

    // The model goes in through A; the devices enroll, and fetch artifacts, through B.
    let class = edgeloop_simulators::class_config(CLASS).unwrap();
    let model = rollouts::upload_reference_model(&api_a, CLASS, &class, 1e9).await.unwrap();
    let cancel = CancellationToken::new();
    let mqtt = ("127.0.0.1".to_string(), c.mosquitto.port);
    let devices = crate::support::fleet_for(CLASS, &api_b, mqtt, &dir.path().join("fleet"), 6, 0, &cancel).await;
    let ids: Vec<String> = devices.iter().map(|d| d.agent.device.clone()).collect();
    let stop_feed = CancellationToken::new();
    let feeding = crate::support::feed_forever(devices, stop_feed.clone());
    // Each replica sees part of every device's messages; both registries hold every device, with its class.
    for api in [&api_a, &api_b] {
        let deadline = Instant::now() + Duration::from_secs(60);
        for id in &ids {
            loop {
                let v: Option<DeviceView> = api.get_json(&format!("/api/v1/devices/{id}")).await.ok();
                if v.is_some_and(|v| v.device.class == CLASS && v.device.records > 0) {
                    break;
                }
                assert!(Instant::now() < deadline, "{id} not in {} with its class", api.base_url());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    let stages = json!([
        {"name": "canary", "share": {"count": 1}, "bake_secs": 2},
        {"name": "half", "share": {"percent": 50.0}, "bake_secs": 1},
        {"name": "all", "share": {"percent": 100.0}, "bake_secs": 0},
    ]);
    let r =
        rollouts::create(&api_b, &json!({"model": CLASS, "version": model.version, "stages": stages})).await.unwrap();
    // A (the leader) runs it: the canary applies the model.
    let canary =
        rollouts::wait(&api_b, &r.id, Duration::from_secs(90), |v| v.phases.get("applied").copied().unwrap_or(0) >= 1)
            .await
            .unwrap_or_else(|e| panic!("{e}\nA: {}\nB: {}", c.log("a"), c.log("b")));
    assert_ne!(canary.state, State::Completed, "the rollout ended before the leader could be killed");
    a.sigkill();
    let failover = wait_until_leader(&api_b, "b", Duration::from_secs(15)).await;
    eprintln!("failover: b leads {} ms after a was killed", failover.as_millis());
    let done = rollouts::wait(&api_b, &r.id, Duration::from_secs(120), |v| v.state == State::Completed)
        .await
        .unwrap_or_else(|e| panic!("{e}\nB: {}", c.log("b")));
    assert_eq!(done.phases.get("applied"), Some(&6), "{:?}", done.phases);
    // One desired state per device for this rollout: every report about it names one sequence.
    for id in &ids {
        let v: DeviceView = api_b.get_json(&format!("/api/v1/devices/{id}")).await.unwrap();
        let seqs: std::collections::BTreeSet<u64> =
            v.device.updates.iter().filter(|u| u.rollout.as_deref() == Some(r.id.as_str())).map(|u| u.seq).collect();
        assert_eq!(seqs.len(), 1, "{id} was issued the rollout under several sequences: {seqs:?}");
        assert_eq!(
            v.device.latest_update().and_then(|u| u.active_sha256.clone()).as_deref(),
            Some(model.sha256.as_str()),
            "{id}"
        );
    }
    // A, started again, follows: it sees the completed rollout and does not lead.
    a.start();
    let deadline = Instant::now() + Duration::from_secs(60);
    let view = loop {
        if let Ok(v) = api_a.get_json::<RolloutView>(&format!("/api/v1/rollouts/{}", r.id)).await {
            break v;
        }
        assert!(Instant::now() < deadline, "A did not come back: {}", c.log("a"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(view.state, State::Completed);
    assert_eq!(metric(&api_a, "edgeloop_leader").await, 0.0);
    stop_feed.cancel();
    let devices = feeding.await.unwrap();
    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    a.sigterm();
    b.sigterm();
}

/// The operator API answers the same on every replica: a token made on one works on the other, a rollout
/// created on one is listed by the other, a model uploaded to one is served (artifact included) by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_is_the_same_on_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path());
    let (mut a, api_a) = c.first_replica("").await;
    let (mut b, api_b) = c.replica("b", "").await;
    // A token made with A's config (the CLI, on the shared database), used on B.
    let out = std::process::Command::new(crate::support::binary("edgeloop-control-plane"))
        .args(["tokens", "create", "--role", "operator", "--name", "ci", "--config"])
        .arg(dir.path().join("a.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let on_b = api_b.clone().with_token(&token);
    // A model uploaded to A: listed by B, and its artifact served by B, bytes and all.
    let class = edgeloop_simulators::class_config(CLASS).unwrap();
    let model = rollouts::upload_reference_model(&api_a, CLASS, &class, 1e9).await.unwrap();
    let (status, listed) = on_b.get(&format!("/api/v1/models?class={CLASS}")).await.unwrap();
    assert_eq!(status, 200, "{listed}");
    assert!(listed.contains(&model.sha256), "B does not list the model uploaded to A: {listed}");
    let got = on_b.request("GET", &format!("/api/v1/artifacts/{}", model.sha256), &[], None).await.unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(edgeloop_common::signing::sha256_hex(&got.body), model.sha256);
    // A rollout created on B (with the token A made), listed and shown by A.
    let r = rollouts::create(&on_b, &json!({"model": CLASS, "version": model.version})).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got: Result<RolloutView, _> = api_a.get_json(&format!("/api/v1/rollouts/{}", r.id)).await;
        if let Ok(v) = got {
            assert_eq!(v.model.sha256, model.sha256);
            break;
        }
        assert!(Instant::now() < deadline, "A does not show the rollout created on B");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, listed) = api_a.get("/api/v1/rollouts").await.unwrap();
    assert_eq!(status, 200, "{listed}");
    assert!(listed.contains(&format!("\"{}\"", r.id)), "A does not list {}: {listed}", r.id);
    // An action on A reaches B: the rollout aborted on A shows aborted on B.
    let (status, text) = api_a.post_json(&format!("/api/v1/rollouts/{}/abort", r.id), &json!({})).await.unwrap();
    assert_eq!(status, 200, "{text}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v: RolloutView = on_b.get_json(&format!("/api/v1/rollouts/{}", r.id)).await.unwrap();
        if v.state == State::Aborted {
            break;
        }
        assert!(Instant::now() < deadline, "B still shows {:?}", v.state);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.sigterm();
    b.sigterm();
}
