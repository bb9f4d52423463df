//! Update bundles for sites with no network: one file holding a signed desired state for a whole device
//! class (its manifest inside it) and the model artifact, carried to the site on whatever medium works there.
//!
//! The desired state in a bundle names [`ANY_DEVICE`] instead of one device. Its sequence is chosen by the
//! control plane above every sequence it has issued to the class, and later online desired states for the
//! class go above it, so an agent's one sequence rule (strictly increasing) orders bundles and online states
//! alike: a bundle older than what a device runs is refused as a replay. The artifact is not signed on its
//! own: the signed manifest names its size and SHA-256, and the agent checks both before it keeps a byte.

use crate::signing::Signed;
use serde::{Deserialize, Serialize};

/// The device a bundle's desired state names: every device of its class. Agents accept it only from a
/// bundle, never over MQTT.
pub const ANY_DEVICE: &str = "*";

/// The bundle format this build writes and reads.
pub const FORMAT: u32 = 1;

/// What a bundle file holds (CBOR).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    pub format: u32,
    /// A signed [`crate::update::DesiredState`] for [`ANY_DEVICE`] of one class.
    pub desired: Signed,
    /// The model file the manifest inside `desired` describes.
    #[serde(with = "serde_bytes")]
    pub artifact: Vec<u8>,
    /// A signed [`crate::update::DesiredConfig`] for [`ANY_DEVICE`] of the class: a class configuration to
    /// apply with the model. Absent from bundles that carry a model only (and from those of older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<Signed>,
}

/// Why a file is not a bundle this build can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    #[error("not an edgeloop update bundle (CBOR: {0})")]
    Decode(String),
    #[error("bundle format {0} is not one this build reads (it reads {FORMAT})")]
    Format(u32),
}

impl Bundle {
    pub fn encode(&self) -> Vec<u8> {
        crate::signing::to_cbor_with_capacity(self, self.artifact.len() + self.desired.payload.len() + 256)
    }

    pub fn decode(bytes: &[u8]) -> Result<Bundle, BundleError> {
        let b: Bundle = ciborium::from_reader(bytes).map_err(|e| BundleError::Decode(e.to_string()))?;
        if b.format != FORMAT {
            return Err(BundleError::Format(b.format));
        }
        Ok(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_round_trips_and_garbage_or_another_format_is_named() {
        let b = Bundle {
            format: FORMAT,
            desired: Signed { payload: vec![1, 2], key_id: "k".into(), sig: vec![3] },
            artifact: vec![9; 1000],
            config: None,
        };
        assert_eq!(Bundle::decode(&b.encode()).unwrap(), b);
        assert!(matches!(Bundle::decode(b"PK\x03\x04 a zip file"), Err(BundleError::Decode(_))));
        // A bundle with a class configuration round-trips too; one without encodes as before.
        let with = Bundle { config: Some(Signed { payload: vec![5], key_id: "k".into(), sig: vec![6] }), ..b.clone() };
        assert_eq!(Bundle::decode(&with.encode()).unwrap(), with);
        assert!(with.encode().len() > b.encode().len());
        let newer = Bundle { format: 2, ..b };
        assert_eq!(Bundle::decode(&newer.encode()).unwrap_err(), BundleError::Format(2));
    }
}
