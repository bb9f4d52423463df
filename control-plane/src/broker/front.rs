//! The broker's front door: the listener devices connect to, in front of the embedded rumqttd.
//!
//! rumqttd runs on a loopback port of its own and has no topic rules. This front accepts device connections
//! (TLS is terminated here when configured, with a handshake deadline so that a stalled client cannot hold
//! up others) and decodes every packet a device sends with rumqttc's MQTT 3.1.1 codec (`mqttbytes`). It
//! forwards to rumqttd only what it decoded and checked, re-encoded by the same codec, so that rumqttd never
//! parses bytes the front did not understand:
//! - the CONNECT: the device is admitted here (enrolled, not revoked, password matching), its will obeys the
//!   publish rules below, and its credentials are replaced by this process's secret, the only device login
//!   rumqttd accepts ([`Gate`]);
//! - each PUBLISH: only to the device's own `up/telemetry`, `up/status`, `up/report`, `up/logs` or `up/alerts`,
//!   never retained;
//! - each SUBSCRIBE: only to the device's own `down/ack`, `down/desired`, `down/config` and `down/agent`.
//!
//! The first packet that breaks a rule closes the connection. The front keeps every live connection by
//! client id, so that revoking a device cuts its connection at once ([`Front::cut`]).

use crate::broker::embedded::Admission;
use bytes::BytesMut;
use edgeloop_common::topics::{self, Channel};
use rumqttc::mqttbytes::v4::{ConnAck, Connect, ConnectReturnCode, Login, Packet};
use rumqttc::mqttbytes::Protocol;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

/// How long a client may take to complete TLS and send CONNECT.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(10);
/// Largest CONNECT packet accepted (client id, credentials, will).
const MAX_CONNECT_BYTES: usize = 16 * 1024;
/// The MQTT username under which the front forwards admitted devices to rumqttd.
pub const FRONT_USER: &str = "edgeloop-front";
/// Client ids of the control plane's own MQTT clients; no device may connect under one.
pub const RESERVED_CLIENT_PREFIX: &str = "edgeloop-cp-";

/// What the front lets through.
pub struct Gate {
    /// Who may connect: `(client id, username, password) -> admitted`. `None` admits every client (the
    /// `devices.require_enrollment = false` switch); the topic rules hold either way.
    pub admission: Option<Admission>,
    /// The username and secret the front logs devices in to rumqttd with.
    pub forward_as: (String, String),
    /// The largest packet a device may send (a telemetry batch is at most `ingest.max_message_bytes`).
    pub max_packet_bytes: usize,
}

#[derive(Default)]
pub struct Front {
    conns: Mutex<HashMap<String, Vec<(u64, AbortHandle)>>>,
    next: std::sync::atomic::AtomicU64,
}

impl Front {
    /// Closes every connection of `client_id`; returns how many there were.
    pub fn cut(&self, client_id: &str) -> usize {
        let handles = self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(client_id).unwrap_or_default();
        for (_, h) in &handles {
            h.abort();
        }
        handles.len()
    }

    /// Live connections of a client id.
    pub fn connections(&self, client_id: &str) -> usize {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).get(client_id).map_or(0, Vec::len)
    }

    fn add(&self, client_id: &str, h: AbortHandle) -> u64 {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).entry(client_id.to_string()).or_default().push((n, h));
        n
    }

    fn remove(&self, client_id: &str, n: u64) {
        let mut c = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = c.get_mut(client_id) {
            v.retain(|(k, _)| *k != n);
            if v.is_empty() {
                c.remove(client_id);
            }
        }
    }
}

/// Why a device's packet was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    Publish(String),
    Retained(String),
    Subscribe(String),
    Will(String),
    Malformed(String),
    Unexpected(&'static str),
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Publish(t) => {
                write!(
                    f,
                    "publish to `{t}`, which is not its own up/telemetry, up/status, up/report, up/logs or up/alerts"
                )
            }
            Violation::Retained(t) => write!(f, "retained publish to `{t}`: devices may not retain messages"),
            Violation::Subscribe(t) => {
                write!(
                    f,
                    "subscription to `{t}`, which is not its own down/ack, down/desired, down/config or down/agent"
                )
            }
            Violation::Will(why) => write!(f, "will refused: {why}"),
            Violation::Malformed(w) => write!(f, "malformed packet: {w}"),
            Violation::Unexpected(what) => write!(f, "a client may not send {what}"),
        }
    }
}

