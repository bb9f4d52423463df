//! Integration tests of the telemetry path: real broker, real agents, real store.

mod api;
mod api_limits;
mod chaos;
mod cross_process;
mod dashboard;
mod demo;
mod enrollment;
mod fleet;
mod flood;
mod front;
mod learning;
mod load;
mod malformed;
mod metrics;
mod modbus;
mod mosquitto;
mod nab;
mod nothing_lost;
mod operators;
mod outbox_full;
mod process_fleet;
mod process_rollout;
mod rollouts;
mod support;
mod triggers;
mod trust;
