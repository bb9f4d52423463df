//! `edgeloop-sim chaos`: a fleet under a fault schedule, then a total-queue check in the manner of Jepsen's.
//!
//! The fleet runs against an in-process control plane through a fault proxy. Faults come from a seeded
//! schedule: connections cut, traffic blackholed, delay, the control plane stopped and started again on the
//! same data, agents restarted, a rogue device publishing corrupted copies of real payloads on others' topics,
//! small outboxes that overflow while the link is down (a full disk), and event clocks skewed by hours on some
//! devices. Then the faults stop, the fleet drains, every agent stops (sending its last heartbeat), and the
//! checker compares what each agent holds with what the control plane stored:
//!
//! - `lost`: sequence numbers the agent had acknowledged that are neither stored nor reported dropped;
//! - `duplicates_stored`: records stored more than once for one (device, seq);
//! - `dropped_by_policy` (the agents' outboxes) against `dropped_reported` (the drops their heartbeats told).
//!
//! The run passes when nothing is lost or duplicated and every drop was reported.

use crate::fleet::{self, FleetSpec, SimDevice};
use crate::proxy::{FaultProxy, Mode};
use anyhow::Context;
use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::fleet::Query;
use edgeloop_control_plane::{ControlPlane, ControlPlaneHandle};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The outbox bound of the devices with a small disk.
const SMALL_DISK: u64 = 6 * 1024;

/// Refusals of corrupted or forged uplinks, by the reasons they show up under.
const CORRUPT_REASONS: [&str; 6] = ["malformed_cbor", "schema", "invalid", "unsigned", "bad_signature", "too_deep"];

