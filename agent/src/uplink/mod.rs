//! The MQTT uplink: drains the outbox to the control plane and deletes records only on its end-to-end
//! acknowledgement.
//!
//! Two tasks. The rumqttc event loop runs alone in its own task: it reconnects with exponential backoff and
//! turns connection changes and acknowledgements into [`LinkEvent`]s on an unbounded channel, so it never
//! waits on the driver. The driver owns the pure [`state::UplinkState`], reads committed batches from the
//! outbox, publishes them (QoS 1), applies acknowledgements and sends heartbeats. Publishing never happens
//! from the event-loop task, which would deadlock once the request channel filled.

pub mod state;

use crate::config::AgentConfig;
use crate::health::Health;
use crate::outbox::Outbox;
use edgeloop_common::envelope::{self, Ack, Body, Envelope, Status, TelemetryBatch, DEFAULT_MAX_MESSAGE_BYTES};
use edgeloop_common::signing::{Signed, TrustedKey};
use edgeloop_common::topics::{self, Channel};
use edgeloop_common::unix_millis;
use edgeloop_common::update::UpdateReport;
use ring::signature::Ed25519KeyPair;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use state::{Tick, UplinkParams, UplinkState};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

/// What the event loop tells the driver.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkEvent {
    Connected,
    Disconnected,
    Ack(Ack),
}

/// Counters for tests and the fleet runner.
#[derive(Debug, Default)]
pub struct UplinkCounters {
    pub batches_sent: std::sync::atomic::AtomicU64,
    pub resends: std::sync::atomic::AtomicU64,
    pub connects: std::sync::atomic::AtomicU64,
    /// Connection attempts that failed (refused by the broker, or no broker), not counting lost connections.
    pub connect_failures: std::sync::atomic::AtomicU64,
    /// Acknowledgements refused: unsigned, not signed by a trusted key, malformed, or for another device.
    pub acks_refused: std::sync::atomic::AtomicU64,
    /// Whether the broker connection is up now.
    pub connected: std::sync::atomic::AtomicBool,
    /// When the last acknowledgement was taken, Unix ms (0: none since the agent started).
    pub last_ack_ms: std::sync::atomic::AtomicU64,
}

/// Everything the uplink needs.
pub struct Uplink {
    pub device: String,
    pub class: String,
    pub options: MqttOptions,
    pub reconnect: (Duration, Duration),
    pub batch_max: usize,
    pub heartbeat: Duration,
    pub params: UplinkParams,
    pub outbox: Arc<Outbox>,
    pub health: Arc<Health>,
    pub counters: Arc<UplinkCounters>,
    /// The device key: every envelope is signed with it.
    pub key: Arc<Ed25519KeyPair>,
    /// The control plane's keys: only an acknowledgement signed by one of them deletes records.
    pub trusted: Arc<[TrustedKey]>,
    /// Model updates: where desired states go, and the reports to send.
    pub updates: Option<(watch::Sender<Option<Signed>>, mpsc::UnboundedReceiver<UpdateReport>)>,
    /// Class-configuration and agent-binary updates: where the signed desired configurations (`down/config`)
    /// and desired agent builds (`down/agent`) go.
    pub downlinks: Downlinks,
    /// The class configuration in force: batching, heartbeat and acknowledgement timing follow it.
    pub live: Option<watch::Receiver<Arc<edgeloop_common::config::ClassConfig>>>,
    /// The agent's own warnings and errors, shipped on `up/logs` every `[logs] batch_secs`.
    pub logs: Option<crate::logs::Registration>,
    /// Alerts raised on the model's scores, sent on `up/alerts` ahead of telemetry until acknowledged.
    pub alerts: Option<Arc<crate::alerts::AlertBook>>,
}

