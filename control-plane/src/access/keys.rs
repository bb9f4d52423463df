//! The control plane's Ed25519 signing key on disk: PKCS#8 bytes in a file only its owner may read.

use anyhow::Context;
use edgeloop_common::signing::Signer;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes a new key to `path` (mode 0600), refusing to overwrite one. Returns it.
pub fn generate(path: &Path) -> anyhow::Result<Signer> {
    let pkcs8 = Signer::generate_pkcs8();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (an existing key is never overwritten)", path.display()))?;
    f.write_all(&pkcs8)?;
    f.sync_all()?;
    Signer::from_pkcs8(&pkcs8).map_err(anyhow::Error::msg)
}

/// Reads a key, refusing one that others may read.
pub fn load(path: &Path) -> anyhow::Result<Signer> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading signing key {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    anyhow::ensure!(
        mode & 0o077 == 0,
        "signing key {}: mode {mode:o} lets others read it; run `chmod 600 {}`",
        path.display(),
        path.display()
    );
    let bytes = std::fs::read(path).with_context(|| format!("reading signing key {}", path.display()))?;
    Signer::from_pkcs8(&bytes).map_err(|e| anyhow::anyhow!("signing key {}: {e}", path.display()))
}

/// Loads the key, or creates it when it does not exist yet (first start).
pub fn load_or_create(path: &Path) -> anyhow::Result<Signer> {
    if path.exists() {
        return load(path);
    }
    let s = generate(path)?;
    tracing::info!(key_id = s.key_id(), path = %path.display(), "signing key created");
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_private_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k/signing.key");
        let s = generate(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load(&p).unwrap().key_id(), s.key_id());
        assert!(generate(&p).unwrap_err().to_string().contains("never overwritten"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, b"junk").unwrap();
        assert!(load(&p).unwrap_err().to_string().contains("not an Ed25519 PKCS#8 key"));
    }
}
