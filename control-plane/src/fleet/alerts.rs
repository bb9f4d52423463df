//! The alerts devices raised: the latest snapshot of each (an alert is sent when it opens, closes and
//! reopens), with who acknowledged it and their verdict, newest onset first.
//!
//! Trees: `alerts` (device, 0, id → the alert), `alerts_by_onset` (onset, device, 0, id → nothing: the
//! list's order), `alerts_open` (device, 0, id → class: the open ones, which `/metrics` counts), and
//! `alert_marks` (device → the highest `rev` up to which every snapshot is stored, which acknowledgements
//! name). A snapshot that arrives after a gap is stored but does not move the mark: the device sends the
//! missing one again and is acknowledged then.
//!
//! A device keeps at most [`MAX_ALERTS_PER_DEVICE`] alerts here: past it, its lowest-numbered ones go, so that
//! a device that floods `up/alerts` (within its message rate) cannot fill the disk.

use crate::fleet::telemetry::StoreError;
use crate::storage::postgres::{alerts::PgAlerts, block_on};
use edgeloop_common::alerts::AlertEvent;
use edgeloop_common::durable::DurableDb;
use serde::{Deserialize, Serialize};

/// An alert as the control plane keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StoredAlert {
    pub device: String,
    /// The device's class when the alert arrived.
    pub class: String,
    #[serde(flatten)]
    pub alert: AlertEvent,
    /// When the control plane stored its latest snapshot (Unix ms).
    pub received_ms: u64,
    /// Whether it is open (no `end_ms` yet).
    pub open: bool,
    /// Who acknowledged it, when, and what they said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ack: Option<AlertAck>,
    /// Where the list puts it, when not at its onset: an alert whose onset was more than a day ahead of the
    /// control plane's clock when it first arrived (a device clock that runs ahead, or a simulator's event
    /// time) is kept, and listed at the time it arrived, so that it cannot stay first in every list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listed_ms: Option<u64>,
    /// Set where the readings it was raised on had drifted from what its model learnt: the drift trigger of
    /// its class measured that window against that very model ([`drift_explaining`]). Worked out when the
    /// alert is read, never stored: the alert itself stays as the device raised it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<AlertDrift>,
}

/// The drift that explains an alert: its class's readings had moved away from what the model that raised it
/// learnt (a holiday, a new season, a changed process), so the alert is most likely that change and not a
/// fault. The trigger started a retraining on the new readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertDrift {
    /// When the trigger fired (the control plane's clock, Unix ms).
    pub at_ms: u64,
    /// The feature that drifted most, and its PSI.
    pub feature: String,
    pub psi: f64,
    /// The retraining it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<u64>,
}

/// The drift that explains `alert`, if any: the latest drift trigger of the alert's class whose drifted
/// window holds the alert's onset (event time) and which measured that window against the model that
/// raised the alert (its sha256, as the alert's model label names it). An alert of another model (the
/// retrained one, say) or outside the window is not explained: a model trained on the new readings that
/// still alerts has found something else.
pub fn drift_explaining(alert: &StoredAlert, triggers: &[crate::ml::triggers::TriggerEvent]) -> Option<AlertDrift> {
    let label_sha = alert.alert.model.as_deref().and_then(|m| m.split("(sha256:").nth(1)?.split(')').next())?;
    triggers
        .iter()
        .filter(|t| t.class == alert.class)
        .filter_map(|t| {
            let crate::ml::triggers::Cause::Drift { feature, psi, .. } = &t.cause else { return None };
            let w = t.drifted.as_ref()?;
            let same_model = label_sha.len() >= w.model_sha256.len().min(12) && w.model_sha256.starts_with(label_sha);
            (same_model && (w.from_ms..=w.to_ms).contains(&alert.alert.onset_ms)).then(|| AlertDrift {
                at_ms: t.at_ms,
                feature: feature.clone(),
                psi: *psi,
                job: t.job,
            })
        })
        .max_by_key(|d| d.at_ms)
}

/// [`drift_explaining`] for each of `alerts`.
pub fn explain_drift(alerts: &mut [StoredAlert], triggers: &[crate::ml::triggers::TriggerEvent]) {
    for a in alerts {
        a.drift = drift_explaining(a, triggers);
    }
}

/// How far ahead of the control plane's clock an onset may be and still be listed at it.
pub const MAX_ONSET_AHEAD_MS: u64 = 24 * 3600 * 1000;

impl StoredAlert {
    /// Its place in the list: the onset, or the time it arrived when the onset was too far ahead.
    pub fn list_ms(&self) -> u64 {
        self.listed_ms.unwrap_or(self.alert.onset_ms)
    }

