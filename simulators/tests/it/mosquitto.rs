//! An external broker: Debian's mosquitto with the ACL file `edgeloop-control-plane broker acl` writes.
//! Device A cannot publish to or read from device B's topics, and a fleet works normally through it.
//! `.ci/run` installs mosquitto; this test starts its own instance on a free loopback port.

use crate::support::{binary, start_cp};
use edgeloop_common::envelope::{Body, Envelope};
use edgeloop_simulators::fleet::{self, FleetSpec};
use edgeloop_simulators::free_port;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, SubAck};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub(crate) use edgeloop_simulators::mosquitto::Mosquitto;

/// A broker with a password file and the ACL file `edgeloop-control-plane broker acl` writes.
fn with_acl(dir: &Path) -> Mosquitto {
    let bin = edgeloop_simulators::mosquitto::binary().unwrap();
    let port = free_port().unwrap();
    let passwd = dir.join("passwd");
    std::fs::write(&passwd, "").unwrap();
    // The control plane's user exists before mosquitto starts (a SIGHUP before it has installed its
    // handlers would kill it).
    let ok = Command::new("mosquitto_passwd")
        .arg("-b")
        .arg(&passwd)
        .args(["edgeloop-control-plane", "cp-secret"])
        .status()
        .unwrap();
    assert!(ok.success());
    let out = Command::new(binary("edgeloop-control-plane"))
        .args(["broker", "acl", "--out"])
        .arg(dir.join("acl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nacl_file {}\npersistence false\nlog_dest stderr\n",
            passwd.display(),
            dir.join("acl").display()
        ),
    )
    .unwrap();
    Mosquitto::run(bin, &conf, dir, port, passwd).unwrap()
}

/// A broker with no access control at all: anyone may publish anywhere, as on a broker whose ACL is missing
/// or wrong.
fn open_broker(dir: &Path) -> Mosquitto {
    let bin = edgeloop_simulators::mosquitto::binary().unwrap();
    let port = free_port().unwrap();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\n"),
    )
    .unwrap();
    Mosquitto::run(bin, &conf, dir, port, dir.join("passwd")).unwrap()
}

/// Adds a user to the password file and makes mosquitto reload it.
fn add_user(m: &Mosquitto, user: &str, password: &str) {
    let ok = Command::new("mosquitto_passwd").arg("-b").arg(&m.passwd).args([user, password]).status().unwrap();
    assert!(ok.success());
    let ok = Command::new("kill").args(["-HUP", &m.child.id().to_string()]).status().unwrap();
    assert!(ok.success());
}

type Inbox = mpsc::UnboundedReceiver<(String, Vec<u8>)>;

/// A raw client that forwards every message it receives, and every SUBACK (see [`subscribe`]). It connects
/// again until the broker lets it in (a user just added is let in once mosquitto has reloaded its passwords).
async fn client(port: u16, user: &str, password: &str) -> (AsyncClient, Inbox, mpsc::UnboundedReceiver<SubAck>) {
    let mut opts = MqttOptions::new(user, "127.0.0.1", port);
    opts.set_credentials(user, password);
    let (c, mut el) = AsyncClient::new(opts, 64);
    let (tx, rx) = mpsc::unbounded_channel();
    let (subacks_tx, subacks) = mpsc::unbounded_channel();
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready_tx = Some(ready_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(r) = ready_tx.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    let _ = subacks_tx.send(s);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), ready).await.expect("no CONNACK").unwrap();
    (c, rx, subacks)
}

/// Subscribes and waits for the broker's SUBACK: from then on, what is published on `filter` reaches the
/// client (or, where the ACL forbids reading, is known not to).
async fn subscribe(c: &AsyncClient, subacks: &mut mpsc::UnboundedReceiver<SubAck>, filter: &str) {
    c.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    let ack = tokio::time::timeout(Duration::from_secs(10), subacks.recv()).await.expect("no SUBACK").unwrap();
    assert_eq!(ack.return_codes.len(), 1, "{ack:?}");
}