impl Uplink {
    pub fn from_config(
        cfg: &AgentConfig,
        outbox: Arc<Outbox>,
        health: Arc<Health>,
        counters: Arc<UplinkCounters>,
        key: Arc<Ed25519KeyPair>,
    ) -> Self {
        let mut options = MqttOptions::new(cfg.device_id.clone(), cfg.mqtt_host.clone(), cfg.mqtt_port);
        // Resolved with the config: `mqtts://` always holds a working TLS configuration here.
        if let edgeloop_common::tls::Transport::Tls(tls) = &cfg.mqtt_transport {
            options.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
        }
        options
            .set_keep_alive(cfg.keep_alive)
            .set_clean_session(true)
            .set_max_packet_size(
                edgeloop_common::envelope::MAX_PACKET_BYTES,
                edgeloop_common::envelope::MAX_PACKET_BYTES,
            )
            .set_inflight(64)
            .set_request_channel_capacity(64);
        let u = &cfg.class.uplink;
        Uplink {
            device: cfg.device_id.clone(),
            class: cfg.class.class.clone(),
            options,
            reconnect: (cfg.reconnect_min, cfg.reconnect_max),
            batch_max: u.batch_max_records,
            heartbeat: Duration::from_secs(u.heartbeat_secs),
            params: UplinkParams {
                max_inflight_batches: u.max_inflight_batches,
                ack_timeout_ms: u.ack_timeout_secs * 1000,
            },
            outbox,
            health,
            counters,
            updates: None,
            downlinks: Vec::new(),
            live: None,
            logs: None,
            alerts: None,
            key,
            trusted: cfg.trusted_keys.clone().into(),
        }
    }

    /// Runs until cancelled. `durable` is notified whenever the collector commits records.
    pub async fn run(mut self, durable: Arc<Notify>, cancel: CancellationToken) -> anyhow::Result<()> {
        let (client, eventloop) = AsyncClient::new(self.options.clone(), 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let ack_topic = topics::topic(&self.device, Channel::Ack);
        let (desired_tx, reports) = match self.updates.take() {
            Some((d, r)) => (Some(d), Some(r)),
            None => (None, None),
        };
        // Not a child of `cancel`: the event loop must outlive the driver, which still publishes while it stops.
        let link_cancel = CancellationToken::new();
        let downlinks = std::mem::take(&mut self.downlinks);
        let subscribe: Vec<Channel> = downlinks.iter().map(|(c, _)| *c).collect();
        let live = self.live.take();
        let link = tokio::spawn(event_loop(
            eventloop,
            (ack_topic.clone(), self.trusted.clone()),
            (desired_tx, downlinks),
            self.reconnect,
            tx,
            link_cancel.clone(),
            self.counters.clone(),
        ));
        let result = Driver {
            up: &self,
            client: &client,
            state: UplinkState::new(self.params, self.outbox.stats().acked),
            started: Instant::now(),
            status_seq: 0,
            deletions_pending: false,
            last_commit: Instant::now(),
            reports,
            subscribe,
            batch_max: self.batch_max,
            heartbeat_every: self.heartbeat,
            logs: self.logs.as_ref().map(|r| r.ring().clone()),
            alerts: AlertsSent::default(),
        }
        .run(rx, &ack_topic, durable, live, cancel)
        .await;
        // Let the last heartbeat go out, then hang up.
        let _ = client.try_disconnect();
        let mut link = link;
        if tokio::time::timeout(Duration::from_millis(500), &mut link).await.is_err() {
            link_cancel.cancel();
            let _ = link.await;
        }
        result
    }
}

struct Driver<'a> {
    up: &'a Uplink,
    client: &'a AsyncClient,
    state: UplinkState,
    started: Instant,
    status_seq: u64,
    /// Acknowledged deletions not yet committed to disk, and when the last commit ran.
    deletions_pending: bool,
    last_commit: Instant,
    reports: Option<mpsc::UnboundedReceiver<UpdateReport>>,
    /// The downlinks to subscribe to besides `down/ack` and `down/desired`.
    subscribe: Vec<Channel>,
    /// Records per batch and the heartbeat period, as the class configuration in force says.
    batch_max: usize,
    heartbeat_every: Duration,
    logs: Option<crate::logs::SharedRing>,
    alerts: AlertsSent,
}

/// Where the alert snapshots stand on this link: the highest `rev` sent, the highest acknowledged, and when
/// the oldest unacknowledged one went.
#[derive(Debug, Default)]
struct AlertsSent {
    sent: u64,
    acked: u64,
    since_ms: u64,
}

/// How often acknowledged deletions are committed. Losing them to a crash only means resending records the
/// control plane already has (and deduplicates), so they need not be committed one by one.
const DELETION_COMMIT_EVERY: Duration = Duration::from_secs(2);

