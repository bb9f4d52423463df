//! With a tiny byte bound and no broker, the outbox drops oldest first; once connected, the dropped ranges
//! it reports equal exactly what is missing from the store.

use crate::support::{start_cp, stored_seqs, wait_for};
use edgeloop_control_plane::web::DeviceView;
use edgeloop_simulators::fleet::{self, FleetSpec};
use edgeloop_simulators::proxy::{FaultProxy, Mode};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const RECORDS: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_full_drops_exactly_what_it_reports() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let cancel = CancellationToken::new();
    let broker: SocketAddr = format!("{}:{}", cp.mqtt_addr.0, cp.mqtt_addr.1).parse().unwrap();
    let proxy = FaultProxy::start(broker, cancel.clone()).await.unwrap();
    proxy.set_mode(Mode::Refuse);

    let mut class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    class.uplink.heartbeat_secs = 1;
    class.uplink.ack_timeout_secs = 1;
    class.outbox.commit_max_records = 16;
    let mut spec = FleetSpec::new(
        vec![class],
        ("127.0.0.1".into(), proxy.addr().port()),
        &dir.path().join("agents"),
        cp.trusted_key.clone(),
    );
    spec.enroll_with(&api, 64).await.unwrap();
    spec.customise = std::sync::Arc::new(|c| c.outbox_max_bytes = 4096);
    let mut devices = fleet::start(&spec, 1, &cancel).await.unwrap();
    let d = &mut devices[0];
    for s in d.generator.take(RECORDS as usize) {
        d.samples.send(s).await.unwrap();
    }
    let outbox = d.agent.outbox.clone();
    wait_for("all records appended", Duration::from_secs(20), || outbox.stats().durable_seq == RECORDS).await;
    let stats = outbox.stats();
    assert!(stats.dropped_total > 0, "a 4 KiB outbox must drop some of {RECORDS} records");
    assert!(stats.bytes <= 4096);
    assert_eq!(stats.acked, 0, "nothing can have been acknowledged while the broker was unreachable");

    proxy.set_mode(Mode::Pass);
    wait_for("remaining records acknowledged", Duration::from_secs(30), || outbox.stats().acked == RECORDS).await;
    let device = d.agent.device.clone();
    let mut view: Option<DeviceView> = None;
    for _ in 0..100 {
        let v: DeviceView = api.get_json(&format!("/api/v1/devices/{device}")).await.unwrap();
        if v.device
            .last_status
            .as_ref()
            .is_some_and(|s| s.dropped_total == stats.dropped_total && s.acked_upto == RECORDS)
        {
            view = Some(v);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let view = view.expect("a heartbeat with the final dropped count reaches the control plane");
    let status = view.device.last_status.unwrap();

    let stored: BTreeSet<u64> = stored_seqs(&api, &device).await.into_iter().collect();
    let dropped: BTreeSet<u64> = status.dropped_ranges.iter().flat_map(|r| r.from..=r.to).collect();
    let missing: BTreeSet<u64> = (1..=RECORDS).filter(|s| !stored.contains(s)).collect();
    assert_eq!(dropped.len() as u64, status.dropped_total, "ranges cover the total");
    assert_eq!(dropped, missing, "reported drops are exactly the records missing from the store");
    assert!(stored.iter().all(|s| (1..=RECORDS).contains(s)));

    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
