//! Starting and stopping an agent.
//!
//! [`Agent::start`] opens the outbox, loads the identity and the model, and starts the subsystems, each from the
//! config, what it depends on, the agent's cancellation token and the [`TaskTracker`] that owns its tasks: the
//! sources, the updater, the collector and the uplink. Shutdown runs in order, so nothing already taken is lost:
//! sources stop first, the collector commits whatever they delivered, then the uplink sends a last heartbeat
//! and hangs up. Each phase has a deadline.

use crate::collector::{self, Collector, CommitParams};
use crate::config::{AgentConfig, SourceConfig};
use crate::health::Health;
use crate::identity::Credentials;
use crate::inference::Model;
use crate::outbox::Outbox;
use crate::source::{modbus::ModbusSource, stdin::StdinSource, udp::UdpSource, Sample, SampleSink, Source};
use crate::updater::agent::{AgentFiles, AgentUpdater};
use crate::updater::config::{ConfigFiles, ConfigUpdater};
use crate::updater::slot::{Loaded, ModelInfo, ModelSlot, SlotEvent};
use crate::updater::state::Identity;
use crate::updater::{self, Files, Pointer, Updater};
use crate::uplink::{Uplink, UplinkCounters};
use anyhow::Context;
use edgeloop_common::signing::Signed;
use edgeloop_common::topics::Channel;
use edgeloop_common::update::UpdateReport;
use ring::signature::Ed25519KeyPair;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long the collector may take to commit after the sources stop.
const COLLECTOR_DEADLINE: Duration = Duration::from_secs(10);
/// How long the uplink may take to say goodbye.
const UPLINK_DEADLINE: Duration = Duration::from_secs(2);

pub struct Agent;

type Task = JoinHandle<anyhow::Result<()>>;

/// Waits for the stop signal, or for a subsystem to fail on its own (then stops the others and reports the
/// failure, so the process exits non-zero and its supervisor restarts it); then stops in order. The
/// collector finishing cleanly because every source ended is not a failure: the uplink goes on draining.
///
/// `source_tasks` (the sources and the updater) stop on `cancel`; the collector and the uplink on their own
/// tokens, in that order. Every task is on `tasks`, which is closed at the end and, unless the uplink had to be
/// abandoned, empty.
async fn supervise(
    cancel: CancellationToken,
    source_tasks: Vec<Task>,
    collector: CollectorHandle,
    uplink: Running,
    tasks: TaskTracker,
) -> anyhow::Result<()> {
    tasks.close();
    let (collector_cancel, uplink_cancel) = (collector.running.cancel, uplink.cancel);
    let (mut collector, mut uplink) = (Some(collector.running.task), Some(uplink.task));
    let mut failure: Option<anyhow::Error> = None;
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            r = async { collector.as_mut().expect("present until taken").await }, if collector.is_some() => {
                collector = None;
                match outcome("collector", r) {
                    // Every source has ended (stdin closed, say): nothing more to collect, but the uplink
                    // keeps draining the outbox until the agent is stopped.
                    Ok(()) => tracing::info!("all sources ended; the uplink keeps draining the outbox"),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            r = async { uplink.as_mut().expect("present until taken").await } => {
                uplink = None;
                failure = Some(outcome("uplink", r).err().unwrap_or_else(|| anyhow::anyhow!("uplink stopped unexpectedly")));
                break;
            }
        }
    }
    if let Some(e) = &failure {
        tracing::error!(error = format!("{e:#}"), "subsystem failed; stopping the agent");
    }
    cancel.cancel();
    tracing::info!("stopping: sources");
    for t in source_tasks {
        if let Ok(Err(e)) = t.await {
            failure = failure.or(Some(e));
        }
    }
    collector_cancel.cancel();
    if let Some(t) = collector {
        let r = match tokio::time::timeout(COLLECTOR_DEADLINE, t).await {
            Ok(r) => outcome("collector", r),
            Err(_) => Err(anyhow::anyhow!("collector did not commit within {COLLECTOR_DEADLINE:?}")),
        };
        failure = failure.or(r.err());
    }
    tracing::info!("stopping: uplink");
    uplink_cancel.cancel();
    if let Some(t) = uplink {
        match tokio::time::timeout(UPLINK_DEADLINE, t).await {
            Ok(r) => failure = failure.or(outcome("uplink", r).err()),
            Err(_) => {
                tracing::warn!("uplink did not stop within {UPLINK_DEADLINE:?}; abandoned");
                return failure.map_or(Ok(()), Err);
            }
        }
    }
    // Every task has been joined above; this only confirms that none is left behind.
    tasks.wait().await;
    failure.map_or(Ok(()), Err)
}

