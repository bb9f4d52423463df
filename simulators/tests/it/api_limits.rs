//! The operator API under clients that hold connections, flood it with refused calls or download in bulk:
//! idle and slow connections are closed, file descriptors running out does not stop the control plane, the
//! audit log stays bounded, and artifacts are streamed with their ranges, a bounded number at a time.

use crate::support::{start_cp, stored_seqs, wait_for};
use edgeloop_common::envelope::{self, Body, Envelope, Record, TelemetryBatch};
use edgeloop_control_plane::access::AuditEntry;
use edgeloop_control_plane::web::serve::Limits;
use edgeloop_simulators::device;
use edgeloop_simulators::http::Api;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLASS: &str = "city-air-quality";

/// Reads until the peer closes the connection (EOF or an error) or `limit` passes; returns how long it took,
/// or `None` if the connection was still open.
async fn closed_within<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return t0.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// How many connections to local `port` this process has accepted and holds open: its descriptors whose
/// socket is a TCP connection with that local port. Connections still in the listen queue have none.
fn accepted_on(port: u16) -> usize {
    let mut inodes = std::collections::HashSet::new();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1).and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            // State 0A is LISTEN: the listener itself.
            if local_port == Some(port) && f.get(3) != Some(&"0A") {
                if let Some(inode) = f.get(9) {
                    inodes.insert(format!("socket:[{inode}]"));
                }
            }
        }
    }
    std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter(|l| inodes.contains(&l.to_string_lossy().into_owned()))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_api_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let files = edgeloop_control_plane::access::certs::init(&dir.path().join("tls"), &[]).unwrap();
    let tls = edgeloop_control_plane::config::TlsFiles { cert: files.cert.clone(), key: files.key.clone() };
    let header = Duration::from_secs(1);
    let (cp, cancel) = start_cp(dir.path(), move |c| {
        c.tls = Some(tls);
        c.api_limits = Limits {
            header_read_timeout: header,
            idle_timeout: Duration::from_secs(3),
            max_connections: 16,
            ..Limits::default()
        };
    })
    .await;
    let api = cp.api_addr;
    let ca = std::fs::read(&files.ca).unwrap();
    let client = crate::support::api_tls(&cp, &ca);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(edgeloop_common::tls::client_config(&ca).unwrap()));
    let tls_to = |connector: tokio_rustls::TlsConnector| async move {
        let tcp = TcpStream::connect(api).await.unwrap();
        connector.connect(rustls::pki_types::ServerName::IpAddress(api.ip().into()), tcp).await.unwrap()
    };
    // Closed after the header deadline, with room for a loaded machine; without a deadline, never.
    let limit = header + Duration::from_secs(3);

    // A TCP connection that never starts TLS.
    let silent_tcp = async {
        let mut s = TcpStream::connect(api).await.unwrap();
        closed_within(&mut s, limit).await
    };
    // A finished TLS handshake, then nothing.
    let silent_tls = async {
        let mut s = tls_to(connector.clone()).await;
        closed_within(&mut s, limit).await
    };
    // Half a request header, then nothing.
    let partial = async {
        let mut s = tls_to(connector.clone()).await;
        s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        closed_within(&mut s, limit).await
    };
    // A header trickled one byte at a time, each well within the deadline (slowloris).
    let trickle = async {
        let mut s = tls_to(connector.clone()).await;
        let t0 = Instant::now();
        let mut buf = [0u8; 512];
        for b in b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: ".iter().chain([b'a'; 200].iter()) {
            if s.write_all(&[*b]).await.is_err() {
                return Some(t0.elapsed());
            }
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                if matches!(r, Ok(0) | Err(_)) {
                    return Some(t0.elapsed());
                }
            }
            if t0.elapsed() > limit {
                return None;
            }
        }
        None
    };
    // A kept-alive connection after one answered request.
    let kept_alive = async {
        let mut s = tls_to(connector.clone()).await;
        s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("\"status\"") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the health request was not answered");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got));
        closed_within(&mut s, limit).await
    };
    let (a, b, c, d, e) = tokio::join!(silent_tcp, silent_tls, partial, trickle, kept_alive);
    for (what, closed) in
        [("silent TCP", a), ("silent TLS", b), ("partial header", c), ("trickled header", d), ("kept alive", e)]
    {
        let took = closed.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        assert!(took >= header / 2, "{what}: closed after {took:?}, before its deadline");
    }

    // The cap: 40 connections that send nothing. The server takes at most 16 at a time (the others wait in
    // the kernel's queue and cost it no descriptor), and an operator still gets in while they are held.
    let mut idle = Vec::new();
    for _ in 0..40 {
        idle.push(TcpStream::connect(api).await.unwrap());
    }
    let mut most = 0;
    let t0 = Instant::now();
    while t0.elapsed() < header * 3 / 4 {
        most = most.max(accepted_on(api.port()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!((1..=16).contains(&most), "the server held {most} of 40 idle connections at once; the cap is 16");
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(15), client.get("/api/v1/health")).await;
    assert!(matches!(r, Ok(Ok((200, _)))), "health while 40 idle connections are held: {r:?}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    drop(idle);

    cancel.cancel();
    cp.join().await.unwrap();
}

/// Signed telemetry `from..=to` of `device`.
fn batch(device: &str, key: &ring::signature::Ed25519KeyPair, from: u64, to: u64) -> Vec<u8> {
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
    let mut env = Envelope::new(device, to, 0, Body::Telemetry(TelemetryBatch { from, to, records }));
    env.sign(key);
    envelope::encode(&env)
}

/// A device connection that reports each acknowledgement it receives.
async fn device_with_acks(
    mqtt: (String, u16),
    id: &str,
    creds: &edgeloop_agent::identity::Credentials,
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<()>, tokio::task::JoinHandle<()>) {
    let mut opts = MqttOptions::new(id, mqtt.0, mqtt.1);
    opts.set_max_packet_size(1 << 20, 1 << 20).set_credentials(creds.username.clone(), creds.password.clone());
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic.ends_with("/down/ack") => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    client.subscribe(format!("edgeloop/v1/{id}/down/ack"), QoS::AtLeastOnce).await.unwrap();
    (client, rx, task)
}

async fn next_ack(acks: &mut tokio::sync::mpsc::UnboundedReceiver<()>, limit: Duration) -> bool {
    matches!(tokio::time::timeout(limit, acks.recv()).await, Ok(Some(())))
}

/// Kills the child process if the test ends early.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The attack: a control plane whose soft and hard limit on open files is 256 (systemd's default soft limit
/// is 1024), and 400 idle connections to its API. While they are held, a device sends an update report big
/// enough that the store writes it to a file of its own (it needs a descriptor), then telemetry. The
/// control plane acknowledges the telemetry during the attack, answers once the connections go, and ingests
/// what comes after. The control plane runs in a child process (this test binary again, running
/// [`fd_exhaustion_child`]) so that the limit applies to it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_does_not_stop_the_control_plane() {
    const LIMIT: u32 = 256;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let log = std::fs::File::create(d.join("child.log")).unwrap();
    let mut child = Child(
        std::process::Command::new("prlimit")
            .arg(format!("--nofile={LIMIT}:{LIMIT}"))
            .arg("--")
            .arg(std::env::current_exe().unwrap())
            .args(["api_limits::fd_exhaustion_child", "--exact", "--ignored", "--nocapture", "--test-threads", "1"])
            .env("EDGELOOP_FD_CHILD_DIR", d)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("running prlimit (util-linux)"),
    );
    let child_log = || std::fs::read_to_string(d.join("child.log")).unwrap_or_default();
    let ready = d.join("ready");
    wait_for("the child control plane", Duration::from_secs(60), || ready.exists()).await;
    let text = std::fs::read_to_string(&ready).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let api: SocketAddr = lines[0].parse().unwrap();
    let mqtt = (lines[1].to_string(), lines[2].parse::<u16>().unwrap());
    let operator = Api::new(api).with_token(lines[3]);

    let key = device::new_key();
    let creds = device::enroll(&operator, "fd-dev", CLASS, &key).await.unwrap();
    let (client, mut acks, task) = device_with_acks(mqtt, "fd-dev", &creds).await;
    client
        .publish("edgeloop/v1/fd-dev/up/telemetry", QoS::AtLeastOnce, false, batch("fd-dev", &key, 1, 10))
        .await
        .unwrap();
    assert!(next_ack(&mut acks, Duration::from_secs(15)).await, "no ack before the attack\n{}", child_log());

    // 400 idle connections, some with half a header; the limit is 256 descriptors.
    let mut flood = Vec::new();
    for i in 0..400 {
        let mut s = TcpStream::connect(api).await.unwrap();
        if i % 2 == 0 {
            let _ = s.write_all(b"POST /api/v1/rollouts HTTP/1.1\r\nHost: x\r\n").await;
        }
        flood.push(s);
    }
    // Give the server the time to take as many of them as it will.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let report = edgeloop_common::update::UpdateReport {
        seq: 0,
        rollout: None,
        sha256: "0".repeat(64),
        phase: edgeloop_common::update::Phase::Failed,
        reason: "x".repeat(200_000),
        active_sha256: None,
        shadow_agreement: None,
        anomaly_rate: None,
        baseline_anomaly_rate: None,
        p95_us: None,
        at_ms: edgeloop_common::unix_millis(),
        failure: None,
        component: Default::default(),
    };
    let mut env = Envelope::new("fd-dev", 1, edgeloop_common::unix_millis(), Body::Report(report));
    env.sign(&key);
    client.publish("edgeloop/v1/fd-dev/up/report", QoS::AtLeastOnce, false, envelope::encode(&env)).await.unwrap();
    client
        .publish("edgeloop/v1/fd-dev/up/telemetry", QoS::AtLeastOnce, false, batch("fd-dev", &key, 11, 20))
        .await
        .unwrap();
    assert!(
        next_ack(&mut acks, Duration::from_secs(20)).await,
        "no ack while idle connections were held\n{}",
        child_log()
    );
    drop(flood);

    let t0 = Instant::now();
    while !matches!(operator.get("/api/v1/health").await, Ok((200, _))) {
        assert!(t0.elapsed() < Duration::from_secs(20), "the API did not answer after the attack\n{}", child_log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(child.0.try_wait().unwrap().is_none(), "the control plane stopped\n{}", child_log());
    client
        .publish("edgeloop/v1/fd-dev/up/telemetry", QoS::AtLeastOnce, false, batch("fd-dev", &key, 21, 30))
        .await
        .unwrap();
    assert!(next_ack(&mut acks, Duration::from_secs(15)).await, "no ack after the attack\n{}", child_log());
    assert_eq!(stored_seqs(&operator, "fd-dev").await, (1..=30).collect::<Vec<u64>>());
    task.abort();

    std::fs::write(d.join("stop"), "").unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the child did not stop\n{}", child_log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "the child control plane failed\n{}", child_log());
}

/// The control plane of [`fd_exhaustion_does_not_stop_the_control_plane`], in its own process. Does nothing
/// unless that test started it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by fd_exhaustion_does_not_stop_the_control_plane in a child process"]
async fn fd_exhaustion_child() {
    let Some(dir) = std::env::var_os("EDGELOOP_FD_CHILD_DIR").map(PathBuf::from) else { return };
    let (cp, cancel) = start_cp(&dir, |c| {
        c.api_limits = Limits {
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            max_connections: 32,
            ..Limits::default()
        };
    })
    .await;
    let token = cp.admin_token.clone().unwrap();
    let text = format!("{}\n{}\n{}\n{token}\n", cp.api_addr, cp.mqtt_addr.0, cp.mqtt_addr.1);
    std::fs::write(dir.join("ready.tmp"), text).unwrap();
    std::fs::rename(dir.join("ready.tmp"), dir.join("ready")).unwrap();
    let stop = dir.join("stop");
    let mut join = tokio::spawn(cp.join());
    loop {
        tokio::select! {
            r = &mut join => panic!("the control plane stopped by itself: {r:?}"),
            _ = tokio::time::sleep(Duration::from_millis(100)) => if stop.exists() { break },
        }
    }
    cancel.cancel();
    join.await.unwrap().unwrap();
}

/// The attack: 300 calls without a token, each with a 60 KB path. The audit log gets one entry for them,
/// with a count, and a path cut to 256 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_do_not_grow_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let path = format!("/api/v1/rollouts/{}", "a".repeat(60_000));
    for _ in 0..300 {
        let r = api.request("POST", &path, &[("Authorization", "Bearer nope")], Some(b"{}")).await.unwrap();
        assert_eq!(r.status, 401);
    }
    let audit: Vec<AuditEntry> = api.get_json("/api/v1/audit?limit=1000").await.unwrap();
    let refused: Vec<&AuditEntry> = audit.iter().filter(|e| e.who == "unauthenticated").collect();
    assert_eq!(refused.len(), 1, "{} entries", refused.len());
    assert_eq!(refused[0].count, 300);
    assert_eq!(refused[0].source.as_deref(), Some("127.0.0.1"));
    assert!(refused[0].action.len() < 320 && refused[0].action.contains("truncated"), "{}", refused[0].action);
    cancel.cancel();
    cp.join().await.unwrap();
}

/// `?limit=` on the audit log is capped: a page bigger than the cap is refused with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_list_limit_is_capped() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |_| {}).await;
    let api = crate::support::api(&cp);
    let (status, body) = api.get("/api/v1/audit?limit=10000").await.unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("limit must be between 1 and 1000, got 10000"), "{body}");
    let (status, _) = api.get("/api/v1/audit?limit=1000").await.unwrap();
    assert_eq!(status, 200);
    cancel.cancel();
    cp.join().await.unwrap();
}

