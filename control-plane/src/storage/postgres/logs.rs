//! Device logs on PostgreSQL: every replica's lines in one table, so that a search on any replica finds a
//! device's lines whichever replica stored them. A line's key is its received time and its row id (both
//! big-endian `u64`), ordered as the embedded store's keys are, so cursors mean the same on both back-ends.
//! A search reads at most `scan_max` lines of the device (or of the fleet) newest first, then filters them,
//! as the embedded store does: a page costs the same whatever the filters.

use super::{int, Pg, PgError};
use crate::fleet::logs::{LogCursor, LogPage, LogQuery, LogStats, StoredLog};
use edgeloop_common::envelope::{LogEntry, LogLevel};

/// The device logs' tables.
#[derive(Clone, Debug)]
pub struct PgLogs {
    pg: Pg,
}

/// A level as the `level` column keeps it: 0 warn, 1 error.
pub(crate) fn level_code(l: LogLevel) -> i16 {
    match l {
        LogLevel::Warn => 0,
        LogLevel::Error => 1,
    }
}

fn level_of(code: i16) -> LogLevel {
    if code >= 1 {
        LogLevel::Error
    } else {
        LogLevel::Warn
    }
}

fn cursor(received_ms: i64, id: i64) -> LogCursor {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&(received_ms as u64).to_be_bytes());
    k[8..].copy_from_slice(&(id as u64).to_be_bytes());
    LogCursor::from_bytes(k)
}

fn split(c: &LogCursor) -> (i64, i64) {
    let k = c.bytes();
    (
        int(u64::from_be_bytes(k[..8].try_into().unwrap_or_default())),
        int(u64::from_be_bytes(k[8..].try_into().unwrap_or_default())),
    )
}

/// The search, reading one device's lines (through `device_logs_by_device`) or everyone's (through the
/// primary key): two statements, so that each keeps its index in a generic plan.
fn search_sql(one_device: bool) -> String {
    let whose = if one_device { "device = $1" } else { "$1::text IS NULL" };
    format!(
        "\
WITH scan AS MATERIALIZED (
    SELECT received_ms, id, device, class, level, target, message, ts_ms FROM device_logs
    WHERE {whose} AND (received_ms, id) < ($2, $3)
    ORDER BY received_ms DESC, id DESC LIMIT $4)
SELECT * FROM (
    SELECT *, true AS hit FROM scan
    WHERE ($5::text IS NULL OR class = $5) AND ($6::smallint IS NULL OR level >= $6)
      AND ($7::bigint IS NULL OR ts_ms >= $7) AND ($8::bigint IS NULL OR ts_ms <= $8)
      AND ($9::text IS NULL OR strpos(lower(message), $9) > 0 OR strpos(lower(target), $9) > 0)
    ORDER BY received_ms DESC, id DESC LIMIT $10) hits
UNION ALL
SELECT * FROM (SELECT *, false AS hit FROM scan ORDER BY received_ms, id LIMIT 1) oldest
WHERE (SELECT count(*) FROM scan) = $4"
    )
}

impl PgLogs {
    pub fn new(pg: Pg) -> PgLogs {
        PgLogs { pg }
    }

