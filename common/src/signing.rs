//! Ed25519 signatures over CBOR bytes, the trust anchor of model updates.
//!
//! The control plane signs a payload's CBOR encoding and ships the exact bytes it signed inside a [`Signed`]
//! container, so a verifier never re-encodes anything: it checks the signature over the bytes it received and
//! only then decodes them. Payloads are encoded by this crate's own types with a fixed field order and
//! definite lengths, so the same value always gives the same bytes.
//!
//! A [`KeyId`] is derived from the public key (`ed25519:` and the first 8 bytes of its SHA-256, in hex), so it
//! cannot be chosen by whoever sends a message. Agents hold a list of [`TrustedKey`]s; listing the old and the
//! new key side by side, the old one with a `not_after_ms`, is how a key rotates with a grace period.

use ring::signature::{self, Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

/// Hex of bytes, lower case.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex; `None` if it is not hex of whole bytes.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// SHA-256 of bytes, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// The id of an Ed25519 public key.
pub fn key_id(public_key: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, public_key);
    format!("ed25519:{}", hex(&d.as_ref()[..8]))
}

/// Signed bytes: the payload exactly as signed, the signer's key id, and the signature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signed {
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub key_id: String,
    #[serde(with = "serde_bytes")]
    pub sig: Vec<u8>,
}

impl Signed {
    /// Encodes `value` to CBOR and signs those bytes.
    pub fn sign<T: Serialize>(value: &T, signer: &Signer) -> Signed {
        let payload = to_cbor(value);
        let sig = signer.pair.sign(&payload).as_ref().to_vec();
        Signed { payload, key_id: signer.key_id.clone(), sig }
    }

    /// Checks the signature against the trusted keys at time `now_ms`, then decodes the payload.
    pub fn verify<T: for<'de> Deserialize<'de>>(&self, trusted: &[TrustedKey], now_ms: u64) -> Result<T, VerifyError> {
        if self.sig.is_empty() || self.key_id.is_empty() {
            return Err(VerifyError::Unsigned);
        }
        let key =
            trusted.iter().find(|k| k.id == self.key_id).ok_or_else(|| VerifyError::UnknownKey(self.key_id.clone()))?;
        if let Some(until) = key.not_after_ms {
            if now_ms > until {
                return Err(VerifyError::KeyRetired { key_id: key.id.clone(), not_after_ms: until });
            }
        }
        signature::UnparsedPublicKey::new(&signature::ED25519, &key.public_key)
            .verify(&self.payload, &self.sig)
            .map_err(|_| VerifyError::BadSignature(self.key_id.clone()))?;
        ciborium::from_reader(&self.payload[..]).map_err(|e| VerifyError::Payload(e.to_string()))
    }
}

/// CBOR bytes of a value (fixed field order, definite lengths).
pub fn to_cbor<T: Serialize>(value: &T) -> Vec<u8> {
    to_cbor_with_capacity(value, 0)
}

/// [`to_cbor`] into a buffer that starts with `capacity` bytes, for hot paths that know the size.
pub fn to_cbor_with_capacity<T: Serialize>(value: &T, capacity: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    // Writing to a Vec cannot fail, and every type edgeloop encodes serialises.
    ciborium::into_writer(value, &mut out).expect("CBOR encoding into a Vec is infallible");
    out
}

/// Why signed bytes were refused. [`VerifyError::reason`] names each for reports and metrics.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("not signed")]
    Unsigned,
    #[error("signed by unknown key {0}")]
    UnknownKey(String),
    #[error("key {key_id} was retired at {not_after_ms} ms")]
    KeyRetired { key_id: String, not_after_ms: u64 },
    #[error("signature by {0} does not verify")]
    BadSignature(String),
    #[error("signed payload is not the expected CBOR: {0}")]
    Payload(String),
}

impl VerifyError {
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Unsigned => "unsigned",
            VerifyError::UnknownKey(_) => "unknown_key",
            VerifyError::KeyRetired { .. } => "key_retired",
            VerifyError::BadSignature(_) => "bad_signature",
            VerifyError::Payload(_) => "bad_payload",
        }
    }
}

/// A public key an agent trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedKey {
    pub id: String,
    pub public_key: Vec<u8>,
    /// After this time the key no longer verifies anything: the end of a rotation's grace period.
    pub not_after_ms: Option<u64>,
}

impl TrustedKey {
    /// From the hex public key (as `keys generate` prints it).
    pub fn from_hex(public_key_hex: &str, not_after_ms: Option<u64>) -> Result<TrustedKey, BadPublicKey> {
        let public_key = unhex(public_key_hex.trim())
            .filter(|k| k.len() == 32)
            .ok_or_else(|| BadPublicKey(public_key_hex.to_string()))?;
        Ok(TrustedKey { id: key_id(&public_key), public_key, not_after_ms })
    }
}