/// The kinds of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    Cut,
    Blackhole,
    Delay,
    RestartControlPlane,
    RestartAgents,
    Corrupt,
    DiskFull,
    ClockSkew,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::Cut,
        Fault::Blackhole,
        Fault::Delay,
        Fault::RestartControlPlane,
        Fault::RestartAgents,
        Fault::Corrupt,
        Fault::DiskFull,
        Fault::ClockSkew,
    ];

    pub fn parse(s: &str) -> Result<Vec<Fault>, String> {
        if s == "all" {
            return Ok(Fault::ALL.to_vec());
        }
        s.split(',')
            .map(|f| match f.trim() {
                "cut" => Ok(Fault::Cut),
                "blackhole" => Ok(Fault::Blackhole),
                "delay" => Ok(Fault::Delay),
                "restart-control-plane" => Ok(Fault::RestartControlPlane),
                "restart-agents" => Ok(Fault::RestartAgents),
                "corrupt" => Ok(Fault::Corrupt),
                "disk-full" => Ok(Fault::DiskFull),
                "clock-skew" => Ok(Fault::ClockSkew),
                other => Err(format!(
                    "unknown fault `{other}`; use all, or a list of cut, blackhole, delay, restart-control-plane, restart-agents, corrupt, disk-full, clock-skew"
                )),
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct ChaosOptions {
    pub devices: usize,
    pub classes: Vec<String>,
    pub duration: Duration,
    pub faults: Vec<Fault>,
    pub data_root: PathBuf,
    pub seed: u64,
    /// Longest wait for the fleet to drain once the faults stop.
    pub drain_timeout: Duration,
    /// Against control-plane replica processes on PostgreSQL and mosquitto ([`crate::chaos_cluster`]),
    /// where `restart-control-plane` SIGKILLs a replica; `corrupt` is not run there.
    pub cluster: bool,
}

/// The checker's report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChaosReport {
    pub devices: usize,
    pub duration_s: u64,
    pub faults_injected: std::collections::BTreeMap<String, u64>,
    pub generated: u64,
    pub acknowledged: u64,
    pub stored: u64,
    pub lost: u64,
    pub duplicates_stored: u64,
    pub dropped_by_policy: u64,
    pub dropped_reported: u64,
    /// Unacknowledged records still in outboxes when the drain gave up (not lost: still on the devices).
    pub unacknowledged: u64,
    pub corrupted_rejected: u64,
    /// Control-plane stops that missed their deadline (ingest's last commit); nothing acknowledged is at risk.
    pub control_plane_unclean_stops: u64,
    /// With `--cluster`: replicas SIGKILLed mid-stream (and started again).
    pub replica_kills: u64,
    pub ok: bool,
}

async fn start_cp(cfg: &Config) -> anyhow::Result<(ControlPlaneHandle, CancellationToken)> {
    let cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg.clone(), cancel.clone()).await.context("starting the control plane")?;
    Ok((cp, cancel))
}

/// Runs the fleet under faults, drains, checks, and returns the report.
pub async fn run(opts: ChaosOptions, stop: CancellationToken) -> anyhow::Result<ChaosReport> {
    if opts.cluster {
        return run_cluster(opts, stop).await;
    }
    let classes = opts.classes.iter().map(|c| crate::class_config(c)).collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!classes.is_empty(), "name at least one class");
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut injected = Injected::default();

    let mut cp = ChaosControlPlane::start(&opts.data_root).await?;
    let api = crate::http::Api::of(&cp.handle);
    let proxy_cancel = CancellationToken::new();
    let proxy = FaultProxy::start(cp.mqtt, proxy_cancel.clone()).await?;
    let spec = fleet_spec(&opts, classes, &proxy, cp.handle.trusted_key.clone(), &api).await?;
    let fleet_cancel = CancellationToken::new();
    let mut devices = fleet::start(&spec, opts.devices, &fleet_cancel).await?;
    standing_faults(&opts.faults, &mut devices, &spec, &mut injected);
    let rogue = if opts.faults.contains(&Fault::Corrupt) {
        Some(Rogue::enroll(&api, cp.mqtt, &spec.classes[0].class).await?)
    } else {
        None
    };

    let started = Instant::now();
    let mut schedule = Schedule::new(&opts.faults, &mut rng);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while started.elapsed() < opts.duration && !stop.is_cancelled() {
        tick.tick().await;
        let Some(f) = step(&mut devices, &proxy, &mut schedule, &mut rng, &mut injected) else { continue };
        match f {
            Fault::Cut | Fault::Blackhole | Fault::Delay => {}
            Fault::RestartControlPlane => cp = cp.restart(&proxy, &mut rng).await?,
            Fault::RestartAgents => restart_some_agents(&mut devices, &fleet_cancel, &mut rng).await?,
            Fault::Corrupt => {
                if let Some(r) = &rogue {
                    corrupt_some(&r.client, &devices, &mut rng).await;
                }
            }
            Fault::DiskFull | Fault::ClockSkew => {}
        }
    }

    heal(&proxy);
    fleet::drain(&devices, opts.drain_timeout).await;
    let outboxes = stop_fleet(devices, &fleet_cancel).await?;
    let handle = &cp.handle;
    let reported = |id: &str| handle.registry.get(id).and_then(|d| d.last_status).map_or(0, |st| st.dropped_total);
    let stored = async |id: &str| -> anyhow::Result<Vec<u64>> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = handle.store.query(id, Query { after_seq: after, from_ms: None, to_ms: None, limit: 10_000 })?;
            out.extend(page.iter().map(|r| r.seq));
            match page.last() {
                Some(last) if page.len() == 10_000 => after = last.seq,
                _ => return Ok(out),
            }
        }
    };
    let mut report = check(outboxes, stored, reported, started.elapsed(), injected.0).await?;
    report.corrupted_rejected = corrupted_rejected(handle) + cp.corrupted_before;
    report.control_plane_unclean_stops = cp.unclean_stops;
    if let Some(r) = rogue {
        r.task.abort();
    }
    proxy_cancel.cancel();
    cp.stop().await?;
    Ok(report)
}

