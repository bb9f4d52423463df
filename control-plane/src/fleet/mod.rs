//! The fleet: devices, their identity, and the telemetry they send.
//!
//! - [`telemetry`]: the telemetry store: records keyed by (device, seq), and each device's cumulative
//!   acknowledgement watermark, committed durably before any acknowledgement goes out.
//! - [`devices`]: the device registry: class, first and last seen, counters, last heartbeat.
//! - [`enrollment`]: device identity: enrollment tokens, enrolled keys, broker credentials, revocation.
//! - [`ingest`]: decoding, validation, dedup and storage of uplink messages, and the MQTT service that
//!   feeds it and publishes acknowledgements.
//! - [`alerts`]: the alerts devices raise, with operators' acknowledgements and verdicts.
//! - [`logs`]: the warnings and errors devices ship, searchable and kept for `retention.log_days`.
//! - [`retention`]: pruning acknowledged records past their class's retention.

pub mod alerts;
pub(crate) mod devices;
pub(crate) mod enrollment;
pub(crate) mod ingest;
pub mod logs;
pub mod retention;
pub(crate) mod telemetry;

pub use alerts::AlertStore;
pub use devices::{Device, Registry};
pub use enrollment::{EnrollError, Enrollment};
pub use ingest::{Ingestor, Outcome};
pub use logs::LogStore;
pub use telemetry::{Query, TelemetryStore};
