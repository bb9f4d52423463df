-- edgeloop schema, migration 6: the live replicas.
-- Released migrations are never edited; a change is a new file with the next number.

-- Each ingest replica writes its row every few seconds; the rows seen recently are the replicas sharing the
-- uplink, among which each device's rate limit is shared.
CREATE TABLE replicas (
    id       text   PRIMARY KEY,
    role     text   NOT NULL,
    seen_ms  bigint NOT NULL
);
