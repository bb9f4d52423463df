//! The long-running services of a control plane, each started from the config, what it depends on, the
//! cancellation token and the task tracker, returning what the rest needs of it.

use super::broker::{Broker, Tls};
use super::stores::Stores;
use crate::config::Config;
use crate::fleet::ingest::{service, Ingestor};
use crate::ml::jobs::Learning;
use crate::rollout::Rollouts;
use crate::storage::postgres::lease::Lease;
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
    lease: &Lease,
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
    let learning = match &stores.shared {
        None => learning,
        Some(pg) => learning.with_queue(pg.clone(), tokio::runtime::Handle::current()),
    };
    let learning = Arc::new(learning);
    if stores.shared.is_some() && cfg.roles.train {
        let me = format!("trainer-{}", crate::storage::postgres::kv::replica_id());
        let timeout = Duration::from_secs(cfg.training.claim_timeout_secs);
        tracker.spawn(learning.clone().serve_queue(me.clone(), timeout, cancel.child_token()));
        // Counted by the ingest replicas' `edgeloop_trainers`.
        let replicas = crate::storage::postgres::replicas::PgReplicas::new(stores.shared.clone().expect("checked"));
        tracker.spawn(replicas.keep_alive(me, "train", cancel.child_token()));
    }
    tracker.spawn(crate::ml::triggers::run(learning.clone(), lease.clone(), cancel.child_token()));
    Ok(learning)
}

/// Answers `edgeloop-control-plane backup` while running: looks for a request in the data directory every
/// second and writes the backup it asks for (see [`super::backup`]).
pub(crate) fn backups(cfg: &Config, stores: &Stores, cancel: &CancellationToken, tracker: &TaskTracker) {
    let (db, data_dir, cancel) = (stores.db.clone(), cfg.data_dir.clone(), cancel.child_token());
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if !data_dir.join(super::backup::REQUEST).exists() {
                continue;
            }
            let (db, dir) = (db.clone(), data_dir.clone());
            let done = tokio::task::spawn_blocking(move || {
                super::backup::serve_request(&db, &dir, edgeloop_common::unix_millis())
            })
            .await;
            match done {
                Ok(Some(a)) if a.ok => tracing::info!(out = %a.out.display(), detail = %a.detail, "backup written"),
                Ok(Some(a)) => tracing::error!(out = %a.out.display(), error = %a.detail, "backup failed"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "backup panicked"),
            }
        }
    });
}

/// Artifacts no model version names are older than this before they are collected.
const ARTIFACT_GRACE: Duration = Duration::from_secs(3600);

/// Gives model versions registered before NNEF conversion existed their archive, once, in the background
/// (`ml::nnef::backfill`): after an upgrade, rollouts then send agents archives for the old versions too.
pub(crate) fn nnef_backfill(stores: &Stores, tracker: &TaskTracker) {
    let models = stores.models.clone();
    tracker.spawn(async move {
        match tokio::task::spawn_blocking(move || crate::ml::nnef::backfill(&models)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(versions = n, "NNEF archives made for versions registered without one"),
            Ok(Err(e)) => tracing::error!(error = %e, "making NNEF archives for older versions failed; it runs again at the next start"),
            Err(e) => tracing::error!(error = %e, "making NNEF archives for older versions panicked"),
        }
    });
}

