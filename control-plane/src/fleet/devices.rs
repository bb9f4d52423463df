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
//!
//! With `[storage] backend = "postgres"` the entries are shared by replicas, each of which sees part of a
//! device's messages: a write merges the difference a replica made into the row ([`Device::merge`]), and
//! [`Registry::follow`] writes this replica's changes and reads the others' every half second, off ingest's path.

use crate::storage::postgres::{block_on, devices::PgDevices};
use edgeloop_common::durable::DurableDb;
use edgeloop_common::envelope::{SeqRange, Status};
use edgeloop_common::update::UpdateReport;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
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

    /// `stored` with what changed from `before` to `after` in another copy of the entry (a replica's, which
    /// saw part of the device's messages): counters add the difference, times and the watermark take the
    /// later, the class and heartbeat come from `after` when it changed them (the heartbeat only if it is not
    /// older than the stored one), and update reports and lost ranges that `after` gained are added.
    pub fn merge(stored: &Device, before: &Device, after: &Device) -> Device {
        let add = |s: u64, b: u64, a: u64| s.saturating_add(a.saturating_sub(b));
        let mut m = stored.clone();
        m.first_seen_ms = match (stored.first_seen_ms, after.first_seen_ms) {
            (0, a) => a,
            (s, 0) => s,
            (s, a) => s.min(a),
        };
        m.last_seen_ms = stored.last_seen_ms.max(after.last_seen_ms);
        m.records = add(stored.records, before.records, after.records);
        m.duplicates = add(stored.duplicates, before.duplicates, after.duplicates);
        m.rejected = add(stored.rejected, before.rejected, after.rejected);
        m.anomalies = add(stored.anomalies, before.anomalies, after.anomalies);
        m.lost = add(stored.lost, before.lost, after.lost);
        m.acked_upto = stored.acked_upto.max(after.acked_upto);
        m.last_anomaly_ms = stored.last_anomaly_ms.max(after.last_anomaly_ms);
        if after.last_status != before.last_status {
            let seq = |d: &Device| d.last_status.as_ref().map(|s| s.last_seq);
            if seq(after) >= seq(stored) {
                m.last_status = after.last_status.clone();
                m.class = after.class.clone();
            }
        } else if after.class != before.class {
            m.class = after.class.clone();
        }
        for u in after.updates.iter().filter(|u| !before.updates.contains(u)) {
            if !m.updates.contains(u) {
                m.add_update(u.clone());
            }
        }
        m.updates.sort_by_key(|u| (u.at_ms, u.seq));
        for r in after.lost_ranges.iter().filter(|r| !before.lost_ranges.contains(r)) {
            if !m.lost_ranges.contains(r) {
                m.lost_ranges.push(*r);
            }
        }
        m.lost_ranges.sort_by_key(|r| r.from);
        let len = m.lost_ranges.len();
        if len > LOST_RANGES {
            m.lost_ranges.drain(..len - LOST_RANGES);
        }
        m
    }
}

#[derive(Debug)]
pub struct Registry {
    store: Store,
    devices: RwLock<BTreeMap<String, Device>>,
    /// Entries changed since the last [`Registry::write_dirty`], with what each was before the first of those
    /// changes (kept with PostgreSQL only, where a write merges the difference).
    dirty: Mutex<BTreeMap<String, Option<Device>>>,
    /// Entries written so far.
    writes: AtomicU64,
}

/// Where entries are written.
#[derive(Debug)]
enum Store {
    Sled(sled::Tree),
    Postgres {
        pg: PgDevices,
        rt: tokio::runtime::Handle,
        /// The revision of the row each entry in memory was last read or written at.
        revs: Mutex<std::collections::HashMap<String, i64>>,
        /// The highest revision read from the change feed.
        seen: AtomicI64,
    },
}

/// Rows read from the change feed at a time.
const FEED_BATCH: i64 = 5_000;

/// How often a replica writes its registry changes to PostgreSQL and reads the others'.
pub const SHARED_FLUSH: std::time::Duration = std::time::Duration::from_millis(500);

