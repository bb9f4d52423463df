//! The fleet runner: agents of all four classes, with faults injected, against a control plane; everything
//! generated is acknowledged and stored.

use crate::support::start_cp;
use edgeloop_simulators::fleet::{run, RunOptions};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_every_class_drains_completely() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |_| {}).await;
    let classes = ["factory-vibration", "city-air-quality", "factory-machine-temperature", "city-traffic"];
    let opts = RunOptions {
        devices: 8,
        classes: classes.iter().map(|c| c.to_string()).collect(),
        broker: cp.mqtt_addr.clone(),
        data_root: dir.path().join("fleet"),
        // Long enough for 500 samples even when the other tests of `it` hold both cores.
        duration: Some(Duration::from_secs(6)),
        faults: true,
        slow_samples_per_tick: 20,
        enroll_api: Some(crate::support::api(&cp)),
        // Read from the API: the key agents need to accept this control plane's acknowledgements.
        trusted_keys: Vec::new(),
    };
    let s = run(opts, CancellationToken::new()).await.unwrap();
    assert_eq!(s.devices, 8);
    assert!(s.generated > 500, "{s:?}");
    assert_eq!(s.acknowledged, s.generated, "{s:?}");
    assert_eq!(s.dropped, 0);
    assert_eq!(s.bad_samples, 0, "every generated sample fits its class");
    assert!(s.fault_windows > 0);
    let stored: u64 = (0..8).map(|i| cp.store.count(&format!("sim-{i:04}")).unwrap()).sum();
    assert_eq!(stored, s.generated);
    let classes_seen: std::collections::BTreeSet<String> = cp.registry.list().into_iter().map(|d| d.class).collect();
    assert_eq!(classes_seen.len(), 4, "{classes_seen:?}");
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