impl std::error::Error for Violation {}

/// Why the front closed a device's connection, or screened a stream out.
#[derive(Debug, thiserror::Error)]
pub enum Closed {
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    #[error("TLS handshake took too long")]
    TlsTimeout,
    #[error("no CONNECT in time")]
    NoConnect,
    #[error("the first packet is not CONNECT")]
    NotConnect,
    /// `check_connect` refused it (the client was sent a refusing CONNACK).
    #[error("{0}")]
    Refused(String),
    /// A packet that does not decode or breaks the topic rules.
    #[error(transparent)]
    Violation(#[from] Violation),
    #[error("reaching the broker: {0}")]
    Broker(std::io::Error),
    #[error("re-encoding: {0}")]
    Encode(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Why a CONNECT was refused, with the CONNACK code the client is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ConnectReturnCode,
    pub reason: String,
}

fn refuse(code: ConnectReturnCode, reason: impl Into<String>) -> Refusal {
    Refusal { code, reason: reason.into() }
}

fn publish_allowed(client_id: &str, topic: &str) -> bool {
    Channel::UPLINK.into_iter().any(|c| topics::topic(client_id, c) == topic)
}

fn subscribe_allowed(client_id: &str, filter: &str) -> bool {
    Channel::DOWNLINK.into_iter().any(|c| topics::topic(client_id, c) == filter)
}

/// The rules for a CONNECT: MQTT 3.1.1, a valid device id that is not reserved for the control plane, a will
/// (if any) that obeys the publish rules, and credentials that `admission` accepts. Returns the client id.
pub fn check_connect(connect: &Connect, admission: Option<&Admission>) -> Result<String, Refusal> {
    if connect.protocol != Protocol::V4 {
        return Err(refuse(ConnectReturnCode::RefusedProtocolVersion, "only MQTT 3.1.1 is spoken here"));
    }
    let id = connect.client_id.as_str();
    if let Err(e) = topics::validate_device_id(id) {
        return Err(refuse(ConnectReturnCode::BadClientId, format!("client id: {e}")));
    }
    if id.starts_with(RESERVED_CLIENT_PREFIX) {
        return Err(refuse(
            ConnectReturnCode::BadClientId,
            format!("client ids starting `{RESERVED_CLIENT_PREFIX}` are the control plane's"),
        ));
    }
    if let Some(will) = &connect.last_will {
        let why = if will.retain {
            Some(Violation::Retained(will.topic.clone()))
        } else if !publish_allowed(id, &will.topic) {
            Some(Violation::Publish(will.topic.clone()))
        } else {
            None
        };
        if let Some(v) = why {
            return Err(refuse(ConnectReturnCode::NotAuthorized, Violation::Will(v.to_string()).to_string()));
        }
    }
    if let Some(admit) = admission {
        let (user, pass) = connect.login.as_ref().map_or(("", ""), |l| (l.username.as_str(), l.password.as_str()));
        if !admit(id, user, pass) {
            return Err(refuse(
                ConnectReturnCode::BadUserNamePassword,
                "not enrolled, revoked, or wrong username or password",
            ));
        }
    }
    Ok(id.to_string())
}

/// The topic rules for every packet after CONNECT.
pub fn check_packet(client_id: &str, packet: &Packet) -> Result<(), Violation> {
    match packet {
        Packet::Publish(p) if !publish_allowed(client_id, &p.topic) => Err(Violation::Publish(p.topic.clone())),
        Packet::Publish(p) if p.retain => Err(Violation::Retained(p.topic.clone())),
        Packet::Subscribe(s) => match s.filters.iter().find(|f| !subscribe_allowed(client_id, &f.path)) {
            Some(f) => Err(Violation::Subscribe(f.path.clone())),
            None => Ok(()),
        },
        Packet::Connect(_) => Err(Violation::Unexpected("a second CONNECT")),
        Packet::ConnAck(_) | Packet::SubAck(_) | Packet::UnsubAck(_) | Packet::PingResp => {
            Err(Violation::Unexpected("a broker's packet"))
        }
        _ => Ok(()),
    }
}

/// Reads the next whole packet into `buf`, decoding it with the MQTT 3.1.1 codec; `None` at a clean end of
/// the stream. Never holds more than one packet of at most `max` bytes.
async fn next_packet<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Packet>, Violation> {
    loop {
        match Packet::read(buf, max) {
            Ok(p) => return Ok(Some(p)),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(Violation::Malformed(e.to_string())),
        }
        buf.reserve(4096);
        match r.read_buf(buf).await {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err(Violation::Malformed("the connection closed inside a packet".into())),
            Ok(_) => {}
            // A device that closes its socket without TLS's close_notify, between two packets: MQTT's packets
            // carry their length, so nothing was cut short; a close like any other.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && buf.is_empty() => return Ok(None),
            Err(e) => return Err(Violation::Malformed(format!("reading: {e}"))),
        }
    }
}

/// What the front forwards of a whole byte stream from one client: the CONNECT as rewritten (or why it was
/// refused), then each packet up to the first that breaks a rule or does not decode. The same code as the
/// relay's, without the sockets: for the fuzz target and tests.
pub fn screen(bytes: &[u8], gate: &Gate) -> Result<Vec<Packet>, Closed> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    let connect = match Packet::read(&mut buf, MAX_CONNECT_BYTES) {
        Ok(Packet::Connect(c)) => c,
        Ok(_) => return Err(Closed::NotConnect),
        Err(e) => return Err(Violation::Malformed(e.to_string()).into()),
    };
    let id = check_connect(&connect, gate.admission.as_ref()).map_err(|r| Closed::Refused(r.reason))?;
    let mut connect = connect;
    connect.login = Some(Login { username: gate.forward_as.0.clone(), password: gate.forward_as.1.clone() });
    out.push(Packet::Connect(connect));
    while !buf.is_empty() {
        let packet = Packet::read(&mut buf, gate.max_packet_bytes).map_err(|e| Violation::Malformed(e.to_string()))?;
        check_packet(&id, &packet)?;
        out.push(packet);
    }
    Ok(out)
}

fn encode(packet: &Packet, max: usize) -> Result<BytesMut, Closed> {
    let mut out = BytesMut::with_capacity(packet.size() + 8);
    packet.write(&mut out, max + 8).map_err(|e| Closed::Encode(e.to_string()))?;
    Ok(out)
}

/// Accepts device connections on `listener` and relays them to `upstream` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    front: Arc<Front>,
    gate: Arc<Gate>,
    cancel: CancellationToken,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let (sock, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, say: wait for connections to close, without spinning.
                    tracing::warn!(error = %e, retry_in = ?backoff, "broker front: accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(10);
        let _ = sock.set_nodelay(true);
        let (front, gate, tls, cancel) = (front.clone(), gate.clone(), tls.clone(), cancel.clone());
        tokio::spawn(async move {
            let r = match tls {
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(sock)).await {
                    Ok(Ok(s)) => relay(s, upstream, &front, &gate, &cancel).await,
                    Ok(Err(e)) => Err(Closed::Tls(e)),
                    Err(_) => Err(Closed::TlsTimeout),
                },
                None => relay(sock, upstream, &front, &gate, &cancel).await,
            };
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "broker front: connection refused");
            }
        });
    }
}