impl Registry {
    /// The registry on PostgreSQL, shared with other replicas: every entry read now, the others' changes
    /// read by [`Registry::follow`].
    pub fn open_postgres(pg: PgDevices, rt: tokio::runtime::Handle) -> Result<Registry, StoreError> {
        let r = Registry {
            store: Store::Postgres { pg, rt, revs: Default::default(), seen: AtomicI64::new(0) },
            devices: Default::default(),
            dirty: Default::default(),
            writes: AtomicU64::new(0),
        };
        while r.catch_up()? == FEED_BATCH as usize {}
        Ok(r)
    }

    /// Reads what other replicas wrote since the last call into memory; returns how many rows it read.
    /// Nothing on the embedded store. Blocking.
    pub fn catch_up(&self) -> Result<usize, StoreError> {
        let Store::Postgres { pg, rt, revs, seen } = &self.store else { return Ok(0) };
        let changes = block_on(rt, pg.changes(seen.load(Ordering::Acquire), FEED_BATCH))?;
        let n = changes.len();
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let mut revs = revs.lock().unwrap_or_else(|p| p.into_inner());
        for (rev, id, row) in changes {
            seen.fetch_max(rev, Ordering::AcqRel);
            if revs.get(&id).is_some_and(|known| *known >= rev) {
                continue;
            }
            revs.insert(id.clone(), rev);
            match row {
                None => {
                    devices.remove(&id);
                    dirty.remove(&id);
                }
                Some(row) => match (dirty.get_mut(&id), devices.get(&id)) {
                    // Changed here since the last write: the row plus what changed here.
                    (Some(Some(before)), Some(now)) => {
                        let merged = Device::merge(&row, before, now);
                        *before = row;
                        devices.insert(id, merged);
                    }
                    _ => {
                        devices.insert(id, row);
                    }
                },
            }
        }
        Ok(n)
    }

