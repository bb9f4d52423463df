//! The embedded broker's front door against an enrolled device that attacks others: wills on other devices'
//! topics, retained messages, and rumqttd's own loopback port.

use crate::support::{start_cp, wait_for};
use edgeloop_common::envelope::{self, Ack, Body, Envelope, Status};
use edgeloop_simulators::device::{self, Connected};
use rumqttc::{AsyncClient, ConnectionError, Event, LastWill, MqttOptions, Packet, QoS};
use std::time::Duration;

const CLASS: &str = "city-air-quality";

/// Connects `id` with `creds` and an optional will; returns the client and whether the broker accepted it.
async fn connect_with_will(
    addr: (String, u16),
    id: &str,
    creds: &edgeloop_agent::identity::Credentials,
    will: Option<LastWill>,
) -> (AsyncClient, Result<(), String>, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(id, addr.0, addr.1);
    opts.set_credentials(creds.username.clone(), creds.password.clone());
    if let Some(w) = will {
        opts.set_last_will(w);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            let r = eventloop.poll().await;
            let outcome = match &r {
                Ok(Event::Incoming(Packet::ConnAck(_))) => Some(Ok(())),
                Err(ConnectionError::ConnectionRefused(code)) => Some(Err(format!("{code:?}"))),
                Err(e) => Some(Err(e.to_string())),
                Ok(_) => None,
            };
            if let (Some(o), Some(t)) = (outcome, tx.take()) {
                let _ = t.send(o);
            }
            if r.is_err() {
                return;
            }
        }
    });
    let outcome = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .map(|r| r.unwrap_or(Err("event loop ended".into())))
        .unwrap_or(Err("no answer in 10 s".into()));
    (client, outcome, task)
}

