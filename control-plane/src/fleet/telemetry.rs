//! The telemetry store: every accepted record, keyed by (device, seq), and each device's cumulative
//! acknowledgement watermark.
//!
//! Kept in sled (the embedded back-end) or in PostgreSQL (`[storage] backend = "postgres"`, see
//! `storage::postgres::telemetry`). With sled, writes go to the trees and [`TelemetryStore::commit`] makes
//! them durable (flush plus `fdatasync`, see common's `durable`); with PostgreSQL, ingest's writes go into
//! one transaction that [`TelemetryStore::commit`] commits. Either way ingest acknowledges nothing before that
//! commit returns. Callers never see trees, keys or SQL.
//!
//! The PostgreSQL back-end is async; this store's methods are blocking, like sled's. They run the query on
//! the runtime that opened the pool: from a thread outside it (ingest's), directly; from one of its threads,
//! inside `block_in_place`, so the runtime moves its other tasks elsewhere meanwhile.

use crate::storage::postgres::{Group, PgError, PgTelemetry};
use edgeloop_common::durable::{DurableDb, DurableError};
use edgeloop_common::envelope::{Record, TelemetryBatch, FLAG_ANOMALY};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error("telemetry store: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record {device}/{seq} is corrupt: {reason}")]
    Corrupt { device: String, seq: u64, reason: String },
    #[error(transparent)]
    Postgres(#[from] PgError),
}

/// What storing one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchStored {
    pub new: u64,
    pub duplicate: u64,
    /// New records flagged as anomalies.
    pub flagged: u64,
    /// The device's watermark afterwards.
    pub upto: u64,
}

/// A query over one device's records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    /// Only records with `seq > after_seq`.
    pub after_seq: u64,
    /// Event-time bounds, inclusive, in Unix milliseconds.
    pub from_ms: Option<u64>,
    pub to_ms: Option<u64>,
    pub limit: usize,
}

#[derive(Debug, Clone)]
pub struct TelemetryStore {
    /// The embedded database: the records with the sled back-end, and in both cases what else commits with
    /// ingest (the device registry).
    db: DurableDb,
    backend: Backend,
}

#[derive(Debug, Clone)]
enum Backend {
    Sled { records: sled::Tree, watermarks: sled::Tree },
    Postgres(Pg),
}

/// The PostgreSQL back-end: the store, the runtime its pool belongs to, and the open write transaction with
/// the thread that opened it (ingest's). That thread's reads go through it (they see its writes) and its
/// [`TelemetryStore::commit`] commits it; every other thread reads committed state from the pool, and its
/// commit leaves the transaction alone, so nothing another thread does can end ingest's transaction behind
/// its back.
#[derive(Clone)]
struct Pg {
    store: PgTelemetry,
    rt: tokio::runtime::Handle,
    group: Arc<Mutex<Option<(Group, std::thread::ThreadId)>>>,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.store)
    }
}

impl Pg {
    /// Runs `f` to completion on the pool's runtime, from any thread.
    fn block<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> T {
        crate::storage::postgres::block_on(&self.rt, f)
    }

    /// Whether this thread opened the write transaction that is open now.
    fn owns_group(&self) -> bool {
        let me = std::thread::current().id();
        self.group.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|(_, owner)| *owner == me)
    }

    /// Runs `op` in ingest's open transaction, starting one if none is open. An error rolls it back.
    fn in_group(&self, op: Op<'_>) -> Result<Done, StoreError> {
        let mut slot = self.group.lock().unwrap_or_else(|p| p.into_inner());
        let mut group = slot.take();
        let done = self.block(async {
            let (g, _) = match &mut group {
                Some(g) => g,
                None => group.insert((self.store.begin().await?, std::thread::current().id())),
            };
            match op {
                Op::Store(d, b) => g.store_batch(d, b).await.map(Done::Stored),
                Op::Watermark(d) => g.watermark(d).await.map(Done::Upto),
                Op::Raise(d, upto) => g.raise_watermark(d, upto).await.map(Done::Upto),
                Op::SeqsIn(d, from, to) => g.seqs_in(d, from, to).await.map(Done::Seqs),
            }
        });
        // After a query's error PostgreSQL has aborted the transaction: dropping it closes its connection,
        // nothing of it stays, and the next write opens another. An error found before any query (a value the
        // store cannot keep) leaves the transaction as it was.
        if matches!(done, Ok(_) | Err(PgError::Bad(_))) {
            *slot = group;
        }
        Ok(done?)
    }
}

fn key(device: &str, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(device.len() + 9);
    k.extend_from_slice(device.as_bytes());
    k.push(0);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// A stored record, or why it cannot be read.
fn decode(device: &str, key: &[u8], value: &[u8]) -> Result<Record, StoreError> {
    ciborium::from_reader(value).map_err(|e| StoreError::Corrupt {
        device: device.to_string(),
        seq: seq_of(key),
        reason: e.to_string(),
    })
}

fn seq_of(key: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[key.len() - 8..]);
    u64::from_be_bytes(b)
}

