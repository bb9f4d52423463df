//! The device registry: what the control plane knows about each device.
//!
//! An entry appears with a device's first accepted message and is updated by every message after: last seen,
//! record and duplicate counts, rejections, the acknowledgement watermark, records recorded as lost, and the
//! latest heartbeat (class, outbox depth, dropped ranges, model version, latency, RSS). Entries live in memory;
//! a change only marks the entry dirty, and [`Registry::write_dirty`] writes each dirty entry once, just before
//! ingest's group commit makes it durable with the telemetry it describes. So a flood of messages from one
//! device costs one write of its entry per commit, not one per message.
//!
//! An entry is bounded in bytes whatever a device sends: each stored update report's text fields are clipped
//! ([`REPORT_TEXT_MAX`], [`REPORT_ID_MAX`]), the history keeps at most [`UPDATE_HISTORY`] reports and
//! [`UPDATE_HISTORY_BYTES`] bytes, and the heartbeat kept is clipped the same way ([`Device::set_status`]).

use edgeloop_common::durable::DurableDb;
use edgeloop_common::envelope::{SeqRange, Status};
use edgeloop_common::update::UpdateReport;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use crate::fleet::telemetry::StoreError;

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
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
    /// The latest update reports, oldest first (the newest 64 are kept).
    #[serde(default)]
    pub updates: Vec<UpdateReport>,
    /// Stored records the device's model flagged as anomalous, and when the latest of them arrived
    /// (control-plane clock).
    #[serde(default)]
    pub anomalies: u64,
    #[serde(default)]
    pub last_anomaly_ms: Option<u64>,
    /// Records the device deleted from its outbox that the control plane never stored (its outbox was full),
    /// and their ranges, merged, oldest first (the newest 64 are kept).
    #[serde(default)]
    pub lost: u64,
    #[serde(default)]
    pub lost_ranges: Vec<SeqRange>,
}

/// Update reports kept per device, at most.
pub const UPDATE_HISTORY: usize = 64;
/// Bytes of update reports kept per device, at most (as counted by [`report_bytes`]).
pub const UPDATE_HISTORY_BYTES: usize = 32 * 1024;
/// Longest `reason` kept in a stored update report, in bytes; longer ones are clipped and end with `…`.
pub const REPORT_TEXT_MAX: usize = 512;
/// Longest `sha256`, `active_sha256` or `rollout` kept in a stored update report, in bytes (a SHA-256 in hex
/// is 64), and longest `class` or `model_version` kept from a heartbeat.
pub const REPORT_ID_MAX: usize = 128;
/// Dropped ranges kept from a heartbeat (the newest; an agent sends at most this many).
pub const STATUS_RANGES: usize = 256;
/// Lost ranges kept per device (the newest).
pub const LOST_RANGES: usize = 64;

/// Clips `s` to at most `max` bytes on a character boundary, marking the cut with `…`.
fn clip(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
}

/// An update report as stored: every text field clipped.
pub fn bounded_report(mut r: UpdateReport) -> UpdateReport {
    clip(&mut r.reason, REPORT_TEXT_MAX);
    clip(&mut r.sha256, REPORT_ID_MAX);
    if let Some(s) = &mut r.rollout {
        clip(s, REPORT_ID_MAX);
    }
    if let Some(s) = &mut r.active_sha256 {
        clip(s, REPORT_ID_MAX);
    }
    r
}

/// What a stored report counts against [`UPDATE_HISTORY_BYTES`]: its text plus 160 bytes for its field
/// names and numbers.
pub fn report_bytes(r: &UpdateReport) -> usize {
    160 + r.reason.len()
        + r.sha256.len()
        + r.rollout.as_ref().map_or(0, String::len)
        + r.active_sha256.as_ref().map_or(0, String::len)
}

impl Device {
    /// Records an update report (from `up/report` or a heartbeat) unless it is one already known. The report
    /// is clipped ([`bounded_report`]) and the oldest reports go while the history holds more than
    /// [`UPDATE_HISTORY`] reports or [`UPDATE_HISTORY_BYTES`] bytes.
    pub fn add_update(&mut self, r: UpdateReport) {
        let r = bounded_report(r);
        if self.updates.iter().rev().take(8).any(|u| *u == r) {
            return;
        }
        self.updates.push(r);
        let mut bytes: usize = self.updates.iter().map(report_bytes).sum();
        let mut gone = 0;
        while self.updates.len() - gone > UPDATE_HISTORY
            || (bytes > UPDATE_HISTORY_BYTES && self.updates.len() - gone > 1)
        {
            bytes -= report_bytes(&self.updates[gone]);
            gone += 1;
        }
        self.updates.drain(..gone);
    }