fn forged_ack(victim: &str, upto: u64) -> Vec<u8> {
    envelope::encode(&Envelope::new(victim, upto, 0, Body::Ack(Ack { upto, alerts: 0 })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_on_another_devices_topic_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let (key_a, key_b) = (device::new_key(), device::new_key());
    let creds_a = device::enroll(&api, "dev-a", CLASS, &key_a).await.unwrap();
    let creds_b = device::enroll(&api, "dev-b", CLASS, &key_b).await.unwrap();
    // The victim listens on its acknowledgement topic, as its agent does.
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut opts = MqttOptions::new("dev-b", cp.mqtt_addr.0.clone(), cp.mqtt_addr.1);
    opts.set_credentials(creds_b.username.clone(), creds_b.password.clone());
    let (victim, mut el) = AsyncClient::new(opts, 16);
    let listen = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = seen_tx.send(p.topic);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    victim.subscribe("edgeloop/v1/dev-b/down/ack", QoS::AtLeastOnce).await.unwrap();
    wait_for("the victim connected", Duration::from_secs(10), || cp.front.connections("dev-b") == 1).await;

    let attacks = [
        LastWill::new("edgeloop/v1/dev-b/down/ack", forged_ack("dev-b", 1_000_000), QoS::AtLeastOnce, true),
        LastWill::new("edgeloop/v1/dev-b/down/ack", forged_ack("dev-b", 1_000_000), QoS::AtLeastOnce, false),
        LastWill::new("edgeloop/v1/dev-b/up/status", vec![0u8; 8], QoS::AtLeastOnce, false),
        LastWill::new("edgeloop/v1/dev-a/up/status", vec![0u8; 8], QoS::AtLeastOnce, true),
    ];
    for will in attacks {
        let topic = will.topic.clone();
        let (_c, outcome, task) = connect_with_will(cp.mqtt_addr.clone(), "dev-a", &creds_a, Some(will)).await;
        assert!(outcome.is_err(), "a CONNECT with a will on {topic} was accepted");
        task.abort();
    }
    // A will on its own status topic, not retained, is allowed: the rules are the publish rules.
    let mut status = Envelope::new("dev-a", 1, 0, Body::Status(Status { class: CLASS.into(), ..Default::default() }));
    status.sign(&key_a);
    let own = LastWill::new("edgeloop/v1/dev-a/up/status", envelope::encode(&status), QoS::AtLeastOnce, false);
    let (_c, outcome, task) = connect_with_will(cp.mqtt_addr.clone(), "dev-a", &creds_a, Some(own)).await;
    assert_eq!(outcome, Ok(()));
    wait_for("A connected", Duration::from_secs(10), || cp.front.connections("dev-a") == 1).await;
    // Dropping the connection without DISCONNECT fires the will: it lands on A's own topic only.
    task.abort();
    cp.front.cut("dev-a");
    wait_for("A's will ingested under its own name", Duration::from_secs(10), || {
        cp.registry.get("dev-a").is_some_and(|d| d.last_status.is_some())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(seen.try_recv().ok(), None, "something was published on the victim's ack topic");
    assert!(cp.registry.get("dev-b").is_none_or(|d| d.last_status.is_none()), "a status landed in B's name");
    listen.abort();
    cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_retained_publish_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let key = device::new_key();
    let creds = device::enroll(&api, "dev-a", CLASS, &key).await.unwrap();
    let (client, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&creds), None).await;
    assert_eq!(outcome, Connected::Yes);
    wait_for("A connected", Duration::from_secs(10), || cp.front.connections("dev-a") == 1).await;
    let mut status = Envelope::new("dev-a", 1, 0, Body::Status(Status { class: CLASS.into(), ..Default::default() }));
    status.sign(&key);
    // A large retained message would stay in the broker after the device left; it is refused at the front
    // and the connection closed.
    client.publish("edgeloop/v1/dev-a/up/status", QoS::AtLeastOnce, true, envelope::encode(&status)).await.unwrap();
    wait_for("A cut off at the front", Duration::from_secs(10), || cp.front.connections("dev-a") == 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(cp.registry.get("dev-a").is_none_or(|d| d.last_status.is_none()), "the retained publish was forwarded");
    task.abort();
    // The same message, not retained, goes through.
    let (client, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&creds), None).await;
    assert_eq!(outcome, Connected::Yes);
    client.publish("edgeloop/v1/dev-a/up/status", QoS::AtLeastOnce, false, envelope::encode(&status)).await.unwrap();
    wait_for("the status ingested", Duration::from_secs(10), || {
        cp.registry.get("dev-a").is_some_and(|d| d.last_status.is_some())
    })
    .await;
    task.abort();
    cancel.cancel();
    cp.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_connection_to_the_internal_broker_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let key = device::new_key();
    let creds = device::enroll(&api, "dev-a", CLASS, &key).await.unwrap();
    let internal = cp.internal_broker.expect("the embedded broker's loopback port");
    let internal = (internal.ip().to_string(), internal.port());
    // The device's own, valid credentials, straight to rumqttd: refused.
    let (_, outcome, task) = device::connect(internal.clone(), "dev-a", Some(&creds), None).await;
    assert!(matches!(outcome, Connected::Refused(_)), "{outcome:?}");
    task.abort();
    // Nor does rumqttd take a client that claims the front's or the control plane's username.
    for user in [edgeloop_control_plane::broker::FRONT_USER, edgeloop_control_plane::SERVICE_USER] {
        let guess = edgeloop_agent::identity::Credentials { username: user.into(), password: creds.password.clone() };
        let (_, outcome, task) = device::connect(internal.clone(), "dev-a", Some(&guess), None).await;
        assert!(matches!(outcome, Connected::Refused(_)), "{user}: {outcome:?}");
        task.abort();
    }
    // Through the front the same credentials work.
    let (_, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&creds), None).await;
    assert_eq!(outcome, Connected::Yes);
    task.abort();
    cancel.cancel();
    cp.join().await.unwrap();
}

/// Each subscription filter costs the broker memory for as long as it lives; a device may hold only the two
/// the protocol names, so thousands of invented ones never reach rumqttd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_subscription_filters_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let key = device::new_key();
    let creds = device::enroll(&api, "dev-a", CLASS, &key).await.unwrap();
    let (client, outcome, task) = device::connect(cp.mqtt_addr.clone(), "dev-a", Some(&creds), None).await;
    assert_eq!(outcome, Connected::Yes);
    client.subscribe("edgeloop/v1/dev-a/down/ack", QoS::AtLeastOnce).await.unwrap();
    client.subscribe("edgeloop/v1/dev-a/down/desired", QoS::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cp.front.connections("dev-a"), 1, "the protocol's own subscriptions pass");
    client.subscribe("edgeloop/v1/dev-a/down/n00001", QoS::AtMostOnce).await.unwrap();
    wait_for("A cut off at the front", Duration::from_secs(10), || cp.front.connections("dev-a") == 0).await;
    task.abort();
    cancel.cancel();
    cp.join().await.unwrap();
}
