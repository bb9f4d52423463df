//! Starting and stopping an agent.
//!
//! [`Agent::start`] opens the outbox, loads the model, and spawns three subsystems that each own a task:
//! the sources, the collector and the uplink. Shutdown runs in order, so nothing already taken is lost:
//! sources stop first, the collector commits whatever they delivered, then the uplink sends a last heartbeat
//! and hangs up. Each phase has a deadline.

use crate::collector::{self, Collector, CommitParams};
use crate::config::{AgentConfig, SourceConfig};
use crate::health::Health;
use crate::inference::Model;
use crate::outbox::Outbox;
use crate::source::{modbus::ModbusSource, stdin::StdinSource, udp::UdpSource, SampleSink, Source};
use crate::updater::slot::{Loaded, ModelInfo, ModelSlot};
use crate::updater::state::Identity;
use crate::updater::{self, Files, Updater};
use crate::uplink::{Uplink, UplinkCounters};
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long the collector may take to commit after the sources stop.
const COLLECTOR_DEADLINE: Duration = Duration::from_secs(10);
/// How long the uplink may take to say goodbye.
const UPLINK_DEADLINE: Duration = Duration::from_secs(2);

pub struct Agent;

type Task = JoinHandle<anyhow::Result<()>>;

/// Waits for the stop signal, or for a subsystem to fail on its own (then stops the others and reports the
/// failure, so the process exits non-zero and its supervisor restarts it); then stops in order. The
/// collector finishing cleanly because every source ended is not a failure: the uplink goes on draining.
async fn supervise(
    cancel: CancellationToken,
    source_tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    collector: Task,
    collector_cancel: CancellationToken,
    uplink: Task,
    uplink_cancel: CancellationToken,
) -> anyhow::Result<()> {
    let (mut collector, mut uplink) = (Some(collector), Some(uplink));
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
            Err(_) => tracing::warn!("uplink did not stop within {UPLINK_DEADLINE:?}; abandoned"),
        }
    }
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
    task: JoinHandle<anyhow::Result<()>>,
}

impl AgentHandle {
    /// Waits for the agent to stop (after its cancellation token fired, or a subsystem failed).
    pub async fn join(self) -> anyhow::Result<()> {
        self.task.await.context("agent task panicked")?
    }
}

