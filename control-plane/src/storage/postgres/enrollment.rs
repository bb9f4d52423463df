//! Enrollment on PostgreSQL: tokens and enrolled devices, with the same rules as the embedded store
//! (`fleet::enrollment`), shared by every replica on the database.
//!
//! Every change of a device's record runs in one transaction that first takes a transaction-scoped advisory
//! lock on the device's id, so that two replicas enrolling (or revoking) the same id never both decide on the
//! state they read: the second waits, then reads what the first committed. A token's use is taken under the
//! token row's lock in the same transaction. Each change ends with `pg_notify('edgeloop_enrollment', device)`,
//! delivered at commit: every replica's listener ([`PgEnrollment::follow`]) reloads that device into its
//! in-memory mirror, which admission and ingest read. A listener that lost its connection reconnects and
//! reloads everything, so a notification missed meanwhile is not lost.

use super::{Pg, PgError};
use crate::fleet::enrollment::{check_record, check_token, EnrollError, EnrollRequest, Record, TokenRecord};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// The notification channel.
pub const CHANNEL: &str = "edgeloop_enrollment";

const RECORD: &str =
    "SELECT device, class, public_key, password_sha256, enrolled_ms, revoked, revoked_ms, last_request_ms \
                      FROM enrolled";
const TOKEN: &str = "SELECT id, class, sha256, uses_left, expires_ms, created_ms FROM enrollment_tokens";

fn record(r: &tokio_postgres::Row) -> Record {
    Record {
        device: r.get(0),
        class: r.get(1),
        public_key: r.get(2),
        password_sha256: r.get(3),
        enrolled_ms: r.get::<_, i64>(4) as u64,
        revoked: r.get(5),
        revoked_ms: r.get::<_, Option<i64>>(6).map(|v| v as u64),
        last_request_ms: r.get::<_, i64>(7) as u64,
    }
}

fn token(r: &tokio_postgres::Row) -> TokenRecord {
    TokenRecord {
        id: r.get(0),
        class: r.get(1),
        sha256: r.get(2),
        uses_left: r.get::<_, i64>(3).clamp(0, u32::MAX as i64) as u32,
        expires_ms: r.get::<_, i64>(4) as u64,
        created_ms: r.get::<_, i64>(5) as u64,
    }
}

fn ms(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// The device-id lock every change of a device's record takes first.
const LOCK_DEVICE: &str = "SELECT pg_advisory_xact_lock(hashtext('edgeloop-enrolled:' || $1))";

/// Enrollment kept in PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgEnrollment {
    pg: Pg,
}

impl PgEnrollment {
    pub fn new(pg: Pg) -> PgEnrollment {
        PgEnrollment { pg }
    }

    /// Every enrolled device.
    pub(crate) async fn all(&self) -> Result<Vec<Record>, PgError> {
        let c = self.pg.client().await?;
        let rows = c.query(RECORD, &[]).await.map_err(PgError::query("reading enrolled devices"))?;
        Ok(rows.iter().map(record).collect())
    }

    /// One enrolled device.
    pub(crate) async fn one(&self, device: &str) -> Result<Option<Record>, PgError> {
        let c = self.pg.client().await?;
        let row = c
            .query_opt(&format!("{RECORD} WHERE device = $1"), &[&device])
            .await
            .map_err(PgError::query("reading an enrolled device"))?;
        Ok(row.as_ref().map(record))
    }

    pub(crate) async fn insert_token(&self, t: &TokenRecord) -> Result<(), PgError> {
        let c = self.pg.client().await?;
        c.execute(
            "INSERT INTO enrollment_tokens (id, class, sha256, uses_left, expires_ms, created_ms) VALUES ($1, $2, $3, $4, $5, $6)",
            &[&t.id, &t.class, &t.sha256, &i64::from(t.uses_left), &ms(t.expires_ms), &ms(t.created_ms)],
        )
        .await
        .map_err(PgError::query("storing an enrollment token"))?;
        Ok(())
    }

    /// Withdraws a token (no use left); `None` if there is no such token.
    pub(crate) async fn revoke_token(&self, id: &str) -> Result<Option<TokenRecord>, PgError> {
        let c = self.pg.client().await?;
        let row = c
            .query_opt(
                "UPDATE enrollment_tokens SET uses_left = 0 WHERE id = $1 \
                 RETURNING id, class, sha256, uses_left, expires_ms, created_ms",
                &[&id],
            )
            .await
            .map_err(PgError::query("withdrawing an enrollment token"))?;
        Ok(row.as_ref().map(token))
    }

    pub(crate) async fn tokens(&self) -> Result<Vec<TokenRecord>, PgError> {
        let c = self.pg.client().await?;
        let rows = c.query(&format!("{TOKEN} ORDER BY id"), &[]).await.map_err(PgError::query("reading tokens"))?;
        Ok(rows.iter().map(token).collect())
    }