fn outcome(what: &str, r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match r {
        Ok(r) => r.with_context(|| format!("{what} failed")),
        Err(e) => Err(anyhow::anyhow!("{what} panicked: {e}")),
    }
}

/// A running agent.
pub struct AgentHandle {
    pub device: String,
    pub health: Arc<Health>,
    pub outbox: Arc<Outbox>,
    pub counters: Arc<UplinkCounters>,
    /// Where the collector takes its model from: [`ModelSlot::set_active`] swaps it between two samples,
    /// keeping the feature pipeline's state (a restart would begin its rolling and seasonal windows anew).
    pub slot: Arc<ModelSlot>,
    /// The class configuration in force (the class file's, or one rolled out).
    pub class: watch::Receiver<Arc<edgeloop_common::config::ClassConfig>>,
    /// Set when the agent stopped to be started again: into a new build of itself, or back to the old one.
    /// `edgeloop-agent` then exits with [`updater::agent::RESTART_EXIT_CODE`].
    pub restart: Arc<AtomicBool>,
    tasks: TaskTracker,
    task: JoinHandle<anyhow::Result<()>>,
}

impl AgentHandle {
    /// Every task the agent spawned (sources, updater, collector, uplink): closed once they all started, so
    /// `tasks().wait()` returns when the last has ended.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Waits for the agent to stop (after its cancellation token fired, or a subsystem failed).
    pub async fn join(self) -> anyhow::Result<()> {
        self.task.await.context("agent task panicked")?
    }
}

impl Agent {
    /// Starts an agent with the sources in its config plus `extra` (an in-process channel, say). It runs until
    /// `cancel` fires.
    ///
    /// Each step below starts one subsystem from the config, what the steps before it made, the agent's
    /// cancellation token and the task tracker that owns every task it spawns; [`supervise`] stops them in
    /// order.
    pub async fn start(
        mut cfg: AgentConfig,
        extra: Vec<Box<dyn Source>>,
        cancel: CancellationToken,
    ) -> anyhow::Result<AgentHandle> {
        let tasks = TaskTracker::new();
        let health = Arc::new(Health::default());
        let counters = Arc::new(UplinkCounters::default());
        // The class configuration last rolled out, if any, in place of the class file's.
        let classes = restore_class(&mut cfg).await?;
        // From here on, this agent's warnings and errors are kept for the control plane (`up/logs`).
        let logs = crate::logs::LogHub::global().register(
            &cfg.device_id,
            cfg.class.logs.clone(),
            edgeloop_common::unix_millis(),
        );
        // Durable state first: the private data directory and the outbox in it.
        let outbox = open_storage(&cfg).await?;
        let alerts = {
            let o = outbox.clone();
            Arc::new(tokio::task::spawn_blocking(move || crate::alerts::AlertBook::open(&o)).await??)
        };
        // Who the device is: its key, and its MQTT credentials (enrolling if it has none yet).
        let device = load_identity(&cfg, &cancel).await?;
        // The model to score with: the updater's pointer, or the configured file.
        let (models, slot_events) = restore_models(&cfg, &health).await?;
        // Sources feed the collector over one channel; they stop first.
        let (samples, mut stopped_first) = start_sources(&cfg, extra, &health, &cancel, &tasks).await?;
        // Model updates: the uplink hands over desired states and sends the updater's reports.
        // A bundle's class configuration goes from the model updater, which takes bundles, to the config updater.
        let (bundled_tx, bundled_rx) = mpsc::unbounded_channel();
        let (updater, updates) = start_updater(&cfg, &models, slot_events, &health, bundled_tx, &cancel, &tasks)?;
        stopped_first.extend(updater);
        // Class configurations: applied in place, watched, reverted when the device stops being healthy.
        let live = LiveClass::new(&cfg, classes, &outbox);
        // The agent's own binary: installed up to a restart into it, watched after one.
        let restart = Arc::new(AtomicBool::new(false));
        let mut downlinks = Vec::new();
        if let Some((_, _, reports)) = &updates {
            let (task, configs) =
                start_config_updater(&cfg, &live, (&counters, &health, reports), bundled_rx, &cancel, &tasks)?;
            stopped_first.push(task);
            downlinks.push((Channel::Config, configs));
            let (task, agents) =
                start_agent_updater(&cfg, (&outbox, &counters, &health, reports), &restart, &cancel, &tasks).await?;
            stopped_first.push(task);
            downlinks.push((Channel::Agent, agents));
        }
        // The collector: samples to features to scores to committed outbox records.
        let collector = start_collector(&cfg, &models, (&outbox, &alerts), &health, samples, &live, &tasks);
        // The uplink drains the outbox whenever the collector commits.
        let updates = updates.map(|(desired, reports, _)| (desired, reports));
        let log_ring = logs.ring().clone();
        let uplink = start_uplink(
            &cfg,
            &outbox,
            &health,
            &counters,
            device,
            (updates, downlinks, &live, logs),
            (&collector, alerts.clone()),
            &tasks,
        );
        // The status file a technician reads with `edgeloop-agent status`.
        start_status_file(&cfg, (&health, &outbox, &counters, &log_ring, &alerts), &cancel, &tasks);

        let handle_tasks = tasks.clone();
        let task = tokio::spawn(supervise(cancel, stopped_first, collector, uplink, tasks));
        Ok(AgentHandle {
            device: cfg.device_id.clone(),
            health,
            outbox,
            counters,
            slot: models.slot,
            class: live.config.subscribe(),
            restart,
            tasks: handle_tasks,
            task,
        })
    }
}

