-- edgeloop schema, migration 1: telemetry records and acknowledgement watermarks.
-- Released migrations are never edited; a change is a new file with the next number.

-- Every accepted record, once: the primary key (device, seq) is what keeps ingest exactly-once when two
-- replicas store batches of the same device at the same time, or when a batch is delivered again.
CREATE TABLE telemetry (
    device  text   NOT NULL,
    seq     bigint NOT NULL CHECK (seq > 0),
    ts_ms   bigint NOT NULL,
    -- The record as the devices' protocol carries it (CBOR; docs/protocol.md, "Record").
    record  bytea  NOT NULL,
    PRIMARY KEY (device, seq)
);

-- Each device's cumulative acknowledgement: every seq at or below it is stored (or was recorded as lost).
CREATE TABLE watermarks (
    device  text   PRIMARY KEY,
    upto    bigint NOT NULL CHECK (upto >= 0)
);
