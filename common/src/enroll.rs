//! The enrollment request: the body of `POST /api/v1/enroll`, signed with the device's own Ed25519 key.
//!
//! The signature proves that whoever enrolls holds the private half of `public_key`, so knowing a device's
//! public key (any viewer can read it) is not enough to be issued credentials in its name. What is signed is
//! a short text, one field a line (see [`signing_bytes`]), so that a client in any language can produce it:
//!
//! ```text
//! edgeloop-enroll-v1\n{device}\n{class}\n{public_key}\n{token}\n{issued_at_ms}
//! ```
//!
//! `issued_at_ms` (the device's clock, Unix ms) bounds how long a request can be used ([`FRESHNESS_MS`]
//! either way of the control plane's clock), and the control plane accepts a device's requests only in
//! strictly increasing `issued_at_ms`, so a captured request cannot be sent again.

use crate::signing::{hex, unhex};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};

/// The first line of the signed text: names the purpose and the version of the format, so that a signature
/// made for anything else never verifies as an enrollment.
pub const CONTEXT: &str = "edgeloop-enroll-v1";

/// How far `issued_at_ms` may be from the control plane's clock, either way: 10 minutes.
pub const FRESHNESS_MS: u64 = 10 * 60 * 1000;

/// The body of `POST /api/v1/enroll`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EnrollRequest {
    pub device: String,
    pub class: String,
    /// The device's Ed25519 public key: the 32 raw bytes as 64 hex digits.
    pub public_key: String,
    /// The enrollment token, `ele_<id>_<secret>`.
    pub token: String,
    /// When the device made the request, by its clock, Unix ms.
    pub issued_at_ms: u64,
    /// Ed25519 signature (64 bytes, as 128 hex digits) over the signing bytes (docs/protocol.md,
    /// "Enrollment"), made with the private half of `public_key`.
    pub signature: String,
}

/// Why a request is refused before the control plane looks at its token or at the device's record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// A field is malformed; names the field.
    #[error("{field}: {reason}")]
    Malformed { field: &'static str, reason: String },
    #[error(
        "signature: does not verify with `public_key`; the request must be signed with the device's own key \
         (protocol.md, \"Enrollment\")"
    )]
    BadSignature,
    #[error(
        "issued_at_ms: {issued_at_ms} is {off_secs} s {direction} the control plane's clock ({now_ms}); a request \
         is good for {} s either way: check the device's clock",
        FRESHNESS_MS / 1000
    )]
    Stale { issued_at_ms: u64, now_ms: u64, off_secs: u64, direction: &'static str },
}

/// The exact bytes signed: [`CONTEXT`] and the five fields, each as sent (UTF-8, `issued_at_ms` in decimal
/// without leading zeros), joined by a single `\n`, with no newline at the end.
pub fn signing_bytes(device: &str, class: &str, public_key: &str, token: &str, issued_at_ms: u64) -> Vec<u8> {
    format!("{CONTEXT}\n{device}\n{class}\n{public_key}\n{token}\n{issued_at_ms}").into_bytes()
}

impl EnrollRequest {
    /// A request for `device` of `class`, signed with `key`.
    pub fn signed(key: &Ed25519KeyPair, device: &str, class: &str, token: &str, issued_at_ms: u64) -> EnrollRequest {
        let public_key = hex(key.public_key().as_ref());
        let signature = hex(key.sign(&signing_bytes(device, class, &public_key, token, issued_at_ms)).as_ref());
        EnrollRequest {
            device: device.to_string(),
            class: class.to_string(),
            public_key,
            token: token.to_string(),
            issued_at_ms,
            signature,
        }
    }

    pub fn signing_bytes(&self) -> Vec<u8> {
        signing_bytes(&self.device, &self.class, &self.public_key, &self.token, self.issued_at_ms)
    }

