//! Alerts on PostgreSQL: every replica's alerts in one table, so that a device's snapshots and an operator's
//! acknowledgement meet wherever they arrive. A snapshot is stored under a transaction-scoped advisory lock
//! on its device and an acknowledgement under the same lock held for the session, so that neither undoes
//! the other, whichever replicas they reach. What a snapshot changes is decided as on the embedded store
//! ([`crate::fleet::alerts`]).
//!
//! Alert ids are the device's `u64`s stored bit for bit in a `bigint`: ids past 2^63 (which no agent sends)
//! would sort first.

use super::kv::{lock_key, PgKv, WriteLock};
use super::{int, Pg, PgError};
use crate::fleet::alerts::{plan_put, AlertCursor, AlertWhere, StoredAlert};
use edgeloop_common::alerts::AlertEvent;

/// The alerts' tables.
#[derive(Clone, Debug)]
pub struct PgAlerts {
    pg: Pg,
}

fn lock_name(device: &str) -> String {
    format!("edgeloop-alerts:{device}")
}

fn decode(doc: &[u8]) -> Result<StoredAlert, PgError> {
    serde_json::from_slice(doc).map_err(|e| PgError::Bad(format!("a stored alert does not decode: {e}")))
}

fn encode(a: &StoredAlert) -> Result<Vec<u8>, PgError> {
    serde_json::to_vec(a).map_err(|e| PgError::Bad(format!("alert {} of `{}`: {e}", a.alert.id, a.device)))
}

const UPSERT: &str = "\
INSERT INTO alerts (device, id, list_ms, received_ms, open, class, doc) VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (device, id) DO UPDATE SET list_ms = excluded.list_ms, received_ms = excluded.received_ms,
    open = excluded.open, class = excluded.class, doc = excluded.doc";

impl PgAlerts {
    pub fn new(pg: Pg) -> PgAlerts {
        PgAlerts { pg }
    }

    pub async fn mark(&self, device: &str) -> Result<u64, PgError> {
        let c = self.pg.client().await?;
        let row = c
            .query_opt("SELECT mark FROM alert_marks WHERE device = $1", &[&device])
            .await
            .map_err(PgError::query("reading an alert mark"))?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    /// Stores a snapshot (see [`crate::fleet::alerts::AlertStore::put`]) in one transaction under the
    /// device's lock, keeping at most `cap` alerts of the device; returns the mark to acknowledge.
    /// Writes an alert's row, new or replacing the one there.
    async fn upsert(c: &impl deadpool_postgres::GenericClient, a: &StoredAlert) -> Result<(), PgError> {
        let doc = encode(a)?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 7] =
            [&a.device, &(a.alert.id as i64), &int(a.list_ms()), &int(a.received_ms), &a.open, &a.class, &doc];
        c.execute(UPSERT, &params).await.map_err(PgError::query("storing an alert"))?;
        Ok(())
    }

