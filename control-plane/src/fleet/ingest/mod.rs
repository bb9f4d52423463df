//! Ingest: uplink messages in, stored records and acknowledgements out.
//!
//! [`Ingestor`] holds the rules and does no network I/O: it parses the topic, decodes the envelope (size,
//! depth, version), checks that the envelope's device matches the topic and its signature the device's
//! enrolled key, and only then charges the device's rate budget; it then checks that the body matches the
//! topic, stores each record unless (device, seq) is already stored, advances the device's cumulative
//! watermark, and updates the registry (in memory; entries are written once per commit). Every refusal is
//! counted by reason and logged (rate-limited) with its origin, and never stops the loop. A refusal before
//! the signature check touches neither the rate budget nor the registry entry of the device the topic names:
//! anyone who can publish there can send it.
//!
//! The watermark rule: a batch covering `from..=to` advances the watermark `W` to `max(W, to)` only if
//! `from <= W + 1`, that is, only if nothing between the watermark and the batch can be missing. A batch
//! that arrives ahead of a lost one is stored but waits for the resend to advance the watermark.
//!
//! Recovery: a device deletes records only when they are acknowledged, so its heartbeat's `acked_upto` above
//! `W` means records `W+1..=acked_upto` are gone from the device without the control plane holding them all
//! (an acknowledgement it never sent, or a store restored from an older backup). They can never arrive, and
//! the device's batches now start past `W + 1`, so the rule above would never advance `W` again. Ingest
//! counts the ones it does not hold as lost (registry, metric, warning) and moves `W` to `acked_upto`. A
//! batch's `from` cannot serve instead: batches are pipelined, and a `from` past `W + 1` usually only means
//! that the batch before it is still on its way or will be resent.
//!
//! [`service`] feeds it from MQTT, group-commits, and publishes acknowledgements only after the commit.

pub mod service;

use crate::fleet::devices::Registry;
use crate::fleet::telemetry::{StoreError, TelemetryStore};
use crate::metrics::Metrics;
use edgeloop_common::envelope::{self, Body, Envelope, SeqRange, Status};
use edgeloop_common::topics::{self, Channel};
use std::sync::Arc;

/// What one message led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Telemetry handled: acknowledge `upto` to `device` once committed.
    Ack { device: String, upto: u64 },
    /// A heartbeat, recorded.
    Status,
    /// Device log lines: how many were stored, and how many cut for going over the control plane's budget.
    Logs { stored: u64, cut: u64 },
    /// An alert snapshot handled: acknowledge `alerts` (and the telemetry watermark `upto`) once committed.
    AlertAck { device: String, upto: u64, alerts: u64 },
    /// Refused, for this reason (also counted in metrics).
    Rejected(&'static str),
}

pub struct Ingestor {
    store: TelemetryStore,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    max_message_bytes: usize,
    /// When set, every envelope must be signed with its device's enrolled key.
    enrollment: Option<Arc<crate::fleet::enrollment::Enrollment>>,
    limiter: std::sync::Arc<RateLimiter>,
    /// Where device log lines go, and each device's budget of lines (apart from its message rate, so that a
    /// device's logs never cost its telemetry).
    logs: Option<crate::fleet::logs::LogStore>,
    log_budget: RateLimiter,
    /// Where device alerts go.
    alerts: Option<crate::fleet::alerts::AlertStore>,
    /// When each telemetry batch since the last commit was sent (device clock, Unix ms): observed as ingest
    /// latency once the commit makes them durable.
    uncommitted_sent_ms: std::sync::Mutex<Vec<u64>>,
}

/// A token bucket per device: `rate` messages a second on average, bursts of up to `burst`.
///
/// Ingest asks only for messages whose signature verified, so only enrolled devices get a bucket. The map is
/// bounded anyway: when it grows past a high-water mark, buckets that have refilled (the same as having no
/// bucket) are dropped, and the mark becomes twice what is left (at least [`RateLimiter::MIN_PRUNE_AT`]).
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    /// Ingest replicas sharing the uplink (1 alone): each gives a device its share of the rate and burst.
    replicas: std::sync::atomic::AtomicUsize,
    buckets: std::sync::Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    /// Tokens left and when they were counted, per device.
    map: std::collections::HashMap<String, (f64, u64)>,
    prune_at: usize,
}

impl RateLimiter {
    /// Buckets kept before the first pruning.
    pub const MIN_PRUNE_AT: usize = 1024;

    /// `rate` tokens a second (bursts of twice that); a `rate` of 0 turns the limit off.
    pub fn new(rate: f64) -> RateLimiter {
        RateLimiter::with_burst(rate, rate * 2.0)
    }

    /// `rate` tokens a second, bursts of up to `burst`.
    pub fn with_burst(rate: f64, burst: f64) -> RateLimiter {
        RateLimiter {
            rate,
            burst: burst.max(1.0),
            replicas: std::sync::atomic::AtomicUsize::new(1),
            buckets: std::sync::Mutex::new(Buckets { prune_at: Self::MIN_PRUNE_AT, ..Default::default() }),
        }
    }

