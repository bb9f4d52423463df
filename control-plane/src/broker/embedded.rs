//! The embedded MQTT broker (rumqttd).
//!
//! rumqttd's `Broker::start()` blocks forever and has no shutdown, so it runs on its own named thread for
//! the life of the process; [`start_embedded`] returns once the listener accepts connections. Deployments
//! that need persistence, per-topic ACLs or clustering use an external broker instead (`mode = "external"`).

use anyhow::Context;
use edgeloop_common::envelope::DEFAULT_MAX_MESSAGE_BYTES;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Memory the embedded broker may hold for the uplink subscription: how far ingest may lag behind the
/// fleet before the broker skips messages (which agents then resend).
pub const UPLINK_RING_BYTES: usize = 128 << 20;

/// The largest payload the embedded broker forwards: twice ingest's limit, so that an oversize message
/// still reaches ingest and is counted as `too_large` instead of vanishing at the broker.
pub fn broker_max_payload(max_message_bytes: usize) -> usize {
    2 * max_message_bytes.max(DEFAULT_MAX_MESSAGE_BYTES) + 1024
}

/// Who may connect: `(client id, username, password) -> admitted`.
pub type Admission = std::sync::Arc<dyn Fn(&str, &str, &str) -> bool + Send + Sync>;

/// Starts rumqttd on `listen` and waits until it accepts TCP connections. With `admission`, every CONNECT
/// must carry credentials it accepts.
pub fn start_embedded(
    listen: SocketAddr,
    max_message_bytes: usize,
    admission: Option<Admission>,
) -> anyhow::Result<()> {
    let mut server = ServerSettings {
        name: "edgeloop".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: 10_000,
            max_payload_size: broker_max_payload(max_message_bytes),
            max_inflight_count: 256,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    if let Some(admit) = admission {
        server.set_auth_handler(move |client_id: String, user: String, pass: String| {
            let ok = admit(&client_id, &user, &pass);
            if !ok {
                tracing::warn!(%client_id, %user, "internal broker refused a login that is neither the front's nor the control plane's");
            }
            std::future::ready(ok)
        });
    }
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 20_000,
            max_outgoing_packet_count: 1_000,
            // rumqttd keeps one in-memory ring of segments per subscription filter, and a subscriber that
            // falls further behind than the ring silently skips ahead. Per-device filters (acks) carry little,
            // so their ring is small; the control plane's single uplink filter carries the whole fleet, so its
            // ring must absorb a fleet-wide burst (see UPLINK_RING_BYTES). What is skipped anyway is never
            // acknowledged, and agents send it again.
            max_segment_size: broker_max_payload(max_message_bytes) + 4096,
            max_segment_count: 2,
            custom_segment: Some(HashMap::from([(
                edgeloop_common::topics::ALL_UPLINK.to_string(),
                SegmentConfig { max_segment_size: UPLINK_RING_BYTES / 4, max_segment_count: 4 },
            )])),
            ..Default::default()
        },
        v4: Some(HashMap::from([("edgeloop".to_string(), server)])),
        ..Default::default()
    };
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .context("spawning the broker thread")?;
    let target = if listen.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], listen.port())) } else { listen };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
            tracing::info!(%listen, "embedded MQTT broker listening");
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the embedded broker did not start listening on {listen} within 10 s (is the port taken?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
