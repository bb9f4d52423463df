//! The audit log: every mutating operator call, with who, what and when, kept durably in sled in time order,
//! or (`[storage] backend = "postgres"`) in PostgreSQL's `audit` table, one log for every replica.
//!
//! What one caller can make it keep is bounded, because refused calls come from anyone who reaches the API:
//! - an entry's `action` and `detail` are cut to [`MAX_ACTION_BYTES`] and [`MAX_DETAIL_BYTES`], marked as
//!   truncated;
//! - refusals (401 and 403) from the same source, by the same caller and with the same status, within
//!   [`AuditConfig::refusal_window_secs`] of the first, are one entry with a `count`;
//! - the log keeps at most [`AuditConfig::max_entries`] entries, none older than
//!   [`AuditConfig::max_age_days`]; the oldest go first.

use crate::fleet::telemetry::StoreError;
use crate::storage::postgres::audit::PgAudit;
use crate::storage::postgres::block_on;
use edgeloop_common::durable::DurableDb;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Longest `action` (method and path) an entry keeps, in bytes.
pub const MAX_ACTION_BYTES: usize = 256;
/// Longest `detail` an entry keeps, in bytes.
pub const MAX_DETAIL_BYTES: usize = 1024;
/// Refusal aggregates followed at once; past it the oldest is forgotten (its entry stays, a later refusal
/// from that source starts a new one).
const MAX_OPEN_AGGREGATES: usize = 1024;

#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    /// The operator, as far as the API knows them.
    pub who: String,
    /// Method and path, e.g. `POST /api/v1/rollouts`.
    pub action: String,
    /// The HTTP status the call got.
    pub status: u16,
    /// What was asked or what came of it, in a line.
    pub detail: String,
    /// How many calls the entry stands for: 1, or more for refusals folded into one entry.
    #[serde(default = "one")]
    pub count: u64,
    /// When the last of the calls counted came, for an entry that stands for more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ms: Option<u64>,
    /// The caller's IP address, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

fn one() -> u64 {
    1
}

impl AuditEntry {
    /// One call, with no source.
    pub fn new(
        at_ms: u64,
        who: impl Into<String>,
        action: impl Into<String>,
        status: u16,
        detail: impl Into<String>,
    ) -> Self {
        AuditEntry {
            at_ms,
            who: who.into(),
            action: action.into(),
            status,
            detail: detail.into(),
            count: 1,
            last_ms: None,
            source: None,
        }
    }

    /// The entry with `action` and `detail` cut to their bounds.
    fn bounded(mut self) -> AuditEntry {
        self.action = truncate(&self.action, MAX_ACTION_BYTES);
        self.detail = truncate(&self.detail, MAX_DETAIL_BYTES);
        self
    }
}

/// `s` if it fits in `max` bytes, else its first `max` bytes or fewer (on a character boundary), marked with
/// the length it had.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[truncated, {} bytes]", &s[..end], s.len())
}

/// How much the audit log keeps (`[audit]` in `control-plane.toml`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Most entries kept; the oldest go first.
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
    /// Entries older than this many days are removed.
    #[serde(default = "default_max_age_days")]
    pub max_age_days: u64,
    /// Refusals (401, 403) from one source, by one caller, with one status, within this many seconds of the
    /// first are one entry with a count. 0 records each refusal on its own.
    #[serde(default = "default_refusal_window_secs")]
    pub refusal_window_secs: u64,
}

fn default_max_entries() -> u64 {
    100_000
}
fn default_max_age_days() -> u64 {
    365
}
fn default_refusal_window_secs() -> u64 {
    60
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            max_entries: default_max_entries(),
            max_age_days: default_max_age_days(),
            refusal_window_secs: default_refusal_window_secs(),
        }
    }
}

/// What identifies refusals that fold into one entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct RefusalKey {
    who: String,
    source: Option<String>,
    status: u16,
}

/// An entry still taking refusals.
#[derive(Debug, Clone)]
struct Open {
    key: Vec<u8>,
    entry: AuditEntry,
}