/// One step of the schedule: feeds the fleet, heals what is due, and picks the next fault. The network's
/// (cut, blackhole, delay) are injected here; the caller injects the others.
fn step(
    devices: &mut [SimDevice],
    proxy: &FaultProxy,
    schedule: &mut Schedule,
    rng: &mut rand::rngs::StdRng,
    injected: &mut Injected,
) -> Option<Fault> {
    feed_once(devices);
    if schedule.heal_due() {
        heal(proxy);
    }
    let f = schedule.next_fault(rng)?;
    injected.count(f);
    match f {
        Fault::Cut => proxy.cut_all(),
        Fault::Blackhole => {
            proxy.set_mode(Mode::Blackhole);
            schedule.heal_after(rng.gen_range(2_000..5_000));
        }
        Fault::Delay => {
            proxy.set_delay(Duration::from_millis(rng.gen_range(50..300)));
            schedule.heal_after(rng.gen_range(1_000..3_000));
        }
        _ => {}
    }
    Some(f)
}

/// Faults injected, by kind (`cut`, `disk_full`...; one for each device a standing fault applies to).
#[derive(Default)]
struct Injected(std::collections::BTreeMap<String, u64>);

impl Injected {
    fn count(&mut self, f: Fault) {
        *self.0.entry(format!("{f:?}").to_lowercase()).or_insert(0) += 1;
    }
}

/// The control plane under test: stopped and started again on the same data dir and ports.
struct ChaosControlPlane {
    handle: ControlPlaneHandle,
    cancel: CancellationToken,
    /// The config of every restart: the ports the first start got, which the proxy and the rogue keep using.
    cfg: Config,
    /// The broker's address (the proxy's upstream).
    mqtt: SocketAddr,
    /// Stops that missed their deadline.
    unclean_stops: u64,
    /// Corrupted uplinks refused by the instances stopped so far (each starts its metrics at zero).
    corrupted_before: u64,
}

impl ChaosControlPlane {
    /// The first start binds port 0 and reports the ports it got; restarts come back on those ports.
    async fn start(data_root: &std::path::Path) -> anyhow::Result<ChaosControlPlane> {
        let config = |mqtt: SocketAddr, api: SocketAddr| {
            let mut cfg = Config::embedded(data_root.join("control-plane"), mqtt, api);
            cfg.durability = edgeloop_common::durable::Durability::Fsync;
            cfg
        };
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        let (handle, cancel) = start_cp(&config(any, any)).await?;
        let mqtt = SocketAddr::from(([127, 0, 0, 1], handle.mqtt_addr.1));
        let cfg = config(mqtt, handle.api_addr);
        Ok(ChaosControlPlane { handle, cancel, cfg, mqtt, unclean_stops: 0, corrupted_before: 0 })
    }

    /// Stops the control plane, cuts the fleet's connections, waits a moment and starts it again.
    async fn restart(self, proxy: &FaultProxy, rng: &mut rand::rngs::StdRng) -> anyhow::Result<ChaosControlPlane> {
        let ChaosControlPlane { handle, cancel, cfg, mqtt, mut unclean_stops, mut corrupted_before } = self;
        corrupted_before += corrupted_rejected(&handle);
        cancel.cancel();
        if let Err(e) = handle.join().await {
            // An overloaded control plane may miss its stop deadline; what it did not acknowledge is sent
            // again, which is exactly what the checker verifies.
            tracing::warn!(error = format!("{e:#}"), "control plane stopped uncleanly");
            unclean_stops += 1;
        }
        proxy.cut_all();
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1_500))).await;
        // After an unclean stop, the old ingest may hold the store a little longer: a process would have
        // exited; in process, wait for it to let go.
        let deadline = Instant::now() + Duration::from_secs(120);
        let (handle, cancel) = loop {
            match start_cp(&cfg).await {
                Ok(x) => break x,
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = format!("{e:#}"), "control plane not restartable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        };
        Ok(ChaosControlPlane { handle, cancel, cfg, mqtt, unclean_stops, corrupted_before })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.handle.join().await
    }
}

/// Corrupted or forged uplinks a control plane refused since it started.
fn corrupted_rejected(cp: &ControlPlaneHandle) -> u64 {
    CORRUPT_REASONS.iter().map(|x| cp.metrics.rejected(x)).sum()
}

