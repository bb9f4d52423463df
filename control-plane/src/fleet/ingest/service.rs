//! The ingest service: MQTT in, [`Ingestor`] on its own thread, acknowledgements out.
//!
//! Three parts, none of which can wait on another in a cycle:
//! - the rumqttc event loop task only polls and forwards uplink publishes into a bounded channel (its await
//!   on a full channel is the backpressure);
//! - the ingest thread drains that channel in groups, handles each message, commits once (flush plus
//!   `fdatasync`), then records the newest watermark per device in a coalescing map;
//! - the ack task publishes one acknowledgement per device from that map, and (re)subscribes on connect.
//!
//! Because acknowledgements are cumulative, only the newest per device matters, so the map stays as small as
//! the fleet whatever the ack task's pace.

use super::{ack_payload, Ingestor, Outcome};
use crate::fleet::telemetry::StoreError;
use crate::metrics::Metrics;
use edgeloop_common::envelope::Ack;
use edgeloop_common::topics::{self, Channel};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// Folds an acknowledgement into the newest one per device: both marks only move up.
fn merge(acks: &mut HashMap<String, Ack>, device: String, ack: Ack) {
    let e = acks.entry(device).or_insert(Ack { upto: 0, alerts: 0 });
    (e.upto, e.alerts) = (e.upto.max(ack.upto), e.alerts.max(ack.alerts));
}

/// A topic and its payload.
type Message = (String, Vec<u8>);

#[derive(Default)]
struct PendingAcks {
    acks: Mutex<HashMap<String, Ack>>,
    notify: Notify,
    /// When the ingest thread's current commit began (Unix ms), or 0 when it is not committing.
    commit_since_ms: std::sync::atomic::AtomicU64,
}

/// Connects to the broker and runs ingest until `cancel` fires. `subscribed` turns true whenever the broker
/// confirms the uplink subscription (after each connect).
///
/// Shutdown: intake stops first (messages arriving later are never acknowledged, so agents resend them to the
/// next run); the ingest thread commits what it took; its acknowledgements are published; then the MQTT
/// link closes. Each wait has a deadline.
/// How ingest reaches the broker: the client's options, and the filter it subscribes the uplink with (the
/// whole uplink, or a shared subscription's `$share/GROUP/...`).
pub struct Link {
    pub options: MqttOptions,
    pub uplink: String,
}

pub async fn run(
    Link { options, uplink }: Link,
    ingestor: Ingestor,
    metrics: Arc<Metrics>,
    commit_max: usize,
    subscribed: tokio::sync::watch::Sender<bool>,
    signer: edgeloop_common::signing::Signer,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let (client, eventloop) = AsyncClient::new(options, 1024);
    let (msg_tx, msg_rx) = mpsc::channel::<Message>(8192);
    let pending = Arc::new(PendingAcks::default());
    let (conn_tx, conn_rx) = mpsc::unbounded_channel::<()>();

    let worker_pending = pending.clone();
    let worker_metrics = metrics.clone();
    let (worker_done, mut worker_ended) = tokio::sync::oneshot::channel::<()>();
    let worker = std::thread::Builder::new().name("ingest".into()).spawn(move || {
        let r = ingest_thread(ingestor, msg_rx, commit_max, &worker_pending, &worker_metrics);
        let _ = worker_done.send(());
        r
    })?;

    let intake_stop = CancellationToken::new();
    let link_cancel = CancellationToken::new();
    let link =
        tokio::spawn(event_loop(eventloop, msg_tx, conn_tx, subscribed, intake_stop.clone(), link_cancel.clone()));
    let acks_stop = CancellationToken::new();
    let acks =
        tokio::spawn(ack_task(client.clone(), uplink, signer, pending.clone(), metrics, conn_rx, acks_stop.clone()));

    // Run until asked to stop, or until the ingest thread ends by itself (a store failure or a panic), or its
    // commit hangs: then stop everything and report it, so the process exits non-zero instead of running
    // without ingest. (A sled 0.34 write that fails half-way, for want of a descriptor say, can leave the
    // store unable to finish any later flush.)
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let mut hung = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = &mut worker_ended => {
                tracing::error!("ingest stopped by itself; shutting the control plane down");
                break;
            }
            _ = watch.tick() => {
                let since = pending.commit_since_ms.load(Ordering::Relaxed);
                if since != 0 && edgeloop_common::unix_millis().saturating_sub(since) > COMMIT_DEADLINE.as_millis() as u64 {
                    tracing::error!("a store commit has not finished in {COMMIT_DEADLINE:?}; shutting the control plane down");
                    hung = true;
                    break;
                }
            }
        }
    }
    intake_stop.cancel(); // the event loop drops its sender: the ingest thread drains, commits and returns
    let joined = tokio::time::timeout(SHUTDOWN_DEADLINE, tokio::task::spawn_blocking(move || worker.join())).await;
    let result = match joined {
        Ok(Ok(Ok(r))) => r,
        Ok(Ok(Err(_))) => Err(anyhow::anyhow!("ingest thread panicked")),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(anyhow::anyhow!(
            "ingest did not commit within {SHUTDOWN_DEADLINE:?}; unacknowledged data will be resent"
        )),
    };
    let result = if hung { result.and(Err(anyhow::anyhow!("a store commit hung"))) } else { result };
    acks_stop.cancel(); // publishes the last acknowledgements, then returns
    let _ = tokio::time::timeout(Duration::from_secs(2), acks).await;
    let _ = client.try_disconnect();
    // Let the event loop flush the acknowledgements and the disconnect.
    let mut link = link;
    if tokio::time::timeout(Duration::from_millis(500), &mut link).await.is_err() {
        link_cancel.cancel();
        let _ = link.await;
    }
    result
}