/// Which refusals fold into which entry: pure bookkeeping, no I/O.
#[derive(Debug, Default)]
struct Refusals {
    open: HashMap<RefusalKey, Open>,
}

impl Refusals {
    /// The open entry `e` folds into, counted, if there is one within `window_ms` of its first call.
    fn fold(&mut self, e: &AuditEntry, window_ms: u64) -> Option<Open> {
        let k = RefusalKey { who: e.who.clone(), source: e.source.clone(), status: e.status };
        let open = self.open.get_mut(&k)?;
        if window_ms == 0 || e.at_ms >= open.entry.at_ms.saturating_add(window_ms) || e.at_ms < open.entry.at_ms {
            self.open.remove(&k);
            return None;
        }
        open.entry.count += 1;
        open.entry.last_ms = Some(e.at_ms);
        Some(open.clone())
    }

    /// Remembers a newly written refusal entry, forgetting those whose window has passed.
    fn opened(&mut self, key: Vec<u8>, entry: AuditEntry, window_ms: u64) {
        let now = entry.at_ms;
        self.open.retain(|_, o| now < o.entry.at_ms.saturating_add(window_ms));
        if self.open.len() >= MAX_OPEN_AGGREGATES {
            if let Some(oldest) = self.open.iter().min_by_key(|(_, o)| o.entry.at_ms).map(|(k, _)| k.clone()) {
                self.open.remove(&oldest);
            }
        }
        let k = RefusalKey { who: entry.who.clone(), source: entry.source.clone(), status: entry.status };
        self.open.insert(k, Open { key, entry });
    }

    /// Forgets the entry a count is about to go to, after it was removed.
    fn forget(&mut self, e: &AuditEntry) {
        self.open.remove(&RefusalKey { who: e.who.clone(), source: e.source.clone(), status: e.status });
    }
}

pub struct AuditLog {
    db: DurableDb,
    tree: sled::Tree,
    counter: AtomicU64,
    /// Entries in `tree`.
    len: AtomicU64,
    config: AuditConfig,
    refusals: Mutex<Refusals>,
    /// With PostgreSQL: the log every replica writes, instead of `tree`.
    shared: Option<(PgAudit, tokio::runtime::Handle)>,
}

/// Entries appended between two prunings of the shared log.
const PRUNE_EVERY: u64 = 64;

fn decode(v: &[u8]) -> Result<AuditEntry, StoreError> {
    ciborium::from_reader(v).map_err(|e| StoreError::Corrupt { device: "audit".into(), seq: 0, reason: e.to_string() })
}

impl AuditLog {
    /// Opens the log with the default bounds.
    pub fn open(db: &DurableDb) -> Result<AuditLog, StoreError> {
        Self::open_with(db, AuditConfig::default())
    }

    /// Opens the log and applies `config`'s bounds to what it already holds. Blocking.
    pub fn open_with(db: &DurableDb, config: AuditConfig) -> Result<AuditLog, StoreError> {
        let tree = db.tree("audit")?;
        let counter = tree.last()?.map_or(0, |(k, _)| key_counter(&k));
        let len = tree.len() as u64;
        let log = AuditLog {
            db: db.clone(),
            tree,
            counter: AtomicU64::new(counter),
            len: AtomicU64::new(len),
            config,
            refusals: Mutex::new(Refusals::default()),
            shared: None,
        };
        if log.prune(edgeloop_common::unix_millis())? > 0 {
            log.db.commit()?;
        }
        Ok(log)
    }

    /// The log in PostgreSQL, shared by every replica on the database, with `config`'s bounds.
    pub fn open_postgres(
        db: &DurableDb,
        config: AuditConfig,
        pg: PgAudit,
        rt: tokio::runtime::Handle,
    ) -> Result<AuditLog, StoreError> {
        let mut log = AuditLog::open_with(db, config)?;
        log.shared = Some((pg, rt));
        log.prune(edgeloop_common::unix_millis())?;
        Ok(log)
    }