    /// Keeps `status` as the latest heartbeat and its class as the device's, clipped: a `class` and a
    /// `model_version` of at most [`REPORT_ID_MAX`] bytes (a valid class has at most 64), the newest
    /// [`STATUS_RANGES`] dropped ranges and a bounded `update` report.
    pub fn set_status(&mut self, mut status: Status) {
        clip(&mut status.class, REPORT_ID_MAX);
        self.class = status.class.clone();
        let n = status.dropped_ranges.len();
        if n > STATUS_RANGES {
            status.dropped_ranges.drain(..n - STATUS_RANGES);
        }
        if let Some(v) = &mut status.model_version {
            clip(v, REPORT_ID_MAX);
        }
        status.update = status.update.map(|r| Box::new(bounded_report(*r)));
        status.config_update = status.config_update.map(|r| Box::new(bounded_report(*r)));
        status.agent_update = status.agent_update.map(|r| Box::new(bounded_report(*r)));
        for v in [&mut status.agent_version, &mut status.arch].into_iter().flatten() {
            clip(v, REPORT_ID_MAX);
        }
        self.last_status = Some(status);
    }

    /// Records `range` (`n` of whose records were never stored) as lost: merged with the newest lost range
    /// when contiguous, the newest [`LOST_RANGES`] kept.
    pub fn record_lost(&mut self, range: SeqRange, n: u64) {
        self.lost = self.lost.saturating_add(n);
        match self.lost_ranges.last_mut() {
            Some(last) if last.to.checked_add(1) == Some(range.from) => last.to = range.to,
            _ => self.lost_ranges.push(range),
        }
        let len = self.lost_ranges.len();
        if len > LOST_RANGES {
            self.lost_ranges.drain(..len - LOST_RANGES);
        }
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
    /// Entries changed since the last [`Registry::write_dirty`].
    dirty: Mutex<BTreeSet<String>>,
    /// Entries written to sled so far.
    writes: AtomicU64,
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
        Ok(Registry { tree, devices: RwLock::new(devices), dirty: Default::default(), writes: AtomicU64::new(0) })
    }

