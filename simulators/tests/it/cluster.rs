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
use edgeloop_simulators::postgres::PgCluster;
use edgeloop_simulators::rollouts;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub(crate) use edgeloop_simulators::replicas::ReplicaOpts as Opts;

fn rollouts_opts(lines: &str) -> Opts {
    Opts { rollouts: lines.into(), ..Default::default() }
}

pub(crate) struct Cluster {
    dir: PathBuf,
    pub mosquitto: Mosquitto,
    pub pg: PgCluster,
    pub signer: edgeloop_common::signing::Signer,
}

impl Cluster {
    /// mosquitto with dynamic security, a PostgreSQL cluster, their password files and a signing key in `dir`.
    pub fn start(dir: &Path) -> Cluster {
        let mosquitto = Mosquitto::start_dynsec(dir).unwrap();
        let pg = PgCluster::start(dir).unwrap();
        let signer = edgeloop_simulators::replicas::shared_files(dir).unwrap();
        Cluster { dir: dir.to_path_buf(), mosquitto, pg, signer }
    }

    /// A replica's process (not started) and its API address.
    fn proc(&self, name: &str, o: &Opts) -> (Proc, std::net::SocketAddr) {
        let api = std::net::SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
        let conf = self.dir.join(format!("{name}.toml"));
        std::fs::write(&conf, edgeloop_simulators::replicas::config(name, self.mosquitto.port, &self.pg.url(), api, o))
            .unwrap();
        let proc = Proc::new(
            "edgeloop-control-plane",
            vec!["run".into(), "--config".into(), conf.display().to_string()],
            self.dir.join(format!("{name}.log")),
        );
        (proc, api)
    }

    /// Starts the first replica, `a`, which makes the admin token; returns it and its API with that token.
    pub async fn first_replica(&self, o: &Opts) -> (Proc, Api) {
        let (mut p, addr) = self.proc("a", o);
        p.start();
        let api = crate::support::authorize_from_file(Api::new(addr), &self.dir.join("a/admin.token")).await;
        wait_for("a's API", Duration::from_secs(60), || std::net::TcpStream::connect(addr).is_ok()).await;
        (p, api)
    }

