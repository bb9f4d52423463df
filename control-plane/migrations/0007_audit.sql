-- edgeloop schema, migration 7: the audit log, shared by replicas.
-- Released migrations are never edited; a change is a new file with the next number.

-- Who did what through the operator API, on any replica: the entry is CBOR, as the embedded log keeps it.
CREATE TABLE audit (
    at_ms  bigint    NOT NULL,
    id     bigserial NOT NULL,
    entry  bytea     NOT NULL,
    PRIMARY KEY (at_ms, id)
);
