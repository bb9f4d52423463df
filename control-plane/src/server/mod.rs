//! Starting and stopping a control plane: its stores, the broker, ingest, the rollout service, learning and
//! the API, under one cancellation token and one task tracker. Stopping lets ingest commit what it took, the
//! API finish its requests, and a running training stop at its next epoch.
//!
//! - [`stores`]: the data directory, the signing key and every store;
//! - [`broker`]: TLS, the embedded broker and the devices' front (or an external broker), and the
//!   control plane's own MQTT logins;
//! - [`services`]: ingest, the rollout service, learning and the API.

pub mod backup;
mod broker;
mod services;
mod stores;

use crate::config::{BrokerConfig, Config};
use crate::fleet::devices::Registry;
use crate::fleet::telemetry::TelemetryStore;
use crate::metrics::Metrics;
use crate::ml::jobs::Learning;
use crate::rollout::Rollouts;
use crate::storage::postgres::lease::Lease;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct ControlPlane;

/// The MQTT username of the control plane's own clients on the embedded broker.
pub const SERVICE_USER: &str = "edgeloop-control-plane";

/// A running control plane.
pub struct ControlPlaneHandle {
    pub api_addr: SocketAddr,
    /// Where agents connect.
    pub mqtt_addr: (String, u16),
    pub store: TelemetryStore,
    /// The alerts devices raised.
    pub alerts: crate::fleet::AlertStore,
    /// The warnings and errors devices shipped.
    pub logs: crate::fleet::LogStore,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub learning: Arc<Learning>,
    pub rollouts: Arc<Rollouts>,
    /// The admin token created on first start (also in `<data_dir>/admin.token`), if this start made one.
    pub admin_token: Option<String>,
    pub enrollment: Arc<crate::fleet::enrollment::Enrollment>,
    /// The embedded broker's front door (live device connections).
    pub front: Arc<crate::broker::front::Front>,
    /// The public half of the signing key: what agents list in `[[trusted_keys]]` to accept this control
    /// plane's acknowledgements and desired states.
    pub trusted_key: edgeloop_common::signing::TrustedKey,
    /// The embedded rumqttd's own loopback port (`None` with an external broker). Only the front and the
    /// control plane's own clients can log in there.
    pub internal_broker: Option<SocketAddr>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ControlPlaneHandle {
    /// Waits until the control plane has stopped (after its cancellation token fired).
    pub async fn join(self) -> anyhow::Result<()> {
        self.task.await.context("control plane task panicked")?
    }
}

impl ControlPlane {
    pub async fn start(cfg: Config, cancel: CancellationToken) -> anyhow::Result<ControlPlaneHandle> {
        check_broker_transport(&cfg)?;
        anyhow::ensure!(cfg.roles.ingest, "roles = [\"train\"]: a trainer replica runs with server::run_trainer");
        let tracker = TaskTracker::new();
        let mut stores = stores::Stores::open(&cfg).await?;
        // Work that runs once across replicas (rollout steps, triggers) runs where the lease is held: always
        // here on the embedded store; on PostgreSQL, on one replica at a time.
        let lease = match &stores.shared {
            None => Lease::always(),
            Some(pg) => {
                tracker.spawn(stores.devices.clone().follow(cancel.child_token()));
                Lease::spawn(pg.clone(), "singletons", cancel.child_token(), &tracker)
            }
        };
        {
            let (mut lease, metrics, stop) = (lease.clone(), stores.metrics.clone(), cancel.child_token());
            tracker.spawn(async move {
                loop {
                    metrics.leader.set(i64::from(lease.is_leader()));
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        more = lease.changed() => if !more { return },
                    }
                }
            });
        }
        let learning = services::learning(&cfg, &stores, &lease, &cancel, &tracker).await?;
        services::housekeeping(&cfg, &stores, &learning, &cancel, &tracker);
        services::nnef_backfill(&stores, &tracker);
        services::backups(&cfg, &stores, &cancel, &tracker);
        let tls = broker::Tls::load(&cfg)?;
        let broker = broker::Broker::start(&cfg, &stores.enrollment, tls.as_ref(), &cancel, &tracker).await?;
        let ingest = services::ingest(&cfg, &stores, &broker, &cancel).await;
        let (rollouts, rollout_task) = services::rollouts(&cfg, &mut stores, &broker, &lease, &cancel, &tracker)?;
        let (api_addr, api_task) =
            services::api(&cfg, &stores, &broker, (learning.clone(), rollouts.clone()), tls, &cancel, &tracker).await?;
        tracing::info!(%api_addr, mqtt = %format!("{}:{}", cfg.mqtt_host, cfg.mqtt_port), tls = cfg.tls.is_some(), "control plane running");
        let task = tokio::spawn(stop_when_done(ingest, api_task, rollout_task, cancel, tracker));
        Ok(ControlPlaneHandle {
            api_addr,
            mqtt_addr: (cfg.mqtt_host, broker.device_port),
            store: stores.telemetry,
            alerts: stores.alerts,
            logs: stores.logs,
            registry: stores.devices,
            metrics: stores.metrics,
            learning,
            rollouts,
            admin_token: stores.admin_token,
            enrollment: stores.enrollment,
            front: broker.front,
            trusted_key: stores.signer.trusted(None),
            internal_broker: broker.internal,
            task,
        })
    }
}

