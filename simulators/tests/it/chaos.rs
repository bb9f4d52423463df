//! A small chaos run: every fault kind, then the total-queue check.

use edgeloop_simulators::chaos::{run, ChaosOptions, Fault};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_small_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ChaosOptions {
        devices: 10,
        classes: vec!["city-air-quality".into(), "factory-machine-temperature".into(), "city-traffic".into()],
        duration: Duration::from_secs(20),
        faults: Fault::ALL.to_vec(),
        data_root: dir.path().to_path_buf(),
        seed: 7,
        drain_timeout: Duration::from_secs(90),
        cluster: false,
    };
    let r = run(opts, CancellationToken::new()).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!((r.lost, r.duplicates_stored), (0, 0), "{r:?}");
    assert_eq!(r.dropped_by_policy, r.dropped_reported, "{r:?}");
    assert!(r.generated > 1_000, "{r:?}");
    assert_eq!(r.acknowledged, r.generated, "the drain completes once faults stop: {r:?}");
    // Dropping oldest may take records that were already sent and stored, so stored + dropped can exceed
    // generated; it can never fall short of it.
    assert!(r.stored <= r.generated && r.stored + r.dropped_by_policy >= r.generated, "{r:?}");
    assert_eq!(r.faults_injected.len(), 8, "every fault kind fired: {r:?}");
    assert!(r.corrupted_rejected > 0 || !r.faults_injected.contains_key("corrupt"), "{r:?}");
}

/// `chaos --cluster`: the fleet through mosquitto to 2 control-plane replica processes on PostgreSQL, with
/// replicas SIGKILLed and started again among the faults. Nothing acknowledged is lost, nothing is stored
/// twice, and every drop is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_cluster_with_replica_kills_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Fault::ALL.into_iter().filter(|f| *f != Fault::Corrupt).collect::<Vec<_>>();
    let opts = ChaosOptions {
        devices: 8,
        classes: vec!["city-air-quality".into(), "factory-machine-temperature".into()],
        duration: Duration::from_secs(25),
        faults,
        data_root: dir.path().to_path_buf(),
        seed: 11,
        drain_timeout: Duration::from_secs(120),
        cluster: true,
    };
    let r = run(opts, CancellationToken::new()).await.unwrap();
    assert!(r.ok, "{r:?}");
    assert_eq!((r.lost, r.duplicates_stored), (0, 0), "{r:?}");
    assert_eq!(r.dropped_by_policy, r.dropped_reported, "{r:?}");
    assert!(r.replica_kills >= 1, "no replica was killed: {r:?}");
    assert!(r.generated > 500, "{r:?}");
    assert_eq!(r.acknowledged, r.generated, "the drain completes once faults stop: {r:?}");
    assert!(r.stored <= r.generated && r.stored + r.dropped_by_policy >= r.generated, "{r:?}");
    assert_eq!(r.faults_injected.len(), 7, "every fault kind but corrupt fired: {r:?}");
}
