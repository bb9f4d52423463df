//! What the agent's own logging costs with the log ring installed: a WARN line the budget keeps, a WARN line
//! over the budget (only counted), and an INFO line (not for the ring), each through the real `tracing` layer;
//! plus taking and encoding a full batch. Five rounds of each, interleaved; medians.
//!
//! `cargo bench -p edgeloop-agent --bench log_ring`

use edgeloop_agent::logs::{LogHub, RingLayer};
use edgeloop_common::config::LogsConfig;
use edgeloop_common::envelope::{self, Body, Envelope};
use std::sync::Arc;
use std::time::Instant;
use tracing_subscriber::layer::SubscriberExt;

const LINES: u64 = 200_000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Nanoseconds per event of `emit`, with a ring whose budget is `lines_per_minute` (a huge one keeps every
/// line, a tiny one suppresses all but the burst).
fn round(lines_per_minute: u32, burst: u32, emit: fn(u64)) -> (f64, u64) {
    let hub = Arc::new(LogHub::default());
    let cfg = LogsConfig { lines_per_minute, burst, ring_entries: 100_000, ..Default::default() };
    let reg = hub.register("bench-1", cfg, edgeloop_common::unix_millis());
    let subscriber = tracing_subscriber::registry().with(RingLayer::new(hub.clone()));
    let started = Instant::now();
    tracing::subscriber::with_default(subscriber, || {
        for i in 0..LINES {
            emit(i);
            if i % 50_000 == 49_999 {
                // The uplink empties the ring now and then, a batch of 200 at a time.
                let mut r = reg.ring().lock().unwrap();
                while !r.is_empty() {
                    let _ = r.take_batch();
                }
            }
        }
    });
    let ns = started.elapsed().as_nanos() as f64 / LINES as f64;
    let suppressed = reg.ring().lock().unwrap().suppressed_total;
    (ns, suppressed)
}

fn warn(i: u64) {
    tracing::warn!(
        device = "bench-1",
        origin = "udp 127.0.0.1:7878",
        reason = "expected value",
        rejected_total = i,
        "bad sample refused"
    );
}

fn info(i: u64) {
    tracing::info!(device = "bench-1", i, "batch sent");
}

fn main() {
    let (mut kept, mut suppressed, mut infos, mut batches) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).expect("key");
    for _ in 0..5 {
        let (ns, s) = round(6000, 1_000_000, warn);
        assert_eq!(s, 0, "a budget this large keeps every line");
        kept.push(ns);
        let (ns, s) = round(60, 120, warn);
        assert!(s >= LINES - 200, "a budget of 60 a minute suppresses nearly all: {s}");
        suppressed.push(ns);
        infos.push(round(6000, 1_000_000, info).0);
        // A full batch (200 lines), signed and encoded as the uplink sends it.
        let hub = Arc::new(LogHub::default());
        let reg =
            hub.register("bench-1", LogsConfig { lines_per_minute: 6000, burst: u32::MAX, ..Default::default() }, 0);
        let started = Instant::now();
        let mut bytes = 0;
        for b in 0..1000u64 {
            {
                let mut r = reg.ring().lock().unwrap();
                for i in 0..200 {
                    r.push(
                        envelope::LogEntry {
                            ts_ms: b * 1000 + i,
                            level: envelope::LogLevel::Warn,
                            target: "edgeloop_agent::source".into(),
                            message: format!(
                                "bad sample refused origin=udp 127.0.0.1:7878 reason=expected value rejected_total={i}"
                            ),
                        },
                        0,
                    );
                }
            }
            let batch = reg.ring().lock().unwrap().take_batch();
            let mut env = Envelope::new("bench-1", b + 1, 0, Body::Logs(batch));
            env.sign(&key);
            bytes = envelope::encode(&env).len();
        }
        batches.push(started.elapsed().as_secs_f64() * 1e6 / 1000.0);
        println!("  (a full batch of 200 lines is {bytes} bytes on the wire)");
    }
    println!("agent log ring, {LINES} events a round, five rounds, medians:");
    println!("  WARN kept (budget not reached):    {:>8.0} ns/event", median(kept));
    println!("  WARN suppressed (over the budget): {:>8.0} ns/event", median(suppressed));
    println!("  INFO (not for the ring):           {:>8.0} ns/event", median(infos));
    println!("  a 200-line batch filled, taken, signed and encoded: {:>8.0} µs", median(batches));
}