/// Takes messages from `rx` until `done` holds for all taken so far; fails after 10 s.
async fn take_until(rx: &mut Inbox, what: &str, done: impl Fn(&[(String, Vec<u8>)]) -> bool) -> Vec<(String, Vec<u8>)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done(&got) {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) => got.push(m),
            _ => panic!("timed out waiting for {what}; got {got:?}"),
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_acl_keeps_devices_to_their_own_topics() {
    let dir = tempfile::tempdir().unwrap();
    let m = with_acl(dir.path());
    add_user(&m, "dev-a", "pass-a");
    add_user(&m, "dev-b", "pass-b");
    let (cp, mut cp_rx, mut cp_subacks) = client(m.port, "edgeloop-control-plane", "cp-secret").await;
    let (a, mut a_rx, mut a_subacks) = client(m.port, "dev-a", "pass-a").await;
    let (b, mut b_rx, mut b_subacks) = client(m.port, "dev-b", "pass-b").await;
    subscribe(&cp, &mut cp_subacks, "edgeloop/v1/+/up/#").await;
    subscribe(&b, &mut b_subacks, "edgeloop/v1/dev-b/down/#").await;
    // A tries to listen in on B's downlink, and to speak on B's uplink.
    subscribe(&a, &mut a_subacks, "edgeloop/v1/dev-b/down/#").await;
    subscribe(&a, &mut a_subacks, "edgeloop/v1/+/down/#").await;
    a.publish("edgeloop/v1/dev-b/up/telemetry", QoS::AtLeastOnce, false, b"forged".to_vec()).await.unwrap();
    a.publish("edgeloop/v1/dev-a/up/telemetry", QoS::AtLeastOnce, false, b"mine".to_vec()).await.unwrap();
    cp.publish("edgeloop/v1/dev-b/down/ack", QoS::AtLeastOnce, false, b"for b".to_vec()).await.unwrap();
    // A marker on A's own downlink, after B's: once A has it, B's acknowledgement would have reached A before
    // it (mosquitto forwards one client's messages in order).
    cp.publish("edgeloop/v1/dev-a/down/ack", QoS::AtLeastOnce, false, b"for a".to_vec()).await.unwrap();
    b.publish("edgeloop/v1/dev-b/up/status", QoS::AtLeastOnce, false, b"b's own".to_vec()).await.unwrap();

    let has = |got: &[(String, Vec<u8>)], topic: &str, payload: &[u8]| {
        got.iter().any(|(t, p)| t == topic && p.as_slice() == payload)
    };
    // A's "forged" went out before its "mine": once "mine" is in, "forged" would be too.
    let at_cp = take_until(&mut cp_rx, "A's and B's own uplink at the control plane", |got| {
        has(got, "edgeloop/v1/dev-a/up/telemetry", b"mine") && has(got, "edgeloop/v1/dev-b/up/status", b"b's own")
    })
    .await;
    assert!(!at_cp.iter().any(|(_, p)| p == b"forged"), "A's publish on B's topic got through: {at_cp:?}");
    let at_b = take_until(&mut b_rx, "B's acknowledgement", |got| !got.is_empty()).await;
    assert_eq!(at_b, vec![("edgeloop/v1/dev-b/down/ack".into(), b"for b".to_vec())]);
    let at_a =
        take_until(&mut a_rx, "the marker on A's downlink", |got| has(got, "edgeloop/v1/dev-a/down/ack", b"for a"))
            .await;
    assert_eq!(at_a, vec![("edgeloop/v1/dev-a/down/ack".into(), b"for a".to_vec())], "A read B's downlink");
    // A user unknown to the broker is refused.
    let mut opts = MqttOptions::new("dev-c", "127.0.0.1", m.port);
    opts.set_credentials("dev-c", "guess");
    let (_c, mut el) = AsyncClient::new(opts, 8);
    assert!(tokio::time::timeout(Duration::from_secs(5), el.poll()).await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_works_through_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let m = with_acl(dir.path());
    std::fs::write(dir.path().join("cp.password"), "cp-secret").unwrap();
    let port = m.port;
    let pw = dir.path().join("cp.password");
    // The control plane's own link to the broker goes through a proxy that the test cuts while devices send:
    // nothing may be lost on that side either.
    let cancel = CancellationToken::new();
    let link =
        edgeloop_simulators::proxy::FaultProxy::start(([127, 0, 0, 1], port).into(), cancel.clone()).await.unwrap();
    let link_port = link.addr().port();
    let (cp, cp_cancel) = start_cp(dir.path(), move |c| {
        external_broker(c, link_port, std::fs::read_to_string(&pw).unwrap(), Default::default());
    })
    .await;
    let mut class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    class.uplink.ack_timeout_secs = 1;
    let mut spec =
        FleetSpec::new(vec![class], ("127.0.0.1".into(), port), &dir.path().join("agents"), cp.trusted_key.clone());
    spec.enroll_with(&crate::support::api(&cp), 2).await.unwrap();
    let mut devices = fleet::start(&spec, 2, &cancel).await.unwrap();
    // Enrollment gave each agent its credentials; the operator provisions them into the broker.
    for d in &devices {
        let creds = edgeloop_agent::identity::Credentials::load(
            &dir.path().join("agents").join(&d.agent.device).join("credentials.json"),
        )
        .unwrap()
        .unwrap();
        add_user(&m, &creds.username, &creds.password);
    }
    // 5 rounds of 20 samples per device; the control plane's link is cut after each of the first three.
    for round in 0..5 {
        for d in devices.iter_mut() {
            for s in d.generator.take(20) {
                d.samples.send(s).await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if round < 3 {
            link.cut_all();
        }
    }
    for d in &devices {
        let outbox = d.agent.outbox.clone();
        let log = dir.path().join("mosquitto.log");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while outbox.stats().acked < 100 {
            assert!(
                std::time::Instant::now() < deadline,
                "not acknowledged through mosquitto: {:?}\n{}",
                outbox.stats(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(cp.store.count(&d.agent.device).unwrap(), 100);
    }
    // The cuts reached the control plane: both its clients (ingest, rollouts) connected through the proxy
    // again after them (2 at start, then 2 per cut: 8 in every run seen).
    assert!(link.accepted() >= 6, "the control plane connected {} time(s) through the proxy", link.accepted());
    cancel.cancel();
    for d in devices.drain(..) {
        d.agent.join().await.unwrap();
    }
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

/// On a broker that lets anyone publish on a device's `down/ack` (no ACL, or a wrong one), forged
/// acknowledgements, unsigned or signed by a key the agent does not trust, delete nothing from its outbox;
/// the control plane's signed acknowledgement still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_ack_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = open_broker(dir.path());
    let signer =
        |_| edgeloop_common::signing::Signer::from_pkcs8(&edgeloop_common::signing::Signer::generate_pkcs8()).unwrap();
    let (control_plane, attacker) = (signer(0), signer(1));
    let class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    let spec = FleetSpec::new(
        vec![class],
        ("127.0.0.1".into(), broker.port),
        &dir.path().join("agents"),
        control_plane.trusted(None),
    );
    let cancel = CancellationToken::new();
    let mut devices = fleet::start(&spec, 1, &cancel).await.unwrap();
    let stop = CancellationToken::new();
    fleet::feed(&mut devices, 20, Some(Duration::from_millis(1500)), &stop, &mut |_, _| {}).await.unwrap();
    let outbox = devices[0].agent.outbox.clone();
    let counters = devices[0].agent.counters.clone();
    let id = devices[0].agent.device.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while outbox.stats().durable_seq < 20 {
        assert!(std::time::Instant::now() < deadline, "the agent committed no records");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let committed = outbox.stats().durable_seq;
    let (attacker_client, _rx, _subacks) = client(broker.port, "attacker", "x").await;
    let topic = format!("edgeloop/v1/{id}/down/ack");
    let ack = |upto: u64, by: Option<&edgeloop_common::signing::Signer>| {
        let mut env =
            Envelope::new(id.as_str(), upto, 0, Body::Ack(edgeloop_common::envelope::Ack { upto, alerts: 0 }));
        if let Some(s) = by {
            env.sign_by_control_plane(s);
        }
        edgeloop_common::envelope::encode(&env)
    };
    // The unsigned acknowledgement of the old protocol, retained so that it also meets every reconnect, and
    // one signed with a key the agent does not trust.
    attacker_client.publish(&topic, QoS::AtLeastOnce, true, ack(committed, None)).await.unwrap();
    attacker_client.publish(&topic, QoS::AtLeastOnce, false, ack(committed, Some(&attacker))).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while counters.acks_refused.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        assert!(std::time::Instant::now() < deadline, "the forged acknowledgements never reached the agent");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = outbox.stats();
    assert_eq!(stats.acked, 0, "a forged acknowledgement deleted records: {stats:?}");
    assert!(stats.depth >= committed, "{stats:?}");
    // The same acknowledgement signed by the control plane's key is applied.
    attacker_client.publish(&topic, QoS::AtLeastOnce, false, ack(committed, Some(&control_plane))).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while outbox.stats().acked < committed {
        assert!(std::time::Instant::now() < deadline, "the signed acknowledgement was not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cancel.cancel();
    for d in devices {
        d.agent.join().await.unwrap();
    }
}

/// Decommissioning a device (`DELETE /api/v1/devices/{id}`) revokes it, forgets it, and clears its retained
/// desired state on the broker: a subscriber to its topic gets nothing afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_device_is_revoked_forgotten_and_its_desired_state_cleared() {
    let dir = tempfile::tempdir().unwrap();
    let m = with_acl(dir.path());
    let port = m.port;
    let (cp, cp_cancel) = start_cp(dir.path(), move |c| {
        c.rollouts.tick_ms = 50;
        external_broker(c, port, "cp-secret".into(), Default::default());
    })
    .await;
    let api = crate::support::api(&cp);
    let class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    let updates = edgeloop_simulators::rollouts::updater_config(&api).await.unwrap();
    let mut spec = FleetSpec::new(
        vec![class.clone()],
        ("127.0.0.1".into(), port),
        &dir.path().join("agents"),
        cp.trusted_key.clone(),
    );
    spec.customise = std::sync::Arc::new(move |c| c.updates = Some(updates.clone()));
    spec.enroll_with(&api, 1).await.unwrap();
    let cancel = CancellationToken::new();
    let mut devices = fleet::start(&spec, 1, &cancel).await.unwrap();
    let id = devices[0].agent.device.clone();
    let creds =
        edgeloop_agent::identity::Credentials::load(&dir.path().join("agents").join(&id).join("credentials.json"))
            .unwrap()
            .unwrap();
    add_user(&m, &creds.username, &creds.password);
    for s in devices[0].generator.take(5) {
        devices[0].samples.send(s).await.unwrap();
    }
    crate::support::wait_for("the device registered", Duration::from_secs(30), || {
        cp.registry.get(&id).is_some_and(|d| d.class == "city-air-quality")
    })
    .await;
    edgeloop_simulators::rollouts::upload_reference_model(&api, "city-air-quality", &class, 1e9).await.unwrap();
    let req = serde_json::json!({"model": "city-air-quality", "version": 1, "stages": [{"name": "all", "share": {"percent": 100.0}}]});
    edgeloop_simulators::rollouts::create(&api, &req).await.unwrap();
    crate::support::wait_for("a desired state issued", Duration::from_secs(30), || {
        cp.rollouts.issued(&id).unwrap().is_some()
    })
    .await;
    // The agent stops; the broker still holds its retained desired state.
    cancel.cancel();
    devices.pop().unwrap().agent.join().await.unwrap();
    let topic = format!("edgeloop/v1/{id}/down/desired");
    let (c, mut rx, mut subacks) = client(port, &creds.username, &creds.password).await;
    subscribe(&c, &mut subacks, &topic).await;
    let got = take_until(&mut rx, "the retained desired state", |g| !g.is_empty()).await;
    assert!(!got[0].1.is_empty());

    let r = api.request("DELETE", &format!("/api/v1/devices/{id}"), &[], None).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let body: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    assert_eq!(
        (body["enrollment_revoked"].as_bool(), body["desired_cleared"].as_bool()),
        (Some(true), Some(true)),
        "{body}"
    );
    // The subscriber sees the topic cleared (an empty message), and a new one finds nothing retained.
    let cleared = take_until(&mut rx, "the cleared desired state", |g| g.iter().any(|(_, p)| p.is_empty())).await;
    assert!(cleared.iter().all(|(t, _)| *t == topic));
    let (c2, mut rx2, mut subacks2) = client(port, &creds.username, &creds.password).await;
    subscribe(&c2, &mut subacks2, &topic).await;
    assert!(tokio::time::timeout(Duration::from_secs(2), rx2.recv()).await.is_err(), "nothing retained any more");
    // Forgotten: not in the fleet, no desired state to publish again at a restart; revoked; audited.
    assert_eq!(api.get(&format!("/api/v1/devices/{id}")).await.unwrap().0, 404);
    assert!(cp.rollouts.issued(&id).unwrap().is_none());
    let enrolled: serde_json::Value = api.get_json("/api/v1/enrollments").await.unwrap();
    let me = enrolled.as_array().unwrap().iter().find(|e| e["device"] == id.as_str()).unwrap().clone();
    assert_eq!(me["revoked"], true, "{me}");
    let audit: Vec<edgeloop_control_plane::access::AuditEntry> = api.get_json("/api/v1/audit").await.unwrap();
    assert!(audit.iter().any(|e| e.action == format!("DELETE /api/v1/devices/{id}")), "{audit:?}");
    // An unknown device is a 404 (a second DELETE of this one answers 200 again: it is idempotent); a bad id a 400.
    assert_eq!(api.request("DELETE", &format!("/api/v1/devices/{id}-x"), &[], None).await.unwrap().status, 404);
    assert_eq!(api.request("DELETE", "/api/v1/devices/bad%20id", &[], None).await.unwrap().status, 400);
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

/// Points `c` at the external broker on loopback `port`, logging in as `edgeloop-control-plane` with
/// `password`, plaintext.
fn external_broker(
    c: &mut edgeloop_control_plane::config::Config,
    port: u16,
    password: String,
    provisioning: edgeloop_control_plane::config::Provisioning,
) {
    c.broker = edgeloop_control_plane::config::BrokerConfig::External {
        url: format!("mqtt://127.0.0.1:{port}"),
        username: Some("edgeloop-control-plane".into()),
        password_file: None,
        ca_file: None,
        provisioning,
        shared_group: None,
    };
    (c.mqtt_host, c.mqtt_port) = ("127.0.0.1".into(), port);
    c.external = edgeloop_control_plane::config::ExternalLogin {
        username: Some("edgeloop-control-plane".into()),
        password: Some(password),
        transport: edgeloop_common::tls::Transport::Plain,
    };
}

/// A control plane on `m` that provisions devices into its dynamic-security plugin.
async fn dynsec_cp(dir: &Path, port: u16) -> (edgeloop_control_plane::ControlPlaneHandle, CancellationToken) {
    start_cp(dir, move |c| {
        external_broker(c, port, "cp-secret".into(), edgeloop_control_plane::config::Provisioning::MosquittoDynsec);
    })
    .await
}

/// Enrollment alone lets a device in: no password file, no `mosquitto_passwd`, no reload. Its telemetry is
/// stored and acknowledged through mosquitto; its credentials work only with its own client id; enrolling
/// again replaces its password at the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolled_device_admitted_by_mosquitto_dynsec() {
    use edgeloop_simulators::device::{self, Connected};
    let dir = tempfile::tempdir().unwrap();
    let m = Mosquitto::start_dynsec(dir.path()).unwrap();
    let (cp, cp_cancel) = dynsec_cp(dir.path(), m.port).await;
    let mut class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    class.uplink.ack_timeout_secs = 1;
    let mut spec =
        FleetSpec::new(vec![class], ("127.0.0.1".into(), m.port), &dir.path().join("agents"), cp.trusted_key.clone());
    spec.enroll_with(&crate::support::api(&cp), 1).await.unwrap();
    let cancel = CancellationToken::new();
    let mut devices = fleet::start(&spec, 1, &cancel).await.unwrap();
    for s in devices[0].generator.take(50) {
        devices[0].samples.send(s).await.unwrap();
    }
    let (id, outbox) = (devices[0].agent.device.clone(), devices[0].agent.outbox.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while outbox.stats().acked < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "not acknowledged through mosquitto: {:?}\n{}",
            outbox.stats(),
            std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cp.store.count(&id).unwrap(), 50);
    cancel.cancel();
    devices.pop().unwrap().agent.join().await.unwrap();

    // A device of its own, enrolled by hand: its password works only under its own client id.
    let api = crate::support::api(&cp);
    let key = device::new_key();
    let first = device::enroll(&api, "press-07", "city-air-quality", &key).await.unwrap();
    let broker = ("127.0.0.1".to_string(), m.port);
    let (_c, got, task) = device::connect(broker.clone(), "press-07", Some(&first), None).await;
    assert_eq!(got, Connected::Yes);
    task.abort();
    let (_c, got, task) = device::connect(broker.clone(), "not-press-07", Some(&first), None).await;
    assert!(matches!(got, Connected::Refused(_)), "{got:?}");
    task.abort();
    // Enrolling again (a lost credentials file) replaces the password at the broker too.
    let second = device::enroll(&api, "press-07", "city-air-quality", &key).await.unwrap();
    assert_ne!(first.password, second.password);
    let (_c, got, task) = device::connect(broker.clone(), "press-07", Some(&first), None).await;
    assert!(matches!(got, Connected::Refused(_)), "the old password still works: {got:?}");
    task.abort();
    let (_c, got, task) = device::connect(broker.clone(), "press-07", Some(&second), None).await;
    assert_eq!(got, Connected::Yes);
    task.abort();
    // A device enrolling under the name of a user an operator made by hand does not take it over: the
    // enrollment is refused at the broker, and the user's password still works.
    let token = device::enrollment_token(&api, "city-air-quality", 1).await.unwrap();
    let req = edgeloop_common::enroll::EnrollRequest::signed(
        &device::new_key(),
        "ops",
        "city-air-quality",
        &token,
        edgeloop_common::unix_millis(),
    );
    let (status, text) = api.post_json("/api/v1/enroll", &serde_json::to_value(&req).unwrap()).await.unwrap();
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("is not this device's"), "{text}");
    let ops = edgeloop_agent::identity::Credentials { username: "ops".into(), password: "ops-secret".into() };
    let (_c, got, task) = device::connect(broker, "any-client-id", Some(&ops), None).await;
    assert_eq!(got, Connected::Yes, "the hand-made user lost its login");
    task.abort();
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

/// Revoking a device disables its client in mosquitto, which disconnects it at once and refuses it from
/// then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_kicked_by_mosquitto_dynsec() {
    use edgeloop_simulators::device::{self, Connected};
    let dir = tempfile::tempdir().unwrap();
    let m = Mosquitto::start_dynsec(dir.path()).unwrap();
    let (cp, cp_cancel) = dynsec_cp(dir.path(), m.port).await;
    let api = crate::support::api(&cp);
    let creds = device::enroll(&api, "press-08", "city-air-quality", &device::new_key()).await.unwrap();
    // A connected device that notices when the broker drops it.
    let mut opts = MqttOptions::new("press-08", "127.0.0.1", m.port);
    opts.set_credentials(creds.username.clone(), creds.password.clone());
    let (_client, mut el) = AsyncClient::new(opts, 8);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let e = el.poll().await;
            let stop = e.is_err();
            let _ = events_tx.send(e.map(|e| format!("{e:?}")).map_err(|e| e.to_string()));
            if stop {
                return;
            }
        }
    });
    let connected = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(e) = events.recv().await {
            if e.as_deref().is_ok_and(|e| e.contains("ConnAck")) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(connected, Ok(true), "the enrolled device never got in");

    let (status, text) = api.post_json("/api/v1/devices/press-08/revoke", &serde_json::json!({})).await.unwrap();
    assert_eq!(status, 200, "{text}");
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["broker_disabled"], true, "{body}");
    let dropped = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Some(Err(e)) => return e,
                Some(Ok(_)) => continue,
                None => return "event loop ended".into(),
            }
        }
    })
    .await
    .expect("the revoked device is still connected 10 s after its revocation");
    assert!(!dropped.is_empty());
    let (_c, got, task) = device::connect(("127.0.0.1".into(), m.port), "press-08", Some(&creds), None).await;
    assert!(matches!(got, Connected::Refused(_)), "a revoked device got in again: {got:?}");
    task.abort();
    cp_cancel.cancel();
    cp.join().await.unwrap();
}

