//! The embedded store's named trees on PostgreSQL: rows of `kv (tree, key, value)`, values the same CBOR
//! documents, keys the same bytes (PostgreSQL orders `bytea` byte by byte, as sled orders keys). Each write
//! commits by itself; a read-modify-write of one key runs in a transaction under that key's advisory lock.
//!
//! Groups of trees that one service keeps a copy of in memory (the rollouts) take a cluster-wide write lock,
//! [`PgKv::lock`]: a session advisory lock on a pooled connection, held while the replica decides and writes,
//! and a generation counter raised under it, so that a replica whose copy is older reads the group again.

use super::{Pg, PgError};

/// The `kv` table's rows for one tree, or a group of trees' write lock.
#[derive(Clone, Debug)]
pub struct PgKv {
    pg: Pg,
}

/// This process's name in notifications it sends, so that it can skip its own.
pub fn replica_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("{}-{:016x}", std::process::id(), rand::random::<u64>()))
}

/// A key of 64 bits for an advisory lock on `name` (FNV-1a: stable across builds and replicas).
pub fn lock_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// The smallest key above every key that starts with `prefix` (`None`: no bound, the prefix is all `0xff`).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// A group's write lock, held until [`WriteLock::release`] (or drop, which releases it in the background).
pub struct WriteLock {
    conn: Option<deadpool_postgres::Object>,
    key: i64,
    /// The group's generation before this holder raised it.
    pub previous: i64,
    /// The generation this holder wrote.
    pub generation: i64,
}

impl WriteLock {
    pub async fn release(mut self) {
        if let Some(c) = self.conn.take() {
            unlock(c, self.key).await;
        }
    }
}

async fn unlock(c: deadpool_postgres::Object, key: i64) {
    if let Err(e) = c.execute("SELECT pg_advisory_unlock($1)", &[&key]).await {
        // A connection that may still hold the lock is closed rather than pooled: closing releases it.
        tracing::warn!(error = %e, "releasing a write lock; closing its connection");
        let _ = deadpool_postgres::Object::take(c);
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            let key = self.key;
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(unlock(c, key));
                }
                Err(_) => {
                    let _ = deadpool_postgres::Object::take(c);
                }
            }
        }
    }
}

type Rows = Vec<(Vec<u8>, Vec<u8>)>;

impl PgKv {
    pub fn new(pg: Pg) -> PgKv {
        PgKv { pg }
    }

    pub fn pg(&self) -> &Pg {
        &self.pg
    }

    pub async fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>, PgError> {
        let c = self.pg.client().await?;
        let row = c
            .query_opt("SELECT value FROM kv WHERE tree = $1 AND key = $2", &[&tree, &key])
            .await
            .map_err(PgError::query("reading a stored document"))?;
        Ok(row.map(|r| r.get(0)))
    }

    pub async fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<(), PgError> {
        let c = self.pg.client().await?;
        c.execute(
            "INSERT INTO kv (tree, key, value) VALUES ($1, $2, $3) \
             ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
            &[&tree, &key, &value],
        )
        .await
        .map_err(PgError::query("writing a stored document"))?;
        Ok(())
    }

    /// Stores `value` unless the key holds one; returns whether it did.
    pub async fn put_new(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<bool, PgError> {
        let c = self.pg.client().await?;
        let n = c
            .execute(
                "INSERT INTO kv (tree, key, value) VALUES ($1, $2, $3) ON CONFLICT (tree, key) DO NOTHING",
                &[&tree, &key, &value],
            )
            .await
            .map_err(PgError::query("writing a new stored document"))?;
        Ok(n == 1)
    }

    /// [`PgKv::put_new`], and if it stored the value, the `also` writes too, in the same transaction.
    pub async fn put_new_with(
        &self,
        tree: &str,
        key: &[u8],
        value: &[u8],
        also: &[(&str, Vec<u8>, Vec<u8>)],
    ) -> Result<bool, PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting a write"))?;
        let n = tx
            .execute(
                "INSERT INTO kv (tree, key, value) VALUES ($1, $2, $3) ON CONFLICT (tree, key) DO NOTHING",
                &[&tree, &key, &value],
            )
            .await
            .map_err(PgError::query("writing a new stored document"))?;
        if n == 1 {
            for (t, k, v) in also {
                tx.execute(
                    "INSERT INTO kv (tree, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
                    &[t, k, v],
                )
                .await
                .map_err(PgError::query("writing a stored document"))?;
            }
        }
        tx.commit().await.map_err(PgError::query("committing a write"))?;
        Ok(n == 1)
    }

    pub async fn remove(&self, tree: &str, key: &[u8]) -> Result<(), PgError> {
        let c = self.pg.client().await?;
        c.execute("DELETE FROM kv WHERE tree = $1 AND key = $2", &[&tree, &key])
            .await
            .map_err(PgError::query("removing a stored document"))?;
        Ok(())
    }

