//! The device registry: what the control plane knows about each device.
//!
//! An entry appears with a device's first accepted message and is updated by every message after: last seen,
//! record and duplicate counts, rejections, the acknowledgement watermark and the latest heartbeat (class,
//! outbox depth, dropped ranges, model version, latency, RSS). Entries live in memory and are written to sled
//! with the telemetry they describe, so one commit covers both.

use edgeloop_common::durable::DurableDb;
use edgeloop_common::envelope::{SeqRange, Status};
use edgeloop_common::update::UpdateReport;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::RwLock;

use crate::store::StoreError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Device {
    pub id: String,
    /// From the latest heartbeat; empty until one arrives.
    pub class: String,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub records: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub acked_upto: u64,
    pub last_status: Option<Status>,
    /// The latest update reports, oldest first (the newest [`UPDATE_HISTORY`] are kept).
    #[serde(default)]
    pub updates: Vec<UpdateReport>,
    /// Stored records the device's model flagged as anomalous, and when the latest of them arrived
    /// (control-plane clock).
    #[serde(default)]
    pub anomalies: u64,
    #[serde(default)]
    pub last_anomaly_ms: Option<u64>,
}

/// Update reports kept per device.
pub const UPDATE_HISTORY: usize = 64;

impl Device {
    /// Records an update report (from `up/report` or a heartbeat) unless it is one already known.
    pub fn add_update(&mut self, r: UpdateReport) {
        if self.updates.iter().rev().take(8).any(|u| *u == r) {
            return;
        }
        if self.updates.len() == UPDATE_HISTORY {
            self.updates.remove(0);
        }
        self.updates.push(r);
    }

    /// The newest update report.
    pub fn latest_update(&self) -> Option<&UpdateReport> {
        self.updates.iter().max_by_key(|u| (u.at_ms, u.seq))
    }

    /// Dropped ranges the agent has reported.
    pub fn dropped_ranges(&self) -> &[SeqRange] {
        self.last_status.as_ref().map_or(&[], |s| &s.dropped_ranges)
    }
}

#[derive(Debug)]
pub struct Registry {
    tree: sled::Tree,
    devices: RwLock<BTreeMap<String, Device>>,
}

impl Registry {
    pub fn open(db: &DurableDb) -> Result<Registry, StoreError> {
        let tree = db.tree("devices")?;
        let mut devices = BTreeMap::new();
        for kv in tree.iter() {
            let (k, v) = kv?;
            let id = String::from_utf8_lossy(&k).into_owned();
            let d: Device = ciborium::from_reader(&v[..]).map_err(|e| StoreError::Corrupt {
                device: id.clone(),
                seq: 0,
                reason: e.to_string(),
            })?;
            devices.insert(id, d);
        }
        Ok(Registry { tree, devices: RwLock::new(devices) })
    }

    /// Applies `f` to the device's entry (creating it), and writes it through to sled.
    pub fn update(&self, id: &str, now_ms: u64, f: impl FnOnce(&mut Device)) -> Result<(), StoreError> {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let d = devices.entry(id.to_string()).or_insert_with(|| Device {
            id: id.to_string(),
            first_seen_ms: now_ms,
            ..Default::default()
        });
        d.last_seen_ms = d.last_seen_ms.max(now_ms);
        f(d);
        let mut buf = Vec::new();
        ciborium::into_writer(&*d, &mut buf).expect("CBOR encoding into a Vec is infallible");
        self.tree.insert(id.as_bytes(), buf)?;
        Ok(())
    }

    /// Counts a refused message against a known device without marking it as seen. Returns false if the
    /// device is unknown (junk must not create entries).
    pub fn count_rejection(&self, id: &str) -> Result<bool, StoreError> {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let Some(d) = devices.get_mut(id) else { return Ok(false) };
        d.rejected += 1;
        let mut buf = Vec::new();
        ciborium::into_writer(&*d, &mut buf).expect("CBOR encoding into a Vec is infallible");
        self.tree.insert(id.as_bytes(), buf)?;
        Ok(true)
    }

    pub fn get(&self, id: &str) -> Option<Device> {
        self.devices.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    pub fn list(&self) -> Vec<Device> {
        self.devices.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.devices.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_common::durable::Durability;

    #[test]
    fn updates_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = DurableDb::open(dir.path(), Durability::Flush).unwrap();
            let r = Registry::open(&db).unwrap();
            r.update("d1", 10, |d| d.records += 5).unwrap();
            r.update("d1", 20, |d| d.class = "c".into()).unwrap();
            let d = r.get("d1").unwrap();
            assert_eq!((d.first_seen_ms, d.last_seen_ms, d.records, d.class.as_str()), (10, 20, 5, "c"));
            db.commit().unwrap();
        }
        let db = DurableDb::open(dir.path(), Durability::Flush).unwrap();
        let r = Registry::open(&db).unwrap();
        assert_eq!(r.get("d1").unwrap().records, 5);
        assert_eq!(r.len(), 1);
    }
}