impl Driver<'_> {
    /// Commits acknowledged deletions if there are any (and `force`, or enough time has passed).
    async fn commit_deletions(&mut self, force: bool) -> anyhow::Result<()> {
        if self.deletions_pending && (force || self.last_commit.elapsed() >= DELETION_COMMIT_EVERY) {
            let outbox = self.up.outbox.clone();
            tokio::task::spawn_blocking(move || outbox.commit()).await??;
            (self.deletions_pending, self.last_commit) = (false, Instant::now());
        }
        Ok(())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<LinkEvent>,
        ack_topic: &str,
        durable: Arc<Notify>,
        mut live: Option<watch::Receiver<Arc<edgeloop_common::config::ClassConfig>>>,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut heartbeat = tokio::time::interval(self.heartbeat_every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut log_every = self.log_config().map_or(Duration::from_secs(10), |c| Duration::from_secs(c.batch_secs));
        let mut log_tick = tokio::time::interval(log_every);
        log_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.send_alerts(&cancel).await?;
            self.send_ready(&cancel).await?;
            tokio::select! {
                _ = cancel.cancelled() => break,
                ev = rx.recv() => match ev {
                    Some(LinkEvent::Connected) => {
                        let now = self.now_ms();
                        self.state.connected(now);
                        self.up.counters.connected.store(true, std::sync::atomic::Ordering::Relaxed);
                        or_stop(&cancel, self.client.subscribe(ack_topic, QoS::AtLeastOnce)).await?;
                        // Snapshots sent on the last connection may be lost with it: send them again.
                        self.alerts.sent = self.alerts.acked;
                        if self.reports.is_some() {
                            let desired = topics::topic(&self.up.device, Channel::Desired);
                            or_stop(&cancel, self.client.subscribe(desired, QoS::AtLeastOnce)).await?;
                        }
                        for ch in self.subscribe.clone() {
                            let topic = topics::topic(&self.up.device, ch);
                            or_stop(&cancel, self.client.subscribe(topic, QoS::AtLeastOnce)).await?;
                        }
                        or_stop(&cancel, self.send_status()).await?;
                    }
                    Some(LinkEvent::Disconnected) => {
                        self.state.disconnected();
                        self.up.counters.connected.store(false, std::sync::atomic::Ordering::Relaxed);
                    }
                    Some(LinkEvent::Ack(Ack { upto, mut alerts })) => {
                        if let Some(last) = self.up.alerts.as_ref().map(|b| b.last_rev()).filter(|&l| alerts > l) {
                            // Acknowledging snapshots never made would drop future ones unseen.
                            tracing::warn!(device = %self.up.device, alerts, last, "alert acknowledgement beyond the last snapshot; capped");
                            alerts = last;
                        }
                        if let (Some(book), true) = (self.up.alerts.clone(), alerts > self.alerts.acked) {
                            tokio::task::spawn_blocking(move || book.ack(alerts)).await??;
                            self.alerts.acked = alerts;
                            self.alerts.sent = self.alerts.sent.max(alerts);
                            self.deletions_pending = true;
                        }
                        let now = self.now_ms();
                        let appended = self.up.outbox.stats().durable_seq;
                        if upto > appended {
                            // Acknowledging what was never sent would delete future records unseen.
                            tracing::warn!(device = %self.up.device, upto, appended, "acknowledgement beyond the last record ignored");
                        } else if let Some(upto) = self.state.ack(upto, now) {
                            self.up.counters.last_ack_ms.store(unix_millis(), std::sync::atomic::Ordering::Relaxed);
                            let outbox = self.up.outbox.clone();
                            tokio::task::spawn_blocking(move || outbox.ack(upto)).await??;
                            self.deletions_pending = true;
                        }
                    }
                    None => break,
                },
                _ = durable.notified() => {}
                changed = async { live.as_mut().expect("checked").changed().await }, if live.is_some() => {
                    match changed {
                        Ok(()) => {
                            let c = live.as_mut().expect("checked").borrow_and_update().clone();
                            self.follow(&c.uplink, &mut heartbeat);
                            if let Some(ring) = &self.logs {
                                ring.lock().unwrap_or_else(|p| p.into_inner()).follow(c.logs.clone());
                                let every = Duration::from_secs(c.logs.batch_secs);
                                if every != log_every {
                                    log_every = every;
                                    log_tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                                    log_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                                }
                            }
                        }
                        Err(_) => live = None,
                    }
                }
                Some(report) = async { self.reports.as_mut()?.recv().await }, if self.reports.is_some() => {
                    // Offline, the report waits for the next heartbeat, which carries the latest one.
                    if self.state.is_connected() {
                        self.status_seq += 1;
                        let mut env = Envelope::new(self.up.device.clone(), self.status_seq, unix_millis(), Body::Report(report));
                        env.sign(&self.up.key);
                        let topic = topics::topic(&self.up.device, Channel::Report);
                        or_stop(&cancel, self.client.publish(topic, QoS::AtLeastOnce, false, envelope::encode(&env))).await?;
                    }
                }
                _ = tick.tick() => {
                    self.commit_deletions(false).await?;
                    let now = self.now_ms();
                    if self.alerts.sent > self.alerts.acked
                        && now.saturating_sub(self.alerts.since_ms) >= self.state.params.ack_timeout_ms
                    {
                        tracing::debug!(device = %self.up.device, from = self.alerts.acked + 1, "no acknowledgement of alerts in time; sending again");
                        self.alerts.sent = self.alerts.acked;
                    }
                    if let Tick::Resend { from } = self.state.tick(now) {
                        self.up.counters.resends.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(device = %self.up.device, from, "no acknowledgement in time; sending again");
                    }
                }
                _ = heartbeat.tick() => {
                    if self.state.is_connected() {
                        or_stop(&cancel, self.send_status()).await?;
                    }
                }
                _ = log_tick.tick(), if self.logs.is_some() => {
                    if self.state.is_connected() {
                        or_stop(&cancel, self.send_logs()).await?;
                    }
                }
            }
        }
        self.commit_deletions(true).await?;
        if self.state.is_connected() {
            // The last words first: why the agent stops is often in them.
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                self.send_logs().await?;
                self.send_status().await
            })
            .await;
        }
        Ok(())
    }

    /// The `[logs]` section in force, if the agent ships logs.
    fn log_config(&self) -> Option<edgeloop_common::config::LogsConfig> {
        Some(self.logs.as_ref()?.lock().unwrap_or_else(|p| p.into_inner()).config().clone())
    }

    /// Sends what the log ring holds (one batch at most), if shipping is on and there is anything to say. Called
    /// after the telemetry that is ready has gone, and at most once every `[logs] batch_secs`.
    async fn send_logs(&mut self) -> anyhow::Result<()> {
        let Some(ring) = &self.logs else { return Ok(()) };
        // No logging while the ring is locked: the logging layer takes the same lock.
        let batch = {
            let mut r = ring.lock().unwrap_or_else(|p| p.into_inner());
            if !r.config().ship || !r.has_news() {
                return Ok(());
            }
            r.take_batch()
        };
        self.status_seq += 1;
        let mut env = Envelope::new(self.up.device.clone(), self.status_seq, unix_millis(), Body::Logs(batch));
        env.sign(&self.up.key);
        self.client
            .publish(topics::topic(&self.up.device, Channel::Logs), QoS::AtLeastOnce, false, envelope::encode(&env))
            .await?;
        Ok(())
    }

    /// Takes new uplink settings from a class configuration: the next batch, heartbeat and resend follow them.
    fn follow(&mut self, u: &edgeloop_common::config::UplinkConfig, heartbeat: &mut tokio::time::Interval) {
        self.batch_max = u.batch_max_records;
        self.state.params =
            UplinkParams { max_inflight_batches: u.max_inflight_batches, ack_timeout_ms: u.ack_timeout_secs * 1000 };
        let every = Duration::from_secs(u.heartbeat_secs);
        if every != self.heartbeat_every {
            self.heartbeat_every = every;
            *heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        tracing::info!(batch_max = self.batch_max, heartbeat = ?every, "uplink follows the new class configuration");
    }

    /// Publishes the alert snapshots not sent on this connection yet, oldest first: before any telemetry, so
    /// that an alert raised offline is not stuck behind the backlog.
    async fn send_alerts(&mut self, cancel: &CancellationToken) -> anyhow::Result<()> {
        let Some(book) = self.up.alerts.clone() else { return Ok(()) };
        if !self.state.is_connected() {
            return Ok(());
        }
        let (pending, floor) = tokio::task::spawn_blocking(move || {
            Ok::<_, crate::outbox::OutboxError>((book.pending(64)?, book.floor()?))
        })
        .await??;
        let from = self.alerts.sent;
        for mut alert in pending.into_iter().filter(|a| a.rev > from) {
            let rev = alert.rev;
            alert.floor = floor;
            self.status_seq += 1;
            let mut env = Envelope::new(self.up.device.clone(), self.status_seq, unix_millis(), Body::Alert(alert));
            env.sign(&self.up.key);
            let topic = topics::topic(&self.up.device, Channel::Alerts);
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = self.client.publish(topic, QoS::AtLeastOnce, false, envelope::encode(&env)) => r?,
            }
            if self.alerts.sent == self.alerts.acked {
                self.alerts.since_ms = self.now_ms();
            }
            self.alerts.sent = rev;
        }
        Ok(())
    }

    /// Publishes batches while the state machine allows and the outbox has committed records.
    async fn send_ready(&mut self, cancel: &CancellationToken) -> anyhow::Result<()> {
        while let Some(from) = self.state.next_from() {
            let outbox = self.up.outbox.clone();
            let max = self.batch_max;
            let records = tokio::task::spawn_blocking(move || outbox.read_batch(from, max)).await??;
            let Some((to, payload)) = encode_batch(&self.up.device, from, records, &self.up.key) else { return Ok(()) };
            let topic = topics::topic(&self.up.device, Channel::Telemetry);
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = self.client.publish(topic, QoS::AtLeastOnce, false, payload) => r?,
            }
            let now = self.now_ms();
            self.state.sent(from, to, now);
            self.up.counters.batches_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    async fn send_status(&mut self) -> anyhow::Result<()> {
        let s = self.up.outbox.stats();
        let mut status = Status {
            class: self.up.class.clone(),
            outbox_depth: s.depth,
            outbox_bytes: s.bytes,
            last_seq: s.durable_seq,
            acked_upto: s.acked,
            dropped_total: s.dropped_total,
            dropped_ranges: s.dropped_ranges,
            ..Default::default()
        };
        self.up.health.fill(&mut status);
        self.status_seq += 1;
        let mut env = Envelope::new(self.up.device.clone(), self.status_seq, unix_millis(), Body::Status(status));
        env.sign(&self.up.key);
        self.client
            .publish(topics::topic(&self.up.device, Channel::Status), QoS::AtLeastOnce, false, envelope::encode(&env))
            .await?;
        Ok(())
    }
}

