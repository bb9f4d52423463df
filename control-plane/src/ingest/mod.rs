//! Ingest: uplink messages in, stored records and acknowledgements out.
//!
//! [`Ingestor`] holds the rules and does no network I/O: it parses the topic, decodes the envelope (size,
//! depth, version), checks that the envelope's device and body match the topic, stores each record unless
//! (device, seq) is already stored, advances the device's cumulative watermark, and updates the registry.
//! Every refusal is counted by reason and logged (rate-limited) with its origin, and never stops the loop.
//!
//! The watermark rule: a batch covering `from..=to` advances the watermark `W` to `max(W, to)` only if
//! `from <= W + 1`, that is, only if nothing between the watermark and the batch can be missing. A batch
//! that arrives ahead of a lost one is stored but waits for the resend to advance the watermark.
//!
//! [`service`] feeds it from MQTT, group-commits, and publishes acknowledgements only after the commit.

pub mod service;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::{StoreError, TelemetryStore};
use edgeloop_common::envelope::{self, Body, Envelope};
use edgeloop_common::topics::{self, Channel};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What one message led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Telemetry handled: acknowledge `upto` to `device` once committed.
    Ack { device: String, upto: u64 },
    /// A heartbeat, recorded.
    Status,
    /// Refused, for this reason (also counted in metrics).
    Rejected(&'static str),
}

pub struct Ingestor {
    store: TelemetryStore,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    max_message_bytes: usize,
    /// When set, every envelope must be signed with its device's enrolled key.
    enrollment: Option<Arc<crate::enrollment::Enrollment>>,
    limiter: RateLimiter,
}

/// A token bucket per device: `rate` messages a second on average, bursts of up to `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: std::sync::Mutex<std::collections::HashMap<String, (f64, u64)>>,
}

impl RateLimiter {
    /// `rate` of 0 turns the limit off.
    pub fn new(rate: f64) -> RateLimiter {
        RateLimiter { rate, burst: (rate * 2.0).max(1.0), buckets: Default::default() }
    }

    /// Takes one message's token for `device` at `now_ms`; false when the device is over its rate.
    pub fn admit(&self, device: &str, now_ms: u64) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = b.entry(device.to_string()).or_insert((self.burst, now_ms));
        *tokens = (*tokens + now_ms.saturating_sub(*last) as f64 / 1000.0 * self.rate).min(self.burst);
        *last = now_ms.max(*last);
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Ingestor {
    pub fn new(
        store: TelemetryStore,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        max_message_bytes: usize,
    ) -> Self {
        Ingestor { store, registry, metrics, max_message_bytes, enrollment: None, limiter: RateLimiter::new(0.0) }
    }

    /// Limits each device to `per_sec` uplink messages a second (bursts of twice that); 0 turns it off.
    /// Refused messages are counted as `rate_limited`; agents send unacknowledged records again, so nothing
    /// is lost.
    pub fn with_rate_limit(mut self, per_sec: f64) -> Self {
        self.limiter = RateLimiter::new(per_sec);
        self
    }

    /// Requires every envelope to be signed with its device's enrolled key (`None`: signatures unchecked).
    pub fn with_enrollment(mut self, enrollment: Option<Arc<crate::enrollment::Enrollment>>) -> Self {
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
            // Only known devices are charged, and junk does not make a device look alive.
            self.registry.count_rejection(d)?;
        }
        Ok(Outcome::Rejected(reason))
    }

