//! Shared helpers: a control plane on free ports, waiting with deadlines, reading stored sequences.

use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::{ControlPlane, ControlPlaneHandle};
use edgeloop_simulators::http::Api;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub async fn start_cp(dir: &Path, tweak: impl FnOnce(&mut Config)) -> (ControlPlaneHandle, CancellationToken) {
    // Port 0 for both listeners: the control plane binds them and reports the ports it got
    // (`mqtt_addr`, `api_addr`), so that parallel tests cannot race for a port picked beforehand.
    let mqtt = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut cfg = Config::embedded(dir.join("cp"), mqtt, SocketAddr::from(([127, 0, 0, 1], 0)));
    tweak(&mut cfg);
    let cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg, cancel.clone()).await.unwrap();
    (cp, cancel)
}

/// The operator API of `cp` over plain HTTP, with its admin token.
pub fn api(cp: &ControlPlaneHandle) -> Api {
    Api::of(cp)
}

/// The operator API of `cp` over HTTPS trusting only `ca_pem`, with its admin token.
pub fn api_tls(cp: &ControlPlaneHandle, ca_pem: &[u8]) -> Api {
    let api = Api::tls(cp.api_addr, ca_pem).unwrap();
    match &cp.admin_token {
        Some(t) => api.with_token(t),
        None => api,
    }
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `limit`.
pub async fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every stored sequence number of `device`, read through the operator API page by page.
pub async fn stored_seqs(api: &Api, device: &str) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut after = 0;
    loop {
        let page: edgeloop_control_plane::web::TelemetryPage =
            api.get_json(&format!("/api/v1/devices/{device}/telemetry?limit=5000&after_seq={after}")).await.unwrap();
        seqs.extend(page.records.iter().map(|r| r.seq));
        match page.next_after_seq {
            Some(n) => after = n,
            None => return seqs,
        }
    }
}

/// Asserts `seqs` is exactly `1..=last`, each once.
pub fn assert_gap_free(device: &str, seqs: &[u64], last: u64) {
    let set: BTreeSet<u64> = seqs.iter().copied().collect();
    assert_eq!(set.len(), seqs.len(), "{device}: duplicate sequence numbers stored");
    let missing: Vec<u64> = (1..=last).filter(|s| !set.contains(s)).take(10).collect();
    assert!(missing.is_empty(), "{device}: missing seqs (first 10): {missing:?} of 1..={last}");
    assert_eq!(set.len() as u64, last, "{device}: stored beyond the last appended seq");
    assert_eq!(seqs.iter().sum::<u64>(), last * (last + 1) / 2, "{device}: seq checksum");
}

/// A workspace binary, built next to this test by `cargo test --workspace`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let path = dir.join(name);
    assert!(path.exists(), "{} not built; run `cargo test --workspace` (it builds every binary)", path.display());
    path
}

pub struct Proc {
    pub name: &'static str,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub child: Option<Child>,
}