/// Housekeeping, every `retention.every_secs`: prunes device log lines past `retention.log_days` and closed
/// alerts past `retention.alert_days`, collects
/// artifacts no model version names (an hour after they were written), and prunes acknowledged telemetry past
/// its class's retention (`[retention]`). The last two wait while a training job is queued or running, so a
/// job never loses rows or an artifact it is writing.
pub(crate) fn housekeeping(
    cfg: &Config,
    stores: &Stores,
    learning: &Arc<Learning>,
    cancel: &CancellationToken,
    tracker: &TaskTracker,
) {
    let rc = cfg.retention.clone();
    let models = stores.models.clone();
    let releases = stores.rollouts.clone();
    let logs = stores.logs.clone();
    let alerts = stores.alerts.clone();
    let (store, registry, metrics, learning, cancel) = (
        stores.telemetry.clone(),
        stores.devices.clone(),
        stores.metrics.clone(),
        learning.clone(),
        cancel.child_token(),
    );
    tracker.spawn(async move {
        let every = Duration::from_secs(rc.every_secs);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let (l, days) = (logs.clone(), rc.log_days);
            let pass = tokio::task::spawn_blocking(move || {
                crate::fleet::retention::prune_logs(&l, days, edgeloop_common::unix_millis())
            });
            match pass.await {
                Ok(Ok(n)) if n > 0 => tracing::info!(lines = n, "retention: pruned device log lines"),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "log retention failed; it runs again at the next pass"),
                Err(e) => tracing::error!(error = %e, "log retention panicked"),
            }
            let (a, db, days) = (alerts.clone(), store.db().clone(), rc.alert_days);
            let pass = tokio::task::spawn_blocking(move || {
                crate::fleet::retention::prune_alerts(&a, &db, days, edgeloop_common::unix_millis())
            });
            match pass.await {
                Ok(Ok(n)) if n > 0 => {
                    metrics.alerts_pruned.inc_by(n);
                    tracing::info!(alerts = n, "retention: removed closed alerts past retention.alert_days");
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "alert retention failed; it runs again at the next pass"),
                Err(e) => tracing::error!(error = %e, "alert retention panicked"),
            }
            if learning.list_jobs().iter().any(|j| !j.state.is_finished()) {
                tracing::debug!("housekeeping: a training job is queued or running; it waits for the next pass");
                continue;
            }
            let (m, releases) = (models.clone(), releases.clone());
            let collect = move || -> anyhow::Result<Vec<String>> {
                // Agent builds are artifacts too: kept while a release names them.
                let keep = match &releases {
                    Some(r) => r.agent_releases(None)?.into_iter().map(|r| r.sha256).collect(),
                    None => Default::default(),
                };
                Ok(m.collect_garbage(ARTIFACT_GRACE, &keep)?)
            };
            match tokio::task::spawn_blocking(collect).await {
                Ok(Ok(gone)) if !gone.is_empty() => {
                    metrics.artifacts_collected.inc_by(gone.len() as u64);
                    tracing::info!(artifacts = gone.len(), "housekeeping: removed artifacts no model version names");
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "artifact collection failed; it runs again at the next pass"),
                Err(e) => tracing::error!(error = %e, "artifact collection panicked"),
            }
            if !rc.prunes() {
                continue;
            }
            let (store, registry, rc) = (store.clone(), registry.clone(), rc.clone());
            let pass = tokio::task::spawn_blocking(move || {
                crate::fleet::retention::prune_once(&store, &registry, &rc, edgeloop_common::unix_millis())
            });
            match pass.await {
                Ok(Ok(n)) => {
                    metrics.records_pruned.inc_by(n);
                    if n > 0 {
                        tracing::info!(records = n, "retention: pruned records past their class's retention");
                    }
                }
                Ok(Err(e)) => tracing::error!(error = %e, "retention pass failed; it runs again at the next pass"),
                Err(e) => tracing::error!(error = %e, "retention pass panicked"),
            }
        }
    });
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
    let mut options = broker.client_options(broker.client_id("ingest"));
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
    .with_rate_limit(cfg.ingest.device_messages_per_sec)
    .with_logs(stores.logs.clone(), cfg.ingest.device_log_lines_per_minute)
    .with_alerts(stores.alerts.clone());
    if let Some(pg) = &stores.shared {
        // Each device's rate limit is shared among the live ingest replicas: each sees about its share of a
        // device's messages.
        let replicas = crate::storage::postgres::replicas::PgReplicas::new(pg.clone());
        let (limiter, metrics) = (ingestor.rate_limiter(), stores.metrics.clone());
        let (me, stop) = (format!("ingest-{}", crate::storage::postgres::kv::replica_id()), cancel.child_token());
        tokio::spawn(async move {
            loop {
                match replicas.beat(&me, "ingest", edgeloop_common::unix_millis()).await {
                    Ok(n) => {
                        limiter.set_replicas(n);
                        metrics.replicas.set(n as i64);
                    }
                    Err(e) => tracing::warn!(error = %e, "writing this replica's row; the rate limit share stays"),
                }
                match replicas.alive("train", edgeloop_common::unix_millis()).await {
                    Ok(n) => {
                        metrics.trainers.set(n as i64);
                    }
                    Err(e) => tracing::debug!(error = %e, "counting the trainers"),
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(crate::storage::postgres::replicas::BEAT) => {}
                }
            }
            if let Err(e) = replicas.leave(&me).await {
                tracing::debug!(error = %e, "removing this replica's row");
            }
        });
    }
    let (subscribed_tx, mut subscribed) = tokio::sync::watch::channel(false);
    // The whole uplink, or this control plane's share of it.
    let uplink = match &cfg.broker {
        crate::config::BrokerConfig::External { shared_group: Some(g), .. } => {
            format!("$share/{g}/{}", edgeloop_common::topics::ALL_UPLINK)
        }
        _ => edgeloop_common::topics::ALL_UPLINK.to_string(),
    };
    let task = tokio::spawn(service::run(
        service::Link { options, uplink },
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
    lease: &Lease,
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
    let options = broker.client_options(broker.client_id("rollouts"));
    let task =
        tracker.spawn(crate::rollout::service::run(rollouts.clone(), options, lease.clone(), cancel.child_token()));
    if let Some(pg) = &stores.shared {
        // Readers here see what other replicas change: rollouts and tags read again on their notification.
        let r = rollouts.clone();
        tracker.spawn(crate::storage::postgres::follow(
            pg.clone(),
            crate::rollout::store::CHANNEL,
            cancel.child_token(),
            move |from| {
                let r = r.clone();
                async move {
                    if from.as_deref() == Some(crate::storage::postgres::kv::replica_id()) {
                        return Ok(());
                    }
                    tokio::task::spawn_blocking(move || r.reload_readers())
                        .await
                        .map_err(|e| crate::storage::postgres::PgError::Bad(e.to_string()))?
                        .map_err(|e| crate::storage::postgres::PgError::Bad(e.to_string()))
                }
            },
        ));
    }
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
        logs: stores.logs.clone(),
        alerts: stores.alerts.clone(),
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
        provisioner: broker.provisioner.clone(),
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
