//! The wire messages and their CBOR codec.
//!
//! Every MQTT payload edgeloop sends is one [`Envelope`]: `{v, device, seq, sent_at, body, sig}`. The body is
//! a telemetry batch or a status heartbeat going up, or an acknowledgement coming down. [`decode`] is the only
//! way bytes become an envelope: it enforces a size limit, a nesting-depth limit and the protocol version, and
//! each failure is a [`DecodeError`] with a stable [`DecodeError::reason`] for metrics.
//!
//! This module owns the shapes and the codec; what the messages *mean* (ack semantics, dedup) is documented in
//! `docs/protocol.md` and enforced by the agent's uplink and the control plane's ingest.

use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. Decoding rejects any other.
pub const PROTOCOL_VERSION: u16 = 1;
/// Default cap on one encoded message, in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// The largest MQTT packet an agent takes (a message, its topic and the packet's header), and so the largest
/// the control plane's own clients send: an MQTT client's default limit (10 KiB in rumqttc) is far below
/// what a desired state with its golden vectors can reach.
pub const MAX_PACKET_BYTES: usize = DEFAULT_MAX_MESSAGE_BYTES + 1024;
/// Cap on CBOR nesting depth. The deepest legal message nests about 6 levels.
pub const MAX_DEPTH: usize = 16;

/// Flag bit set on a record whose score crossed the model's decision threshold.
pub const FLAG_ANOMALY: u32 = 1;
/// Flag bit set on a record of the model's sensor whose reading was out of the range the device had seen
/// (`[alerts] range_tolerance`, [`crate::seen_range`]).
pub const FLAG_OUT_OF_RANGE: u32 = 2;

/// One message on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Protocol version; always [`PROTOCOL_VERSION`] when produced by this build.
    pub v: u16,
    /// The device the message is from (uplink) or for (downlink).
    pub device: String,
    /// Message sequence. Telemetry: the batch's `to`. Status: a per-boot counter. Ack: the acked `upto`.
    pub seq: u64,
    /// Sender's clock, milliseconds since the Unix epoch.
    pub sent_at: u64,
    pub body: Body,
    /// Ed25519 signature over the envelope encoded with `sig` absent; `None` while signing is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sig: Option<serde_bytes::ByteBuf>,
}

/// What an envelope carries. Encoded as a map with a `type` key next to the body's own fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Body {
    Telemetry(TelemetryBatch),
    Status(Status),
    Ack(Ack),
    /// The control plane's signed [`crate::update::DesiredState`], on `down/desired` (retained).
    Desired(crate::signing::Signed),
    /// The control plane's signed [`crate::update::DesiredConfig`], on `down/config` (retained).
    Config(crate::signing::Signed),
    /// The control plane's signed [`crate::update::DesiredAgent`], on `down/agent` (retained).
    Agent(crate::signing::Signed),
    /// An update's progress, on `up/report`.
    Report(crate::update::UpdateReport),
    /// The device's own warnings and errors, on `up/logs`.
    Logs(LogBatch),
    /// An alert the device raised, on `up/alerts`.
    Alert(crate::alerts::AlertEvent),
}

impl Body {
    /// The body's wire name, as in the `type` key.
    pub fn kind(&self) -> &'static str {
        match self {
            Body::Telemetry(_) => "telemetry",
            Body::Status(_) => "status",
            Body::Ack(_) => "ack",
            Body::Desired(_) => "desired",
            Body::Config(_) => "config",
            Body::Agent(_) => "agent",
            Body::Report(_) => "report",
            Body::Logs(_) => "logs",
            Body::Alert(_) => "alert",
        }
    }
}

/// A run of outbox records. The batch *covers* the sequence range `from..=to`: every sequence number in that
/// range that is not among `records` was dropped by the agent's outbox policy (and reported in status) or was
/// already acknowledged. This is what lets the control plane advance a cumulative acknowledgement over gaps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    pub from: u64,
    pub to: u64,
    pub records: Vec<Record>,
}