    /// Enrolls (or renews) `new` with the token `token_id`/`secret`, in one transaction: the token's and the
    /// device's checks against what is committed, then the token's use and the record.
    pub(crate) async fn enroll(
        &self,
        token_id: &str,
        secret: &str,
        req: &EnrollRequest,
        new: &Record,
        now_ms: u64,
    ) -> Result<(), EnrollError> {
        let store = |e: PgError| EnrollError::Store(e.to_string());
        let mut c = self.pg.client().await.map_err(store)?;
        let tx = c.transaction().await.map_err(|e| store(PgError::query("starting an enrollment")(e)))?;
        let q = |doing: &'static str| move |e| store(PgError::query(doing)(e));
        tx.execute(LOCK_DEVICE, &[&new.device]).await.map_err(q("locking the device id"))?;
        let t = tx
            .query_opt(&format!("{TOKEN} WHERE id = $1 FOR UPDATE"), &[&token_id])
            .await
            .map_err(q("reading the token"))?
            .ok_or(EnrollError::Token("unknown token"))?;
        check_token(&token(&t), secret, &req.class, now_ms)?;
        let existing = tx
            .query_opt(&format!("{RECORD} WHERE device = $1"), &[&new.device])
            .await
            .map_err(q("reading the device"))?;
        check_record(existing.as_ref().map(record).as_ref(), req, &new.public_key)?;
        tx.execute("UPDATE enrollment_tokens SET uses_left = uses_left - 1 WHERE id = $1", &[&token_id])
            .await
            .map_err(q("using the token"))?;
        tx.execute(
            "INSERT INTO enrolled (device, class, public_key, password_sha256, enrolled_ms, revoked, revoked_ms, last_request_ms) \
             VALUES ($1, $2, $3, $4, $5, false, NULL, $6) \
             ON CONFLICT (device) DO UPDATE SET class = EXCLUDED.class, public_key = EXCLUDED.public_key, \
                 password_sha256 = EXCLUDED.password_sha256, enrolled_ms = EXCLUDED.enrolled_ms, \
                 last_request_ms = EXCLUDED.last_request_ms",
            &[&new.device, &new.class, &new.public_key, &new.password_sha256, &ms(new.enrolled_ms), &ms(new.last_request_ms)],
        )
        .await
        .map_err(q("storing the device"))?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &new.device]).await.map_err(q("notifying replicas"))?;
        tx.commit().await.map_err(q("committing an enrollment"))?;
        Ok(())
    }

    /// Revokes a device for good (revoking twice keeps the first time); `None` if it is not enrolled.
    pub(crate) async fn revoke(&self, device: &str, now_ms: u64) -> Result<Option<Record>, PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting a revocation"))?;
        tx.execute(LOCK_DEVICE, &[&device]).await.map_err(PgError::query("locking the device id"))?;
        tx.execute(
            "UPDATE enrolled SET revoked = true, revoked_ms = $2 WHERE device = $1 AND NOT revoked",
            &[&device, &ms(now_ms)],
        )
        .await
        .map_err(PgError::query("revoking a device"))?;
        let row = tx
            .query_opt(&format!("{RECORD} WHERE device = $1"), &[&device])
            .await
            .map_err(PgError::query("reading the device"))?;
        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &device])
            .await
            .map_err(PgError::query("notifying replicas"))?;
        tx.commit().await.map_err(PgError::query("committing a revocation"))?;
        Ok(row.as_ref().map(record))
    }

    /// Stores tokens and device records copied from another store; those already here (by id) keep their
    /// own, except that a revocation or a spent use in the copy is carried over (a second copy after a
    /// revocation must not leave the device active). Returns how many of each were new.
    pub(crate) async fn copy_in(&self, tokens: &[TokenRecord], devices: &[Record]) -> Result<(u64, u64), PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting the enrollment copy"))?;
        let mut new = (0, 0);
        for t in tokens {
            new.0 += tx
                .query_one(
                    "INSERT INTO enrollment_tokens (id, class, sha256, uses_left, expires_ms, created_ms)                      VALUES ($1, $2, $3, $4, $5, $6) \
                     ON CONFLICT (id) DO UPDATE SET uses_left = LEAST(enrollment_tokens.uses_left, EXCLUDED.uses_left) \
                     RETURNING (xmax = 0)",
                    &[&t.id, &t.class, &t.sha256, &i64::from(t.uses_left), &ms(t.expires_ms), &ms(t.created_ms)],
                )
                .await
                .map_err(PgError::query("copying a token"))?
                .get::<_, bool>(0) as u64;
        }
        for d in devices {
            new.1 += tx
                .query_one(
                    "INSERT INTO enrolled (device, class, public_key, password_sha256, enrolled_ms, revoked, revoked_ms, last_request_ms)                      VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (device) DO UPDATE SET revoked = enrolled.revoked OR EXCLUDED.revoked, \
                         revoked_ms = coalesce(enrolled.revoked_ms, EXCLUDED.revoked_ms) \
                     RETURNING (xmax = 0)",
                    &[
                        &d.device,
                        &d.class,
                        &d.public_key,
                        &d.password_sha256,
                        &ms(d.enrolled_ms),
                        &d.revoked,
                        &d.revoked_ms.map(ms),
                        &ms(d.last_request_ms),
                    ],
                )
                .await
                .map_err(PgError::query("copying an enrolled device"))?
                .get::<_, bool>(0) as u64;
        }
        tx.commit().await.map_err(PgError::query("committing the enrollment copy"))?;
        Ok(new)
    }

    /// Keeps `mirror` equal to the table until `stop`: every device a notification names is reloaded, and
    /// everything after each (re)connection.
    pub(crate) async fn follow(
        self,
        mirror: Arc<RwLock<HashMap<String, Record>>>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let pg = self.pg.clone();
        super::follow(pg, CHANNEL, stop, move |device| {
            let (store, mirror) = (self.clone(), mirror.clone());
            async move {
                match device {
                    None => {
                        let fresh: HashMap<String, Record> =
                            store.all().await?.into_iter().map(|r| (r.device.clone(), r)).collect();
                        *mirror.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                    }
                    Some(d) => {
                        if let Some(r) = store.one(&d).await? {
                            crate::fleet::enrollment::mirror_into(
                                &mut mirror.write().unwrap_or_else(|p| p.into_inner()),
                                r,
                            );
                        }
                    }
                }
                Ok(())
            }
        })
        .await
    }
}
