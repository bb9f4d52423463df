//! Device identity: enrollment tokens, enrolled devices and their keys, broker credentials, revocation.
//!
//! An admin creates an enrollment token for a device class, with a use limit and an expiry; only its SHA-256
//! is stored. A device enrolls once with its id, class, Ed25519 public key and the token, and receives MQTT
//! credentials (username = device id, a random password, stored hashed). From then on:
//! - the broker admits only enrolled, non-revoked devices whose client id and username are their device id;
//! - ingest verifies every uplink envelope against the device's enrolled key.
//!
//! A device that enrolls again with the same key gets new credentials (a lost credentials file); with another
//! key it is refused until an admin revokes the old identity, so a class token cannot take over a device id.
//! Everything is in sled (committed durably) and mirrored in memory for the broker's and ingest's hot paths.

use crate::store::StoreError;
use edgeloop_common::durable::DurableDb;
use edgeloop_common::signing::{hex, sha256_hex, unhex};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::RwLock;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub id: String,
    pub class: String,
    pub sha256: String,
    pub uses_left: u32,
    pub expires_ms: u64,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolled {
    pub device: String,
    pub class: String,
    /// Ed25519 public key, hex.
    pub public_key: String,
    pub password_sha256: String,
    pub enrolled_ms: u64,
    pub revoked: bool,
    #[serde(default)]
    pub revoked_ms: Option<u64>,
}

/// What a device gets back from enrolling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("{0}")]
    Bad(String),
    #[error("enrollment token refused: {0}")]
    Token(&'static str),
    #[error(
        "device `{0}` is enrolled with another key; a replaced device enrolls under a new id (revoke the old one)"
    )]
    Conflict(String),
    #[error("device `{0}` is revoked")]
    Revoked(String),
    #[error("{0}")]
    Store(String),
}

impl From<sled::Error> for EnrollError {
    fn from(e: sled::Error) -> Self {
        EnrollError::Store(e.to_string())
    }
}

impl From<StoreError> for EnrollError {
    fn from(e: StoreError) -> Self {
        EnrollError::Store(e.to_string())
    }
}

/// Random bytes from the system RNG, in hex.
pub fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    ring::rand::SystemRandom::new().fill(&mut b).expect("the system RNG works");
    hex(&b)
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    edgeloop_common::signing::to_cbor(v)
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, v: &[u8]) -> Result<T, StoreError> {
    ciborium::from_reader(v).map_err(|e| StoreError::Corrupt { device: what.into(), seq: 0, reason: e.to_string() })
}

pub struct Enrollment {
    db: DurableDb,
    tokens: sled::Tree,
    devices: sled::Tree,
    cache: RwLock<HashMap<String, Enrolled>>,
    token_lock: std::sync::Mutex<()>,
}

impl Enrollment {
    pub fn open(db: &DurableDb) -> Result<Enrollment, StoreError> {
        let devices = db.tree("enrolled")?;
        let mut cache = HashMap::new();
        for kv in devices.iter() {
            let (_, v) = kv?;
            let e: Enrolled = decode("enrolled", &v)?;
            cache.insert(e.device.clone(), e);
        }
        Ok(Enrollment {
            tokens: db.tree("enrollment_tokens")?,
            devices,
            db: db.clone(),
            cache: RwLock::new(cache),
            token_lock: std::sync::Mutex::new(()),
        })
    }

    /// Creates a token for `class`, good for `uses` enrollments until `expires_ms`. Blocking.
    pub fn create_token(
        &self,
        class: &str,
        uses: u32,
        expires_ms: u64,
        now_ms: u64,
    ) -> Result<(EnrollmentToken, String), EnrollError> {
        if class.is_empty() || uses == 0 || expires_ms <= now_ms {
            return Err(EnrollError::Bad("class must be set, uses at least 1, and the expiry in the future".into()));
        }
        let (id, secret) = (random_hex(4), random_hex(32));
        let t = EnrollmentToken {
            id: id.clone(),
            class: class.to_string(),
            sha256: sha256_hex(secret.as_bytes()),
            uses_left: uses,
            expires_ms,
            created_ms: now_ms,
        };
        self.tokens.insert(id.as_bytes(), encode(&t))?;
        self.db.commit().map_err(StoreError::from)?;
        Ok((t, format!("ele_{id}_{secret}")))
    }

