//! Device simulators, fault injection and the demo.
//!
//! # Layout
//!
//! - [`signals`]: seeded synthetic signals per device class.
//! - [`device`]: a raw enrolled device speaking MQTT directly, for crafted messages (junk, forgeries).
//! - [`fleet`]: many in-process agents, each with its own identity, data dir and signal seed.
//! - [`processes`]: the fleet as `edgeloop-agent` processes fed over UDP (`fleet --processes`).
//! - [`proxy`]: a fault-injecting TCP proxy (cut connections, blackhole, refuse, delay) for tests and chaos.
//! - [`chaos`]: `edgeloop-sim chaos`: the fleet under a fault schedule, then a total-queue check.
//! - [`demo`]: `edgeloop-sim demo`: the whole loop told as a story, with a JSON summary at the end.
//! - [`load`]: `edgeloop-sim load`: a control-plane process under N devices' telemetry; throughput, latency,
//!   CPU and memory.
//! - [`rollouts`]: uploading models and driving rollouts through the operator API; agents' trust config.
//! - [`http`]: [`http::Api`], a client of the operator API (reqwest) for tests and tools, with its own CA and token.
//! - [`modbus_device`]: `edgeloop-sim modbus-device`: a class's simulated device as a Modbus TCP server.
//! - [`nab`]: the Numenta Anomaly Benchmark replayed through the real loop, and NAB's scorer.

pub mod chaos;
pub mod chaos_cluster;
pub mod demo;
pub mod device;
pub mod fleet;
pub mod http;
pub mod load;
pub mod modbus_device;
pub mod mosquitto;
pub mod nab;
pub mod postgres;
pub mod processes;
pub mod proxy;
pub mod replicas;
pub mod rollouts;
pub mod signals;
pub mod supervisor;

/// The firmware configs shipped in `firmware-configs/`, built in so the binaries run from anywhere.
pub const FIRMWARE_CONFIGS: &[(&str, &str)] = &[
    ("factory-vibration.toml", include_str!("../../firmware-configs/factory-vibration.toml")),
    ("city-air-quality.toml", include_str!("../../firmware-configs/city-air-quality.toml")),
    ("factory-machine-temperature.toml", include_str!("../../firmware-configs/factory-machine-temperature.toml")),
    ("city-traffic.toml", include_str!("../../firmware-configs/city-traffic.toml")),
];

/// The built-in class config named `class`.
pub fn class_config(class: &str) -> anyhow::Result<edgeloop_common::config::ClassConfig> {
    let file = format!("{class}.toml");
    let (_, text) = FIRMWARE_CONFIGS
        .iter()
        .find(|(f, _)| *f == file)
        .ok_or_else(|| anyhow::anyhow!("no built-in firmware config for class `{class}`"))?;
    Ok(edgeloop_common::config::ClassConfig::from_toml(&file, text)?)
}

/// A free loopback TCP port (bound then released; a small race is accepted for tests and demos). Only for
/// servers that cannot report the port they bound (another process: mosquitto, chromedriver, a control plane
/// or agent started as a process); an in-process control plane binds port 0 and reports its ports.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
