//! Everything the edgeloop agent and control plane share, and nothing else.
//!
//! # Layout
//!
//! - [`alerts`]: the alert rule (one fault, one alert: hysteresis and a cool-down over flagged windows) and
//!   the alert snapshots devices send.
//! - [`envelope`]: the wire messages (telemetry batches, status heartbeats, acknowledgements) inside the
//!   versioned envelope, and the CBOR codec that enforces size, depth and version limits.
//! - [`topics`]: the MQTT topic scheme `edgeloop/v1/{device}/{up|down}/{channel}`.
//! - [`broker_url`]: `mqtts://host:port` and `mqtt://host:port`, parsed once for every binary.
//! - [`cli`]: the shape of the binaries' `main`: an error carrying its exit code (2 bad configuration or usage,
//!   1 anything else) and the one function that prints it and exits.
//! - [`config`]: the device-class schema that `firmware-configs/*.toml` follow, and the error type every
//!   edgeloop config loader uses (file, key path, reason).
//! - [`seen_range`]: the range of readings a device has seen, and the rule that calls a reading well outside
//!   it out of range (it counts towards alerts like a flagged window).
//! - [`features`]: feature pipeline v1, the one implementation of feature extraction that both the agent and
//!   the control plane run, with its serialisable spec.
//! - [`modbus`]: a class's Modbus register map (tables, addresses, types, scale and offset).
//! - [`signing`]: Ed25519 signatures over CBOR bytes, key ids and trusted-key lists (rotation).
//! - [`tls`] (feature `tls`): rustls client and server settings (ring provider, trust pinned to the fleet's CA).
//! - [`update`]: the model manifest, the per-device desired state and update reports.
//! - [`enroll`]: the enrollment request a device signs with its own key (proof that it holds the key).
//! - [`durable`] (feature `durable`): a sled database whose commit is power-loss durable (flush, then `fdatasync`), in a private
//!   directory.
//! - [`private`]: data directories created 0700 and files 0600; looser modes are tightened on open; files
//!   replaced atomically and durably; the warning for secret files others can read.
//! - [`secret`]: random tokens and their constant-time comparison.
//!
//! The agent and the control plane never depend on each other; whatever they must agree on lives here.

pub mod alerts;
pub mod broker_url;
pub mod bundle;
pub mod cli;
pub mod config;
#[cfg(feature = "durable")]
pub mod durable;
pub mod enroll;
pub mod envelope;
pub mod features;
pub mod gaps;
pub mod modbus;
pub mod private;
pub mod score_tail;
pub mod secret;
pub mod seen_range;
pub mod signing;
#[cfg(feature = "tls")]
pub mod tls;
pub mod topics;
pub mod update;

/// Milliseconds since the Unix epoch, the time unit used on the wire.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}
