-- edgeloop schema, migration 4: the rest of the control plane's state, shared by replicas.
-- Released migrations are never edited; a change is a new file with the next number.

-- Rollouts, desired states, device tags, bundles, class configurations, agent releases, model versions,
-- production pointers and labels: the same CBOR documents under the same keys as the embedded store's sled
-- trees (`tree` names the tree), so that both back-ends share one code path and `migrate --to postgres`
-- copies them as they are.
CREATE TABLE kv (
    tree   text  NOT NULL,
    key    bytea NOT NULL,
    value  bytea NOT NULL,
    PRIMARY KEY (tree, key)
);

-- A counter per group of trees, raised by the replica that takes the group's write lock before it writes:
-- a replica whose copy in memory was read at an older generation reads the group again.
CREATE TABLE kv_generations (
    domain      text   PRIMARY KEY,
    generation  bigint NOT NULL
);

-- Model artifacts and agent builds, content-addressed: any replica serves any of them.
CREATE TABLE artifacts (
    sha256      text   PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    bytes       bytea  NOT NULL,
    created_ms  bigint NOT NULL
);

-- The device registry: one CBOR document per device, merged by each replica under the row's lock (counters
-- add up, the newest heartbeat wins). `rev` orders changes so replicas read only what changed since they last
-- looked; a decommissioned device keeps a `removed` row so that they forget it too.
CREATE SEQUENCE devices_rev;
CREATE TABLE devices (
    id       text    PRIMARY KEY,
    rev      bigint  NOT NULL,
    removed  boolean NOT NULL DEFAULT false,
    doc      bytea   NOT NULL
);
CREATE INDEX devices_by_rev ON devices (rev);
