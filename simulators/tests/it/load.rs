//! `edgeloop-sim load` against a real control-plane process: every record sent is acknowledged and stored,
//! and the report's latencies and resource numbers are measured, not made up.

use crate::support::binary;
use edgeloop_simulators::load::{run, LoadBroker, LoadOptions, LoadReport};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_load_run_is_acknowledged_stored_and_measured() {
    let r = small_run(LoadBroker::Embedded).await;
    assert_eq!((r.broker_cpu_cores_mean, r.broker_rss_mib_peak), (None, None), "{r:?}");
}

/// The same through mosquitto: devices on its TLS listener, provisioned by the control plane into dynamic
/// security, the control plane in its external-broker mode; mosquitto's own CPU and memory are measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_load_run_through_mosquitto_is_acknowledged_stored_and_measured() {
    let r = small_run(LoadBroker::Mosquitto).await;
    let (cpu, end, peak) =
        (r.broker_cpu_cores_mean.unwrap(), r.broker_rss_mib_end.unwrap(), r.broker_rss_mib_peak.unwrap());
    assert!(cpu > 0.0 && end > 1.0 && peak >= end, "{r:?}");
}

async fn small_run(broker: LoadBroker) -> LoadReport {
    let dir = tempfile::tempdir().unwrap();
    let opts = LoadOptions {
        devices: 12,
        rate: 20.0,
        duration: Duration::from_secs(4),
        batch_ms: 250,
        data_dir: dir.path().to_path_buf(),
        cp_bin: binary("edgeloop-control-plane"),
        tls: true,
        durability: "fsync".into(),
        broker,
    };
    let r = run(opts, CancellationToken::new()).await.unwrap();
    eprintln!("{}", serde_json::to_string(&r).unwrap());
    assert_eq!(r.broker, broker);
    // 12 devices × 20 records/s × ~4 s, give or take the first interval.
    assert!(r.sent >= 12 * 60, "{r:?}");
    assert_eq!((r.acknowledged, r.stored, r.unacknowledged), (r.sent, r.sent, 0), "{r:?}");
    for p in [&r.gen_to_ack_ms, &r.send_to_ack_ms] {
        assert_eq!(p.samples as u64, r.sent);
        assert!(0.0 < p.p50 && p.p50 <= p.p95 && p.p95 <= p.p99 && p.p99 <= p.max, "{p:?}");
    }
    // A record waits for its batch (up to 250 ms here) before it is sent.
    assert!(r.gen_to_ack_ms.p50 > r.send_to_ack_ms.p50, "{r:?}");
    assert!(r.throughput_records_per_s > 100.0, "{r:?}");
    assert!(r.cp_cpu_cores_mean > 0.0 && r.cp_rss_mib_peak > 5.0 && r.cp_rss_mib_peak >= r.cp_rss_mib_end, "{r:?}");
    r
}
