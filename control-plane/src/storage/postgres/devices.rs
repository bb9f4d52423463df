//! The device registry on PostgreSQL: one CBOR document per device in `devices`, shared by replicas that each
//! see part of a device's messages (a broker spreads them over a shared subscription).
//!
//! A replica writes what changed in its copy since it last wrote, as a pair (the entry as it was, the entry as
//! it is), and the row takes the merge ([`crate::fleet::devices::Device::merge`]): counters add up, the newest
//! heartbeat and the latest times win. Writes take one transaction-scoped lock, so rows get their `rev` in the
//! order they commit, and a replica that reads `rev > last` misses nothing. A write of any number of devices
//! is one transaction of three statements (the lock, one read, one upsert), committed without waiting for the
//! WAL flush (a crash of PostgreSQL can take back its last fraction of a second: heartbeats say the status
//! again, the counters miss it).

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

    /// Merges each `(before, after)` into its row, in one transaction of three statements whatever the number
    /// of devices; returns each row as written, with its revision, in the order given.
    pub async fn write(&self, changes: &[(Device, Device)]) -> Result<Vec<(i64, Device)>, PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting a registry write"))?;
        // The registry is statistics and what devices last said: its commit does not wait for the WAL flush
        // (the telemetry's does). A PostgreSQL crash can take back the last fraction of a second of it: the next
        // heartbeats say the status and reports again, and the counters miss what that moment added.
        tx.batch_execute(&format!("SET LOCAL synchronous_commit = off; {WRITE_LOCK}"))
            .await
            .map_err(PgError::query("locking the registry"))?;
        let ids: Vec<&str> = changes.iter().map(|(_, a)| a.id.as_str()).collect();
        let rows = tx
            .query("SELECT id, doc FROM devices WHERE id = ANY($1) AND NOT removed", &[&ids])
            .await
            .map_err(PgError::query("reading devices"))?;
        let mut stored: std::collections::HashMap<String, Device> = std::collections::HashMap::new();
        for r in &rows {
            let id: String = r.get(0);
            let d = decode(&id, r.get(1))?;
            stored.insert(id, d);
        }
        let merged: Vec<Device> = changes
            .iter()
            .map(|(before, after)| match stored.get(&after.id) {
                Some(s) => Device::merge(s, before, after),
                None => after.clone(),
            })
            .collect();
        let docs: Vec<Vec<u8>> = merged.iter().map(edgeloop_common::signing::to_cbor).collect();
        let revs = tx
            .query(
                "INSERT INTO devices (id, rev, removed, doc) \
                 SELECT u.id, nextval('devices_rev'), false, u.doc FROM unnest($1::text[], $2::bytea[]) AS u(id, doc) \
                 ON CONFLICT (id) DO UPDATE SET rev = EXCLUDED.rev, removed = false, doc = EXCLUDED.doc \
                 RETURNING id, rev",
                &[&ids, &docs],
            )
            .await
            .map_err(PgError::query("writing devices"))?;
        let revs: std::collections::HashMap<String, i64> = revs.iter().map(|r| (r.get(0), r.get(1))).collect();
        tx.commit().await.map_err(PgError::query("committing a registry write"))?;
        Ok(merged.into_iter().map(|d| (revs.get(&d.id).copied().unwrap_or(0), d)).collect())
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