/// What ingest does in its open PostgreSQL transaction.
enum Op<'a> {
    Store(&'a str, &'a TelemetryBatch),
    Watermark(&'a str),
    Raise(&'a str, u64),
    SeqsIn(&'a str, u64, u64),
}

enum Done {
    Stored(BatchStored),
    Upto(u64),
    Seqs(Vec<u64>),
}

impl Done {
    fn stored(self) -> BatchStored {
        match self {
            Done::Stored(s) => s,
            _ => unreachable!("a store answers with what it stored"),
        }
    }
    fn upto(self) -> u64 {
        match self {
            Done::Upto(u) => u,
            _ => unreachable!("a watermark operation answers with the watermark"),
        }
    }
    fn seqs(self) -> Vec<u64> {
        match self {
            Done::Seqs(s) => s,
            _ => unreachable!("a seq listing answers with seqs"),
        }
    }
}

impl TelemetryStore {
    /// The embedded back-end: the records in `db`.
    pub fn open(db: DurableDb) -> Result<Self, StoreError> {
        let backend = Backend::Sled { records: db.tree("telemetry")?, watermarks: db.tree("watermarks")? };
        Ok(TelemetryStore { db, backend })
    }

    /// The PostgreSQL back-end: the records in `store`, whose pool belongs to `rt`; `db` still commits with
    /// ingest.
    pub fn postgres(db: DurableDb, store: PgTelemetry, rt: tokio::runtime::Handle) -> Self {
        TelemetryStore { db, backend: Backend::Postgres(Pg { store, rt, group: Default::default() }) }
    }

    pub fn db(&self) -> &DurableDb {
        &self.db
    }

    /// Which back-end keeps the records: `embedded` or `postgres`.
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sled { .. } => "embedded",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Stores `rec` unless (device, seq) is already there. Returns whether it was new.
    pub fn insert(&self, device: &str, rec: &Record) -> Result<bool, StoreError> {
        let one = TelemetryBatch { from: rec.seq, to: rec.seq, records: vec![rec.clone()] };
        match &self.backend {
            Backend::Sled { records, .. } => sled_insert(records, device, rec),
            // Stored alone, its watermark moves only if it is the next one (as `store_batch` would).
            Backend::Postgres(pg) => Ok(pg.in_group(Op::Store(device, &one))?.stored().new == 1),
        }
    }

    /// Stores the records of `batch` not stored yet, and moves the device's watermark to the batch's end when
    /// the batch starts at or below the next expected seq, then on over records already stored right after
    /// it (a later batch that arrived first). Not durable until [`TelemetryStore::commit`].
    pub fn store_batch(&self, device: &str, batch: &TelemetryBatch) -> Result<BatchStored, StoreError> {
        let (records, watermarks) = match &self.backend {
            Backend::Sled { records, watermarks } => (records, watermarks),
            Backend::Postgres(pg) => return Ok(pg.in_group(Op::Store(device, batch))?.stored()),
        };
        let mut out = BatchStored::default();
        for rec in &batch.records {
            if sled_insert(records, device, rec)? {
                out.new += 1;
                out.flagged += u64::from(rec.flags & FLAG_ANOMALY != 0);
            } else {
                out.duplicate += 1;
            }
        }
        let before = sled_watermark(watermarks, device)?;
        out.upto = before;
        if batch.from <= out.upto.saturating_add(1) && batch.to > out.upto {
            out.upto = batch.to;
        }
        // On over records already stored right after it (a later batch that came first).
        for kv in records.range(key(device, out.upto.saturating_add(1))..=key(device, u64::MAX)) {
            let (k, _) = kv?;
            if seq_of(&k) != out.upto + 1 {
                break;
            }
            out.upto += 1;
        }
        if out.upto != before {
            watermarks.insert(device.as_bytes(), &out.upto.to_be_bytes())?;
        }
        Ok(out)
    }

    /// The device's watermark (with PostgreSQL: as the thread's own open transaction sees it, if it has one;
    /// committed state otherwise).
    pub fn watermark(&self, device: &str) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled { watermarks, .. } => sled_watermark(watermarks, device),
            Backend::Postgres(pg) if pg.owns_group() => Ok(pg.in_group(Op::Watermark(device))?.upto()),
            Backend::Postgres(pg) => Ok(pg.block(pg.store.watermark(device))?),
        }
    }

    /// Moves the device's watermark up to `upto`, never down. Returns it after.
    pub fn raise_watermark(&self, device: &str, upto: u64) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sled { watermarks, .. } => {
                let now = sled_watermark(watermarks, device)?.max(upto);
                watermarks.insert(device.as_bytes(), &now.to_be_bytes())?;
                Ok(now)
            }
            Backend::Postgres(pg) => Ok(pg.in_group(Op::Raise(device, upto))?.upto()),
        }
    }

    /// Sets the device's watermark with sled; with PostgreSQL only raises it (watermarks never move back
    /// there). For tests and tools; ingest raises it.
    pub fn set_watermark(&self, device: &str, upto: u64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sled { watermarks, .. } => {
                watermarks.insert(device.as_bytes(), &upto.to_be_bytes())?;
                Ok(())
            }
            Backend::Postgres(pg) => pg.in_group(Op::Raise(device, upto)).map(drop),
        }
    }

    /// Makes every write so far durable: with PostgreSQL, commits the open write transaction if this thread
    /// opened it (ingest's commit); then the embedded database. Blocking.
    pub fn commit(&self) -> Result<(), StoreError> {
        if let Backend::Postgres(pg) = &self.backend {
            let mine = {
                let mut slot = pg.group.lock().unwrap_or_else(|p| p.into_inner());
                match slot.take() {
                    Some((g, owner)) if owner == std::thread::current().id() => Some(g),
                    other => {
                        *slot = other;
                        None
                    }
                }
            };
            if let Some(g) = mine {
                pg.block(g.commit())?;
            }
        }
        Ok(self.db.commit()?)
    }

    /// Drops this thread's open write transaction without committing it (PostgreSQL rolls it back and
    /// releases its row locks at once); nothing with sled, whose writes stay for the next commit.
    pub fn abandon(&self) {
        if let Backend::Postgres(pg) = &self.backend {
            let mut slot = pg.group.lock().unwrap_or_else(|p| p.into_inner());
            if slot.as_ref().is_some_and(|(_, owner)| *owner == std::thread::current().id()) {
                *slot = None;
            }
        }
    }

    /// Records of `device` matching `q`, in seq order.
    pub fn query(&self, device: &str, q: Query) -> Result<Vec<Record>, StoreError> {
        let records = match &self.backend {
            Backend::Sled { records, .. } => records,
            Backend::Postgres(pg) => return Ok(pg.block(pg.store.query(device, q))?),
        };
        let mut out = Vec::new();
        let start = key(device, q.after_seq.saturating_add(1));
        let end = key(device, u64::MAX);
        for kv in records.range(start..=end) {
            if out.len() >= q.limit {
                break;
            }
            let (k, v) = kv?;
            let rec = decode(device, &k, &v)?;
            if q.from_ms.is_some_and(|f| rec.ts_ms < f) || q.to_ms.is_some_and(|t| rec.ts_ms > t) {
                continue;
            }
            out.push(rec);
        }
        Ok(out)
    }

    /// The newest record (highest seq) of `device`.
    pub fn last(&self, device: &str) -> Result<Option<Record>, StoreError> {
        let records = match &self.backend {
            Backend::Sled { records, .. } => records,
            Backend::Postgres(pg) => return Ok(pg.block(pg.store.last(device))?),
        };
        let Some(kv) = records.range(key(device, 0)..=key(device, u64::MAX)).next_back() else { return Ok(None) };
        let (k, v) = kv?;
        let rec = decode(device, &k, &v)?;
        Ok(Some(rec))
    }

    /// The sequence numbers stored for `device` within `from..=to`, ascending (with PostgreSQL, as for
    /// [`TelemetryStore::watermark`]).
    pub fn seqs_in(&self, device: &str, from: u64, to: u64) -> Result<Vec<u64>, StoreError> {
        let records = match &self.backend {
            Backend::Sled { records, .. } => records,
            Backend::Postgres(pg) if pg.owns_group() => return Ok(pg.in_group(Op::SeqsIn(device, from, to))?.seqs()),
            Backend::Postgres(pg) => return Ok(pg.block(pg.store.seqs_in(device, from, to))?),
        };
        let mut out = Vec::new();
        for kv in records.range(key(device, from)..=key(device, to)) {
            let (k, _) = kv?;
            out.push(seq_of(&k));
        }
        Ok(out)
    }

    /// Removes `device`'s acknowledged records (at or below its watermark) with an event time before
    /// `before_ms`, in sequence order up to the first younger one, at most `max`. Returns how many went. Not
    /// durable until [`TelemetryStore::commit`] with sled; committed at once with PostgreSQL.
    pub fn prune(&self, device: &str, before_ms: u64, max: usize) -> Result<u64, StoreError> {
        let (records, watermarks) = match &self.backend {
            Backend::Sled { records, watermarks } => (records, watermarks),
            Backend::Postgres(pg) => return Ok(pg.block(pg.store.prune(device, before_ms, max))?),
        };
        let upto = sled_watermark(watermarks, device)?;
        let mut gone = 0;
        for kv in records.range(key(device, 0)..=key(device, upto)) {
            if gone as usize >= max {
                break;
            }
            let (k, v) = kv?;
            let rec = decode(device, &k, &v)?;
            if rec.ts_ms >= before_ms {
                break;
            }
            records.remove(k)?;
            gone += 1;
        }
        Ok(gone)
    }

    /// Number of records stored for `device`.
    pub fn count(&self, device: &str) -> Result<u64, StoreError> {
        let records = match &self.backend {
            Backend::Sled { records, .. } => records,
            Backend::Postgres(pg) => return Ok(pg.block(pg.store.count(device))?),
        };
        let mut n = 0;
        for kv in records.range(key(device, 0)..=key(device, u64::MAX)) {
            kv?;
            n += 1;
        }
        Ok(n)
    }
}

