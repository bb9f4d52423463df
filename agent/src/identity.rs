//! The device's identity: its Ed25519 key (created on first start, mode 0600), the MQTT credentials it got by
//! enrolling, and the enrollment call itself.
//!
//! Every envelope the agent sends is signed with the key, so a client that reaches the broker still cannot
//! speak for this device. The key never leaves the device; enrollment sends only the public half, in a request
//! signed with the private half, which proves the device holds it.

use anyhow::Context;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    edgeloop_common::private::write_atomic(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Loads the device key, creating it on first start. Blocking.
pub fn load_or_create_key(path: &Path) -> anyhow::Result<Ed25519KeyPair> {
    if path.exists() {
        edgeloop_common::private::warn_if_exposed(path);
        let bytes = std::fs::read(path).with_context(|| format!("reading device key {}", path.display()))?;
        return Ed25519KeyPair::from_pkcs8(&bytes)
            .map_err(|e| anyhow::anyhow!("device key {} is not an Ed25519 PKCS#8 key: {e}", path.display()));
    }
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| anyhow::anyhow!("the system RNG failed"))?;
    write_private(path, pkcs8.as_ref())?;
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
    tracing::info!(path = %path.display(), "device key created");
    Ok(pair)
}

pub fn public_key_hex(pair: &Ed25519KeyPair) -> String {
    edgeloop_common::signing::hex(pair.public_key().as_ref())
}

/// MQTT credentials from enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl Credentials {
    pub fn load(path: &Path) -> anyhow::Result<Option<Credentials>> {
        match std::fs::read(path) {
            Ok(b) => {
                edgeloop_common::private::warn_if_exposed(path);
                Ok(Some(serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", path.display()))?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        write_private(path, &serde_json::to_vec(self)?)
    }
}

/// The agent's HTTP client: HTTPS uses the same TLS configuration as the uplink, trusting only the pinned CA
/// (parsed when the config was resolved). Without one, HTTPS has no trusted root at all and fails; it never
/// falls back to another trust store. `timeout` bounds whole requests (enrollment); downloads have only connect
/// and read deadlines.
pub fn http_client(
    ca: Option<&std::sync::Arc<edgeloop_common::tls::ClientConfig>>,
    timeout: Option<Duration>,
) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .tls_built_in_root_certs(false);
    if let Some(t) = timeout {
        b = b.timeout(t);
    }
    if let Some(ca) = ca {
        b = b.use_preconfigured_tls(edgeloop_common::tls::ClientConfig::clone(ca));
    }
    b.build().context("building the HTTP client")
}

/// Where the device enrolls, and with what.
#[derive(Debug, Clone)]
pub struct Enroll {
    /// The control plane's API, e.g. `http://control-plane:8080`.
    pub url: String,
    pub token: String,
}

/// The identity settings of an agent.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub key_file: PathBuf,
    pub credentials_file: PathBuf,
    pub enroll: Option<Enroll>,
}

impl IdentityConfig {
    pub fn in_data_dir(data_dir: &Path) -> IdentityConfig {
        IdentityConfig {
            key_file: data_dir.join("identity.key"),
            credentials_file: data_dir.join("credentials.json"),
            enroll: None,
        }
    }
}

/// Enrolls once, with a request signed with the device key and stamped with the device's clock (the control
/// plane refuses one more than 10 minutes off its own clock). A refusal (4xx) is final and names the reason;
/// a network or server error is `Ok(None)`, to retry.
pub async fn enroll_once(
    http: &reqwest::Client,
    e: &Enroll,
    device: &str,
    class: &str,
    pair: &Ed25519KeyPair,
) -> anyhow::Result<Option<Credentials>> {
    let url = format!("{}/api/v1/enroll", e.url.trim_end_matches('/'));
    let body =
        edgeloop_common::enroll::EnrollRequest::signed(pair, device, class, &e.token, edgeloop_common::unix_millis());
    let resp = match http.post(&url).json(&body).send().await {
        Ok(r) => r,
        Err(err) => {
            tracing::warn!(%url, error = %err, "cannot reach the control plane to enroll; retrying");
            return Ok(None);
        }
    };
    let status = resp.status();
    if status.is_success() {
        return Ok(Some(resp.json().await.context("enrollment answer is not credentials")?));
    }
    let text = resp.text().await.unwrap_or_default();
    if status.is_server_error() {
        tracing::warn!(%url, %status, body = %text, "enrollment failed on the server; retrying");
        return Ok(None);
    }
    anyhow::bail!("enrollment refused ({status}): {text}")
}

/// Returns the stored credentials, or enrolls (retrying until it gets an answer) and stores them. `None`
/// when there are none and no enrollment is configured.
pub async fn credentials(
    cfg: &IdentityConfig,
    http: &reqwest::Client,
    device: &str,
    class: &str,
    pair: &Ed25519KeyPair,
    cancel: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<Option<Credentials>> {
    if let Some(c) = Credentials::load(&cfg.credentials_file)? {
        return Ok(Some(c));
    }
    let Some(e) = &cfg.enroll else { return Ok(None) };
    let mut backoff = crate::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        if let Some(c) = enroll_once(http, e, device, class, pair).await? {
            c.save(&cfg.credentials_file)?;
            tracing::info!(device, "enrolled; credentials stored");
            return Ok(Some(c));
        }
        tokio::select! {
            _ = cancel.cancelled() => anyhow::bail!("stopped before enrolling"),
            _ = tokio::time::sleep(backoff.next_delay().unwrap_or(Duration::from_secs(30))) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("id/identity.key");
        let a = load_or_create_key(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let b = load_or_create_key(&p).unwrap();
        assert_eq!(public_key_hex(&a), public_key_hex(&b));
        std::fs::write(&p, b"junk").unwrap();
        assert!(load_or_create_key(&p).unwrap_err().to_string().contains("not an Ed25519 PKCS#8 key"));
        let c = Credentials { username: "d".into(), password: "p".into() };
        let cp = dir.path().join("credentials.json");
        assert_eq!(Credentials::load(&cp).unwrap(), None);
        c.save(&cp).unwrap();
        assert_eq!(Credentials::load(&cp).unwrap(), Some(c));
        assert_eq!(std::fs::metadata(&cp).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