/// Resident memory of this process, bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()).unwrap_or(0) * 4096
}

/// Artifacts come from disk as a stream: a range request gets exactly its bytes (206 with `Content-Range`,
/// 416 outside the file), eight stalled downloads of a 64 MiB artifact do not hold it in memory, and past
/// `max_downloads` a download waits, then gets a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_stream_with_ranges_and_bounded_downloads() {
    let dir = tempfile::tempdir().unwrap();
    let (cp, cancel) = start_cp(dir.path(), |c| {
        c.api_limits.max_downloads = 8;
        c.api_limits.download_wait = Duration::from_millis(300);
    })
    .await;
    let api = cp.api_addr;
    let client = crate::support::api(&cp);
    let bytes: Vec<u8> = (0..64u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let models = cp.learning.models.clone();
    let b2 = bytes.clone();
    let sha = tokio::task::spawn_blocking(move || models.put_artifact(&b2)).await.unwrap().unwrap();
    let url = format!("/api/v1/artifacts/{sha}");
    let len = bytes.len();

    let r = client.request("GET", &url, &[("Range", "bytes=1000-1999")], None).await.unwrap();
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some(format!("bytes 1000-1999/{len}").as_str()));
    assert_eq!(r.body, bytes[1000..2000]);
    let r = client.request("GET", &url, &[("Range", "bytes=-10")], None).await.unwrap();
    assert_eq!((r.status, &r.body[..]), (206, &bytes[len - 10..]));
    let r = client.request("GET", &url, &[("Range", &format!("bytes={}-", len - 5))], None).await.unwrap();
    assert_eq!((r.status, &r.body[..]), (206, &bytes[len - 5..]));
    let r = client.request("GET", &url, &[("Range", &format!("bytes={len}-"))], None).await.unwrap();
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some(format!("bytes */{len}").as_str()));

    // Eight downloads that read 64 KiB each, then stall: the server holds a chunk and socket buffers for
    // each, not the file (a server that reads the file whole would hold 8 × 64 MiB).
    drop(bytes);
    let base = rss();
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(api).await.unwrap();
        s.write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut got = vec![0u8; 64 << 10];
        s.read_exact(&mut got).await.unwrap();
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got[..100]));
        assert!(String::from_utf8_lossy(&got[..400]).contains(&format!("content-length: {len}")));
        stalled.push(s);
    }
    let grown = rss().saturating_sub(base);
    assert!(grown < 200 << 20, "memory grew by {} MiB for 8 stalled downloads", grown >> 20);

    // A ninth finds every slot taken: 503 with Retry-After, after a short wait.
    let r = client.request("GET", &url, &[], None).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    // Once they go, whole downloads work again, byte for byte.
    drop(stalled);
    let t0 = Instant::now();
    let whole = loop {
        let r = client.request("GET", &url, &[], None).await.unwrap();
        if r.status == 200 {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "slots not freed: {}", r.status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(whole.body.len(), len);
    assert_eq!(edgeloop_common::signing::sha256_hex(&whole.body), sha);
    cancel.cancel();
    cp.join().await.unwrap();
}
