//! A raw simulated device: its own key, enrolled through the API, speaking MQTT directly. For tests and
//! tools that need to craft messages an agent would never send (junk, forgeries, replays).

use crate::http::Api;
use edgeloop_agent::identity::Credentials;
use ring::signature::Ed25519KeyPair;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};

/// A fresh Ed25519 key.
pub fn new_key() -> Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("the system RNG works");
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("a fresh key parses")
}

/// Creates an enrollment token for `class`, good for `uses` devices (`api` carries an admin token).
pub async fn enrollment_token(api: &Api, class: &str, uses: u32) -> anyhow::Result<String> {
    let body = serde_json::json!({"class": class, "uses": uses, "expires_in_secs": 3600});
    let (status, text) = api.post_json("/api/v1/enrollment-tokens", &body).await?;
    anyhow::ensure!(status == 201, "creating an enrollment token: HTTP {status}: {text}");
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v["token"].as_str().unwrap_or_default().to_string())
}

/// Enrolls `device` of `class` with `key`; returns its MQTT credentials.
pub async fn enroll(api: &Api, device: &str, class: &str, key: &Ed25519KeyPair) -> anyhow::Result<Credentials> {
    let token = enrollment_token(api, class, 1).await?;
    enroll_with_token(api, device, class, key, &token).await
}

/// Enrolls `device` of `class` with `key` and an existing enrollment token, in a request signed with `key`
/// and stamped now; returns its MQTT credentials.
pub async fn enroll_with_token(
    api: &Api,
    device: &str,
    class: &str,
    key: &Ed25519KeyPair,
    token: &str,
) -> anyhow::Result<Credentials> {
    let req = edgeloop_common::enroll::EnrollRequest::signed(key, device, class, token, edgeloop_common::unix_millis());
    let (status, text) = api.post_json("/api/v1/enroll", &serde_json::to_value(&req)?).await?;
    anyhow::ensure!(status == 200, "enrolling {device}: HTTP {status}: {text}");
    Ok(serde_json::from_str(&text)?)
}

/// How an MQTT connection attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connected {
    Yes,
    /// Refused or closed by the broker before CONNACK.
    Refused(String),
}

/// Connects a raw client; returns it once CONNACK arrives (or why not), with its event loop running.
pub async fn connect(
    mqtt: (String, u16),
    client_id: &str,
    credentials: Option<&Credentials>,
    tls_ca: Option<&[u8]>,
) -> (AsyncClient, Connected, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(client_id, mqtt.0, mqtt.1);
    opts.set_max_packet_size(1 << 20, 1 << 20);
    if let Some(ca) = tls_ca {
        let cfg = edgeloop_common::tls::client_config(ca).expect("a valid CA PEM");
        opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
            std::sync::Arc::new(cfg),
        )));
    }
    if let Some(c) = credentials {
        opts.set_credentials(c.username.clone(), c.password.clone());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(Connected::Yes);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(Connected::Refused(e.to_string()));
                    }
                    if tx.is_none() {
                        // Keep trying like a device would, quietly.
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    }
                }
            }
        }
    });
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(10), rx)
        .await
        .map(|r| r.unwrap_or(Connected::Refused("event loop ended".into())))
        .unwrap_or(Connected::Refused("no answer in 10 s".into()));
    (client, outcome, task)
}
