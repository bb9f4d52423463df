//! Control-plane ingest end to end with 100 devices: telemetry batches published over MQTT, stored, committed
//! durably and acknowledged; a device sends its next batch within a window of 4 unacknowledged ones. Runs
//! with fsync commits and flush-only commits, interleaved, three rounds each; prints medians and the ratio.
//!
//! `cargo bench -p edgeloop-simulators --bench ingest`

use edgeloop_common::durable::Durability;
use edgeloop_common::envelope::{self, Body, Envelope, Record, TelemetryBatch};
use edgeloop_control_plane::config::Config;
use edgeloop_control_plane::ControlPlane;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const DEVICES: usize = 100;
const BATCHES: u64 = 40;
const BATCH: u64 = 100;
const WINDOW: u64 = 4;

async fn device(id: String, host: String, port: u16) -> anyhow::Result<u64> {
    let mut opts = MqttOptions::new(id.clone(), host, port);
    opts.set_max_packet_size(1 << 20, 1 << 20).set_inflight(100).set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(opts, 64);
    let ack_topic = format!("edgeloop/v1/{id}/down/ack");
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    let subscribed = std::sync::Arc::new(tokio::sync::Notify::new());
    let sub2 = subscribed.clone();
    let ack_topic2 = ack_topic.clone();
    let c2 = client.clone();
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c2.subscribe(ack_topic2.clone(), QoS::AtLeastOnce).await;
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    sub2.notify_one();
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic2 => {
                    if let Ok(Envelope { body: Body::Ack(a), .. }) = envelope::decode(&p.payload, 1 << 20) {
                        let _ = tx.send(a.upto);
                    }
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    subscribed.notified().await;
    let topic = format!("edgeloop/v1/{id}/up/telemetry");
    // Like an agent: a window of unacknowledged batches, and a resend from the acknowledgement when it
    // stops moving (the broker may skip messages when ingest lags).
    let (mut acked, mut next, mut resends) = (0u64, 1u64, 0u64);
    let total = BATCHES * BATCH;
    while acked < total {
        while next <= total && next + BATCH - 1 <= acked + WINDOW * BATCH {
            let (from, to) = (next, next + BATCH - 1);
            let records = (from..=to)
                .map(|seq| Record {
                    seq,
                    ts_ms: seq,
                    sensor: "accel".into(),
                    features: vec![0.25; 24],
                    score: Some(0.5),
                    flags: 0,
                })
                .collect();
            let env = Envelope::new(id.clone(), to, 0, Body::Telemetry(TelemetryBatch { from, to, records }));
            client.publish(&topic, QoS::AtLeastOnce, false, envelope::encode(&env)).await?;
            next = to + 1;
        }
        match tokio::time::timeout(Duration::from_secs(2), rx.changed()).await {
            Ok(r) => {
                r?;
                acked = *rx.borrow();
            }
            Err(_) => {
                if std::env::var("BENCH_DEBUG").is_ok() {
                    eprintln!("{id}: timeout at acked={acked} next={next} latest={}", *rx.borrow());
                }
                resends += 1;
                next = acked + 1;
            }
        }
    }
    Ok(resends)
}

async fn round(mode: Durability) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let mqtt = SocketAddr::from(([127, 0, 0, 1], edgeloop_simulators::free_port()?));
    let mut cfg = Config::embedded(dir.path().to_path_buf(), mqtt, SocketAddr::from(([127, 0, 0, 1], 0)));
    cfg.durability = mode;
    let cancel = CancellationToken::new();
    let cp = ControlPlane::start(cfg, cancel.clone()).await?;
    let started = Instant::now();
    let m = cp.metrics.clone();
    let progress = tokio::spawn(async move {
        while std::env::var("BENCH_DEBUG").is_ok() {
            tokio::time::sleep(Duration::from_secs(2)).await;
            use std::sync::atomic::Ordering::Relaxed;
            eprintln!(
                "  ... ingested {} acks {} commits {} msgs {}",
                m.records_ingested.load(Relaxed),
                m.acks_sent.load(Relaxed),
                m.commits.load(Relaxed),
                m.messages_received.load(Relaxed)
            );
        }
    });
    let tasks: Vec<_> = (0..DEVICES)
        .map(|i| tokio::spawn(device(format!("bench-{i:03}"), cp.mqtt_addr.0.clone(), cp.mqtt_addr.1)))
        .collect();
    let mut resends = 0;
    for t in tasks {
        resends += t.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    progress.abort();
    if resends > 0 {
        eprintln!("  ({resends} resends after an ack timeout)");
    }
    let stored = cp.metrics.records_ingested.load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(stored == DEVICES as u64 * BATCHES * BATCH, "stored {stored}");
    cancel.cancel();
    cp.join().await?;
    Ok(stored as f64 / secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let (mut durable, mut flush) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        durable.push(rt.block_on(round(Durability::Fsync))?);
        flush.push(rt.block_on(round(Durability::Flush))?);
    }
    let (d, f) = (median(durable), median(flush));
    println!("ingest end to end (publish -> stored -> committed -> acked), {DEVICES} devices x {BATCHES} batches x {BATCH} records");
    println!("  fsync commits: median {d:>10.0} records/s");
    println!("  flush only:    median {f:>10.0} records/s");
    println!("  durable / flush-only: {:.2}", d / f);
    // rumqttd's broker thread cannot be stopped; leave without waiting for it.
    std::process::exit(0);
}