    pub(crate) fn cursor(&self) -> AlertCursor {
        AlertCursor { onset_ms: self.list_ms(), device: self.device.clone(), id: self.alert.id }
    }
}

/// An operator's acknowledgement of an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertAck {
    /// The operator's token name and id.
    pub by: String,
    pub at_ms: u64,
    /// `true`: a real fault; `false`: a false alarm; absent: seen, no verdict. A verdict is also a training
    /// label of the alert's span (`1` for a fault, `0` for normal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verdict: Option<bool>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// The training label the verdict wrote (replaced, or removed, by the next acknowledgement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<crate::ml::dataset::Label>,
}

/// Where a page of alerts ends: the next page starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertCursor {
    pub onset_ms: u64,
    pub device: String,
    pub id: u64,
}

impl AlertCursor {
    pub fn encode(&self) -> String {
        format!("{}.{}.{}", self.onset_ms, self.id, self.device)
    }

    pub fn parse(s: &str) -> Result<AlertCursor, String> {
        let mut parts = s.splitn(3, '.');
        let (Some(onset), Some(id), Some(device)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!("`{s}` is not a cursor this API gave"));
        };
        let bad = || format!("`{s}` is not a cursor this API gave");
        Ok(AlertCursor {
            onset_ms: onset.parse().map_err(|_| bad())?,
            id: id.parse().map_err(|_| bad())?,
            device: device.to_string(),
        })
    }

    fn index_key(&self) -> Vec<u8> {
        let mut k = self.onset_ms.to_be_bytes().to_vec();
        k.extend_from_slice(&alert_key(&self.device, self.id));
        k
    }
}

fn alert_key(device: &str, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 9);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn corrupt(device: &str, id: u64, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { device: device.to_string(), seq: id, reason: format!("alert: {e}") }
}

/// Most alerts kept per device; past it its oldest (lowest id) go.
pub const MAX_ALERTS_PER_DEVICE: usize = 10_000;

/// What storing one snapshot changes, decided alike on both back-ends.
#[derive(Debug)]
pub(crate) struct PutPlan {
    /// The alert as stored before, if it was.
    pub old: Option<StoredAlert>,
    /// The alert to store, if the snapshot is newer than what is stored.
    pub store: Option<StoredAlert>,
    /// The device's mark afterwards: what to acknowledge.
    pub mark: u64,
}

/// Decides what a snapshot from `device` changes, given the device's `mark` and the alert as stored (`old`).
pub(crate) fn plan_put(
    device: &str,
    class: &str,
    alert: AlertEvent,
    now_ms: u64,
    mark: u64,
    old: Option<StoredAlert>,
) -> PutPlan {
    // Snapshots up to the sender's floor are gone from it: never wait for them (a store restored from an
    // older backup would otherwise never acknowledge again).
    let mark = mark.max(alert.floor);
    let rev = alert.rev;
    let store = match &old {
        Some(o) if o.alert.rev >= rev => None,
        // Acknowledged before and since removed (by retention or the per-device cap): a resent snapshot does
        // not bring it back.
        None if rev <= mark => None,
        old => {
            // Listed at its onset, or, when that was too far ahead when the alert first arrived, at then.
            let first_ms = old.as_ref().and_then(|o| o.listed_ms).unwrap_or(now_ms);
            let listed_ms = (alert.onset_ms > first_ms.saturating_add(MAX_ONSET_AHEAD_MS)).then_some(first_ms);
            let ack = old.as_ref().and_then(|o| o.ack.clone());
            let open = alert.is_open();
            Some(StoredAlert {
                device: device.into(),
                class: class.into(),
                alert,
                received_ms: now_ms,
                open,
                ack,
                listed_ms,
                drift: None,
            })
        }
    };
    PutPlan { old, store, mark: if rev == mark + 1 { rev } else { mark } }
}

#[derive(Debug, Clone)]
pub struct AlertStore {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Sled(SledAlerts),
    Postgres { store: PgAlerts, rt: tokio::runtime::Handle },
}

#[derive(Debug, Clone)]
struct SledAlerts {
    alerts: sled::Tree,
    by_onset: sled::Tree,
    open_index: sled::Tree,
    marks: sled::Tree,
    /// Alerts kept per device (device → count), for the cap.
    counts: sled::Tree,
    /// Ingest's snapshots and operators' acknowledgements each read, change and write an alert: one at a time,
    /// so that neither undoes the other.
    writing: std::sync::Arc<std::sync::Mutex<()>>,
}