    /// Appends an entry durably (its action and detail cut to their bounds), then removes what the retention
    /// bounds no longer allow. Blocking.
    pub fn record(&self, e: &AuditEntry) -> Result<(), StoreError> {
        self.insert(e.clone().bounded())?;
        if self.shared.is_none() {
            self.db.commit()?;
        }
        Ok(())
    }

    /// Records a refused call (401 or 403). Refusals from the same source, by the same caller and with the
    /// same status within the refusal window are one entry: the first is written durably like any entry,
    /// later ones raise its `count` and `last_ms` (made durable by the next commit of the store). Blocking.
    pub fn record_refusal(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let e = e.clone().bounded();
        let window_ms = self.config.refusal_window_secs.saturating_mul(1000);
        let mut refusals = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(open) = refusals.fold(&e, window_ms) {
            if let Some((pg, rt)) = &self.shared {
                let key: [u8; 16] = open.key.as_slice().try_into().unwrap_or_default();
                if block_on(rt, pg.replace(&key, &edgeloop_common::signing::to_cbor(&open.entry)))? {
                    return Ok(());
                }
            } else if self.tree.contains_key(&open.key)? {
                self.tree.insert(open.key, edgeloop_common::signing::to_cbor(&open.entry))?;
                return Ok(());
            }
            refusals.forget(&open.entry); // removed by retention: start a new entry
        }
        let key = self.insert(e.clone())?;
        if self.shared.is_none() {
            self.db.commit()?;
        }
        if window_ms > 0 {
            refusals.opened(key, e, window_ms);
        }
        Ok(())
    }

    /// Writes `e` under a new key and applies the retention bounds; returns the key. Not committed.
    fn insert(&self, e: AuditEntry) -> Result<Vec<u8>, StoreError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some((pg, rt)) = &self.shared {
            let key = block_on(rt, pg.insert(e.at_ms, &edgeloop_common::signing::to_cbor(&e)))?;
            if n % PRUNE_EVERY == 0 {
                self.prune(e.at_ms.max(edgeloop_common::unix_millis()))?;
            }
            return Ok(key.to_vec());
        }
        let mut key = e.at_ms.to_be_bytes().to_vec();
        key.extend_from_slice(&n.to_be_bytes());
        if self.tree.insert(key.clone(), edgeloop_common::signing::to_cbor(&e))?.is_none() {
            self.len.fetch_add(1, Ordering::Relaxed);
        }
        self.prune(e.at_ms.max(edgeloop_common::unix_millis()))?;
        Ok(key)
    }

    /// Removes the oldest entries while there are more than `max_entries`, or they are older than
    /// `max_age_days` at `now_ms`. Returns how many went. Not committed.
    fn prune(&self, now_ms: u64) -> Result<u64, StoreError> {
        let oldest_kept = now_ms.saturating_sub(self.config.max_age_days.saturating_mul(24 * 3600 * 1000));
        if let Some((pg, rt)) = &self.shared {
            return Ok(block_on(rt, pg.prune(oldest_kept, self.config.max_entries))?);
        }
        let mut removed = 0;
        while let Some((k, _)) = self.tree.first()? {
            let too_many = self.len.load(Ordering::Relaxed) > self.config.max_entries;
            if !too_many && key_time(&k) >= oldest_kept {
                break;
            }
            if self.tree.remove(&k)?.is_some() {
                self.len.fetch_sub(1, Ordering::Relaxed);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// How many entries the log holds (on PostgreSQL, counted there; 0 if that fails).
    pub fn len(&self) -> u64 {
        match &self.shared {
            Some((pg, rt)) => block_on(rt, pg.count()).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "counting audit entries");
                0
            }),
            None => self.len.load(Ordering::Relaxed),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The newest `limit` entries, newest first.
    /// Entries newest first, from before `before` (a key a previous page ended on), matching `keep`: at most
    /// `limit` of them, with the key of the last when more may follow. Reads at most [`MAX_SCANNED`] entries.
    pub fn page(
        &self,
        before: Option<[u8; 16]>,
        limit: usize,
        keep: impl Fn(&AuditEntry) -> bool,
    ) -> Result<(Vec<AuditEntry>, Option<[u8; 16]>), StoreError> {
        if let Some((pg, rt)) = &self.shared {
            let (mut out, mut scanned, mut cursor) = (Vec::new(), 0usize, before);
            'pages: loop {
                let want = 1000.min(MAX_SCANNED - scanned) as i64;
                let rows = block_on(rt, pg.before(cursor, want))?;
                let full = rows.len() as i64 == want;
                for (k, v) in rows {
                    scanned += 1;
                    cursor = Some(k);
                    let e = decode(&v)?;
                    if keep(&e) {
                        out.push(e);
                        if out.len() == limit {
                            break 'pages;
                        }
                    }
                }
                if !full || scanned >= MAX_SCANNED {
                    break;
                }
            }
            let more = out.len() == limit || scanned >= MAX_SCANNED;
            return Ok((out, if more { cursor } else { None }));
        }
        let iter = match before {
            Some(k) => self.tree.range(..k.to_vec()),
            None => self.tree.iter(),
        };
        let (mut out, mut scanned, mut last) = (Vec::new(), 0usize, None);
        for kv in iter.rev() {
            let (k, v) = kv?;
            scanned += 1;
            last = k.as_ref().try_into().ok();
            let e: AuditEntry = ciborium::from_reader(&v[..]).map_err(|e| StoreError::Corrupt {
                device: "audit".into(),
                seq: 0,
                reason: e.to_string(),
            })?;
            if keep(&e) {
                out.push(e);
                if out.len() == limit {
                    break;
                }
            }
            if scanned >= MAX_SCANNED {
                break;
            }
        }
        let more = out.len() == limit || scanned >= MAX_SCANNED;
        Ok((out, if more { last } else { None }))
    }

    pub fn recent(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        if self.shared.is_some() {
            return Ok(self.page(None, limit, |_| true)?.0);
        }
        self.tree
            .iter()
            .rev()
            .take(limit)
            .map(|kv| {
                let (_, v) = kv?;
                ciborium::from_reader(&v[..]).map_err(|e| StoreError::Corrupt {
                    device: "audit".into(),
                    seq: 0,
                    reason: e.to_string(),
                })
            })
            .collect()
    }
}

