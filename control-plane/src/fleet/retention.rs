//! Telemetry retention: records older than their class's `retention_days` are pruned in the background.
//!
//! Only acknowledged records go (at or below the device's watermark), so no device is ever asked to resend
//! one, and a pruned record can never come back as new. Each device's records are pruned in sequence order,
//! up to the first one younger than the cutoff: work is bounded by what is old. Nothing is pruned while a
//! training job is queued or running, so a job never loses rows it is reading.

use super::devices::Registry;
use super::telemetry::{StoreError, TelemetryStore};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

fn default_every_secs() -> u64 {
    3600
}

fn default_log_days() -> u64 {
    14
}

fn default_alert_days() -> u64 {
    365
}

/// `[retention]` in `control-plane.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Days a record is kept for classes not named in `classes`; 0 keeps them forever.
    #[serde(default)]
    pub days: u64,
    /// Days per class, overriding `days` (0: forever).
    #[serde(default)]
    pub classes: BTreeMap<String, u64>,
    /// How often the pruner runs, seconds.
    #[serde(default = "default_every_secs")]
    pub every_secs: u64,
    /// Days device log lines are kept (by when they arrived).
    #[serde(default = "default_log_days")]
    pub log_days: u64,
    /// Days a closed alert is kept after its last snapshot arrived; 0 keeps alerts (up to the per-device cap).
    #[serde(default = "default_alert_days")]
    pub alert_days: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            days: 0,
            classes: BTreeMap::new(),
            every_secs: default_every_secs(),
            log_days: default_log_days(),
            alert_days: default_alert_days(),
        }
    }
}

impl RetentionConfig {
    /// Days a record of `class` is kept (0: forever).
    pub fn days_for(&self, class: &str) -> u64 {
        self.classes.get(class).copied().unwrap_or(self.days)
    }

    /// Whether anything is ever pruned.
    pub fn prunes(&self) -> bool {
        self.days > 0 || self.classes.values().any(|d| *d > 0)
    }
}

/// Removes device log lines received more than `days` ago, committing every [`BATCH`]. Returns how many went.
/// Blocking.
pub fn prune_logs(logs: &super::logs::LogStore, days: u64, now_ms: u64) -> Result<u64, StoreError> {
    let before_ms = cutoff_ms(now_ms, days);
    in_batches(|| logs.prune(before_ms, BATCH), || logs.commit())
}

/// Removes closed alerts whose last snapshot arrived more than `days` ago (none when `days` is 0), committing
/// every [`BATCH`]. Returns how many went. Blocking.
pub fn prune_alerts(
    alerts: &super::alerts::AlertStore,
    db: &edgeloop_common::durable::DurableDb,
    days: u64,
    now_ms: u64,
) -> Result<u64, StoreError> {
    if days == 0 {
        return Ok(0);
    }
    let before_ms = cutoff_ms(now_ms, days);
    in_batches(|| Ok(alerts.prune(before_ms, BATCH)? as u64), || Ok(db.commit()?))
}

/// `days` before `now_ms`.
fn cutoff_ms(now_ms: u64, days: u64) -> u64 {
    now_ms.saturating_sub(days.saturating_mul(86_400_000))
}

/// Calls `prune` (at most [`BATCH`] a call) and `commit` after each call that removed something, until a call
/// removes nothing. Returns how many went.
fn in_batches(
    mut prune: impl FnMut() -> Result<u64, StoreError>,
    mut commit: impl FnMut() -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let mut total = 0;
    loop {
        let n = prune()?;
        if n == 0 {
            return Ok(total);
        }
        commit()?;
        total += n;
    }
}

/// Records pruned per store commit.
const BATCH: usize = 10_000;