    /// Starts another replica; it finds the admin token in the shared database.
    pub async fn replica(&self, name: &str, o: &Opts) -> (Proc, Api) {
        let (mut p, addr) = self.proc(name, o);
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
    let (mut a, api_a) = c.first_replica(&rollouts_opts("tick_ms = 100")).await;
    wait_until_leader(&api_a, "a, the only replica", Duration::from_secs(30)).await;
    let (mut b, api_b) = c.replica("b", &rollouts_opts("tick_ms = 100")).await;
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
    let (mut a, api_a) = c.first_replica(&Opts::default()).await;
    let (mut b, api_b) = c.replica("b", &Opts::default()).await;
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
    // One audit log: B lists the abort A answered, and A the rollout B created; refusals fold across them.
    let audit: Vec<edgeloop_control_plane::access::AuditEntry> =
        on_b.get_json("/api/v1/audit?limit=1000").await.unwrap();
    let abort = format!("POST /api/v1/rollouts/{}/abort", r.id);
    assert!(audit.iter().any(|e| e.action == abort && e.status == 200), "B's audit lacks {abort}: {audit:?}");
    let audit: Vec<edgeloop_control_plane::access::AuditEntry> =
        api_a.get_json("/api/v1/audit?limit=1000").await.unwrap();
    assert!(audit.iter().any(|e| e.action == "POST /api/v1/rollouts" && e.status == 201), "{audit:?}");
    // Trigger events and training jobs read the same everywhere too (none here: both lists empty and equal).
    let (jobs_a, jobs_b) = (api_a.get("/api/v1/jobs").await.unwrap(), on_b.get("/api/v1/jobs").await.unwrap());
    assert_eq!(jobs_a, jobs_b);
    // Both count two ingest replicas, and so share each device's rate limit in halves.
    for api in [&api_a, &api_b] {
        let deadline = Instant::now() + Duration::from_secs(15);
        while metric(api, "edgeloop_replicas").await != 2.0 {
            assert!(Instant::now() < deadline, "{} does not count 2 replicas", api.base_url());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    a.sigterm();
    b.sigterm();
}

/// A training job queued on an ingest-only replica waits for a trainer (`roles = ["train"]`, no broker, no
/// API); the trainer that claims it is SIGKILLed mid-training, and another claims the job once the first has
/// been silent for the claim timeout, trains it and records one model version: the job is neither lost nor
/// half-done, and the ingest replica never trains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trainer_killed_mid_job_is_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start(dir.path());
    let classes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware-configs");
    let training = format!("[training]\nclasses_dir = \"{}\"\nclaim_timeout_secs = 4\n", classes.display());
    let role = |r: &str| Opts { top: format!("roles = [\"{r}\"]"), tail: training.clone(), ..Default::default() };
    let (mut a, api) = c.first_replica(&role("ingest")).await;

    // Telemetry from 3 devices, stored through the ingest replica.
    let class = edgeloop_simulators::class_config(CLASS).unwrap();
    let cancel = CancellationToken::new();
    let mut spec = edgeloop_simulators::fleet::FleetSpec::new(
        vec![class],
        ("127.0.0.1".into(), c.mosquitto.port),
        &dir.path().join("agents"),
        c.signer.trusted(None),
    );
    spec.enroll_with(&api, 3).await.unwrap();
    let mut devices = edgeloop_simulators::fleet::start(&spec, 3, &cancel).await.unwrap();
    for d in &mut devices {
        for s in d.generator.take(1500) {
            d.samples.send(s).await.unwrap();
        }
    }
    let outboxes: Vec<_> = devices.iter().map(|d| d.agent.outbox.clone()).collect();
    wait_for("telemetry stored", Duration::from_secs(60), || outboxes.iter().all(|o| o.stats().acked == 1500)).await;
    for d in &devices {
        let id = d.agent.device.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        while api.get_json::<DeviceView>(&format!("/api/v1/devices/{id}")).await.map(|v| v.device.class).ok()
            != Some(CLASS.to_string())
        {
            assert!(Instant::now() < deadline, "{id}'s class never reached the registry");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let (status, text) =
        api.post_json("/api/v1/train", &json!({"class": CLASS, "trials": 100, "seed": 1})).await.unwrap();
    assert_eq!(status, 202, "{text}");
    let id = serde_json::from_str::<serde_json::Value>(&text).unwrap()["job"].as_u64().unwrap();
    let job = |api: &Api| {
        let api = api.clone();
        async move { api.get_json::<serde_json::Value>(&format!("/api/v1/jobs/{id}")).await.unwrap() }
    };
    // The ingest replica does not train it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(job(&api).await["state"], "queued", "the ingest-only replica took the job");
    assert_eq!(metric(&api, "edgeloop_trainers").await, 0.0, "no replica trains yet");

    let trainer = |name: &str| {
        let (p, _) = c.proc(name, &role("train"));
        p
    };
    let mut t1 = trainer("t1");
    t1.start();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let j = job(&api).await;
        if j["state"] == "running" && j["progress"].as_f64().unwrap_or(0.0) > 0.0 {
            break;
        }
        assert_ne!(j["state"], "succeeded", "the training ended before the trainer could be killed");
        assert!(Instant::now() < deadline, "t1 never trained the job: {j}\n{}", c.log("t1"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t1.sigkill();
    let first = c.pg.psql(&format!("SELECT claimed_by FROM training_jobs WHERE id = {id}")).unwrap();

    let mut t2 = trainer("t2");
    t2.start();
    let deadline = Instant::now() + Duration::from_secs(300);
    let done = loop {
        let j = job(&api).await;
        if j["state"] == "succeeded" {
            break j;
        }
        assert!(!matches!(j["state"].as_str(), Some("failed" | "interrupted")), "{j}\nt2: {}", c.log("t2"));
        assert!(Instant::now() < deadline, "t2 did not finish the job: {j}\n{}", c.log("t2"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let row = c.pg.psql(&format!("SELECT attempts, claimed_by FROM training_jobs WHERE id = {id}")).unwrap();
    let (attempts, second) = row.split_once('|').unwrap();
    assert_eq!(attempts, "2", "{row}");
    assert_ne!(second, first, "the same trainer finished it");
    // One version recorded, the one the job names; production points at it if it was promoted.
    let (status, models) = api.get(&format!("/api/v1/models?class={CLASS}")).await.unwrap();
    assert_eq!(status, 200, "{models}");
    let models: serde_json::Value = serde_json::from_str(&models).unwrap();
    let items = models.as_array().unwrap();
    assert_eq!(items.len(), 1, "{models}");
    assert_eq!(items[0]["version"], done["result"]["version"]);
    assert_eq!(items[0]["promoted"], done["result"]["promoted"]);
    assert_eq!(items[0]["production"], done["result"]["promoted"], "the production pointer disagrees: {models}");
    // The ingest replica counts the live trainers: t2, once t1's row (it was killed, and never left) is older
    // than 15 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&api, "edgeloop_trainers").await != 1.0 {
        assert!(Instant::now() < deadline, "edgeloop_trainers: {}", metric(&api, "edgeloop_trainers").await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    t2.sigterm();
    a.sigterm();
}
