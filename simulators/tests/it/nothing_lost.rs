//! 10 agents × 2,000 records through the embedded broker behind a fault-injecting proxy that cuts every
//! connection several times mid-stream: every record is stored exactly once.

use crate::support::{assert_gap_free, start_cp, stored_seqs, wait_for};
use edgeloop_simulators::fleet::{self, FleetSpec};
use edgeloop_simulators::proxy::FaultProxy;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const DEVICES: usize = 10;
const RECORDS: u64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_lost_through_connection_cuts() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    // The devices' links are cut. The control plane's own link to its embedded broker is in-process loopback
    // and is not cut here; mosquitto::fleet_works_through_mosquitto cuts it for an external broker.
    let (cp, cp_cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let broker = SocketAddr::from(([127, 0, 0, 1], cp.mqtt_addr.1));
    let proxy = FaultProxy::start(broker, cancel.clone()).await.unwrap();

    let mut class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    class.uplink.ack_timeout_secs = 1;
    class.uplink.heartbeat_secs = 1;
    class.uplink.batch_max_records = 50;
    let mut spec = FleetSpec::new(
        vec![class],
        ("127.0.0.1".into(), proxy.addr().port()),
        &dir.path().join("agents"),
        cp.trusted_key.clone(),
    );
    spec.enroll_with(&api, 64).await.unwrap();
    let mut devices = fleet::start(&spec, DEVICES, &cancel).await.unwrap();

    // 20 rounds of 100 samples per device, 100 ms apart; cut everything every 5th round.
    for round in 0..20 {
        for d in &mut devices {
            for s in d.generator.take(100) {
                d.samples.send(s).await.unwrap();
            }
        }
        if round % 5 == 2 {
            proxy.cut_all();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(proxy.cuts() >= 3);

    wait_for("every device's records appended", Duration::from_secs(30), || {
        devices.iter().all(|d| d.agent.outbox.stats().durable_seq == RECORDS)
    })
    .await;
    wait_for("every outbox acknowledged", Duration::from_secs(60), || {
        devices.iter().all(|d| d.agent.outbox.stats().acked == RECORDS)
    })
    .await;
    let connects: u64 =
        devices.iter().map(|d| d.agent.counters.connects.load(std::sync::atomic::Ordering::Relaxed)).sum();
    assert!(connects >= 3 * DEVICES as u64, "cuts should force reconnects, saw {connects} connects");

    for d in &devices {
        assert_eq!(d.agent.outbox.stats().depth, 0, "{}: acknowledged records leave the outbox", d.agent.device);
        let seqs = stored_seqs(&api, &d.agent.device).await;
        assert_gap_free(&d.agent.device, &seqs, RECORDS);
    }
    let ingested = cp.metrics.records_ingested.get();
    assert_eq!(ingested, DEVICES as u64 * RECORDS, "each record ingested once");

    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
