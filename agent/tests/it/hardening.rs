//! What the agent does with a broken environment: a CA it cannot use, a data directory others can read.

use edgeloop_agent::config::AgentConfig;
use edgeloop_agent::Agent;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// A self-signed CA certificate (P-256, valid until 2126). No key for it exists anywhere, so no server can
/// complete a handshake with it: the test needs only the client's first bytes.
const CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBjjCCATOgAwIBAgIUYNRX86wHW8bRHEq6J+OhZtQTYy8wCgYIKoZIzj0EAwIw
GzEZMBcGA1UEAwwQZWRnZWxvb3AgdGVzdCBDQTAgFw0yNjEyMDYwNzE4NDBaGA8y
MTI2MTExMjA3MTg0MFowGzEZMBcGA1UEAwwQZWRnZWxvb3AgdGVzdCBDQTBZMBMG
ByqGSM49AgEGCCqGSM49AwEHA0IABLroVfuv+04Bq1YY4Ol5KmechLZyFWZug7s0
dQzPaoDz2jMXBkbQwc8IGgf8bGoKB7aaxHWQ2v/2cql8qOc5KAGjUzBRMB0GA1Ud
DgQWBBQx8ylOoffD6aZsEDzyGyQNK0YMDTAfBgNVHSMEGDAWgBQx8ylOoffD6aZs
EDzyGyQNK0YMDTAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0kAMEYCIQCK
0P1EMM/JCc+QTZ80/JkJNn9gxGuTucNsw6Kj0FCnCQIhALEW+k316kKeCJrEEQCl
7iQj9hmwOWW+k/shdclHpUkh
-----END CERTIFICATE-----
";

/// A TCP listener standing in for the broker: it records the first byte each connection sends (`None` when
/// the client sent nothing within a second) and hangs up.
struct FirstBytes {
    port: u16,
    seen: Arc<Mutex<Vec<Option<u8>>>>,
}

impl FirstBytes {
    async fn start(cancel: CancellationToken) -> FirstBytes {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let mut conn = tokio::select! {
                    _ = cancel.cancelled() => return,
                    c = listener.accept() => match c { Ok((c, _)) => c, Err(_) => continue },
                };
                let mut b = [0u8; 1];
                let first = match tokio::time::timeout(Duration::from_secs(1), conn.read(&mut b)).await {
                    Ok(Ok(1)) => Some(b[0]),
                    _ => None,
                };
                log.lock().unwrap().push(first);
            }
        });
        FirstBytes { port, seen }
    }

    fn seen(&self) -> Vec<Option<u8>> {
        self.seen.lock().unwrap().clone()
    }
}

fn agent_toml(dir: &Path, id: &str, url: &str, tls: &str) -> PathBuf {
    std::fs::write(dir.join("c.toml"), "class = \"c\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1\n")
        .unwrap();
    let p = dir.join(format!("{id}.toml"));
    std::fs::write(
        &p,
        format!(
            "[device]\nid = \"{id}\"\nclass_config = \"c.toml\"\n[mqtt]\nurl = \"{url}\"\nreconnect_max_ms = 200\n[storage]\ndata_dir = \"{id}-state\"\n{tls}\n[[trusted_keys]]\npublic_key = \"0101010101010101010101010101010101010101010101010101010101010101\"\n"
        ),
    )
    .unwrap();
    p
}