    /// Shares the limit among `n` replicas that each see about one `n`th of every device's messages (a
    /// broker's shared subscription spreads them), so that a device gets the configured rate in all.
    pub fn set_replicas(&self, n: usize) {
        self.replicas.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// This replica's share of the rate and of the burst (at least one message).
    fn share(&self) -> (f64, f64) {
        let n = self.replicas.load(std::sync::atomic::Ordering::Relaxed).max(1) as f64;
        (self.rate / n, (self.burst / n).max(1.0))
    }

    fn refilled(&self, (tokens, last): (f64, u64), now_ms: u64) -> f64 {
        let (rate, burst) = self.share();
        (tokens + now_ms.saturating_sub(last) as f64 / 1000.0 * rate).min(burst)
    }

    /// Takes one message's token for `device` at `now_ms`; false when the device is over its rate.
    pub fn admit(&self, device: &str, now_ms: u64) -> bool {
        self.take(device, now_ms, 1) == 1
    }

    /// Takes up to `want` tokens for `device` at `now_ms`; returns how many it got.
    pub fn take(&self, device: &str, now_ms: u64, want: u64) -> u64 {
        if self.rate <= 0.0 {
            return want;
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !b.map.contains_key(device) && b.map.len() >= b.prune_at {
            let burst = self.share().1;
            b.map.retain(|_, v| self.refilled(*v, now_ms) < burst);
            b.prune_at = (b.map.len() * 2).max(Self::MIN_PRUNE_AT);
        }
        let bucket = b.map.entry(device.to_string()).or_insert((self.share().1, now_ms));
        let (tokens, last) = (self.refilled(*bucket, now_ms), bucket.1);
        *bucket = (tokens, now_ms.max(last));
        let got = (tokens.floor() as u64).min(want);
        bucket.0 -= got as f64;
        got
    }

    #[cfg(test)]
    /// Devices with a bucket now.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner()).map.len()
    }
}

/// How many records of `range` the control plane does not hold and the device did not report dropped:
/// `stored` are the stored sequence numbers (any order; those outside `range` are ignored), `dropped` the
/// device's dropped ranges (any order, may overlap).
pub fn never_stored(range: SeqRange, stored: &[u64], dropped: &[SeqRange]) -> u64 {
    let mut gone: Vec<SeqRange> = dropped
        .iter()
        .filter(|d| d.from <= d.to && d.from <= range.to && d.to >= range.from)
        .map(|d| SeqRange { from: d.from.max(range.from), to: d.to.min(range.to) })
        .collect();
    gone.sort_by_key(|d| d.from);
    let mut merged: Vec<SeqRange> = Vec::with_capacity(gone.len());
    for d in gone {
        match merged.last_mut() {
            Some(m) if d.from <= m.to.saturating_add(1) => m.to = m.to.max(d.to),
            _ => merged.push(d),
        }
    }
    let in_dropped = |seq: u64| {
        let i = merged.partition_point(|m| m.to < seq);
        merged.get(i).is_some_and(|m| m.contains(seq))
    };
    let mut held: Vec<u64> = stored.iter().copied().filter(|&s| range.contains(s) && !in_dropped(s)).collect();
    held.sort_unstable();
    held.dedup();
    let dropped_n: u64 = merged.iter().map(SeqRange::len).sum();
    range.len() - dropped_n - held.len() as u64
}

impl Ingestor {
    pub fn new(
        store: TelemetryStore,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        max_message_bytes: usize,
    ) -> Self {
        Ingestor {
            store,
            registry,
            metrics,
            max_message_bytes,
            enrollment: None,
            limiter: std::sync::Arc::new(RateLimiter::new(0.0)),
            logs: None,
            alerts: None,
            log_budget: RateLimiter::new(0.0),
            uncommitted_sent_ms: Default::default(),
        }
    }

    /// Limits each device to `per_sec` uplink messages a second (bursts of twice that); 0 turns it off.
    /// Refused messages are counted as `rate_limited`; agents send unacknowledged records again, so nothing
    /// is lost.
    pub fn with_rate_limit(mut self, per_sec: f64) -> Self {
        self.limiter = std::sync::Arc::new(RateLimiter::new(per_sec));
        self
    }

    /// The per-device rate limiter, to share it among replicas ([`RateLimiter::set_replicas`]).
    pub fn rate_limiter(&self) -> std::sync::Arc<RateLimiter> {
        self.limiter.clone()
    }

    /// Stores device log lines in `logs`, at most `lines_per_minute` per device (bursts of twice that); lines
    /// over it are cut and counted. Without this, log messages are refused as `logs_not_kept`.
    pub fn with_logs(mut self, logs: crate::fleet::logs::LogStore, lines_per_minute: f64) -> Self {
        self.logs = Some(logs);
        self.log_budget = RateLimiter::with_burst(lines_per_minute / 60.0, lines_per_minute * 2.0);
        self
    }

    /// Stores the alerts devices raise in `alerts`. Without this, alert messages are refused as
    /// `alerts_not_kept`.
    pub fn with_alerts(mut self, alerts: crate::fleet::alerts::AlertStore) -> Self {
        self.alerts = Some(alerts);
        self
    }

    /// Requires every envelope to be signed with its device's enrolled key (`None`: signatures unchecked).
    pub fn with_enrollment(mut self, enrollment: Option<Arc<crate::fleet::enrollment::Enrollment>>) -> Self {
        self.enrollment = enrollment;
        self
    }

    pub fn store(&self) -> &TelemetryStore {
        &self.store
    }

    fn reject(
        &self,
        device: Option<&str>,
        topic: &str,
        reason: &'static str,
        detail: &str,
    ) -> Result<Outcome, StoreError> {
        self.metrics.reject(reason);
        let total: u64 = self.metrics.rejected(reason);
        if total.is_power_of_two() {
            tracing::warn!(topic, reason, detail, rejected_for_reason = total, "uplink message refused");
        }
        if let Some(d) = device {
            // Only a device's own (verified) messages are charged to it, only once it is known, in memory
            // (written with the next commit); and a refusal does not make a device look alive.
            self.registry.count_rejection(d)?;
        }
        Ok(Outcome::Rejected(reason))
    }

