//! Operator tokens on PostgreSQL: the same entries as `operators.json` (hashes only), shared by every control
//! plane on the database and by the CLI. Each change ends with `pg_notify('edgeloop_operators', id)`; each
//! control plane reloads the (short) list on a notification and after every reconnection.

use super::{Pg, PgError};
use crate::access::operators::{Role, TokenEntry};

/// The notification channel.
pub const CHANNEL: &str = "edgeloop_operators";

/// The lock the first start's bootstrap takes, so that control planes starting together make one admin token.
const BOOTSTRAP_LOCK: i64 = 0x6564_676c_6f70_6f70;

fn entry(r: &tokio_postgres::Row) -> Result<TokenEntry, PgError> {
    let role: String = r.get(2);
    Ok(TokenEntry {
        id: r.get(0),
        name: r.get(1),
        role: role
            .parse::<Role>()
            .map_err(|e| PgError::Bad(format!("operator token {}: {e}", r.get::<_, String>(0))))?,
        sha256: r.get(3),
        created_ms: r.get::<_, i64>(4) as u64,
        revoked: r.get(5),
    })
}

const SELECT: &str = "SELECT id, name, role, sha256, created_ms, revoked FROM operator_tokens ORDER BY created_ms, id";

/// Operator tokens kept in PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgOperators {
    pg: Pg,
}

impl PgOperators {
    pub fn new(pg: Pg) -> PgOperators {
        PgOperators { pg }
    }

    pub(crate) async fn list(&self) -> Result<Vec<TokenEntry>, PgError> {
        let c = self.pg.client().await?;
        let rows = c.query(SELECT, &[]).await.map_err(PgError::query("reading operator tokens"))?;
        rows.iter().map(entry).collect()
    }

    pub(crate) async fn insert(&self, e: &TokenEntry) -> Result<(), PgError> {
        // The change and its notification in one transaction: no control plane can miss it.
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting a token's insert"))?;
        insert_on(&tx, e).await?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &e.id])
            .await
            .map_err(PgError::query("notifying replicas"))?;
        tx.commit().await.map_err(PgError::query("committing a token"))?;
        Ok(())
    }

    /// Marks a token revoked; `None` if there is no such token.
    pub(crate) async fn revoke(&self, id: &str) -> Result<Option<TokenEntry>, PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting a token's revocation"))?;
        let row = tx
            .query_opt(
                "UPDATE operator_tokens SET revoked = true WHERE id = $1 RETURNING id, name, role, sha256, created_ms, revoked",
                &[&id],
            )
            .await
            .map_err(PgError::query("revoking an operator token"))?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &id]).await.map_err(PgError::query("notifying replicas"))?;
        tx.commit().await.map_err(PgError::query("committing a token's revocation"))?;
        row.as_ref().map(entry).transpose()
    }

    /// Stores `make()`'s entry if the table holds no token at all, under a lock, so that of control planes
    /// starting together exactly one does. Returns whether it stored it.
    pub(crate) async fn bootstrap(&self, e: &TokenEntry) -> Result<bool, PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting the bootstrap"))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&BOOTSTRAP_LOCK])
            .await
            .map_err(PgError::query("locking the bootstrap"))?;
        let n: i64 = tx
            .query_one("SELECT count(*) FROM operator_tokens", &[])
            .await
            .map_err(PgError::query("counting operator tokens"))?
            .get(0);
        if n > 0 {
            return Ok(false);
        }
        insert_on(&tx, e).await?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &e.id])
            .await
            .map_err(PgError::query("notifying replicas"))?;
        tx.commit().await.map_err(PgError::query("committing the bootstrap"))?;
        Ok(true)
    }

    /// Stores entries copied from `operators.json`, leaving alone those already here (by id); returns how many
    /// were new.
    pub(crate) async fn copy_in(&self, entries: &[TokenEntry]) -> Result<u64, PgError> {
        let c = self.pg.client().await?;
        let mut new = 0;
        for e in entries {
            new += c
                .query_one(
                    "INSERT INTO operator_tokens (id, name, role, sha256, created_ms, revoked) VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (id) DO UPDATE SET revoked = operator_tokens.revoked OR EXCLUDED.revoked \
                     RETURNING (xmax = 0)",
                    &[&e.id, &e.name, &e.role.to_string(), &e.sha256, &(e.created_ms.min(i64::MAX as u64) as i64), &e.revoked],
                )
                .await
                .map_err(PgError::query("copying an operator token"))?
                .get::<_, bool>(0) as u64;
        }
        Ok(new)
    }

    /// Reloads `into` after every change until `stop`.
    pub(crate) async fn follow(
        self,
        into: std::sync::Arc<std::sync::RwLock<Vec<TokenEntry>>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let pg = self.pg.clone();
        super::follow(pg, CHANNEL, stop, move |_| {
            let (store, into) = (self.clone(), into.clone());
            async move {
                let all = store.list().await?;
                *into.write().unwrap_or_else(|p| p.into_inner()) = all;
                Ok(())
            }
        })
        .await
    }
}

async fn insert_on(c: &impl deadpool_postgres::GenericClient, e: &TokenEntry) -> Result<(), PgError> {
    c.execute(
        "INSERT INTO operator_tokens (id, name, role, sha256, created_ms, revoked) VALUES ($1, $2, $3, $4, $5, $6)",
        &[&e.id, &e.name, &e.role.to_string(), &e.sha256, &(e.created_ms.min(i64::MAX as u64) as i64), &e.revoked],
    )
    .await
    .map_err(PgError::query("storing an operator token"))?;
    Ok(())
}