impl AlertStore {
    pub fn open(db: &DurableDb) -> Result<AlertStore, StoreError> {
        Ok(AlertStore {
            backend: Backend::Sled(SledAlerts {
                alerts: db.tree("alerts")?,
                by_onset: db.tree("alerts_by_onset")?,
                open_index: db.tree("alerts_open")?,
                marks: db.tree("alert_marks")?,
                counts: db.tree("alert_counts")?,
                writing: Default::default(),
            }),
        })
    }

    /// The alerts in PostgreSQL, shared by every replica on it. Calls block on `rt`.
    pub fn postgres(store: PgAlerts, rt: tokio::runtime::Handle) -> AlertStore {
        AlertStore { backend: Backend::Postgres { store, rt } }
    }

    /// The highest `rev` of `device` up to which every snapshot is stored.
    pub fn mark(&self, device: &str) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.mark(device),
            Backend::Postgres { store, rt } => Ok(block_on(rt, store.mark(device))?),
        }
    }

    /// Stores a snapshot from `device` (of `class`) unless a later one of the same alert is already here, and
    /// returns the device's mark to acknowledge. Not durable until the store's next commit on the embedded
    /// store; committed before it returns on PostgreSQL.
    pub fn put(&self, device: &str, class: &str, alert: AlertEvent, now_ms: u64) -> Result<u64, StoreError> {
        let s = match &self.backend {
            Backend::Sled(s) => s,
            Backend::Postgres { store, rt } => {
                return Ok(block_on(rt, store.put(device, class, alert, now_ms, MAX_ALERTS_PER_DEVICE))?);
            }
        };
        let _one = s.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mark = s.mark(device)?;
        let old = s.get(device, alert.id)?;
        let plan = plan_put(device, class, alert, now_ms, mark, old);
        if let Some(stored) = &plan.store {
            if plan.old.is_none() {
                s.make_room(device)?;
            }
            if plan.old.as_ref().is_none_or(|o| o.list_ms() != stored.list_ms()) {
                if let Some(o) = &plan.old {
                    s.by_onset.remove(o.cursor().index_key())?;
                }
                s.by_onset.insert(stored.cursor().index_key(), &[])?;
            }
            s.write(stored)?;
        }
        if plan.mark != mark {
            s.marks.insert(device.as_bytes(), &plan.mark.to_be_bytes())?;
        }
        Ok(plan.mark)
    }
    pub fn get(&self, device: &str, id: u64) -> Result<Option<StoredAlert>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.get(device, id),
            Backend::Postgres { store, rt } => Ok(block_on(rt, store.get(device, id))?),
        }
    }

    /// Newest onset first: the alerts after `after` that `keep`, at most `limit`, and the cursor of the next
    /// page when more may follow. Reads at most `scan_max` alerts.
    pub fn page(
        &self,
        after: Option<&AlertCursor>,
        limit: usize,
        scan_max: usize,
        keep: impl Fn(&StoredAlert) -> bool,
    ) -> Result<(Vec<StoredAlert>, Option<AlertCursor>), StoreError> {
        self.page_where(AlertWhere::default(), after, limit, scan_max, keep)
    }

    /// [`AlertStore::page`] of the alerts `select` names: on PostgreSQL only those are read (and count
    /// towards `scan_max`); the embedded store reads every alert and keeps those.
    pub fn page_where(
        &self,
        select: AlertWhere<'_>,
        after: Option<&AlertCursor>,
        limit: usize,
        scan_max: usize,
        keep: impl Fn(&StoredAlert) -> bool,
    ) -> Result<(Vec<StoredAlert>, Option<AlertCursor>), StoreError> {
        let (store, rt) = match &self.backend {
            Backend::Sled(s) => return s.page(after, limit, scan_max, |a| select.matches(a) && keep(a)),
            Backend::Postgres { store, rt } => (store, rt),
        };
        let (mut out, mut last, mut from, mut scanned) = (Vec::new(), None, after.cloned(), 0usize);
        loop {
            let want = (scan_max - scanned).saturating_add(1).min(PG_CHUNK);
            let chunk = block_on(rt, store.listed_before(select, from.as_ref(), want))?;
            if chunk.is_empty() {
                return Ok((out, None));
            }
            for a in chunk {
                if out.len() == limit || scanned == scan_max {
                    return Ok((out, last));
                }
                scanned += 1;
                last = Some(a.cursor());
                if keep(&a) {
                    out.push(a);
                }
            }
            from = last.clone();
        }
    }

    /// Records an operator's acknowledgement, made by `make` from the alert as it stands (under the same
    /// lock as ingest's snapshots, which on PostgreSQL every replica takes); `None` if there is no such alert.
    pub fn acknowledge<E: From<StoreError>>(
        &self,
        device: &str,
        id: u64,
        make: impl FnOnce(&StoredAlert) -> Result<AlertAck, E>,
    ) -> Result<Option<StoredAlert>, E> {
        let (store, rt) = match &self.backend {
            Backend::Sled(s) => return s.acknowledge(device, id, make),
            Backend::Postgres { store, rt } => (store, rt),
        };
        let lock = block_on(rt, store.lock(device)).map_err(StoreError::from)?;
        let acked = (|| -> Result<Option<StoredAlert>, E> {
            let Some(mut a) = block_on(rt, store.get(device, id)).map_err(StoreError::from)? else { return Ok(None) };
            a.ack = Some(make(&a)?);
            block_on(rt, store.replace(&a)).map_err(StoreError::from)?;
            Ok(Some(a))
        })();
        block_on(rt, lock.release());
        acked
    }

    /// Removes closed alerts whose latest snapshot arrived before `before_ms`, oldest listed first, at most
    /// `max`, and returns how many went. Open alerts stay, however old. Training labels an acknowledgement
    /// wrote are kept apart (the model registry's) and stay too. Not durable until the store's next commit on
    /// the embedded store.
    pub fn prune(&self, before_ms: u64, max: usize) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.prune(before_ms, max),
            Backend::Postgres { store, rt } => Ok(block_on(rt, store.prune(before_ms, max))?),
        }
    }

    /// Open alerts by class, for `/metrics`.
    pub fn open_by_class(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.open_by_class(),
            Backend::Postgres { store, rt } => Ok(block_on(rt, store.open_by_class())?),
        }
    }
}