    /// Every key starting with `prefix`, in key order, with its value.
    pub async fn scan(&self, tree: &str, prefix: &[u8]) -> Result<Rows, PgError> {
        let c = self.pg.client().await?;
        let rows = match prefix_end(prefix) {
            Some(end) => {
                c.query(
                    "SELECT key, value FROM kv WHERE tree = $1 AND key >= $2 AND key < $3 ORDER BY key",
                    &[&tree, &prefix, &end],
                )
                .await
            }
            None => {
                c.query("SELECT key, value FROM kv WHERE tree = $1 AND key >= $2 ORDER BY key", &[&tree, &prefix]).await
            }
        }
        .map_err(PgError::query("reading stored documents"))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Reads a key's value, passes it to `f` and stores what `f` returns (removes the key on `None`), in one
    /// transaction under the key's lock: replicas updating one key take turns. Returns the new value.
    pub async fn update(
        &self,
        tree: &str,
        key: &[u8],
        mut f: impl FnMut(Option<&[u8]>) -> Option<Vec<u8>> + Send,
    ) -> Result<Option<Vec<u8>>, PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting an update"))?;
        let mut name = format!("edgeloop-kv:{tree}:").into_bytes();
        name.extend_from_slice(key);
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&String::from_utf8_lossy(&name))])
            .await
            .map_err(PgError::query("locking a stored document"))?;
        let old: Option<Vec<u8>> = tx
            .query_opt("SELECT value FROM kv WHERE tree = $1 AND key = $2", &[&tree, &key])
            .await
            .map_err(PgError::query("reading a stored document"))?
            .map(|r| r.get(0));
        let new = f(old.as_deref());
        match &new {
            Some(v) => tx
                .execute(
                    "INSERT INTO kv (tree, key, value) VALUES ($1, $2, $3) \
                     ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value",
                    &[&tree, &key, v],
                )
                .await
                .map_err(PgError::query("writing a stored document"))?,
            None => tx
                .execute("DELETE FROM kv WHERE tree = $1 AND key = $2", &[&tree, &key])
                .await
                .map_err(PgError::query("removing a stored document"))?,
        };
        tx.commit().await.map_err(PgError::query("committing an update"))?;
        Ok(new)
    }

    /// Takes the cluster-wide lock on `name` alone (waiting for whoever holds it), with no generation: for
    /// a read-modify-write that calls back into other stores between its read and its write.
    pub async fn hold(&self, name: &str) -> Result<WriteLock, PgError> {
        let c = self.pg.client().await?;
        let key = lock_key(name);
        c.execute("SELECT pg_advisory_lock($1)", &[&key]).await.map_err(PgError::query("taking a lock"))?;
        Ok(WriteLock { conn: Some(c), key, previous: 0, generation: 0 })
    }

    /// Takes `domain`'s write lock (waiting for the replica that holds it) and raises its generation.
    pub async fn lock(&self, domain: &str) -> Result<WriteLock, PgError> {
        let c = self.pg.client().await?;
        let key = lock_key(&format!("edgeloop-domain:{domain}"));
        c.execute("SELECT pg_advisory_lock($1)", &[&key]).await.map_err(PgError::query("taking a write lock"))?;
        let mut lock = WriteLock { conn: Some(c), key, previous: 0, generation: 0 };
        let c = lock.conn.as_ref().expect("held");
        let row = c
            .query_one(
                "INSERT INTO kv_generations (domain, generation) VALUES ($1, 1) \
                 ON CONFLICT (domain) DO UPDATE SET generation = kv_generations.generation + 1 \
                 RETURNING generation",
                &[&domain],
            )
            .await
            .map_err(PgError::query("raising a generation"))?;
        lock.generation = row.get(0);
        lock.previous = lock.generation - 1;
        Ok(lock)
    }

    /// Sends `payload` on `channel` to every replica listening.
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<(), PgError> {
        let c = self.pg.client().await?;
        c.execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
            .await
            .map_err(PgError::query("notifying replicas"))?;
        Ok(())
    }

    /// Stores an artifact's bytes under its sha256 (kept if already there).
    pub async fn put_artifact(&self, sha256: &str, bytes: &[u8], now_ms: u64) -> Result<(), PgError> {
        let c = self.pg.client().await?;
        c.execute(
            "INSERT INTO artifacts (sha256, bytes, created_ms) VALUES ($1, $2, $3) ON CONFLICT (sha256) DO NOTHING",
            &[&sha256, &bytes, &(now_ms.min(i64::MAX as u64) as i64)],
        )
        .await
        .map_err(PgError::query("storing an artifact"))?;
        Ok(())
    }

    pub async fn artifact(&self, sha256: &str) -> Result<Option<Vec<u8>>, PgError> {
        let c = self.pg.client().await?;
        let row = c
            .query_opt("SELECT bytes FROM artifacts WHERE sha256 = $1", &[&sha256])
            .await
            .map_err(PgError::query("reading an artifact"))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Removes artifacts written before `before_ms` that are not in `keep`; returns their sha256s.
    pub async fn collect_artifacts(&self, keep: &[String], before_ms: u64) -> Result<Vec<String>, PgError> {
        let c = self.pg.client().await?;
        let rows = c
            .query(
                "DELETE FROM artifacts WHERE created_ms < $1 AND NOT (sha256 = ANY($2)) RETURNING sha256",
                &[&(before_ms.min(i64::MAX as u64) as i64), &keep],
            )
            .await
            .map_err(PgError::query("collecting artifacts"))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_bound_exactly_the_keys_with_the_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }

    #[test]
    fn lock_keys_are_stable_and_distinct() {
        assert_eq!(lock_key("edgeloop-domain:rollouts"), lock_key("edgeloop-domain:rollouts"));
        assert_ne!(lock_key("edgeloop-domain:rollouts"), lock_key("edgeloop-domain:models"));
    }
}