/// One pass over every device: prunes acknowledged records older than their class's retention, committing
/// every [`BATCH`] records. Returns how many went. Blocking.
pub fn prune_once(
    store: &TelemetryStore,
    registry: &Registry,
    cfg: &RetentionConfig,
    now_ms: u64,
) -> Result<u64, StoreError> {
    let mut total = 0;
    for d in registry.list() {
        let days = cfg.days_for(&d.class);
        if days == 0 {
            continue;
        }
        let before_ms = cutoff_ms(now_ms, days);
        total += in_batches(|| store.prune(&d.id, before_ms, BATCH), || store.commit())?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_common::durable::{Durability, DurableDb};
    use edgeloop_common::envelope::Record;

    const DAY: u64 = 86_400_000;

    fn rec(seq: u64, ts_ms: u64) -> Record {
        Record { seq, ts_ms, sensor: "t".into(), features: vec![1.0], score: None, flags: 0 }
    }

    #[test]
    fn only_acknowledged_records_past_their_class_s_retention_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(dir.path(), Durability::Flush).unwrap();
        let store = TelemetryStore::open(db.clone()).unwrap();
        let registry = Registry::open(&db).unwrap();
        let now = 100 * DAY;
        // Each device: records 1..=10, a day apart, ending today; acknowledged up to 8.
        for (device, class) in [("a1", "air"), ("p1", "press"), ("x1", "other")] {
            registry.update(device, now, |d| d.class = class.into()).unwrap();
            for seq in 1..=10 {
                store.insert(device, &rec(seq, now - (10 - seq) * DAY)).unwrap();
            }
            store.set_watermark(device, 8).unwrap();
        }
        store.commit().unwrap();
        let cfg = RetentionConfig {
            days: 0,
            classes: [("air".to_string(), 3), ("press".to_string(), 0)].into(),
            every_secs: 3600,
            ..Default::default()
        };
        assert_eq!(cfg.days_for("other"), 0);
        assert!(cfg.prunes());
        let gone = prune_once(&store, &registry, &cfg, now).unwrap();
        // air keeps 3 days: seqs 1..=6 are older (ts now-9d..now-4d); 7 is 3 days old exactly, kept.
        assert_eq!(gone, 6);
        let left: Vec<u64> = store
            .query("a1", crate::fleet::Query { after_seq: 0, from_ms: None, to_ms: None, limit: 100 })
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(left, vec![7, 8, 9, 10]);
        assert_eq!((store.count("p1").unwrap(), store.count("x1").unwrap()), (10, 10), "kept forever");
        // Unacknowledged records are never pruned, however old.
        let old =
            RetentionConfig { days: 1, classes: BTreeMap::new(), every_secs: 3600, log_days: 14, alert_days: 365 };
        let gone = prune_once(&store, &registry, &old, now + 30 * DAY).unwrap();
        assert_eq!(gone, 2 + 8 + 8, "a1: 7 and 8; p1 and x1: 1..=8");
        for d in ["a1", "p1", "x1"] {
            let seqs: Vec<u64> = store
                .query(d, crate::fleet::Query { after_seq: 0, from_ms: None, to_ms: None, limit: 100 })
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect();
            assert_eq!(seqs, vec![9, 10], "{d}: what is not acknowledged stays");
        }
        // Durable: a reopened store has the same.
        drop((store, registry, db));
        let store = TelemetryStore::open(DurableDb::open(dir.path(), Durability::Flush).unwrap()).unwrap();
        assert_eq!(store.count("a1").unwrap(), 2);
    }

    #[test]
    fn closed_alerts_go_after_alert_days_and_zero_keeps_them() {
        use edgeloop_common::alerts::AlertEvent;
        let dir = tempfile::tempdir().unwrap();
        let db = DurableDb::open(dir.path(), Durability::Flush).unwrap();
        let alerts = super::super::alerts::AlertStore::open(&db).unwrap();
        let now = 100 * DAY;
        let alert = |id: u64, end: Option<u64>| AlertEvent {
            id,
            rev: id,
            sensor: "s".into(),
            model: None,
            onset_ms: id * DAY,
            last_ms: id * DAY,
            end_ms: end,
            peak_score: 5.0,
            peak_ms: id * DAY,
            windows: 3,
            floor: 0,
        };
        // 1: closed, heard of 10 days ago; 2: closed, an hour ago; 3: open since 10 days ago.
        alerts.put("d1", "c", alert(1, Some(DAY)), now - 10 * DAY).unwrap();
        alerts.put("d1", "c", alert(2, Some(2 * DAY)), now - 3_600_000).unwrap();
        alerts.put("d1", "c", alert(3, None), now - 10 * DAY).unwrap();
        db.commit().unwrap();
        assert_eq!(prune_alerts(&alerts, &db, 0, now).unwrap(), 0);
        assert_eq!(prune_alerts(&alerts, &db, 7, now).unwrap(), 1);
        assert!(alerts.get("d1", 1).unwrap().is_none());
        assert!(alerts.get("d1", 2).unwrap().is_some() && alerts.get("d1", 3).unwrap().is_some());
        assert_eq!(prune_alerts(&alerts, &db, 7, now).unwrap(), 0);
    }
}
