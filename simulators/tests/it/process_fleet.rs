//! `fleet --processes`: agent binaries as separate processes, enrolled over HTTPS, streaming over mqtts.

use crate::support::{binary, start_cp};
use edgeloop_simulators::processes::{run, ProcessFleetOptions};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_as_processes_drain_completely() {
    let dir = tempfile::tempdir().unwrap();
    let files = edgeloop_control_plane::access::certs::init(&dir.path().join("tls"), &[]).unwrap();
    let tls = edgeloop_control_plane::config::TlsFiles { cert: files.cert.clone(), key: files.key.clone() };
    let (cp, cancel) = start_cp(dir.path(), move |c| c.tls = Some(tls)).await;
    let api = crate::support::api_tls(&cp, &std::fs::read(&files.ca).unwrap());
    let opts = ProcessFleetOptions {
        devices: 3,
        classes: vec!["city-air-quality".into(), "factory-machine-temperature".into()],
        broker_url: format!("mqtts://127.0.0.1:{}", cp.mqtt_addr.1),
        api: Some(api),
        ca_file: Some(files.ca.clone()),
        data_root: dir.path().join("fleet"),
        duration: Duration::from_secs(4),
        slow_samples_per_tick: 5,
        agent_bin: binary("edgeloop-agent"),
        trusted_keys: vec![cp.trusted_key.clone()],
    };
    let s = run(opts, CancellationToken::new()).await.unwrap();
    assert_eq!(s.devices, 3);
    assert!(s.generated > 100, "{s:?}");
    assert_eq!(s.acknowledged, s.generated, "{s:?}");
    let stored: u64 = (0..3).map(|i| cp.store.count(&format!("simp-{i:04}")).unwrap()).sum();
    assert_eq!(stored, s.generated);
    assert_eq!(cp.enrollment.list().len(), 3, "each process enrolled itself");
    cancel.cancel();
    cp.join().await.unwrap();
}