/// The fleet's spec: agents connect through the proxy and enroll through `api`; with the disk-full fault,
/// every fifth device has a small disk (its outbox overflows while the link is down, and drops oldest).
async fn fleet_spec(
    opts: &ChaosOptions,
    classes: Vec<edgeloop_common::config::ClassConfig>,
    proxy: &FaultProxy,
    trusted_key: edgeloop_common::signing::TrustedKey,
    api: &crate::http::Api,
) -> anyhow::Result<FleetSpec> {
    let mqtt = ("127.0.0.1".to_string(), proxy.addr().port());
    let mut spec = FleetSpec::new(classes, mqtt, &opts.data_root.join("agents"), trusted_key);
    spec.enroll_with(api, opts.devices).await?;
    if opts.faults.contains(&Fault::DiskFull) {
        spec.customise = std::sync::Arc::new(|c| {
            if c.device_id.ends_with('0') || c.device_id.ends_with('5') {
                c.outbox_max_bytes = SMALL_DISK;
            }
        });
    }
    Ok(spec)
}

/// The faults that stand from the start: small disks (set in the spec, counted here) and skewed clocks.
fn standing_faults(faults: &[Fault], devices: &mut [SimDevice], spec: &FleetSpec, injected: &mut Injected) {
    if faults.contains(&Fault::DiskFull) {
        devices.iter().filter(|d| d.cfg.outbox_max_bytes == SMALL_DISK).for_each(|_| injected.count(Fault::DiskFull));
    }
    if faults.contains(&Fault::ClockSkew) {
        skew_clocks(devices, spec, injected);
    }
}

/// Every seventh device's clock is hours off, ahead or behind.
fn skew_clocks(devices: &mut [SimDevice], spec: &FleetSpec, injected: &mut Injected) {
    let now = edgeloop_common::unix_millis();
    for (i, d) in devices.iter_mut().enumerate().filter(|(i, _)| i % 7 == 3) {
        let skew: i64 = if i % 2 == 0 { 3 * 3_600_000 } else { -5 * 3_600_000 };
        let class = spec.classes[i % spec.classes.len()].clone();
        d.generator = crate::signals::Generator::new(class, i as u64, now.saturating_add_signed(skew));
        injected.count(Fault::ClockSkew);
    }
}

/// The device that sends corrupted payloads: enrolled in its own name, connected straight to the broker.
struct Rogue {
    client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
}

impl Rogue {
    async fn enroll(api: &crate::http::Api, mqtt: SocketAddr, class: &str) -> anyhow::Result<Rogue> {
        let key = crate::device::new_key();
        let creds = crate::device::enroll(api, "chaos-rogue", class, &key).await?;
        let (client, _, task) =
            crate::device::connect(("127.0.0.1".into(), mqtt.port()), "chaos-rogue", Some(&creds), None).await;
        Ok(Rogue { client, task })
    }
}

/// When the scheduled faults fire and when a passing one (blackhole, delay) heals. Faults come round in a
/// seeded order, so that every kind fires in a short run too; the standing ones (disk full, clock skew) are
/// applied at the start instead.
struct Schedule {
    faults: Vec<Fault>,
    turn: usize,
    next_at: Instant,
    heal_at: Option<Instant>,
}

impl Schedule {
    fn new(faults: &[Fault], rng: &mut rand::rngs::StdRng) -> Schedule {
        use rand::seq::SliceRandom;
        let next_at = Instant::now() + Duration::from_secs(2);
        let mut faults: Vec<Fault> =
            faults.iter().copied().filter(|f| !matches!(f, Fault::DiskFull | Fault::ClockSkew)).collect();
        faults.shuffle(rng);
        Schedule { faults, turn: 0, next_at, heal_at: None }
    }

    /// Whether a passing fault is due to heal now (then it is forgotten).
    fn heal_due(&mut self) -> bool {
        let due = self.heal_at.is_some_and(|t| Instant::now() >= t);
        if due {
            self.heal_at = None;
        }
        due
    }

    /// Heals the proxy `ms` milliseconds from now.
    fn heal_after(&mut self, ms: u64) {
        self.heal_at = Some(Instant::now() + Duration::from_millis(ms));
    }