    /// Withdraws an enrollment token: no device can enroll with it any more. Blocking.
    pub fn revoke_token(&self, id: &str) -> Result<EnrollmentToken, EnrollError> {
        let _one_at_a_time = self.token_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut t: EnrollmentToken = match self.tokens.get(id.as_bytes())? {
            Some(v) => decode("enrollment token", &v)?,
            None => return Err(EnrollError::Bad(format!("no enrollment token `{id}`"))),
        };
        t.uses_left = 0;
        self.tokens.insert(id.as_bytes(), encode(&t))?;
        self.db.commit().map_err(StoreError::from)?;
        Ok(t)
    }

    pub fn tokens(&self) -> Result<Vec<EnrollmentToken>, StoreError> {
        self.tokens.iter().map(|kv| decode("enrollment token", &kv?.1)).collect()
    }

    /// Enrolls a device (or renews its credentials). Blocking.
    pub fn enroll(
        &self,
        device: &str,
        class: &str,
        public_key_hex: &str,
        token: &str,
        now_ms: u64,
    ) -> Result<Credentials, EnrollError> {
        edgeloop_common::topics::validate_device_id(device).map_err(|e| EnrollError::Bad(format!("device: {e}")))?;
        if unhex(public_key_hex).is_none_or(|k| k.len() != 32) {
            return Err(EnrollError::Bad("public_key: must be 64 hex digits (an Ed25519 public key)".into()));
        }
        let (id, secret) = token
            .strip_prefix("ele_")
            .and_then(|r| r.split_once('_'))
            .ok_or(EnrollError::Token("not of the form ele_<id>_<secret>"))?;
        let _one_at_a_time = self.token_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut t: EnrollmentToken = match self.tokens.get(id.as_bytes())? {
            Some(v) => decode("enrollment token", &v)?,
            None => return Err(EnrollError::Token("unknown token")),
        };
        if !same(&t.sha256, &sha256_hex(secret.as_bytes())) {
            return Err(EnrollError::Token("unknown token"));
        }
        if now_ms > t.expires_ms {
            return Err(EnrollError::Token("expired"));
        }
        if t.uses_left == 0 {
            return Err(EnrollError::Token("no uses left"));
        }
        if t.class != class {
            return Err(EnrollError::Token("issued for another device class"));
        }
        if let Some(existing) = self.get(device) {
            if existing.revoked {
                return Err(EnrollError::Revoked(device.to_string()));
            }
            if existing.public_key != public_key_hex.to_ascii_lowercase() {
                return Err(EnrollError::Conflict(device.to_string()));
            }
        }
        t.uses_left -= 1;
        let password = random_hex(24);
        let e = Enrolled {
            device: device.to_string(),
            class: class.to_string(),
            public_key: public_key_hex.to_ascii_lowercase(),
            password_sha256: sha256_hex(password.as_bytes()),
            enrolled_ms: now_ms,
            revoked: false,
            revoked_ms: None,
        };
        self.tokens.insert(id.as_bytes(), encode(&t))?;
        self.devices.insert(device.as_bytes(), encode(&e))?;
        self.db.commit().map_err(StoreError::from)?;
        self.cache.write().unwrap_or_else(|p| p.into_inner()).insert(device.to_string(), e);
        Ok(Credentials { username: device.to_string(), password })
    }

    pub fn get(&self, device: &str) -> Option<Enrolled> {
        self.cache.read().unwrap_or_else(|p| p.into_inner()).get(device).cloned()
    }

    pub fn list(&self) -> Vec<Enrolled> {
        let mut v: Vec<Enrolled> = self.cache.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        v.sort_by(|a, b| a.device.cmp(&b.device));
        v
    }

