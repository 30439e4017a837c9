-- Ending every session of a user (password reset, disable) bumps session_epoch; a session JWT
-- carries the epoch it was issued in and is refused once the user's epoch has moved on.
ALTER TABLE users ADD COLUMN session_epoch integer NOT NULL DEFAULT 0;

-- API tokens for scripts and GitOps. Only a SHA-256 of the token is kept; `prefix` is the first
-- characters, so a user can tell their tokens apart in listings.
CREATE TABLE api_tokens (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id),
    name         text NOT NULL,
    token_hash   text NOT NULL UNIQUE,
    prefix       text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_tokens_user_idx ON api_tokens (user_id);