/// Two control-plane processes share ingest through mosquitto (`$share/ingest/...`), on one PostgreSQL, with
/// one signing key; devices enroll through the first and are provisioned into mosquitto's dynamic security.
/// While the fleet streams, the second is SIGKILLed, then started again. Every record is acknowledged and
/// stored once: nothing lost, nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_killed_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = crate::cluster::Cluster::start(dir.path());
    let m = &c.mosquitto;
    let pg = &c.pg;
    let signer = &c.signer;
    let (mut a, api_a) = c.first_replica(&crate::cluster::Opts::default()).await;
    let (mut b, api_b) = c.replica("b", &crate::cluster::Opts::default()).await;

    let mut class = edgeloop_simulators::class_config("city-air-quality").unwrap();
    class.uplink.ack_timeout_secs = 1;
    let mut spec =
        FleetSpec::new(vec![class], ("127.0.0.1".into(), m.port), &dir.path().join("agents"), signer.trusted(None));
    spec.enroll_with(&api_a, 4).await.unwrap();
    let cancel = CancellationToken::new();
    let mut devices = fleet::start(&spec, 4, &cancel).await.unwrap();
    let ingested = |api: &edgeloop_simulators::http::Api| {
        let api = api.clone();
        async move {
            let (_, text) = api.get("/metrics").await.unwrap_or_default();
            text.lines()
                .find(|l| l.starts_with("edgeloop_records_ingested_total"))
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        }
    };
    for round in 0..6 {
        for d in devices.iter_mut() {
            for s in d.generator.take(50) {
                d.samples.send(s).await.unwrap();
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if round == 2 {
            // Both replicas have been taking a share before B dies.
            let b_share = ingested(&api_b).await;
            assert!(
                b_share > 0.0,
                "B ingested nothing before its kill; the broker did not share the uplink\nmetrics: {:?}\nB: {}\nmosquitto: {}",
                api_b.get("/metrics").await.map(|(s, t)| (s, t.lines().filter(|l| l.contains("ingested")).collect::<Vec<_>>().join("\n"))),
                std::fs::read_to_string(dir.path().join("b.log")).unwrap_or_default(),
                std::fs::read_to_string(dir.path().join("mosquitto.log")).unwrap_or_default()
            );
            assert!(ingested(&api_a).await > 0.0, "A ingested nothing");
            b.sigkill();
        }
        if round == 4 {
            b.start();
        }
    }
    for d in &devices {
        let outbox = d.agent.outbox.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while outbox.stats().acked < 300 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} not acknowledged: {:?}\nA: {}\nB: {}",
                d.agent.device,
                outbox.stats(),
                std::fs::read_to_string(dir.path().join("a.log")).unwrap_or_default(),
                std::fs::read_to_string(dir.path().join("b.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Stored once each: 300 records per device, seqs 1..=300, nothing lost and nothing twice.
    for d in &devices {
        let id = &d.agent.device;
        let got =
            pg.psql(&format!("SELECT count(*), min(seq), max(seq) FROM telemetry WHERE device = '{id}'")).unwrap();
        assert_eq!(got, "300|1|300", "{id}");
        assert_eq!(pg.psql(&format!("SELECT upto FROM watermarks WHERE device = '{id}'")).unwrap(), "300", "{id}");
    }
    cancel.cancel();
    for d in devices.drain(..) {
        d.agent.join().await.unwrap();
    }
    a.sigterm();
    b.sigterm();
}
