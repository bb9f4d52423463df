-- edgeloop schema, migration 2: enrollment tokens and enrolled devices.
-- Released migrations are never edited; a change is a new file with the next number.

-- Tokens devices enroll with: only the SHA-256 of the secret is kept.
CREATE TABLE enrollment_tokens (
    id          text   PRIMARY KEY,
    class       text   NOT NULL,
    sha256      text   NOT NULL,
    uses_left   bigint NOT NULL CHECK (uses_left >= 0),
    expires_ms  bigint NOT NULL,
    created_ms  bigint NOT NULL
);

-- Enrolled devices: the Ed25519 public key, the SHA-256 of the MQTT password, revocation (final: a revoked
-- row is never written again).
CREATE TABLE enrolled (
    device           text    PRIMARY KEY,
    class            text    NOT NULL,
    public_key       text    NOT NULL,
    password_sha256  text    NOT NULL,
    enrolled_ms      bigint  NOT NULL,
    revoked          boolean NOT NULL DEFAULT false,
    revoked_ms       bigint,
    last_request_ms  bigint  NOT NULL DEFAULT 0
);