/// How long shutdown waits for the ingest thread's last commit.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);
/// The first wait after a transient store error; it doubles up to [`TRANSIENT_MAX_WAIT`].
const TRANSIENT_FIRST_WAIT: Duration = Duration::from_millis(50);
const TRANSIENT_MAX_WAIT: Duration = Duration::from_secs(2);
/// Transient store errors that go on this long are treated as a failed store: ingest stops.
const TRANSIENT_GIVE_UP: Duration = Duration::from_secs(120);
/// A commit that takes longer is taken for a hung store: the control plane stops (and a supervisor restarts
/// it from what is on disk).
const COMMIT_DEADLINE: Duration = Duration::from_secs(60);

/// Whether a store error may go away by itself: the process or the system ran out of descriptors, kernel
/// buffers or memory for a moment (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`, `EAGAIN`, `EINTR`), so a later
/// write can succeed; or PostgreSQL gave up on the transaction (a deadlock, a serialisation failure, a lost
/// connection), which left nothing behind. Anything else (an I/O error on the disk, a full disk, corruption)
/// is not.
pub fn is_transient(e: &StoreError) -> bool {
    use edgeloop_common::durable::DurableError;
    if let StoreError::Postgres(pg) = e {
        return pg.is_retryable();
    }
    let io = match e {
        StoreError::Sled(sled::Error::Io(io)) | StoreError::Durable(DurableError::Sled(sled::Error::Io(io))) => io,
        _ => return false,
    };
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    #[cfg(target_os = "linux")]
    const ENOBUFS: i32 = 105;
    #[cfg(not(target_os = "linux"))]
    const ENOBUFS: i32 = 55;
    matches!(io.raw_os_error(), Some(ENFILE | EMFILE | ENOBUFS))
        || matches!(
            io.kind(),
            std::io::ErrorKind::OutOfMemory | std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
        )
}

/// Transient store failures in a row: since when, and the next wait.
struct Backoff {
    failing_since: Option<std::time::Instant>,
    wait: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { failing_since: None, wait: TRANSIENT_FIRST_WAIT }
    }
}

impl Backoff {
    /// Sleeps the next wait (doubling up to [`TRANSIENT_MAX_WAIT`]) after a transient failure `e` of `what`,
    /// or gives up with it once failures have gone on for [`TRANSIENT_GIVE_UP`]. Nothing of the group that
    /// failed is acknowledged either way.
    fn wait_or_give_up(&mut self, e: StoreError, what: &'static str) -> anyhow::Result<()> {
        let since = *self.failing_since.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() >= TRANSIENT_GIVE_UP {
            tracing::error!(error = %e, "{what} for {TRANSIENT_GIVE_UP:?} in a row; stopping ingest");
            return Err(anyhow::Error::new(e).context(what));
        }
        tracing::warn!(error = %e, retry_in = ?self.wait, "{what} for now; this group is not acknowledged");
        std::thread::sleep(self.wait);
        self.wait = (self.wait * 2).min(TRANSIENT_MAX_WAIT);
        Ok(())
    }
}

