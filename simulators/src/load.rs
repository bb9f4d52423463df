//! `edgeloop-sim load`: how much telemetry one control plane takes, and how fast it acknowledges it.
//!
//! It starts `edgeloop-control-plane run` as its own process (embedded broker, TLS, enrollment, fsync
//! durability: the production defaults), enrolls N devices through the API, connects each as a lightweight
//! device (its own Ed25519 key and MQTT connection) and, once all are connected, has each send `rate` records
//! a second in signed batches every `batch_ms`, as an agent does. It measures, over `duration`:
//!
//! - throughput: records acknowledged a second;
//! - latency from each record's generation to the acknowledgement that covers it (the agent's batching delay
//!   included), and from the batch's send to its acknowledgement; p50, p95, p99 and max;
//! - the control plane's CPU (cores, from `/proc/<pid>/stat`) and memory (RSS and peak, from
//!   `/proc/<pid>/status`), and the load generator's own CPU, since both share the machine.
//!
//! With `--broker mosquitto` the devices connect to Debian's mosquitto instead (TLS on its own listener,
//! dynamic security provisioned by the control plane at enrollment), and the control plane runs in its
//! external-broker mode: the broker's CPU and memory are then measured on their own, beside the control
//! plane's.
//!
//! The devices are not full agents (no sled outbox, no inference): 5,000 agents do not fit on a 2-core
//! machine beside the control plane, and what is measured here is the control plane. The wire traffic is the
//! agents': the same topics, envelopes, signatures and acknowledgements.

use crate::http::Api;
use anyhow::Context;
use edgeloop_common::envelope::{self, Body, Envelope, Record, TelemetryBatch};
use edgeloop_common::topics::{self, Channel};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::Serialize;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The class the load devices claim (one slow sensor, five features).
const CLASS: &str = "factory-machine-temperature";
const FEATURES: usize = 5;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub devices: usize,
    /// Records a second per device.
    pub rate: f64,
    pub duration: Duration,
    /// How often each device sends what it generated (an agent's batching interval).
    pub batch_ms: u64,
    pub data_dir: PathBuf,
    /// The `edgeloop-control-plane` binary.
    pub cp_bin: PathBuf,
    /// TLS on MQTT and the API (the default), or plaintext.
    pub tls: bool,
    /// `fsync` (the default) or `flush`.
    pub durability: String,
    /// Where devices connect: the control plane's embedded broker, or mosquitto in front of it.
    pub broker: LoadBroker,
}

/// The broker of a load run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoadBroker {
    Embedded,
    Mosquitto,
}

impl std::str::FromStr for LoadBroker {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "embedded" => Ok(LoadBroker::Embedded),
            "mosquitto" => Ok(LoadBroker::Mosquitto),
            other => Err(format!("--broker must be embedded or mosquitto, got `{other}`")),
        }
    }
}

