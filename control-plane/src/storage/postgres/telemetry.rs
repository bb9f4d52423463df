//! Telemetry on PostgreSQL: every accepted record once, keyed by (device, seq), and each device's cumulative
//! acknowledgement watermark, with the same meaning as the embedded store's (`fleet::telemetry`).
//!
//! Ingest writes through a [`Group`]: one transaction per group commit, on one connection. A batch's records
//! go in with one `INSERT ... ON CONFLICT (device, seq) DO NOTHING RETURNING seq`, so a record some replica
//! already stored (a redelivery, or another replica's copy of the same batch) is counted as a duplicate and
//! never stored twice: when two replicas insert the same (device, seq) at the same time, the second waits for
//! the first to commit or roll back, then skips it or stores it. The watermark moves in the same transaction,
//! under the device's row lock: to the batch's end when the batch starts at or below the next expected seq,
//! then on over records already stored right after it. Replicas sharing the uplink receive a device's
//! batches in any order (the broker spreads messages, not devices), so a batch that arrives before the one
//! before it is stored but cannot move the watermark; the one that closes the gap then moves it past both. Nothing is visible to others, or
//! acknowledged, before the commit; a replica that dies before it leaves nothing behind.
//!
//! A group locks devices' rows in the order it stores them. Two replicas that store several devices each in
//! different orders could wait for each other; PostgreSQL then aborts one transaction (a deadlock,
//! [`super::PgError::is_retryable`]) and its group is not acknowledged, so its devices send it again. Ingest
//! stores a group's devices in sorted order, so that this does not happen between edgeloop replicas.

use super::{Pg, PgError};
use crate::fleet::telemetry::Query;
use edgeloop_common::envelope::{Record, TelemetryBatch, FLAG_ANOMALY};

pub use crate::fleet::telemetry::BatchStored;

/// Telemetry kept in PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgTelemetry {
    pg: Pg,
}

fn seq_i64(device: &str, seq: u64) -> Result<i64, PgError> {
    i64::try_from(seq).map_err(|_| {
        PgError::Bad(format!("device `{device}`: seq {seq} is above 2^63 - 1, the largest the store keeps"))
    })
}

fn decode(device: &str, seq: i64, bytes: &[u8]) -> Result<Record, PgError> {
    ciborium::from_reader(bytes).map_err(|e| PgError::Bad(format!("stored record {device}/{seq} is corrupt: {e}")))
}

const INSERT: &str = "INSERT INTO telemetry (device, seq, ts_ms, record)
    SELECT $1, s, t, r FROM unnest($2::bigint[], $3::bigint[], $4::bytea[]) AS x(s, t, r)
    ON CONFLICT (device, seq) DO NOTHING
    RETURNING seq";

/// Moves the watermark to the batch's end when the batch starts at or below the next expected seq, as the
/// embedded store does; returns the watermark after.
const ADVANCE: &str = "INSERT INTO watermarks AS w (device, upto)
    VALUES ($1, CASE WHEN $2::bigint <= 1 THEN $3::bigint ELSE 0 END)
    ON CONFLICT (device) DO UPDATE
        SET upto = CASE WHEN $2::bigint <= w.upto + 1 AND $3::bigint > w.upto THEN $3::bigint ELSE w.upto END
    RETURNING upto";

/// Then moves it on over records already stored right after it (batches that came before the one that
/// closed the gap: another replica's, or an earlier delivery's), under the row lock ADVANCE took; a statement
/// of its own, so it sees what other transactions committed while this one waited for that lock.
const EXTEND: &str = "UPDATE watermarks w SET upto = CASE
        WHEN EXISTS (SELECT 1 FROM telemetry WHERE device = $1 AND seq = w.upto + 1)
        THEN (SELECT min(t.seq) FROM telemetry t WHERE t.device = $1 AND t.seq > w.upto
              AND NOT EXISTS (SELECT 1 FROM telemetry n WHERE n.device = $1 AND n.seq = t.seq + 1))
        ELSE w.upto END
    WHERE device = $1
    RETURNING upto";

const LOCK_ROW_INSERT: &str = "INSERT INTO watermarks (device, upto) VALUES ($1, 0) ON CONFLICT (device) DO NOTHING";
const LOCK_ROW: &str = "SELECT upto FROM watermarks WHERE device = $1 FOR UPDATE";

const RAISE: &str = "INSERT INTO watermarks AS w (device, upto) VALUES ($1, $2)
    ON CONFLICT (device) DO UPDATE SET upto = GREATEST(w.upto, EXCLUDED.upto)
    RETURNING upto";

const WATERMARK: &str = "SELECT upto FROM watermarks WHERE device = $1";

const SEQS_IN: &str = "SELECT seq FROM telemetry WHERE device = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq";

impl PgTelemetry {
    pub fn new(pg: Pg) -> PgTelemetry {
        PgTelemetry { pg }
    }