/// Entries one audit page reads at most before it returns what it found with a cursor.
pub const MAX_SCANNED: usize = 100_000;

/// A key is the entry's time then a counter, both big-endian `u64`.
fn key_time(k: &[u8]) -> u64 {
    k.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
}

fn key_counter(k: &[u8]) -> u64 {
    k.get(8..16).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path, config: AuditConfig) -> AuditLog {
        let db = DurableDb::open(dir, edgeloop_common::durable::Durability::Flush).unwrap();
        AuditLog::open_with(&db, config).unwrap()
    }

    fn refusal(at_ms: u64, source: &str, path: &str) -> AuditEntry {
        AuditEntry {
            source: Some(source.into()),
            ..AuditEntry::new(at_ms, "unauthenticated", format!("POST {path}"), 401, "no bearer token")
        }
    }

    #[test]
    fn entries_persist_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // Entries from 1970 are past any age bound: keep them for this test.
        let keep = AuditConfig { max_age_days: u64::MAX, ..AuditConfig::default() };
        {
            let log = open(dir.path(), keep);
            for (t, a) in [(5, "first"), (5, "second"), (9, "third")] {
                log.record(&AuditEntry::new(t, "op", a, 200, "")).unwrap();
            }
        }
        let log = open(dir.path(), keep);
        let got: Vec<String> = log.recent(10).unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(got, vec!["third", "second", "first"]);
        log.record(&AuditEntry::new(9, "op", "fourth", 200, "")).unwrap();
        assert_eq!(log.recent(1).unwrap()[0].action, "fourth", "the counter resumes after a restart");
    }

    /// The attack: refused calls with 60 KB paths. Each entry keeps 256 bytes of the path and says so.
    #[test]
    fn refused_paths_are_truncated_in_the_audit_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), AuditConfig { refusal_window_secs: 0, ..AuditConfig::default() });
        let now = edgeloop_common::unix_millis();
        let path = format!("/api/v1/{}", "é".repeat(30_000));
        let mut e = refusal(now, "192.0.2.7", &path);
        e.detail = "x".repeat(100_000);
        log.record_refusal(&e).unwrap();
        log.record(&AuditEntry::new(now, "op", format!("POST {path}"), 200, "y".repeat(5000))).unwrap();
        for got in log.recent(10).unwrap() {
            let cut = got.action.split('…').next().unwrap();
            assert!(cut.len() <= MAX_ACTION_BYTES && got.action.starts_with("POST /api/v1/é"), "{}", got.action.len());
            assert!(got.action.ends_with(&format!("…[truncated, {} bytes]", path.len() + 5)), "{}", &got.action[..300]);
            assert!(got.detail.len() < MAX_DETAIL_BYTES + 40 && got.detail.contains("truncated"));
        }
        let short = "POST /api/v1/rollouts";
        assert_eq!(truncate(short, MAX_ACTION_BYTES), short, "what fits is left alone");
    }

    /// The attack: 300 refused calls from one source in a burst. They make one entry with a count; another
    /// source, another status or a later window gets its own.
    #[test]
    fn repeated_refusals_are_one_entry_with_a_count() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path(), AuditConfig { refusal_window_secs: 60, ..AuditConfig::default() });
        let t0 = edgeloop_common::unix_millis();
        for i in 0..300 {
            log.record_refusal(&refusal(t0 + i, "192.0.2.7", &format!("/api/v1/x{i}"))).unwrap();
        }
        assert_eq!(log.len(), 1);
        let got = log.recent(10).unwrap();
        assert_eq!((got[0].count, got[0].last_ms, got[0].action.as_str()), (300, Some(t0 + 299), "POST /api/v1/x0"));
        log.record_refusal(&refusal(t0 + 300, "198.51.100.1", "/api/v1/y")).unwrap();
        log.record_refusal(&AuditEntry { status: 403, ..refusal(t0 + 300, "192.0.2.7", "/api/v1/z") }).unwrap();
        log.record_refusal(&refusal(t0 + 60_000, "192.0.2.7", "/api/v1/later")).unwrap();
        let got = log.recent(10).unwrap();
        assert_eq!(got.len(), 4, "{got:?}");
        assert_eq!(got.iter().map(|e| e.count).sum::<u64>(), 303);
        assert_eq!(got[0].action, "POST /api/v1/later");
        // The count is stored: after the next commit, a reopened log shows it.
        log.db.commit().unwrap();
        drop(log);
        let log = open(dir.path(), AuditConfig::default());
        assert!(log.recent(10).unwrap().iter().any(|e| e.count == 300));
    }

    /// The bound: however many entries come, at most `max_entries` stay, and none older than `max_age_days`.
    #[test]
    fn audit_log_keeps_its_retention_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let config = AuditConfig { max_entries: 50, max_age_days: 30, refusal_window_secs: 0 };
        let log = open(dir.path(), config);
        let now = edgeloop_common::unix_millis();
        let day = 24 * 3600 * 1000;
        log.record(&AuditEntry::new(now - 31 * day, "op", "too old", 200, "")).unwrap();
        assert_eq!(log.len(), 0, "an entry past max_age_days is not kept");
        for i in 0..200 {
            log.record_refusal(&refusal(now + i, &format!("192.0.2.{}", i % 250), "/api/v1/x")).unwrap();
        }
        assert_eq!(log.len(), 50);
        let got = log.recent(1000).unwrap();
        assert_eq!(got.len(), 50);
        assert_eq!((got[0].at_ms, got[49].at_ms), (now + 199, now + 150), "the newest stay");
        // Bounds apply to what is already stored when the log opens with tighter ones.
        drop(log);
        let log = open(dir.path(), AuditConfig { max_entries: 10, ..config });
        assert_eq!((log.len(), log.recent(1000).unwrap().len()), (10, 10));
    }
}