/// Awaits a request to the MQTT client unless the uplink is told to stop first. While the link is down the
/// client's request queue does not drain, and a full queue must not keep the uplink (and its outbox) from
/// stopping.
async fn or_stop<E: Into<anyhow::Error>>(
    cancel: &CancellationToken,
    f: impl std::future::Future<Output = Result<(), E>>,
) -> anyhow::Result<()> {
    tokio::select! {
        _ = cancel.cancelled() => Ok(()),
        r = f => r.map_err(Into::into),
    }
}

/// Payload budget of one telemetry message, below the protocol's limit with room for the envelope.
const BATCH_BYTES: usize = DEFAULT_MAX_MESSAGE_BYTES - 4096;

/// Encodes a batch starting at `from`, halving it until it fits [`BATCH_BYTES`]. Returns the batch's last
/// sequence number and the payload; `None` if there is nothing to send.
fn encode_batch(
    device: &str,
    from: u64,
    mut records: Vec<edgeloop_common::envelope::Record>,
    key: &Ed25519KeyPair,
) -> Option<(u64, Vec<u8>)> {
    loop {
        let to = records.last()?.seq;
        let n = records.len();
        let mut env = Envelope::new(device, to, unix_millis(), Body::Telemetry(TelemetryBatch { from, to, records }));
        env.sign(key);
        let payload = envelope::encode(&env);
        if payload.len() <= BATCH_BYTES || n == 1 {
            return Some((to, payload));
        }
        // Take the records back out of the envelope built above (always a telemetry body).
        records = match env.body {
            Body::Telemetry(batch) => batch.records,
            _ => return None,
        };
        records.truncate(n / 2);
    }
}