/// One feature vector with its score: the unit the outbox stores and the control plane keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Record {
    /// Per-device sequence number, starting at 1, monotonic across agent restarts.
    pub seq: u64,
    /// Event time of the last sample in the window, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub sensor: String,
    /// In JSON (the operator API), a value that is not finite (NaN, ±infinity, which a device may send and
    /// training cleans out) is `null`: JSON has no number for it.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Option<f32>>))]
    pub features: Vec<f32>,
    /// The active model's score, if a model was loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
    /// Bit set of `FLAG_*` values.
    #[serde(default)]
    pub flags: u32,
}

/// Most entries in one [`LogBatch`].
pub const MAX_LOG_ENTRIES: usize = 200;
/// Longest [`LogEntry::message`], in bytes (an agent cuts longer ones at a character boundary).
pub const MAX_LOG_MESSAGE_BYTES: usize = 1024;
/// Longest [`LogEntry::target`], in bytes.
pub const MAX_LOG_TARGET_BYTES: usize = 128;

/// A run of the device's own warnings and errors, oldest first. Logs are best effort: they are not in the
/// outbox, not acknowledged and never resent, and a device sends them only within its budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LogBatch {
    pub entries: Vec<LogEntry>,
    /// Lines the device left out since its previous batch: over its budget, or pushed out of its ring.
    #[serde(default)]
    pub suppressed: u64,
}

/// One warning or error as the agent logged it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogEntry {
    /// When it was logged, by the device's clock, ms since the Unix epoch.
    pub ts_ms: u64,
    pub level: LogLevel,
    /// The module that logged it (`edgeloop_agent::uplink`, `rumqttc::state`).
    pub target: String,
    /// The message with its fields, as the agent's text log prints them (`outbox full dropped=12`).
    pub message: String,
}

/// The levels a device ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum LogLevel {
    Warn,
    Error,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

impl std::str::FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<LogLevel, String> {
        match s {
            "warn" => Ok(LogLevel::Warn),
            "error" => Ok(LogLevel::Error),
            other => Err(format!("`{other}` is not a log level; use warn or error")),
        }
    }
}

impl LogBatch {
    /// At most [`MAX_LOG_ENTRIES`] entries, each within the message and target limits.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.entries.len() > MAX_LOG_ENTRIES {
            return Err(DecodeError::Invalid(format!(
                "a log batch holds {} entries, over the limit of {MAX_LOG_ENTRIES}",
                self.entries.len()
            )));
        }
        for (i, e) in self.entries.iter().enumerate() {
            if e.message.len() > MAX_LOG_MESSAGE_BYTES {
                return Err(DecodeError::Invalid(format!(
                    "entries[{i}].message is {} bytes, over the limit of {MAX_LOG_MESSAGE_BYTES}",
                    e.message.len()
                )));
            }
            if e.target.len() > MAX_LOG_TARGET_BYTES {
                return Err(DecodeError::Invalid(format!(
                    "entries[{i}].target is {} bytes, over the limit of {MAX_LOG_TARGET_BYTES}",
                    e.target.len()
                )));
            }
        }
        Ok(())
    }
}

/// An inclusive range of sequence numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SeqRange {
    pub from: u64,
    pub to: u64,
}

impl SeqRange {
    pub fn len(&self) -> u64 {
        self.to - self.from + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
    pub fn contains(&self, seq: u64) -> bool {
        (self.from..=self.to).contains(&seq)
    }
}

/// A heartbeat: the agent's health and the outbox's bookkeeping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Status {
    /// Device class, as named in its firmware config.
    pub class: String,
    pub uptime_s: u64,
    /// Records waiting in the outbox, and their size.
    pub outbox_depth: u64,
    pub outbox_bytes: u64,
    /// Highest sequence number appended and committed durably (0 if none).
    pub last_seq: u64,
    /// Highest cumulative acknowledgement received.
    pub acked_upto: u64,
    /// Records dropped by the outbox's byte bound since the device's first start.
    pub dropped_total: u64,
    /// The dropped ranges (merged, oldest first; the newest 256 are kept if there are more).
    pub dropped_ranges: Vec<SeqRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_p50_us: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inference_p95_us: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// Malformed samples the agent's sources refused.
    #[serde(default)]
    pub bad_samples: u64,
    /// The latest model update and where it stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update: Option<Box<crate::update::UpdateReport>>,
    /// The latest class-configuration update and where it stands (`component: config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_update: Option<Box<crate::update::UpdateReport>>,
    /// The latest agent-binary update and where it stands (`component: agent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_update: Option<Box<crate::update::UpdateReport>>,
    /// The running agent's build (`edgeloop-agent --version`) and CPU architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
}