/// p50, p95, p99 and max, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub samples: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// From microsecond samples (sorted in place).
    pub fn of(us: &mut [u32]) -> Percentiles {
        if us.is_empty() {
            return Percentiles::default();
        }
        us.sort_unstable();
        let at = |q: f64| f64::from(us[((us.len() - 1) as f64 * q).round() as usize]) / 1000.0;
        Percentiles { samples: us.len(), p50: at(0.50), p95: at(0.95), p99: at(0.99), max: at(1.0) }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoadReport {
    pub devices: usize,
    pub rate_per_device: f64,
    pub batch_ms: u64,
    pub tls: bool,
    pub durability: String,
    pub duration_s: f64,
    /// Enrolling and connecting every device, before the measurement.
    pub setup_s: f64,
    pub offered_records_per_s: f64,
    pub sent: u64,
    pub acknowledged: u64,
    /// Records the control plane counted as stored (its `edgeloop_records_ingested_total`).
    pub stored: u64,
    /// Sent but not acknowledged 10 s after sending stopped.
    pub unacknowledged: u64,
    pub throughput_records_per_s: f64,
    pub gen_to_ack_ms: Percentiles,
    pub send_to_ack_ms: Percentiles,
    pub cp_cpu_cores_mean: f64,
    pub cp_cpu_cores_peak: f64,
    pub cp_rss_mib_end: f64,
    pub cp_rss_mib_peak: f64,
    pub generator_cpu_cores_mean: f64,
    pub broker: LoadBroker,
    /// mosquitto's own CPU and memory (`--broker mosquitto`); with the embedded broker they are the control
    /// plane's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_cpu_cores_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_mib_end: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_mib_peak: Option<f64>,
}

/// CPU time (user + system) of a process in seconds, from `/proc/<pid>/stat` (USER_HZ is 100 on Linux).
fn cpu_seconds(pid: &str) -> Option<f64> {
    parse_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_cpu(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses; the fields after its last ')' are space-separated.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let (utime, stime): (f64, f64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    Some((utime + stime) / 100.0)
}

/// `VmRSS` and `VmHWM` of a process, MiB.
fn rss_mib(pid: &str) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| -> Option<f64> {
        status.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse::<f64>().ok()
    };
    Some((kib("VmRSS:")? / 1024.0, kib("VmHWM:")? / 1024.0))
}

/// The control-plane process, killed when dropped, and the mosquitto in front of it, if any.
struct ControlPlaneProcess {
    child: std::process::Child,
    mosquitto: Option<crate::mosquitto::Mosquitto>,
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_control_plane(opts: &LoadOptions) -> anyhow::Result<(ControlPlaneProcess, SocketAddr, (String, u16))> {
    std::fs::create_dir_all(&opts.data_dir)?;
    let mqtt = crate::free_port()?;
    let api = SocketAddr::from(([127, 0, 0, 1], crate::free_port()?));
    let tls = if opts.tls {
        edgeloop_control_plane::access::certs::init(&opts.data_dir.join("tls"), &[])?;
        "[tls]\ncert = \"tls/server.pem\"\nkey = \"tls/server.key\"\n".to_string()
    } else {
        "[tls]\nplaintext = true\n".to_string()
    };
    let (broker, mosquitto, devices_port) = match opts.broker {
        LoadBroker::Embedded => (format!("[broker]\nmode = \"embedded\"\nlisten = \"127.0.0.1:{mqtt}\"\n"), None, mqtt),
        LoadBroker::Mosquitto => {
            // Devices on a TLS listener of mosquitto's with the fleet's certificate; the control plane on its
            // loopback listener, provisioning devices into dynamic security as they enroll.
            let dir = opts.data_dir.join("mosquitto");
            std::fs::create_dir_all(&dir)?;
            let extra = if opts.tls {
                let (cert, key) = mosquitto_key_pair(&opts.data_dir.join("tls"), &dir)?;
                format!("listener {mqtt} 127.0.0.1\ncertfile {}\nkeyfile {}\n", cert.display(), key.display())
            } else {
                String::new()
            };
            let m = crate::mosquitto::Mosquitto::start_dynsec_with(&dir, &extra)?;
            let devices_port = if opts.tls { mqtt } else { m.port };
            std::fs::write(opts.data_dir.join("cp.password"), crate::mosquitto::CONTROL_PLANE_USER.1)?;
            let section = format!(
                "[broker]\nmode = \"external\"\nurl = \"mqtt://127.0.0.1:{}\"\nusername = \"{}\"\npassword_file = \"cp.password\"\nprovisioning = \"mosquitto-dynsec\"\n",
                m.port,
                crate::mosquitto::CONTROL_PLANE_USER.0
            );
            (section, Some(m), devices_port)
        }
    };
    let cfg = format!(
        "data_dir = \"cp\"\ndurability = \"{}\"\n{broker}[api]\nlisten = \"{api}\"\n[ingest]\noffline_after_secs = 600\n{tls}",
        opts.durability
    );
    let path = opts.data_dir.join("control-plane.toml");
    std::fs::write(&path, cfg)?;
    let log = std::fs::File::create(opts.data_dir.join("control-plane.log"))?;
    let child = std::process::Command::new(&opts.cp_bin)
        .args(["run", "--config"])
        .arg(&path)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", opts.cp_bin.display()))?;
    Ok((ControlPlaneProcess { child, mosquitto }, api, ("127.0.0.1".to_string(), devices_port)))
}

/// The server certificate and key in `tls`, copied into mosquitto's folder `dir` where mosquitto can read
/// them: started as root, it drops to its `mosquitto` user before it loads them, so the key's copy is given to
/// that user (0600).
fn mosquitto_key_pair(tls: &std::path::Path, dir: &std::path::Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = std::path::absolute(dir)?;
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    std::fs::copy(tls.join("server.pem"), &cert)?;
    std::fs::copy(tls.join("server.key"), &key)?;
    if crate::postgres::running_as_root() {
        let ok = std::process::Command::new("chown").arg("mosquitto:").arg(&key).status()?;
        anyhow::ensure!(ok.success(), "chown mosquitto: {} failed", key.display());
    }
    Ok((cert, key))
}

/// What one device measured.
#[derive(Default)]
struct DeviceStats {
    sent: u64,
    acked: u64,
    gen_to_ack_us: Vec<u32>,
    send_to_ack_us: Vec<u32>,
    /// Records sent and not yet acknowledged: (seq, generated, sent).
    pending: VecDeque<(u64, Instant, Instant)>,
}

/// One connected device: its client and what it measured (filled by its event loop).
struct LoadDevice {
    id: String,
    key: ring::signature::Ed25519KeyPair,
    client: AsyncClient,
    stats: Arc<Mutex<DeviceStats>>,
}

async fn enroll_and_connect(
    api: &Api,
    mqtt: (String, u16),
    ca: Option<Arc<rustls::ClientConfig>>,
    token: String,
    id: String,
) -> anyhow::Result<LoadDevice> {
    let key = crate::device::new_key();
    let creds = crate::device::enroll_with_token(api, &id, CLASS, &key, &token).await?;
    let mut opts = MqttOptions::new(id.clone(), mqtt.0, mqtt.1);
    opts.set_max_packet_size(1 << 20, 1 << 20).set_keep_alive(Duration::from_secs(60));
    opts.set_credentials(creds.username, creds.password);
    if let Some(cfg) = ca {
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(cfg)));
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let stats: Arc<Mutex<DeviceStats>> = Arc::default();
    let (connected_tx, connected) = tokio::sync::oneshot::channel();
    let (s, ack_topic, dev) = (stats.clone(), topics::topic(&id, Channel::Ack), id.clone());
    tokio::spawn(async move {
        let mut connected_tx = Some(connected_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(tx) = connected_tx.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                    let Ok(env) = envelope::decode(&p.payload, 1 << 20) else { continue };
                    let Body::Ack(ack) = env.body else { continue };
                    let now = Instant::now();
                    let mut st = s.lock().unwrap_or_else(|e| e.into_inner());
                    while st.pending.front().is_some_and(|(seq, ..)| *seq <= ack.upto) {
                        let (_, generated, sent) = st.pending.pop_front().expect("checked");
                        st.acked += 1;
                        st.gen_to_ack_us.push(now.duration_since(generated).as_micros().min(u32::MAX as u128) as u32);
                        st.send_to_ack_us.push(now.duration_since(sent).as_micros().min(u32::MAX as u128) as u32);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(tx) = connected_tx.take() {
                        let _ = tx.send(Err(format!("{dev}: {e}")));
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    match tokio::time::timeout(Duration::from_secs(60), connected).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => anyhow::bail!("connecting {e}"),
        _ => anyhow::bail!("connecting {id}: no CONNACK within 60 s"),
    }
    client.subscribe(topics::topic(&id, Channel::Ack), QoS::AtLeastOnce).await?;
    Ok(LoadDevice { id, key, client, stats })
}

/// Sends `rate` records a second in a batch every `batch_ms`, starting `offset` into the first interval,
/// until `stop`.
async fn send(
    d: &LoadDevice,
    rate: f64,
    batch_ms: u64,
    offset: Duration,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let topic = topics::topic(&d.id, Channel::Telemetry);
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(Duration::from_millis(batch_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut owed = 0.0f64;
    let mut seq = 0u64;
    let mut last = Instant::now();
    let mut x = 0.0f32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        owed += rate * now.duration_since(last).as_secs_f64();
        last = now;
        let n = owed.floor() as u64;
        if n == 0 {
            continue;
        }
        owed -= n as f64;
        let wall = edgeloop_common::unix_millis();
        let from = seq + 1;
        let records: Vec<Record> = (0..n)
            .map(|i| {
                seq += 1;
                x += 0.1;
                let back_ms = ((n - 1 - i) as f64 * 1000.0 / rate) as u64;
                Record {
                    seq,
                    ts_ms: wall.saturating_sub(back_ms),
                    sensor: "temperature".into(),
                    features: (0..FEATURES).map(|f| (x + f as f32).sin()).collect(),
                    score: None,
                    flags: 0,
                }
            })
            .collect();
        let mut env = Envelope::new(&d.id, seq, wall, Body::Telemetry(TelemetryBatch { from, to: seq, records }));
        env.sign(&d.key);
        {
            let mut st = d.stats.lock().unwrap_or_else(|e| e.into_inner());
            for (i, s) in (from..=seq).enumerate() {
                let back = Duration::from_secs_f64((n - 1 - i as u64) as f64 / rate);
                st.pending.push_back((s, now.checked_sub(back).unwrap_or(now), now));
            }
            st.sent += n;
        }
        d.client.publish(topic.clone(), QoS::AtLeastOnce, false, envelope::encode(&env)).await?;
    }
}

async fn records_stored(api: &Api) -> anyhow::Result<u64> {
    let (status, text) = api.get("/metrics").await?;
    anyhow::ensure!(status == 200, "/metrics: HTTP {status}");
    text.lines()
        .find_map(|l| l.strip_prefix("edgeloop_records_ingested_total "))
        .and_then(|v| v.trim().parse().ok())
        .context("no edgeloop_records_ingested_total in /metrics")
}

/// Runs the load and returns the report.
pub async fn run(opts: LoadOptions, stop: CancellationToken) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(opts.devices > 0, "--devices must be at least 1");
    anyhow::ensure!(opts.rate > 0.0 && opts.rate.is_finite(), "--rate must be a positive number of records a second");
    anyhow::ensure!((10..=60_000).contains(&opts.batch_ms), "--batch-ms must be between 10 and 60000");
    let setup = Instant::now();
    let (cp, api_addr, mqtt) = start_control_plane(&opts)?;
    let pid = cp.child.id().to_string();
    let broker_pid = cp.mosquitto.as_ref().map(|m| m.child.id().to_string());
    let (api, ca) = operator_api(&opts, api_addr).await?;
    let enroll_token = crate::device::enrollment_token(&api, CLASS, opts.devices as u32).await?;
    let devices = connect_all(&opts, &api, mqtt, ca, enroll_token, &stop).await?;
    let setup_s = setup.elapsed().as_secs_f64();
    tracing::info!(devices = devices.len(), setup_s, "every device connected; sending");

    let stored_before = records_stored(&api).await?;
    let usage = send_for_duration(&opts, &devices, (&pid, broker_pid.as_deref()), &stop).await?;
    await_acks(&devices, Duration::from_secs(10)).await;
    let stored = records_stored(&api).await? - stored_before;
    let mut totals = Totals::of(&devices);
    for d in &devices {
        let _ = d.client.disconnect().await;
    }
    drop(cp);
    Ok(LoadReport {
        devices: opts.devices,
        rate_per_device: opts.rate,
        batch_ms: opts.batch_ms,
        tls: opts.tls,
        durability: opts.durability.clone(),
        duration_s: usage.elapsed,
        setup_s,
        offered_records_per_s: opts.rate * opts.devices as f64,
        sent: totals.sent,
        acknowledged: totals.acked,
        stored,
        unacknowledged: totals.unacked,
        throughput_records_per_s: totals.acked as f64 / usage.elapsed,
        gen_to_ack_ms: Percentiles::of(&mut totals.gen_us),
        send_to_ack_ms: Percentiles::of(&mut totals.send_us),
        cp_cpu_cores_mean: usage.cp_cpu / usage.elapsed,
        cp_cpu_cores_peak: usage.peak_cores,
        cp_rss_mib_end: usage.rss_end,
        cp_rss_mib_peak: usage.peak_rss.max(usage.hwm),
        generator_cpu_cores_mean: usage.gen_cpu / usage.elapsed,
        broker: opts.broker,
        broker_cpu_cores_mean: usage.broker.map(|b| b.cpu / usage.elapsed),
        broker_rss_mib_end: usage.broker.map(|b| b.rss_end),
        broker_rss_mib_peak: usage.broker.map(|b| b.rss_peak),
    })
}

/// The operator API of the control plane at `addr` (HTTPS trusting its CA unless plaintext), once it answers,
/// with its first-start admin token; and the TLS config devices connect to the broker with.
async fn operator_api(
    opts: &LoadOptions,
    addr: SocketAddr,
) -> anyhow::Result<(Api, Option<Arc<rustls::ClientConfig>>)> {
    let (api, ca) = if opts.tls {
        let pem = std::fs::read(opts.data_dir.join("tls/ca.pem"))?;
        (Api::tls(addr, &pem)?, Some(Arc::new(edgeloop_common::tls::client_config(&pem)?)))
    } else {
        (Api::new(addr), None)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(api.get("/api/v1/health").await, Ok((200, _))) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the control plane did not answer within 60 s; see {}",
            opts.data_dir.join("control-plane.log").display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = std::fs::read_to_string(opts.data_dir.join("cp/admin.token"))?;
    Ok((api.with_token(&token), ca))
}

/// Enrolls and connects every device, 32 at a time.
async fn connect_all(
    opts: &LoadOptions,
    api: &Api,
    mqtt: (String, u16),
    ca: Option<Arc<rustls::ClientConfig>>,
    enroll_token: String,
    stop: &CancellationToken,
) -> anyhow::Result<Vec<Arc<LoadDevice>>> {
    let limit = Arc::new(tokio::sync::Semaphore::new(32));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..opts.devices {
        let (limit, api, mqtt, ca, token) =
            (limit.clone(), api.clone(), mqtt.clone(), ca.clone(), enroll_token.clone());
        set.spawn(async move {
            let _permit = limit.acquire_owned().await;
            enroll_and_connect(&api, mqtt, ca, token, format!("load-{i:05}")).await
        });
    }
    let mut devices = Vec::with_capacity(opts.devices);
    while let Some(r) = set.join_next().await {
        devices.push(Arc::new(r??));
        if stop.is_cancelled() {
            anyhow::bail!("stopped while connecting");
        }
    }
    Ok(devices)
}

/// What the measurement cost: its length and the control plane's (and the generator's) CPU and memory.
struct Usage {
    /// Seconds of sending.
    elapsed: f64,
    /// CPU seconds of the control plane and of this process while sending.
    cp_cpu: f64,
    gen_cpu: f64,
    /// The control plane's cores at the busiest second.
    peak_cores: f64,
    /// The control plane's RSS at the end and its high-water mark (sampled each second, and at the end), MiB.
    rss_end: f64,
    peak_rss: f64,
    hwm: f64,
    /// mosquitto's, when it runs.
    broker: Option<BrokerUsage>,
}

#[derive(Debug, Clone, Copy)]
struct BrokerUsage {
    cpu: f64,
    rss_end: f64,
    rss_peak: f64,
}

/// Has every device send for `duration`, spread evenly over the batch interval, sampling the control plane
/// (`pid`) each second.
async fn send_for_duration(
    opts: &LoadOptions,
    devices: &[Arc<LoadDevice>],
    (pid, broker_pid): (&str, Option<&str>),
    stop: &CancellationToken,
) -> anyhow::Result<Usage> {
    let (cpu0, gen0, t0) = (cpu_seconds(pid).unwrap_or(0.0), cpu_seconds("self").unwrap_or(0.0), Instant::now());
    let broker0 = broker_pid.and_then(cpu_seconds).unwrap_or(0.0);
    let mut broker_peak = 0.0f64;
    let sending = CancellationToken::new();
    let mut senders = tokio::task::JoinSet::new();
    for (i, d) in devices.iter().enumerate() {
        let (d, s) = (d.clone(), sending.clone());
        let offset = Duration::from_millis(opts.batch_ms * i as u64 / opts.devices as u64);
        let (rate, batch_ms) = (opts.rate, opts.batch_ms);
        senders.spawn(async move { send(&d, rate, batch_ms, offset, s).await });
    }
    let (mut peak_cores, mut peak_rss) = (0.0f64, 0.0f64);
    let (mut last_cpu, mut last_t) = (cpu0, t0);
    while t0.elapsed() < opts.duration && !stop.is_cancelled() {
        tokio::time::sleep(Duration::from_secs(1).min(opts.duration.saturating_sub(t0.elapsed()))).await;
        if let Some(c) = cpu_seconds(pid) {
            let dt = last_t.elapsed().as_secs_f64();
            if dt > 0.5 {
                peak_cores = peak_cores.max((c - last_cpu) / dt);
            }
            (last_cpu, last_t) = (c, Instant::now());
        }
        if let Some((_, hwm)) = rss_mib(pid) {
            peak_rss = peak_rss.max(hwm);
        }
        if let Some((_, hwm)) = broker_pid.and_then(rss_mib) {
            broker_peak = broker_peak.max(hwm);
        }
    }
    sending.cancel();
    while let Some(r) = senders.join_next().await {
        r??;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let cp_cpu = cpu_seconds(pid).unwrap_or(cpu0) - cpu0;
    let gen_cpu = cpu_seconds("self").unwrap_or(gen0) - gen0;
    let (rss_end, hwm) = rss_mib(pid).unwrap_or((0.0, 0.0));
    let broker = broker_pid.map(|b| {
        let (end, hwm) = rss_mib(b).unwrap_or((0.0, 0.0));
        BrokerUsage { cpu: cpu_seconds(b).unwrap_or(broker0) - broker0, rss_end: end, rss_peak: broker_peak.max(hwm) }
    });
    Ok(Usage { elapsed, cp_cpu, gen_cpu, peak_cores, rss_end, peak_rss, hwm, broker })
}

/// Waits up to `limit` for what is still in flight to be acknowledged.
async fn await_acks(devices: &[Arc<LoadDevice>], limit: Duration) {
    let pending =
        || devices.iter().map(|d| d.stats.lock().unwrap_or_else(|e| e.into_inner()).pending.len()).sum::<usize>();
    let deadline = Instant::now() + limit;
    while pending() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every device's numbers, added up; the latency samples of all of them.
struct Totals {
    sent: u64,
    acked: u64,
    unacked: u64,
    gen_us: Vec<u32>,
    send_us: Vec<u32>,
}

impl Totals {
    fn of(devices: &[Arc<LoadDevice>]) -> Totals {
        let mut t = Totals { sent: 0, acked: 0, unacked: 0, gen_us: Vec::new(), send_us: Vec::new() };
        for d in devices {
            let mut st = d.stats.lock().unwrap_or_else(|e| e.into_inner());
            t.sent += st.sent;
            t.acked += st.acked;
            t.unacked += st.pending.len() as u64;
            t.gen_us.append(&mut st.gen_to_ack_us);
            t.send_us.append(&mut st.send_to_ack_us);
        }
        t
    }
}

/// The `edgeloop-control-plane` binary next to the running executable.
pub fn control_plane_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("edgeloop-control-plane")))
        .unwrap_or_else(|| PathBuf::from("edgeloop-control-plane"))
}

/// A new directory for a load run's state.
pub fn default_data_dir() -> PathBuf {
    std::env::temp_dir().join(format!("edgeloop-load-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank_in_ms() {
        let mut us: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        let p = Percentiles::of(&mut us);
        assert_eq!((p.samples, p.p50, p.p95, p.p99, p.max), (100, 51.0, 95.0, 99.0, 100.0));
        assert_eq!(Percentiles::of(&mut []), Percentiles::default());
    }

    #[test]
    fn reads_its_own_cpu_and_memory() {
        assert!(cpu_seconds("self").is_some_and(|c| c >= 0.0));
        let (rss, hwm) = rss_mib("self").unwrap();
        assert!(rss > 0.0 && hwm >= rss);
    }

    #[test]
    fn stat_parsing_survives_spaces_in_the_name() {
        // utime 250 and stime 50 ticks: 3 s. A name like "a b) c" must not shift the fields.
        assert_eq!(parse_cpu("123 (a b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0"), Some(3.0));
        assert_eq!(parse_cpu("garbage"), None);
    }
}