    pub async fn put(
        &self,
        device: &str,
        class: &str,
        alert: AlertEvent,
        now_ms: u64,
        cap: usize,
    ) -> Result<u64, PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting an alert write"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&lock_name(device))])
            .await
            .map_err(PgError::query("locking a device's alerts"))?;
        let mark = tx
            .query_opt("SELECT mark FROM alert_marks WHERE device = $1", &[&device])
            .await
            .map_err(PgError::query("reading an alert mark"))?
            .map_or(0, |r| r.get::<_, i64>(0) as u64);
        let old = tx
            .query_opt("SELECT doc FROM alerts WHERE device = $1 AND id = $2", &[&device, &(alert.id as i64)])
            .await
            .map_err(PgError::query("reading an alert"))?
            .map(|r| decode(r.get(0)))
            .transpose()?;
        let plan = plan_put(device, class, alert, now_ms, mark, old);
        if let Some(a) = &plan.store {
            if plan.old.is_none() {
                let n: i64 = tx
                    .query_one("SELECT count(*) FROM alerts WHERE device = $1", &[&device])
                    .await
                    .map_err(PgError::query("counting a device's alerts"))?
                    .get(0);
                if n as usize >= cap {
                    tx.execute(
                        "DELETE FROM alerts WHERE device = $1 AND id = (SELECT min(id) FROM alerts WHERE device = $1)",
                        &[&device],
                    )
                    .await
                    .map_err(PgError::query("removing a device's oldest alert"))?;
                }
            }
            Self::upsert(&tx, a).await?;
        }
        if plan.mark != mark {
            tx.execute(
                "INSERT INTO alert_marks (device, mark) VALUES ($1, $2) \
                 ON CONFLICT (device) DO UPDATE SET mark = excluded.mark",
                &[&device, &int(plan.mark)],
            )
            .await
            .map_err(PgError::query("moving an alert mark"))?;
        }
        tx.commit().await.map_err(PgError::query("committing an alert"))?;
        Ok(plan.mark)
    }

    pub async fn get(&self, device: &str, id: u64) -> Result<Option<StoredAlert>, PgError> {
        let c = self.pg.client().await?;
        c.query_opt("SELECT doc FROM alerts WHERE device = $1 AND id = $2", &[&device, &(id as i64)])
            .await
            .map_err(PgError::query("reading an alert"))?
            .map(|r| decode(r.get(0)))
            .transpose()
    }

    /// The device's alert lock, held across replicas until released: an acknowledgement's read and write.
    pub async fn lock(&self, device: &str) -> Result<WriteLock, PgError> {
        PgKv::new(self.pg.clone()).hold(&lock_name(device)).await
    }

    /// Writes an alert back as it is (an acknowledgement changed it); call under [`PgAlerts::lock`].
    pub async fn replace(&self, a: &StoredAlert) -> Result<(), PgError> {
        let c = self.pg.client().await?;
        Self::upsert(&c, a).await
    }

    /// Up to `n` of the alerts `select` names listed before `after` (all when `None`), newest first: by list
    /// time, then device and id, as the embedded store orders them.
    pub async fn listed_before(
        &self,
        select: AlertWhere<'_>,
        after: Option<&AlertCursor>,
        n: usize,
    ) -> Result<Vec<StoredAlert>, PgError> {
        let c = self.pg.client().await?;
        let whose = match select.device {
            Some(_) => "device = $5",
            None => "$5::text IS NULL",
        };
        let which = match select.open {
            Some(_) => "open = $7",
            None => "$7::boolean IS NULL",
        };
        let (at, dev, id) = match after {
            Some(a) => (int(a.onset_ms), a.device.clone(), a.id as i64),
            None => (i64::MAX, String::new(), 0),
        };
        // Without a cursor every alert is before (i64::MAX, '', 0) but those listed at i64::MAX itself.
        let rows = c
            .query(
                &format!(
                    "SELECT doc FROM alerts WHERE {whose} AND {which} AND ($6 OR (list_ms, device, id) < ($1, $2, $3)) \
                     ORDER BY list_ms DESC, device DESC, id DESC LIMIT $4"
                ),
                &[&at, &dev, &id, &(n as i64), &select.device, &after.is_none(), &select.open],
            )
            .await
            .map_err(PgError::query("listing alerts"))?;
        rows.iter().map(|r| decode(r.get(0))).collect()
    }

    /// Removes closed alerts last heard of before `before_ms`, oldest listed first, at most `max`.
    pub async fn prune(&self, before_ms: u64, max: usize) -> Result<usize, PgError> {
        let c = self.pg.client().await?;
        let n = c
            .execute(
                "DELETE FROM alerts WHERE (device, id) IN (SELECT device, id FROM alerts \
                 WHERE NOT open AND received_ms < $1 ORDER BY list_ms, device, id LIMIT $2)",
                &[&int(before_ms), &(max as i64)],
            )
            .await
            .map_err(PgError::query("pruning alerts"))?;
        Ok(n as usize)
    }

    pub async fn open_by_class(&self) -> Result<std::collections::BTreeMap<String, u64>, PgError> {
        let c = self.pg.client().await?;
        let rows = c
            .query("SELECT class, count(*) FROM alerts WHERE open GROUP BY class", &[])
            .await
            .map_err(PgError::query("counting open alerts"))?;
        Ok(rows.iter().map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64)).collect())
    }
}