/// Cumulative end-to-end acknowledgement: every record of this device with `seq <= upto` is durably stored by
/// the control plane (or was declared dropped by the agent). The agent may delete them from its outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub upto: u64,
    /// Every alert snapshot of this device with `rev <= alerts` is durably stored (absent, and 0, in an
    /// acknowledgement of telemetry only).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub alerts: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Why an envelope's signature was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the envelope is not signed")]
    Unsigned,
    #[error("the signature does not verify with the signer's key")]
    BadSignature,
}

/// Why bytes did not become an envelope.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("message is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: usize, limit: usize },
    #[error("not valid CBOR: {0}")]
    Cbor(String),
    #[error("CBOR nested deeper than {0} levels")]
    TooDeep(usize),
    #[error("unsupported protocol version {found}; this build speaks version {supported}")]
    Version { found: i128, supported: u16 },
    #[error("envelope does not match the schema: {0}")]
    Schema(String),
    #[error("invalid envelope: {0}")]
    Invalid(String),
}

impl DecodeError {
    /// A stable, low-cardinality name for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too_large",
            DecodeError::Cbor(_) => "malformed_cbor",
            DecodeError::TooDeep(_) => "too_deep",
            DecodeError::Version { .. } => "unsupported_version",
            DecodeError::Schema(_) => "schema",
            DecodeError::Invalid(_) => "invalid",
        }
    }
}

impl Envelope {
    /// A new unsigned envelope of the current protocol version.
    pub fn new(device: impl Into<String>, seq: u64, sent_at: u64, body: Body) -> Self {
        Envelope { v: PROTOCOL_VERSION, device: device.into(), seq, sent_at, body, sig: None }
    }

    /// The bytes a device signs: this envelope encoded with `sig` absent. Encoding is deterministic (fields in
    /// declaration order, definite lengths, floats in their shortest exact form), so the verifier re-encodes
    /// what it decoded and gets the same bytes.
    pub fn signing_bytes(&self) -> Vec<u8> {
        // The same map as an `Envelope` whose `sig` is `None` (skipped), borrowed rather than cloned: ingest
        // does this for every message.
        #[derive(Serialize)]
        struct Unsigned<'a> {
            v: u16,
            device: &'a str,
            seq: u64,
            sent_at: u64,
            body: &'a Body,
        }
        let unsigned =
            Unsigned { v: self.v, device: &self.device, seq: self.seq, sent_at: self.sent_at, body: &self.body };
        crate::signing::to_cbor_with_capacity(&unsigned, 256)
    }

    /// Signs this envelope with the device's key.
    pub fn sign(&mut self, pair: &ring::signature::Ed25519KeyPair) {
        self.sig = None;
        let sig = pair.sign(&self.signing_bytes());
        self.sig = Some(serde_bytes::ByteBuf::from(sig.as_ref().to_vec()));
    }

    /// Checks the signature against the device's public key.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), SignatureError> {
        let sig = self.sig.as_ref().ok_or(SignatureError::Unsigned)?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, public_key)
            .verify(&self.signing_bytes(), sig)
            .map_err(|_| SignatureError::BadSignature)
    }

    /// Signs this envelope with the control plane's key: how acknowledgements are signed. The signature is
    /// over the same bytes as a device's ([`Envelope::signing_bytes`]).
    pub fn sign_by_control_plane(&mut self, signer: &crate::signing::Signer) {
        self.sig = None;
        self.sig = Some(serde_bytes::ByteBuf::from(signer.sign_bytes(&self.signing_bytes())));
    }

    /// Checks a signature made by [`Envelope::sign_by_control_plane`] against the keys an agent trusts at
    /// `now_ms`: it must verify with one of them that is not retired. Returns that key's id.
    pub fn verify_by_trusted<'k>(
        &self,
        trusted: &'k [crate::signing::TrustedKey],
        now_ms: u64,
    ) -> Result<&'k str, SignatureError> {
        let sig = self.sig.as_ref().ok_or(SignatureError::Unsigned)?;
        let bytes = self.signing_bytes();
        trusted
            .iter()
            .filter(|k| k.not_after_ms.is_none_or(|until| now_ms <= until))
            .find(|k| {
                ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &k.public_key)
                    .verify(&bytes, sig)
                    .is_ok()
            })
            .map(|k| k.id.as_str())
            .ok_or(SignatureError::BadSignature)
    }

    /// Checks that hold for any well-formed message, whatever its origin.
    pub fn validate(&self) -> Result<(), DecodeError> {
        crate::topics::validate_device_id(&self.device).map_err(|e| DecodeError::Invalid(e.to_string()))?;
        match &self.body {
            Body::Telemetry(batch) => batch.validate()?,
            Body::Logs(batch) => batch.validate()?,
            Body::Alert(alert) => alert.validate().map_err(DecodeError::Invalid)?,
            Body::Status(s) if s.last_seq > MAX_SEQ || s.acked_upto > MAX_SEQ => {
                return Err(DecodeError::Invalid(format!(
                    "status last_seq={} acked_upto={}: sequence numbers stop at {MAX_SEQ}",
                    s.last_seq, s.acked_upto
                )))
            }
            _ => {}
        }
        Ok(())
    }
}

