//! One enrolled device floods its own topics (junk, forged signatures, messages over its rate, maximum-size
//! messages) on a real control plane, after filling its update history with large reports; another device's
//! records keep being acknowledged within a bounded time while the flood runs.

use crate::support::{start_cp, wait_for};
use edgeloop_common::envelope::{self, Body, Envelope, Status, DEFAULT_MAX_MESSAGE_BYTES};
use edgeloop_common::update::{Phase, UpdateReport};
use edgeloop_simulators::device;
use edgeloop_simulators::fleet::{self, FleetSpec};
use ring::signature::Ed25519KeyPair;
use rumqttc::QoS;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const CLASS: &str = "city-air-quality";
/// How long the flood runs.
const FLOOD: Duration = Duration::from_secs(6);
/// The longest the other device may wait for an acknowledgement while it runs.
const ACK_WITHIN: Duration = Duration::from_secs(5);

fn report(seq: u64, reason_bytes: usize) -> Body {
    Body::Report(UpdateReport {
        seq,
        rollout: Some("r1".into()),
        sha256: "ab".repeat(32),
        phase: Phase::Failed,
        reason: "x".repeat(reason_bytes),
        active_sha256: None,
        shadow_agreement: None,
        anomaly_rate: None,
        baseline_anomaly_rate: None,
        p95_us: None,
        at_ms: seq,
        failure: None,
        component: Default::default(),
    })
}

fn signed(body: Body, seq: u64, key: &Ed25519KeyPair) -> Vec<u8> {
    let mut env = Envelope::new("flooder", seq, 0, body);
    env.sign(key);
    envelope::encode(&env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_device_does_not_delay_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);

    // The other device: a real agent.
    let cancel = CancellationToken::new();
    let mut class = edgeloop_simulators::class_config(CLASS).unwrap();
    class.uplink.ack_timeout_secs = 1;
    let mut spec =
        FleetSpec::new(vec![class], cp.mqtt_addr.clone(), &dir.path().join("agents"), cp.trusted_key.clone());
    spec.enroll_with(&api, 1).await.unwrap();
    let mut devices = fleet::start(&spec, 1, &cancel).await.unwrap();
    let outbox = devices[0].agent.outbox.clone();

    // The flooder: enrolled, with its own key, speaking MQTT directly on its own topics.
    let key = device::new_key();
    let creds = device::enroll(&api, "flooder", CLASS, &key).await.unwrap();
    let (client, connected, el) = device::connect(cp.mqtt_addr.clone(), "flooder", Some(&creds), None).await;
    assert_eq!(connected, device::Connected::Yes);
    // First, a full update history of large reports (150 KB each), all accepted.
    for seq in 1..=64 {
        let payload = signed(report(seq, 150_000), seq, &key);
        client.publish("edgeloop/v1/flooder/up/report", QoS::AtLeastOnce, false, payload).await.unwrap();
    }
    wait_for("the large reports handled", Duration::from_secs(60), || cp.metrics.update_reports.get() == 64).await;

    // Then the flood, about 1,000 messages a second, stopping by itself.
    let other = device::new_key();
    let flood = tokio::spawn(async move {
        let heartbeat = || Body::Status(Status { class: CLASS.into(), ..Default::default() });
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let (mut seq, mut each) = (100u64, 0u64);
        while started.elapsed() < FLOOD {
            tick.tick().await;
            for _ in 0..3 {
                seq += 1;
                each += 1;
                let t = |ch: &str| format!("edgeloop/v1/flooder/up/{ch}");
                client.publish(t("telemetry"), QoS::AtLeastOnce, false, vec![0x01]).await.unwrap();
                let own = signed(heartbeat(), seq, &key);
                client.publish(t("status"), QoS::AtLeastOnce, false, own).await.unwrap();
                let forged = signed(heartbeat(), seq, &other);
                client.publish(t("status"), QoS::AtLeastOnce, false, forged).await.unwrap();
            }
            if seq % 60 == 0 {
                // A maximum-size message: a signed report that fills the message limit.
                let mut big = signed(report(seq, DEFAULT_MAX_MESSAGE_BYTES - 1024), seq, &key);
                if big.len() > DEFAULT_MAX_MESSAGE_BYTES {
                    big = signed(report(seq, DEFAULT_MAX_MESSAGE_BYTES - 2048), seq, &key);
                }
                client.publish("edgeloop/v1/flooder/up/report", QoS::AtLeastOnce, false, big).await.unwrap();
            }
        }
        each
    });

    // Meanwhile the other device's records keep being acknowledged.
    let mut sent = 0u64;
    let mut rounds = 0;
    let mut slowest = Duration::ZERO;
    while !flood.is_finished() {
        for s in devices[0].generator.take(10) {
            devices[0].samples.send(s).await.unwrap();
        }
        sent += 10;
        let t0 = Instant::now();
        let deadline = t0 + ACK_WITHIN;
        while outbox.stats().acked < sent {
            assert!(
                Instant::now() < deadline,
                "records {sent} not acknowledged within {ACK_WITHIN:?} during the flood (acked: {}; round {rounds})",
                outbox.stats().acked
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slowest = slowest.max(t0.elapsed());
        rounds += 1;
    }
    let flooded = flood.await.unwrap(); // messages of each kind
    assert!(rounds >= 3, "only {rounds} rounds of acknowledgements during the flood");
    eprintln!("{rounds} rounds acknowledged during the flood, the slowest in {slowest:?}");

    // The flood was real: each kind was refused by reason, and the flooder was charged only for its own
    // messages (those over its rate), not for junk or forgeries on its topics.
    // Nearly all of it reaches ingest: under load the embedded broker may skip a subscriber's backlog, which
    // an agent would resend (see architecture.md), so the counts are not required to be exact.
    let reached = |reason| cp.metrics.rejected(reason) * 10 >= flooded * 9 && cp.metrics.rejected(reason) <= flooded;
    wait_for("the flood handled", Duration::from_secs(30), || {
        reached("schema")
            && reached("bad_signature")
            && cp.registry.get("flooder").is_some_and(|d| d.rejected == cp.metrics.rejected("rate_limited"))
    })
    .await;
    assert!(cp.metrics.rejected("rate_limited") > 0);
    let d = cp.registry.get("flooder").unwrap();
    let entry = serde_json::to_vec(&d).unwrap().len();
    assert!(entry < 128 * 1024, "the flooder's registry entry is {entry} bytes of JSON");

    el.abort();
    cancel.cancel();
    for d in devices.drain(..) {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}