    /// The device's public key, if it is enrolled and not revoked.
    pub fn public_key(&self, device: &str) -> Result<Vec<u8>, &'static str> {
        let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
        let e = c.get(device).ok_or("not_enrolled")?;
        if e.revoked {
            return Err("revoked");
        }
        unhex(&e.public_key).ok_or("not_enrolled")
    }

    /// Broker admission: client id and username are the device id, the password matches, not revoked.
    pub fn admit(&self, client_id: &str, username: &str, password: &str) -> bool {
        if client_id != username {
            return false;
        }
        let c = self.cache.read().unwrap_or_else(|p| p.into_inner());
        c.get(username).is_some_and(|e| !e.revoked && same(&e.password_sha256, &sha256_hex(password.as_bytes())))
    }

    /// Revokes a device. Blocking.
    pub fn revoke(&self, device: &str, now_ms: u64) -> Result<Enrolled, EnrollError> {
        let mut e = self.get(device).ok_or_else(|| EnrollError::Bad(format!("device `{device}` is not enrolled")))?;
        e.revoked = true;
        e.revoked_ms = Some(now_ms);
        self.devices.insert(device.as_bytes(), encode(&e))?;
        self.db.commit().map_err(StoreError::from)?;
        self.cache.write().unwrap_or_else(|p| p.into_inner()).insert(device.to_string(), e.clone());
        Ok(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> Enrollment {
        Enrollment::open(&DurableDb::open(dir, edgeloop_common::durable::Durability::Flush).unwrap()).unwrap()
    }

    const KEY_A: &str = "aa00000000000000000000000000000000000000000000000000000000000000";
    const KEY_B: &str = "bb00000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn enrollment_token_exhausted_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let en = open(dir.path());
        let (_, token) = en.create_token("press", 2, 10_000, 0).unwrap();
        let c1 = en.enroll("d1", "press", KEY_A, &token, 1).unwrap();
        en.enroll("d2", "press", KEY_B, &token, 2).unwrap();
        assert_eq!(en.enroll("d3", "press", KEY_A, &token, 3), Err(EnrollError::Token("no uses left")));
        let (t2, token2) = en.create_token("press", 5, 10_000, 0).unwrap();
        en.revoke_token(&t2.id).unwrap();
        assert_eq!(en.enroll("d4", "press", KEY_A, &token2, 4), Err(EnrollError::Token("no uses left")), "withdrawn");
        assert!(matches!(en.revoke_token("nope"), Err(EnrollError::Bad(_))));
        assert!(en.admit("d1", "d1", &c1.password));
        assert!(!en.admit("d1", "d1", "guess"));
        assert!(!en.admit("d2", "d1", &c1.password), "client id must be the username");
        assert!(!en.admit("d3", "d3", ""), "never enrolled");
    }

    #[test]
    fn tokens_are_checked_for_secret_class_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let en = open(dir.path());
        let (t, token) = en.create_token("press", 5, 10_000, 0).unwrap();
        assert_eq!(
            en.enroll("d1", "city-traffic", KEY_A, &token, 1),
            Err(EnrollError::Token("issued for another device class"))
        );
        assert_eq!(en.enroll("d1", "press", KEY_A, &token, 10_001), Err(EnrollError::Token("expired")));
        let forged = format!("ele_{}_{}", t.id, "0".repeat(64));
        assert_eq!(en.enroll("d1", "press", KEY_A, &forged, 1), Err(EnrollError::Token("unknown token")));
        assert!(matches!(en.enroll("d 1", "press", KEY_A, &token, 1), Err(EnrollError::Bad(_))));
        assert!(matches!(en.enroll("d1", "press", "abc", &token, 1), Err(EnrollError::Bad(_))));
        assert!(!std::str::from_utf8(&en.tokens.get(t.id.as_bytes()).unwrap().unwrap())
            .unwrap_or("")
            .contains(&token[13..]));
    }

    #[test]
    fn a_device_id_cannot_be_taken_over_and_revocation_sticks() {
        let dir = tempfile::tempdir().unwrap();
        {
            let en = open(dir.path());
            let (_, token) = en.create_token("press", 10, 10_000, 0).unwrap();
            let first = en.enroll("d1", "press", KEY_A, &token, 1).unwrap();
            assert_eq!(en.enroll("d1", "press", KEY_B, &token, 2), Err(EnrollError::Conflict("d1".into())));
            let renewed = en.enroll("d1", "press", KEY_A, &token, 3).unwrap();
            assert!(!en.admit("d1", "d1", &first.password), "renewal replaces the password");
            assert!(en.admit("d1", "d1", &renewed.password));
            en.revoke("d1", 4).unwrap();
            assert!(!en.admit("d1", "d1", &renewed.password));
            assert_eq!(en.public_key("d1"), Err("revoked"));
            assert_eq!(en.enroll("d1", "press", KEY_A, &token, 5), Err(EnrollError::Revoked("d1".into())));
        }
        let en = open(dir.path());
        assert!(en.get("d1").unwrap().revoked, "revocation survives a restart");
        assert_eq!(en.public_key("nobody"), Err("not_enrolled"));
    }
}