/// A trusted key's text that is not a hex Ed25519 public key (the text as given).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not 64 hex digits (a 32-byte Ed25519 public key)")]
pub struct BadPublicKey(pub String);

/// Bytes that are not an Ed25519 private key in PKCS#8 (ring's reason).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("not an Ed25519 PKCS#8 key: {0}")]
pub struct BadPrivateKey(pub ring::error::KeyRejected);

/// An Ed25519 signing key. Clones share the key.
#[derive(Clone)]
pub struct Signer {
    pair: std::sync::Arc<Ed25519KeyPair>,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl Signer {
    /// A fresh key as PKCS#8 bytes.
    pub fn generate_pkcs8() -> Vec<u8> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng).expect("the system RNG works").as_ref().to_vec()
    }

    pub fn from_pkcs8(bytes: &[u8]) -> Result<Signer, BadPrivateKey> {
        let pair = Ed25519KeyPair::from_pkcs8(bytes).map_err(BadPrivateKey)?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(Signer { pair: std::sync::Arc::new(pair), key_id })
    }

    /// The Ed25519 signature of `bytes`.
    pub fn sign_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        self.pair.sign(bytes).as_ref().to_vec()
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    pub fn public_key_hex(&self) -> String {
        hex(self.public_key())
    }

    /// This key as a trusted key (for tests and single-machine setups).
    pub fn trusted(&self, not_after_ms: Option<u64>) -> TrustedKey {
        TrustedKey { id: self.key_id.clone(), public_key: self.public_key().to_vec(), not_after_ms }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        Signer::from_pkcs8(&Signer::generate_pkcs8()).unwrap()
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let s = signer();
        let signed = Signed::sign(&("hello", 7u32), &s);
        let v: (String, u32) = signed.verify(&[s.trusted(None)], 0).unwrap();
        assert_eq!(v, ("hello".to_string(), 7));
        assert!(s.key_id().starts_with("ed25519:") && s.key_id().len() == 8 + 16);
    }

    #[test]
    fn tampering_unknown_keys_and_missing_signatures_are_refused() {
        let (s, other) = (signer(), signer());
        let signed = Signed::sign(&42u64, &s);
        let mut tampered = signed.clone();
        tampered.payload = to_cbor(&43u64);
        assert_eq!(tampered.verify::<u64>(&[s.trusted(None)], 0), Err(VerifyError::BadSignature(s.key_id().into())));
        assert_eq!(signed.verify::<u64>(&[other.trusted(None)], 0), Err(VerifyError::UnknownKey(s.key_id().into())));
        // A forger who relabels their signature with a trusted key id still fails.
        let mut forged = Signed::sign(&43u64, &other);
        forged.key_id = s.key_id().into();
        assert!(matches!(forged.verify::<u64>(&[s.trusted(None)], 0), Err(VerifyError::BadSignature(_))));
        let unsigned = Signed { payload: to_cbor(&42u64), key_id: String::new(), sig: vec![] };
        assert_eq!(unsigned.verify::<u64>(&[s.trusted(None)], 0), Err(VerifyError::Unsigned));
    }

    #[test]
    fn key_rotation_grace_period() {
        let (old, new) = (signer(), signer());
        // During the grace period an agent trusts both keys; the old one expires at t = 1000.
        let trusted = [old.trusted(Some(1000)), new.trusted(None)];
        let by_old = Signed::sign(&1u8, &old);
        let by_new = Signed::sign(&2u8, &new);
        assert_eq!(by_old.verify::<u8>(&trusted, 999), Ok(1));
        assert_eq!(by_new.verify::<u8>(&trusted, 999), Ok(2));
        assert_eq!(
            by_old.verify::<u8>(&trusted, 1001),
            Err(VerifyError::KeyRetired { key_id: old.key_id().into(), not_after_ms: 1000 })
        );
        assert_eq!(by_new.verify::<u8>(&trusted, 1001), Ok(2));
        // Once the old key is removed from the config it is simply unknown.
        assert!(matches!(by_old.verify::<u8>(&trusted[1..], 0), Err(VerifyError::UnknownKey(_))));
    }

    #[test]
    fn hex_round_trip_and_trusted_key_parsing() {
        assert_eq!(unhex(&hex(&[0, 1, 254, 255])), Some(vec![0, 1, 254, 255]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        let s = signer();
        let k = TrustedKey::from_hex(&s.public_key_hex(), None).unwrap();
        assert_eq!(k.id, s.key_id());
        assert_eq!(TrustedKey::from_hex("abcd", None), Err(BadPublicKey("abcd".into())));
        assert!(TrustedKey::from_hex("abcd", None).unwrap_err().to_string().contains("64 hex digits"));
        assert!(Signer::from_pkcs8(b"junk").unwrap_err().to_string().starts_with("not an Ed25519 PKCS#8 key: "));
    }
}
