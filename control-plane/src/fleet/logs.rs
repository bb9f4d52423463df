//! Device logs: the warnings and errors agents ship on `up/logs`, kept for `retention.log_days` and searched
//! by device, class, level, text and time.
//!
//! Two trees. `device_logs` holds every line under (received at, id): received time by the control plane's
//! clock, so a device whose clock is wrong can neither hide lines from retention nor push them ahead of
//! everyone's. `device_logs_by_device` indexes the same keys per device. Searches go newest first, from a
//! cursor (the last key returned), and read at most [`MAX_SCANNED`] lines per page: a page can come back short
//! with a cursor to go on from, but never costs more than that.
//!
//! With `[storage] backend = "postgres"` the lines live in PostgreSQL instead
//! ([`crate::storage::postgres::logs`]), searched the same way and with the same cursors, so that every
//! replica sees every device's lines.
//!
//! Per device, `device_log_stats` counts what was stored, what the device said it left out (over its own
//! budget, or pushed out of its ring) and what ingest cut because the device went over the control plane's
//! budget anyway.

use super::telemetry::StoreError;
use crate::storage::postgres::{block_on, logs::PgLogs};
use edgeloop_common::durable::DurableDb;
use edgeloop_common::envelope::{LogEntry, LogLevel};
use serde::{Deserialize, Serialize};

/// Lines one search reads at most before it returns what it found with a cursor.
pub const MAX_SCANNED: usize = 50_000;
/// The largest page.
pub const MAX_LIMIT: usize = 1000;

/// One stored line.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredLog {
    pub device: String,
    /// The device's class when the line arrived.
    pub class: String,
    pub level: LogLevel,
    pub target: String,
    pub message: String,
    /// When the device logged it, by its clock (Unix ms).
    pub ts_ms: u64,
    /// When the control plane stored it (Unix ms).
    pub received_ms: u64,
}

/// A device's log counters.
#[derive(utoipa::ToSchema, Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogStats {
    /// Lines stored since the device's first.
    pub stored: u64,
    /// Lines the device reported leaving out: over its own budget, or pushed out of its ring.
    pub suppressed: u64,
    /// Lines ingest cut because the device sent more than the control plane's budget.
    pub cut: u64,
}

/// What to search for. Every filter is optional; `text` matches the message or the target, ignoring case.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogQuery {
    pub device: Option<String>,
    pub class: Option<String>,
    /// The lowest level: `warn` finds warnings and errors, `error` errors only.
    pub level: Option<LogLevel>,
    pub text: Option<String>,
    /// Bounds on the device's time of the line, inclusive, Unix ms.
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// Where the previous page ended.
    pub cursor: Option<LogCursor>,
    pub limit: usize,
}

/// A position in the log: lines older than it come next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogCursor([u8; 16]);

impl LogCursor {
    /// The 16-byte key the cursor stands for (a log line's, or an audit entry's: time then counter).
    pub fn bytes(&self) -> [u8; 16] {
        self.0
    }

    pub fn from_bytes(k: [u8; 16]) -> LogCursor {
        LogCursor(k)
    }

