//! The audit log on PostgreSQL: every replica's entries in one table, so that any replica's
//! `/api/v1/audit` shows who did what wherever they did it. An entry's key is its time and its row id (both
//! big-endian `u64`), ordered as the embedded log's keys are.

use super::{Pg, PgError};

/// The audit log's table.
#[derive(Clone, Debug)]
pub struct PgAudit {
    pg: Pg,
}

/// An entry's key: its time, then its id.
pub type Key = [u8; 16];

fn key(at_ms: i64, id: i64) -> Key {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&(at_ms as u64).to_be_bytes());
    k[8..].copy_from_slice(&(id as u64).to_be_bytes());
    k
}

fn split(k: &Key) -> (i64, i64) {
    let at = u64::from_be_bytes(k[..8].try_into().unwrap_or_default());
    let id = u64::from_be_bytes(k[8..].try_into().unwrap_or_default());
    (at.min(i64::MAX as u64) as i64, id.min(i64::MAX as u64) as i64)
}

impl PgAudit {
    pub fn new(pg: Pg) -> PgAudit {
        PgAudit { pg }
    }

    /// Appends an entry; returns its key.
    pub async fn insert(&self, at_ms: u64, entry: &[u8]) -> Result<Key, PgError> {
        let at = at_ms.min(i64::MAX as u64) as i64;
        let c = self.pg.client().await?;
        let id: i64 = c
            .query_one("INSERT INTO audit (at_ms, entry) VALUES ($1, $2) RETURNING id", &[&at, &entry])
            .await
            .map_err(PgError::query("appending to the audit log"))?
            .get(0);
        Ok(key(at, id))
    }

    /// Replaces the entry under `k`; false if it is gone.
    pub async fn replace(&self, k: &Key, entry: &[u8]) -> Result<bool, PgError> {
        let (at, id) = split(k);
        let c = self.pg.client().await?;
        let n = c
            .execute("UPDATE audit SET entry = $3 WHERE at_ms = $1 AND id = $2", &[&at, &id, &entry])
            .await
            .map_err(PgError::query("updating an audit entry"))?;
        Ok(n == 1)
    }

    /// Up to `limit` entries before `before` (all when `None`), newest first, with their keys.
    pub async fn before(&self, before: Option<Key>, limit: i64) -> Result<Vec<(Key, Vec<u8>)>, PgError> {
        let c = self.pg.client().await?;
        let rows = match before {
            Some(k) => {
                let (at, id) = split(&k);
                c.query(
                    "SELECT at_ms, id, entry FROM audit WHERE (at_ms, id) < ($1, $2) ORDER BY at_ms DESC, id DESC \
                     LIMIT $3",
                    &[&at, &id, &limit],
                )
                .await
            }
            None => {
                c.query("SELECT at_ms, id, entry FROM audit ORDER BY at_ms DESC, id DESC LIMIT $1", &[&limit]).await
            }
        }
        .map_err(PgError::query("reading the audit log"))?;
        Ok(rows.iter().map(|r| (key(r.get(0), r.get(1)), r.get(2))).collect())
    }

    /// Removes entries older than `oldest_ms` and the oldest beyond `max_entries`; returns how many went.
    pub async fn prune(&self, oldest_ms: u64, max_entries: u64) -> Result<u64, PgError> {
        let c = self.pg.client().await?;
        let old = c
            .execute("DELETE FROM audit WHERE at_ms < $1", &[&(oldest_ms.min(i64::MAX as u64) as i64)])
            .await
            .map_err(PgError::query("pruning the audit log"))?;
        let over = c
            .execute(
                "DELETE FROM audit WHERE (at_ms, id) IN (SELECT at_ms, id FROM audit ORDER BY at_ms DESC, id DESC \
                 OFFSET $1)",
                &[&(max_entries.min(i64::MAX as u64) as i64)],
            )
            .await
            .map_err(PgError::query("pruning the audit log"))?;
        Ok(old + over)
    }

    pub async fn count(&self) -> Result<u64, PgError> {
        let c = self.pg.client().await?;
        let n: i64 = c
            .query_one("SELECT count(*) FROM audit", &[])
            .await
            .map_err(PgError::query("counting audit entries"))?
            .get(0);
        Ok(n as u64)
    }
}