/// The acknowledged point of an acknowledgement received on `ack_topic`, if it is one for this device signed
/// by a key in `trusted` (in force at `now_ms`). Anything else deletes nothing: whoever can publish on the
/// topic (a device on a broker without ACLs, a compromised broker) cannot make the agent drop records.
pub fn read_ack(payload: &[u8], ack_topic: &str, trusted: &[TrustedKey], now_ms: u64) -> Result<Ack, AckError> {
    let env = envelope::decode(payload, DEFAULT_MAX_MESSAGE_BYTES)?;
    if topics::topic(&env.device, Channel::Ack) != ack_topic {
        return Err(AckError::OtherDevice(env.device));
    }
    let Body::Ack(ack) = env.body else {
        return Err(AckError::NotAnAck(env.body.kind()));
    };
    if env.seq != ack.upto {
        return Err(AckError::SeqMismatch { seq: env.seq, upto: ack.upto });
    }
    env.verify_by_trusted(trusted, now_ms).map_err(|error| AckError::Signature { error, trusted: trusted.len() })?;
    Ok(ack)
}

/// Why a message on the ack topic deletes nothing.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum AckError {
    #[error("malformed: {0}")]
    Malformed(#[from] envelope::DecodeError),
    #[error("it is for device `{0}`")]
    OtherDevice(String),
    #[error("a {0} message on the ack topic")]
    NotAnAck(&'static str),
    #[error("its seq {seq} is not its upto {upto}")]
    SeqMismatch { seq: u64, upto: u64 },
    #[error("{error} (checked against {trusted} trusted keys)")]
    Signature { error: envelope::SignatureError, trusted: usize },
}

/// Where signed messages on downlink topics other than `down/desired` go, by channel.
pub type Downlinks = Vec<(Channel, watch::Sender<Option<Signed>>)>;

/// Polls the rumqttc event loop, reconnecting with exponential backoff and jitter. Does nothing else.
async fn event_loop(
    mut eventloop: EventLoop,
    (ack_topic, trusted): (String, Arc<[TrustedKey]>),
    (desired, downlinks): (Option<watch::Sender<Option<Signed>>>, Downlinks),
    (min, max): (Duration, Duration),
    tx: mpsc::UnboundedSender<LinkEvent>,
    cancel: CancellationToken,
    counters: Arc<UplinkCounters>,
) {
    let mut backoff = crate::backoff::Backoff::new(min, max);
    let mut connected = false;
    let mut failures = 0u64;
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connected = true;
                backoff.reset();
                counters.connects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!("connected to the broker");
                let _ = tx.send(LinkEvent::Connected);
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                match read_ack(&p.payload, &ack_topic, &trusted, unix_millis()) {
                    Ok(ack) => {
                        let _ = tx.send(LinkEvent::Ack(ack));
                    }
                    Err(why) => {
                        let n = counters.acks_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        if n.is_power_of_two() {
                            tracing::warn!(topic = %p.topic, refused = n, "acknowledgement refused, nothing deleted: {why}");
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::Publish(p)))
                if desired.is_some() && topics::parse(&p.topic).ok().map(|t| t.1) == Some(Channel::Desired) =>
            {
                match envelope::decode(&p.payload, DEFAULT_MAX_MESSAGE_BYTES) {
                    Ok(Envelope { body: Body::Desired(signed), device, .. })
                        if topics::topic(&device, Channel::Ack) == ack_topic =>
                    {
                        if let Some(d) = &desired {
                            d.send_replace(Some(signed));
                        }
                    }
                    Ok(other) => {
                        tracing::warn!(topic = %p.topic, device = %other.device, kind = other.body.kind(), "unexpected message on the desired topic")
                    }
                    Err(e) => tracing::warn!(topic = %p.topic, error = %e, "malformed desired state dropped"),
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let Some((ch, to)) =
                    topics::parse(&p.topic).ok().and_then(|(_, ch)| downlinks.iter().find(|(c, _)| *c == ch))
                else {
                    continue;
                };
                match envelope::decode(&p.payload, DEFAULT_MAX_MESSAGE_BYTES) {
                    Ok(env) if topics::topic(&env.device, Channel::Ack) == ack_topic => match (ch, env.body) {
                        (Channel::Config, Body::Config(signed)) | (Channel::Agent, Body::Agent(signed)) => {
                            to.send_replace(Some(signed));
                        }
                        (_, other) => {
                            tracing::warn!(topic = %p.topic, kind = other.kind(), "unexpected message on a downlink topic")
                        }
                    },
                    Ok(other) => {
                        tracing::warn!(topic = %p.topic, device = %other.device, "message for another device dropped")
                    }
                    Err(e) => tracing::warn!(topic = %p.topic, error = %e, "malformed downlink message dropped"),
                }
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                let _ = tx.send(LinkEvent::Disconnected);
                return;
            }
            Ok(_) => {}
            Err(e) => {
                if connected {
                    tracing::warn!(error = %e, "broker connection lost; reconnecting");
                    let _ = tx.send(LinkEvent::Disconnected);
                    connected = false;
                } else {
                    failures += 1;
                    counters.connect_failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if failures.is_power_of_two() {
                        tracing::warn!(error = %e, attempts = failures, "cannot reach the broker; retrying");
                    }
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_delay().unwrap_or(max)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_common::envelope::Record;

    #[test]
    fn oversize_batches_are_split_to_fit() {
        let records: Vec<Record> = (1..=2000)
            .map(|seq| Record {
                seq,
                ts_ms: seq,
                sensor: "accel".into(),
                features: vec![1.5; 96],
                score: None,
                flags: 0,
            })
            .collect();
        let rng = ring::rand::SystemRandom::new();
        let key = Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
        let (to, payload) = encode_batch("d", 1, records, &key).unwrap();
        assert!(payload.len() <= BATCH_BYTES);
        assert!((250..2000).contains(&to), "to = {to}");
        let env = envelope::decode(&payload, DEFAULT_MAX_MESSAGE_BYTES).unwrap();
        let Body::Telemetry(b) = env.body.clone() else { panic!("not telemetry") };
        assert_eq!((b.from, b.to, b.records.len() as u64), (1, to, to));
        use ring::signature::KeyPair;
        assert_eq!(env.verify(key.public_key().as_ref()), Ok(()), "every batch is signed");
        assert!(encode_batch("d", 1, Vec::new(), &key).is_none());
    }

    #[test]
    fn acks_must_be_signed_by_a_trusted_key_for_this_device() {
        use edgeloop_common::signing::Signer;
        let (cp, stranger) = (
            Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap(),
            Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap(),
        );
        let trusted = [cp.trusted(None)];
        let topic = topics::topic("dev-1", Channel::Ack);
        let ack = |device: &str, upto: u64, by: Option<&Signer>| {
            let mut env = Envelope::new(device, upto, 1, Body::Ack(Ack { upto, alerts: 0 }));
            if let Some(s) = by {
                env.sign_by_control_plane(s);
            }
            envelope::encode(&env)
        };
        assert_eq!(read_ack(&ack("dev-1", 42, Some(&cp)), &topic, &trusted, 0), Ok(Ack { upto: 42, alerts: 0 }));
        let unsigned = read_ack(&ack("dev-1", 42, None), &topic, &trusted, 0).unwrap_err();
        assert!(unsigned.to_string().contains("not signed"), "{unsigned}");
        assert!(matches!(unsigned, AckError::Signature { error: envelope::SignatureError::Unsigned, trusted: 1 }));
        let forged = read_ack(&ack("dev-1", 42, Some(&stranger)), &topic, &trusted, 0).unwrap_err().to_string();
        assert!(forged.contains("does not verify"), "{forged}");
        // A genuine acknowledgement for another device, replayed on this one's topic.
        let elsewhere = read_ack(&ack("dev-2", 42, Some(&cp)), &topic, &trusted, 0).unwrap_err();
        assert_eq!(elsewhere, AckError::OtherDevice("dev-2".into()));
        assert!(elsewhere.to_string().contains("dev-2"), "{elsewhere}");
        assert!(read_ack(&ack("dev-1", 42, Some(&cp)), &topic, &[], 0).is_err(), "no trusted key, no deletion");
        assert!(read_ack(b"junk", &topic, &trusted, 0).unwrap_err().to_string().starts_with("malformed"));
    }
}