/// The largest sequence number (2^63 - 1): what every store keeps, PostgreSQL's `bigint` included. An agent
/// numbering one record a millisecond reaches it after 292 million years.
pub const MAX_SEQ: u64 = i64::MAX as u64;

impl TelemetryBatch {
    /// `from <= to`, records strictly ascending inside `from..=to`, sequence numbers from 1 to
    /// [`MAX_SEQ`].
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.from == 0 || self.from > self.to {
            return Err(DecodeError::Invalid(format!(
                "telemetry range from={} to={} is empty or starts at 0",
                self.from, self.to
            )));
        }
        if self.to > MAX_SEQ {
            return Err(DecodeError::Invalid(format!("telemetry range to={} is above {MAX_SEQ}", self.to)));
        }
        let mut prev = self.from - 1;
        for (i, r) in self.records.iter().enumerate() {
            if r.seq <= prev || r.seq > self.to {
                return Err(DecodeError::Invalid(format!(
                    "records[{i}].seq={} is out of order or outside {}..={}",
                    r.seq, self.from, self.to
                )));
            }
            prev = r.seq;
        }
        Ok(())
    }
}

/// Encodes an envelope to CBOR.
pub fn encode(env: &Envelope) -> Vec<u8> {
    crate::signing::to_cbor_with_capacity(env, 256)
}