    /// A heartbeat whose `acked_upto` is past the watermark: records the gap as lost and moves the watermark
    /// to `acked_upto` (module docs, "Recovery"). Returns the gap and how many of its records were never
    /// stored, or `None` when there is nothing to recover.
    fn recover_gap(&self, device: &str, status: &Status) -> Result<Option<(SeqRange, u64)>, StoreError> {
        let w = self.store.watermark(device)?;
        let claimed = status.acked_upto;
        if claimed <= w {
            return Ok(None);
        }
        if claimed > status.last_seq {
            // An agent never takes an acknowledgement beyond its last record; this heartbeat contradicts itself.
            tracing::warn!(
                device,
                acked_upto = claimed,
                last_seq = status.last_seq,
                "heartbeat acknowledges beyond its last record; watermark left as it is"
            );
            return Ok(None);
        }
        let range = SeqRange { from: w + 1, to: claimed };
        let stored = self.store.seqs_in(device, range.from, range.to)?;
        let lost = never_stored(range, &stored, &status.dropped_ranges);
        self.store.raise_watermark(device, claimed)?;
        self.metrics.records_lost.inc_by(lost);
        tracing::warn!(
            device,
            from = range.from,
            to = range.to,
            lost,
            "device deleted records past the acknowledged point; those never stored are recorded as lost and the \
             watermark moves to what the device holds"
        );
        Ok(Some((range, lost)))
    }

    /// Handles one message. Writes are not durable until [`Ingestor::commit`].
    pub fn handle(&self, topic: &str, payload: &[u8], now_ms: u64) -> Result<Outcome, StoreError> {
        self.metrics.messages_received.inc_by(1);
        let (device, channel) = match topics::parse(topic) {
            Ok(x) => x,
            Err(e) => return self.reject(None, topic, "bad_topic", &e.to_string()),
        };
        // Until the signature verifies, anyone who can publish on this topic may have sent the message: refusals
        // are counted by reason only, never charged to the device the topic names (its rate budget or its
        // registry entry). Decoding is bounded by `max_message_bytes`.
        let env = match envelope::decode(payload, self.max_message_bytes) {
            Ok(env) => env,
            Err(e) => return self.reject(None, topic, e.reason(), &e.to_string()),
        };
        if env.device != device {
            let detail = format!("envelope says device `{}`", env.device);
            return self.reject(None, topic, "device_mismatch", &detail);
        }
        if let Some(en) = &self.enrollment {
            // The topic names the device; only that device's enrolled key may speak for it.
            let key = match en.public_key(device) {
                Ok(k) => k,
                Err(reason) => return self.reject(None, topic, reason, "no enrolled key for this device"),
            };
            if let Err(e) = env.verify(&key) {
                let reason = match e {
                    edgeloop_common::envelope::SignatureError::Unsigned => "unsigned",
                    edgeloop_common::envelope::SignatureError::BadSignature => "bad_signature",
                };
                return self.reject(None, topic, reason, &e.to_string());
            }
        }
        // The device's own message (without enrollment, as far as can be told): now it spends its budget. Logs
        // spend a budget of their own, in lines (below).
        if channel != Channel::Logs && !self.limiter.admit(device, now_ms) {
            return self.reject(Some(device), topic, "rate_limited", "over the per-device message rate");
        }
        let sent_at = env.sent_at;
        match (channel, env.body) {
            (Channel::Telemetry, Body::Telemetry(batch)) => {
                self.uncommitted_sent_ms.lock().unwrap_or_else(|p| p.into_inner()).push(sent_at);
                let stored = self.store.store_batch(device, &batch)?;
                let (new, dup, flagged, upto) = (stored.new, stored.duplicate, stored.flagged, stored.upto);
                self.metrics.records_ingested.inc_by(new);
                self.metrics.records_duplicate.inc_by(dup);
                self.registry.update(device, now_ms, |d| {
                    d.records += new;
                    d.duplicates += dup;
                    d.acked_upto = upto;
                    if flagged > 0 {
                        d.anomalies += flagged;
                        d.last_anomaly_ms = Some(now_ms);
                    }
                })?;
                Ok(Outcome::Ack { device: device.to_string(), upto })
            }
            (Channel::Status, Body::Status(status))
                if self.enrollment.as_ref().and_then(|e| e.get(device)).is_some_and(|e| e.class != status.class) =>
            {
                // A device is of the class it enrolled for; claiming another would get it that class's models.
                self.reject(
                    Some(device),
                    topic,
                    "class_mismatch",
                    &format!("heartbeat claims class `{}`", status.class),
                )
            }
            (Channel::Status, Body::Status(status)) => {
                self.metrics.status_messages.inc_by(1);
                let lost = self.recover_gap(device, &status)?;
                self.registry.update(device, now_ms, |d| {
                    for u in [&status.update, &status.config_update, &status.agent_update]
                        .into_iter()
                        .filter_map(|u| u.as_deref().cloned())
                    {
                        d.add_update(u);
                    }
                    if let Some((range, n)) = lost {
                        d.record_lost(range, n);
                        d.acked_upto = range.to;
                    }
                    d.set_status(status);
                })?;
                Ok(Outcome::Status)
            }
            (Channel::Report, Body::Report(report)) => {
                self.metrics.update_reports.inc_by(1);
                self.registry.update(device, now_ms, |d| d.add_update(report))?;
                Ok(Outcome::Status)
            }
            (Channel::Logs, Body::Logs(batch)) => self.store_logs(device, topic, batch, now_ms),
            (Channel::Alerts, Body::Alert(alert)) => {
                let Some(alerts) = &self.alerts else {
                    return self.reject(Some(device), topic, "alerts_not_kept", "this ingest keeps no alerts");
                };
                // An onset far ahead of this clock is kept, listed at the time it arrived (the store's
                // `listed_ms`): refusing it would lose the alert and have the device send it forever.
                let class = self.registry.get(device).map(|d| d.class).unwrap_or_default();
                let open = alert.is_open();
                let id = alert.id;
                let acked = alerts.put(device, &class, alert, now_ms)?;
                self.metrics.alert_snapshots.inc_by(1);
                tracing::info!(device, class, alert = id, open, "alert");
                Ok(Outcome::AlertAck { device: device.to_string(), upto: self.store.watermark(device)?, alerts: acked })
            }
            (ch, body) => {
                let detail = format!("a {} body on the {ch} topic", body.kind());
                self.reject(Some(device), topic, "wrong_channel", &detail)
            }
        }
    }