/// `edgeloop-agent self-test`: what a start needs that can fail, without starting: the config (already
/// loaded), the class configuration in force, and the model the update pointer names (its hash checked and
/// loaded by tract) or the configured one. Opens nothing a running agent holds. Returns a summary. Blocking.
pub fn self_test(mut cfg: AgentConfig) -> anyhow::Result<String> {
    cfg.class = updater::config::restore(&ConfigFiles::new(&cfg.data_dir), &cfg.class);
    let spec = cfg.class.pipeline();
    let width = spec.sensors.iter().find(|s| s.name == cfg.model_sensor).map(|s| s.width()).unwrap_or(0);
    let files = Files::new(&cfg.data_dir);
    let pointer = files.load_pointer()?;
    let model = match (&pointer.active, &cfg.model) {
        (Some(info), _) => {
            files.load_model(info, width).with_context(|| format!("model {}", info.label()))?;
            info.label()
        }
        (None, Some(path)) => {
            let m = Model::load_configured(path, width).with_context(|| format!("model {}", path.display()))?;
            format!("configured v{}", m.version())
        }
        (None, None) => "none".into(),
    };
    Ok(format!(
        "edgeloop-agent {} ({}): config, class {} and model {model} load",
        crate::version::build(),
        std::env::consts::ARCH,
        cfg.class.class
    ))
}

/// The class configurations an agent starts with: the class file's, and the one in force.
struct Classes {
    file: edgeloop_common::config::ClassConfig,
    /// The device's own outbox bound (`storage.outbox_max_bytes` other than its class file's), which no class
    /// configuration overrides.
    outbox_override: Option<u64>,
}

/// Puts the class configuration last rolled out (if any, and if it still fits the class file) in place of the
/// class file's in `cfg`.
async fn restore_class(cfg: &mut AgentConfig) -> anyhow::Result<Classes> {
    let file = cfg.class.clone();
    let outbox_override = (cfg.outbox_max_bytes != file.outbox.max_bytes).then_some(cfg.outbox_max_bytes);
    let (files, f) = (ConfigFiles::new(&cfg.data_dir), file.clone());
    cfg.class = tokio::task::spawn_blocking(move || updater::config::restore(&files, &f)).await?;
    cfg.outbox_max_bytes = outbox_override.unwrap_or(cfg.class.outbox.max_bytes);
    Ok(Classes { file, outbox_override })
}