    /// Reads other replicas' changes every second until `stop`.
    /// On PostgreSQL: every [`SHARED_FLUSH`], writes this replica's changes and reads the others', until
    /// `stop` (then writes what is left). Off ingest's path: ingest's commit does not wait for the registry.
    pub async fn follow(self: std::sync::Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(SHARED_FLUSH) => false,
            };
            let r = self.clone();
            let pass = tokio::task::spawn_blocking(move || {
                let written = r.flush_shared();
                if stopping {
                    return written;
                }
                written.and(r.catch_up())
            });
            match pass.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "writing or reading the shared device registry; retrying"),
                Err(e) => tracing::error!(error = %e, "the shared device registry's pass panicked"),
            }
            if stopping {
                return;
            }
        }
    }

    /// Writes the changes made here to PostgreSQL (nothing on the embedded store). Blocking.
    pub fn flush_shared(&self) -> Result<usize, StoreError> {
        let Store::Postgres { pg, rt, revs, .. } = &self.store else { return Ok(0) };
        let ids = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        self.write_merged(ids, pg, rt, revs)
    }

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
        Ok(Registry {
            store: Store::Sled(tree),
            devices: RwLock::new(devices),
            dirty: Default::default(),
            writes: AtomicU64::new(0),
        })
    }

    /// Marks an entry changed; `before` makes what it was before the change (called only the first time, and
    /// only where writes merge).
    fn mark_dirty(&self, id: &str, before: impl FnOnce() -> Device) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if !dirty.contains_key(id) {
            let before = matches!(self.store, Store::Postgres { .. }).then(before);
            dirty.insert(id.to_string(), before);
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
        self.mark_dirty(id, || d.clone());
        d.last_seen_ms = d.last_seen_ms.max(now_ms);
        f(d);
        Ok(())
    }

    /// Counts a refused message against a known device without marking it as seen, in memory (written with
    /// the next [`Registry::write_dirty`]). Returns false if the device is unknown (junk must not create
    /// entries). No I/O, like [`Registry::update`].
    pub fn count_rejection(&self, id: &str) -> Result<bool, StoreError> {
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let Some(d) = devices.get_mut(id) else { return Ok(false) };
        self.mark_dirty(id, || d.clone());
        d.rejected += 1;
        Ok(true)
    }

    /// Writes every entry changed since the last call to sled, once each, and returns how many. Not durable
    /// by itself: ingest calls it just before its commit, which covers these writes with the telemetry. On
    /// PostgreSQL it writes nothing: [`Registry::follow`] writes the changes every [`SHARED_FLUSH`].
    pub fn write_dirty(&self) -> Result<usize, StoreError> {
        let tree = match &self.store {
            Store::Sled(tree) => tree,
            Store::Postgres { .. } => return Ok(0),
        };
        let ids = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        let mut written = 0;
        let mut result = Ok(());
        {
            let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
            for id in ids.keys() {
                let Some(d) = devices.get(id) else { continue };
                if let Err(e) = tree.insert(id.as_bytes(), edgeloop_common::signing::to_cbor(d)) {
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

    /// [`Registry::write_dirty`] on PostgreSQL: each changed entry's difference merged into its row, committed
    /// (PostgreSQL's commit, not the embedded store's), and the rows as merged taken back into memory with
    /// whatever changed here meanwhile.
    fn write_merged(
        &self,
        ids: BTreeMap<String, Option<Device>>,
        pg: &PgDevices,
        rt: &tokio::runtime::Handle,
        revs: &Mutex<std::collections::HashMap<String, i64>>,
    ) -> Result<usize, StoreError> {
        let pairs: Vec<(Device, Device)> = {
            let devices = self.devices.read().unwrap_or_else(|p| p.into_inner());
            ids.iter()
                .filter_map(|(id, before)| {
                    let now = devices.get(id)?.clone();
                    Some((before.clone().unwrap_or_else(|| Device { id: id.clone(), ..Default::default() }), now))
                })
                .collect()
        };
        if pairs.is_empty() {
            return Ok(0);
        }
        let written = match block_on(rt, pg.write(&pairs)) {
            Ok(w) => w,
            Err(e) => {
                // Nothing is lost: the differences are written at the next call, from where they started.
                let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
                for (id, before) in ids {
                    dirty.insert(id, before);
                }
                return Err(e.into());
            }
        };
        let mut devices = self.devices.write().unwrap_or_else(|p| p.into_inner());
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let mut revs = revs.lock().unwrap_or_else(|p| p.into_inner());
        for ((_, sent), (rev, row)) in pairs.iter().zip(written) {
            revs.insert(row.id.clone(), rev);
            match (dirty.get_mut(&row.id), devices.get(&row.id)) {
                (Some(Some(before)), Some(now)) => {
                    let merged = Device::merge(&row, sent, now);
                    *before = row.clone();
                    devices.insert(row.id.clone(), merged);
                }
                _ => {
                    devices.insert(row.id.clone(), row);
                }
            }
        }
        self.writes.fetch_add(pairs.len() as u64, Ordering::Relaxed);
        Ok(pairs.len())
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
        match &self.store {
            Store::Sled(tree) => {
                tree.remove(id.as_bytes())?;
            }
            Store::Postgres { pg, rt, .. } => block_on(rt, pg.remove(id))?,
        }
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
    fn merging_adds_counters_and_keeps_the_newest_heartbeat() {
        let status = |last_seq| Status { class: "press".into(), last_seq, ..Default::default() };
        // Stored: another replica's view. Here: 10 records and a heartbeat with last_seq 50 since `before`.
        let stored = Device {
            id: "d".into(),
            first_seen_ms: 5,
            last_seen_ms: 100,
            records: 40,
            acked_upto: 40,
            last_status: Some(status(60)),
            class: "press".into(),
            ..Default::default()
        };
        let before = Device { id: "d".into(), first_seen_ms: 3, last_seen_ms: 50, records: 20, ..Default::default() };
        let mut after = before.clone();
        after.records += 10;
        after.acked_upto = 30;
        after.last_seen_ms = 90;
        after.set_status(status(50));
        after.add_update(report(7, "ok".into()));
        after.record_lost(SeqRange { from: 1, to: 2 }, 2);
        let m = Device::merge(&stored, &before, &after);
        assert_eq!((m.records, m.lost, m.acked_upto), (50, 2, 40), "counters add, the watermark takes the max");
        assert_eq!((m.first_seen_ms, m.last_seen_ms), (3, 100));
        assert_eq!(m.last_status.as_ref().unwrap().last_seq, 60, "an older heartbeat does not replace a newer one");
        assert_eq!((m.updates.len(), m.lost_ranges.len()), (1, 1));
        // The same difference merged from a copy that is now the row changes nothing more.
        let again = Device::merge(&m, &after, &after);
        assert_eq!(again, m);
        // A newer heartbeat wins.
        let mut newer = after.clone();
        newer.set_status(status(70));
        assert_eq!(Device::merge(&m, &after, &newer).last_status.unwrap().last_seq, 70);
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