/// Decodes and validates an envelope, enforcing `max_bytes`, [`MAX_DEPTH`] and [`PROTOCOL_VERSION`].
pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Envelope, DecodeError> {
    if bytes.len() > max_bytes {
        return Err(DecodeError::TooLarge { size: bytes.len(), limit: max_bytes });
    }
    let value: ciborium::Value =
        ciborium::de::from_reader_with_recursion_limit(bytes, MAX_DEPTH).map_err(|e| match e {
            ciborium::de::Error::RecursionLimitExceeded => DecodeError::TooDeep(MAX_DEPTH),
            other => DecodeError::Cbor(other.to_string()),
        })?;
    let map = value.as_map().ok_or_else(|| DecodeError::Schema("top level is not a map".into()))?;
    let version = map
        .iter()
        .find(|(k, _)| k.as_text() == Some("v"))
        .and_then(|(_, v)| v.as_integer())
        .ok_or_else(|| DecodeError::Schema("missing integer field `v`".into()))?;
    let version = i128::from(version);
    if version != i128::from(PROTOCOL_VERSION) {
        return Err(DecodeError::Version { found: version, supported: PROTOCOL_VERSION });
    }
    let env: Envelope = value.deserialized().map_err(|e| DecodeError::Schema(e.to_string()))?;
    env.validate()?;
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn telemetry(records: Vec<Record>, from: u64, to: u64) -> Envelope {
        Envelope::new("dev-1", to, 1_700_000_000_000, Body::Telemetry(TelemetryBatch { from, to, records }))
    }

    fn record(seq: u64) -> Record {
        Record { seq, ts_ms: 1000 + seq, sensor: "temp".into(), features: vec![1.0, 2.5], score: Some(0.25), flags: 0 }
    }

    #[test]
    fn round_trip_each_body() {
        let bodies = vec![
            Body::Telemetry(TelemetryBatch { from: 1, to: 3, records: vec![record(1), record(3)] }),
            Body::Status(Status {
                class: "c".into(),
                dropped_ranges: vec![SeqRange { from: 2, to: 2 }],
                ..Default::default()
            }),
            Body::Ack(Ack { upto: 42, alerts: 0 }),
            Body::Logs(LogBatch {
                entries: vec![LogEntry {
                    ts_ms: 5,
                    level: LogLevel::Error,
                    target: "edgeloop_agent::uplink".into(),
                    message: "outbox full dropped=3".into(),
                }],
                suppressed: 7,
            }),
        ];
        for body in bodies {
            let env = Envelope::new("dev-1", 7, 9, body);
            let bytes = encode(&env);
            assert_eq!(decode(&bytes, DEFAULT_MAX_MESSAGE_BYTES), Ok(env));
        }
    }

    #[test]
    fn body_type_is_a_plain_key() {
        let bytes = encode(&Envelope::new("d", 1, 2, Body::Ack(Ack { upto: 5, alerts: 0 })));
        let v: ciborium::Value = ciborium::from_reader(&bytes[..]).unwrap();
        let body = v.as_map().unwrap().iter().find(|(k, _)| k.as_text() == Some("body")).unwrap().1.clone();
        let keys: Vec<_> = body.as_map().unwrap().iter().map(|(k, _)| k.as_text().unwrap().to_string()).collect();
        assert_eq!(keys, vec!["type", "upto"]);
    }

    #[test]
    fn oversize_rejected_before_parsing() {
        let err = decode(&vec![0u8; 1001], 1000).unwrap_err();
        assert_eq!(err, DecodeError::TooLarge { size: 1001, limit: 1000 });
        assert_eq!(err.reason(), "too_large");
    }

    #[test]
    fn wrong_version_named() {
        let mut env = telemetry(vec![record(1)], 1, 1);
        env.v = 9;
        let err = decode(&encode(&env), DEFAULT_MAX_MESSAGE_BYTES).unwrap_err();
        assert_eq!(err, DecodeError::Version { found: 9, supported: 1 });
        assert!(err.to_string().contains("unsupported protocol version 9"));
    }

    #[test]
    fn garbage_is_malformed() {
        let err = decode(&[0xff, 0x00, 0x13], DEFAULT_MAX_MESSAGE_BYTES).unwrap_err();
        assert_eq!(err.reason(), "malformed_cbor");
    }

    #[test]
    fn log_batches_over_their_limits_are_refused_by_name() {
        let entry = |message: String, target: &str| LogEntry {
            ts_ms: 1,
            level: LogLevel::Warn,
            target: target.into(),
            message,
        };
        let cases = [
            (LogBatch { entries: vec![entry("x".into(), "t"); MAX_LOG_ENTRIES + 1], suppressed: 0 }, "201 entries"),
            (
                LogBatch { entries: vec![entry("x".repeat(MAX_LOG_MESSAGE_BYTES + 1), "t")], suppressed: 0 },
                "entries[0].message",
            ),
            (LogBatch { entries: vec![entry("x".into(), &"t".repeat(129))], suppressed: 0 }, "entries[0].target"),
        ];
        for (batch, named) in cases {
            let err =
                decode(&encode(&Envelope::new("d", 1, 2, Body::Logs(batch))), DEFAULT_MAX_MESSAGE_BYTES).unwrap_err();
            assert_eq!(err.reason(), "invalid");
            assert!(err.to_string().contains(named), "{err}");
        }
        // A level the protocol does not know is a schema error, not a silent default.
        let mut v: ciborium::Value = ciborium::from_reader(
            &encode(&Envelope::new(
                "d",
                1,
                2,
                Body::Logs(LogBatch { entries: vec![entry("m".into(), "t")], suppressed: 0 }),
            ))[..],
        )
        .unwrap();
        fn set_level(v: &mut ciborium::Value) {
            match v {
                ciborium::Value::Text(t) if t == "warn" => *t = "info".into(),
                ciborium::Value::Map(m) => m.iter_mut().for_each(|(_, v)| set_level(v)),
                ciborium::Value::Array(a) => a.iter_mut().for_each(set_level),
                _ => {}
            }
        }
        set_level(&mut v);
        let mut bytes = Vec::new();
        ciborium::into_writer(&v, &mut bytes).unwrap();
        assert_eq!(decode(&bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap_err().reason(), "schema");
    }

    #[test]
    fn missing_field_names_it() {
        let mut v: ciborium::Value = ciborium::Value::serialized(&telemetry(vec![], 1, 1)).unwrap();
        v.as_map_mut().unwrap().retain(|(k, _)| k.as_text() != Some("seq"));
        let mut bytes = Vec::new();
        ciborium::into_writer(&v, &mut bytes).unwrap();
        let err = decode(&bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap_err();
        assert_eq!(err.reason(), "schema");
        assert!(err.to_string().contains("seq"), "{err}");
    }

    #[test]
    fn deep_nesting_rejected() {
        let mut bytes = vec![0x81u8; 64]; // 64 nested one-element arrays
        bytes.push(0x00);
        assert_eq!(decode(&bytes, DEFAULT_MAX_MESSAGE_BYTES).unwrap_err().reason(), "too_deep");
    }

    #[test]
    fn records_out_of_range_rejected() {
        let env = telemetry(vec![record(5), record(4)], 1, 5);
        let err = decode(&encode(&env), DEFAULT_MAX_MESSAGE_BYTES).unwrap_err();
        assert!(err.to_string().contains("records[1].seq=4"), "{err}");
        let env = telemetry(vec![record(9)], 1, 5);
        assert_eq!(decode(&encode(&env), DEFAULT_MAX_MESSAGE_BYTES).unwrap_err().reason(), "invalid");
        // Sequence numbers stop at 2^63 - 1, what every store keeps.
        let env = telemetry(vec![record(MAX_SEQ)], MAX_SEQ, MAX_SEQ);
        assert!(decode(&encode(&env), DEFAULT_MAX_MESSAGE_BYTES).is_ok());
        let env = telemetry(vec![record(MAX_SEQ + 1)], MAX_SEQ, MAX_SEQ + 1);
        let err = decode(&encode(&env), DEFAULT_MAX_MESSAGE_BYTES).unwrap_err();
        assert!(err.to_string().contains("is above 9223372036854775807"), "{err}");
        // And a heartbeat's: a store could not move a watermark there.
        for (last_seq, acked_upto) in [(MAX_SEQ + 1, 1), (MAX_SEQ + 1, MAX_SEQ + 1), (1, MAX_SEQ + 1)] {
            let env = Envelope::new("d", 1, 1, Body::Status(Status { last_seq, acked_upto, ..Default::default() }));
            assert_eq!(decode(&encode(&env), DEFAULT_MAX_MESSAGE_BYTES).unwrap_err().reason(), "invalid");
        }
        let env = Envelope::new(
            "d",
            1,
            1,
            Body::Status(Status { last_seq: MAX_SEQ, acked_upto: MAX_SEQ, ..Default::default() }),
        );
        assert!(decode(&encode(&env), DEFAULT_MAX_MESSAGE_BYTES).is_ok());
    }

    #[test]
    fn bad_device_id_rejected() {
        let env = Envelope::new("a/b", 1, 1, Body::Ack(Ack { upto: 1, alerts: 0 }));
        assert_eq!(decode(&encode(&env), DEFAULT_MAX_MESSAGE_BYTES).unwrap_err().reason(), "invalid");
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, DEFAULT_MAX_MESSAGE_BYTES);
        }

        #[test]
        fn telemetry_round_trips(seqs in proptest::collection::btree_set(1u64..1_000_000, 0..20),
                                 feature in -1e30f32..1e30f32) {
            let records: Vec<Record> = seqs.iter().map(|&s| Record { features: vec![feature], ..record(s) }).collect();
            let from = seqs.iter().next().copied().unwrap_or(1);
            let to = seqs.iter().last().copied().unwrap_or(1).max(from);
            let env = telemetry(records, from, to);
            prop_assert_eq!(decode(&encode(&env), DEFAULT_MAX_MESSAGE_BYTES), Ok(env));
        }
    }

    #[test]
    fn signatures_cover_everything_but_themselves() {
        let rng = ring::rand::SystemRandom::new();
        let key = |r: &ring::rand::SystemRandom| {
            ring::signature::Ed25519KeyPair::from_pkcs8(
                ring::signature::Ed25519KeyPair::generate_pkcs8(r).unwrap().as_ref(),
            )
            .unwrap()
        };
        use ring::signature::KeyPair;
        let (a, b) = (key(&rng), key(&rng));
        let mut env = telemetry(vec![record(1), record(2)], 1, 2);
        assert_eq!(env.verify(a.public_key().as_ref()), Err(SignatureError::Unsigned));
        env.sign(&a);
        // Through the wire and back: the verifier re-encodes what it decoded.
        let got = decode(&encode(&env), DEFAULT_MAX_MESSAGE_BYTES).unwrap();
        assert_eq!(got.verify(a.public_key().as_ref()), Ok(()));
        assert_eq!(got.verify(b.public_key().as_ref()), Err(SignatureError::BadSignature));
        let mut changed = got.clone();
        changed.device = "dev-2".into();
        assert_eq!(changed.verify(a.public_key().as_ref()), Err(SignatureError::BadSignature));
        let mut changed = got;
        if let Body::Telemetry(b) = &mut changed.body {
            b.records[0].features[0] += 1.0;
        }
        assert_eq!(changed.verify(a.public_key().as_ref()), Err(SignatureError::BadSignature));
    }

    #[test]
    fn signing_bytes_are_the_envelope_without_its_signature() {
        let mut env = telemetry(vec![record(1), record(2)], 1, 2);
        let unsigned = encode(&env);
        env.sig = Some(serde_bytes::ByteBuf::from(vec![7u8; 64]));
        assert_eq!(env.signing_bytes(), unsigned);
    }

    #[test]
    fn acks_verify_only_with_a_trusted_key_in_force() {
        use crate::signing::Signer;
        let (cp, old, stranger) = (
            Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap(),
            Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap(),
            Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap(),
        );
        let trusted = [old.trusted(Some(1_000)), cp.trusted(None)];
        let ack = |upto| Envelope::new("dev-1", upto, 5, Body::Ack(Ack { upto, alerts: 0 }));
        let mut signed = ack(9);
        signed.sign_by_control_plane(&cp);
        let got = decode(&encode(&signed), DEFAULT_MAX_MESSAGE_BYTES).unwrap();
        assert_eq!(got.verify_by_trusted(&trusted, 2_000), Ok(cp.key_id()));
        assert_eq!(ack(9).verify_by_trusted(&trusted, 0), Err(SignatureError::Unsigned));
        let mut forged = ack(9);
        forged.sign_by_control_plane(&stranger);
        assert_eq!(forged.verify_by_trusted(&trusted, 0), Err(SignatureError::BadSignature));
        // The signature covers the device and the acknowledged point.
        let (mut other_device, mut raised) = (got.clone(), got.clone());
        other_device.device = "dev-2".into();
        raised.body = Body::Ack(Ack { upto: 10_000, alerts: 0 });
        assert_eq!(other_device.verify_by_trusted(&trusted, 0), Err(SignatureError::BadSignature));
        assert_eq!(raised.verify_by_trusted(&trusted, 0), Err(SignatureError::BadSignature));
        // A key past its grace period verifies nothing.
        let mut by_old = ack(3);
        by_old.sign_by_control_plane(&old);
        assert_eq!(by_old.verify_by_trusted(&trusted, 999), Ok(old.key_id()));
        assert_eq!(by_old.verify_by_trusted(&trusted, 1_001), Err(SignatureError::BadSignature));
    }
}