fn ingest_thread(
    ingestor: Ingestor,
    mut rx: mpsc::Receiver<Message>,
    commit_max: usize,
    pending: &PendingAcks,
    metrics: &Metrics,
) -> anyhow::Result<()> {
    // Since when store writes have been failing with transient errors, and the next wait.
    let mut backoff = Backoff::default();
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < commit_max {
            match rx.try_recv() {
                Ok(m) => group.push(m),
                Err(_) => break,
            }
        }
        // Devices in one order (each device's messages in the order they came): with PostgreSQL, replicas
        // then take the devices' rows in the same order and never wait for each other in a cycle.
        group.sort_by(|a, b| device_of(&a.0).cmp(device_of(&b.0)));
        let now = edgeloop_common::unix_millis();
        let mut acks: HashMap<String, Ack> = HashMap::new();
        let mut transient = None;
        for (topic, payload) in &group {
            match ingestor.handle(topic, payload, now) {
                Ok(Outcome::Ack { device, upto }) => merge(&mut acks, device, Ack { upto, alerts: 0 }),
                Ok(Outcome::AlertAck { device, upto, alerts }) => merge(&mut acks, device, Ack { upto, alerts }),
                Ok(_) => {}
                // Out of descriptors or buffers for a moment (an API flooded with connections, say): not a
                // broken store. Acknowledge nothing from this group, so agents send it again; what it stored
                // is kept once. Wait, then carry on with the next messages.
                Err(e) if is_transient(&e) => {
                    transient = Some(e);
                    break;
                }
                // A value this store cannot keep (checked before any write): that message is refused, the rest
                // of the group goes on.
                Err(StoreError::Postgres(crate::storage::postgres::PgError::Bad(why))) => {
                    metrics.reject("store_refused");
                    tracing::warn!(topic, reason = %why, "uplink message refused by the store");
                }
                // A store that cannot take writes (disk full, I/O error) is not to be trusted with later
                // ones either: stop ingest, acknowledging nothing from this group. The process exits non-zero,
                // restarts from what is on disk, and agents resend whatever was not acknowledged.
                Err(e) => {
                    tracing::error!(error = %e, "store write failed; stopping ingest without acknowledging this group");
                    return Err(anyhow::Error::new(e).context("store write failed"));
                }
            }
        }
        if let Some(e) = transient {
            // Nothing of this group is acknowledged: with PostgreSQL, roll its transaction back now rather
            // than hold its devices' row locks (which other replicas wait on) through the back-off.
            ingestor.store().abandon();
            metrics.reject("store_busy");
            backoff.wait_or_give_up(e, "store write failed")?;
            continue;
        }
        pending.commit_since_ms.store(edgeloop_common::unix_millis().max(1), Ordering::Relaxed);
        let committed = ingestor.commit();
        pending.commit_since_ms.store(0, Ordering::Relaxed);
        match committed {
            // PostgreSQL dropped the transaction (a lost connection, a failover): nothing is acknowledged, the
            // devices send the group again, and what did get committed is found stored and not kept twice.
            Err(e) if matches!(e, StoreError::Postgres(_)) && is_transient(&e) => {
                metrics.reject("store_busy");
                backoff.wait_or_give_up(e, "store commit failed")?;
                continue;
            }
            // After a failed fdatasync the kernel may have dropped the dirty pages, and a later sync can succeed
            // without them: later acknowledgements would cover lost data. Stop instead.
            Err(e) => {
                tracing::error!(error = %e, "store commit failed; stopping ingest without acknowledging this group");
                return Err(anyhow::Error::new(e).context("store commit failed"));
            }
            Ok(()) => {}
        }
        backoff = Backoff::default();
        if !acks.is_empty() {
            let mut p = pending.acks.lock().unwrap_or_else(|p| p.into_inner());
            for (d, ack) in acks {
                merge(&mut p, d, ack);
            }
            drop(p);
            pending.notify.notify_one();
        }
    }
    Ok(())
}

/// The device a topic names (`edgeloop/v1/<device>/...`), or the whole topic if it names none; only for
/// ordering a group, so a malformed topic just sorts somewhere (ingest refuses it by name).
fn device_of(topic: &str) -> &str {
    topic.split('/').nth(2).unwrap_or(topic)
}

