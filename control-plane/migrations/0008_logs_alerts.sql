-- edgeloop schema, migration 8: device logs and alerts, shared by replicas.
-- Released migrations are never edited; a change is a new file with the next number.

-- The warnings and errors agents ship on up/logs. A line's key is (received_ms, id): the control plane's
-- clock, then the row's number. `level`: 0 warn, 1 error.
CREATE TABLE device_logs (
    received_ms bigint    NOT NULL,
    id          bigserial NOT NULL,
    device      text      NOT NULL,
    class       text      NOT NULL,
    level       smallint  NOT NULL,
    target      text      NOT NULL,
    message     text      NOT NULL,
    ts_ms       bigint    NOT NULL,
    PRIMARY KEY (received_ms, id)
);
CREATE INDEX device_logs_by_device ON device_logs (device, received_ms, id);

-- Per device: lines stored, lines it left out, lines ingest cut.
CREATE TABLE device_log_stats (
    device     text   PRIMARY KEY,
    stored     bigint NOT NULL,
    suppressed bigint NOT NULL,
    cut        bigint NOT NULL
);

-- The latest snapshot of each alert a device raised (`doc`: the stored alert as JSON), listed by `list_ms`
-- (its onset, or when it arrived if the onset was far ahead), then device and id in byte order.
CREATE TABLE alerts (
    device      text COLLATE "C" NOT NULL,
    id          bigint  NOT NULL,
    list_ms     bigint  NOT NULL,
    received_ms bigint  NOT NULL,
    open        boolean NOT NULL,
    class       text    NOT NULL,
    doc         bytea   NOT NULL,
    PRIMARY KEY (device, id)
);
CREATE INDEX alerts_listed ON alerts (list_ms, device, id);
CREATE INDEX alerts_open ON alerts (class) WHERE open;

-- Per device: the highest snapshot number up to which every snapshot is stored (what acknowledgements name).
CREATE TABLE alert_marks (
    device text   PRIMARY KEY,
    mark   bigint NOT NULL
);
