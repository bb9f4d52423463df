//! Class configurations: `firmware-configs/<class>.toml` published as numbered, signed versions that roll out
//! like models (`kind: config`), so that changing the uplink or outbox settings of a thousand devices is one
//! publish and one rollout rather than a thousand files.
//!
//! Publishing checks the text with the same validator the agent applies to its class file
//! ([`ClassConfig::from_toml`]), numbers it per class (1, 2, ...) and signs a [`ConfigRelease`]. Publishing
//! the text of the latest version again is a no-op that returns it.

use super::store::RolloutStore;
use crate::fleet::telemetry::StoreError;
use edgeloop_common::config::ClassConfig;
use edgeloop_common::signing::{Signed, Signer};
use edgeloop_common::update::ConfigRelease;
use serde::{Deserialize, Serialize};

/// One published class configuration, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigVersion {
    pub class: String,
    pub version: u32,
    pub sha256: String,
    pub toml: String,
    pub created_ms: u64,
    /// The signed [`ConfigRelease`], as devices receive it.
    pub signed: Signed,
}

/// A class configuration as the API shows it.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigView {
    pub class: String,
    pub version: u32,
    pub sha256: String,
    pub created_ms: u64,
    /// The class file's text, exactly as published.
    pub toml: String,
    /// The uplink and outbox settings, parsed (what a rollout of it changes on a device).
    pub uplink: edgeloop_common::config::UplinkConfig,
    pub outbox: edgeloop_common::config::OutboxConfig,
}

impl ConfigVersion {
    pub fn view(&self) -> ConfigView {
        // Stored versions were validated when published.
        let parsed = ClassConfig::from_toml("stored", &self.toml).ok();
        ConfigView {
            class: self.class.clone(),
            version: self.version,
            sha256: self.sha256.clone(),
            created_ms: self.created_ms,
            toml: self.toml.clone(),
            uplink: parsed.as_ref().map(|c| c.uplink.clone()).unwrap_or_default(),
            outbox: parsed.map(|c| c.outbox).unwrap_or_default(),
        }
    }
}

/// Why a class configuration was not published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The text is not a valid class file; the message names the key.
    #[error(transparent)]
    Invalid(#[from] edgeloop_common::config::ConfigError),
    #[error("class `{0}` has published the largest version there is")]
    Exhausted(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks `toml` (named `source` in errors), and records and signs it as the next version of its class, unless
/// it is the text of the latest version already. Returns the version and whether it is new. Not yet durable.
pub fn publish(
    store: &RolloutStore,
    signer: &Signer,
    source: &str,
    toml: &str,
    now_ms: u64,
) -> Result<(ConfigVersion, bool), PublishError> {
    let parsed = ClassConfig::from_toml(source, toml)?;
    let sha256 = edgeloop_common::signing::sha256_hex(toml.as_bytes());
    let latest = store.configs(Some(&parsed.class))?.into_iter().max_by_key(|c| c.version);
    if let Some(l) = latest.as_ref().filter(|l| l.sha256 == sha256) {
        return Ok((l.clone(), false));
    }
    let version = match &latest {
        None => 1,
        Some(l) => l.version.checked_add(1).ok_or_else(|| PublishError::Exhausted(parsed.class.clone()))?,
    };
    let release = ConfigRelease {
        class: parsed.class.clone(),
        version,
        sha256: sha256.clone(),
        toml: toml.into(),
        created_ms: now_ms,
    };
    let c = ConfigVersion {
        class: parsed.class,
        version,
        sha256,
        toml: toml.into(),
        created_ms: now_ms,
        signed: Signed::sign(&release, signer),
    };
    store.put_config(&c)?;
    Ok((c, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "class = \"press\"\n[[sensors]]\nname = \"t\"\nkind = \"slow\"\nrate_hz = 1.0\n";

    #[test]
    fn versions_count_per_class_the_same_text_is_not_published_twice_and_bad_text_names_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let db = edgeloop_common::durable::DurableDb::open(dir.path(), Default::default()).unwrap();
        let store = RolloutStore::open(&db).unwrap();
        let signer = Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap();
        let (v1, new) = publish(&store, &signer, "press.toml", TEXT, 1).unwrap();
        assert_eq!((v1.version, new), (1, true));
        let (again, new) = publish(&store, &signer, "press.toml", TEXT, 2).unwrap();
        assert_eq!((again.version, new, again.created_ms), (1, false, 1));
        let tuned = format!("{TEXT}[uplink]\nbatch_max_records = 20\n");
        let (v2, _) = publish(&store, &signer, "press.toml", &tuned, 3).unwrap();
        assert_eq!(v2.version, 2);
        assert_eq!(v2.view().uplink.batch_max_records, 20);
        let other = TEXT.replace("press", "lathe");
        assert_eq!(publish(&store, &signer, "lathe.toml", &other, 4).unwrap().0.version, 1);
        assert_eq!(store.configs(Some("press")).unwrap().iter().map(|c| c.version).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(store.configs(None).unwrap().len(), 3);
        // The release is signed and says what the store says.
        let r: ConfigRelease = v2.signed.verify(&[signer.trusted(None)], 5).unwrap();
        assert_eq!((r.version, r.sha256, r.toml), (2, v2.sha256.clone(), tuned));
        // A bad text: refused, naming the file and key, and nothing stored.
        let bad = format!("{TEXT}[uplink]\nbatch_max_records = 0\n");
        let err = publish(&store, &signer, "press.toml", &bad, 6).unwrap_err().to_string();
        assert!(err.contains("press.toml") && err.contains("uplink.batch_max_records"), "{err}");
        assert_eq!(store.configs(Some("press")).unwrap().len(), 2);
    }
}