/// The class configuration in force, shared by the config updater (which changes it) and the subsystems
/// that follow it.
struct LiveClass {
    classes: Classes,
    config: watch::Sender<Arc<edgeloop_common::config::ClassConfig>>,
    commit: watch::Sender<CommitParams>,
    outbox: Arc<Outbox>,
}

impl LiveClass {
    fn new(cfg: &AgentConfig, classes: Classes, outbox: &Arc<Outbox>) -> LiveClass {
        LiveClass {
            classes,
            config: watch::channel(Arc::new(cfg.class.clone())).0,
            commit: watch::channel(CommitParams::of(&cfg.class)).0,
            outbox: outbox.clone(),
        }
    }

    fn handle(&self) -> updater::config::Live {
        updater::config::Live {
            config: self.config.clone(),
            commit: self.commit.clone(),
            outbox: self.outbox.clone(),
            outbox_override: self.classes.outbox_override,
        }
    }
}

/// Spawns the class-configuration updater (stopped with the sources); returns its task and where the uplink
/// hands it desired configurations.
fn start_config_updater(
    cfg: &AgentConfig,
    live: &LiveClass,
    (counters, health, reports): (&Arc<UplinkCounters>, &Arc<Health>, &mpsc::UnboundedSender<UpdateReport>),
    bundled: mpsc::UnboundedReceiver<Signed>,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<(Task, watch::Sender<Option<Signed>>)> {
    let files = ConfigFiles::new(&cfg.data_dir);
    let pointer = files.load_pointer()?;
    let (tx, rx) = watch::channel(None);
    let up = ConfigUpdater {
        trusted: cfg.updates.as_ref().map(|u| u.trusted.clone()).unwrap_or_else(|| cfg.trusted_keys.clone()),
        device: cfg.device_id.clone(),
        class: cfg.class.class.clone(),
        files,
        pointer,
        base: live.classes.file.clone(),
        live: live.handle(),
        counters: counters.clone(),
        reports: reports.clone(),
        health: health.clone(),
        bundled: Some(bundled),
    };
    let fut = up.run(rx, cancel.child_token());
    Ok((spawn_stopping_on_failure(tasks, cancel, "config updater".into(), "config updater", fut), tx))
}

/// Spawns the agent-binary updater (stopped with the sources); returns its task and where the uplink hands
/// it desired agent builds.
async fn start_agent_updater(
    cfg: &AgentConfig,
    (outbox, counters, health, reports): (
        &Arc<Outbox>,
        &Arc<UplinkCounters>,
        &Arc<Health>,
        &mpsc::UnboundedSender<UpdateReport>,
    ),
    restart: &Arc<AtomicBool>,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<(Task, watch::Sender<Option<Signed>>)> {
    let ucfg = cfg.updates.clone().context("self-update needs [updates]")?;
    let files = AgentFiles::new(&cfg.data_dir);
    let f = files.clone();
    let pointer = tokio::task::spawn_blocking(move || f.load_pointer()).await??;
    let (tx, rx) = watch::channel(None);
    let up = AgentUpdater {
        me: updater::agent::Me {
            device: cfg.device_id.clone(),
            class: cfg.class.class.clone(),
            arch: std::env::consts::ARCH.to_string(),
            max_bytes: ucfg.max_agent_bytes,
        },
        trusted: ucfg.trusted,
        files,
        pointer,
        http: crate::identity::http_client(cfg.tls_ca.as_ref(), None)?,
        artifact_base: ucfg.artifact_base,
        config_path: cfg.path.clone(),
        own_sha256: None,
        counters: counters.clone(),
        outbox: outbox.clone(),
        reports: reports.clone(),
        health: health.clone(),
        restart: restart.clone(),
        stop: cancel.clone(),
    };
    let fut = up.run(rx, cancel.child_token());
    Ok((spawn_stopping_on_failure(tasks, cancel, "agent updater".into(), "agent updater", fut), tx))
}

/// Writes `<data_dir>/status.json` every few seconds, and once more when the agent stops.
fn start_status_file(
    cfg: &AgentConfig,
    (health, outbox, counters, logs, alerts): (
        &Arc<Health>,
        &Arc<Outbox>,
        &Arc<UplinkCounters>,
        &crate::logs::SharedRing,
        &Arc<crate::alerts::AlertBook>,
    ),
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) {
    let (dir, device, class) = (cfg.data_dir.clone(), cfg.device_id.clone(), cfg.class.class.clone());
    let (health, outbox, counters, cancel) = (health.clone(), outbox.clone(), counters.clone(), cancel.clone());
    let (logs, alerts) = (logs.clone(), alerts.clone());
    tasks.spawn(async move {
        let mut every = tokio::time::interval(crate::local_status::EVERY);
        loop {
            let stopping = tokio::select! {
                _ = cancel.cancelled() => true,
                _ = every.tick() => false,
            };
            let (dir, device, class) = (dir.clone(), device.clone(), class.clone());
            let (health, outbox, counters, logs) = (health.clone(), outbox.clone(), counters.clone(), logs.clone());
            let alerts = alerts.clone();
            let written = tokio::task::spawn_blocking(move || {
                let s = crate::local_status::snapshot((&device, &class), &health, &outbox, &counters, &logs, &alerts);
                crate::local_status::write(&dir, &s)
            })
            .await;
            if let Ok(Err(e)) = written {
                tracing::warn!(error = %e, "cannot write the status file");
            }
            if stopping {
                return;
            }
        }
    });
}

/// A subsystem that runs as one task with its own stop token (the collector, the uplink): stopped in turn,
/// not by the agent's token.
struct Running {
    task: Task,
    cancel: CancellationToken,
}

/// Creates the data directory private (0700, tightening what is open to group or others) and opens the
/// outbox in it.
async fn open_storage(cfg: &AgentConfig) -> anyhow::Result<Arc<Outbox>> {
    // Telemetry, keys and credentials live here: 0700, with nothing in it open to group or others.
    let data_dir = cfg.data_dir.clone();
    tokio::task::spawn_blocking(move || edgeloop_common::private::data_dir(&data_dir))
        .await?
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let outbox_dir = cfg.data_dir.join("outbox");
    let (durability, max_bytes) = (cfg.durability, cfg.outbox_max_bytes);
    let outbox = tokio::task::spawn_blocking(move || Outbox::open(&outbox_dir, durability, max_bytes))
        .await?
        .with_context(|| format!("opening the outbox in {}", cfg.data_dir.display()))?;
    Ok(Arc::new(outbox))
}

/// The device key (created on first start) and the MQTT credentials.
struct DeviceIdentity {
    key: Arc<Ed25519KeyPair>,
    credentials: Option<Credentials>,
}

/// Loads or creates the device key, and loads the credentials or enrolls for them (retrying until the control
/// plane answers, or `cancel` fires).
async fn load_identity(cfg: &AgentConfig, cancel: &CancellationToken) -> anyhow::Result<DeviceIdentity> {
    let key_file = cfg.identity.key_file.clone();
    let key = Arc::new(
        tokio::task::spawn_blocking(move || crate::identity::load_or_create_key(&key_file))
            .await?
            .context("loading the device key")?,
    );
    let http = crate::identity::http_client(cfg.tls_ca.as_ref(), Some(Duration::from_secs(30)))?;
    if !cfg.mqtt_transport.is_tls() {
        tracing::warn!(broker = %format!("{}:{}", cfg.mqtt_host, cfg.mqtt_port), "plaintext MQTT (mqtt://): anyone on the network can read this device's traffic");
    }
    let credentials =
        crate::identity::credentials(&cfg.identity, &http, &cfg.device_id, &cfg.class.class, &key, cancel).await?;
    Ok(DeviceIdentity { key, credentials })
}

/// The model slot the collector scores through, and what the updater needs to take it over.
struct Models {
    slot: Arc<ModelSlot>,
    files: Files,
    pointer: Pointer,
    /// Width of the scored sensor's feature vector.
    width: usize,
}

/// Restores the model named by the updater's pointer, or loads the config's model file (devices without a
/// pointer), or none: collecting only. Also returns the slot's events, for the updater.
async fn restore_models(
    cfg: &AgentConfig,
    health: &Arc<Health>,
) -> anyhow::Result<(Models, mpsc::UnboundedReceiver<SlotEvent>)> {
    let spec = cfg.class.pipeline();
    let width = spec.sensors.iter().find(|s| s.name == cfg.model_sensor).map(|s| s.width()).unwrap_or(0);
    let (slot, slot_events) = ModelSlot::new(health.clone(), cfg.threshold);
    let files = Files::new(&cfg.data_dir);
    // The updater's pointer names the model to run; the config's model file is for devices without one.
    let pointer = {
        let (files, slot) = (files.clone(), slot.clone());
        tokio::task::spawn_blocking(move || updater::restore(&files, &slot, width))
            .await?
            .context("restoring the updater's state")?
    };
    match (slot.active_info(), &cfg.model) {
        (Some(info), _) => tracing::info!(model = info.label(), "model restored from the update pointer"),
        (None, Some(path)) => {
            let path = path.clone();
            let m = tokio::task::spawn_blocking(move || Model::load_configured(&path, width))
                .await?
                .context("loading the model")?;
            tracing::info!(version = m.version(), width, frames = m.frames(), "model loaded");
            slot.set_active(Some(Loaded { info: ModelInfo::configured(&m), model: m }));
        }
        (None, None) => tracing::info!("no model yet: collecting only"),
    }
    Ok((Models { slot, files, pointer, width }, slot_events))
}

/// Opens the config's sources (plus `extra`) and spawns one task each, feeding the returned channel. A source
/// that fails stops the agent.
async fn start_sources(
    cfg: &AgentConfig,
    extra: Vec<Box<dyn Source>>,
    health: &Arc<Health>,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<(mpsc::Receiver<Sample>, Vec<Task>)> {
    let mut sources = extra;
    for s in &cfg.sources {
        sources.push(open_source(cfg, s).await?);
    }
    let (tx, rx) = mpsc::channel(4096);
    let sink = SampleSink::new(tx, health.clone());
    let sources_cancel = cancel.child_token();
    let mut source_tasks = Vec::new();
    for src in sources {
        let name = src.name();
        let fut = src.run(sink.clone(), sources_cancel.clone());
        // A source that fails (a socket error, say) stops the agent: the failure is reported and the process
        // exits non-zero, rather than running on without input.
        source_tasks.push(spawn_stopping_on_failure(tasks, cancel, format!("source `{name}`"), "source", fut));
    }
    Ok((rx, source_tasks))
}

async fn open_source(cfg: &AgentConfig, s: &SourceConfig) -> anyhow::Result<Box<dyn Source>> {
    Ok(match s {
        SourceConfig::Udp { listen } => {
            let src = UdpSource::bind(*listen).await?;
            tracing::info!(addr = %src.local_addr()?, "UDP source listening");
            Box::new(src)
        }
        SourceConfig::Stdin => Box::new(StdinSource),
        SourceConfig::Modbus { address, unit, poll_ms, timeout_ms } => {
            // Config validation guarantees the map.
            let map = cfg.class.modbus.clone().context("the class has no [modbus] register map")?;
            let names: Vec<String> = cfg.class.sensors.iter().map(|s| s.name.clone()).collect();
            let fastest = cfg
                .class
                .sensors
                .iter()
                .filter(|s| map.of(&s.name).next().is_some())
                .map(|s| s.rate_hz)
                .fold(0.0f64, f64::max);
            let poll = poll_ms.map(Duration::from_millis).unwrap_or_else(|| {
                Duration::from_secs_f64(if fastest > 0.0 { 1.0 / fastest } else { 1.0 }).max(Duration::from_millis(10))
            });
            let src = ModbusSource::new(*address, *unit, poll, Duration::from_millis(*timeout_ms), map, &names);
            tracing::info!(source = %src.name(), ?poll, "Modbus source polling");
            Box::new(src)
        }
    })
}

/// Spawns `fut` on `tasks`; if it fails, logs it and fires `stop` (the agent's token), so the agent stops and
/// reports the failure. `what` names it in the error (`source `x``, `updater`), `kind` in the log line.
fn spawn_stopping_on_failure(
    tasks: &TaskTracker,
    stop: &CancellationToken,
    what: String,
    kind: &'static str,
    fut: impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
) -> Task {
    let stop = stop.clone();
    tasks.spawn(async move {
        let r = fut.await.map_err(|e| e.context(format!("{what} failed")));
        if let Err(e) = &r {
            tracing::error!(error = format!("{e:#}"), "{kind} failed; stopping the agent");
            stop.cancel();
        }
        r
    })
}

/// The uplink's side of model updates: where desired states go, and the reports to send.
type ModelUpdates = (watch::Sender<Option<Signed>>, mpsc::UnboundedReceiver<UpdateReport>);

/// The uplink's side of model updates, and a sender of reports for the config and agent updaters.
type UplinkUpdates =
    (watch::Sender<Option<Signed>>, mpsc::UnboundedReceiver<UpdateReport>, mpsc::UnboundedSender<UpdateReport>);

/// With `[updates]` configured, spawns the updater (stopped with the sources; its failure stops the agent) and
/// returns the uplink's side of it.
fn start_updater(
    cfg: &AgentConfig,
    models: &Models,
    slot_events: mpsc::UnboundedReceiver<SlotEvent>,
    health: &Arc<Health>,
    bundled_configs: mpsc::UnboundedSender<Signed>,
    cancel: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<(Option<Task>, Option<UplinkUpdates>)> {
    // Without updates the slot's events go nowhere (`slot_events` is dropped).
    let Some(ucfg) = cfg.updates.clone() else { return Ok((None, None)) };
    let (reports_tx, reports_rx) = mpsc::unbounded_channel();
    let (desired_tx, desired_rx) = watch::channel(None);
    let me = Identity { width: models.width, ..updater::bundle::identity(cfg, &ucfg) };
    let (files, slot, pointer) = (models.files.clone(), models.slot.clone(), models.pointer.clone());
    let mut up = Updater::new(ucfg, me, files, slot, slot_events, reports_tx.clone(), health.clone(), pointer)?
        .with_http(crate::identity::http_client(cfg.tls_ca.as_ref(), None)?);
    up.bundled_configs = Some(bundled_configs);
    let fut = up.run(desired_rx, cancel.child_token());
    let task = spawn_stopping_on_failure(tasks, cancel, "updater".into(), "updater", fut);
    Ok((Some(task), Some((desired_tx, reports_rx, reports_tx))))
}

/// The collector and the notification it gives the uplink on every commit.
struct CollectorHandle {
    running: Running,
    durable: Arc<Notify>,
}

/// Spawns the collector. Its own token (not a child of the agent's): it stops after the sources, committing
/// what they delivered.
fn start_collector(
    cfg: &AgentConfig,
    models: &Models,
    (outbox, alerts): (&Arc<Outbox>, &Arc<crate::alerts::AlertBook>),
    health: &Arc<Health>,
    samples: mpsc::Receiver<Sample>,
    live: &LiveClass,
    tasks: &TaskTracker,
) -> CollectorHandle {
    let collector =
        Collector::for_class(&cfg.class, models.slot.clone(), cfg.model_sensor.clone(), outbox.clone(), health.clone())
            .with_alerts(alerts.clone(), live.config.subscribe());
    let durable = Arc::new(Notify::new());
    let commit = live.commit.subscribe();
    let cancel = CancellationToken::new();
    let task = tasks.spawn(collector::run(collector, samples, commit, durable.clone(), cancel.clone()));
    CollectorHandle { running: Running { task, cancel }, durable }
}

/// Spawns the uplink. Its own token: it stops last, after a last heartbeat.
#[allow(clippy::too_many_arguments)]
fn start_uplink(
    cfg: &AgentConfig,
    outbox: &Arc<Outbox>,
    health: &Arc<Health>,
    counters: &Arc<UplinkCounters>,
    device: DeviceIdentity,
    (updates, configs, live, logs): (
        Option<ModelUpdates>,
        crate::uplink::Downlinks,
        &LiveClass,
        crate::logs::Registration,
    ),
    (collector, alerts): (&CollectorHandle, Arc<crate::alerts::AlertBook>),
    tasks: &TaskTracker,
) -> Running {
    let mut uplink = Uplink::from_config(cfg, outbox.clone(), health.clone(), counters.clone(), device.key);
    if let Some(c) = device.credentials {
        uplink.options.set_credentials(c.username, c.password);
    }
    uplink.updates = updates;
    uplink.downlinks = configs;
    uplink.live = Some(live.config.subscribe());
    uplink.logs = Some(logs);
    uplink.alerts = Some(alerts);
    let cancel = CancellationToken::new();
    let task = tasks.spawn(uplink.run(collector.durable.clone(), cancel.clone()));
    Running { task, cancel }
}