    /// Checks the form of every field and the signature; returns the raw public key. Pure.
    ///
    /// No field may hold a control character (a newline would make the signed text ambiguous).
    pub fn verify(&self) -> Result<Vec<u8>, RequestError> {
        crate::topics::validate_device_id(&self.device)
            .map_err(|e| RequestError::Malformed { field: "device", reason: e.to_string() })?;
        for (field, v) in [("class", &self.class), ("token", &self.token)] {
            if v.is_empty() || v.len() > 256 || v.chars().any(char::is_control) {
                let reason = "must be 1 to 256 characters, none of them a control character".to_string();
                return Err(RequestError::Malformed { field, reason });
            }
        }
        let key = unhex(&self.public_key).filter(|k| k.len() == 32).ok_or_else(|| RequestError::Malformed {
            field: "public_key",
            reason: "must be 64 hex digits (an Ed25519 public key)".into(),
        })?;
        let sig = unhex(&self.signature).filter(|s| s.len() == 64).ok_or_else(|| RequestError::Malformed {
            field: "signature",
            reason: "must be 128 hex digits (an Ed25519 signature)".into(),
        })?;
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, &key)
            .verify(&self.signing_bytes(), &sig)
            .map_err(|_| RequestError::BadSignature)?;
        Ok(key)
    }

    /// Checks that `issued_at_ms` is within [`FRESHNESS_MS`] of `now_ms`. Pure.
    pub fn check_fresh(&self, now_ms: u64) -> Result<(), RequestError> {
        let off = self.issued_at_ms.abs_diff(now_ms);
        if off <= FRESHNESS_MS {
            return Ok(());
        }
        let direction = if self.issued_at_ms > now_ms { "ahead of" } else { "behind" };
        Err(RequestError::Stale { issued_at_ms: self.issued_at_ms, now_ms, off_secs: off / 1000, direction })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap()
    }

    #[test]
    fn signed_requests_verify_and_every_field_is_covered() {
        let r = EnrollRequest::signed(&key(1), "press-01", "press", "ele_0a0b0c0d_ff", 1_000);
        assert_eq!(r.verify().unwrap(), key(1).public_key().as_ref());
        assert_eq!(
            r.signing_bytes(),
            format!("edgeloop-enroll-v1\npress-01\npress\n{}\nele_0a0b0c0d_ff\n1000", r.public_key).into_bytes()
        );
        let changed: [&dyn Fn(&mut EnrollRequest); 5] = [
            &|r| r.device = "press-02".into(),
            &|r| r.class = "other".into(),
            &|r| r.token = "ele_0a0b0c0d_fe".into(),
            &|r| r.issued_at_ms += 1,
            &|r| r.public_key = hex(key(2).public_key().as_ref()),
        ];
        for change in changed {
            let mut m = r.clone();
            change(&mut m);
            assert_eq!(m.verify(), Err(RequestError::BadSignature), "{m:?}");
        }
        // Someone who knows only the public key signs with their own key.
        let mut forged = EnrollRequest::signed(&key(2), "press-01", "press", "ele_0a0b0c0d_ff", 1_000);
        forged.public_key = r.public_key.clone();
        assert_eq!(forged.verify(), Err(RequestError::BadSignature));
    }

    #[test]
    fn malformed_fields_are_named() {
        let r = EnrollRequest::signed(&key(1), "press-01", "press", "ele_0a0b0c0d_ff", 1_000);
        let field = |f: &dyn Fn(&mut EnrollRequest)| {
            let mut m = r.clone();
            f(&mut m);
            match m.verify() {
                Err(RequestError::Malformed { field, .. }) => field,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(field(&|r| r.device = "a b".into()), "device");
        assert_eq!(field(&|r| r.class = "press\nx".into()), "class");
        assert_eq!(field(&|r| r.token = String::new()), "token");
        assert_eq!(field(&|r| r.public_key = "abc".into()), "public_key");
        assert_eq!(field(&|r| r.signature = "00".repeat(63)), "signature");
        let e = r.clone().verify().map(|_| ());
        assert_eq!(e, Ok(()));
    }

    #[test]
    fn freshness_window_both_ways() {
        let r = EnrollRequest::signed(&key(1), "d", "c", "t", 100_000_000);
        assert!(r.check_fresh(100_000_000 + FRESHNESS_MS).is_ok());
        assert!(r.check_fresh(100_000_000 - FRESHNESS_MS).is_ok());
        let late = r.check_fresh(100_000_000 + FRESHNESS_MS + 1).unwrap_err();
        assert!(late.to_string().contains("behind"), "{late}");
        let early = r.check_fresh(0).unwrap_err();
        assert!(early.to_string().starts_with("issued_at_ms: 100000000 is 100000 s ahead of"), "{early}");
    }
}
