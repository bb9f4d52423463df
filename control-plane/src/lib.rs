//! The edgeloop control plane: where fleet telemetry lands and where operators look.
//!
//! # Layout
//!
//! - [`config`]: `control-plane.toml`: data dir, durability, broker (embedded or external), API address.
//! - [`broker`]: the embedded rumqttd broker on its own thread, on loopback.
//! - [`broker_front`]: the devices' MQTT listener in front of it (TLS, client ids, cutting revoked devices).
//! - [`store`]: the telemetry store: records keyed by (device, seq), and each device's cumulative
//!   acknowledgement watermark, committed durably before any acknowledgement goes out.
//! - [`registry`]: the device registry: class, first and last seen, counters, last heartbeat.
//! - [`ingest`]: decoding, validation, dedup and storage of uplink messages ([`ingest::Ingestor`], pure of
//!   network I/O), and the MQTT service that feeds it and publishes acknowledgements.
//! - [`metrics`]: counters, rendered in the Prometheus text format.
//! - [`dataset`]: training sets from stored telemetry: cleaning, imputation, features, time split,
//!   standardisation, quality report.
//! - [`training`]: candle training (autoencoder, classifier), hyper-parameter search, ONNX export and
//!   verification.
//! - [`models`]: the model registry: versions, manifests, lineage, promotion, artifacts, labels.
//! - [`learning`]: training jobs on request, one at a time, with progress.
//! - [`drift`]: population stability index of features against the training distribution.
//! - [`triggers`]: retraining per class on a schedule, after N new records, or on drift.
//! - [`certs`]: `certs init`, a development CA and server certificate.
//! - [`keys`]: the Ed25519 signing key file.
//! - [`rollout`]: staged rollouts of signed models, gated on install results and model behaviour.
//! - [`enrollment`]: device identity: enrollment tokens, enrolled keys, broker credentials, revocation.
//! - [`operators`]: operator bearer tokens (hashed, with roles) and their file.
//! - [`audit`]: the audit log of every mutating operator call.
//! - [`acl`]: the topic ACL file for external brokers (mosquitto format, `%u` patterns).
//! - [`api`]: the operator HTTP API (axum).
//! - [`dashboard`]: the operator dashboard in the browser, served at `/` beside the API.
//! - [`server`]: starts all of the above under one cancellation token.

pub mod acl;
pub mod api;
pub mod audit;
pub mod broker;
pub mod broker_front;
pub mod certs;
pub mod config;
pub mod dashboard;
pub mod dataset;
pub mod drift;
pub mod enrollment;
pub mod ingest;
pub mod keys;
pub mod learning;
pub mod metrics;
pub mod models;
pub mod operators;
pub mod registry;
pub mod rollout;
pub mod server;
pub mod store;
pub mod training;
pub mod triggers;

pub use server::{ControlPlane, ControlPlaneHandle};
