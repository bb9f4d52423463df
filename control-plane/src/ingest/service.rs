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
use crate::metrics::Metrics;
use edgeloop_common::topics::{self, Channel};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// A topic and its payload.
type Message = (String, Vec<u8>);

#[derive(Default)]
struct PendingAcks {
    acks: Mutex<HashMap<String, u64>>,
    notify: Notify,
}

/// Connects to the broker and runs ingest until `cancel` fires. Returns after the ingest thread has
/// committed everything it took.
pub async fn run(
    options: MqttOptions,
    ingestor: Ingestor,
    metrics: Arc<Metrics>,
    commit_max: usize,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let (client, eventloop) = AsyncClient::new(options, 1024);
    let (msg_tx, msg_rx) = mpsc::channel::<Message>(8192);
    let pending = Arc::new(PendingAcks::default());
    let (conn_tx, conn_rx) = mpsc::unbounded_channel::<()>();

    let worker_pending = pending.clone();
    let worker = std::thread::Builder::new()
        .name("ingest".into())
        .spawn(move || ingest_thread(ingestor, msg_rx, commit_max, &worker_pending))?;

    let link_cancel = cancel.child_token();
    let link = tokio::spawn(event_loop(eventloop, msg_tx, conn_tx, link_cancel.clone()));
    let acks = tokio::spawn(ack_task(client.clone(), pending.clone(), metrics, conn_rx, cancel.clone()));

    cancel.cancelled().await;
    link_cancel.cancel();
    let _ = link.await; // drops msg_tx: the ingest thread drains, commits and returns
    let joined = tokio::task::spawn_blocking(move || worker.join()).await?;
    let result = match joined {
        Ok(r) => r,
        Err(_) => Err(anyhow::anyhow!("ingest thread panicked")),
    };
    let _ = acks.await;
    let _ = client.try_disconnect();
    result
}

fn ingest_thread(
    ingestor: Ingestor,
    mut rx: mpsc::Receiver<Message>,
    commit_max: usize,
    pending: &PendingAcks,
) -> anyhow::Result<()> {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < commit_max {
            match rx.try_recv() {
                Ok(m) => group.push(m),
                Err(_) => break,
            }
        }
        let now = edgeloop_common::unix_millis();
        let mut acks: HashMap<String, u64> = HashMap::new();
        for (topic, payload) in &group {
            match ingestor.handle(topic, payload, now) {
                Ok(Outcome::Ack { device, upto }) => {
                    let e = acks.entry(device).or_default();
                    *e = (*e).max(upto);
                }
                Ok(_) => {}
                // A store failure (disk full, say) must not be acknowledged; the agents will resend.
                Err(e) => {
                    tracing::error!(error = %e, "store write failed; the batch stays unacknowledged");
                    acks.clear();
                    break;
                }
            }
        }
        if let Err(e) = ingestor.commit() {
            tracing::error!(error = %e, "store commit failed; nothing from this group is acknowledged");
            continue;
        }
        if !acks.is_empty() {
            let mut p = pending.acks.lock().unwrap_or_else(|p| p.into_inner());
            for (d, upto) in acks {
                let e = p.entry(d).or_default();
                *e = (*e).max(upto);
            }
            drop(p);
            pending.notify.notify_one();
        }
    }
    Ok(())
}

async fn ack_task(
    client: AsyncClient,
    pending: Arc<PendingAcks>,
    metrics: Arc<Metrics>,
    mut connected: mpsc::UnboundedReceiver<()>,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                // Give acknowledgements of the final commit a chance to go out.
                tokio::time::sleep(Duration::from_millis(100)).await;
                publish_pending(&client, &pending, &metrics).await;
                return;
            }
            c = connected.recv() => {
                if c.is_none() { return; }
                if let Err(e) = client.subscribe(topics::ALL_UPLINK, QoS::AtLeastOnce).await {
                    tracing::error!(error = %e, "cannot subscribe to uplink topics");
                }
            }
            _ = pending.notify.notified() => publish_pending(&client, &pending, &metrics).await,
        }
    }
}

async fn publish_pending(client: &AsyncClient, pending: &PendingAcks, metrics: &Metrics) {
    let acks: Vec<(String, u64)> = pending.acks.lock().unwrap_or_else(|p| p.into_inner()).drain().collect();
    for (device, upto) in acks {
        let topic = topics::topic(&device, Channel::Ack);
        match client.publish(topic, QoS::AtLeastOnce, false, ack_payload(&device, upto)).await {
            Ok(()) => {
                metrics.acks_sent.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(%device, upto, "ack sent");
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
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                backoff = Duration::from_millis(100);
                tracing::info!("ingest connected to the broker");
                let _ = connected.send(());
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let send = msgs.send((p.topic, p.payload.to_vec()));
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = send => if r.is_err() { return },
                }
            }
            Ok(_) => {}
            Err(e) => {
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