    /// The fault to inject now, if one is due; the next comes 1.5 to 4 s later.
    fn next_fault(&mut self, rng: &mut rand::rngs::StdRng) -> Option<Fault> {
        if Instant::now() < self.next_at || self.faults.is_empty() {
            return None;
        }
        self.next_at = Instant::now() + Duration::from_millis(rng.gen_range(1_500..4_000));
        let f = self.faults[self.turn % self.faults.len()];
        self.turn += 1;
        Some(f)
    }
}

/// One 100 ms tick of samples for every device (200 for fast classes, 5 for slow ones); a full queue drops
/// them, as a sensor's buffer would.
fn feed_once(devices: &mut [SimDevice]) {
    for d in devices.iter_mut() {
        let n = if d.fast { 200 } else { 5 };
        for s in d.generator.take(n) {
            if d.samples.try_send(s).is_ok() {
                d.sent += 1;
            }
        }
    }
}

/// Lets traffic through the proxy again, without delay.
fn heal(proxy: &FaultProxy) {
    proxy.set_mode(Mode::Pass);
    proxy.set_delay(Duration::ZERO);
}

/// Restarts a quarter of the agents (at least one), picked at random.
async fn restart_some_agents(
    devices: &mut Vec<SimDevice>,
    fleet_cancel: &CancellationToken,
    rng: &mut rand::rngs::StdRng,
) -> anyhow::Result<()> {
    let k = (devices.len() / 4).max(1);
    for _ in 0..k {
        let i = rng.gen_range(0..devices.len());
        let d = devices.remove(i);
        devices.insert(i, d.restart(fleet_cancel).await.with_context(|| format!("restarting agent {i}"))?);
    }
    Ok(())
}

/// Publishes bit-flipped copies of plausible payloads on some devices' telemetry topics.
async fn corrupt_some(client: &rumqttc::AsyncClient, devices: &[SimDevice], rng: &mut rand::rngs::StdRng) {
    for _ in 0..5 {
        let d = &devices[rng.gen_range(0..devices.len())];
        let records = vec![edgeloop_common::envelope::Record {
            seq: 1,
            ts_ms: edgeloop_common::unix_millis(),
            sensor: "x".into(),
            features: vec![1.0; 8],
            score: None,
            flags: 0,
        }];
        let _ = d;
        let env = edgeloop_common::envelope::Envelope::new(
            "chaos-rogue",
            1,
            0,
            edgeloop_common::envelope::Body::Telemetry(edgeloop_common::envelope::TelemetryBatch {
                from: 1,
                to: 1,
                records,
            }),
        );
        let mut bytes = edgeloop_common::envelope::encode(&env);
        for _ in 0..rng.gen_range(1..4) {
            let i = rng.gen_range(0..bytes.len());
            bytes[i] ^= 1 << rng.gen_range(0..8);
        }
        // On its own topic: the broker's front closes a device that publishes on another's.
        let topic = edgeloop_common::topics::topic("chaos-rogue", edgeloop_common::topics::Channel::Telemetry);
        let _ = client.publish(topic, rumqttc::QoS::AtLeastOnce, false, bytes).await;
    }
}

