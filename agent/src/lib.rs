//! The edgeloop agent: the daemon that runs on each edge device.
//!
//! # Layout
//!
//! - [`config`]: the agent's own config (`agent.toml`): identity, broker, storage, sources, model.
//! - [`source`]: where samples come from: an in-process channel, a UDP JSON-lines listener, stdin.
//! - [`collector`]: samples to feature vectors (common's pipeline) to scores (tract) to durable outbox records,
//!   group-committed off the async workers.
//! - [`inference`]: loading an ONNX model with tract and running it, with latency bookkeeping.
//! - [`outbox`]: the sled outbox: monotonic sequence numbers, a byte bound that drops oldest first and
//!   reports what it dropped, deletion only on end-to-end acknowledgement.
//! - [`uplink`]: MQTT: a pure state machine deciding what to send, and the thin rumqttc shell around it.
//! - [`updater`]: signed model updates: verification, resumable download, self-test, shadow, atomic
//!   activation, watch and automatic revert, with the model slot the collector scores through.
//! - [`identity`]: the device key (signs every envelope), enrollment and MQTT credentials.
//! - [`logs`]: the agent's own warnings and errors: a bounded ring fed by a `tracing` layer, shipped on
//!   `up/logs` within the class's budget.
//! - [`memory`]: handing start-up-only code pages back to the kernel once the agent binary has settled.
//! - [`health`]: heartbeat contents (outbox depth, drops, latency percentiles, RSS).
//! - [`backoff`]: the retry loops' delays: exponential with jitter (backon), within each loop's bounds.
//! - [`daemon`]: starts the pieces above under one cancellation token and stops them cleanly.

pub mod alerts;
pub mod backoff;
pub mod collector;
pub mod config;
pub mod daemon;
pub mod health;
pub mod identity;
pub mod inference;
pub mod local_status;
pub mod logs;
pub mod memory;
pub mod outbox;
pub mod source;
pub mod tract_plan;
pub mod updater;
pub mod uplink;
pub mod version;

pub use daemon::{Agent, AgentHandle};