    pub fn encode(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads a cursor a previous page returned.
    pub fn parse(s: &str) -> Result<LogCursor, String> {
        let bytes = s.as_bytes();
        if bytes.len() != 32 || !bytes.iter().all(u8::is_ascii_hexdigit) {
            return Err(format!("cursor `{s}` is not one this API returned (32 hex digits)"));
        }
        let mut k = [0u8; 16];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(LogCursor(k))
    }
}

/// One page of a search, newest first. `next` is set when there may be more.
#[derive(Debug, Clone, PartialEq)]
pub struct LogPage {
    pub entries: Vec<StoredLog>,
    pub next: Option<LogCursor>,
}

#[derive(Debug, Clone)]
pub struct LogStore {
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Sled(SledLogs),
    Postgres { store: PgLogs, rt: tokio::runtime::Handle },
}

#[derive(Debug, Clone)]
struct SledLogs {
    db: DurableDb,
    lines: sled::Tree,
    by_device: sled::Tree,
    stats: sled::Tree,
}

fn device_key(device: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 1 + key.len());
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

fn decode(key: &[u8], value: &[u8]) -> Result<StoredLog, StoreError> {
    ciborium::from_reader(value).map_err(|e| StoreError::Corrupt {
        device: "(log line)".into(),
        seq: u64::from_be_bytes(key[..8].try_into().unwrap_or_default()),
        reason: e.to_string(),
    })
}

impl LogQuery {
    fn matches(&self, l: &StoredLog) -> bool {
        self.class.as_ref().is_none_or(|c| *c == l.class)
            && self.level.is_none_or(|min| l.level >= min)
            && self.since_ms.is_none_or(|s| l.ts_ms >= s)
            && self.until_ms.is_none_or(|u| l.ts_ms <= u)
            && self.text.as_ref().is_none_or(|t| {
                let t = t.to_lowercase();
                l.message.to_lowercase().contains(&t) || l.target.to_lowercase().contains(&t)
            })
            && self.device.as_ref().is_none_or(|d| *d == l.device)
    }
}

impl LogStore {
    pub fn open(db: DurableDb) -> Result<LogStore, StoreError> {
        Ok(LogStore {
            backend: Backend::Sled(SledLogs {
                lines: db.tree("device_logs")?,
                by_device: db.tree("device_logs_by_device")?,
                stats: db.tree("device_log_stats")?,
                db,
            }),
        })
    }

    /// The lines in PostgreSQL, shared by every replica on it. Calls block on `rt`.
    pub fn postgres(store: PgLogs, rt: tokio::runtime::Handle) -> LogStore {
        LogStore { backend: Backend::Postgres { store, rt } }
    }

    /// Stores `entries` from `device` (of `class`) received at `received_ms`, and adds to its counters the
    /// lines it left out (`suppressed`) and the lines ingest cut (`cut`). Not durable until the next commit
    /// on the embedded store; committed before it returns on PostgreSQL.
    pub fn append(
        &self,
        device: &str,
        class: &str,
        entries: &[LogEntry],
        counts: (u64, u64),
        received_ms: u64,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.append(device, class, entries, counts, received_ms),
            Backend::Postgres { store, rt } => {
                Ok(block_on(rt, store.append(device, class, entries, counts, received_ms))?)
            }
        }
    }

    pub fn stats(&self, device: &str) -> Result<LogStats, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.stats(device),
            Backend::Postgres { store, rt } => Ok(block_on(rt, store.stats(device))?),
        }
    }

    /// Lines matching `q`, newest first.
    pub fn search(&self, q: &LogQuery) -> Result<LogPage, StoreError> {
        let limit = q.limit.clamp(1, MAX_LIMIT);
        match &self.backend {
            Backend::Sled(s) => s.search(q, limit),
            Backend::Postgres { store, rt } => Ok(block_on(rt, store.search(q, limit, MAX_SCANNED))?),
        }
    }

    /// Removes lines received before `before_ms`, at most `max` of them, oldest first. Returns how many went.
    pub fn prune(&self, before_ms: u64, max: usize) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled(s) => s.prune(before_ms, max),
            Backend::Postgres { store, rt } => Ok(block_on(rt, store.prune(before_ms, max))?),
        }
    }

    /// Lines stored now.
    pub fn count(&self) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled(s) => Ok(s.lines.len() as u64),
            Backend::Postgres { store, rt } => Ok(block_on(rt, store.count())?),
        }
    }

    /// Makes every append and prune so far durable (on PostgreSQL, each already is).
    pub fn commit(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled(s) => Ok(s.db.commit()?),
            Backend::Postgres { .. } => Ok(()),
        }
    }
}

