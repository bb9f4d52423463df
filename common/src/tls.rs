//! TLS settings shared by the agent, the control plane and the tools: rustls with the ring provider, TLS 1.2
//! and 1.3, and trust pinned to one CA (the fleet's own) rather than the system's roots.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;

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