impl TelemetryStore {
    /// Up to `limit` records of every device, in (device, seq) order, after `after` (a device and seq
    /// returned last time). The embedded back-end only (for copying it elsewhere): `None` on PostgreSQL.
    pub fn scan(&self, after: Option<(&str, u64)>, limit: usize) -> Result<Option<Vec<(String, Record)>>, StoreError> {
        let Backend::Sled { records, .. } = &self.backend else { return Ok(None) };
        let start = match after {
            Some((d, s)) if s < u64::MAX => key(d, s + 1),
            Some((d, _)) => {
                let mut k = d.as_bytes().to_vec();
                k.push(1);
                k
            }
            None => Vec::new(),
        };
        let mut out = Vec::with_capacity(limit.min(10_000));
        for kv in records.range(start..) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let device = String::from_utf8_lossy(&k[..k.len().saturating_sub(9)]).into_owned();
            out.push((device.clone(), decode(&device, &k, &v)?));
        }
        Ok(Some(out))
    }

    /// Every device's watermark. The embedded back-end only: `None` on PostgreSQL.
    pub fn watermarks(&self) -> Result<Option<Vec<(String, u64)>>, StoreError> {
        let Backend::Sled { watermarks, .. } = &self.backend else { return Ok(None) };
        let mut out = Vec::new();
        for kv in watermarks.iter() {
            let (k, v) = kv?;
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[..8.min(v.len())]);
            out.push((String::from_utf8_lossy(&k).into_owned(), u64::from_be_bytes(b)));
        }
        Ok(Some(out))
    }
}