impl Agent {
    /// Starts an agent with the sources in its config plus `extra` (an in-process channel, say). It runs until
    /// `cancel` fires.
    pub async fn start(
        cfg: AgentConfig,
        extra: Vec<Box<dyn Source>>,
        cancel: CancellationToken,
    ) -> anyhow::Result<AgentHandle> {
        // Telemetry, keys and credentials live here: 0700, with nothing in it open to group or others.
        let data_dir = cfg.data_dir.clone();
        let tightened = tokio::task::spawn_blocking(move || edgeloop_common::private::dir(&data_dir))
            .await?
            .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
        if let Some(first) = tightened.first() {
            tracing::warn!(data_dir = %cfg.data_dir.display(), paths = tightened.len(), first = %first.display(), "the data directory was open to group or others; removed their access");
        }
        let outbox_dir = cfg.data_dir.join("outbox");
        let (durability, max_bytes) = (cfg.durability, cfg.outbox_max_bytes);
        let outbox = tokio::task::spawn_blocking(move || Outbox::open(&outbox_dir, durability, max_bytes))
            .await?
            .with_context(|| format!("opening the outbox in {}", cfg.data_dir.display()))?;
        let outbox = Arc::new(outbox);
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
            crate::identity::credentials(&cfg.identity, &http, &cfg.device_id, &cfg.class.class, &key, &cancel).await?;
        let spec = cfg.class.pipeline();
        let width = spec.sensors.iter().find(|s| s.name == cfg.model_sensor).map(|s| s.width()).unwrap_or(0);
        let health = Arc::new(Health::default());
        let counters = Arc::new(UplinkCounters::default());
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
        let collector =
            Collector::for_class(&cfg.class, slot.clone(), cfg.model_sensor.clone(), outbox.clone(), health.clone());
        let handle_slot = slot.clone();

        let mut sources = extra;
        for s in &cfg.sources {
            match s {
                SourceConfig::Udp { listen } => {
                    let src = UdpSource::bind(*listen).await?;
                    tracing::info!(addr = %src.local_addr()?, "UDP source listening");
                    sources.push(Box::new(src));
                }
                SourceConfig::Stdin => sources.push(Box::new(StdinSource)),
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
                        Duration::from_secs_f64(if fastest > 0.0 { 1.0 / fastest } else { 1.0 })
                            .max(Duration::from_millis(10))
                    });
                    let src = ModbusSource::new(*address, *unit, poll, Duration::from_millis(*timeout_ms), map, &names);
                    tracing::info!(source = %src.name(), ?poll, "Modbus source polling");
                    sources.push(Box::new(src));
                }
            }
        }

        let (tx, rx) = mpsc::channel(4096);
        let sink = SampleSink::new(tx, health.clone());
        let sources_cancel = cancel.child_token();
        let mut source_tasks = Vec::new();
        for src in sources {
            let name = src.name();
            let fut = src.run(sink.clone(), sources_cancel.clone());
            let stop = cancel.clone();
            source_tasks.push(tokio::spawn(async move {
                // A source that fails (a socket error, say) stops the agent: the failure is reported and the
                // process exits non-zero, rather than running on without input.
                let r = fut.await.map_err(|e| e.context(format!("source `{name}` failed")));
                if let Err(e) = &r {
                    tracing::error!(error = format!("{e:#}"), "source failed; stopping the agent");
                    stop.cancel();
                }
                r
            }));
        }
        drop(sink);

        // Model updates: the uplink hands over desired states and sends the updater's reports.
        let (reports_tx, reports_rx) = mpsc::unbounded_channel();
        let (desired_tx, desired_rx) = tokio::sync::watch::channel(None);
        let updates_enabled = cfg.updates.is_some();
        if let Some(ucfg) = cfg.updates.clone() {
            let me = Identity {
                device: cfg.device_id.clone(),
                class: cfg.class.class.clone(),
                sensor: cfg.model_sensor.clone(),
                width,
                features: spec.sensors.iter().find(|s| s.name == cfg.model_sensor).cloned(),
                max_artifact_bytes: ucfg.max_artifact_bytes,
            };
            let up = Updater::new(ucfg, me, files, slot, slot_events, reports_tx, health.clone(), pointer)?
                .with_http(crate::identity::http_client(cfg.tls_ca.as_ref(), None)?);
            let stop = cancel.clone();
            let fut = up.run(desired_rx, cancel.child_token());
            source_tasks.push(tokio::spawn(async move {
                let r = fut.await.map_err(|e| e.context("updater failed"));
                if let Err(e) = &r {
                    tracing::error!(error = format!("{e:#}"), "updater failed; stopping the agent");
                    stop.cancel();
                }
                r
            }));
        } else {
            drop((reports_tx, desired_rx, slot_events));
        }

        let durable = Arc::new(Notify::new());
        let commit = CommitParams {
            max_records: cfg.class.outbox.commit_max_records,
            interval: Duration::from_millis(cfg.class.outbox.commit_interval_ms),
        };
        let collector_cancel = CancellationToken::new();
        let collector_task =
            tokio::spawn(collector::run(collector, rx, commit, durable.clone(), collector_cancel.clone()));
        let uplink_cancel = CancellationToken::new();
        let mut uplink = Uplink::from_config(&cfg, outbox.clone(), health.clone(), counters.clone(), key);
        if let Some(c) = credentials {
            uplink.options.set_credentials(c.username, c.password);
        }
        if updates_enabled {
            uplink.updates = Some((desired_tx, reports_rx));
        }
        let uplink_task = tokio::spawn(uplink.run(durable, uplink_cancel.clone()));

        let device = cfg.device_id.clone();
        let task =
            tokio::spawn(supervise(cancel, source_tasks, collector_task, collector_cancel, uplink_task, uplink_cancel));
        Ok(AgentHandle { device, health, outbox, counters, slot: handle_slot, task })
    }
}
