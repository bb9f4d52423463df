//! `demo --fast --duration 150`: the whole story runs, the counts agree, rollouts complete and the injected
//! fault is flagged on the device. The story needs about 90 s on an idle machine; the first trainings (four
//! in a row, unoptimised in a debug build) take up to twice as long when the machine is shared, so the run
//! is given 150 s. Every assertion is the same.
//!
//! A test binary of its own: cargo runs test binaries one after another, so no other test shares the two
//! cores with the demo's eight agents at full rate (beside the training and fleet tests of `it`, their
//! outboxes filled and dropped records, which the demo must never do).

use edgeloop_simulators::demo::{run, DemoOptions};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_demo_tells_the_story_and_flags_the_fault() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        devices: 8,
        duration: Some(Duration::from_secs(150)),
        data_dir: dir.path().to_path_buf(),
        drain_timeout: Duration::from_secs(60),
        fast: true,
    };
    let s = run(opts, CancellationToken::new()).await.unwrap();
    eprintln!("{}", serde_json::to_string(&s).unwrap());
    assert_eq!(s.devices, 8);
    assert!(s.generated > 1000, "{s:?}");
    assert_eq!(s.acknowledged, s.generated, "{s:?}");
    assert_eq!(s.stored, s.generated, "{s:?}");
    assert_eq!(s.dropped, 0);
    // Every class trained and rolled out its first model.
    assert!(s.models_promoted >= 4, "{s:?}");
    assert!(s.rollouts_completed >= 4, "{s:?}");
    assert_eq!(s.devices_per_model.get("none"), None, "every device runs a model: {s:?}");
    // The bearing fault was flagged on the factory machine, and most flags there are true.
    assert!(s.chapters >= 4, "{s:?}");
    let vib = &s.detection["factory-vibration"];
    assert!(vib.in_fault > 0 && vib.true_positives > 0, "{vib:?}");
    assert!(vib.recall.unwrap() > 0.5, "{vib:?}");
    assert!(s.anomalies_flagged > 0);
}
