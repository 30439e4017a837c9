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


def user_tokens_key(user_id: str) -> str:
    """Redis set of the hashes of a user's outstanding tokens, for revocation at logout."""
    return f"{PREFIX}console:user:{user_id}"


# Ending live sessions. A revocation publishes on the VM's or the user's end channel; a live session
# ends when it hears its channel. For what it did not hear (sent before it subscribed, or while Redis
# was away) it also checks state that the revocation changed in the same MULTI: the VM's VNC target
# (deleted when the VM stops) and the user's generation key (a fresh random value at each logout).
GENERATION_TTL = 8 * 86400  # longer than the longest console session (CONSOLE_MAX_SESSION <= 7 days)
DEFAULT_MAX_SESSION = 8 * 3600  # when a token record does not say (CONSOLE_MAX_SESSION's default)
CLOSE_REVOKED = 4001  # WebSocket close code: the VM stopped or was destroyed, or its user logged out
CLOSE_TIME_LIMIT = 4002  # WebSocket close code: the session reached its maximum duration


def user_generation_key(user_id: str) -> str:
    """Redis key: a random value replaced each time the user's consoles are revoked."""
    return f"{PREFIX}console:gen:user:{user_id}"


def vm_end_channel(vm_id: str) -> str:
    """Pub/sub channel on which the gateway tells live sessions of a VM to end."""
    return f"{PREFIX}console:end:vm:{vm_id}"


def user_end_channel(user_id: str) -> str:
    """Pub/sub channel on which the gateway tells live sessions of a user to end."""
    return f"{PREFIX}console:end:user:{user_id}"


def api_token_end_channel(token_id: str) -> str:
    """Pub/sub channel on which the gateway tells live sessions opened with one API token to end."""
    return f"{PREFIX}console:end:apitoken:{token_id}"


def api_token_revoked_key(token_id: str) -> str:
    """Redis key, set (for GENERATION_TTL) when an API token is revoked: sessions it opened end."""
    return f"{PREFIX}console:revoked:apitoken:{token_id}"


# The per-user cap on open console sessions (each is a websockify process). A live session is a
# member of its user's sorted set, scored with the time its registration lapses unless refreshed;
# the session's watcher refreshes it at every state check and removes it when the session ends.
# A session whose process was killed outright lapses within SESSION_LEASE seconds.
SESSION_LEASE = 40
DEFAULT_MAX_CONSOLES = 10  # when a token record does not say (CONSOLES_PER_USER's default)


def user_sessions_key(user_id: str) -> str:
    """Redis sorted set of a user's live console sessions: member -> epoch seconds its lease lapses."""
    return f"{PREFIX}console:sessions:user:{user_id}"


def mask(token: str) -> str:
    """Return a token safe to log: its first four characters only."""
    return token[:4] + "…" if token else ""


# Idle suspend (gateway/engine/activity.py): when a VM was last used, and whether a console is open on it.
CONSOLE_LIVE_TTL = 40  # seconds; a live session refreshes its VM's key at least every 15 s (STATE_POLL)


def activity_key(vm_id: str) -> str:
    """Redis key: the epoch seconds of the last API request on the VM or console heartbeat."""
    return f"{PREFIX}activity:{vm_id}"


def console_live_key(vm_id: str) -> str:
    """Redis key, with a short TTL: present while a console session on the VM is open."""
    return f"{PREFIX}console:live:{vm_id}"