/// A trainer replica (`roles = ["train"]`, PostgreSQL): claims training jobs from the shared queue and runs
/// them, with no broker, no API and none of the work that runs once. Returns when stopped.
pub async fn run_trainer(cfg: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg.storage != crate::config::Storage::Embedded,
        "a trainer replica needs [storage] backend = \"postgres\""
    );
    let tracker = TaskTracker::new();
    let stores = stores::Stores::open(&cfg).await?;
    tracker.spawn(stores.devices.clone().follow(cancel.child_token()));
    let _learning = services::learning(&cfg, &stores, &Lease::never(), &cancel, &tracker).await?;
    tracing::info!(device = %cfg.training.device, "trainer running: no broker, no API");
    cancel.cancelled().await;
    tracker.close();
    if tokio::time::timeout(STOP_DEADLINE * 6, tracker.wait()).await.is_err() {
        tracing::warn!("training still running 30 s after the stop; abandoned (another trainer claims it again)");
    }
    Ok(())
}

/// A config built in code must agree with its URL too: an mqtts:// broker is never reached in plaintext.
fn check_broker_transport(cfg: &Config) -> anyhow::Result<()> {
    if let BrokerConfig::External { url, .. } = &cfg.broker {
        let tls = cfg.external.transport.is_tls();
        anyhow::ensure!(
            url.starts_with("mqtts://") == tls,
            "broker.url `{url}`: the resolved transport is {}; refusing to start",
            if tls { "TLS" } else { "plaintext" }
        );
    }
    Ok(())
}

/// How long stopping waits for each of the API, the rollout service, and the rest (the front, the triggers,
/// training) before abandoning it.
const STOP_DEADLINE: Duration = Duration::from_secs(5);

/// Ingest ends on a stop request, or by itself on a store failure: either way, the rest stops, and each part
/// gets [`STOP_DEADLINE`] to finish.
async fn stop_when_done(
    ingest: JoinHandle<anyhow::Result<()>>,
    api: JoinHandle<()>,
    rollouts: JoinHandle<anyhow::Result<()>>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) -> anyhow::Result<()> {
    let ingested = ingest.await.context("ingest panicked")?;
    cancel.cancel();
    tracker.close();
    match tokio::time::timeout(STOP_DEADLINE, api).await {
        Ok(r) => r.context("API panicked")?,
        Err(_) => tracing::warn!("API did not stop within 5 s; abandoned"),
    }
    match tokio::time::timeout(STOP_DEADLINE, rollouts).await {
        Ok(r) => r.context("rollout service panicked")?.context("rollout service")?,
        Err(_) => tracing::warn!("rollout service did not stop within 5 s; abandoned"),
    }
    if tokio::time::timeout(STOP_DEADLINE, tracker.wait()).await.is_err() {
        tracing::warn!(
            tasks = tracker.len(),
            "tasks still running 5 s after the stop (front, triggers, training); abandoned"
        );
    }
    ingested
}
