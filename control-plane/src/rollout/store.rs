//! Where rollouts, desired states and device tags live: sled trees behind a narrow type, committed durably
//! before anything is published, so a restart resumes exactly where the control plane stopped.

use super::engine::{IssuedRun, Kind, Rollout};
use crate::fleet::telemetry::StoreError;
use crate::storage::kv::{Backend, Tree};
use crate::storage::postgres::kv::WriteLock;
use edgeloop_common::durable::DurableDb;
use serde::{Deserialize, Serialize};

/// The last desired state issued to a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Issued {
    pub seq: u64,
    /// The first sequence of the run of states issued to this device, up to `seq`, that all carried this
    /// rollout and model (a re-issue keeps both). `None` in records written before runs were kept: then the
    /// run is `seq` alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    pub rollout: Option<String>,
    pub name: String,
    pub version: u32,
    pub sha256: String,
    pub issued_ms: u64,
    pub expires_ms: u64,
    #[serde(default)]
    pub policy: edgeloop_common::update::UpdatePolicy,
    /// A desired configuration's health period (absent for a model's desired state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_secs: Option<u32>,
    /// The signed envelope as published, to publish again after a restart.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// A device was issued the largest sequence there is: nothing can follow it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device `{device}`: desired-state sequence {seq} is the largest there is; no state can follow it")]
pub struct SequenceExhausted {
    pub device: String,
    pub seq: u64,
}

impl Issued {
    /// The sequence of the next desired state for a device, from the control plane's own record of what it
    /// issued (never from what a device reports): one above the last, starting at 1.
    pub fn next_seq(device: &str, last: Option<&Issued>) -> Result<u64, SequenceExhausted> {
        match last {
            None => Ok(1),
            Some(i) => i.seq.checked_add(1).ok_or_else(|| SequenceExhausted { device: device.to_string(), seq: i.seq }),
        }
    }

    /// Where the run that a state with this sequence, rollout and model belongs to starts, after `last`.
    pub fn run_start(last: Option<&Issued>, seq: u64, rollout: Option<&str>, sha256: &str) -> u64 {
        match last {
            Some(i) if i.rollout.as_deref() == rollout && i.sha256 == sha256 => i.first_seq.unwrap_or(i.seq),
            _ => seq,
        }
    }

    /// The run of states this record ends, as the engine judges reports against it.
    pub fn run(&self) -> IssuedRun {
        IssuedRun {
            first_seq: self.first_seq.unwrap_or(self.seq).min(self.seq),
            last_seq: self.seq,
            rollout: self.rollout.clone(),
            sha256: self.sha256.clone(),
        }
    }
}

/// `class/` then the version big-endian, so that a class's versions sort in order.
fn config_key(class: &str, version: u32) -> Vec<u8> {
    let mut k = format!("{class}/").into_bytes();
    k.extend_from_slice(&version.to_be_bytes());
    k
}

#[derive(Clone)]
pub struct RolloutStore {
    backend: Backend,
    rollouts: Tree,
    issued: Tree,
    tags: Tree,
    bundles: Tree,
    /// Class configurations published, keyed `class/version` (version big-endian).
    configs: Tree,
    /// The last desired configuration issued to each device.
    issued_configs: Tree,
    /// Agent builds published, keyed `class/number` (number big-endian).
    agent_releases: Tree,
    /// The last desired agent build issued to each device.
    issued_agents: Tree,
}

