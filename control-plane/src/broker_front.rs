//! The broker's front door: the listener devices connect to, in front of the embedded rumqttd.
//!
//! rumqttd runs on a loopback port of its own; this front accepts device connections (TLS is terminated here
//! when configured, with a handshake deadline so that a stalled client cannot hold up others), reads the MQTT
//! CONNECT packet to learn the client id, and then relays bytes both ways. It keeps every live connection by
//! client id, so that revoking a device cuts its connection at once ([`Front::cut`]); rumqttd's own auth
//! handler then refuses it when it reconnects.

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

/// Reads one MQTT CONNECT packet; returns its bytes and the client id.
pub async fn read_connect<S: AsyncRead + Unpin>(s: &mut S) -> Result<(Vec<u8>, String), String> {
    let mut head = vec![0u8; 1];
    s.read_exact(&mut head).await.map_err(|e| format!("reading CONNECT: {e}"))?;
    if head[0] != 0x10 {
        return Err(format!("first packet type {:#04x} is not CONNECT", head[0]));
    }
    let (mut len, mut mult) = (0usize, 1usize);
    for i in 0..4 {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.map_err(|e| format!("reading CONNECT length: {e}"))?;
        head.push(b[0]);
        len += usize::from(b[0] & 0x7f) * mult;
        mult *= 128;
        if b[0] & 0x80 == 0 {
            break;
        }
        if i == 3 {
            return Err("CONNECT length is malformed".into());
        }
    }
    if len > MAX_CONNECT_BYTES {
        return Err(format!("CONNECT of {len} bytes is over {MAX_CONNECT_BYTES}"));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.map_err(|e| format!("reading CONNECT: {e}"))?;
    let field = |at: usize| -> Option<(usize, &[u8])> {
        let n = usize::from(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
        Some((at + 2 + n, body.get(at + 2..at + 2 + n)?))
    };
    // Protocol name, then level (1), flags (1), keep-alive (2), then [v5: properties], then the client id.
    let (after_name, _) = field(0).ok_or("CONNECT is truncated")?;
    let level = *body.get(after_name).ok_or("CONNECT is truncated")?;
    let mut at = after_name + 4;
    if level == 5 {
        // Properties: a variable byte integer length, then the properties.
        let (mut plen, mut mult, mut i) = (0usize, 1usize, 0);
        loop {
            let b = *body.get(at + i).ok_or("CONNECT is truncated")?;
            plen += usize::from(b & 0x7f) * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 || i == 4 {
                break;
            }
        }
        at += i + plen;
    }
    let (_, id) = field(at).ok_or("CONNECT is truncated")?;
    let id = std::str::from_utf8(id).map_err(|_| "client id is not UTF-8")?.to_string();
    head.extend_from_slice(&body);
    Ok((head, id))
}

/// Accepts device connections on `listener` and relays them to `upstream` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    upstream: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
    front: Arc<Front>,
    cancel: CancellationToken,
) {
    loop {
        let (sock, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "broker front: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = sock.set_nodelay(true);
        let (front, tls, cancel) = (front.clone(), tls.clone(), cancel.clone());
        tokio::spawn(async move {
            let r = match tls {
                Some(acceptor) => match tokio::time::timeout(HANDSHAKE_DEADLINE, acceptor.accept(sock)).await {
                    Ok(Ok(s)) => relay(s, upstream, &front, &cancel).await,
                    Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                    Err(_) => Err("TLS handshake took too long".into()),
                },
                None => relay(sock, upstream, &front, &cancel).await,
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
    cancel: &CancellationToken,
) -> Result<(), String> {
    let (connect, client_id) = tokio::time::timeout(HANDSHAKE_DEADLINE, read_connect(&mut client))
        .await
        .map_err(|_| "no CONNECT in time".to_string())??;
    let mut broker = TcpStream::connect(upstream).await.map_err(|e| format!("reaching the broker: {e}"))?;
    let _ = broker.set_nodelay(true);
    broker.write_all(&connect).await.map_err(|e| e.to_string())?;
    let cancel = cancel.clone();
    let id = client_id.clone();
    let task = tokio::spawn(async move {
        let (mut client_r, mut client_w) = tokio::io::split(client);
        let (mut broker_r, mut broker_w) = broker.into_split();
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = tokio::io::copy(&mut broker_r, &mut client_w) => {}
            r = guard_uplink(&mut client_r, &mut broker_w, &id) => {
                if let Err(e) = r {
                    tracing::warn!(client_id = %id, reason = %e, "broker front: device connection closed");
                }
            }
        }
    });
    let n = front.add(&client_id, task.abort_handle());
    let _ = task.await;
    front.remove(&client_id, n);
    Ok(())
}

/// The largest MQTT packet a device may send through the front (a telemetry batch is at most 256 KiB).
const MAX_PACKET_BYTES: usize = 1 << 20;

/// Why a device's packet was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    Publish(String),
    Subscribe(String),
    Malformed(&'static str),
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Publish(t) => write!(f, "publish to `{t}`, which is not one of its own up/ topics"),
            Violation::Subscribe(t) => write!(f, "subscription to `{t}`, which is not one of its own down/ topics"),
            Violation::Malformed(w) => write!(f, "malformed packet: {w}"),
        }
    }
}

/// The topic rules of the embedded broker, which has no ACLs of its own: a device publishes only to
/// `edgeloop/v1/{its id}/up/...` and subscribes only to `edgeloop/v1/{its id}/down/...`. `packet` is one
/// whole MQTT 3.1.1 or 5 packet (fixed header included).
pub fn check_packet(client_id: &str, packet: &[u8], header_len: usize) -> Result<(), Violation> {
    let body = &packet[header_len..];
    let string_at = |at: usize| -> Result<(usize, &str), Violation> {
        let hi = *body.get(at).ok_or(Violation::Malformed("truncated"))?;
        let lo = *body.get(at + 1).ok_or(Violation::Malformed("truncated"))?;
        let n = usize::from(u16::from_be_bytes([hi, lo]));
        let s = body.get(at + 2..at + 2 + n).ok_or(Violation::Malformed("truncated"))?;
        Ok((at + 2 + n, std::str::from_utf8(s).map_err(|_| Violation::Malformed("topic is not UTF-8"))?))
    };
    let up = format!("{}/{client_id}/up/", edgeloop_common::topics::PREFIX);
    let down = format!("{}/{client_id}/down/", edgeloop_common::topics::PREFIX);
    match packet[0] >> 4 {
        3 => {
            let (_, topic) = string_at(0)?;
            if !topic.starts_with(&up) || topic.contains(['+', '#']) {
                return Err(Violation::Publish(topic.to_string()));
            }
        }
        8 => {
            // Packet id, then (MQTT 5) properties, then filters each followed by an options byte. Only MQTT
            // 3.1.1 layouts are parsed; a v5 SUBSCRIBE starts with a property length and fails the check below.
            let mut at = 2;
            while at < body.len() {
                let (next, filter) = string_at(at)?;
                if !filter.starts_with(&down) {
                    return Err(Violation::Subscribe(filter.to_string()));
                }
                at = next + 1;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Relays a device's packets to the broker, one whole packet at a time, refusing any that break the topic
/// rules (the connection is closed).
async fn guard_uplink<R: AsyncRead + Unpin, W: tokio::io::AsyncWrite + Unpin>(
    from: &mut R,
    to: &mut W,
    client_id: &str,
) -> Result<(), String> {
    let mut packet = Vec::with_capacity(1024);
    loop {
        packet.clear();
        let mut b = [0u8; 1];
        if from.read_exact(&mut b).await.is_err() {
            return Ok(());
        }
        packet.push(b[0]);
        let (mut len, mut mult) = (0usize, 1usize);
        for i in 0..4 {
            from.read_exact(&mut b).await.map_err(|e| e.to_string())?;
            packet.push(b[0]);
            len += usize::from(b[0] & 0x7f) * mult;
            mult *= 128;
            if b[0] & 0x80 == 0 {
                break;
            }
            if i == 3 {
                return Err("malformed remaining length".into());
            }
        }
        if len > MAX_PACKET_BYTES {
            return Err(format!("a {len}-byte packet is over {MAX_PACKET_BYTES}"));
        }
        let header_len = packet.len();
        packet.resize(header_len + len, 0);
        from.read_exact(&mut packet[header_len..]).await.map_err(|e| e.to_string())?;
        check_packet(client_id, &packet, header_len).map_err(|v| v.to_string())?;
        to.write_all(&packet).await.map_err(|e| e.to_string())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_packet(client_id: &str, level: u8) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0b0000_0010, 0, 30];
        if level == 5 {
            body.push(0); // no properties
        }
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut p = vec![0x10, body.len() as u8];
        p.extend(body);
        p
    }

    #[tokio::test]
    async fn reads_the_client_id_of_v4_and_v5_connects() {
        for level in [4, 5] {
            let p = connect_packet("press-01", level);
            let (bytes, id) = read_connect(&mut &p[..]).await.unwrap();
            assert_eq!((bytes, id.as_str()), (p.clone(), "press-01"));
        }
        assert!(read_connect(&mut &[0x30u8, 0][..]).await.unwrap_err().contains("not CONNECT"));
        assert!(read_connect(&mut &[0x10u8, 3, 0, 4][..]).await.is_err());
        let huge = [0x10u8, 0xff, 0xff, 0x7f];
        assert!(read_connect(&mut &huge[..]).await.unwrap_err().contains("over"));
    }

    fn publish(topic: &str) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        body.extend_from_slice(&[0, 1, b'x']);
        let mut p = vec![0x32, body.len() as u8];
        p.extend(body);
        p
    }

    fn subscribe(filters: &[&str]) -> Vec<u8> {
        let mut body = vec![0, 1];
        for f in filters {
            body.extend_from_slice(&(f.len() as u16).to_be_bytes());
            body.extend_from_slice(f.as_bytes());
            body.push(1);
        }
        let mut p = vec![0x82, body.len() as u8];
        p.extend(body);
        p
    }

    #[test]
    fn devices_keep_to_their_own_topics() {
        let ok = |p: &[u8]| check_packet("dev-a", p, 2);
        assert_eq!(ok(&publish("edgeloop/v1/dev-a/up/telemetry")), Ok(()));
        assert!(matches!(ok(&publish("edgeloop/v1/dev-b/up/telemetry")), Err(Violation::Publish(_))));
        assert!(matches!(ok(&publish("edgeloop/v1/dev-b/down/ack")), Err(Violation::Publish(_))), "forged ack");
        assert!(matches!(ok(&publish("edgeloop/v1/dev-a/down/desired")), Err(Violation::Publish(_))));
        assert!(matches!(ok(&publish("edgeloop/v1/dev-a-2/up/x")), Err(Violation::Publish(_))), "prefix of another id");
        assert_eq!(ok(&subscribe(&["edgeloop/v1/dev-a/down/ack", "edgeloop/v1/dev-a/down/desired"])), Ok(()));
        assert!(matches!(
            ok(&subscribe(&["edgeloop/v1/dev-a/down/ack", "edgeloop/v1/+/up/#"])),
            Err(Violation::Subscribe(_))
        ));
        assert!(matches!(ok(&subscribe(&["#"])), Err(Violation::Subscribe(_))));
        assert!(matches!(ok(&[0x32, 1, 0]), Err(Violation::Malformed(_))));
        assert_eq!(ok(&[0xc0, 0]), Ok(()), "PINGREQ passes");
    }
}