async fn relay<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut client: S,
    upstream: SocketAddr,
    front: &Front,
    gate: &Arc<Gate>,
    cancel: &CancellationToken,
) -> Result<(), Closed> {
    let mut buf = BytesMut::with_capacity(1024);
    let first = tokio::time::timeout(HANDSHAKE_DEADLINE, next_packet(&mut client, &mut buf, MAX_CONNECT_BYTES))
        .await
        .map_err(|_| Closed::NoConnect)??;
    let Some(Packet::Connect(mut connect)) = first else {
        return Err(Closed::NotConnect);
    };
    let client_id = match check_connect(&connect, gate.admission.as_ref()) {
        Ok(id) => id,
        Err(r) => {
            tracing::warn!(client_id = %connect.client_id, reason = %r.reason, "broker front: CONNECT refused");
            if let Ok(b) = encode(&Packet::ConnAck(ConnAck::new(r.code, false)), 16) {
                let _ = client.write_all(&b).await;
                let _ = client.shutdown().await;
            }
            return Err(Closed::Refused(r.reason));
        }
    };
    let own_login =
        connect.login.replace(Login { username: gate.forward_as.0.clone(), password: gate.forward_as.1.clone() });
    let mut broker = TcpStream::connect(upstream).await.map_err(Closed::Broker)?;
    let _ = broker.set_nodelay(true);
    broker.write_all(&encode(&Packet::Connect(connect), MAX_CONNECT_BYTES)?).await?;
    let cancel = cancel.clone();
    let (id, task_gate) = (client_id.clone(), gate.clone());
    let (registered_tx, registered) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        // Nothing is relayed until the connection is registered, so that a revocation from now on cuts it.
        if registered.await.is_err() {
            return;
        }
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let (mut broker_r, mut broker_w) = broker.into_split();
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::io::copy(&mut broker_r, &mut client_w) => {}
            r = guard_uplink(&mut client_r, &mut broker_w, buf, &id, task_gate.max_packet_bytes) => {
                if let Err(e) = r {
                    tracing::warn!(client_id = %id, reason = %e, "broker front: device connection closed");
                }
            }
        }
    });
    let n = front.add(&client_id, task.abort_handle());
    // A revocation stored between the admission above and the registration could not cut this connection:
    // ask again now that any later revocation will.
    let still_admitted = gate.admission.as_ref().is_none_or(|admit| {
        let (user, pass) = own_login.as_ref().map_or(("", ""), |l| (l.username.as_str(), l.password.as_str()));
        admit(&client_id, user, pass)
    });
    if still_admitted {
        let _ = registered_tx.send(());
    }
    let _ = task.await;
    front.remove(&client_id, n);
    Ok(())
}

