//! TLS settings shared by the agent, the control plane and the tools: rustls with the ring provider, TLS 1.2
//! and 1.3, and trust pinned to one CA (the fleet's own) rather than the system's roots.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use rustls::ClientConfig;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Why PEM material was refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: no PEM certificate in it")]
    NoCertificate { what: String },
    #[error("{what}: {reason}")]
    Bad { what: String, reason: String },
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Mismatch(String),
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Bad { what: what.into(), reason: format!("not PEM certificates: {e}") })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what: what.into() });
    }
    Ok(certs)
}

/// A client that trusts only the CA in `ca_pem`.
pub fn client_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem, "CA file")? {
        roots.add(c).map_err(|e| TlsError::Bad { what: "CA file".into(), reason: e.to_string() })?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Bad { what: "TLS versions".into(), reason: e.to_string() })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Reads the CA file at `path` and builds a client that trusts only it. The error names the file and why it
/// was refused (unreadable, no PEM certificate, a certificate rustls rejects).
pub fn load_ca(path: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let pem = std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source })?;
    let what = path.display().to_string();
    let named = |e: TlsError| match e {
        TlsError::NoCertificate { .. } => TlsError::NoCertificate { what: what.clone() },
        TlsError::Bad { reason, .. } => TlsError::Bad { what: what.clone(), reason },
        other => other,
    };
    client_config(&pem).map(Arc::new).map_err(named)
}

/// How a client reaches its server, decided once when its configuration is resolved.
///
/// There is no third state: a client that was asked for TLS holds a working TLS configuration, or it was never
/// built. A CA that does not parse, or cannot be read, is an error where the configuration is resolved; it can
/// never turn into a plaintext connection later.
#[derive(Debug, Clone, Default)]
pub enum Transport {
    /// Plaintext, chosen explicitly (`mqtt://`).
    #[default]
    Plain,
    /// TLS, trusting only the pinned CA.
    Tls(Arc<rustls::ClientConfig>),
}

impl Transport {
    /// The transport for a URL whose scheme asks for TLS (`tls`) or not, with the pinned CA if one is
    /// configured. TLS without a CA is an error, never plaintext.
    pub fn resolve(tls: bool, ca: Option<&Arc<rustls::ClientConfig>>) -> Result<Transport, TlsError> {
        match (tls, ca) {
            (true, Some(c)) => Ok(Transport::Tls(c.clone())),
            (true, None) => Err(TlsError::Mismatch("TLS was asked for, but no CA to check the server against".into())),
            (false, _) => Ok(Transport::Plain),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Transport::Tls(_))
    }
}

/// Two transports are equal when both are plaintext or both hold the same TLS configuration.
impl PartialEq for Transport {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Transport::Plain, Transport::Plain) => true,
            (Transport::Tls(a), Transport::Tls(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for Transport {}

/// A server presenting the chain in `cert_pem` with the key in `key_pem`.
pub fn server_config(cert_pem: &[u8], key_pem: &[u8], alpn: &[&[u8]]) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certs(cert_pem, "certificate file")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| TlsError::Bad { what: "key file".into(), reason: format!("not a PEM private key: {e}") })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Bad { what: "TLS versions".into(), reason: e.to_string() })?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Bad { what: "certificate and key".into(), reason: e.to_string() })?;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_that_cannot_be_used_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        let err = load_ca(&p).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{}: cannot read: ", p.display())), "{err}");
        std::fs::write(&p, "not a certificate").unwrap();
        assert_eq!(load_ca(&p).unwrap_err().to_string(), format!("{}: no PEM certificate in it", p.display()));
        std::fs::write(&p, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").unwrap();
        assert!(load_ca(&p).unwrap_err().to_string().starts_with(&format!("{}: ", p.display())));
        assert!(Transport::resolve(true, None).is_err(), "TLS without a CA is never plaintext");
        assert_eq!(Transport::resolve(false, None).unwrap(), Transport::Plain);
    }
}