    /// Stores a device's log lines within its budget: the oldest lines of the batch first, the rest cut and
    /// counted. Even an empty batch costs one line, so that empty batches cannot flood either.
    fn store_logs(
        &self,
        device: &str,
        topic: &str,
        batch: envelope::LogBatch,
        now_ms: u64,
    ) -> Result<Outcome, StoreError> {
        let Some(logs) = &self.logs else {
            return self.reject(Some(device), topic, "logs_not_kept", "this ingest keeps no device logs");
        };
        let n = batch.entries.len() as u64;
        let got = self.log_budget.take(device, now_ms, n.max(1));
        if got == 0 {
            self.metrics.log_lines("cut", n);
            self.metrics.log_lines("suppressed", batch.suppressed);
            logs.append(device, "", &[], (batch.suppressed, n), now_ms)?;
            return self.reject(Some(device), topic, "rate_limited", "over the device's budget of log lines");
        }
        let kept = got.min(n) as usize;
        let cut = n - kept as u64;
        let class = self.registry.get(device).map(|d| d.class).unwrap_or_default();
        logs.append(device, &class, &batch.entries[..kept], (batch.suppressed, cut), now_ms)?;
        self.metrics.log_lines("stored", kept as u64);
        self.metrics.log_lines("cut", cut);
        self.metrics.log_lines("suppressed", batch.suppressed);
        Ok(Outcome::Logs { stored: kept as u64, cut })
    }