impl SledLogs {
    fn append(
        &self,
        device: &str,
        class: &str,
        entries: &[LogEntry],
        (suppressed, cut): (u64, u64),
        received_ms: u64,
    ) -> Result<(), StoreError> {
        for e in entries {
            let id = self.db.db().generate_id()?;
            let mut key = [0u8; 16];
            key[..8].copy_from_slice(&received_ms.to_be_bytes());
            key[8..].copy_from_slice(&id.to_be_bytes());
            let line = StoredLog {
                device: device.to_string(),
                class: class.to_string(),
                level: e.level,
                target: e.target.clone(),
                message: e.message.clone(),
                ts_ms: e.ts_ms,
                received_ms,
            };
            self.lines.insert(key, edgeloop_common::signing::to_cbor_with_capacity(&line, 128))?;
            self.by_device.insert(device_key(device, &key), &[])?;
        }
        let mut s = self.stats(device)?;
        s.stored += entries.len() as u64;
        s.suppressed = s.suppressed.saturating_add(suppressed);
        s.cut = s.cut.saturating_add(cut);
        self.stats.insert(device.as_bytes(), edgeloop_common::signing::to_cbor_with_capacity(&s, 32))?;
        Ok(())
    }

    fn stats(&self, device: &str) -> Result<LogStats, StoreError> {
        Ok(match self.stats.get(device.as_bytes())? {
            Some(v) => ciborium::from_reader(&v[..]).map_err(|e| StoreError::Corrupt {
                device: device.to_string(),
                seq: 0,
                reason: format!("log counters: {e}"),
            })?,
            None => LogStats::default(),
        })
    }

    fn search(&self, q: &LogQuery, limit: usize) -> Result<LogPage, StoreError> {
        let mut entries = Vec::new();
        let mut scanned = 0usize;
        let mut last: Option<[u8; 16]> = None;
        // Keys of the lines to look at, newest first: one device's from its index, or everyone's.
        let keys: Box<dyn Iterator<Item = Result<[u8; 16], StoreError>>> = match &q.device {
            Some(d) => {
                let start = device_key(d, &[]);
                let end = match &q.cursor {
                    Some(c) => device_key(d, &c.0),
                    None => {
                        let mut e = device_key(d, &[]);
                        *e.last_mut().expect("the separator") = 1;
                        e
                    }
                };
                let n = start.len();
                Box::new(self.by_device.range(start..end).keys().rev().map(move |k| {
                    let k = k?;
                    Ok(k[n..].try_into().unwrap_or([0u8; 16]))
                }))
            }
            None => {
                let iter = match &q.cursor {
                    Some(c) => self.lines.range(..c.0.to_vec()),
                    None => self.lines.iter(),
                };
                Box::new(iter.keys().rev().map(|k| Ok(k?.as_ref().try_into().unwrap_or([0u8; 16]))))
            }
        };
        for key in keys {
            let key = key?;
            scanned += 1;
            last = Some(key);
            if let Some(v) = self.lines.get(key)? {
                let line = decode(&key, &v)?;
                if q.matches(&line) {
                    entries.push(line);
                    if entries.len() == limit {
                        break;
                    }
                }
            }
            if scanned >= MAX_SCANNED {
                break;
            }
        }
        let more = entries.len() == limit || scanned >= MAX_SCANNED;
        Ok(LogPage { entries, next: if more { last.map(LogCursor) } else { None } })
    }

