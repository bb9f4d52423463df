//! The audit log: every mutating operator call, with who, what and when, kept durably in sled in time order.

use crate::store::StoreError;
use edgeloop_common::durable::DurableDb;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
}

pub struct AuditLog {
    db: DurableDb,
    tree: sled::Tree,
    counter: AtomicU64,
}

impl AuditLog {
    pub fn open(db: &DurableDb) -> Result<AuditLog, StoreError> {
        let tree = db.tree("audit")?;
        let counter = tree.last()?.map_or(0, |(k, _)| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&k[8..16]);
            u64::from_be_bytes(b)
        });
        Ok(AuditLog { db: db.clone(), tree, counter: AtomicU64::new(counter) })
    }

    /// Appends an entry durably. Blocking.
    pub fn record(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let mut key = e.at_ms.to_be_bytes().to_vec();
        key.extend_from_slice(&n.to_be_bytes());
        self.tree.insert(key, edgeloop_common::signing::to_cbor(e))?;
        self.db.commit()?;
        Ok(())
    }

    /// The newest `limit` entries, newest first.
    pub fn recent(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_persist_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = DurableDb::open(dir.path(), edgeloop_common::durable::Durability::Flush).unwrap();
            let log = AuditLog::open(&db).unwrap();
            for (t, a) in [(5, "first"), (5, "second"), (9, "third")] {
                let e = AuditEntry { at_ms: t, who: "op".into(), action: a.into(), status: 200, detail: String::new() };
                log.record(&e).unwrap();
            }
        }
        let db = DurableDb::open(dir.path(), edgeloop_common::durable::Durability::Flush).unwrap();
        let log = AuditLog::open(&db).unwrap();
        let got: Vec<String> = log.recent(10).unwrap().into_iter().map(|e| e.action).collect();
        assert_eq!(got, vec!["third", "second", "first"]);
        log.record(&AuditEntry {
            at_ms: 9,
            who: "op".into(),
            action: "fourth".into(),
            status: 200,
            detail: String::new(),
        })
        .unwrap();
        assert_eq!(log.recent(1).unwrap()[0].action, "fourth", "the counter resumes after a restart");
    }
}
