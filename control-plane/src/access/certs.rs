//! `certs init`: a development certificate authority and a server certificate signed by it, for a first setup
//! or a demo. Production fleets bring certificates from their own PKI; the files have the same shape.

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The files `certs init` writes.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The CA certificate: agents pin it (`[tls] ca_file`).
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    /// The server's certificate and key: the control plane's `[tls] cert` and `key`.
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn write(path: &Path, text: &str, private: bool) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("creating {} (existing files are never overwritten)", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Writes `ca.pem`, `ca.key`, `server.pem` and `server.key` into `dir`. The server certificate names
/// `localhost`, `127.0.0.1`, `::1` and each of `names` (host names or IP addresses).
pub fn init(dir: &Path, names: &[String]) -> anyhow::Result<CertFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let files = CertFiles {
        ca: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    };
    for f in [&files.ca, &files.ca_key, &files.cert, &files.key] {
        anyhow::ensure!(!f.exists(), "{} exists; certs init never overwrites", f.display());
    }
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "edgeloop development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_pem_key = ca_key.serialize_pem();
    let issuer = CertifiedIssuer::self_signed(ca, ca_key).context("signing the CA certificate")?;

    let mut sans = vec!["localhost".to_string()];
    sans.extend(names.iter().filter(|n| n.parse::<std::net::IpAddr>().is_err()).cloned());
    let mut server = CertificateParams::new(sans)?;
    for ip in ["127.0.0.1", "::1"].iter().map(|s| s.to_string()).chain(names.iter().cloned()) {
        if let Ok(addr) = ip.parse::<std::net::IpAddr>() {
            server.subject_alt_names.push(SanType::IpAddress(addr));
        }
    }
    server.distinguished_name.push(DnType::CommonName, "edgeloop control plane");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.use_authority_key_identifier_extension = true;
    let server_key = KeyPair::generate().context("generating the server key")?;
    let server_cert = server.signed_by(&server_key, &issuer).context("signing the server certificate")?;

    write(&files.ca, &issuer.pem(), false)?;
    write(&files.ca_key, &ca_pem_key, true)?;
    write(&files.cert, &server_cert.pem(), false)?;
    write(&files.key, &server_key.serialize_pem(), true)?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_ca_and_a_server_certificate_rustls_accepts() {
        let dir = tempfile::tempdir().unwrap();
        let f = init(dir.path(), &["cp.factory.local".into(), "10.0.0.5".into()]).unwrap();
        let ca = std::fs::read(&f.ca).unwrap();
        let (cert, key) = (std::fs::read(&f.cert).unwrap(), std::fs::read(&f.key).unwrap());
        edgeloop_common::tls::client_config(&ca).unwrap();
        edgeloop_common::tls::server_config(&cert, &key, &[]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&f.key).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&f.ca_key).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(init(dir.path(), &[]).unwrap_err().to_string().contains("never overwrites"));
    }
}
