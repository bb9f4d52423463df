//! Where rollouts, desired states and device tags live: sled trees behind a narrow type, committed durably
//! before anything is published, so a restart resumes exactly where the control plane stopped.

use super::engine::Rollout;
use crate::store::StoreError;
use edgeloop_common::durable::DurableDb;
use serde::{Deserialize, Serialize};

/// The last desired state issued to a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Issued {
    pub seq: u64,
    pub rollout: Option<String>,
    pub name: String,
    pub version: u32,
    pub sha256: String,
    pub issued_ms: u64,
    pub expires_ms: u64,
    #[serde(default)]
    pub policy: edgeloop_common::update::UpdatePolicy,
    /// The signed envelope as published, to publish again after a restart.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

#[derive(Clone)]
pub struct RolloutStore {
    db: DurableDb,
    rollouts: sled::Tree,
    issued: sled::Tree,
    tags: sled::Tree,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    edgeloop_common::signing::to_cbor(v)
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    ciborium::from_reader(v).map_err(|e| StoreError::Corrupt {
        device: format!("{what} {}", String::from_utf8_lossy(key)),
        seq: 0,
        reason: e.to_string(),
    })
}

impl RolloutStore {
    pub fn open(db: &DurableDb) -> Result<RolloutStore, StoreError> {
        Ok(RolloutStore {
            rollouts: db.tree("rollouts")?,
            issued: db.tree("desired")?,
            tags: db.tree("device_tags")?,
            db: db.clone(),
        })
    }

    pub fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.rollouts
            .iter()
            .map(|kv| kv.map_err(StoreError::from).and_then(|(k, v)| decode("rollout", &k, &v)))
            .collect()
    }

    /// Writes rollouts (not yet durable: call [`RolloutStore::commit`]).
    pub fn put_rollout(&self, r: &Rollout) -> Result<(), StoreError> {
        self.rollouts.insert(r.id.as_bytes(), encode(r))?;
        Ok(())
    }

    pub fn issued(&self, device: &str) -> Result<Option<Issued>, StoreError> {
        self.issued.get(device.as_bytes())?.map(|v| decode("desired", device.as_bytes(), &v)).transpose()
    }

    pub fn all_issued(&self) -> Result<Vec<(String, Issued)>, StoreError> {
        self.issued
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k).into_owned(), decode("desired", &k, &v)?))
            })
            .collect()
    }

    pub fn put_issued(&self, device: &str, i: &Issued) -> Result<(), StoreError> {
        self.issued.insert(device.as_bytes(), encode(i))?;
        Ok(())
    }

    pub fn tags(&self, device: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .tags
            .get(device.as_bytes())?
            .map(|v| decode("tags", device.as_bytes(), &v))
            .transpose()?
            .unwrap_or_default())
    }

    pub fn all_tags(&self) -> Result<std::collections::HashMap<String, Vec<String>>, StoreError> {
        self.tags
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((String::from_utf8_lossy(&k).into_owned(), decode("tags", &k, &v)?))
            })
            .collect()
    }

    pub fn set_tags(&self, device: &str, tags: &[String]) -> Result<(), StoreError> {
        self.tags.insert(device.as_bytes(), encode(&tags))?;
        self.commit()
    }

    /// Makes everything written durable. Blocking.
    pub fn commit(&self) -> Result<(), StoreError> {
        self.db.commit()?;
        Ok(())
    }
}
