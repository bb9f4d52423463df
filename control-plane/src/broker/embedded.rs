//! The embedded MQTT broker (rumqttd).
//!
//! rumqttd's `Broker::start()` blocks forever and has no shutdown, so it runs on its own named thread for
//! the life of the process; [`start_on_loopback`] returns once that rumqttd answers on its port. Deployments
//! that need persistence, per-topic ACLs or clustering use an external broker instead (`mode = "external"`).

use anyhow::Context;
use edgeloop_common::envelope::DEFAULT_MAX_MESSAGE_BYTES;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, SegmentConfig, ServerSettings};
use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
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

/// How many loopback ports [`start_on_loopback`] tries before giving up.
const LOOPBACK_ATTEMPTS: usize = 5;

/// Starts rumqttd on a free loopback port and returns that port once this process's rumqttd answers there.
/// The port is found by binding port 0 and letting it go, so another process can take it before rumqttd binds
/// it; then rumqttd stops at once, or something else answers there. Either is noticed (see
/// [`start_embedded`]) and another port is tried: the control plane never logs in to a listener that is not
/// its own broker.
pub fn start_on_loopback(max_message_bytes: usize, admission: Admission) -> anyhow::Result<SocketAddr> {
    let mut failures = Vec::new();
    for _ in 0..LOOPBACK_ATTEMPTS {
        let listen = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        match start_embedded(listen, max_message_bytes, admission.clone()) {
            Ok(()) => return Ok(listen),
            Err(e) => {
                tracing::warn!(error = %e, "embedded broker: trying another loopback port");
                failures.push(format!("{e:#}"));
            }
        }
    }
    anyhow::bail!(
        "the embedded broker could not start on loopback after {LOOPBACK_ATTEMPTS} ports: {}",
        failures.join("; ")
    )
}

/// The client id of the login [`start_embedded`] sends to check that the broker answering is its own.
const PROBE_CLIENT: &str = "edgeloop-cp-start-probe";

/// Starts rumqttd on `listen` and waits until it is this rumqttd that answers there: a probe login reaches
/// its authentication (and is refused). Fails if rumqttd stops (its port taken), if something else answers,
/// or after 10 s. Every other CONNECT must carry credentials `admission` accepts.
fn start_embedded(listen: SocketAddr, max_message_bytes: usize, admission: Admission) -> anyhow::Result<()> {
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
    let probed = Arc::new(AtomicBool::new(false));
    let seen = probed.clone();
    server.set_auth_handler(move |client_id: String, user: String, pass: String| {
        if client_id == PROBE_CLIENT && user == PROBE_CLIENT {
            seen.store(true, Ordering::SeqCst);
            return std::future::ready(false);
        }
        let ok = admission(&client_id, &user, &pass);
        if !ok {
            tracing::warn!(%client_id, %user, "internal broker refused a login that is neither the front's nor the control plane's");
        }
        std::future::ready(ok)
    });
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
    let (stopped_tx, stopped) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            let mut broker = Broker::new(config);
            // rumqttd returns from `start` only when its listener thread has ended, e.g. failing to bind.
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
            let _ = stopped_tx.send(());
        })
        .context("spawning the broker thread")?;
    let target = if listen.ip().is_unspecified() { SocketAddr::from(([127, 0, 0, 1], listen.port())) } else { listen };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut probe: Option<TcpStream> = None;
    loop {
        if !matches!(stopped.try_recv(), Err(mpsc::TryRecvError::Empty)) {
            anyhow::bail!("the embedded broker stopped at once: it could not listen on {listen} (is the port taken?)");
        }
        if probed.load(Ordering::SeqCst) {
            tracing::info!(%listen, "embedded MQTT broker listening");
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(if probe.is_some() {
                format!("something other than the embedded broker answers on {listen}")
            } else {
                format!("the embedded broker did not start listening on {listen} within 10 s (is the port taken?)")
            });
        }
        if probe.is_none() {
            probe = TcpStream::connect_timeout(&target, Duration::from_millis(200)).ok().and_then(send_probe);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends the probe login on `stream`, which stays open while the broker reads it.
fn send_probe(mut stream: TcpStream) -> Option<TcpStream> {
    let mut packet = bytes::BytesMut::new();
    rumqttc::Connect::new(PROBE_CLIENT).set_login(PROBE_CLIENT, "").write(&mut packet).ok()?;
    stream.write_all(&packet).ok()?;
    Some(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit_all() -> Admission {
        Arc::new(|_: &str, _: &str, _: &str| true)
    }

    #[test]
    fn a_port_another_listener_holds_is_refused_and_a_free_one_is_found() {
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = squatter.local_addr().unwrap();
        let err = start_embedded(taken, DEFAULT_MAX_MESSAGE_BYTES, admit_all()).unwrap_err().to_string();
        assert!(err.contains(&taken.to_string()), "{err}");
        assert!(err.contains("stopped at once") || err.contains("something other"), "{err}");

        let port = start_on_loopback(DEFAULT_MAX_MESSAGE_BYTES, admit_all()).unwrap();
        assert_ne!(port, taken);
        assert!(TcpStream::connect(port).is_ok(), "the broker answers on {port}");
    }
}
