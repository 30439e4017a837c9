-- Logged-out sessions, until their JWT would have expired anyway. In Postgres rather than Redis, so
-- that a Redis restart cannot bring a logged-out session back, and pages keep working while Redis is away.
-- (IF NOT EXISTS: a development database may have it from an early form of 004.)
CREATE TABLE IF NOT EXISTS revoked_sessions (
    jti        text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS revoked_sessions_expiry_idx ON revoked_sessions (expires_at);