fn sled_insert(records: &sled::Tree, device: &str, rec: &Record) -> Result<bool, StoreError> {
    let buf = edgeloop_common::signing::to_cbor_with_capacity(rec, 64 + 5 * rec.features.len());
    let prev = records.compare_and_swap(key(device, rec.seq), None as Option<&[u8]>, Some(buf))?;
    Ok(prev.is_ok())
}

fn sled_watermark(watermarks: &sled::Tree, device: &str) -> Result<u64, StoreError> {
    Ok(watermarks.get(device.as_bytes())?.map_or(0, |v| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&v[..8.min(v.len())]);
        u64::from_be_bytes(b)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_common::durable::Durability;

    fn rec(seq: u64, ts: u64) -> Record {
        Record { seq, ts_ms: ts, sensor: "t".into(), features: vec![1.0], score: None, flags: 0 }
    }

    #[test]
    fn dedup_query_and_watermark() {
        let dir = tempfile::tempdir().unwrap();
        let s = TelemetryStore::open(DurableDb::open(dir.path(), Durability::Flush).unwrap()).unwrap();
        assert!(s.insert("a", &rec(1, 100)).unwrap());
        assert!(!s.insert("a", &rec(1, 999)).unwrap(), "duplicate (device, seq) is not stored twice");
        assert!(s.insert("a", &rec(2, 200)).unwrap());
        assert!(s.insert("ab", &rec(1, 100)).unwrap());
        let q = Query { after_seq: 0, from_ms: None, to_ms: None, limit: 10 };
        let got = s.query("a", q).unwrap();
        assert_eq!(got.iter().map(|r| (r.seq, r.ts_ms)).collect::<Vec<_>>(), vec![(1, 100), (2, 200)]);
        assert_eq!(s.query("a", Query { from_ms: Some(150), ..q }).unwrap().len(), 1);
        assert_eq!(s.query("a", Query { after_seq: 1, ..q }).unwrap()[0].seq, 2);
        assert_eq!(s.count("ab").unwrap(), 1);
        assert_eq!(s.last("a").unwrap().map(|r| r.seq), Some(2));
        assert_eq!(s.last("nobody").unwrap(), None);
        assert_eq!(s.watermark("a").unwrap(), 0);
        s.set_watermark("a", 2).unwrap();
        s.commit().unwrap();
        assert_eq!(s.watermark("a").unwrap(), 2);
    }
}
