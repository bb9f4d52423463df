//! `edgeloop-sim demo`: a control plane with its embedded broker, and a fleet of in-process agents fed by
//! synthetic signals, each scoring its features with the reference model.
//!
//! Vibration devices are fed in real time (2 kHz); slow air-quality devices run 600 times faster than real
//! time (one reading per 100 ms tick instead of one a minute), so that a short demo still shows them. With a
//! duration, the demo stops feeding, waits for every outbox to drain, and prints a one-line JSON summary.

use crate::fleet::{self, FleetSpec};
use anyhow::Context;
use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::ControlPlane;
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Demo options.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub devices: usize,
    pub duration: Option<Duration>,
    pub data_dir: PathBuf,
    /// Longest wait for outboxes to drain at the end.
    pub drain_timeout: Duration,
}

/// The final line.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub devices: usize,
    pub generated: u64,
    pub acknowledged: u64,
    pub stored: u64,
    pub dropped: u64,
}

/// Runs the demo until `duration` passes (then returns the summary) or `stop` fires.
pub async fn run(opts: DemoOptions, stop: CancellationToken) -> anyhow::Result<Summary> {
    let mqtt_port = crate::free_port()?;
    let cfg = Config::embedded(
        opts.data_dir.join("control-plane"),
        SocketAddr::from(([127, 0, 0, 1], mqtt_port)),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    );
    let cp_cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg, cp_cancel.clone()).await.context("starting the control plane")?;
    println!("edgeloop demo: {} devices", opts.devices);
    println!("  operator API: http://{}/api/v1/devices   metrics: http://{}/metrics", cp.api_addr, cp.api_addr);
    println!("  MQTT broker:  mqtt://{}:{}", cp.mqtt_addr.0, cp.mqtt_addr.1);
    println!("  data:         {}", opts.data_dir.display());

    let models = opts.data_dir.join("models");
    std::fs::create_dir_all(&models)?;
    let classes = vec![crate::class_config("factory-vibration")?, crate::class_config("city-air-quality")?];
    for c in &classes {
        let width = c.pipeline().sensors[0].width();
        std::fs::write(models.join(format!("{}.onnx", c.class)), edgeloop_agent::inference::mean_square_onnx(width))?;
    }
    let mut spec = FleetSpec::new(classes, cp.mqtt_addr.clone(), &opts.data_dir.join("agents"));
    spec.customise = std::sync::Arc::new(|cfg| {
        let dir = cfg.data_dir.parent().and_then(|p| p.parent()).map(|p| p.join("models"));
        cfg.model = dir.map(|d| d.join(format!("{}.onnx", cfg.class.class)));
    });
    let fleet_cancel = CancellationToken::new();
    let mut devices = fleet::start(&spec, opts.devices, &fleet_cancel).await?;

    let ingested = cp.metrics.clone();
    let mut report = |elapsed: Duration, devices: &[fleet::SimDevice]| {
        let (gen, acked) = devices.iter().fold((0, 0), |(g, a), d| {
            let s = d.agent.outbox.stats();
            (g + s.durable_seq, a + s.acked)
        });
        println!(
            "  t={:>4}s  records generated {gen:>8}  acknowledged {acked:>8}  ingested {:>8}",
            elapsed.as_secs(),
            ingested.records_ingested.load(std::sync::atomic::Ordering::Relaxed)
        );
    };
    fleet::feed(&mut devices, 2, opts.duration, &stop, &mut report).await?;
    fleet::drain(&devices, opts.drain_timeout).await;
    fleet_cancel.cancel();
    let mut summary = Summary { devices: devices.len(), generated: 0, acknowledged: 0, stored: 0, dropped: 0 };
    for d in devices {
        drop(d.samples);
        let outbox = d.agent.outbox.clone();
        let id = d.agent.device.clone();
        d.agent.join().await.with_context(|| format!("stopping agent {id}"))?;
        let s = outbox.stats();
        summary.generated += s.last_seq;
        summary.acknowledged += s.acked;
        summary.dropped += s.dropped_total;
        summary.stored += cp.store.count(&id)?;
    }
    cp_cancel.cancel();
    cp.join().await?;
    Ok(summary)
}
