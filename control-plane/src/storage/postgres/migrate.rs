//! Versioned schema migrations, applied at start.
//!
//! Each migration is a SQL file in `control-plane/migrations/`, numbered, compiled into the binary. At start
//! the control plane takes a session advisory lock (so replicas starting together apply each migration once),
//! reads the table `edgeloop_migrations`, and applies the missing ones in order, each in its own transaction
//! with its row. A migration already applied whose text differs from this build's (by SHA-256) stops the
//! start with its number and name: released migrations are never edited. A database at a version this build
//! does not know (a newer edgeloop ran on it) stops the start too.

use super::PgError;
use edgeloop_common::signing::sha256_hex;

/// One migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every migration of this build, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "telemetry", sql: include_str!("../../../migrations/0001_telemetry.sql") },
    Migration { version: 2, name: "enrollment", sql: include_str!("../../../migrations/0002_enrollment.sql") },
    Migration { version: 3, name: "operators", sql: include_str!("../../../migrations/0003_operators.sql") },
    Migration { version: 4, name: "state", sql: include_str!("../../../migrations/0004_state.sql") },
    Migration { version: 5, name: "training_jobs", sql: include_str!("../../../migrations/0005_training_jobs.sql") },
    Migration { version: 6, name: "replicas", sql: include_str!("../../../migrations/0006_replicas.sql") },
    Migration { version: 7, name: "audit", sql: include_str!("../../../migrations/0007_audit.sql") },
    Migration { version: 8, name: "logs_alerts", sql: include_str!("../../../migrations/0008_logs_alerts.sql") },
];

/// The advisory lock replicas take while migrating (an arbitrary constant: "edgeloop" in ASCII, truncated).
const LOCK: i64 = 0x6564_6765_6c6f_6f70;

/// Applies what is missing of `migrations`; returns the versions it applied.
pub async fn migrate_with(client: &mut tokio_postgres::Client, migrations: &[Migration]) -> Result<Vec<i32>, PgError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK])
        .await
        .map_err(PgError::query("taking the migration lock"))?;
    let done = apply(client, migrations).await;
    let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK]).await;
    let done = done?;
    unlocked.map_err(PgError::query("releasing the migration lock"))?;
    Ok(done)
}

/// Applies this build's [`MIGRATIONS`].
pub async fn migrate(client: &mut tokio_postgres::Client) -> Result<Vec<i32>, PgError> {
    migrate_with(client, MIGRATIONS).await
}

async fn apply(client: &mut tokio_postgres::Client, migrations: &[Migration]) -> Result<Vec<i32>, PgError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS edgeloop_migrations (
                version int PRIMARY KEY,
                name text NOT NULL,
                sha256 text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .await
        .map_err(PgError::query("creating edgeloop_migrations"))?;
    let rows = client
        .query("SELECT version, name, sha256 FROM edgeloop_migrations ORDER BY version", &[])
        .await
        .map_err(PgError::query("reading edgeloop_migrations"))?;
    let applied: Vec<(i32, String, String)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    check(&applied, migrations)?;
    let mut done = Vec::new();
    for m in migrations.iter().filter(|m| !applied.iter().any(|(v, _, _)| *v == m.version)) {
        let tx = client.transaction().await.map_err(PgError::query("starting a migration"))?;
        tx.batch_execute(m.sql)
            .await
            .map_err(|e| PgError::Schema(format!("migration {} ({}) failed: {e}", m.version, m.name)))?;
        tx.execute(
            "INSERT INTO edgeloop_migrations (version, name, sha256) VALUES ($1, $2, $3)",
            &[&m.version, &m.name, &sha256_hex(m.sql.as_bytes())],
        )
        .await
        .map_err(PgError::query("recording a migration"))?;
        tx.commit().await.map_err(PgError::query("committing a migration"))?;
        tracing::info!(version = m.version, name = m.name, "postgres schema migrated");
        done.push(m.version);
    }
    Ok(done)
}

/// The recorded migrations against this build's: every recorded one must be this build's, unchanged.
fn check(applied: &[(i32, String, String)], migrations: &[Migration]) -> Result<(), PgError> {
    for (version, name, sha) in applied {
        let Some(m) = migrations.iter().find(|m| m.version == *version) else {
            let known = migrations.last().map_or(0, |m| m.version);
            return Err(PgError::Schema(format!(
                "the database has migration {version} ({name}), which this build does not know (it knows up to \
                 {known}): a newer edgeloop has run on it; run that version"
            )));
        };
        if sha256_hex(m.sql.as_bytes()) != *sha {
            return Err(PgError::Schema(format!(
                "migration {version} ({name}) differs from the one applied to this database (SHA-256 {sha}); \
                 released migrations are never edited"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_numbered_in_order_and_named_after_their_files() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i as i32 + 1);
            assert!(!m.sql.trim().is_empty());
        }
    }

    #[test]
    fn an_edited_or_unknown_migration_is_refused_by_number() {
        let m = [Migration { version: 1, name: "one", sql: "CREATE TABLE a (x int);" }];
        let ok = vec![(1, "one".to_string(), sha256_hex(m[0].sql.as_bytes()))];
        assert!(check(&ok, &m).is_ok());
        let edited = vec![(1, "one".to_string(), sha256_hex(b"CREATE TABLE a (y int);"))];
        let e = check(&edited, &m).unwrap_err().to_string();
        assert!(e.contains("migration 1 (one) differs"), "{e}");
        let newer = vec![ok[0].clone(), (2, "two".to_string(), "x".to_string())];
        let e = check(&newer, &m).unwrap_err().to_string();
        assert!(e.contains("migration 2 (two)") && e.contains("up to 1"), "{e}");
    }
}