    /// Handles one message. Writes are not durable until [`Ingestor::commit`].
    pub fn handle(&self, topic: &str, payload: &[u8], now_ms: u64) -> Result<Outcome, StoreError> {
        self.metrics.messages_received.fetch_add(1, Ordering::Relaxed);
        let (device, channel) = match topics::parse(topic) {
            Ok(x) => x,
            Err(e) => return self.reject(None, topic, "bad_topic", &e.to_string()),
        };
        if !self.limiter.admit(device, now_ms) {
            return self.reject(Some(device), topic, "rate_limited", "over the per-device message rate");
        }
        let env = match envelope::decode(payload, self.max_message_bytes) {
            Ok(env) => env,
            Err(e) => return self.reject(Some(device), topic, e.reason(), &e.to_string()),
        };
        if env.device != device {
            let detail = format!("envelope says device `{}`", env.device);
            return self.reject(Some(device), topic, "device_mismatch", &detail);
        }
        if let Some(en) = &self.enrollment {
            // The topic names the device; only that device's enrolled key may speak for it.
            let key = match en.public_key(device) {
                Ok(k) => k,
                Err(reason) => return self.reject(Some(device), topic, reason, "no enrolled key for this device"),
            };
            if let Err(e) = env.verify(&key) {
                let reason = match e {
                    edgeloop_common::envelope::SignatureError::Unsigned => "unsigned",
                    edgeloop_common::envelope::SignatureError::BadSignature => "bad_signature",
                };
                return self.reject(Some(device), topic, reason, &e.to_string());
            }
        }
        match (channel, env.body) {
            (Channel::Telemetry, Body::Telemetry(batch)) => {
                let (mut new, mut dup, mut flagged) = (0u64, 0u64, 0u64);
                for rec in &batch.records {
                    if self.store.insert(device, rec)? {
                        new += 1;
                        flagged += u64::from(rec.flags & edgeloop_common::envelope::FLAG_ANOMALY != 0);
                    } else {
                        dup += 1;
                    }
                }
                let mut upto = self.store.watermark(device)?;
                if batch.from <= upto.saturating_add(1) && batch.to > upto {
                    upto = batch.to;
                    self.store.set_watermark(device, upto)?;
                }
                self.metrics.records_ingested.fetch_add(new, Ordering::Relaxed);
                self.metrics.records_duplicate.fetch_add(dup, Ordering::Relaxed);
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
                self.metrics.status_messages.fetch_add(1, Ordering::Relaxed);
                self.registry.update(device, now_ms, |d| {
                    d.class = status.class.clone();
                    if let Some(u) = status.update.clone() {
                        d.add_update(u);
                    }
                    d.last_status = Some(status);
                })?;
                Ok(Outcome::Status)
            }
            (Channel::Report, Body::Report(report)) => {
                self.metrics.update_reports.fetch_add(1, Ordering::Relaxed);
                self.registry.update(device, now_ms, |d| d.add_update(report))?;
                Ok(Outcome::Status)
            }
            (ch, body) => {
                let detail = format!("a {} body on the {ch} topic", body.kind());
                self.reject(Some(device), topic, "wrong_channel", &detail)
            }
        }
    }

    /// Makes everything handled so far durable. Blocking.
    pub fn commit(&self) -> Result<(), StoreError> {
        self.store.commit()?;
        self.metrics.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Encodes the acknowledgement envelope for `device`, signed with the control plane's key: an agent deletes
/// records only on an acknowledgement that verifies against the keys it trusts.
pub fn ack_payload(device: &str, upto: u64, signer: &edgeloop_common::signing::Signer) -> Vec<u8> {
    let mut env = Envelope::new(device, upto, edgeloop_common::unix_millis(), Body::Ack(envelope::Ack { upto }));
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
        // Batch 7..9 arrives before 4..6 (lost, resent later): stored, watermark waits.
        assert_eq!(
            ing.handle(T, &batch("d1", 7, &[7, 8, 9]), 2).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 3 }
        );
        assert_eq!(
            ing.handle(T, &batch("d1", 4, &[4, 5, 6]), 3).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 6 }
        );
        assert_eq!(
            ing.handle(T, &batch("d1", 7, &[7, 8, 9]), 4).unwrap(),
            Outcome::Ack { device: "d1".into(), upto: 9 }
        );
        assert_eq!(ing.store().count("d1").unwrap(), 9);
        assert_eq!(ing.metrics.records_duplicate.load(Ordering::Relaxed), 3);
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
    fn forged_uplink_other_device_rejected_by_ingest() {
        // Behind a broker without topic rules, ingest alone must tell a forgery from the real thing.
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(dir.path(), Durability::Flush).unwrap();
        let en = Arc::new(crate::enrollment::Enrollment::open(&db).unwrap());
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
        en.enroll(&crate::enrollment::EnrollRequest::signed(&a, "dev-a", "c", &token, 1), 1).unwrap();
        en.enroll(&crate::enrollment::EnrollRequest::signed(&b, "dev-b", "c", &token, 1), 1).unwrap();
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

    fn en_db(dir: &tempfile::TempDir) -> DurableDb {
        DurableDb::open(&dir.path().join("registry"), Durability::Flush).unwrap()
    }
}