    fn mark_dirty(&self, id: &str) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if !dirty.contains(id) {
            dirty.insert(id.to_string());
        }
    }

    /// Applies `f` to the device's entry (creating it) in memory. The entry reaches sled at the next
    /// [`Registry::write_dirty`], so this does no I/O (it returns a `Result` for callers that predate that).
    pub fn update(&self, id: &str, now_ms: u64, f: impl FnOnce(&mut Device)) -> Result<(), StoreError> {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let d = devices.entry(id.to_string()).or_insert_with(|| Device {
            id: id.to_string(),
            first_seen_ms: now_ms,
            ..Default::default()
        });
        d.last_seen_ms = d.last_seen_ms.max(now_ms);
        f(d);
        drop(devices);
        self.mark_dirty(id);
        Ok(())
    }

    /// Counts a refused message against a known device without marking it as seen, in memory (written with
    /// the next [`Registry::write_dirty`]). Returns false if the device is unknown (junk must not create
    /// entries). No I/O, like [`Registry::update`].
    pub fn count_rejection(&self, id: &str) -> Result<bool, StoreError> {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let Some(d) = devices.get_mut(id) else { return Ok(false) };
        d.rejected += 1;
        drop(devices);
        self.mark_dirty(id);
        Ok(true)
    }

    /// Writes every entry changed since the last call to sled, once each, and returns how many. Not durable
    /// by itself: ingest calls it just before its commit, which covers these writes with the telemetry.
    pub fn write_dirty(&self) -> Result<usize, StoreError> {
        let ids = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        let mut written = 0;
        let mut result = Ok(());
        {
            let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
            for id in &ids {
                let Some(d) = devices.get(id) else { continue };
                if let Err(e) = self.tree.insert(id.as_bytes(), edgeloop_common::signing::to_cbor(d)) {
                    result = Err(e);
                    break;
                }
                written += 1;
            }
        }
        self.writes.fetch_add(written as u64, Ordering::Relaxed);
        if let Err(e) = result {
            // Nothing is lost: every entry stays in memory and is written at the next call.
            self.dirty.lock().unwrap_or_else(|p| p.into_inner()).extend(ids);
            return Err(e.into());
        }
        Ok(written)
    }

    /// Entries written to sled since the registry was opened.
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    pub fn get(&self, id: &str) -> Option<Device> {
        self.devices.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Removes a decommissioned device's entry, in memory and in sled (durable at the store's next commit).
    /// Returns the entry it had.
    pub fn remove(&self, id: &str) -> Result<Option<Device>, StoreError> {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let gone = devices.remove(id);
        self.dirty.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        self.tree.remove(id.as_bytes())?;
        Ok(gone)
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
    use edgeloop_common::update::Phase;

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
            assert_eq!(r.write_dirty().unwrap(), 1, "two changes, one write");
            db.commit().unwrap();
        }
        let db = DurableDb::open(dir.path(), Durability::Flush).unwrap();
        let r = Registry::open(&db).unwrap();
        assert_eq!(r.get("d1").unwrap().records, 5);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn changes_are_written_once_per_write_dirty() {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(dir.path(), Durability::Flush).unwrap();
        let r = Registry::open(&db).unwrap();
        r.update("d1", 1, |d| d.records += 1).unwrap();
        for _ in 0..1000 {
            assert!(r.count_rejection("d1").unwrap());
        }
        assert!(!r.count_rejection("stranger").unwrap(), "unknown devices get no entry");
        assert_eq!(r.writes(), 0, "refusals and updates write nothing by themselves");
        assert_eq!(r.write_dirty().unwrap(), 1);
        assert_eq!((r.writes(), r.write_dirty().unwrap()), (1, 0), "nothing changed since: nothing written");
        db.commit().unwrap();
        drop(r);
        let r = Registry::open(&db).unwrap();
        assert_eq!(r.get("d1").unwrap().rejected, 1000);
        assert!(r.get("stranger").is_none());
    }

    fn report(i: u64, reason: String) -> UpdateReport {
        UpdateReport {
            seq: i,
            rollout: Some("r1".into()),
            sha256: "ab".repeat(32),
            phase: Phase::Failed,
            reason,
            active_sha256: None,
            shadow_agreement: None,
            anomaly_rate: None,
            baseline_anomaly_rate: None,
            p95_us: None,
            at_ms: i,
            failure: None,
            component: Default::default(),
        }
    }

    fn encoded_len(d: &Device) -> usize {
        let mut buf = Vec::new();
        ciborium::into_writer(d, &mut buf).unwrap();
        buf.len()
    }

    #[test]
    fn report_history_is_bounded_in_bytes() {
        // 64 reports of about 200 KB each, as a device may send them (each fits in one message).
        let mut d = Device::default();
        for i in 0..UPDATE_HISTORY as u64 {
            d.add_update(report(i, format!("{i}:") + &"é".repeat(100_000)));
        }
        assert!(d.updates.iter().all(|u| u.reason.len() <= REPORT_TEXT_MAX + '…'.len_utf8()), "reasons clipped");
        assert!(d.updates[0].reason.ends_with('…'));
        let bytes: usize = d.updates.iter().map(report_bytes).sum();
        assert!(bytes <= UPDATE_HISTORY_BYTES, "{bytes} bytes of reports kept");
        assert!(encoded_len(&d) <= 2 * UPDATE_HISTORY_BYTES, "entry of {} bytes", encoded_len(&d));
        assert_eq!(d.updates.last().unwrap().seq, UPDATE_HISTORY as u64 - 1, "the newest is kept");
        assert!(d.updates.len() < UPDATE_HISTORY, "the byte bound, not the count, decided");
        // Huge identifiers are clipped too, and a heartbeat's fields are bounded the same way.
        let mut r = report(99, "x".into());
        r.sha256 = "f".repeat(200_000);
        r.rollout = Some("r".repeat(200_000));
        d.add_update(r.clone());
        assert!(report_bytes(d.updates.last().unwrap()) < 160 + 3 * REPORT_ID_MAX + 16);
        let status = Status {
            class: "c".repeat(200_000),
            model_version: Some("m".repeat(200_000)),
            dropped_ranges: (1..=10_000).map(|i| SeqRange { from: 2 * i, to: 2 * i }).collect(),
            update: Some(Box::new(r)),
            ..Default::default()
        };
        d.set_status(status);
        let s = d.last_status.as_ref().unwrap();
        assert_eq!(s.dropped_ranges.len(), STATUS_RANGES);
        assert_eq!(s.dropped_ranges.last(), Some(&SeqRange { from: 20_000, to: 20_000 }), "the newest kept");
        assert!(s.model_version.as_ref().unwrap().len() <= REPORT_ID_MAX + 3);
        assert!(s.class.len() <= REPORT_ID_MAX + 3 && d.class == s.class);
        assert!(encoded_len(&d) <= 3 * UPDATE_HISTORY_BYTES, "entry of {} bytes", encoded_len(&d));
    }

    #[test]
    fn a_repeated_report_is_kept_once_even_when_clipped() {
        let mut d = Device::default();
        let big = report(1, "y".repeat(10_000));
        d.add_update(big.clone());
        d.add_update(big);
        assert_eq!(d.updates.len(), 1);
    }

    #[test]
    fn lost_ranges_merge_and_stay_bounded() {
        let mut d = Device::default();
        d.record_lost(SeqRange { from: 4, to: 10 }, 7);
        d.record_lost(SeqRange { from: 11, to: 12 }, 1);
        assert_eq!((d.lost, d.lost_ranges.clone()), (8, vec![SeqRange { from: 4, to: 12 }]));
        for i in 0..200 {
            d.record_lost(SeqRange { from: 100 + 10 * i, to: 101 + 10 * i }, 2);
        }
        assert_eq!(d.lost_ranges.len(), LOST_RANGES);
        assert_eq!(d.lost, 408);
    }
}
