//! The edgeloop control plane: where fleet telemetry lands, models are learnt, and rollouts go out.
//!
//! # Layout
//!
//! - [`config`]: the `control-plane.toml` file.
//! - [`fleet`]: devices, enrollment, ingest, the telemetry store.
//! - [`broker`]: the embedded broker, the devices' listener in front of it, the external-broker ACL.
//! - [`ml`]: datasets, training, the model registry, jobs, triggers, drift.
//! - [`rollout`]: staged rollouts of signed models, gated on install results and model behaviour.
//! - [`access`]: operators, the audit log, the signing key, certificates.
//! - [`web`]: the operator API and dashboard.
//! - [`metrics`]: counters and scrape-time gauges, encoded by prometheus-client (Prometheus text or OpenMetrics).
//! - [`storage`]: the PostgreSQL back-end (pool, migrations, the stores kept there).
//! - [`server`]: starts all of the above under one cancellation token.

pub mod access;
pub mod broker;
pub mod config;
pub mod fleet;
pub mod metrics;
pub mod ml;
pub mod rollout;
pub mod server;
pub mod storage;
pub mod web;

pub use server::{ControlPlane, ControlPlaneHandle, SERVICE_USER};
