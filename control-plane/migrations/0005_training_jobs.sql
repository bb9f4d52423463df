-- edgeloop schema, migration 5: the training queue.
-- Released migrations are never edited; a change is a new file with the next number.

-- Training jobs, claimed by trainer replicas (`roles = ["train"]`) with FOR UPDATE SKIP LOCKED. A running job's
-- trainer writes `heartbeat_ms` as it goes; a job whose heartbeat is older than the claim timeout is claimed
-- again by another trainer (or failed, after `attempts` tries). `job` is the job as the API shows it (CBOR).
CREATE TABLE training_jobs (
    id            bigserial PRIMARY KEY,
    class         text    NOT NULL,
    state         text    NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'interrupted')),
    request       bytea   NOT NULL,
    job           bytea   NOT NULL,
    claimed_by    text,
    heartbeat_ms  bigint  NOT NULL DEFAULT 0,
    attempts      integer NOT NULL DEFAULT 0,
    created_ms    bigint  NOT NULL
);
CREATE INDEX training_jobs_by_state ON training_jobs (state, id);
