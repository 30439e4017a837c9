-- The lifecycle engine (docs/LIFECYCLE.md): crash history for the restart policy, a pending
-- restart time, and an index for the reconciler's scans.

ALTER TABLE vms
    -- When QEMU died unexpectedly, most recent last; the restart policy counts those within its interval.
    ADD COLUMN crash_times   timestamptz[] NOT NULL DEFAULT '{}',
    -- A crashed VM waiting out the policy's delay is restarted at (or after) this time.
    ADD COLUMN restart_after timestamptz;

CREATE INDEX vms_state_idx ON vms (state) WHERE state <> 'destroyed';

-- Logged-out sessions, until their JWT would have expired anyway. In Postgres rather than Redis, so
-- that a Redis restart cannot bring a logged-out session back, and pages keep working while Redis is away.
CREATE TABLE revoked_sessions (
    jti        text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
CREATE INDEX revoked_sessions_expiry_idx ON revoked_sessions (expires_at);
