"""Console token conventions shared by the gateway (which issues tokens) and the websockify
plugin (which redeems them). Only a token's SHA-256 is stored; the token itself is shown once."""

from __future__ import annotations

import hashlib
import re
import secrets

PREFIX = "vmgate:"
TOKEN_BYTES = 32
# secrets.token_urlsafe(32) gives 43 characters of [A-Za-z0-9_-].
TOKEN_RE = re.compile(r"\A[A-Za-z0-9_-]{43}\Z")


def new_token() -> str:
    """Return a fresh random console token."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def hash_token(token: str) -> str:
    """Return the hex SHA-256 under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_key(token_hash: str) -> str:
    """Redis key of one token's record: JSON {vm_id, user_id, expires_at}, with a TTL."""
    return f"{PREFIX}console:token:{token_hash}"


def vm_tokens_key(vm_id: str) -> str:
    """Redis set of the hashes of a VM's outstanding tokens, for revocation."""
    return f"{PREFIX}console:vm:{vm_id}"


def vnc_target_key(vm_id: str) -> str:
    """Redis key holding where a running VM's VNC listens (JSON of drivers.base.VncTarget)."""
    return f"{PREFIX}vnc:{vm_id}"


def mask(token: str) -> str:
    """Return a token safe to log: its first four characters only."""
    return token[:4] + "…" if token else ""