/// Relays a device's packets to the broker, one whole checked packet at a time, refusing any that break
/// the topic rules (the connection is closed).
async fn guard_uplink<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    mut buf: BytesMut,
    client_id: &str,
    max: usize,
) -> Result<(), Closed> {
    loop {
        let Some(packet) = next_packet(from, &mut buf, max).await? else {
            return Ok(());
        };
        check_packet(client_id, &packet)?;
        to.write_all(&encode(&packet, max)?).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::mqttbytes::v4::{LastWill, Publish, Subscribe, SubscribeFilter};
    use rumqttc::mqttbytes::QoS;

    fn bytes_of(p: &Packet) -> Vec<u8> {
        encode(p, 1 << 20).unwrap().to_vec()
    }

    async fn decode_one(bytes: &[u8], max: usize) -> Result<Option<Packet>, Violation> {
        let mut buf = BytesMut::new();
        next_packet(&mut &bytes[..], &mut buf, max).await
    }

    /// A stream that yields `bytes`, then fails as TLS does when the peer closes without close_notify.
    struct CutShort(std::io::Cursor<Vec<u8>>);

    impl AsyncRead for CutShort {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            out: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.0.position() as usize == self.0.get_ref().len() {
                let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "peer closed without close_notify");
                return std::task::Poll::Ready(Err(eof));
            }
            std::pin::Pin::new(&mut self.0).poll_read(cx, out)
        }
    }

    #[tokio::test]
    async fn a_close_without_close_notify_between_packets_is_a_close_and_inside_one_is_malformed() {
        let whole = bytes_of(&publish("edgeloop/v1/d1/up/telemetry", false));
        let mut buf = BytesMut::new();
        let mut r = CutShort(std::io::Cursor::new(whole.clone()));
        assert!(matches!(next_packet(&mut r, &mut buf, 1 << 20).await, Ok(Some(Packet::Publish(_)))));
        assert_eq!(next_packet(&mut r, &mut buf, 1 << 20).await, Ok(None));
        let mut buf = BytesMut::new();
        let mut r = CutShort(std::io::Cursor::new(whole[..whole.len() - 1].to_vec()));
        let cut = next_packet(&mut r, &mut buf, 1 << 20).await;
        assert!(matches!(&cut, Err(Violation::Malformed(w)) if w.contains("close_notify")), "{cut:?}");
    }

    fn publish(topic: &str, retain: bool) -> Packet {
        let mut p = Publish::new(topic, QoS::AtLeastOnce, vec![1u8, 2, 3]);
        p.pkid = 1;
        p.retain = retain;
        Packet::Publish(p)
    }

    fn subscribe(filters: &[&str]) -> Packet {
        Packet::Subscribe(Subscribe {
            pkid: 1,
            filters: filters.iter().map(|f| SubscribeFilter::new(f.to_string(), QoS::AtLeastOnce)).collect(),
        })
    }

    fn connect(id: &str, will: Option<(&str, bool)>) -> Connect {
        let mut c = Connect::new(id);
        c.set_login(id, "secret");
        c.last_will = will.map(|(t, retain)| LastWill::new(t, vec![0u8], QoS::AtLeastOnce, retain));
        c
    }

    fn admit_all() -> Admission {
        Arc::new(|id: &str, user: &str, pass: &str| id == user && pass == "secret")
    }

    #[tokio::test]
    async fn connects_are_decoded_and_bounded() {
        let c = connect("press-01", None);
        let got = decode_one(&bytes_of(&Packet::Connect(c.clone())), MAX_CONNECT_BYTES).await.unwrap();
        assert_eq!(got, Some(Packet::Connect(c)));
        assert!(decode_one(&[0x10, 3, 0, 4], MAX_CONNECT_BYTES).await.is_err(), "truncated");
        let huge = [0x10u8, 0xff, 0xff, 0x7f];
        assert!(matches!(decode_one(&huge, MAX_CONNECT_BYTES).await, Err(Violation::Malformed(_))), "over the cap");
        assert_eq!(decode_one(&[], MAX_CONNECT_BYTES).await, Ok(None));
    }

    #[test]
    fn devices_keep_to_their_own_topics() {
        let ok = |p: &Packet| check_packet("dev-a", p);
        for ch in ["telemetry", "status", "report", "logs", "alerts"] {
            assert_eq!(ok(&publish(&format!("edgeloop/v1/dev-a/up/{ch}"), false)), Ok(()));
        }
        for bad in [
            "edgeloop/v1/dev-b/up/telemetry",
            "edgeloop/v1/dev-b/down/ack",
            "edgeloop/v1/dev-a/down/desired",
            "edgeloop/v1/dev-a/down/ack",
            "edgeloop/v1/dev-a-2/up/telemetry",
            "edgeloop/v1/dev-a/up/anything",
            "edgeloop/v1/dev-a/up/telemetry/more",
            "edgeloop/v1/dev-a/up/+",
        ] {
            assert_eq!(ok(&publish(bad, false)), Err(Violation::Publish(bad.into())), "{bad}");
        }
        assert_eq!(
            ok(&subscribe(&[
                "edgeloop/v1/dev-a/down/ack",
                "edgeloop/v1/dev-a/down/desired",
                "edgeloop/v1/dev-a/down/config",
                "edgeloop/v1/dev-a/down/agent"
            ])),
            Ok(())
        );
        for bad in [
            "edgeloop/v1/+/up/#",
            "#",
            "edgeloop/v1/dev-a/down/#",
            "edgeloop/v1/dev-a/down/other",
            "edgeloop/v1/dev-b/down/config",
        ] {
            assert_eq!(
                ok(&subscribe(&["edgeloop/v1/dev-a/down/ack", bad])),
                Err(Violation::Subscribe(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(ok(&Packet::PingReq), Ok(()));
        assert!(matches!(ok(&Packet::Connect(connect("dev-a", None))), Err(Violation::Unexpected(_))));
    }

    #[test]
    fn device_retained_publish_refused_by_the_rules() {
        let t = "edgeloop/v1/dev-a/up/status";
        assert_eq!(check_packet("dev-a", &publish(t, true)), Err(Violation::Retained(t.into())));
    }

    #[test]
    fn wills_obey_the_publish_rules() {
        let admit = admit_all();
        let check = |c: &Connect| check_connect(c, Some(&admit));
        assert_eq!(check(&connect("dev-a", None)), Ok("dev-a".into()));
        assert_eq!(check(&connect("dev-a", Some(("edgeloop/v1/dev-a/up/status", false)))), Ok("dev-a".into()));
        for (topic, retain) in [
            ("edgeloop/v1/victim/down/ack", true),
            ("edgeloop/v1/victim/down/ack", false),
            ("edgeloop/v1/victim/up/status", false),
            ("edgeloop/v1/dev-a/up/status", true),
        ] {
            let r = check(&connect("dev-a", Some((topic, retain)))).unwrap_err();
            assert_eq!(r.code, ConnectReturnCode::NotAuthorized, "{topic}");
            assert!(r.reason.contains("will refused") && r.reason.contains(topic), "{}", r.reason);
        }
    }

    #[test]
    fn connects_are_admitted_by_credentials_id_and_protocol() {
        let admit = admit_all();
        let mut wrong = connect("dev-a", None);
        wrong.set_login("dev-a", "guess");
        assert_eq!(check_connect(&wrong, Some(&admit)).unwrap_err().code, ConnectReturnCode::BadUserNamePassword);
        let mut anonymous = connect("dev-a", None);
        anonymous.login = None;
        assert_eq!(check_connect(&anonymous, Some(&admit)).unwrap_err().code, ConnectReturnCode::BadUserNamePassword);
        assert_eq!(check_connect(&anonymous, None), Ok("dev-a".into()), "enrollment off");
        let cp = connect("edgeloop-cp-1234", None);
        assert_eq!(check_connect(&cp, None).unwrap_err().code, ConnectReturnCode::BadClientId, "reserved id");
        let mut v5 = connect("dev-a", None);
        v5.protocol = Protocol::V5;
        assert_eq!(check_connect(&v5, Some(&admit)).unwrap_err().code, ConnectReturnCode::RefusedProtocolVersion);
        assert_eq!(check_connect(&connect("a/b", None), None).unwrap_err().code, ConnectReturnCode::BadClientId);
    }

    #[test]
    fn a_stream_is_forwarded_under_the_fronts_login_up_to_the_first_violation() {
        let gate = Gate {
            admission: Some(admit_all()),
            forward_as: ("front".into(), "s3cret".into()),
            max_packet_bytes: 4096,
        };
        let mut stream = bytes_of(&Packet::Connect(connect("dev-a", None)));
        stream.extend(bytes_of(&subscribe(&["edgeloop/v1/dev-a/down/ack"])));
        stream.extend(bytes_of(&publish("edgeloop/v1/dev-a/up/telemetry", false)));
        let forwarded = screen(&stream, &gate).unwrap();
        assert_eq!(forwarded.len(), 3);
        let Packet::Connect(c) = &forwarded[0] else { panic!("not a CONNECT") };
        assert_eq!(c.login, Some(Login { username: "front".into(), password: "s3cret".into() }));
        stream.extend(bytes_of(&publish("edgeloop/v1/dev-b/down/ack", false)));
        assert!(screen(&stream, &gate).unwrap_err().to_string().contains("dev-b/down/ack"));
        let big = bytes_of(&Packet::Publish(Publish::new(
            "edgeloop/v1/dev-a/up/telemetry",
            QoS::AtMostOnce,
            vec![0u8; 5000],
        )));
        let mut over = bytes_of(&Packet::Connect(connect("dev-a", None)));
        over.extend(big);
        assert!(
            matches!(screen(&over, &gate), Err(Closed::Violation(Violation::Malformed(_)))),
            "a packet over the cap"
        );
    }
}
