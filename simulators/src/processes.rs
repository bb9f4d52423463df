//! A fleet of agent *processes*: `edgeloop-sim fleet --processes` spawns one `edgeloop-agent` per device,
//! each with its own config file, data dir and UDP source, enrolled through the control plane's API, and feeds
//! them the generators' samples as JSON lines over UDP. Closer to real devices than the in-process fleet (a
//! process each, real config files), at the cost of a process per device.

use crate::signals::Generator;
use anyhow::Context;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Options of `edgeloop-sim fleet --processes`.
#[derive(Debug, Clone)]
pub struct ProcessFleetOptions {
    pub devices: usize,
    pub classes: Vec<String>,
    /// `mqtts://host:port` or `mqtt://host:port`.
    pub broker_url: String,
    /// The control plane's API (with an admin token): agents enroll through it.
    pub api: Option<crate::http::Api>,
    /// The CA agents pin (needed for mqtts:// and https://).
    pub ca_file: Option<PathBuf>,
    pub data_root: PathBuf,
    pub duration: Duration,
    pub slow_samples_per_tick: usize,
    /// The `edgeloop-agent` binary.
    pub agent_bin: PathBuf,
    /// The control plane's keys the agents trust; when empty, the signing key is read from `api`.
    pub trusted_keys: Vec<edgeloop_common::signing::TrustedKey>,
}

struct Proc {
    id: String,
    child: Child,
    udp: u16,
    generator: Generator,
    fast: bool,
    data_dir: PathBuf,
}

/// The `edgeloop-agent` binary next to the running executable.
pub fn agent_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("edgeloop-agent")))
        .unwrap_or_else(|| PathBuf::from("edgeloop-agent"))
}

fn write_config(
    opts: &ProcessFleetOptions,
    keys: &[edgeloop_common::signing::TrustedKey],
    id: &str,
    class: &str,
    udp: u16,
    token_file: Option<&Path>,
) -> anyhow::Result<PathBuf> {
    let dir = opts.data_root.join(id);
    std::fs::create_dir_all(&dir)?;
    let mut text = format!(
        "[device]\nid = \"{id}\"\nclass_config = \"../classes/{class}.toml\"\n[mqtt]\nurl = \"{}\"\nreconnect_max_ms = 1000\n[storage]\ndata_dir = \"data\"\n[[sources]]\nkind = \"udp\"\nlisten = \"127.0.0.1:{udp}\"\n",
        opts.broker_url
    );
    if let (Some(api), Some(token)) = (&opts.api, token_file) {
        text.push_str(&format!(
            "[identity]\nenroll_url = \"{}\"\nenrollment_token_file = \"{}\"\n",
            api.base_url(),
            token.display()
        ));
    }
    if let Some(ca) = &opts.ca_file {
        text.push_str(&format!("[tls]\nca_file = \"{}\"\n", ca.display()));
    }
    for k in keys {
        text.push_str(&format!(
            "[[trusted_keys]]\npublic_key = \"{}\"\n",
            edgeloop_common::signing::hex(&k.public_key)
        ));
    }
    let path = dir.join("agent.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Spawns the agents, feeds them for the duration, drains (through the API), stops them with SIGTERM and
/// reads their outboxes.
pub async fn run(opts: ProcessFleetOptions, stop: CancellationToken) -> anyhow::Result<crate::fleet::RunSummary> {
    anyhow::ensure!(
        opts.agent_bin.exists(),
        "{} not found: build it with `cargo build --release --bin edgeloop-agent`",
        opts.agent_bin.display()
    );
    let classes_dir = opts.data_root.join("classes");
    std::fs::create_dir_all(&classes_dir)?;
    let mut tokens = std::collections::HashMap::new();
    for c in &opts.classes {
        let (_, text) = crate::FIRMWARE_CONFIGS
            .iter()
            .find(|(f, _)| *f == format!("{c}.toml"))
            .with_context(|| format!("no built-in firmware config for class `{c}`"))?;
        std::fs::write(classes_dir.join(format!("{c}.toml")), text)?;
        if let Some(api) = &opts.api {
            let token = crate::device::enrollment_token(api, c, opts.devices as u32).await?;
            let f = classes_dir.join(format!("{c}.enroll"));
            std::fs::write(&f, token)?;
            tokens.insert(c.clone(), f);
        }
    }
    let keys = crate::rollouts::control_plane_keys(opts.trusted_keys.clone(), opts.api.as_ref()).await?;
    let now = edgeloop_common::unix_millis();
    let mut procs = Vec::new();
    for i in 0..opts.devices {
        let class = &opts.classes[i % opts.classes.len()];
        let id = format!("simp-{i:04}");
        let udp = crate::free_port()?;
        let cfg = write_config(&opts, &keys, &id, class, udp, tokens.get(class).map(PathBuf::as_path))?;
        let log = std::fs::File::create(opts.data_root.join(&id).join("agent.log"))?;
        let child = Command::new(&opts.agent_bin)
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", opts.agent_bin.display()))?;
        let class_cfg = crate::class_config(class)?;
        let fast = class_cfg.sensors[0].kind == edgeloop_common::config::SignalKind::Fast;
        procs.push(Proc {
            id,
            child,
            udp,
            generator: Generator::new(class_cfg, i as u64, now),
            fast,
            data_dir: opts.data_root.join(format!("simp-{i:04}/data")),
        });
    }
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while started.elapsed() < opts.duration && !stop.is_cancelled() {
        tick.tick().await;
        for p in procs.iter_mut() {
            let n = if p.fast { 200 } else { opts.slow_samples_per_tick };
            let mut datagram = String::new();
            for s in p.generator.take(n) {
                datagram.push_str(&serde_json::to_string(&s)?);
                datagram.push('\n');
                if datagram.len() > 48 * 1024 {
                    let _ = sock.send_to(datagram.as_bytes(), ("127.0.0.1", p.udp));
                    datagram.clear();
                }
            }
            if !datagram.is_empty() {
                let _ = sock.send_to(datagram.as_bytes(), ("127.0.0.1", p.udp));
            }
        }
    }
    if let Some(api) = &opts.api {
        drain_via_api(api, &procs, Duration::from_secs(120)).await;
    } else {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let mut sum = crate::fleet::RunSummary {
        devices: procs.len(),
        generated: 0,
        acknowledged: 0,
        dropped: 0,
        bad_samples: 0,
        fault_windows: 0,
    };
    for mut p in procs {
        let _ = Command::new("kill").args(["-TERM", &p.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while p.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = p.child.kill();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = p.child.wait();
        let outbox = edgeloop_agent::outbox::Outbox::open(
            &p.data_dir.join("outbox"),
            edgeloop_common::durable::Durability::Flush,
            u64::MAX,
        )
        .with_context(|| format!("reading {}'s outbox", p.id))?;
        let s = outbox.stats();
        sum.generated += s.last_seq;
        sum.acknowledged += s.acked;
        sum.dropped += s.dropped_total;
    }
    Ok(sum)
}

/// Waits until every agent's latest heartbeat shows its last record acknowledged.
async fn drain_via_api(api: &crate::http::Api, procs: &[Proc], limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let mut pending = 0;
        for p in procs {
            let v: Option<edgeloop_control_plane::web::DeviceView> =
                api.get_json(&format!("/api/v1/devices/{}", p.id)).await.ok();
            let done =
                v.and_then(|v| v.device.last_status.map(|s| s.last_seq > 0 && s.last_seq == v.device.acked_upto));
            if done != Some(true) {
                pending += 1;
            }
        }
        if pending == 0 || Instant::now() > deadline {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