const TLS_HANDSHAKE: u8 = 0x16;
const MQTT_CONNECT: u8 = 0x10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_ca_never_falls_back_to_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let broker = FirstBytes::start(cancel.clone()).await;
    let url = format!("mqtts://127.0.0.1:{}", broker.port);
    let ca = dir.path().join("ca.pem");
    let toml = agent_toml(dir.path(), "tls-1", &url, "[tls]\nca_file = \"ca.pem\"\n");

    // A CA file that is not a certificate, or that is gone: the config is refused, naming the file and why.
    std::fs::write(&ca, "not a certificate\n").unwrap();
    let err = AgentConfig::load(&toml).unwrap_err().to_string();
    assert!(err.contains("tls.ca_file") && err.contains("ca.pem: no PEM certificate"), "{err}");
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
    let err = AgentConfig::load(&toml).unwrap_err().to_string();
    assert!(err.contains("tls.ca_file") && err.contains("ca.pem: "), "{err}");
    std::fs::remove_file(&ca).unwrap();
    let err = AgentConfig::load(&toml).unwrap_err().to_string();
    assert!(err.contains("tls.ca_file") && err.contains("ca.pem: cannot read"), "{err}");

    // Built in code, as the fleet runner does: a CA that does not parse cannot be made into TLS.
    let mut in_code = AgentConfig::in_process(
        "tls-2",
        edgeloop_common::config::ClassConfig::load(&dir.path().join("c.toml")).unwrap(),
        ("127.0.0.1".into(), broker.port),
        dir.path().join("tls-2-state"),
    );
    let refused = in_code.use_tls(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n");
    assert!(refused.is_err(), "a garbage CA was accepted");
    assert!(in_code.tls_ca.is_none() && !in_code.mqtt_transport.is_tls());

    // A good CA that vanishes after the config was loaded: the agent still speaks TLS to the broker, and
    // nothing else, however often it reconnects.
    std::fs::write(&ca, CA_PEM).unwrap();
    let cfg = AgentConfig::load(&toml).unwrap();
    std::fs::remove_file(&ca).unwrap();
    assert!(cfg.mqtt_transport.is_tls());
    let agent_cancel = cancel.child_token();
    let agent = Agent::start(cfg, Vec::new(), agent_cancel.clone()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.seen().iter().filter(|b| **b == Some(TLS_HANDSHAKE)).count() < 3 {
        assert!(Instant::now() < deadline, "the agent made only {:?} connections", broker.seen());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent_cancel.cancel();
    tokio::time::timeout(Duration::from_secs(10), agent.join()).await.expect("the agent stops").unwrap();
    let seen = broker.seen();
    assert!(!seen.contains(&Some(MQTT_CONNECT)), "a plaintext MQTT CONNECT reached the broker: {seen:?}");
    // Every connection that sent anything opened with a TLS record. One that sent nothing (`None`: the
    // connection the stop cut short, or a handshake slower than the recorder's second on a loaded machine)
    // carried no plaintext either.
    assert!(
        seen.iter().flatten().all(|b| *b == TLS_HANDSHAKE),
        "every connection that sent bytes opens with a TLS record: {seen:?}"
    );
    assert!(seen.iter().filter(|b| **b == Some(TLS_HANDSHAKE)).count() >= 3, "three TLS connections: {seen:?}");
    cancel.cancel();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o777
}

/// Every path under `root`, `root` included.
fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    if std::fs::symlink_metadata(root).unwrap().is_dir() {
        for e in std::fs::read_dir(root).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_and_outbox_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let cancel = CancellationToken::new();
    let broker = FirstBytes::start(cancel.clone()).await;
    let url = format!("mqtt://127.0.0.1:{}", broker.port);

    // A fresh data directory, and one an older version left open to group and others.
    for (id, loose) in [("fresh", false), ("loose", true)] {
        let cfg = AgentConfig::load(&agent_toml(dir.path(), id, &url, "")).unwrap();
        let data = cfg.data_dir.clone();
        if loose {
            std::fs::create_dir_all(data.join("outbox")).unwrap();
            std::fs::write(data.join("leftover"), b"x").unwrap();
            for (p, m) in [(data.clone(), 0o755), (data.join("outbox"), 0o777), (data.join("leftover"), 0o644)] {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
            }
        }
        let agent_cancel = cancel.child_token();
        let agent = Agent::start(cfg, Vec::new(), agent_cancel.clone()).await.unwrap();
        let paths = walk(&data);
        assert!(paths.contains(&data.join("outbox/db")) && paths.contains(&data.join("identity.key")), "{paths:?}");
        for p in &paths {
            assert_eq!(mode(p) & 0o077, 0, "{id}: {} is open to group or others ({:o})", p.display(), mode(p));
        }
        assert_eq!((mode(&data), mode(&data.join("outbox"))), (0o700, 0o700), "{id}");
        agent_cancel.cancel();
        tokio::time::timeout(Duration::from_secs(10), agent.join()).await.expect("the agent stops").unwrap();
    }
    cancel.cancel();
}
