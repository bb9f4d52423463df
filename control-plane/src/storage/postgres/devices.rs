//! The device registry on PostgreSQL: one CBOR document per device in `devices`, shared by replicas that each
//! see part of a device's messages (a broker spreads them over a shared subscription).
//!
//! A replica writes what changed in its copy since it last wrote, as a pair (the entry as it was, the entry as
//! it is), and the row takes the merge ([`crate::fleet::devices::Device::merge`]): counters add up, the newest
//! heartbeat and the latest times win. Writes take one transaction-scoped lock, so rows get their `rev` in the
//! order they commit, and a replica that reads `rev > last` misses nothing.

use super::{Pg, PgError};
use crate::fleet::devices::Device;

const WRITE_LOCK: &str = "SELECT pg_advisory_xact_lock(8243113851562063921)";

/// The device registry kept in PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgDevices {
    pg: Pg,
}

/// A row as replicas read it: its revision, and the entry (`None`: the device was removed).
pub type Change = (i64, String, Option<Device>);

fn decode(id: &str, doc: &[u8]) -> Result<Device, PgError> {
    ciborium::from_reader(doc).map_err(|e| PgError::Bad(format!("device {id}: stored entry is corrupt: {e}")))
}

impl PgDevices {
    pub fn new(pg: Pg) -> PgDevices {
        PgDevices { pg }
    }

    /// Merges each `(before, after)` into its row, in one transaction; returns each row as written, with its
    /// revision.
    pub async fn write(&self, changes: &[(Device, Device)]) -> Result<Vec<(i64, Device)>, PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting a registry write"))?;
        tx.batch_execute(WRITE_LOCK).await.map_err(PgError::query("locking the registry"))?;
        let mut out = Vec::with_capacity(changes.len());
        for (before, after) in changes {
            let row = tx
                .query_opt("SELECT doc, removed FROM devices WHERE id = $1", &[&after.id])
                .await
                .map_err(PgError::query("reading a device"))?;
            let merged = match row {
                Some(r) if !r.get::<_, bool>(1) => Device::merge(&decode(&after.id, r.get(0))?, before, after),
                _ => after.clone(),
            };
            let doc = edgeloop_common::signing::to_cbor(&merged);
            let rev: i64 = tx
                .query_one(
                    "INSERT INTO devices (id, rev, removed, doc) VALUES ($1, nextval('devices_rev'), false, $2) \
                     ON CONFLICT (id) DO UPDATE SET rev = EXCLUDED.rev, removed = false, doc = EXCLUDED.doc \
                     RETURNING rev",
                    &[&merged.id, &doc],
                )
                .await
                .map_err(PgError::query("writing a device"))?
                .get(0);
            out.push((rev, merged));
        }
        tx.commit().await.map_err(PgError::query("committing a registry write"))?;
        Ok(out)
    }

    /// Marks a device removed (decommissioned): every replica forgets it.
    pub async fn remove(&self, id: &str) -> Result<(), PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting a device's removal"))?;
        tx.batch_execute(WRITE_LOCK).await.map_err(PgError::query("locking the registry"))?;
        tx.execute(
            "UPDATE devices SET removed = true, rev = nextval('devices_rev'), doc = '\\x'::bytea WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(PgError::query("removing a device"))?;
        tx.commit().await.map_err(PgError::query("committing a device's removal"))?;
        Ok(())
    }

    /// Rows written after revision `after`, oldest first, at most `limit`.
    pub async fn changes(&self, after: i64, limit: i64) -> Result<Vec<Change>, PgError> {
        let c = self.pg.client().await?;
        let rows = c
            .query("SELECT rev, id, removed, doc FROM devices WHERE rev > $1 ORDER BY rev LIMIT $2", &[&after, &limit])
            .await
            .map_err(PgError::query("reading changed devices"))?;
        rows.iter()
            .map(|r| {
                let id: String = r.get(1);
                let device = if r.get::<_, bool>(2) { None } else { Some(decode(&id, r.get(3))?) };
                Ok((r.get(0), id, device))
            })
            .collect()
    }
}
