//! Many agents in one process, for demos, tests and load runs. Each has its own device id, sled data dir and
//! signal seed, and is fed through its own in-process channel source.

use crate::signals::Generator;
use anyhow::Context;
use edgeloop_agent::config::AgentConfig;
use edgeloop_agent::source::channel::ChannelSource;
use edgeloop_agent::source::Sample;
use edgeloop_agent::{Agent, AgentHandle};
use edgeloop_common::config::ClassConfig;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One simulated device.
pub struct SimDevice {
    pub agent: AgentHandle,
    pub samples: mpsc::Sender<Sample>,
    pub generator: Generator,
    pub class: String,
    /// A fast (windowed) class: fed in real time rather than accelerated.
    pub fast: bool,
    /// Samples handed to the agent so far.
    pub sent: u64,
    /// What the agent was started with, and its own stop token, to restart it.
    pub cfg: AgentConfig,
    pub cancel: CancellationToken,
}

impl SimDevice {
    /// Stops the agent (it commits what it took) and starts it again on the same data dir, as a device that
    /// reboots does.
    pub async fn restart(self, fleet_cancel: &CancellationToken) -> anyhow::Result<SimDevice> {
        let d = self;
        d.cancel.cancel();
        let outbox = d.agent.outbox.clone();
        d.agent.join().await?;
        // A subsystem that missed its stop deadline may still hold the outbox (and its file lock) for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while std::sync::Arc::strong_count(&outbox) > 1 {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the stopped agent still holds its outbox after 60 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        drop(outbox);
        let (tx, source) = ChannelSource::new(1024);
        let cancel = fleet_cancel.child_token();
        let agent = Agent::start(d.cfg.clone(), vec![Box::new(source)], cancel.clone()).await?;
        let SimDevice { generator, class, fast, cfg, .. } = d;
        let mut this = SimDevice { agent, samples: tx, generator, class, fast, sent: 0, cfg, cancel };
        // What the old agent took is committed; what was still queued never got a sequence number (a device's
        // readings in memory at a reboot). Counting starts again with the new agent.
        this.sent = 0;
        Ok(this)
    }
}

/// How to build each agent.
#[derive(Clone)]
pub struct FleetSpec {
    pub classes: Vec<ClassConfig>,
    pub mqtt: (String, u16),
    pub data_root: PathBuf,
    /// Tweaks applied to every agent config (model, durability, byte bound...).
    pub customise: Customise,
    /// Index of the first device (`sim-{first_index:04}`), to add devices to a running fleet.
    pub first_index: usize,
    /// The fleet's CA (PEM): agents speak mqtts:// and HTTPS, trusting only it.
    pub tls_ca: Option<Vec<u8>>,
    /// Enrollment per class: each agent enrolls with its class's token on first start.
    pub enroll: std::collections::HashMap<String, edgeloop_agent::identity::Enroll>,
    /// The control plane's keys: agents delete records only on acknowledgements signed by one of them.
    pub trusted_keys: Vec<edgeloop_common::signing::TrustedKey>,
}

/// A tweak applied to each agent's config.
pub type Customise = std::sync::Arc<dyn Fn(&mut AgentConfig) + Send + Sync>;

impl FleetSpec {
    /// Creates an enrollment token for each class through the control plane's API (`api` carries an admin
    /// token), good for `uses` devices each.
    pub async fn enroll_with(&mut self, api: &crate::http::Api, uses: usize) -> anyhow::Result<()> {
        for c in &self.classes {
            let body = serde_json::json!({"class": c.class, "uses": uses.max(1), "expires_in_secs": 3600});
            let (status, text) = api.post_json("/api/v1/enrollment-tokens", &body).await?;
            anyhow::ensure!(status == 201, "creating an enrollment token for {}: HTTP {status}: {text}", c.class);
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let token = v["token"].as_str().unwrap_or_default().to_string();
            let e = edgeloop_agent::identity::Enroll { url: api.base_url().to_string(), token };
            self.enroll.insert(c.class.clone(), e);
        }
        Ok(())
    }

    /// Agents of `classes` connecting to `mqtt`, trusting the control plane key `trusted`.
    pub fn new(
        classes: Vec<ClassConfig>,
        mqtt: (String, u16),
        data_root: &Path,
        trusted: edgeloop_common::signing::TrustedKey,
    ) -> Self {
        FleetSpec {
            trusted_keys: vec![trusted],
            classes,
            mqtt,
            data_root: data_root.to_path_buf(),
            customise: std::sync::Arc::new(|_| {}),
            first_index: 0,
            enroll: Default::default(),
            tls_ca: None,
        }
    }
}

/// Starts `n` agents named `sim-0000`.., cycling through the classes.
pub async fn start(spec: &FleetSpec, n: usize, cancel: &CancellationToken) -> anyhow::Result<Vec<SimDevice>> {
    let mut out = Vec::with_capacity(n);
    for i in spec.first_index..spec.first_index + n {
        let class = spec.classes[i % spec.classes.len()].clone();
        let id = format!("sim-{i:04}");
        let mut cfg = AgentConfig::in_process(&id, class.clone(), spec.mqtt.clone(), spec.data_root.join(&id));
        cfg.identity.enroll = spec.enroll.get(&class.class).cloned();
        cfg.trusted_keys = spec.trusted_keys.clone();
        if let Some(ca) = &spec.tls_ca {
            cfg.use_tls(ca).with_context(|| format!("{id}: the fleet's CA"))?;
        }
        (spec.customise)(&mut cfg);
        let (tx, source) = ChannelSource::new(1024);
        let agent_cancel = cancel.child_token();
        let agent = Agent::start(cfg.clone(), vec![Box::new(source)], agent_cancel.clone()).await?;
        out.push(SimDevice {
            agent,
            samples: tx,
            generator: Generator::new(class.clone(), i as u64, edgeloop_common::unix_millis()),
            fast: class.sensors[0].kind == edgeloop_common::config::SignalKind::Fast,
            sent: 0,
            cfg,
            cancel: agent_cancel,
            class: class.class,
        });
    }
    Ok(out)
}