/// Stops every agent (their last heartbeats report their drops, which travel through the broker to ingest);
/// returns each agent's outbox.
async fn stop_fleet(
    devices: Vec<SimDevice>,
    fleet_cancel: &CancellationToken,
) -> anyhow::Result<Vec<(String, std::sync::Arc<edgeloop_agent::outbox::Outbox>)>> {
    fleet_cancel.cancel();
    let mut outboxes = Vec::new();
    for d in devices {
        let outbox = d.agent.outbox.clone();
        let id = d.agent.device.clone();
        drop(d.samples);
        d.agent.join().await.with_context(|| format!("stopping agent {id}"))?;
        outboxes.push((id, outbox));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(outboxes)
}

/// Compares each agent's outbox with what the control plane stored (`stored`: a device's stored sequences)
/// and with the drops its heartbeats reported (`reported`).
async fn check(
    outboxes: Vec<(String, std::sync::Arc<edgeloop_agent::outbox::Outbox>)>,
    stored: impl AsyncFn(&str) -> anyhow::Result<Vec<u64>>,
    reported: impl Fn(&str) -> u64,
    elapsed: Duration,
    injected: std::collections::BTreeMap<String, u64>,
) -> anyhow::Result<ChaosReport> {
    let mut r = ChaosReport {
        devices: outboxes.len(),
        duration_s: elapsed.as_secs(),
        faults_injected: injected,
        generated: 0,
        acknowledged: 0,
        stored: 0,
        lost: 0,
        duplicates_stored: 0,
        dropped_by_policy: 0,
        dropped_reported: 0,
        unacknowledged: 0,
        corrupted_rejected: 0,
        control_plane_unclean_stops: 0,
        replica_kills: 0,
        ok: false,
    };
    for (id, outbox) in outboxes {
        let s = outbox.stats();
        r.generated += s.last_seq;
        r.acknowledged += s.acked;
        r.unacknowledged += s.last_seq - s.acked.min(s.last_seq);
        r.dropped_by_policy += s.dropped_total;
        r.dropped_reported += reported(&id);
        let mut seen = BTreeSet::new();
        for seq in stored(&id).await? {
            r.stored += 1;
            if !seen.insert(seq) {
                r.duplicates_stored += 1;
            }
        }
        let dropped: Vec<_> = s.dropped_ranges.clone();
        r.lost += (1..=s.acked).filter(|q| !seen.contains(q) && !dropped.iter().any(|d| d.contains(*q))).count() as u64;
    }
    r.ok = r.lost == 0 && r.duplicates_stored == 0 && r.dropped_by_policy == r.dropped_reported;
    Ok(r)
}

/// [`run`] against [`crate::chaos_cluster::ChaosCluster`]: the same fleet, schedule and check, with a replica
/// SIGKILLed where the single control plane is restarted.
async fn run_cluster(opts: ChaosOptions, stop: CancellationToken) -> anyhow::Result<ChaosReport> {
    anyhow::ensure!(
        !opts.faults.contains(&Fault::Corrupt),
        "the corrupt fault is not run with --cluster (its refusals are counted by the single control plane)"
    );
    let classes = opts.classes.iter().map(|c| crate::class_config(c)).collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!classes.is_empty(), "name at least one class");
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut injected = Injected::default();
    let mut cluster = crate::chaos_cluster::ChaosCluster::start(&opts.data_root.join("cluster")).await?;
    let proxy_cancel = CancellationToken::new();
    let proxy = FaultProxy::start(cluster.mqtt, proxy_cancel.clone()).await?;
    let spec = fleet_spec(&opts, classes, &proxy, cluster.trusted_key.clone(), &cluster.api).await?;
    let fleet_cancel = CancellationToken::new();
    let mut devices = fleet::start(&spec, opts.devices, &fleet_cancel).await?;
    standing_faults(&opts.faults, &mut devices, &spec, &mut injected);

    let started = Instant::now();
    let mut schedule = Schedule::new(&opts.faults, &mut rng);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while started.elapsed() < opts.duration && !stop.is_cancelled() {
        tick.tick().await;
        let Some(f) = step(&mut devices, &proxy, &mut schedule, &mut rng, &mut injected) else { continue };
        match f {
            Fault::Cut | Fault::Blackhole | Fault::Delay => {}
            Fault::RestartControlPlane => cluster.kill_one(&mut rng).await?,
            Fault::RestartAgents => restart_some_agents(&mut devices, &fleet_cancel, &mut rng).await?,
            Fault::Corrupt | Fault::DiskFull | Fault::ClockSkew => {}
        }
    }

    heal(&proxy);
    fleet::drain(&devices, opts.drain_timeout).await;
    let outboxes = stop_fleet(devices, &fleet_cancel).await?;
    // The registry's last heartbeats reach PostgreSQL with the replicas' next commit.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let reported = cluster.dropped_reported().await?;
    let cl = &cluster;
    let mut report = check(
        outboxes,
        async |id: &str| cl.stored_seqs(id).await,
        |id: &str| reported.get(id).copied().unwrap_or(0),
        started.elapsed(),
        injected.0,
    )
    .await?;
    report.replica_kills = cluster.kills;
    proxy_cancel.cancel();
    report.control_plane_unclean_stops = cluster.stop();
    Ok(report)
}
