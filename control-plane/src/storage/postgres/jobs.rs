//! The training queue on PostgreSQL: jobs any replica queues and trainer replicas claim.
//!
//! A trainer claims the oldest queued job with `FOR UPDATE SKIP LOCKED` (two trainers never claim one job),
//! and while it trains it writes the job's progress and a heartbeat, guarded by its own name: a trainer that
//! lost its claim learns so at its next heartbeat and stops. A running job whose heartbeat is older than the
//! claim timeout (its trainer died or was cut off) is claimed again by the next trainer that looks, up to
//! [`MAX_ATTEMPTS`] times, then failed with the reason. A job ends only by its trainer's final write, and
//! the model version it records is written in one transaction with its production pointer, so a trainer that
//! dies leaves either nothing or a whole version behind.

use super::{Pg, PgError};
use crate::ml::jobs::{Job, JobState};

/// Claims of one job, at most: a job whose trainers keep dying is failed rather than claimed forever.
pub const MAX_ATTEMPTS: i32 = 3;

/// The training queue kept in PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgJobs {
    pg: Pg,
}

/// A claimed job: its row's id, the request (CBOR, as queued), the job, and which attempt this is.
pub struct Claimed {
    pub request: Vec<u8>,
    pub job: Job,
    pub attempt: i32,
}

fn ms(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

fn decode(v: &[u8]) -> Result<Job, PgError> {
    ciborium::from_reader(v).map_err(|e| PgError::Bad(format!("stored training job is corrupt: {e}")))
}

fn encode(j: &Job) -> Vec<u8> {
    edgeloop_common::signing::to_cbor(j)
}

impl PgJobs {
    pub fn new(pg: Pg) -> PgJobs {
        PgJobs { pg }
    }

    /// Queues a job; `make` builds it with the id the row gets.
    pub async fn enqueue(&self, request: &[u8], make: impl FnOnce(u64) -> Job) -> Result<Job, PgError> {
        let c = self.pg.client().await?;
        let id: i64 = c
            .query_one("SELECT nextval(pg_get_serial_sequence('training_jobs', 'id'))", &[])
            .await
            .map_err(PgError::query("numbering a training job"))?
            .get(0);
        let job = make(id as u64);
        c.execute(
            "INSERT INTO training_jobs (id, class, state, request, job, created_ms) VALUES ($1, $2, 'queued', $3, $4, $5)",
            &[&id, &job.class, &request, &encode(&job), &ms(job.created_ms)],
        )
        .await
        .map_err(PgError::query("queueing a training job"))?;
        Ok(job)
    }

    pub async fn list(&self) -> Result<Vec<Job>, PgError> {
        let c = self.pg.client().await?;
        let rows = c
            .query("SELECT job FROM training_jobs ORDER BY id", &[])
            .await
            .map_err(PgError::query("listing training jobs"))?;
        rows.iter().map(|r| decode(r.get(0))).collect()
    }

    pub async fn get(&self, id: u64) -> Result<Option<Job>, PgError> {
        let c = self.pg.client().await?;
        let row = c
            .query_opt("SELECT job FROM training_jobs WHERE id = $1", &[&ms(id)])
            .await
            .map_err(PgError::query("reading a training job"))?;
        row.map(|r| decode(r.get(0))).transpose()
    }

    /// Fails running jobs whose trainer went silent after their last attempt, then claims the oldest job that
    /// is queued or whose trainer went silent before `stale_before_ms`, for `me`.
    pub async fn claim(&self, me: &str, now_ms: u64, stale_before_ms: u64) -> Result<Option<Claimed>, PgError> {
        let mut c = self.pg.client().await?;
        let tx = c.transaction().await.map_err(PgError::query("starting a claim"))?;
        let dead = tx
            .query(
                "SELECT id, job, claimed_by FROM training_jobs WHERE state = 'running' AND heartbeat_ms < $1 \
                 AND attempts >= $2 FOR UPDATE SKIP LOCKED",
                &[&ms(stale_before_ms), &MAX_ATTEMPTS],
            )
            .await
            .map_err(PgError::query("finding abandoned training jobs"))?;
        for r in dead {
            let mut job = decode(r.get(1))?;
            job.state = JobState::Failed;
            job.finished_ms = Some(now_ms);
            job.error = Some(format!(
                "its trainer ({}) stopped answering, {MAX_ATTEMPTS} times: not claimed again",
                r.get::<_, Option<String>>(2).unwrap_or_default()
            ));
            tx.execute(
                "UPDATE training_jobs SET state = 'failed', job = $2 WHERE id = $1",
                &[&r.get::<_, i64>(0), &encode(&job)],
            )
            .await
            .map_err(PgError::query("failing an abandoned training job"))?;
        }
        let row = tx
            .query_opt(
                "SELECT id, request, job, attempts, claimed_by FROM training_jobs \
                 WHERE state = 'queued' OR (state = 'running' AND heartbeat_ms < $1) \
                 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                &[&ms(stale_before_ms)],
            )
            .await
            .map_err(PgError::query("claiming a training job"))?;
        let Some(r) = row else {
            tx.commit().await.map_err(PgError::query("committing a claim"))?;
            return Ok(None);
        };
        let id: i64 = r.get(0);
        let attempt = r.get::<_, i32>(3) + 1;
        let mut job = decode(r.get(2))?;
        job.state = JobState::Running;
        job.message = match r.get::<_, Option<String>>(4) {
            Some(before) => format!("claimed by {me} (attempt {attempt}; {before} stopped answering)"),
            None => format!("claimed by {me}"),
        };
        job.progress = 0.0;
        tx.execute(
            "UPDATE training_jobs SET state = 'running', claimed_by = $2, heartbeat_ms = $3, attempts = $4, job = $5 \
             WHERE id = $1",
            &[&id, &me, &ms(now_ms), &attempt, &encode(&job)],
        )
        .await
        .map_err(PgError::query("claiming a training job"))?;
        tx.commit().await.map_err(PgError::query("committing a claim"))?;
        Ok(Some(Claimed { request: r.get(1), job, attempt }))
    }

    /// Writes a claimed job's progress (or its end, when `job` has finished) if `me` still holds it; returns
    /// whether it did.
    pub async fn write(&self, me: &str, job: &Job, now_ms: u64) -> Result<bool, PgError> {
        let c = self.pg.client().await?;
        let n = c
            .execute(
                "UPDATE training_jobs SET state = $3, job = $4, heartbeat_ms = $5 \
                 WHERE id = $1 AND claimed_by = $2 AND state = 'running'",
                &[&ms(job.id), &me, &job.state.word(), &encode(job), &ms(now_ms)],
            )
            .await
            .map_err(PgError::query("writing a training job"))?;
        Ok(n == 1)
    }
}
