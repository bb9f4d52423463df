//! Agent memory while streaming: the release `edgeloop-agent` binary, a model loaded, fed 100 samples a
//! second over UDP (each one a scored record), connected to a control plane with its embedded broker.
//! Prints the median and maximum RSS over the last 20 of 30 seconds.
//!
//! `cargo build --release -p edgeloop-agent && cargo bench -p edgeloop-simulators --bench agent_rss`

use anyhow::Context;
use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::ControlPlane;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn main() -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let agent_bin = exe.parent().and_then(Path::parent).context("bench path")?.join("edgeloop-agent");
    anyhow::ensure!(
        agent_bin.exists(),
        "{} is missing: run `cargo build --release -p edgeloop-agent` first",
        agent_bin.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // Port 0: the control plane binds its broker and reports the port (`mqtt_addr`).
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let cancel = CancellationToken::new();
    // The agent signs its envelopes either way; this measures its memory, not enrollment.
    let mut cfg = Config::embedded(d.join("cp"), any, any);
    cfg.require_enrollment = false;
    let cp = rt.block_on(ControlPlane::start(cfg, cancel.clone()))?;

    let mqtt_port = cp.mqtt_addr.1;
    // The agent runs as its own process and cannot report the port its UDP source got: picked beforehand.
    let udp = edgeloop_simulators::free_port()?;
    std::fs::write(
        d.join("probe.toml"),
        "class = \"probe\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 100\n",
    )?;
    // An NNEF archive, which every build of the agent runs (the device build runs nothing else); with
    // `EDGELOOP_BENCH_MODEL=onnx`, the ONNX file instead, for an agent built with `--features onnx` or
    // before NNEF.
    let model = match std::env::var("EDGELOOP_BENCH_MODEL").as_deref() {
        Ok("onnx") => edgeloop_agent::inference::mean_square_onnx(5),
        _ => edgeloop_agent::inference::mean_square_nnef(5),
    };
    std::fs::write(d.join("model.nnef"), model)?;
    std::fs::write(
        d.join("agent.toml"),
        format!("[device]\nid = \"rss-1\"\nclass_config = \"probe.toml\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"\n[storage]\ndata_dir = \"agent\"\n[inference]\nmodel = \"model.nnef\"\nthreshold = 1000.0\nallow_unsigned_model = true\n[[sources]]\nkind = \"udp\"\nlisten = \"127.0.0.1:{udp}\"\n[[trusted_keys]]\npublic_key = \"{}\"\n", mqtt_port, edgeloop_common::signing::hex(&cp.trusted_key.public_key)),
    )?;
    let mut child = Command::new(&agent_bin)
        .arg("--config")
        .arg(d.join("agent.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut i = 0u64;
    while started.elapsed() < Duration::from_secs(30) {
        i += 1;
        let line = format!("{{\"sensor\":\"t\",\"values\":[{}]}}", (i % 100) as f64 / 10.0);
        sock.send_to(line.as_bytes(), ("127.0.0.1", udp))?;
        if i % 100 == 0 && started.elapsed() > Duration::from_secs(10) {
            samples.extend(rss_kib(pid));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stored = cp.metrics.records_ingested.get();
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    let _ = child.wait();
    samples.sort_unstable();
    anyhow::ensure!(!samples.is_empty(), "no RSS samples");
    let med = samples[samples.len() / 2];
    let max = samples[samples.len() - 1];
    println!(
        "agent RSS at 100 Hz with a model (release build), after 10 s warm-up, {} samples sent, {stored} stored",
        i
    );
    println!("  median {:.1} MiB, max {:.1} MiB", med as f64 / 1024.0, max as f64 / 1024.0);
    anyhow::ensure!(stored > 1000, "the stream did not flow ({stored} records stored)");
    std::process::exit(0);
}