/// The group of trees replicas lock together ([`RolloutStore::lock`]), and the channel that tells them of a
/// change.
pub const DOMAIN: &str = "rollouts";
pub const CHANNEL: &str = "edgeloop_rollouts";

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
    /// The store in the embedded database.
    pub fn open(db: &DurableDb) -> Result<RolloutStore, StoreError> {
        RolloutStore::open_on(&Backend::Embedded(db.clone()))
    }

    pub fn open_on(backend: &Backend) -> Result<RolloutStore, StoreError> {
        Ok(RolloutStore {
            rollouts: backend.tree("rollouts")?,
            issued: backend.tree("desired")?,
            tags: backend.tree("device_tags")?,
            bundles: backend.tree("bundles")?,
            configs: backend.tree("class_configs")?,
            issued_configs: backend.tree("desired_configs")?,
            agent_releases: backend.tree("agent_releases")?,
            issued_agents: backend.tree("desired_agents")?,
            backend: backend.clone(),
        })
    }

    /// Whether other replicas may write this store (it is in PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Postgres { .. })
    }

    /// Takes the cluster-wide write lock of a shared store (`None` for the embedded one, which only this
    /// process writes). Blocking.
    pub fn lock(&self) -> Result<Option<WriteLock>, StoreError> {
        Ok(self.backend.on_postgres(|kv| Box::pin(kv.lock(DOMAIN))).transpose()?)
    }

    /// Releases a write lock. Blocking.
    pub fn unlock(&self, lock: WriteLock) {
        self.backend.on_postgres(|_| Box::pin(lock.release()));
    }

    pub fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        self.rollouts.all()?.into_iter().map(|(k, v)| decode("rollout", &k, &v)).collect()
    }

    /// Writes rollouts (not yet durable: call [`RolloutStore::commit`]).
    pub fn put_rollout(&self, r: &Rollout) -> Result<(), StoreError> {
        self.rollouts.insert(r.id.as_bytes(), encode(r))?;
        Ok(())
    }

    /// The tree of what was issued for rollouts of `kind`.
    fn issued_tree(&self, kind: Kind) -> &Tree {
        match kind {
            Kind::Model => &self.issued,
            Kind::Config => &self.issued_configs,
            Kind::Agent => &self.issued_agents,
        }
    }

    pub fn issued(&self, device: &str) -> Result<Option<Issued>, StoreError> {
        self.issued_of(Kind::Model, device)
    }

    /// The last desired state (`Kind::Model`) or desired configuration (`Kind::Config`) issued to a device.
    pub fn issued_of(&self, kind: Kind, device: &str) -> Result<Option<Issued>, StoreError> {
        self.issued_tree(kind).get(device.as_bytes())?.map(|v| decode("desired", device.as_bytes(), &v)).transpose()
    }

    pub fn all_issued(&self) -> Result<Vec<(String, Issued)>, StoreError> {
        self.all_issued_of(Kind::Model)
    }

    pub fn all_issued_of(&self, kind: Kind) -> Result<Vec<(String, Issued)>, StoreError> {
        self.issued_tree(kind)
            .all()?
            .into_iter()
            .map(|(k, v)| Ok((String::from_utf8_lossy(&k).into_owned(), decode("desired", &k, &v)?)))
            .collect()
    }

    /// Forgets a decommissioned device: its last desired state and its tags (not yet durable).
    pub fn forget(&self, device: &str) -> Result<(), StoreError> {
        self.issued.remove(device.as_bytes())?;
        self.issued_configs.remove(device.as_bytes())?;
        self.issued_agents.remove(device.as_bytes())?;
        self.tags.remove(device.as_bytes())?;
        Ok(())
    }

    pub fn put_issued(&self, device: &str, i: &Issued) -> Result<(), StoreError> {
        self.put_issued_of(Kind::Model, device, i)
    }

    pub fn put_issued_of(&self, kind: Kind, device: &str, i: &Issued) -> Result<(), StoreError> {
        self.issued_tree(kind).insert(device.as_bytes(), encode(i))?;
        Ok(())
    }

    /// Every class configuration published for `class` (every class with `None`), oldest version first.
    pub fn configs(&self, class: Option<&str>) -> Result<Vec<super::configs::ConfigVersion>, StoreError> {
        let prefix = class.map(|c| format!("{c}/")).unwrap_or_default();
        self.configs
            .scan_prefix(prefix.as_bytes())?
            .into_iter()
            .map(|(k, v)| decode("class configuration", &k, &v))
            .collect()
    }

    pub fn config(&self, class: &str, version: u32) -> Result<Option<super::configs::ConfigVersion>, StoreError> {
        let key = config_key(class, version);
        self.configs.get(&key)?.map(|v| decode("class configuration", &key, &v)).transpose()
    }

    /// Every agent build published for `class` (every class with `None`), oldest first.
    pub fn agent_releases(&self, class: Option<&str>) -> Result<Vec<super::releases::ReleaseRecord>, StoreError> {
        let prefix = class.map(|c| format!("{c}/")).unwrap_or_default();
        self.agent_releases
            .scan_prefix(prefix.as_bytes())?
            .into_iter()
            .map(|(k, v)| decode("agent release", &k, &v))
            .collect()
    }

    pub fn agent_release(
        &self,
        class: &str,
        number: u32,
    ) -> Result<Option<super::releases::ReleaseRecord>, StoreError> {
        let key = config_key(class, number);
        self.agent_releases.get(&key)?.map(|v| decode("agent release", &key, &v)).transpose()
    }

    /// Records an agent build (not yet durable: call [`RolloutStore::commit`]).
    pub fn put_agent_release(&self, r: &super::releases::ReleaseRecord) -> Result<(), StoreError> {
        self.agent_releases.insert(config_key(&r.class, r.number), encode(r))?;
        Ok(())
    }

    /// Records a class configuration (not yet durable: call [`RolloutStore::commit`]).
    pub fn put_config(&self, c: &super::configs::ConfigVersion) -> Result<(), StoreError> {
        self.configs.insert(config_key(&c.class, c.version), encode(c))?;
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
            .all()?
            .into_iter()
            .map(|(k, v)| Ok((String::from_utf8_lossy(&k).into_owned(), decode("tags", &k, &v)?)))
            .collect()
    }

    pub fn set_tags(&self, device: &str, tags: &[String]) -> Result<(), StoreError> {
        self.tags.insert(device.as_bytes(), encode(&tags))?;
        self.commit()
    }

    /// Every update bundle made, oldest first.
    pub fn bundles(&self) -> Result<Vec<super::bundle::BundleRecord>, StoreError> {
        let mut v: Vec<super::bundle::BundleRecord> =
            self.bundles.all()?.into_iter().map(|(k, v)| decode("bundle", &k, &v)).collect::<Result<_, _>>()?;
        v.sort_by_key(|b| b.seq);
        Ok(v)
    }

    /// Records a bundle (not yet durable: call [`RolloutStore::commit`]).
    pub fn put_bundle(&self, b: &super::bundle::BundleRecord) -> Result<(), StoreError> {
        self.bundles.insert(b.id.as_bytes(), encode(b))?;
        Ok(())
    }

    /// The highest sequence of any bundle made for `class` (0 if none): online desired states for the class
    /// go above it.
    pub fn bundle_floor(&self, class: &str) -> Result<u64, StoreError> {
        Ok(self.bundles()?.iter().filter(|b| b.class == class).map(|b| b.seq).max().unwrap_or(0))
    }

    /// The highest desired-configuration sequence issued to any device or put in a bundle (0 if none): a
    /// bundle's configuration goes above it.
    pub fn config_seq_floor(&self) -> Result<u64, StoreError> {
        let issued = self.all_issued_of(Kind::Config)?.into_iter().map(|(_, i)| i.seq).max().unwrap_or(0);
        let bundled = self.bundles()?.iter().filter_map(|b| b.config.as_ref().map(|c| c.seq)).max().unwrap_or(0);
        Ok(issued.max(bundled))
    }

    /// The highest configuration sequence in a bundle for `class` (0 if none): online desired
    /// configurations for the class go above it.
    pub fn config_bundle_floor(&self, class: &str) -> Result<u64, StoreError> {
        Ok(self
            .bundles()?
            .iter()
            .filter(|b| b.class == class)
            .filter_map(|b| b.config.as_ref().map(|c| c.seq))
            .max()
            .unwrap_or(0))
    }

    /// Makes everything written durable, and tells other replicas of a shared store that it changed.
    /// Blocking.
    pub fn commit(&self) -> Result<(), StoreError> {
        self.backend.commit()?;
        self.backend
            .on_postgres(|kv| Box::pin(kv.notify(CHANNEL, crate::storage::postgres::kv::replica_id())))
            .transpose()?;
        Ok(())
    }
}