impl Proc {
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(binary(self.name))
            .args(&self.args)
            .env("RUST_LOG", "info,rumqttd=warn,rumqttc=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn sigkill(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    pub fn sigterm(&mut self) {
        let mut c = self.child.take().unwrap();
        let ok = Command::new("kill").args(["-TERM", &c.id().to_string()]).status().unwrap().success();
        assert!(ok);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(
                    st.success(),
                    "{} exited with {st} after SIGTERM; log: {}",
                    self.name,
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
                return;
            }
            assert!(Instant::now() < deadline, "{} ignored SIGTERM", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for a control-plane process to write its first-start admin token, then returns `api` sending it.
pub async fn authorize_from_file(api: Api, token_file: &Path) -> Api {
    wait_for("the control plane's admin token", Duration::from_secs(30), || token_file.is_file()).await;
    let token = std::fs::read_to_string(token_file).unwrap();
    api.with_token(&token)
}

/// Runs `edgeloop-control-plane certs init --dir <dir>/tls`; returns the CA's PEM.
pub fn certs_init(dir: &Path) -> Vec<u8> {
    let out = Command::new(binary("edgeloop-control-plane"))
        .args(["certs", "init", "--dir"])
        .arg(dir.join("tls"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(dir.join("tls/ca.pem")).unwrap()
}

/// The `[tls]` section of a control-plane config using [`certs_init`]'s files.
pub const CP_TLS: &str = "[tls]\ncert = \"tls/server.pem\"\nkey = \"tls/server.key\"\n";
/// The `[tls]` section of an agent config pinning [`certs_init`]'s CA.
pub const AGENT_TLS: &str = "[tls]\nca_file = \"tls/ca.pem\"\n";

/// Creates the control plane's signing key at `<cp_data_dir>/signing.key` (where a control plane started
/// on that data dir finds it) and returns the `[[trusted_keys]]` entry its agents need.
pub fn trusted_keys_toml(cp_data_dir: &Path) -> String {
    std::fs::create_dir_all(cp_data_dir).unwrap();
    let signer = edgeloop_control_plane::access::keys::load_or_create(&cp_data_dir.join("signing.key")).unwrap();
    format!("[[trusted_keys]]\npublic_key = \"{}\"\n", signer.public_key_hex())
}

impl Proc {
    /// A workspace binary with `args`, logging stdout and stderr to `log`; not started yet.
    pub fn new(name: &'static str, args: Vec<String>, log: PathBuf) -> Proc {
        Proc { name, args, log, child: None }
    }
}

/// A control-plane process on free ports, over TLS with [`certs_init`]'s files, its data in `<dir>/cp`.
pub struct CpProcess {
    pub proc: Proc,
    /// Its API with the first start's admin token.
    pub api: Api,
    pub api_addr: SocketAddr,
    pub mqtt_port: u16,
}

/// Starts `edgeloop-control-plane run` with an embedded broker, `extra` appended to its config, and waits for
/// its API. [`certs_init`] must have run in `dir`. The ports are picked free just before the start, so another
/// process can take one first: then the control plane exits naming the address, and new ports are picked.
pub async fn cp_process(dir: &Path, ca_pem: &[u8], extra: &str) -> CpProcess {
    for _ in 0..3 {
        let (mqtt_port, api_port) =
            (edgeloop_simulators::free_port().unwrap(), edgeloop_simulators::free_port().unwrap());
        let api_addr = SocketAddr::from(([127, 0, 0, 1], api_port));
        std::fs::write(
            dir.join("cp.toml"),
            format!("data_dir = \"cp\"\n[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{mqtt_port}\"\n[api]\nlisten = \"{api_addr}\"\n{CP_TLS}{extra}"),
        )
        .unwrap();
        let mut proc = Proc::new(
            "edgeloop-control-plane",
            vec!["run".into(), "--config".into(), dir.join("cp.toml").display().to_string()],
            dir.join("cp.log"),
        );
        // The log is appended to across starts: only what this start wrote says why it ended.
        let before = std::fs::metadata(&proc.log).map_or(0, |m| m.len() as usize);
        proc.start();
        let api = Api::tls(api_addr, ca_pem).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while api.get("/api/v1/health").await.is_err() {
            if let Some(status) = proc.child.as_mut().unwrap().try_wait().unwrap() {
                let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
                proc.child = None;
                if log.get(before..).is_some_and(|new| new.contains("Address already in use")) {
                    break;
                }
                panic!("the control plane exited with {status} before its API came up; log:\n{log}");
            }
            assert!(
                Instant::now() < deadline,
                "the API at {api_addr} did not come up within 60 s; log:\n{}",
                std::fs::read_to_string(&proc.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if proc.child.is_none() {
            continue;
        }
        let api = authorize_from_file(api, &dir.join("cp/admin.token")).await;
        return CpProcess { proc, api, api_addr, mqtt_port };
    }
    panic!(
        "the control plane found a port taken three times; log:\n{}",
        std::fs::read_to_string(dir.join("cp.log")).unwrap_or_default()
    )
}

/// Writes an enrollment token for `class` (good for `uses` devices) to `<dir>/enroll.token`.
pub async fn enrollment_token_file(api: &Api, dir: &Path, class: &str, uses: u32) {
    let token = edgeloop_simulators::device::enrollment_token(api, class, uses).await.unwrap();
    std::fs::write(dir.join("enroll.token"), token).unwrap();
}

/// A control plane ([`cp_process`]) and an agent process for device `id` of class `probe` (`class_toml`, written
/// to `<dir>/probe.toml`), fed with UDP samples on the returned port, enrolling with a token of its own,
/// trusting the control plane's signing key. The agent is not started yet.
pub async fn udp_device(dir: &Path, id: &str, class_toml: &str) -> (Proc, Api, Proc, u16) {
    let ca = certs_init(dir);
    let CpProcess { proc, api, api_addr, mqtt_port } = cp_process(dir, &ca, "").await;
    let udp = edgeloop_simulators::free_port().unwrap();
    std::fs::write(dir.join("probe.toml"), class_toml).unwrap();
    std::fs::write(
        dir.join("agent.toml"),
        format!("[device]\nid = \"{id}\"\nclass_config = \"probe.toml\"\n[mqtt]\nurl = \"mqtts://127.0.0.1:{mqtt_port}\"\nreconnect_max_ms = 300\n[storage]\ndata_dir = \"agent\"\n[[sources]]\nkind = \"udp\"\nlisten = \"127.0.0.1:{udp}\"\n[identity]\nenroll_url = \"https://{api_addr}\"\nenrollment_token_file = \"enroll.token\"\n{AGENT_TLS}{}", trusted_keys_toml(&dir.join("cp"))),
    )
    .unwrap();
    enrollment_token_file(&api, dir, "probe", 1).await;
    let agent = Proc::new(
        "edgeloop-agent",
        vec!["--config".into(), dir.join("agent.toml").display().to_string()],
        dir.join("agent.log"),
    );
    (proc, api, agent, udp)
}

/// Starts `n` agents of `class` that trust the control plane at `api` and take its rollouts; `feed_forever`
/// then feeds them until `stop` fires.
pub async fn fleet_for(
    class: &str,
    api: &Api,
    mqtt: (String, u16),
    root: &std::path::Path,
    n: usize,
    first: usize,
    cancel: &CancellationToken,
) -> Vec<edgeloop_simulators::fleet::SimDevice> {
    let updates = edgeloop_simulators::rollouts::updater_config(api).await.unwrap();
    let mut spec = edgeloop_simulators::fleet::FleetSpec::new(
        vec![edgeloop_simulators::class_config(class).unwrap()],
        mqtt,
        root,
        updates.trusted[0].clone(),
    );
    spec.customise = std::sync::Arc::new(move |c| c.updates = Some(updates.clone()));
    spec.first_index = first;
    spec.enroll_with(api, n).await.unwrap();
    edgeloop_simulators::fleet::start(&spec, n, cancel).await.unwrap()
}

pub fn feed_forever(
    mut devices: Vec<edgeloop_simulators::fleet::SimDevice>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<edgeloop_simulators::fleet::SimDevice>> {
    tokio::spawn(async move {
        edgeloop_simulators::fleet::feed(&mut devices, 10, None, &stop, &mut |_, _| {}).await.unwrap();
        devices
    })
}