    fn prune(&self, before_ms: u64, max: usize) -> Result<u64, StoreError> {
        let mut n = 0;
        for kv in self.lines.range(..before_ms.to_be_bytes().to_vec()).take(max) {
            let (k, v) = kv?;
            let device = decode(&k, &v).map(|l| l.device).ok();
            self.lines.remove(&k)?;
            if let Some(d) = device {
                self.by_device.remove(device_key(&d, &k))?;
            }
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_common::durable::Durability;

    fn entry(ts_ms: u64, level: LogLevel, message: &str) -> LogEntry {
        LogEntry { ts_ms, level, target: "edgeloop_agent::uplink".into(), message: message.into() }
    }

    fn store(dir: &std::path::Path) -> LogStore {
        LogStore::open(DurableDb::open(dir, Durability::Flush).unwrap()).unwrap()
    }

    fn messages(p: &LogPage) -> Vec<&str> {
        p.entries.iter().map(|l| l.message.as_str()).collect()
    }

    #[test]
    fn searches_filter_and_page_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        s.append(
            "a1",
            "air",
            &[entry(10, LogLevel::Warn, "broker refused"), entry(11, LogLevel::Error, "Disk full")],
            (3, 0),
            1000,
        )
        .unwrap();
        s.append("p1", "press", &[entry(20, LogLevel::Warn, "bad sample refused")], (0, 2), 2000).unwrap();
        s.append("a1", "air", &[entry(30, LogLevel::Warn, "bad sample refused")], (0, 0), 3000).unwrap();
        let q = |f: &dyn Fn(&mut LogQuery)| {
            let mut q = LogQuery { limit: 100, ..Default::default() };
            f(&mut q);
            s.search(&q).unwrap()
        };
        assert_eq!(messages(&q(&|_| {})), ["bad sample refused", "bad sample refused", "Disk full", "broker refused"]);
        assert_eq!(
            messages(&q(&|q| q.device = Some("a1".into()))),
            ["bad sample refused", "Disk full", "broker refused"]
        );
        assert_eq!(messages(&q(&|q| q.class = Some("press".into()))), ["bad sample refused"]);
        assert_eq!(messages(&q(&|q| q.level = Some(LogLevel::Error))), ["Disk full"]);
        assert_eq!(messages(&q(&|q| q.text = Some("DISK".into()))), ["Disk full"]);
        assert_eq!(q(&|q| q.text = Some("uplink".into())).entries.len(), 4, "the target matches too");
        assert_eq!(
            messages(&q(&|q| (q.since_ms, q.until_ms) = (Some(11), Some(20)))),
            ["bad sample refused", "Disk full"]
        );
        assert!(q(&|q| q.device = Some("a".into())).entries.is_empty(), "a device id is not a prefix");
        // Pages of one, following the cursor, cover everything once, for the fleet and for one device.
        for device in [None, Some("a1")] {
            let (mut seen, mut cursor) = (Vec::new(), None);
            loop {
                let page = s
                    .search(&LogQuery { device: device.map(Into::into), cursor, limit: 1, ..Default::default() })
                    .unwrap();
                seen.extend(page.entries.iter().map(|l| (l.device.clone(), l.ts_ms)));
                match page.next {
                    Some(c) => cursor = Some(LogCursor::parse(&c.encode()).unwrap()),
                    None => break,
                }
            }
            let want: Vec<(String, u64)> = match device {
                None => vec![("a1".into(), 30), ("p1".into(), 20), ("a1".into(), 11), ("a1".into(), 10)],
                Some(_) => vec![("a1".into(), 30), ("a1".into(), 11), ("a1".into(), 10)],
            };
            assert_eq!(seen, want);
        }
        assert_eq!(s.stats("a1").unwrap(), LogStats { stored: 3, suppressed: 3, cut: 0 });
        assert_eq!(s.stats("p1").unwrap(), LogStats { stored: 1, suppressed: 0, cut: 2 });
        assert!(LogCursor::parse("zz").is_err());
    }

    #[test]
    fn retention_removes_old_lines_from_both_trees_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        for (i, at) in [100u64, 200, 300].into_iter().enumerate() {
            s.append("d", "c", &[entry(i as u64, LogLevel::Warn, &format!("line {i}"))], (0, 0), at).unwrap();
        }
        assert_eq!(s.prune(250, 1).unwrap(), 1, "at most `max`");
        assert_eq!(s.prune(250, 10).unwrap(), 1);
        s.commit().unwrap();
        drop(s);
        let s = store(dir.path());
        assert_eq!(s.count().unwrap(), 1);
        let page = s.search(&LogQuery { device: Some("d".into()), limit: 10, ..Default::default() }).unwrap();
        assert_eq!(messages(&page), ["line 2"]);
        let Backend::Sled(sled) = &s.backend else { unreachable!("opened on sled") };
        assert_eq!(sled.by_device.len(), 1, "the index lost the pruned lines too");
        assert_eq!(s.stats("d").unwrap().stored, 3, "counters are totals");
    }
}