async fn ack_task(
    client: AsyncClient,
    uplink: String,
    signer: edgeloop_common::signing::Signer,
    pending: Arc<PendingAcks>,
    metrics: Arc<Metrics>,
    mut connected: mpsc::UnboundedReceiver<()>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                // Called after the ingest thread's final commit: these are its acknowledgements.
                publish_pending(&client, &signer, &pending, &metrics).await;
                return;
            }
            c = connected.recv() => {
                if c.is_none() { return; }
                if let Err(e) = client.subscribe(uplink.clone(), QoS::AtLeastOnce).await {
                    tracing::error!(error = %e, "cannot subscribe to uplink topics");
                }
            }
            _ = pending.notify.notified() => publish_pending(&client, &signer, &pending, &metrics).await,
        }
    }
}

async fn publish_pending(
    client: &AsyncClient,
    signer: &edgeloop_common::signing::Signer,
    pending: &PendingAcks,
    metrics: &Metrics,
) {
    let acks: Vec<(String, Ack)> = pending.acks.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
    for (device, ack) in acks {
        let topic = topics::topic(&device, Channel::Ack);
        match client.publish(topic, QoS::AtLeastOnce, false, ack_payload(&device, ack, signer)).await {
            Ok(()) => {
                metrics.acks_sent.inc_by(1);
                tracing::trace!(%device, upto = ack.upto, alerts = ack.alerts, "ack sent");
            }
            Err(e) => {
                tracing::warn!(%device, error = %e, "ack not sent; the agent will resend and be acknowledged then")
            }
        }
    }
}

async fn event_loop(
    mut eventloop: EventLoop,
    msgs: mpsc::Sender<Message>,
    connected: mpsc::UnboundedSender<()>,
    subscribed: tokio::sync::watch::Sender<bool>,
    intake_stop: CancellationToken,
    cancel: CancellationToken,
) {
    let mut msgs = Some(msgs);
    let mut backoff = Duration::from_millis(100);
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = intake_stop.cancelled(), if msgs.is_some() => {
                msgs = None;
                continue;
            }
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                tracing::info!("ingest connected to the broker");
                let _ = connected.send(());
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    // Nothing would ever arrive: say so on every (re)connection, loudly.
                    tracing::error!(
                        "the broker refused the uplink subscription: ingest receives nothing; allow the control \
                         plane's user to subscribe to its uplink filter (with a shared group, the filter starts \
                         with $share/GROUP/; see operations.md, \"External broker setup\")"
                    );
                } else {
                    subscribed.send_replace(true);
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some(tx) = &msgs else { continue };
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = intake_stop.cancelled() => msgs = None,
                    r = tx.send((p.topic, p.payload.to_vec())) => if r.is_err() { return },
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => return,
            Ok(_) => {}
            Err(e) => {
                subscribed.send_replace(false);
                if msgs.is_none() {
                    return;
                }
                tracing::warn!(error = %e, "ingest lost the broker; reconnecting");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_transient_and_a_disk_error_is_not() {
        let io = |code| StoreError::Sled(sled::Error::Io(std::io::Error::from_raw_os_error(code)));
        assert!(is_transient(&io(24)), "EMFILE");
        assert!(is_transient(&io(23)), "ENFILE");
        let durable = StoreError::Durable(edgeloop_common::durable::DurableError::Sled(sled::Error::Io(
            std::io::Error::from_raw_os_error(24),
        )));
        assert!(is_transient(&durable));
        assert!(!is_transient(&io(5)), "EIO");
        assert!(!is_transient(&io(28)), "ENOSPC");
        assert!(!is_transient(&StoreError::Corrupt { device: "d".into(), seq: 1, reason: "bad".into() }));
        let pg = StoreError::Postgres;
        assert!(is_transient(&pg(crate::storage::postgres::PgError::Pool("timed out".into()))));
        assert!(!is_transient(&pg(crate::storage::postgres::PgError::Bad("seq too large".into()))));
    }

    #[test]
    fn a_group_is_ordered_by_device_keeping_each_devices_own_order() {
        let m = |t: &str, n: u8| (t.to_string(), vec![n]);
        let mut group = [
            m("edgeloop/v1/b/up/telemetry", 1),
            m("edgeloop/v1/a/up/telemetry", 2),
            m("edgeloop/v1/b/up/status", 3),
            m("bad", 4),
            m("edgeloop/v1/a/up/logs", 5),
            m("edgeloop/v1/b/up/alerts", 6),
        ];
        group.sort_by(|a, b| device_of(&a.0).cmp(device_of(&b.0)));
        let order: Vec<u8> = group.iter().map(|(_, p)| p[0]).collect();
        assert_eq!(order, vec![2, 5, 1, 3, 6, 4], "a's then b's, each in arrival order; the malformed one last");
    }
}
