-- edgeloop schema, migration 3: operator tokens.
-- Released migrations are never edited; a change is a new file with the next number.

-- Bearer tokens of the operator API: only the SHA-256 of each secret is kept.
CREATE TABLE operator_tokens (
    id          text    PRIMARY KEY,
    name        text    NOT NULL,
    role        text    NOT NULL CHECK (role IN ('broker', 'viewer', 'operator', 'admin')),
    sha256      text    NOT NULL,
    created_ms  bigint  NOT NULL,
    revoked     boolean NOT NULL DEFAULT false
);