    /// Stores `entries` and adds to the device's counters, in one transaction.
    pub async fn append(
        &self,
        device: &str,
        class: &str,
        entries: &[LogEntry],
        (suppressed, cut): (u64, u64),
        received_ms: u64,
    ) -> Result<(), PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting a log append"))?;
        if !entries.is_empty() {
            let levels: Vec<i16> = entries.iter().map(|e| level_code(e.level)).collect();
            let targets: Vec<&str> = entries.iter().map(|e| e.target.as_str()).collect();
            let messages: Vec<&str> = entries.iter().map(|e| e.message.as_str()).collect();
            let ts: Vec<i64> = entries.iter().map(|e| int(e.ts_ms)).collect();
            tx.execute(
                "INSERT INTO device_logs (received_ms, device, class, level, target, message, ts_ms) \
                 SELECT $1, $2, $3, l, t, m, ts FROM unnest($4::smallint[], $5::text[], $6::text[], $7::bigint[]) \
                 WITH ORDINALITY AS u(l, t, m, ts, n) ORDER BY n",
                &[&int(received_ms), &device, &class, &levels, &targets, &messages, &ts],
            )
            .await
            .map_err(PgError::query("storing log lines"))?;
        }
        tx.execute(
            "INSERT INTO device_log_stats (device, stored, suppressed, cut) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (device) DO UPDATE SET \
             stored = LEAST(device_log_stats.stored::numeric + excluded.stored, 9223372036854775807)::bigint, \
             suppressed = LEAST(device_log_stats.suppressed::numeric + excluded.suppressed, 9223372036854775807)::bigint, \
             cut = LEAST(device_log_stats.cut::numeric + excluded.cut, 9223372036854775807)::bigint",
            &[&device, &(entries.len() as i64), &int(suppressed), &int(cut)],
        )
        .await
        .map_err(PgError::query("counting log lines"))?;
        tx.commit().await.map_err(PgError::query("committing log lines"))
    }

    pub async fn stats(&self, device: &str) -> Result<LogStats, PgError> {
        let c = self.pg.client().await?;
        let row = c
            .query_opt("SELECT stored, suppressed, cut FROM device_log_stats WHERE device = $1", &[&device])
            .await
            .map_err(PgError::query("reading log counters"))?;
        Ok(row.map_or_else(LogStats::default, |r| LogStats {
            stored: r.get::<_, i64>(0) as u64,
            suppressed: r.get::<_, i64>(1) as u64,
            cut: r.get::<_, i64>(2) as u64,
        }))
    }

    /// Lines matching `q`, newest first, reading at most `scan_max` lines; `limit` is already clamped.
    pub async fn search(&self, q: &LogQuery, limit: usize, scan_max: usize) -> Result<LogPage, PgError> {
        let (at, id) = q.cursor.as_ref().map_or((i64::MAX, i64::MAX), split);
        let level = q.level.map(level_code);
        let text = q.text.as_ref().map(|t| t.to_lowercase());
        let c = self.pg.client().await?;
        let rows = c
            .query(
                &search_sql(q.device.is_some()),
                &[
                    &q.device,
                    &at,
                    &id,
                    &(scan_max as i64),
                    &q.class,
                    &level,
                    &q.since_ms.map(int),
                    &q.until_ms.map(int),
                    &text,
                    &(limit as i64),
                ],
            )
            .await
            .map_err(PgError::query("searching device logs"))?;
        let mut hits = Vec::new();
        let mut oldest = None;
        for r in &rows {
            let key = cursor(r.get("received_ms"), r.get("id"));
            if !r.get::<_, bool>("hit") {
                oldest = Some(key);
                continue;
            }
            let line = StoredLog {
                device: r.get("device"),
                class: r.get("class"),
                level: level_of(r.get("level")),
                target: r.get("target"),
                message: r.get("message"),
                ts_ms: r.get::<_, i64>("ts_ms") as u64,
                received_ms: r.get::<_, i64>("received_ms") as u64,
            };
            hits.push((key, line));
        }
        hits.sort_by_key(|(k, _)| std::cmp::Reverse(k.bytes()));
        // As the embedded store pages: after a full page, from its last line; after a page the scan bound cut
        // short, from the oldest line read.
        let next = if hits.len() == limit { hits.last().map(|(k, _)| *k) } else { oldest };
        Ok(LogPage { entries: hits.into_iter().map(|(_, l)| l).collect(), next })
    }

    /// Removes lines received before `before_ms`, at most `max`, oldest first; returns how many went.
    pub async fn prune(&self, before_ms: u64, max: usize) -> Result<u64, PgError> {
        let c = self.pg.client().await?;
        c.execute(
            "DELETE FROM device_logs WHERE (received_ms, id) IN (SELECT received_ms, id FROM device_logs \
             WHERE received_ms < $1 ORDER BY received_ms, id LIMIT $2)",
            &[&int(before_ms), &(max as i64)],
        )
        .await
        .map_err(PgError::query("pruning device logs"))
    }

    pub async fn count(&self) -> Result<u64, PgError> {
        let c = self.pg.client().await?;
        let n: i64 = c
            .query_one("SELECT count(*) FROM device_logs", &[])
            .await
            .map_err(PgError::query("counting device logs"))?
            .get(0);
        Ok(n as u64)
    }
}
