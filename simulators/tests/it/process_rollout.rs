//! Signed rollouts with real processes: the control-plane binary, agent binaries with their own data dirs,
//! UDP-fed samples, and the CLI-generated signing key. One agent is SIGKILLed mid-download and resumes.

use crate::support::{wait_for, Proc};
use base64::Engine as _;
use edgeloop_agent::updater::Files;
use edgeloop_common::config::ClassConfig;
use edgeloop_common::update::{Golden, Phase};
use edgeloop_control_plane::ml::ModelVersion;
use edgeloop_control_plane::rollout::State;
use edgeloop_control_plane::web::DeviceView;
use edgeloop_simulators::http::Api;
use edgeloop_simulators::{free_port, rollouts};
use serde_json::json;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PROBE: &str = "class = \"probe\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 100\n[uplink]\nheartbeat_secs = 1\nack_timeout_secs = 1\n";

struct Site {
    dir: PathBuf,
    api: SocketAddr,
    /// The operator API over HTTPS, with the admin token.
    client: Api,
    mqtt: u16,
    public_key: String,
    cp: Proc,
    enrollment_token: String,
}

/// Writes a signing key with the CLI, a control-plane config using it, and starts the control plane.
async fn site(d: &Path) -> Site {
    let out = std::process::Command::new(crate::support::binary("edgeloop-control-plane"))
        .args(["keys", "generate", "--out"])
        .arg(d.join("signing.key"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let public_key =
        stdout.lines().find_map(|l| l.strip_prefix("public_key = \"")).unwrap().trim_end_matches('"').to_string();
    std::fs::write(d.join("probe.toml"), PROBE).unwrap();
    let ca = crate::support::certs_init(d);
    let crate::support::CpProcess { proc: cp, api: client, api_addr: api, mqtt_port: mqtt } =
        crate::support::cp_process(d, &ca, "[rollouts]\nsigning_key = \"signing.key\"\ntick_ms = 100\n").await;
    let enrollment_token = edgeloop_simulators::device::enrollment_token(&client, "probe", 10).await.unwrap();
    Site { dir: d.to_path_buf(), api, client, mqtt, public_key, cp, enrollment_token }
}

/// An agent process fed over UDP (mqtts, enrolled), trusting the site's key and fetching artifacts from the
/// `artifacts` base URL.
fn agent(site: &Site, id: &str, artifacts: &str) -> (Proc, u16) {
    let udp = free_port().unwrap();
    std::fs::write(
        site.dir.join(format!("{id}.toml")),
        format!(
            "[device]\nid = \"{id}\"\nclass_config = \"probe.toml\"\n[mqtt]\nurl = \"mqtts://127.0.0.1:{}\"\nreconnect_max_ms = 300\n[storage]\ndata_dir = \"{id}\"\n[[sources]]\nkind = \"udp\"\nlisten = \"127.0.0.1:{udp}\"\n[updates]\nartifact_base_url = \"{artifacts}\"\n[[updates.trusted_keys]]\npublic_key = \"{}\"\n[identity]\nenroll_url = \"https://{}\"\nenrollment_token_file = \"{id}.enroll\"\n{}",
            site.mqtt, site.public_key, site.api, crate::support::AGENT_TLS
        ),
    )
    .unwrap();
    std::fs::write(site.dir.join(format!("{id}.enroll")), &site.enrollment_token).unwrap();
    let p = Proc {
        name: "edgeloop-agent",
        args: vec!["--config".into(), site.dir.join(format!("{id}.toml")).display().to_string()],
        log: site.dir.join(format!("{id}.log")),
        child: None,
    };
    (p, udp)
}

/// Sends samples to every port, about 100 per second each, until `stop`.
fn feed(ports: Vec<u16>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            for p in &ports {
                let line = format!("{{\"sensor\":\"t\",\"values\":[{}]}}\n", (i % 20) as f64 * 0.1);
                let _ = sock.send_to(line.as_bytes(), ("127.0.0.1", *p));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })
}

/// Uploads the mean-square model for the probe class, carrying `pad` bytes of weights that change nothing
/// (in its ONNX file and in the NNEF archive devices download).
async fn upload(api: &Api, pad: usize) -> ModelVersion {
    let class = ClassConfig::from_toml("probe.toml", PROBE).unwrap();
    let width = class.pipeline().sensors[0].width();
    let onnx = match pad {
        0 => edgeloop_agent::inference::mean_square_onnx(width),
        _ => edgeloop_agent::inference::mean_square_onnx_with_weights(width, pad),
    };
    let input: Vec<f32> = (0..width).map(|i| i as f32 * 0.25).collect();
    let ms = input.iter().map(|x| x * x).sum::<f32>() / width as f32;
    let body = json!({
        "name": "probe", "class": "probe", "sensor": "t", "threshold": 1e9,
        "golden": [Golden { input, output: vec![ms] }],
        "onnx_base64": base64::engine::general_purpose::STANDARD.encode(&onnx),
    });
    let (status, text) = api.post_json("/api/v1/models", &body).await.unwrap();
    assert_eq!(status, 201, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// The model an agent process runs, read from its own files: the pointer's active model, its file hashed on
/// disk. Returns the model's identity (its ONNX file's SHA-256) once the file on disk is the one the pointer
/// names: the NNEF archive the control plane converted the model to.
fn active_on_disk(data_dir: &Path) -> Option<String> {
    let files = Files::new(data_dir);
    let active = files.load_pointer().ok()?.active?;
    let (sha256, format) = active.file();
    assert_eq!(format, edgeloop_common::update::ModelFormat::Nnef, "devices run the NNEF archive");
    let bytes = std::fs::read(files.model(sha256, format)).ok()?;
    (edgeloop_common::signing::sha256_hex(&bytes) == sha256).then_some(active.sha256)
}

async fn device(api: &Api, id: &str) -> Option<DeviceView> {
    api.get_json(&format!("/api/v1/devices/{id}")).await.ok()
}

fn policy() -> serde_json::Value {
    json!({"shadow_windows": 0, "watch_windows": 5, "latency_budget_us": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_processes_roll_out_a_signed_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut site = site(dir.path()).await;
    let ids = ["proc-a", "proc-b", "proc-c"];
    let mut procs = Vec::new();
    let mut ports = Vec::new();
    for id in ids {
        let (mut p, udp) = agent(&site, id, &format!("https://{}", site.api));
        p.start();
        procs.push(p);
        ports.push(udp);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(ports, stop.clone());
    let model = upload(&site.client, 0).await;
    for id in ids {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while device(&site.client, id).await.is_none_or(|d| d.device.class != "probe") {
            assert!(std::time::Instant::now() < deadline, "{id} never reported");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let stages = json!([
        {"name": "canary", "share": {"count": 1}, "bake_secs": 0},
        {"name": "half", "share": {"percent": 50.0}, "bake_secs": 0},
        {"name": "all", "share": {"percent": 100.0}, "bake_secs": 0},
    ]);
    let r =
        rollouts::create(&site.client, &json!({"model": "probe", "version": 1, "stages": stages, "policy": policy()}))
            .await
            .unwrap();
    let done =
        rollouts::wait(&site.client, &r.id, Duration::from_secs(90), |v| v.state == State::Completed).await.unwrap();
    assert_eq!(done.phases.get("applied"), Some(&3), "{:?}", done.phases);
    for (id, stage) in ids.iter().map(|id| (id, done.devices[*id].stage)) {
        assert!(stage <= 2, "{id} stage {stage}");
        assert_eq!(active_on_disk(&dir.path().join(id)).as_deref(), Some(model.sha256.as_str()), "{id}");
        let v = device(&site.client, id).await.unwrap();
        let phases: Vec<Phase> = v.device.updates.iter().map(|u| u.phase).collect();
        assert_eq!(phases, vec![Phase::Downloading, Phase::Verified, Phase::Watching, Phase::Applied], "{id}");
    }
    assert_eq!(done.stages.iter().map(|s| s.devices).collect::<Vec<_>>(), vec![1, 1, 1]);
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    for mut p in procs {
        p.sigterm();
    }
    site.cp.sigterm();
}

/// Serves the control plane's artifact files slowly (16 KiB every 20 ms), honouring `Range`, and records
/// each request's starting offset.
async fn slow_artifacts(artifacts_dir: PathBuf) -> (SocketAddr, Arc<Mutex<Vec<u64>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let seen = starts.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let (dir, seen) = (artifacts_dir.clone(), seen.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut len = 0;
                while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => len += n,
                    }
                }
                let req = String::from_utf8_lossy(&buf[..len]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let sha = path.rsplit('/').next().unwrap_or_default().to_string();
                let Ok(bytes) = std::fs::read(dir.join(&sha)) else {
                    let _ = sock.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").await;
                    return;
                };
                let from: u64 = req
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("range: bytes=")
                            .map(|r| r.trim_end_matches('-').to_string())
                    })
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0);
                seen.lock().unwrap().push(from);
                let body = &bytes[from as usize..];
                let head = if from > 0 {
                    format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\n\r\n",
                        body.len(),
                        bytes.len() - 1,
                        bytes.len()
                    )
                } else {
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                };
                if sock.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for chunk in body.chunks(16 * 1024) {
                    if sock.write_all(chunk).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
    });
    (addr, starts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_download_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut site = site(dir.path()).await;
    let (slow, starts) = slow_artifacts(dir.path().join("cp/artifacts")).await;
    // The slow server speaks plain HTTP: artifacts are checked against their signed sha256 either way.
    let (mut p, udp) = agent(&site, "proc-k", &format!("http://{slow}"));
    p.start();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(vec![udp], stop.clone());
    // About 2 MiB: some 2.5 s through the slow server.
    let model = upload(&site.client, 2 << 20).await;
    let nnef = model.nnef.clone().expect("the model converts to NNEF");
    assert!(nnef.size > 2_000_000, "{nnef:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while device(&site.client, "proc-k").await.is_none_or(|d| d.device.class != "probe") {
        assert!(std::time::Instant::now() < deadline, "proc-k never reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let stages = json!([{"name": "all", "share": {"percent": 100.0}, "bake_secs": 0}]);
    let r =
        rollouts::create(&site.client, &json!({"model": "probe", "version": 1, "stages": stages, "policy": policy()}))
            .await
            .unwrap();

    // SIGKILL once a good part, but not all, of the artifact is staged.
    let staging = Files::new(&dir.path().join("proc-k")).staging(&nnef.sha256);
    let size = nnef.size;
    wait_for("a partial download", Duration::from_secs(30), || {
        std::fs::metadata(&staging).is_ok_and(|m| m.len() > 256 * 1024 && m.len() < size)
    })
    .await;
    p.sigkill();
    let kept = std::fs::metadata(&staging).unwrap().len();
    assert!(kept > 0 && kept < size, "staged {kept} of {size}");
    p.start();

    let done =
        rollouts::wait(&site.client, &r.id, Duration::from_secs(60), |v| v.state == State::Completed).await.unwrap();
    assert_eq!(done.devices["proc-k"].phase, Some(Phase::Applied));
    assert_eq!(active_on_disk(&dir.path().join("proc-k")).as_deref(), Some(model.sha256.as_str()));
    let starts = starts.lock().unwrap().clone();
    assert_eq!(starts[0], 0, "{starts:?}");
    assert!(starts[1..].iter().any(|&s| s > 0 && s <= kept), "the restarted agent resumed with Range: {starts:?}");
    assert!(!staging.exists(), "the staging file became the model");
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    p.sigterm();
    site.cp.sigterm();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_from_the_cli_installs_on_an_agent_process_with_no_network() {
    let dir = tempfile::tempdir().unwrap();
    let mut site = site(dir.path()).await;
    let (mut p, udp) = agent(&site, "proc-x", &format!("https://{}", site.api));
    p.start();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(vec![udp], stop.clone());
    let model = upload(&site.client, 0).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while device(&site.client, "proc-x").await.is_none_or(|d| d.device.class != "probe") {
        assert!(std::time::Instant::now() < deadline, "proc-x never reported");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The site goes dark: the control plane stops (the offline CLI needs its store), the agent runs on alone.
    site.cp.sigterm();
    let cp_bin = crate::support::binary("edgeloop-control-plane");
    let cp_toml = dir.path().join("cp.toml");
    let file = dir.path().join("site.bundle");
    let out = std::process::Command::new(&cp_bin)
        .args(["bundle", "--model", "probe@one", "--out"])
        .arg(&file)
        .arg("--config")
        .arg(&cp_toml)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`probe@one` is not NAME@VERSION"));
    let out = std::process::Command::new(&cp_bin)
        .args(["bundle", "--model", "probe@1", "--valid-days", "7", "--out"])
        .arg(&file)
        .arg("--config")
        .arg(&cp_toml)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("probe v1 for class probe"));

    // A tampered copy is refused by `install`, naming the artifact; the real one is queued and installed.
    let agent_bin = crate::support::binary("edgeloop-agent");
    let agent_toml = dir.path().join("proc-x.toml");
    let mut bytes = std::fs::read(&file).unwrap();
    let tampered = dir.path().join("tampered.bundle");
    let n = bytes.len();
    bytes[n - 1] ^= 0xff;
    std::fs::write(&tampered, &bytes).unwrap();
    let install = |f: &Path| {
        std::process::Command::new(&agent_bin)
            .arg("--config")
            .arg(&agent_toml)
            .args(["install", "--bundle"])
            .arg(f)
            .output()
            .unwrap()
    };
    let out = install(&tampered);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("artifact:"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = install(&file);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("queued probe v1"));
    wait_for("the bundle's model runs on the agent", Duration::from_secs(60), || {
        active_on_disk(&dir.path().join("proc-x")).as_deref() == Some(model.sha256.as_str())
    })
    .await;
    // A technician at the device asks the agent how it is, with no control plane to ask.
    let status = |json: bool| {
        let mut c = std::process::Command::new(&agent_bin);
        c.arg("--config").arg(&agent_toml).arg("status");
        if json {
            c.arg("--json");
        }
        c.output().unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let text = loop {
        let out = status(false);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() && text.contains("update:     applied") {
            break text;
        }
        let log = std::fs::read_to_string(dir.path().join("proc-x.log")).unwrap_or_default();
        assert!(std::time::Instant::now() < deadline, "{text}\n{log}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(text.starts_with("running: pid "), "{text}");
    assert!(text.contains("model:      probe v1"), "{text}");
    assert!(text.contains("broker:     NOT connected"), "{text}");
    let taken: u64 =
        text.split("samples:    ").nth(1).and_then(|t| t.split(' ').next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(taken > 0, "{text}");
    let out = status(true);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"]["device"], "proc-x");
    assert_eq!(v["pointer"]["active"]["sha256"], model.sha256.as_str());

    // The site comes back: the device reports the install and the control plane records it.
    site.cp.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let views: Vec<serde_json::Value> = site.client.get_json("/api/v1/bundles").await.unwrap_or_default();
        let phase = views.first().and_then(|v| v["devices"]["proc-x"]["phase"].as_str().map(String::from));
        if phase.as_deref() == Some("applied") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the install was not reported: {views:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
    p.sigterm();
    site.cp.sigterm();
}