    /// Makes everything handled so far durable, the registry entries changed since the last commit included
    /// (each written once). Blocking.
    pub fn commit(&self) -> Result<(), StoreError> {
        let sent: Vec<u64> = std::mem::take(&mut *self.uncommitted_sent_ms.lock().unwrap_or_else(|p| p.into_inner()));
        self.registry.write_dirty()?;
        self.store.commit()?;
        self.metrics.commits.inc_by(1);
        // Send to durable commit, by the device's clock against ours (a clock ahead counts as 0). Batches whose
        // commit failed are not observed: their devices send them again.
        let now = edgeloop_common::unix_millis();
        for s in sent {
            self.metrics.ingest_latency.observe(now.saturating_sub(s) as f64 / 1000.0);
        }
        Ok(())
    }
}

/// Encodes the acknowledgement envelope for `device`, signed with the control plane's key: an agent deletes
/// records only on an acknowledgement that verifies against the keys it trusts.
pub fn ack_payload(device: &str, ack: envelope::Ack, signer: &edgeloop_common::signing::Signer) -> Vec<u8> {
    let mut env = Envelope::new(device, ack.upto, edgeloop_common::unix_millis(), Body::Ack(ack));
    env.sign_by_control_plane(signer);
    envelope::encode(&env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_common::durable::{Durability, DurableDb};
    use edgeloop_common::envelope::{Record, SeqRange, Status, TelemetryBatch, DEFAULT_MAX_MESSAGE_BYTES};

    fn ingestor(dir: &std::path::Path) -> Ingestor {
        let db = DurableDb::open(dir, Durability::Flush).unwrap();
        let registry = Arc::new(Registry::open(&db).unwrap());
        Ingestor::new(
            TelemetryStore::open(db).unwrap(),
            registry,
            Arc::new(Metrics::default()),
            DEFAULT_MAX_MESSAGE_BYTES,
        )
    }

    fn batch(device: &str, from: u64, seqs: &[u64]) -> Vec<u8> {
        let records = seqs
            .iter()
            .map(|&seq| Record { seq, ts_ms: seq, sensor: "t".into(), features: vec![0.5], score: None, flags: 0 })
            .collect();
        let to = *seqs.last().unwrap();
        envelope::encode(&Envelope::new(device, to, 0, Body::Telemetry(TelemetryBatch { from, to, records })))
    }

    const T: &str = "edgeloop/v1/d1/up/telemetry";

    #[test]
    fn stores_dedups_and_acks_cumulatively() {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path());
        assert_eq!(
            ing.handle(T, &batch("d1", 1, &[1, 2, 3]), 1).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 3 }
        );
        // Batch 7..9 arrives before 4..6 (lost and resent later, or handled by another replica): stored, the
        // watermark waits; 4..6 closes the gap and the watermark moves over both.
        assert_eq!(
            ing.handle(T, &batch("d1", 7, &[7, 8, 9]), 2).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 3 }
        );
        assert_eq!(
            ing.handle(T, &batch("d1", 4, &[4, 5, 6]), 3).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 9 }
        );
        assert_eq!(
            ing.handle(T, &batch("d1", 7, &[7, 8, 9]), 4).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 9 }
        );
        assert_eq!(ing.store().count("d1").unwrap(), 9);
        assert_eq!(ing.metrics.records_duplicate.get(), 3);
        // A batch whose range covers dropped records (10..12 never sent) advances over them.
        assert_eq!(ing.handle(T, &batch("d1", 10, &[13]), 5).unwrap(), Outcome::Ack { device: "d1".into(), upto: 13 });
        let d = ing.registry.get("d1").unwrap();
        assert_eq!((d.records, d.duplicates, d.acked_upto), (10, 3, 13));
    }

    #[test]
    fn flagged_records_are_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path());
        let flagged = |seqs: &[u64]| {
            let records = seqs
                .iter()
                .map(|&seq| Record {
                    seq,
                    ts_ms: seq,
                    sensor: "t".into(),
                    features: vec![0.5],
                    score: Some(0.9),
                    flags: u32::from(seq % 2 == 0) * envelope::FLAG_ANOMALY,
                })
                .collect();
            let (from, to) = (seqs[0], *seqs.last().unwrap());
            envelope::encode(&Envelope::new("d1", to, 0, Body::Telemetry(TelemetryBatch { from, to, records })))
        };
        ing.handle(T, &flagged(&[1, 2, 3, 4]), 10).unwrap();
        // The resent batch is all duplicates: nothing new is flagged.
        ing.handle(T, &flagged(&[1, 2, 3, 4]), 20).unwrap();
        let d = ing.registry.get("d1").unwrap();
        assert_eq!((d.anomalies, d.last_anomaly_ms), (2, Some(10)));
        ing.handle(T, &batch("d1", 5, &[5, 6]), 30).unwrap();
        assert_eq!(ing.registry.get("d1").unwrap().last_anomaly_ms, Some(10), "unflagged records change nothing");
    }

    #[test]
    fn refusals_are_counted_by_reason() {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path());
        let mut wrong_version = Envelope::new("d1", 1, 0, Body::Status(Status::default()));
        wrong_version.v = 2;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (T, vec![0xde, 0xad, 0xbe, 0xef], "malformed_cbor"),
            (T, vec![0u8; DEFAULT_MAX_MESSAGE_BYTES + 1], "too_large"),
            (T, envelope::encode(&wrong_version), "unsupported_version"),
            (T, batch("d2", 1, &[1]), "device_mismatch"),
            ("edgeloop/v1/d1/up/status", batch("d1", 1, &[1]), "wrong_channel"),
            ("junk/topic", batch("d1", 1, &[1]), "bad_topic"),
        ];
        for (topic, payload, reason) in cases {
            assert_eq!(ing.handle(topic, &payload, 1).unwrap(), Outcome::Rejected(reason));
            assert_eq!(ing.metrics.rejected(reason), 1, "{reason}");
        }
        assert_eq!(ing.store().count("d1").unwrap(), 0);
        assert!(ing.registry.get("d1").is_none(), "refused traffic does not register devices");
        // Good traffic still goes through.
        assert_eq!(ing.handle(T, &batch("d1", 1, &[1]), 1).unwrap(), Outcome::Ack { device: "d1".into(), upto: 1 });
    }

    #[test]
    fn status_updates_registry() {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path());
        let st = Status {
            class: "c".into(),
            dropped_total: 3,
            dropped_ranges: vec![SeqRange { from: 1, to: 3 }],
            ..Default::default()
        };
        let msg = envelope::encode(&Envelope::new("d1", 1, 0, Body::Status(st)));
        assert_eq!(ing.handle("edgeloop/v1/d1/up/status", &msg, 5).unwrap(), Outcome::Status);
        let d = ing.registry.get("d1").unwrap();
        assert_eq!(d.class, "c");
        assert_eq!(d.dropped_ranges(), &[SeqRange { from: 1, to: 3 }]);
    }

    #[test]
    fn a_replicas_share_of_the_rate_is_its_part() {
        let l = RateLimiter::new(10.0);
        l.set_replicas(2);
        // Half the burst (10 of 20) here, and half the refill rate (5 a second).
        assert_eq!(l.take("d", 0, 100), 10);
        assert_eq!(l.take("d", 1000, 100), 5);
        l.set_replicas(1);
        assert_eq!(l.take("d", 2000, 100), 10);
    }

    #[test]
    fn rate_limit_refills_over_time() {
        let l = RateLimiter::new(10.0);
        let admitted = (0..30).filter(|_| l.admit("d1", 1_000)).count();
        assert_eq!(admitted, 20, "a burst of twice the rate");
        assert!(!l.admit("d1", 1_000));
        assert!(l.admit("d2", 1_000), "buckets are per device");
        assert!(l.admit("d1", 1_100), "100 ms later: one more token");
        assert!(!l.admit("d1", 1_100));
        assert_eq!((0..50).filter(|_| l.admit("d1", 10_000)).count(), 20, "refills to the burst, not beyond");
        assert!((0..1000).all(|_| RateLimiter::new(0.0).admit("d", 0)), "0 turns it off");
    }

    #[test]
    fn device_logs_are_stored_within_their_own_budget_and_never_cost_telemetry() {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(dir.path(), Durability::Flush).unwrap();
        let registry = Arc::new(Registry::open(&db).unwrap());
        let logs = crate::fleet::logs::LogStore::open(db.clone()).unwrap();
        // One message a second for telemetry (bursts of 2); 60 log lines a minute (bursts of 120).
        let ing = Ingestor::new(
            TelemetryStore::open(db).unwrap(),
            registry.clone(),
            Arc::new(Metrics::default()),
            DEFAULT_MAX_MESSAGE_BYTES,
        )
        .with_rate_limit(1.0)
        .with_logs(logs.clone(), 60.0);
        registry.update("d1", 0, |d| d.class = "press".into()).unwrap();
        let lines = |n: usize, suppressed: u64| {
            let entries = (0..n)
                .map(|i| envelope::LogEntry {
                    ts_ms: i as u64,
                    level: envelope::LogLevel::Warn,
                    target: "edgeloop_agent::collector".into(),
                    message: format!("bad sample refused {i}"),
                })
                .collect();
            envelope::encode(&Envelope::new("d1", 1, 0, Body::Logs(envelope::LogBatch { entries, suppressed })))
        };
        let topic = "edgeloop/v1/d1/up/logs";
        // A flood: ten full batches at once. The first 120 lines are stored, the rest cut and counted.
        let mut outcomes = Vec::new();
        for _ in 0..10 {
            outcomes.push(ing.handle(topic, &lines(100, 50), 1_000).unwrap());
        }
        assert_eq!(outcomes[0], Outcome::Logs { stored: 100, cut: 0 });
        assert_eq!(outcomes[1], Outcome::Logs { stored: 20, cut: 80 });
        assert!(outcomes[2..].iter().all(|o| *o == Outcome::Rejected("rate_limited")), "{outcomes:?}");
        // Telemetry still has its whole budget.
        assert_eq!(
            ing.handle("edgeloop/v1/d1/up/telemetry", &batch("d1", 1, &[1]), 1_000).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 1 }
        );
        assert_eq!(
            ing.handle("edgeloop/v1/d1/up/telemetry", &batch("d1", 2, &[2]), 1_000).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 2 }
        );
        ing.commit().unwrap();
        assert_eq!(logs.stats("d1").unwrap(), crate::fleet::logs::LogStats { stored: 120, suppressed: 500, cut: 880 });
        assert_eq!(ing.metrics.log_lines_counted("stored"), 120);
        assert_eq!(ing.metrics.log_lines_counted("cut"), 880);
        let page = logs
            .search(&crate::fleet::logs::LogQuery { device: Some("d1".into()), limit: 1000, ..Default::default() })
            .unwrap();
        assert_eq!(page.entries.len(), 120);
        assert_eq!(page.entries[0].class, "press");
        assert_eq!(
            page.entries.last().unwrap().message,
            "bad sample refused 0",
            "the oldest lines of a batch are kept"
        );
        // A minute later the budget is back: 60 lines.
        assert_eq!(ing.handle(topic, &lines(100, 0), 61_000).unwrap(), Outcome::Logs { stored: 60, cut: 40 });
        // Logs on another topic are refused as such.
        assert_eq!(
            ing.handle("edgeloop/v1/d1/up/status", &lines(1, 0), 61_000).unwrap(),
            Outcome::Rejected("wrong_channel")
        );
    }

    #[test]
    fn forged_uplink_other_device_rejected_by_ingest() {
        // Behind a broker without topic rules, ingest alone must tell a forgery from the real thing.
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(dir.path(), Durability::Flush).unwrap();
        let en = Arc::new(crate::fleet::enrollment::Enrollment::open(&db).unwrap());
        let metrics = Arc::new(Metrics::default());
        let ing = Ingestor::new(
            TelemetryStore::open(db).unwrap(),
            Arc::new(Registry::open(&en_db(&dir)).unwrap()),
            metrics.clone(),
            DEFAULT_MAX_MESSAGE_BYTES,
        )
        .with_enrollment(Some(en.clone()));
        let key = |seed: u8| ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap();
        let (a, b) = (key(1), key(2));
        let (_, token) = en.create_token("c", 5, u64::MAX, 0).unwrap();
        en.enroll(&crate::fleet::enrollment::EnrollRequest::signed(&a, "dev-a", "c", &token, 1), 1).unwrap();
        en.enroll(&crate::fleet::enrollment::EnrollRequest::signed(&b, "dev-b", "c", &token, 1), 1).unwrap();
        let signed = |device: &str, k: &ring::signature::Ed25519KeyPair| {
            let mut env = envelope::decode(&batch(device, 1, &[1, 2]), DEFAULT_MAX_MESSAGE_BYTES).unwrap();
            env.sign(k);
            envelope::encode(&env)
        };
        let topic_b = "edgeloop/v1/dev-b/up/telemetry";
        assert_eq!(ing.handle(topic_b, &signed("dev-b", &a), 5).unwrap(), Outcome::Rejected("bad_signature"));
        assert_eq!(ing.handle(topic_b, &batch("dev-b", 1, &[1, 2]), 5).unwrap(), Outcome::Rejected("unsigned"));
        assert_eq!(
            ing.handle("edgeloop/v1/dev-c/up/telemetry", &signed("dev-c", &a), 5).unwrap(),
            Outcome::Rejected("not_enrolled")
        );
        assert_eq!(
            ing.handle(topic_b, &signed("dev-b", &b), 5).unwrap(),
            Outcome::Ack { device: "dev-b".into(), upto: 2 }
        );
        en.revoke("dev-b", 6).unwrap();
        assert_eq!(ing.handle(topic_b, &signed("dev-b", &b), 7).unwrap(), Outcome::Rejected("revoked"));
        assert_eq!((metrics.rejected("bad_signature"), metrics.rejected("unsigned")), (1, 1));
        // An enrolled device is of its enrolled class, whatever its heartbeat claims.
        let status = |class: &str| {
            let mut env = Envelope::new(
                "dev-a",
                1,
                0,
                Body::Status(envelope::Status { class: class.into(), ..Default::default() }),
            );
            env.sign(&a);
            envelope::encode(&env)
        };
        let topic_a = "edgeloop/v1/dev-a/up/status";
        assert_eq!(ing.handle(topic_a, &status("other"), 8).unwrap(), Outcome::Rejected("class_mismatch"));
        assert_eq!(ing.handle(topic_a, &status("c"), 8).unwrap(), Outcome::Status);
    }

    /// An ingestor that requires enrollment, with `devices` enrolled (keys from seeds 1, 2, ...).
    fn enrolled(
        dir: &std::path::Path,
        rate: f64,
        devices: &[&str],
    ) -> (Ingestor, Vec<ring::signature::Ed25519KeyPair>) {
        let db = DurableDb::open(dir, Durability::Flush).unwrap();
        let en = Arc::new(crate::fleet::enrollment::Enrollment::open(&db).unwrap());
        let registry = Arc::new(Registry::open(&db).unwrap());
        let ing = Ingestor::new(
            TelemetryStore::open(db).unwrap(),
            registry,
            Arc::new(Metrics::default()),
            DEFAULT_MAX_MESSAGE_BYTES,
        )
        .with_enrollment(Some(en.clone()))
        .with_rate_limit(rate);
        let (_, token) = en.create_token("c", 100, u64::MAX, 0).unwrap();
        let keys: Vec<_> = (1..=devices.len() as u8)
            .map(|seed| ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap())
            .collect();
        for (d, k) in devices.iter().zip(&keys) {
            en.enroll(&crate::fleet::enrollment::EnrollRequest::signed(k, d, "c", &token, 1), 1).unwrap();
        }
        (ing, keys)
    }

    fn signed(env: Envelope, key: &ring::signature::Ed25519KeyPair) -> Vec<u8> {
        let mut env = env;
        env.sign(key);
        envelope::encode(&env)
    }

    fn heartbeat(device: &str, acked_upto: u64, last_seq: u64, dropped: Vec<SeqRange>) -> Envelope {
        let st = Status { class: "c".into(), acked_upto, last_seq, dropped_ranges: dropped, ..Default::default() };
        Envelope::new(device, 1, 0, Body::Status(st))
    }

    #[test]
    fn bad_signature_on_a_victims_topic_spends_none_of_its_rate_budget() {
        let dir = tempfile::tempdir().unwrap();
        // 1 message a second, bursts of 2.
        let (ing, keys) = enrolled(dir.path(), 1.0, &["victim", "attacker"]);
        let (victim, attacker) = (&keys[0], &keys[1]);
        let topic = "edgeloop/v1/victim/up/telemetry";
        let status_topic = "edgeloop/v1/victim/up/status";
        // The victim is known, with one accepted batch (one token spent, one left).
        assert_eq!(
            ing.handle(topic, &signed(decode(&batch("victim", 1, &[1])), victim), 0).unwrap(),
            Outcome::Ack { device: "victim".into(), upto: 1 }
        );
        ing.commit().unwrap();
        let before = ing.registry.get("victim").unwrap();
        let writes = ing.registry.writes();
        // A flood planted on the victim's topics: signed with another key, unsigned, malformed, or a heartbeat
        // that would move its watermark.
        for i in 0..100u64 {
            let forged = signed(decode(&batch("victim", 2, &[2 + i])), attacker);
            assert_eq!(ing.handle(topic, &forged, 0).unwrap(), Outcome::Rejected("bad_signature"));
            assert_eq!(ing.handle(topic, &batch("victim", 2, &[2]), 0).unwrap(), Outcome::Rejected("unsigned"));
            assert_eq!(ing.handle(topic, &[0xff], 0).unwrap(), Outcome::Rejected("malformed_cbor"));
            let hb = signed(heartbeat("victim", 1000, 1000, vec![]), attacker);
            assert_eq!(ing.handle(status_topic, &hb, 0).unwrap(), Outcome::Rejected("bad_signature"));
        }
        ing.commit().unwrap();
        // The victim's own next message still has its token, and its entry was not touched.
        assert_eq!(
            ing.handle(topic, &signed(decode(&batch("victim", 2, &[2])), victim), 0).unwrap(),
            Outcome::Ack { device: "victim".into(), upto: 2 }
        );
        assert_eq!(ing.registry.get("victim").unwrap().rejected, before.rejected);
        assert_eq!(ing.registry.writes(), writes, "refusals before the signature check write nothing");
        assert_eq!(ing.store().watermark("victim").unwrap(), 2, "the forged heartbeat moved nothing");
        // Its own messages over the rate are refused and charged to it.
        assert_eq!(
            ing.handle(topic, &signed(decode(&batch("victim", 3, &[3])), victim), 0).unwrap(),
            Outcome::Rejected("rate_limited")
        );
        assert_eq!(ing.registry.get("victim").unwrap().rejected, before.rejected + 1);
        assert_eq!(ing.metrics.rejected("bad_signature"), 200);
    }

    fn decode(bytes: &[u8]) -> Envelope {
        envelope::decode(bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap()
    }

    #[test]
    fn only_verified_devices_get_a_rate_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let (ing, keys) = enrolled(dir.path(), 10.0, &["dev-a"]);
        for i in 0..5000 {
            let device = format!("stranger-{i}");
            let topic = format!("edgeloop/v1/{device}/up/telemetry");
            assert_eq!(
                ing.handle(&topic, &signed(decode(&batch(&device, 1, &[1])), &keys[0]), 0).unwrap(),
                Outcome::Rejected("not_enrolled")
            );
        }
        assert_eq!(ing.limiter.tracked(), 0, "no bucket for devices that never verified");
        let topic = "edgeloop/v1/dev-a/up/telemetry";
        ing.handle(topic, &signed(decode(&batch("dev-a", 1, &[1])), &keys[0]), 0).unwrap();
        assert_eq!(ing.limiter.tracked(), 1);
    }

    #[test]
    fn rate_limiter_drops_refilled_buckets_when_it_grows() {
        let l = RateLimiter::new(10.0);
        let n = RateLimiter::MIN_PRUNE_AT;
        for i in 0..n {
            assert!(l.admit(&format!("d{i}"), 0));
        }
        // d0 stays busy: its bucket is not full when the map is pruned.
        while l.admit("d0", 0) {}
        assert_eq!(l.tracked(), n);
        // A second later every other bucket has refilled, which is the same as having none.
        assert!(l.admit("new", 1_000));
        assert_eq!(l.tracked(), 2, "refilled buckets dropped: d0 (still short) and the new one kept");
        assert_eq!((0..30).filter(|_| l.admit("d0", 1_000)).count(), 10, "d0's bucket carried over, refilled by 10");
        // Growth stays bounded by devices active within a refill time.
        for round in 0..10u64 {
            for i in 0..n {
                l.admit(&format!("r{round}-{i}"), 10_000 * (round + 2));
            }
        }
        assert!(l.tracked() <= 2 * n, "{} buckets", l.tracked());
    }

    #[test]
    fn refused_and_accepted_messages_write_each_entry_once_per_commit() {
        let dir = tempfile::tempdir().unwrap();
        let (ing, keys) = enrolled(dir.path(), 1.0, &["dev-a", "dev-b"]);
        let ta = "edgeloop/v1/dev-a/up/telemetry";
        for i in 1..=300u64 {
            // Two admitted (the burst), the rest refused as over the rate; junk in between.
            ing.handle(ta, &signed(decode(&batch("dev-a", i, &[i])), &keys[0]), 0).unwrap();
            ing.handle(ta, b"x", 0).unwrap();
        }
        let tb = "edgeloop/v1/dev-b/up/status";
        ing.handle(tb, &signed(heartbeat("dev-b", 0, 0, vec![]), &keys[1]), 0).unwrap();
        assert_eq!(ing.registry.writes(), 0, "nothing written before the commit");
        ing.commit().unwrap();
        assert_eq!(ing.registry.writes(), 2, "one write per changed entry");
        let a = ing.registry.get("dev-a").unwrap();
        assert_eq!((a.records, a.rejected), (2, 298));
        assert_eq!(ing.metrics.rejected("malformed_cbor"), 300);
        ing.commit().unwrap();
        assert_eq!(ing.registry.writes(), 2, "nothing changed: nothing written");
    }

    #[test]
    fn heartbeat_past_the_watermark_recovers_a_frozen_device() {
        let dir = tempfile::tempdir().unwrap();
        let ing = ingestor(dir.path());
        let st = "edgeloop/v1/d1/up/status";
        let hb = |acked, last, dropped| envelope::encode(&heartbeat("d1", acked, last, dropped));
        assert_eq!(
            ing.handle(T, &batch("d1", 1, &[1, 2, 3]), 1).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 3 }
        );
        // 4..6 lost on the way; 7..8 arrive ahead and wait for them.
        assert_eq!(ing.handle(T, &batch("d1", 7, &[7, 8]), 2).unwrap(), Outcome::Ack { device: "d1".into(), upto: 3 });
        // The device then deleted up to 10 (an acknowledgement the control plane never sent): its batches
        // start at 11 and can never advance the watermark by themselves.
        assert_eq!(
            ing.handle(T, &batch("d1", 11, &[11, 12]), 3).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 3 }
        );
        // A heartbeat that contradicts itself (acknowledged past its last record) moves nothing.
        assert_eq!(ing.handle(st, &hb(10, 9, vec![]), 4).unwrap(), Outcome::Status);
        assert_eq!(ing.store().watermark("d1").unwrap(), 3);
        // Its heartbeat says what it holds: 4, 5, 6, 9 and 10 are lost (7 and 8 are stored).
        assert_eq!(ing.handle(st, &hb(10, 12, vec![]), 5).unwrap(), Outcome::Status);
        assert_eq!(ing.store().watermark("d1").unwrap(), 10);
        let d = ing.registry.get("d1").unwrap();
        assert_eq!((d.lost, d.lost_ranges.clone(), d.acked_upto), (5, vec![SeqRange { from: 4, to: 10 }], 10));
        assert_eq!(ing.metrics.records_lost.get(), 5);
        // The resent batch is acknowledged again.
        assert_eq!(
            ing.handle(T, &batch("d1", 11, &[11, 12]), 6).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 12 }
        );
        // Older heartbeats never move the watermark back, nor count anything twice.
        for acked in [0, 5, 10, 12] {
            assert_eq!(ing.handle(st, &hb(acked, 12, vec![]), 7).unwrap(), Outcome::Status);
        }
        assert_eq!(ing.store().watermark("d1").unwrap(), 12);
        assert_eq!(ing.registry.get("d1").unwrap().lost, 5);
        // Records the device reported dropped (its outbox's byte bound) are not counted as lost.
        assert_eq!(ing.handle(st, &hb(20, 20, vec![SeqRange { from: 13, to: 17 }]), 8).unwrap(), Outcome::Status);
        let d = ing.registry.get("d1").unwrap();
        assert_eq!(
            (d.lost, d.lost_ranges.clone()),
            (8, vec![SeqRange { from: 4, to: 10 }, SeqRange { from: 13, to: 20 }])
        );
        assert_eq!(ing.handle(T, &batch("d1", 21, &[21]), 9).unwrap(), Outcome::Ack { device: "d1".into(), upto: 21 });
    }

    #[test]
    fn never_stored_counts_what_is_neither_stored_nor_dropped() {
        let r = |from, to| SeqRange { from, to };
        assert_eq!(never_stored(r(4, 10), &[], &[]), 7);
        assert_eq!(never_stored(r(4, 10), &[7, 8, 8, 2, 11], &[]), 5, "outside and repeated seqs ignored");
        assert_eq!(never_stored(r(4, 10), &[7, 8], &[r(1, 5), r(5, 6), r(9, 9), r(20, 30)]), 1, "only 10");
        assert_eq!(never_stored(r(4, 10), &[4, 5, 6, 7, 8, 9, 10], &[r(4, 10)]), 0, "stored and dropped");
        assert_eq!(never_stored(r(1, u64::MAX), &[], &[r(1, u64::MAX)]), 0);
        assert_eq!(never_stored(r(4, 10), &[], &[r(9, 3)]), 7, "an empty dropped range is ignored");
    }

    fn en_db(dir: &tempfile::TempDir) -> DurableDb {
        DurableDb::open(&dir.path().join("registry"), Durability::Flush).unwrap()
    }
}
