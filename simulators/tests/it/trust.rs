//! Device identity at the trust boundary, on a real control plane: only enrolled devices get past the broker,
//! only a device's own key speaks for it, replays are not double counted, and revocation cuts a device off.

use crate::support::{start_cp, stored_seqs, wait_for};
use edgeloop_common::envelope::{self, Body, Envelope, Record, TelemetryBatch};
use edgeloop_simulators::device::{self, Connected};
use edgeloop_simulators::fleet::{self, FleetSpec};
use rumqttc::QoS;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const CLASS: &str = "city-air-quality";

fn batch(device: &str, from: u64, to: u64) -> Envelope {
    let records = (from..=to)
        .map(|seq| Record {
            seq,
            ts_ms: 1_700_000_000_000 + seq,
            sensor: "pm25".into(),
            features: vec![1.0; 4],
            score: None,
            flags: 0,
        })
        .collect();
    Envelope::new(device, to, 0, Body::Telemetry(TelemetryBatch { from, to, records }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenrolled_client_refused_by_broker() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let (_, outcome, task) = device::connect(cp.mqtt_addr.clone(), "stranger", None, None).await;
    assert!(matches!(outcome, Connected::Refused(_)), "{outcome:?}");
    task.abort();
    // Credentials of one device do not work under another client id, nor a guessed password.
    let key = device::new_key();
    let creds = device::enroll(&api, "dev-a", CLASS, &key).await.unwrap();
    let (_, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-b", Some(&creds), None).await;
    assert!(matches!(outcome, Connected::Refused(_)), "{outcome:?}");
    task.abort();
    let guessed = edgeloop_agent::identity::Credentials { username: "dev-a".into(), password: "hunter2".into() };
    let (_, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&guessed), None).await;
    assert!(matches!(outcome, Connected::Refused(_)), "{outcome:?}");
    task.abort();
    let (_, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&creds), None).await;
    assert_eq!(outcome, Connected::Yes);
    task.abort();
    cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_uplink_other_device_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let (key_a, key_b) = (device::new_key(), device::new_key());
    let creds_a = device::enroll(&api, "dev-a", CLASS, &key_a).await.unwrap();
    device::enroll(&api, "dev-b", CLASS, &key_b).await.unwrap();
    let (client, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&creds_a), None).await;
    assert_eq!(outcome, Connected::Yes);
    // A's own, properly signed: accepted.
    let mut own = batch("dev-a", 1, 5);
    own.sign(&key_a);
    client.publish("edgeloop/v1/dev-a/up/telemetry", QoS::AtLeastOnce, false, envelope::encode(&own)).await.unwrap();
    wait_for("A's records stored", Duration::from_secs(10), || cp.store.count("dev-a").unwrap() == 5).await;
    // Valid CBOR in B's name on B's topic, signed with A's own key: the broker's front closes A's connection
    // at that packet (ingest refuses the signature too: see the ingest unit test of the same name).
    let mut forged = batch("dev-b", 1, 5);
    forged.sign(&key_a);
    client.publish("edgeloop/v1/dev-b/up/telemetry", QoS::AtLeastOnce, false, envelope::encode(&forged)).await.unwrap();
    wait_for("A cut off at the front", Duration::from_secs(10), || cp.front.connections("dev-a") == 0).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cp.store.count("dev-b").unwrap(), 0, "nothing stored in B's name");
    assert_eq!(cp.metrics.records_ingested.get(), 5);
    task.abort();
    // A forged acknowledgement for B, which would make B delete records never stored, meets the same end.
    let (client, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&creds_a), None).await;
    assert_eq!(outcome, Connected::Yes);
    wait_for("A back", Duration::from_secs(10), || cp.front.connections("dev-a") == 1).await;
    let ack = envelope::encode(&Envelope::new("dev-b", 99, 0, Body::Ack(envelope::Ack { upto: 99, alerts: 0 })));
    client.publish("edgeloop/v1/dev-b/down/ack", QoS::AtLeastOnce, false, ack).await.unwrap();
    wait_for("A cut off again", Duration::from_secs(10), || cp.front.connections("dev-a") == 0).await;
    task.abort();
    cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_uplink_not_double_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let key = device::new_key();
    let creds = device::enroll(&api, "dev-a", CLASS, &key).await.unwrap();
    let (client, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&creds), None).await;
    assert_eq!(outcome, Connected::Yes);
    let mut env = batch("dev-a", 1, 10);
    env.sign(&key);
    let bytes = envelope::encode(&env);
    // The same signed message, captured and sent again three times.
    for _ in 0..4 {
        client.publish("edgeloop/v1/dev-a/up/telemetry", QoS::AtLeastOnce, false, bytes.clone()).await.unwrap();
    }
    wait_for("the replays counted as duplicates", Duration::from_secs(10), || {
        cp.registry.get("dev-a").is_some_and(|d| d.duplicates == 30)
    })
    .await;
    assert_eq!(stored_seqs(&api, "dev-a").await, (1..=10).collect::<Vec<u64>>());
    assert_eq!(cp.registry.get("dev-a").unwrap().records, 10);
    task.abort();
    cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cp_cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let mut class = edgeloop_simulators::class_config(CLASS).unwrap();
    class.uplink.ack_timeout_secs = 1;
    let mut spec =
        FleetSpec::new(vec![class], cp.mqtt_addr.clone(), &dir.path().join("agents"), cp.trusted_key.clone());
    spec.enroll_with(&api, 1).await.unwrap();
    let cancel = CancellationToken::new();
    let mut devices = fleet::start(&spec, 1, &cancel).await.unwrap();
    let id = devices[0].agent.device.clone();
    for s in devices[0].generator.take(50) {
        devices[0].samples.send(s).await.unwrap();
    }
    let outbox = devices[0].agent.outbox.clone();
    let counters = devices[0].agent.counters.clone();
    wait_for("first records acknowledged", Duration::from_secs(20), || outbox.stats().acked == 50).await;
    assert_eq!(cp.front.connections(&id), 1);

    let (status, body) = api.post_json(&format!("/api/v1/devices/{id}/revoke"), &serde_json::json!({})).await.unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["connections_cut"], 1);
    // The agent keeps collecting and retrying, but the broker refuses it and nothing more is stored.
    for s in devices[0].generator.take(50) {
        devices[0].samples.send(s).await.unwrap();
    }
    wait_for("the new records committed", Duration::from_secs(20), || outbox.stats().durable_seq == 100).await;
    // Two attempts to connect again, both refused: it keeps trying, and the broker keeps it out.
    let failed = counters.connect_failures.load(std::sync::atomic::Ordering::Relaxed);
    wait_for("two refused reconnects", Duration::from_secs(20), || {
        counters.connect_failures.load(std::sync::atomic::Ordering::Relaxed) >= failed + 2
    })
    .await;
    assert_eq!(cp.front.connections(&id), 0, "the broker does not let it back in");
    assert_eq!(cp.store.count(&id).unwrap(), 50);
    assert!(outbox.stats().acked == 50 && outbox.stats().durable_seq == 100, "{:?}", outbox.stats());
    let (_, enrolled) = api.get("/api/v1/enrollments").await.unwrap();
    assert!(enrolled.contains("\"revoked\":true"), "{enrolled}");
    // Revoking is for admins only.
    let store = edgeloop_control_plane::access::TokenStore::open(&dir.path().join("cp")).unwrap();
    let (_, op) = store.create("otto", edgeloop_control_plane::access::Role::Operator).unwrap();
    let auth = format!("Bearer {op}");
    let r = api
        .request("POST", &format!("/api/v1/devices/{id}/revoke"), &[("Authorization", &auth)], Some(b"{}"))
        .await
        .unwrap();
    assert_eq!(r.status, 403);

    cancel.cancel();
    for d in devices.drain(..) {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_wrong_ca_refused() {
    let dir = tempfile::tempdir().unwrap();
    let good = edgeloop_control_plane::access::certs::init(&dir.path().join("tls"), &[]).unwrap();
    let other = edgeloop_control_plane::access::certs::init(&dir.path().join("other"), &[]).unwrap();
    let tls = edgeloop_control_plane::config::TlsFiles { cert: good.cert.clone(), key: good.key.clone() };
    let (cp, cancel) = start_cp(dir.path(), move |c| c.tls = Some(tls)).await;
    let (ca, wrong_ca) = (std::fs::read(&good.ca).unwrap(), std::fs::read(&other.ca).unwrap());

    // HTTPS: plaintext is refused, the wrong CA fails the handshake, the right one works.
    let plaintext = crate::support::api(&cp).get("/api/v1/health").await;
    assert!(plaintext.is_err(), "plaintext to a TLS API");
    let wrong = edgeloop_simulators::http::Api::tls(cp.api_addr, &wrong_ca).unwrap();
    let e = wrong.get("/api/v1/health").await.unwrap_err();
    assert!(format!("{e:#}").contains("TLS"), "{e:#}");
    let api = crate::support::api_tls(&cp, &ca);
    let (status, _) = api.get("/api/v1/health").await.unwrap();
    assert_eq!(status, 200);

    // MQTT: an enrolled device that pins another CA never gets to CONNECT; with the right CA it does.
    let key = device::new_key();
    let creds = device::enroll(&api, "dev-a", CLASS, &key).await.unwrap();
    let (_, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&creds), Some(&wrong_ca)).await;
    assert!(
        matches!(&outcome, Connected::Refused(e) if e.to_lowercase().contains("certificate") || e.contains("Tls")),
        "{outcome:?}"
    );
    task.abort();
    let (_, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&creds), None).await;
    assert!(matches!(outcome, Connected::Refused(_)), "plaintext MQTT to a TLS listener: {outcome:?}");
    task.abort();
    let (_, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&creds), Some(&ca)).await;
    assert_eq!(outcome, Connected::Yes);
    task.abort();
    cancel.cancel();
    cp.join().await.unwrap();
}
