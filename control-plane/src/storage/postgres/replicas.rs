//! The replicas alive on one database: each ingest replica, and each replica that trains, writes its row (by
//! role) every [`BEAT`], and the rows written within [`ALIVE`] are the live ones. Ingest shares each device's
//! rate limit among the ingest replicas; `/metrics` counts the trainers, so that a queue nobody serves shows.

use super::{Pg, PgError};
use std::time::Duration;

/// How often a replica writes its row.
pub const BEAT: Duration = Duration::from_secs(5);
/// A replica whose row is older than this counts as gone.
pub const ALIVE: Duration = Duration::from_secs(15);

/// The `replicas` table.
#[derive(Clone, Debug)]
pub struct PgReplicas {
    pg: Pg,
}

impl PgReplicas {
    pub fn new(pg: Pg) -> PgReplicas {
        PgReplicas { pg }
    }

    /// Writes `id`'s row, forgets rows long gone, and returns how many replicas of `role` are alive
    /// (this one included).
    pub async fn beat(&self, id: &str, role: &str, now_ms: u64) -> Result<usize, PgError> {
        let now = now_ms.min(i64::MAX as u64) as i64;
        let c = self.pg.client().await?;
        c.execute(
            "INSERT INTO replicas (id, role, seen_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (id) DO UPDATE SET seen_ms = EXCLUDED.seen_ms, role = EXCLUDED.role",
            &[&id, &role, &now],
        )
        .await
        .map_err(PgError::query("writing this replica's row"))?;
        let day = 24 * 3600 * 1000;
        c.execute("DELETE FROM replicas WHERE seen_ms < $1", &[&(now - day)])
            .await
            .map_err(PgError::query("forgetting replicas long gone"))?;
        Ok(self.alive(role, now_ms).await?.max(1))
    }

    /// How many replicas of `role` wrote their row within [`ALIVE`] of `now_ms`.
    pub async fn alive(&self, role: &str, now_ms: u64) -> Result<usize, PgError> {
        let alive = now_ms.min(i64::MAX as u64) as i64 - ALIVE.as_millis() as i64;
        let c = self.pg.client().await?;
        let n: i64 = c
            .query_one("SELECT count(*) FROM replicas WHERE role = $1 AND seen_ms >= $2", &[&role, &alive])
            .await
            .map_err(PgError::query("counting live replicas"))?
            .get(0);
        Ok(n as usize)
    }

    /// Writes `id`'s row as `role` every [`BEAT`] until `stop`, then removes it.
    pub async fn keep_alive(self, id: String, role: &'static str, stop: tokio_util::sync::CancellationToken) {
        loop {
            if let Err(e) = self.beat(&id, role, edgeloop_common::unix_millis()).await {
                tracing::warn!(error = %e, role, "writing this replica's row");
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(BEAT) => {}
            }
        }
        if let Err(e) = self.leave(&id).await {
            tracing::debug!(error = %e, "removing this replica's row");
        }
    }

    /// Removes `id`'s row (a replica stopping).
    pub async fn leave(&self, id: &str) -> Result<(), PgError> {
        let c = self.pg.client().await?;
        c.execute("DELETE FROM replicas WHERE id = $1", &[&id]).await.map_err(PgError::query("leaving"))?;
        Ok(())
    }
}
