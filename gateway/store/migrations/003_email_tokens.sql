-- One-time tokens mailed to users: `verify` (confirm the address) and `reset` (set a new password).
-- Only a SHA-256 of the token is kept. A token is good once (`used_at`) and until `expires_at`;
-- issuing a new token of a purpose spends the user's earlier unused ones.
CREATE TABLE email_tokens (
    id         bigserial PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    purpose    text NOT NULL CHECK (purpose IN ('verify', 'reset')),
    token_hash text NOT NULL UNIQUE,
    expires_at timestamptz NOT NULL,
    used_at    timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX email_tokens_user_idx ON email_tokens (user_id, purpose) WHERE used_at IS NULL;
