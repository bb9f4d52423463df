//! The telemetry store: every accepted record, keyed by (device, seq), and each device's cumulative
//! acknowledgement watermark.
//!
//! Writes go to sled; [`TelemetryStore::commit`] makes them durable (flush plus `fdatasync`, see common's
//! `durable`), and ingest acknowledges nothing before that commit returns. Callers never see trees or keys.

use edgeloop_common::durable::{DurableDb, DurableError};
use edgeloop_common::envelope::Record;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Durable(#[from] DurableError),
    #[error("telemetry store: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record {device}/{seq} is corrupt: {reason}")]
    Corrupt { device: String, seq: u64, reason: String },
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
    db: DurableDb,
    records: sled::Tree,
    watermarks: sled::Tree,
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

impl TelemetryStore {
    pub fn open(db: DurableDb) -> Result<Self, StoreError> {
        Ok(TelemetryStore { records: db.tree("telemetry")?, watermarks: db.tree("watermarks")?, db })
    }

    pub fn db(&self) -> &DurableDb {
        &self.db
    }

    /// Stores `rec` unless (device, seq) is already there. Returns whether it was new.
    pub fn insert(&self, device: &str, rec: &Record) -> Result<bool, StoreError> {
        let buf = edgeloop_common::signing::to_cbor_with_capacity(rec, 64 + 5 * rec.features.len());
        let prev = self.records.compare_and_swap(key(device, rec.seq), None as Option<&[u8]>, Some(buf))?;
        Ok(prev.is_ok())
    }

    pub fn watermark(&self, device: &str) -> Result<u64, StoreError> {
        Ok(self.watermarks.get(device.as_bytes())?.map_or(0, |v| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[..8.min(v.len())]);
            u64::from_be_bytes(b)
        }))
    }

    pub fn set_watermark(&self, device: &str, upto: u64) -> Result<(), StoreError> {
        self.watermarks.insert(device.as_bytes(), &upto.to_be_bytes())?;
        Ok(())
    }

    /// Makes every write so far durable. Blocking.
    pub fn commit(&self) -> Result<(), StoreError> {
        Ok(self.db.commit()?)
    }

    /// Records of `device` matching `q`, in seq order.
    pub fn query(&self, device: &str, q: Query) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        let start = key(device, q.after_seq.saturating_add(1));
        let end = key(device, u64::MAX);
        for kv in self.records.range(start..=end) {
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
        let Some(kv) = self.records.range(key(device, 0)..=key(device, u64::MAX)).next_back() else { return Ok(None) };
        let (k, v) = kv?;
        let rec = decode(device, &k, &v)?;
        Ok(Some(rec))
    }

    /// The sequence numbers stored for `device` within `from..=to`, ascending.
    pub fn seqs_in(&self, device: &str, from: u64, to: u64) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for kv in self.records.range(key(device, from)..=key(device, to)) {
            let (k, _) = kv?;
            out.push(seq_of(&k));
        }
        Ok(out)
    }

    /// Removes `device`'s acknowledged records (at or below its watermark) with an event time before
    /// `before_ms`, in sequence order up to the first younger one, at most `max`. Returns how many went. Not
    /// durable until [`TelemetryStore::commit`].
    pub fn prune(&self, device: &str, before_ms: u64, max: usize) -> Result<u64, StoreError> {
        let upto = self.watermark(device)?;
        let mut gone = 0;
        for kv in self.records.range(key(device, 0)..=key(device, upto)) {
            if gone as usize >= max {
                break;
            }
            let (k, v) = kv?;
            let rec = decode(device, &k, &v)?;
            if rec.ts_ms >= before_ms {
                break;
            }
            self.records.remove(k)?;
            gone += 1;
        }
        Ok(gone)
    }

    /// Number of records stored for `device`.
    pub fn count(&self, device: &str) -> Result<u64, StoreError> {
        let mut n = 0;
        for kv in self.records.range(key(device, 0)..=key(device, u64::MAX)) {
            kv?;
            n += 1;
        }
        Ok(n)
    }
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
