//! The long-running services of a control plane, each started from the config, what it depends on, the
//! cancellation token and the task tracker, returning what the rest needs of it.

use super::broker::{Broker, Tls};
use super::stores::Stores;
use crate::config::Config;
use crate::fleet::ingest::{service, Ingestor};
use crate::ml::jobs::Learning;
use crate::rollout::Rollouts;
use crate::web::{self, AppState};
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Training jobs and the retraining triggers. An explicit `cuda:N` that this build or machine cannot honour
/// stops the start, not the first training.
pub(crate) async fn learning(
    cfg: &Config,
    stores: &Stores,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<Arc<Learning>> {
    // Probing asks the CUDA driver (in CUDA builds), a blocking call: off the async workers.
    let setting = cfg.training.device;
    let machine =
        tokio::task::spawn_blocking(move || crate::ml::training::device::Devices::new(setting)).await??.machine();
    tracing::info!(
        setting = %cfg.training.device,
        cuda_built = machine.cuda_built,
        gpus = machine.gpus,
        cores = machine.cores,
        "training devices"
    );
    let learning = Learning::new(
        &stores.db,
        stores.telemetry.clone(),
        stores.devices.clone(),
        stores.models.clone(),
        cfg.classes.clone(),
        cfg.training.clone(),
    )?
    .with_tasks(cancel.child_token(), tracker.clone());
    let learning = Arc::new(learning);
    tracker.spawn(crate::ml::triggers::run(learning.clone(), cancel.child_token()));
    Ok(learning)
}

/// Ingest: subscribes to the uplink, stores, acknowledges (signed). Returns the task, which ends on a stop
/// request or by itself on a store failure. Waits briefly for the subscription, so that a fresh fleet starts
/// without the delay of resending what it published before ingest subscribed.
pub(crate) async fn ingest(
    cfg: &Config,
    stores: &Stores,
    broker: &Broker,
    cancel: &CancellationToken,
) -> JoinHandle<anyhow::Result<()>> {
    let mut options = broker.client_options(format!("edgeloop-cp-{}", std::process::id()));
    // Accept whatever the broker forwards, so oversize messages are counted by ingest, not fatal to the link.
    let max_packet = crate::broker::embedded::broker_max_payload(cfg.ingest.max_message_bytes) + 4096;
    options.set_max_packet_size(max_packet, max_packet);
    let ingestor = Ingestor::new(
        stores.telemetry.clone(),
        stores.devices.clone(),
        stores.metrics.clone(),
        cfg.ingest.max_message_bytes,
    )
    .with_enrollment(cfg.require_enrollment.then(|| stores.enrollment.clone()))
    .with_rate_limit(cfg.ingest.device_messages_per_sec);
    let (subscribed_tx, mut subscribed) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(service::run(
        options,
        ingestor,
        stores.metrics.clone(),
        cfg.ingest.commit_max_messages,
        subscribed_tx,
        // Acknowledgements are signed with the same key as desired states: agents trust one list of keys.
        stores.signer.clone(),
        cancel.child_token(),
    ));
    if tokio::time::timeout(Duration::from_secs(5), subscribed.wait_for(|s| *s)).await.is_err() {
        let broker = format!("{}:{}", cfg.mqtt_host, cfg.mqtt_port);
        tracing::warn!(%broker, "ingest is not subscribed yet; carrying on, it keeps retrying");
    }
    task
}

/// The rollout service: the engine's ticks, signed desired states published retained.
pub(crate) fn rollouts(
    cfg: &Config,
    stores: &mut Stores,
    broker: &Broker,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<(Arc<Rollouts>, JoinHandle<anyhow::Result<()>>)> {
    let store = stores.rollouts.take().context("the rollout store was already taken")?;
    let rollouts = Arc::new(Rollouts::open(
        store,
        stores.signer.clone(),
        stores.models.clone(),
        stores.devices.clone(),
        stores.metrics.clone(),
        cfg.rollouts.clone(),
        cfg.ingest.offline_after_secs * 1000,
    )?);
    let options = broker.client_options(format!("edgeloop-cp-rollouts-{}", std::process::id()));
    let task = tracker.spawn(crate::rollout::service::run(rollouts.clone(), options, cancel.child_token()));
    Ok((rollouts, task))
}

/// The operator API and dashboard, on `api.listen`.
pub(crate) async fn api(
    cfg: &Config,
    stores: &Stores,
    broker: &Broker,
    services: (Arc<Learning>, Arc<Rollouts>),
    tls: Option<Tls>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) -> anyhow::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(cfg.api_listen)
        .await
        .with_context(|| format!("binding the API to {}", cfg.api_listen))?;
    let addr = listener.local_addr()?;
    let state = AppState {
        store: stores.telemetry.clone(),
        registry: stores.devices.clone(),
        metrics: stores.metrics.clone(),
        started: Instant::now(),
        offline_after_ms: cfg.ingest.offline_after_secs * 1000,
        learning: services.0,
        rollouts: services.1,
        audit: stores.audit.clone(),
        operators: stores.operators.clone(),
        require_tokens: cfg.require_tokens,
        enrollment: stores.enrollment.clone(),
        front: broker.front.clone(),
        tls: tls.is_some(),
        downloads: Arc::new(web::api::learning::Downloads::new(&cfg.api_limits)),
        certificates: tls.as_ref().and_then(|t| t.not_after).map(|t| vec![("tls".to_string(), t)]).unwrap_or_default(),
    };
    let https = tls.map(|t| t.https);
    let task = tracker.spawn(web::serve::serve(
        listener,
        https,
        web::router(state),
        cfg.api_limits,
        stores.metrics.clone(),
        cancel.child_token(),
    ));
    Ok((addr, task))
}