/// What a page of alerts is drawn from: one device's, open or closed ones (each `None`: all).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AlertWhere<'a> {
    pub device: Option<&'a str>,
    pub open: Option<bool>,
}

impl AlertWhere<'_> {
    pub fn matches(&self, a: &StoredAlert) -> bool {
        self.device.is_none_or(|d| d == a.device) && self.open.is_none_or(|o| o == a.open)
    }
}

/// Alerts read from PostgreSQL per round trip while paging.
const PG_CHUNK: usize = 256;

impl SledAlerts {
    fn decode(&self, device: &str, id: u64, bytes: &[u8]) -> Result<StoredAlert, StoreError> {
        serde_json::from_slice(bytes).map_err(|e| corrupt(device, id, e))
    }

    fn write(&self, a: &StoredAlert) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(a).map_err(|e| corrupt(&a.device, a.alert.id, e))?;
        let key = alert_key(&a.device, a.alert.id);
        self.alerts.insert(key.clone(), bytes)?;
        if a.open {
            self.open_index.insert(key, a.class.as_bytes())?;
        } else {
            self.open_index.remove(key)?;
        }
        Ok(())
    }

    fn count(&self, device: &str) -> Result<u64, StoreError> {
        Ok(self.counts.get(device.as_bytes())?.map_or(0, |v| u64::from_be_bytes(v[..8].try_into().unwrap_or_default())))
    }

    /// Makes room for one more alert of `device`: removes its lowest-numbered one when it is at the cap.
    fn make_room(&self, device: &str) -> Result<(), StoreError> {
        let n = self.count(device)?;
        if (n as usize) < MAX_ALERTS_PER_DEVICE {
            self.counts.insert(device.as_bytes(), &(n + 1).to_be_bytes())?;
            return Ok(());
        }
        let mut prefix = device.as_bytes().to_vec();
        prefix.push(0);
        if let Some((k, v)) = self.alerts.scan_prefix(&prefix).next().transpose()? {
            let id = u64::from_be_bytes(k[prefix.len()..].try_into().unwrap_or_default());
            let old = self.decode(device, id, &v)?;
            self.by_onset.remove(old.cursor().index_key())?;
            self.open_index.remove(&k)?;
            self.alerts.remove(&k)?;
        }
        Ok(())
    }

    fn mark(&self, device: &str) -> Result<u64, StoreError> {
        Ok(self.marks.get(device.as_bytes())?.map_or(0, |v| u64::from_be_bytes(v[..8].try_into().unwrap_or_default())))
    }

    fn get(&self, device: &str, id: u64) -> Result<Option<StoredAlert>, StoreError> {
        match self.alerts.get(alert_key(device, id))? {
            Some(v) => Ok(Some(self.decode(device, id, &v)?)),
            None => Ok(None),
        }
    }

    fn page(
        &self,
        after: Option<&AlertCursor>,
        limit: usize,
        scan_max: usize,
        keep: impl Fn(&StoredAlert) -> bool,
    ) -> Result<(Vec<StoredAlert>, Option<AlertCursor>), StoreError> {
        let range = match after {
            Some(c) => self.by_onset.range(..c.index_key()),
            None => self.by_onset.range::<&[u8], _>(..),
        };
        let mut out = Vec::new();
        let mut last = None;
        for (scanned, kv) in range.rev().enumerate() {
            let (k, _) = kv?;
            if out.len() == limit || scanned == scan_max {
                return Ok((out, last));
            }
            let onset_ms = u64::from_be_bytes(k[..8].try_into().unwrap_or_default());
            let rest = &k[8..];
            let split = rest.len().saturating_sub(9);
            let device = String::from_utf8_lossy(&rest[..split]).into_owned();
            let id = u64::from_be_bytes(rest[split + 1..].try_into().unwrap_or_default());
            last = Some(AlertCursor { onset_ms, device: device.clone(), id });
            if let Some(a) = self.get(&device, id)? {
                if keep(&a) {
                    out.push(a);
                }
            }
        }
        Ok((out, None))
    }

    fn acknowledge<E: From<StoreError>>(
        &self,
        device: &str,
        id: u64,
        make: impl FnOnce(&StoredAlert) -> Result<AlertAck, E>,
    ) -> Result<Option<StoredAlert>, E> {
        let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut a) = self.get(device, id)? else { return Ok(None) };
        a.ack = Some(make(&a)?);
        self.write(&a)?;
        Ok(Some(a))
    }

    fn prune(&self, before_ms: u64, max: usize) -> Result<usize, StoreError> {
        let _one = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut gone = Vec::new();
        // Listed before the cutoff: every alert last heard of before it is among these (an onset is never
        // after the alert's latest snapshot arrived, except by a device clock's lead, which only delays it).
        for kv in self.by_onset.range(..before_ms.to_be_bytes().to_vec()) {
            if gone.len() == max {
                break;
            }
            let (k, _) = kv?;
            let rest = &k[8..];
            let split = rest.len().saturating_sub(9);
            let device = String::from_utf8_lossy(&rest[..split]).into_owned();
            let id = u64::from_be_bytes(rest[split + 1..].try_into().unwrap_or_default());
            match self.get(&device, id)? {
                // An index entry that is not the alert's own (a crash between two writes left the old one)
                // goes, and does not count: the alert is judged at its own entry.
                Some(a) if a.cursor().index_key() != k.as_ref() => {
                    self.by_onset.remove(&k)?;
                }
                Some(a) if !a.open && a.received_ms < before_ms => gone.push((k, a)),
                Some(_) => {}
                // An index entry without its alert (a crash between two writes): it goes too.
                None => {
                    self.by_onset.remove(&k)?;
                }
            }
        }
        for (index_key, a) in &gone {
            let key = alert_key(&a.device, a.alert.id);
            self.alerts.remove(&key)?;
            self.open_index.remove(&key)?;
            self.by_onset.remove(index_key)?;
            let n = self.count(&a.device)?.saturating_sub(1);
            self.counts.insert(a.device.as_bytes(), &n.to_be_bytes())?;
        }
        Ok(gone.len())
    }

    /// From the index of open alerts: no alert is decoded.
    fn open_by_class(&self) -> Result<std::collections::BTreeMap<String, u64>, StoreError> {
        let mut out = std::collections::BTreeMap::new();
        for kv in self.open_index.iter() {
            let (_, class) = kv?;
            *out.entry(String::from_utf8_lossy(&class).into_owned()).or_default() += 1;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_common::alerts::{AlertPolicy, AlertTracker};
    use edgeloop_common::durable::Durability;

    fn sled(s: &AlertStore) -> &SledAlerts {
        match &s.backend {
            Backend::Sled(s) => s,
            Backend::Postgres { .. } => unreachable!("opened on sled"),
        }
    }

    fn store() -> (tempfile::TempDir, AlertStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(dir.path(), Durability::Flush).unwrap();
        (dir, AlertStore::open(&db).unwrap())
    }

    /// The snapshots a device sends for `alerts` faults of 3 flagged windows each, 100 s apart.
    fn snapshots(alerts: u64) -> Vec<AlertEvent> {
        let p =
            AlertPolicy { open_after: 2, close_after: 2, cooldown_secs: 0, range_tolerance: 0.02, tail_days: 365.0 };
        let mut t = AlertTracker::default();
        let mut out = Vec::new();
        for k in 0..alerts {
            for (i, flagged) in [true, true, true, false, false].into_iter().enumerate() {
                let ts = (k * 100 + i as u64) * 1000;
                out.extend(t.observe(&p, "s", ts, if flagged { 3.0 } else { 0.0 }, flagged, None));
            }
        }
        out
    }

    #[test]
    fn a_drift_explains_the_alerts_its_model_raised_in_the_drifted_window_only() {
        use crate::ml::triggers::{Cause, DriftedWindow, TriggerEvent};
        let (v1, v2) = ("a1".repeat(32), "b2".repeat(32));
        let alert = |class: &str, sha: &str, onset_ms: u64| {
            let mut e = snapshots(1)[0].clone();
            e.model = Some(format!("city-traffic v1 (sha256:{})", &sha[..12]));
            (e.onset_ms, e.last_ms, e.peak_ms) = (onset_ms, onset_ms, onset_ms);
            plan_put("d1", class, e, 0, 0, None).store.unwrap()
        };
        let drift = |at_ms: u64, psi: f64, window: Option<(u64, u64)>| TriggerEvent {
            class: "city-traffic".into(),
            at_ms,
            cause: Cause::Drift { feature: "rolling_mean".into(), psi, threshold: 0.25 },
            job: Some(5),
            error: None,
            drifted: window.map(|(from_ms, to_ms)| DriftedWindow { from_ms, to_ms, model_sha256: v1.clone() }),
        };
        let triggers = [drift(10, 0.31, Some((1_000, 2_000))), drift(20, 0.40, Some((1_500, 3_000)))];
        // v1's alert in the first window, and in both (the latest trigger explains it).
        let d = drift_explaining(&alert("city-traffic", &v1, 1_200), &triggers).unwrap();
        assert_eq!((d.at_ms, d.feature.as_str(), d.job), (10, "rolling_mean", Some(5)));
        assert_eq!(drift_explaining(&alert("city-traffic", &v1, 1_800), &triggers).unwrap().psi, 0.40);
        // Outside every window, another model's, another class's, or no model named: not explained.
        assert_eq!(drift_explaining(&alert("city-traffic", &v1, 999), &triggers), None);
        assert_eq!(drift_explaining(&alert("city-traffic", &v1, 3_001), &triggers), None);
        assert_eq!(drift_explaining(&alert("city-traffic", &v2, 1_200), &triggers), None);
        assert_eq!(drift_explaining(&alert("city-air", &v1, 1_200), &triggers), None);
        let mut unnamed = alert("city-traffic", &v1, 1_200);
        unnamed.alert.model = None;
        assert_eq!(drift_explaining(&unnamed, &triggers), None);
        // A label that names too little of a sha256 matches nothing.
        unnamed.alert.model = Some("city-traffic v1 (sha256:a1)".into());
        assert_eq!(drift_explaining(&unnamed, &triggers), None);
        // A drift trigger that recorded no window (before windows were recorded), or another cause: none.
        let old = [drift(10, 0.31, None)];
        assert_eq!(drift_explaining(&alert("city-traffic", &v1, 1_200), &old), None);
        // Filled on read, never stored.
        let mut listed = vec![alert("city-traffic", &v1, 1_200), alert("city-traffic", &v2, 1_200)];
        explain_drift(&mut listed, &triggers);
        assert!(listed[0].drift.is_some() && listed[1].drift.is_none());
        let (_d, s) = store();
        let mut e = snapshots(1)[0].clone();
        e.model = listed[0].alert.model.clone();
        s.put("d1", "city-traffic", e, 0).unwrap();
        assert_eq!(s.get("d1", 1).unwrap().unwrap().drift, None);
    }

    #[test]
    fn the_latest_snapshot_wins_and_the_mark_waits_for_gaps() {
        let (_d, s) = store();
        let snaps = snapshots(2); // revs 1 (open), 2 (close), 3 (open), 4 (close)
        assert_eq!(s.put("d1", "c", snaps[0].clone(), 10).unwrap(), 1);
        // rev 3 before rev 2: stored, but the mark stays at 1 until 2 arrives.
        assert_eq!(s.put("d1", "c", snaps[2].clone(), 11).unwrap(), 1);
        assert_eq!(s.put("d1", "c", snaps[1].clone(), 12).unwrap(), 2);
        // A resend of what is already here changes nothing.
        assert_eq!(s.put("d1", "c", snaps[0].clone(), 13).unwrap(), 2);
        let first = s.get("d1", 1).unwrap().unwrap();
        assert!(!first.open && first.alert.rev == 2 && first.received_ms == 12);
        assert!(s.get("d1", 2).unwrap().unwrap().open);
        // A sender whose snapshots up to 5 are acknowledged and gone: the mark moves up to its floor.
        let later = AlertEvent { floor: 5, rev: 7, ..snaps[3].clone() };
        assert_eq!(s.put("d1", "c", later, 14).unwrap(), 5);
    }

    #[test]
    fn pages_are_newest_first_and_filtered() {
        let (_d, s) = store();
        for (k, snap) in snapshots(5).into_iter().enumerate() {
            s.put("d1", "c", snap, k as u64).unwrap();
        }
        let (page, next) = s.page(None, 2, 1000, |_| true).unwrap();
        assert_eq!(page.iter().map(|a| a.alert.id).collect::<Vec<_>>(), [5, 4]);
        let (page, next) = s.page(next.as_ref(), 2, 1000, |_| true).unwrap();
        assert_eq!(page.iter().map(|a| a.alert.id).collect::<Vec<_>>(), [3, 2]);
        let (page, next) = s.page(next.as_ref(), 2, 1000, |_| true).unwrap();
        assert_eq!((page.iter().map(|a| a.alert.id).collect::<Vec<_>>(), next), (vec![1], None));
        let cursor = AlertCursor { onset_ms: 5, device: "a.b".into(), id: 7 };
        assert_eq!(AlertCursor::parse(&cursor.encode()).unwrap(), cursor);
        assert!(AlertCursor::parse("x").is_err());
        let (odd, _) = s.page(None, 10, 1000, |a| a.alert.id % 2 == 1).unwrap();
        assert_eq!(odd.iter().map(|a| a.alert.id).collect::<Vec<_>>(), [5, 3, 1]);
    }

    #[test]
    fn a_device_keeps_at_most_its_cap_and_open_alerts_are_counted() {
        let (_d, s) = store();
        let open = |id: u64| AlertEvent {
            id,
            rev: id,
            sensor: "s".into(),
            model: None,
            onset_ms: id,
            last_ms: id,
            peak_score: 1.0,
            peak_ms: id,
            windows: 1,
            end_ms: None,
            floor: 0,
        };
        for id in 1..=(MAX_ALERTS_PER_DEVICE as u64 + 5) {
            s.put("flood", "c", open(id), id).unwrap();
        }
        s.put("calm", "d", open(1), 1).unwrap();
        assert!(s.get("flood", 5).unwrap().is_none() && s.get("flood", 6).unwrap().is_some());
        let (page, _) = s.page(None, 1000, 1_000_000, |a| a.device == "flood").unwrap();
        assert_eq!(page.len(), 1000);
        let open_now = s.open_by_class().unwrap();
        assert_eq!((open_now["c"], open_now["d"]), (MAX_ALERTS_PER_DEVICE as u64, 1));
        // Closing one takes it out of the count.
        s.put("calm", "d", AlertEvent { end_ms: Some(2), rev: 2, last_ms: 1, ..open(1) }, 2).unwrap();
        assert_eq!(s.open_by_class().unwrap().get("d"), None);
    }

    #[test]
    fn an_onset_far_ahead_is_kept_and_listed_when_it_arrived() {
        let (_d, s) = store();
        let day = MAX_ONSET_AHEAD_MS;
        let snaps = snapshots(2);
        let now = 10 * day;
        // Alert 1's onset is two days ahead of this clock (a device clock that runs ahead); alert 2's an hour
        // ahead, within the day allowed.
        let ahead =
            AlertEvent { onset_ms: now + 2 * day, last_ms: now + 2 * day, peak_ms: now + 2 * day, ..snaps[0].clone() };
        let behind = AlertEvent {
            onset_ms: now + 3_600_000,
            last_ms: now + 3_600_000,
            peak_ms: now + 3_600_000,
            ..snaps[2].clone()
        };
        assert_eq!(s.put("d1", "c", ahead.clone(), now).unwrap(), 1);
        s.put("d1", "c", behind, now + 1).unwrap();
        let kept = s.get("d1", 1).unwrap().unwrap();
        assert_eq!((kept.alert.onset_ms, kept.listed_ms, kept.list_ms()), (now + 2 * day, Some(now), now));
        assert_eq!(s.get("d1", 2).unwrap().unwrap().listed_ms, None);
        // Listed at its arrival, it comes after alert 2 (listed an hour after that) and does not stay first.
        let (page, _) = s.page(None, 10, 1000, |_| true).unwrap();
        assert_eq!(page.iter().map(|a| a.alert.id).collect::<Vec<_>>(), [2, 1]);
        // Its close, a day later, keeps its place (one index entry, at the first arrival).
        let closed = AlertEvent { end_ms: Some(now + 3 * day), last_ms: now + 2 * day, rev: 2, ..ahead };
        s.put("d1", "c", closed, now + day).unwrap();
        let a = s.get("d1", 1).unwrap().unwrap();
        assert_eq!((a.open, a.listed_ms), (false, Some(now)));
        let (page, _) = s.page(None, 10, 1000, |_| true).unwrap();
        assert_eq!(page.iter().map(|a| a.alert.id).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(sled(&s).by_onset.len(), 2);
    }

    #[test]
    fn retention_removes_closed_alerts_heard_of_before_the_cutoff_and_they_do_not_come_back() {
        let (_d, s) = store();
        let snaps = snapshots(3); // alerts 1, 2, 3 of d1: revs 1 and 2, 3 and 4, 5 and 6 (open, then closed)
        for (i, snap) in snaps.iter().enumerate() {
            // Each snapshot arrives as it happens, but alert 3's close arrives late, at 500 s.
            let now = if i == 5 { 500_000 } else { snap.last_ms + 1 };
            s.put("d1", "c", snap.clone(), now).unwrap();
        }
        // An alert of d2 that opened long ago and is still open.
        s.put("d2", "c", snaps[0].clone(), snaps[0].last_ms + 1).unwrap();
        assert_eq!((sled(&s).count("d1").unwrap(), sled(&s).count("d2").unwrap()), (3, 1));

        // At 300 s: alerts 1 and 2 closed before it; alert 3 was last heard of after it; d2's is open.
        assert_eq!(s.prune(300_000, 100).unwrap(), 2);
        assert!(s.get("d1", 1).unwrap().is_none() && s.get("d1", 2).unwrap().is_none());
        assert!(!s.get("d1", 3).unwrap().unwrap().open);
        assert!(s.get("d2", 1).unwrap().unwrap().open);
        let (page, _) = s.page(None, 10, 1000, |_| true).unwrap();
        let listed: Vec<(&str, u64)> = page.iter().map(|a| (a.device.as_str(), a.alert.id)).collect();
        assert_eq!(listed, [("d1", 3), ("d2", 1)]);
        assert_eq!(sled(&s).count("d1").unwrap(), 1);

        // A device resending a removed alert's snapshot (acknowledged long ago) does not bring it back.
        assert_eq!(s.put("d1", "c", snaps[1].clone(), 600_000).unwrap(), 6);
        assert!(s.get("d1", 1).unwrap().is_none());

        // A stale index entry for alert 3 (left by a crash between two writes, at an older place) goes
        // without counting the alert twice.
        let mut stale = 1u64.to_be_bytes().to_vec();
        stale.extend_from_slice(&alert_key("d1", 3));
        sled(&s).by_onset.insert(stale, &[]).unwrap();
        // At most `max` a call; the open alert stays however late the cutoff.
        assert_eq!(s.prune(u64::MAX, 0).unwrap(), 0);
        assert_eq!(s.prune(u64::MAX, 5).unwrap(), 1);
        assert!(s.get("d1", 3).unwrap().is_none() && s.get("d2", 1).unwrap().is_some());
        assert_eq!((sled(&s).count("d1").unwrap(), sled(&s).by_onset.len()), (0, 1));
        assert_eq!(s.prune(u64::MAX, 5).unwrap(), 0);
    }

    #[test]
    fn an_acknowledgement_is_kept_across_later_snapshots() {
        let (_d, s) = store();
        let snaps = snapshots(1);
        s.put("d1", "c", snaps[0].clone(), 1).unwrap();
        let ack = AlertAck { by: "ops (t1)".into(), at_ms: 5, verdict: Some(true), note: String::new(), label: None };
        let make = |_: &StoredAlert| Ok::<_, StoreError>(ack.clone());
        assert!(s.acknowledge("d1", 1, make).unwrap().is_some());
        assert!(s.acknowledge("d1", 9, make).unwrap().is_none());
        s.put("d1", "c", snaps[1].clone(), 2).unwrap();
        let a = s.get("d1", 1).unwrap().unwrap();
        assert_eq!((a.open, a.ack), (false, Some(ack)));
        assert_eq!(s.open_by_class().unwrap().get("c"), None);
    }
}