    /// Starts a group: a transaction on a connection of its own.
    pub async fn begin(&self) -> Result<Group, PgError> {
        let client = self.pg.client().await?;
        client.batch_execute("BEGIN").await.map_err(PgError::query("starting an ingest transaction"))?;
        Ok(Group { client: Some(client) })
    }

    pub async fn watermark(&self, device: &str) -> Result<u64, PgError> {
        let c = self.pg.client().await?;
        let row = c.query_opt(WATERMARK, &[&device]).await.map_err(PgError::query("reading a watermark"))?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    /// Records of `device` matching `q`, in seq order.
    pub async fn query(&self, device: &str, q: Query) -> Result<Vec<Record>, PgError> {
        let c = self.pg.client().await?;
        let from = q.from_ms.map_or(i64::MIN, |v| v.min(i64::MAX as u64) as i64);
        let to = q.to_ms.map_or(i64::MAX, |v| v.min(i64::MAX as u64) as i64);
        let after = q.after_seq.min(i64::MAX as u64) as i64;
        let limit = q.limit.min(i64::MAX as usize) as i64;
        let rows = c
            .query(
                "SELECT seq, record FROM telemetry WHERE device = $1 AND seq > $2 AND ts_ms BETWEEN $3 AND $4 \
                 ORDER BY seq LIMIT $5",
                &[&device, &after, &from, &to, &limit],
            )
            .await
            .map_err(PgError::query("querying telemetry"))?;
        rows.iter().map(|r| decode(device, r.get(0), r.get(1))).collect()
    }

    /// The newest record (highest seq) of `device`.
    pub async fn last(&self, device: &str) -> Result<Option<Record>, PgError> {
        let c = self.pg.client().await?;
        let row = c
            .query_opt("SELECT seq, record FROM telemetry WHERE device = $1 ORDER BY seq DESC LIMIT 1", &[&device])
            .await
            .map_err(PgError::query("reading the last record"))?;
        row.map(|r| decode(device, r.get(0), r.get(1))).transpose()
    }

    /// The sequence numbers stored for `device` within `from..=to`, ascending.
    pub async fn seqs_in(&self, device: &str, from: u64, to: u64) -> Result<Vec<u64>, PgError> {
        let c = self.pg.client().await?;
        let (from, to) = (from.min(i64::MAX as u64) as i64, to.min(i64::MAX as u64) as i64);
        let rows = c.query(SEQS_IN, &[&device, &from, &to]).await.map_err(PgError::query("reading stored seqs"))?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
    }

    /// Number of records stored for `device`.
    pub async fn count(&self, device: &str) -> Result<u64, PgError> {
        let c = self.pg.client().await?;
        let row = c
            .query_one("SELECT count(*) FROM telemetry WHERE device = $1", &[&device])
            .await
            .map_err(PgError::query("counting records"))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Removes `device`'s acknowledged records (at or below its watermark) with an event time before
    /// `before_ms`, in sequence order up to the first younger one, at most `max`; committed at once. Returns
    /// how many went.
    pub async fn prune(&self, device: &str, before_ms: u64, max: usize) -> Result<u64, PgError> {
        let c = self.pg.client().await?;
        let before = before_ms.min(i64::MAX as u64) as i64;
        let max = max.min(i64::MAX as usize) as i64;
        let n = c
            .execute(
                "WITH w AS (SELECT coalesce((SELECT upto FROM watermarks WHERE device = $1), 0) AS upto),
                      stop AS (SELECT coalesce(min(seq), (SELECT upto FROM w) + 1) AS seq FROM telemetry
                               WHERE device = $1 AND seq <= (SELECT upto FROM w) AND ts_ms >= $2)
                 DELETE FROM telemetry WHERE device = $1 AND seq IN (
                     SELECT seq FROM telemetry WHERE device = $1 AND seq < (SELECT seq FROM stop)
                     ORDER BY seq LIMIT $3)",
                &[&device, &before, &max],
            )
            .await
            .map_err(PgError::query("pruning telemetry"))?;
        Ok(n)
    }
}

/// One ingest group's transaction. Its writes are visible to it at once, and to everyone else (and durable)
/// at [`Group::commit`]. Dropped without a commit, its connection is closed, so PostgreSQL rolls back
/// everything it wrote and releases its locks.
pub struct Group {
    client: Option<deadpool_postgres::Object>,
}

impl Group {
    fn client(&self) -> &deadpool_postgres::Object {
        self.client.as_ref().expect("a group's connection is held until commit or drop")
    }

    /// Stores `batch`'s records of `device` (those not stored yet) and moves its watermark.
    pub async fn store_batch(&mut self, device: &str, batch: &TelemetryBatch) -> Result<BatchStored, PgError> {
        let mut seqs = Vec::with_capacity(batch.records.len());
        let mut ts = Vec::with_capacity(batch.records.len());
        let mut bodies = Vec::with_capacity(batch.records.len());
        for r in &batch.records {
            seqs.push(seq_i64(device, r.seq)?);
            ts.push(r.ts_ms.min(i64::MAX as u64) as i64);
            bodies.push(edgeloop_common::signing::to_cbor_with_capacity(r, 64 + 5 * r.features.len()));
        }
        let c = self.client();
        let (from, to) = (seq_i64(device, batch.from)?, seq_i64(device, batch.to)?);
        // The device's watermark row first, locked until the commit: writers of one device go one at a time,
        // and each takes its devices' rows in the same (sorted) order, so none waits for another in a cycle.
        // Then the records, the watermark's advance, and its move over records stored ahead of the batch. None
        // of the five takes another's result, so they are sent together (pipelined on the one connection, run
        // in this order by PostgreSQL): one round trip, not five.
        // Prepared first (once per connection, then cached): a statement sent as text would be parsed in a
        // round trip of its own, and the pipelined ones behind it could run before it.
        let prepare = || PgError::query("preparing ingest's statements");
        let lock_insert = c.prepare_cached(LOCK_ROW_INSERT).await.map_err(prepare())?;
        let lock = c.prepare_cached(LOCK_ROW).await.map_err(prepare())?;
        let insert = c.prepare_cached(INSERT).await.map_err(prepare())?;
        let advance = c.prepare_cached(ADVANCE).await.map_err(prepare())?;
        let extend = c.prepare_cached(EXTEND).await.map_err(prepare())?;
        let (_, _, rows, _, extended) = futures_util::try_join!(
            async { c.execute(&lock_insert, &[&device]).await.map_err(PgError::query("creating a watermark")) },
            async { c.execute(&lock, &[&device]).await.map_err(PgError::query("locking a watermark")) },
            async {
                c.query(&insert, &[&device, &seqs, &ts, &bodies]).await.map_err(PgError::query("storing records"))
            },
            async { c.query_one(&advance, &[&device, &from, &to]).await.map_err(PgError::query("moving a watermark")) },
            async { c.query_one(&extend, &[&device]).await.map_err(PgError::query("moving a watermark on")) },
        )?;
        let new: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        let flagged =
            batch.records.iter().filter(|r| r.flags & FLAG_ANOMALY != 0 && new.contains(&(r.seq as i64))).count()
                as u64;
        let upto: i64 = extended.get(0);
        let stored = new.len() as u64;
        Ok(BatchStored { new: stored, duplicate: batch.records.len() as u64 - stored, flagged, upto: upto as u64 })
    }

    /// Stores `records` of `device` that are not stored yet, leaving the watermark alone (copying a store);
    /// returns how many were new.
    pub async fn insert_records(&mut self, device: &str, records: &[Record]) -> Result<u64, PgError> {
        let mut seqs = Vec::with_capacity(records.len());
        let mut ts = Vec::with_capacity(records.len());
        let mut bodies = Vec::with_capacity(records.len());
        for r in records {
            seqs.push(seq_i64(device, r.seq)?);
            ts.push(r.ts_ms.min(i64::MAX as u64) as i64);
            bodies.push(edgeloop_common::signing::to_cbor_with_capacity(r, 64 + 5 * r.features.len()));
        }
        let rows = self
            .client()
            .query(INSERT, &[&device, &seqs, &ts, &bodies])
            .await
            .map_err(PgError::query("copying records"))?;
        Ok(rows.len() as u64)
    }

    /// The device's watermark as this transaction sees it.
    pub async fn watermark(&mut self, device: &str) -> Result<u64, PgError> {
        let row =
            self.client().query_opt(WATERMARK, &[&device]).await.map_err(PgError::query("reading a watermark"))?;
        Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
    }

    /// Moves the device's watermark up to `upto` (never down); returns it after.
    pub async fn raise_watermark(&mut self, device: &str, upto: u64) -> Result<u64, PgError> {
        let upto = seq_i64(device, upto)?;
        let row =
            self.client().query_one(RAISE, &[&device, &upto]).await.map_err(PgError::query("raising a watermark"))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// The sequence numbers stored for `device` within `from..=to`, as this transaction sees them.
    pub async fn seqs_in(&mut self, device: &str, from: u64, to: u64) -> Result<Vec<u64>, PgError> {
        let (from, to) = (from.min(i64::MAX as u64) as i64, to.min(i64::MAX as u64) as i64);
        let rows = self
            .client()
            .query(SEQS_IN, &[&device, &from, &to])
            .await
            .map_err(PgError::query("reading stored seqs"))?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
    }

    /// Makes the group's writes durable and visible. Only then may ingest acknowledge them.
    pub async fn commit(mut self) -> Result<(), PgError> {
        let c = self.client.take().expect("a group commits once");
        let done = c.batch_execute("COMMIT").await.map_err(PgError::query("committing an ingest transaction"));
        if done.is_err() {
            // Whatever state the connection is in, it does not go back to the pool.
            drop(deadpool_postgres::Object::take(c));
        }
        done
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            // Uncommitted: close the connection instead of handing an open transaction back to the pool.
            drop(deadpool_postgres::Object::take(c));
        }
    }
}