/// Feeds every device once per 100 ms tick (fast classes 200 samples, real time at 2 kHz; slow classes
/// `slow_per_tick`, accelerated) until `duration` passes or `stop` fires. `report(elapsed, devices)` is called
/// every 5 s.
pub async fn feed(
    devices: &mut [SimDevice],
    slow_per_tick: usize,
    duration: Option<std::time::Duration>,
    stop: &CancellationToken,
    report: &mut (dyn FnMut(std::time::Duration, &[SimDevice]) + Send),
) -> anyhow::Result<()> {
    let mut last_report = std::time::Instant::now();
    let mut every_tick = |elapsed: std::time::Duration, devices: &mut [SimDevice]| {
        if last_report.elapsed() >= std::time::Duration::from_secs(5) {
            last_report = std::time::Instant::now();
            report(elapsed, devices);
        }
    };
    let per_tick = move |d: &SimDevice| if d.fast { 200 } else { slow_per_tick };
    feed_ticks(devices, &per_tick, duration, stop, &mut every_tick).await
}

/// As [`feed`], with `per_tick(device)` samples per device and tick, calling `on_tick(elapsed, devices)` after
/// every 100 ms tick, where it may change the devices' generators (to inject a fault, say).
pub async fn feed_ticks(
    devices: &mut [SimDevice],
    per_tick: &(dyn Fn(&SimDevice) -> usize + Send + Sync),
    duration: Option<std::time::Duration>,
    stop: &CancellationToken,
    on_tick: &mut (dyn FnMut(std::time::Duration, &mut [SimDevice]) + Send),
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
        for d in devices.iter_mut() {
            let n = per_tick(d);
            for s in d.generator.take(n) {
                if d.samples.send(s).await.is_err() {
                    anyhow::bail!("agent {} stopped unexpectedly", d.agent.device);
                }
                d.sent += 1;
            }
        }
        on_tick(started.elapsed(), devices);
    }
}

/// Waits until every agent has committed every sample fed to it (through [`feed`]) and every outbox is
/// acknowledged, or `limit` passes.
pub async fn drain(devices: &[SimDevice], limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline
        && devices.iter().any(|d| {
            let s = d.agent.outbox.stats();
            s.acked < s.durable_seq || d.agent.health.samples.load(std::sync::atomic::Ordering::Relaxed) < d.sent
        })
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Options of `edgeloop-sim fleet`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub devices: usize,
    pub classes: Vec<String>,
    /// `host:port` of the broker the control plane listens on.
    pub broker: (String, u16),
    pub data_root: PathBuf,
    pub duration: Option<std::time::Duration>,
    /// Inject the generators' scheduled faults (their ground truth is printed with the summary).
    pub faults: bool,
    /// Event time advanced per 100 ms tick for slow classes, in samples (fast classes run in real time).
    pub slow_samples_per_tick: usize,
    /// The control plane's API, to enroll the agents (with an admin token).
    pub enroll_api: Option<crate::http::Api>,
    /// The control plane's keys; when empty, the signing key is read from `enroll_api`.
    pub trusted_keys: Vec<edgeloop_common::signing::TrustedKey>,
}

/// The fleet's closing numbers.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct RunSummary {
    pub devices: usize,
    pub generated: u64,
    pub acknowledged: u64,
    pub dropped: u64,
    pub bad_samples: u64,
    pub fault_windows: usize,
}

/// Runs a fleet against a broker until `duration` passes or `stop` fires, then drains (up to 60 s) and
/// returns the summary.
pub async fn run(opts: RunOptions, stop: CancellationToken) -> anyhow::Result<RunSummary> {
    let classes = opts.classes.iter().map(|c| crate::class_config(c)).collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!classes.is_empty(), "name at least one class");
    let mut keys = crate::rollouts::control_plane_keys(opts.trusted_keys.clone(), opts.enroll_api.as_ref()).await?;
    let mut spec = FleetSpec::new(classes, opts.broker.clone(), &opts.data_root, keys.remove(0));
    spec.trusted_keys.extend(keys);
    if let Some(api) = &opts.enroll_api {
        spec.enroll_with(api, opts.devices).await?;
    }
    let cancel = CancellationToken::new();
    let mut devices = start(&spec, opts.devices, &cancel).await?;
    let now = edgeloop_common::unix_millis();
    let mut fault_windows = 0;
    if opts.faults {
        for (i, d) in devices.iter_mut().enumerate() {
            let class = spec.classes[i % spec.classes.len()].clone();
            d.generator = Generator::with_faults(class, i as u64, now, 30 * 86_400_000);
            fault_windows += d.generator.labels().len();
        }
    }
    feed(&mut devices, opts.slow_samples_per_tick, opts.duration, &stop, &mut |_, _| {}).await?;
    drain(&devices, std::time::Duration::from_secs(60)).await;
    cancel.cancel();
    let mut sum =
        RunSummary { devices: devices.len(), generated: 0, acknowledged: 0, dropped: 0, bad_samples: 0, fault_windows };
    for d in devices {
        drop(d.samples);
        let (outbox, health) = (d.agent.outbox.clone(), d.agent.health.clone());
        d.agent.join().await?;
        let s = outbox.stats();
        sum.generated += s.last_seq;
        sum.acknowledged += s.acked;
        sum.dropped += s.dropped_total;
        sum.bad_samples += health.bad_samples.load(std::sync::atomic::Ordering::Relaxed);
    }
    Ok(sum)
}
