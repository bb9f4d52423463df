//! Random bytes, oversize payloads and wrong protocol versions published straight to a device's uplink topic
//! are counted by reason, and good traffic keeps flowing.

use crate::support::{start_cp, stored_seqs, wait_for};
use edgeloop_common::envelope::{self, Body, Envelope, Status};
use edgeloop_simulators::device;
use edgeloop_simulators::fleet::{self, FleetSpec};
use rand::{Rng, SeedableRng};
use rumqttc::QoS;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_uplink_counted_and_good_traffic_flows() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |c| c.ingest.max_message_bytes = 64 * 1024).await;
    let api = crate::support::api(&cp);
    let cancel = CancellationToken::new();
    let mut class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    class.uplink.ack_timeout_secs = 1;
    let mut spec =
        FleetSpec::new(vec![class], cp.mqtt_addr.clone(), &dir.path().join("agents"), cp.trusted_key.clone());
    spec.enroll_with(&api, 1).await.unwrap();
    let mut devices = fleet::start(&spec, 1, &cancel).await.unwrap();
    let device = devices[0].agent.device.clone();

    // The attacker: an enrolled device of its own, publishing junk on its own topic (the broker's front lets a
    // device publish nowhere else); ingest refuses it by reason while the victim's traffic flows.
    let key = device::new_key();
    let creds = device::enroll(&api, "attacker", "city-air-quality", &key).await.unwrap();
    let (client, connected, el) = device::connect(cp.mqtt_addr.clone(), "attacker", Some(&creds), None).await;
    assert_eq!(connected, device::Connected::Yes);
    let topic = "edgeloop/v1/attacker/up/telemetry".to_string();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    const RANDOM: u64 = 20;
    for _ in 0..RANDOM {
        let len = rng.gen_range(1..200);
        let junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        client.publish(&topic, QoS::AtLeastOnce, false, junk).await.unwrap();
    }
    client.publish(&topic, QoS::AtLeastOnce, false, vec![0xa0u8; 100 * 1024]).await.unwrap();
    let mut v2 = Envelope::new("attacker", 1, 0, Body::Status(Status::default()));
    v2.v = 2;
    client.publish(&topic, QoS::AtLeastOnce, false, envelope::encode(&v2)).await.unwrap();

    // Good traffic, interleaved.
    for s in devices[0].generator.take(300) {
        devices[0].samples.send(s).await.unwrap();
    }
    let outbox = devices[0].agent.outbox.clone();
    wait_for("good records acknowledged", Duration::from_secs(30), || outbox.stats().acked == 300).await;
    wait_for("all junk counted", Duration::from_secs(10), || {
        ["malformed_cbor", "schema", "too_deep", "invalid", "too_large", "unsupported_version"]
            .iter()
            .map(|r| cp.metrics.rejected(r))
            .sum::<u64>()
            == RANDOM + 2
    })
    .await;

    let (status, text) = api.get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "edgeloop_messages_rejected_total{reason=\"too_large\"}"), 1, "{text}");
    assert_eq!(metric(&text, "edgeloop_messages_rejected_total{reason=\"unsupported_version\"}"), 1, "{text}");
    assert!(metric(&text, "edgeloop_messages_rejected_total{reason=\"malformed_cbor\"}") > 0, "{text}");
    assert_eq!(metric(&text, "edgeloop_records_ingested_total"), 300, "{text}");
    assert!(metric(&text, "edgeloop_acks_sent_total") > 0, "{text}");
    assert_eq!(stored_seqs(&api, &device).await.len(), 300);

    el.abort();
    cancel.cancel();
    for d in devices.drain(..) {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
