//! The demo runs, drains and reports consistent counts.

use edgeloop_simulators::demo::{run, DemoOptions};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_summary_counts_agree() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        devices: 4,
        duration: Some(Duration::from_secs(3)),
        data_dir: dir.path().to_path_buf(),
        drain_timeout: Duration::from_secs(30),
    };
    let s = run(opts, CancellationToken::new()).await.unwrap();
    assert_eq!(s.devices, 4);
    assert!(s.generated > 20, "{s:?}");
    assert_eq!(s.acknowledged, s.generated, "{s:?}");
    assert_eq!(s.stored, s.generated, "{s:?}");
    assert_eq!(s.dropped, 0);
    assert_eq!(s.rollouts_completed, 2, "{s:?}");
    let per_model: Vec<(&str, usize)> = s.devices_per_model.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(per_model, vec![("city-air-quality v1", 2), ("factory-vibration v1", 2)], "{s:?}");
}
